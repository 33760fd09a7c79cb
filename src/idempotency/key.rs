//! Parsing the `Idempotency-Key`, deriving the scoped record key, and
//! fingerprinting the request.
//!
//! The record key is a SHA-256 over the caller scope (values of the scope
//! headers), the method, the path and the key, each length-prefixed so no two
//! different inputs can produce the same byte stream. User text therefore never
//! reaches the store as a key name: it cannot choose a Redis hash slot or
//! collide with another caller's record.

use std::borrow::Cow;
use std::fmt;

use http::{HeaderMap, HeaderName, Method};
use sha2::{Digest, Sha256};

/// Why a key header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("the key is empty")]
    Empty,
    #[error("the key is {len} characters long; at most {max} are allowed")]
    TooLong { len: usize, max: usize },
    #[error("the key contains a character outside printable ASCII")]
    InvalidChar,
    #[error("the key is a malformed quoted string")]
    BadQuoting,
    #[error("the key header was sent more than once")]
    Repeated,
    #[error("the JSON value named as the key is not a string or a number")]
    NotScalar,
    #[error("the JSON body names the key's member more than once")]
    RepeatedMember,
}

/// Parses an `Idempotency-Key` header value.
///
/// Accepts an RFC 8941 sf-string (`"abc"`, with `\"` and `\\` escapes) or a
/// bare key of visible ASCII (`abc`); both mean `abc`. Bare keys are more
/// lenient than an sf-token because real clients send UUIDs, which start with
/// a digit. Borrowed unless the string had escapes.
pub fn parse_key(raw: &[u8], max_len: usize) -> Result<Cow<'_, str>, KeyError> {
    let raw = trim_ows(raw);
    let key: Cow<'_, [u8]> = if raw.first() == Some(&b'"') {
        parse_sf_string(raw)?
    } else {
        if raw.iter().any(|&b| !(0x21..=0x7e).contains(&b)) {
            return Err(KeyError::InvalidChar);
        }
        Cow::Borrowed(raw)
    };
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    // Every byte is ASCII by now, so bytes are characters.
    if key.len() > max_len {
        return Err(KeyError::TooLong {
            len: key.len(),
            max: max_len,
        });
    }
    Ok(match key {
        Cow::Borrowed(b) => {
            Cow::Borrowed(std::str::from_utf8(b).map_err(|_| KeyError::InvalidChar)?)
        }
        Cow::Owned(v) => Cow::Owned(String::from_utf8(v).map_err(|_| KeyError::InvalidChar)?),
    })
}

fn trim_ows(mut b: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = b {
        b = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = b {
        b = rest;
    }
    b
}

/// RFC 8941 §4.2.5: DQUOTE *( unescaped / "\" ( DQUOTE / "\" ) ) DQUOTE, where
/// unescaped is %x20-21 / %x23-5B / %x5D-7E.
fn parse_sf_string(raw: &[u8]) -> Result<Cow<'_, [u8]>, KeyError> {
    let inner = match raw {
        [b'"', inner @ .., b'"'] if raw.len() >= 2 => inner,
        _ => return Err(KeyError::BadQuoting),
    };
    if !inner.contains(&b'\\') {
        if inner.iter().any(|&b| !(0x20..=0x7e).contains(&b)) {
            return Err(KeyError::InvalidChar);
        }
        if inner.contains(&b'"') {
            return Err(KeyError::BadQuoting);
        }
        return Ok(Cow::Borrowed(inner));
    }
    let mut out = Vec::with_capacity(inner.len());
    let mut bytes = inner.iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'\\' => match bytes.next() {
                Some(&e @ (b'"' | b'\\')) => out.push(e),
                _ => return Err(KeyError::BadQuoting),
            },
            b'"' => return Err(KeyError::BadQuoting),
            0x20..=0x7e => out.push(b),
            _ => return Err(KeyError::InvalidChar),
        }
    }
    Ok(Cow::Owned(out))
}

/// The store key of one request's record: SHA-256 of scope, method, path, key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordKey(pub [u8; 32]);

/// Hashes [`RecordKey`]s for this process's own maps (the memory store's
/// shards and their tables, the live responses), with a secret drawn when
/// it is made.
///
/// A record key is a SHA-256 output, so any 8 of its bytes spread well over
/// keys nobody chose. But clients choose their `Idempotency-Key`s, and one
/// who knows which bytes pick a shard and a bucket can grind keys (about
/// 2^16 hashes each) that all land in one shard's one probe chain, so that
/// every lookup there walks them. Mixed with a secret by a folded multiply
/// (as foldhash and ahash do), where a key lands cannot be known outside
/// the process, at a few instructions a hash.
#[derive(Clone, Copy)]
pub struct KeyHashes {
    seeds: [u64; 2],
}

impl KeyHashes {
    /// Draws a new secret.
    pub fn random() -> Self {
        KeyHashes {
            seeds: rand::random(),
        }
    }

    /// `key`'s hash under this secret.
    pub fn hash(&self, key: &RecordKey) -> u64 {
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&key.0[i * 8..i * 8 + 8]);
            u64::from_le_bytes(w)
        };
        let p = u128::from(word(0) ^ self.seeds[0]) * u128::from(word(1) ^ self.seeds[1]);
        (p as u64) ^ ((p >> 64) as u64)
    }
}

impl Default for KeyHashes {
    fn default() -> Self {
        KeyHashes::random()
    }
}

impl std::hash::BuildHasher for KeyHashes {
    type Hasher = KeyHasher;
    fn build_hasher(&self) -> KeyHasher {
        KeyHasher {
            hashes: *self,
            hash: 0,
        }
    }
}

/// The [`std::hash::Hasher`] of [`KeyHashes`]: a [`RecordKey`] hashes as
/// its length, then its 32 bytes in one write; the length is the same for
/// every key and is passed over.
pub struct KeyHasher {
    hashes: KeyHashes,
    hash: u64,
}

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.hash
    }
    fn write(&mut self, bytes: &[u8]) {
        if let Ok(key) = <[u8; 32]>::try_from(bytes) {
            self.hash = self.hashes.hash(&RecordKey(key));
        }
    }
}

/// SHA-256 of what makes two requests "the same request" for one key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

/// Feeds length-prefixed fields into a hash, so field boundaries are part of
/// the input (`"ab" + "c"` never equals `"a" + "bc"`).
struct Fields(Sha256);

impl Fields {
    fn new(domain: &[u8]) -> Self {
        let mut f = Fields(Sha256::new());
        f.field(domain);
        f
    }
    fn field(&mut self, bytes: &[u8]) {
        self.0.update((bytes.len() as u64).to_be_bytes());
        self.0.update(bytes);
    }
    /// Every value of each named header, in order, with a count per name.
    fn headers(&mut self, headers: &HeaderMap, names: &[HeaderName]) {
        for name in names {
            self.field(name.as_str().as_bytes());
            let values = headers.get_all(name);
            self.0.update((values.iter().count() as u64).to_be_bytes());
            for v in values {
                self.field(v.as_bytes());
            }
        }
    }
    fn finish(self) -> [u8; 32] {
        self.0.finalize().into()
    }
}

impl RecordKey {
    /// Derives the record key for an HTTP request.
    pub fn derive(
        headers: &HeaderMap,
        scope_headers: &[HeaderName],
        method: &Method,
        path: &str,
        key: &str,
    ) -> Self {
        let mut f = Fields::new(b"idemgate/http/v1");
        f.headers(headers, scope_headers);
        f.field(method.as_str().as_bytes());
        f.field(path.as_bytes());
        f.field(key.as_bytes());
        RecordKey(f.finish())
    }

    /// The caller's scope alone (the values of `scope_headers`, hashed): the
    /// key of its fair-share bucket. Raw values never reach the store.
    pub fn derive_scope(headers: &HeaderMap, scope_headers: &[HeaderName]) -> Self {
        let mut f = Fields::new(b"idemgate/scope/v1");
        f.headers(headers, scope_headers);
        RecordKey(f.finish())
    }

    /// Derives the record key for a consumer-dedup key within a scope.
    pub fn derive_dedup(scope: &str, key: &str) -> Self {
        let mut f = Fields::new(b"idemgate/dedup/v1");
        f.field(scope.as_bytes());
        f.field(key.as_bytes());
        RecordKey(f.finish())
    }

    /// Lowercase hex, as used in store key names and logs.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }
}

impl Fingerprint {
    /// Fingerprints a request: method, path and query, the fingerprint
    /// headers' values and the body.
    pub fn compute(
        method: &Method,
        path_and_query: &str,
        headers: &HeaderMap,
        fingerprint_headers: &[HeaderName],
        body: &[u8],
    ) -> Self {
        let mut f = Fields::new(b"idemgate/fingerprint/v1");
        f.field(method.as_str().as_bytes());
        f.field(path_and_query.as_bytes());
        f.headers(headers, fingerprint_headers);
        f.field(body);
        Fingerprint(f.finish())
    }
}

impl fmt::Debug for RecordKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RecordKey({})", self.to_hex())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", hex(&self.0))
    }
}

/// Lowercase hex of some bytes.
pub fn hex(bytes: &[u8]) -> String {
    // Written as bytes, then checked once: pushing the digits as chars
    // one by one took about 25 instructions a byte (benches/RESULTS.md,
    // "Moves and lookups").
    let mut out = vec![0; bytes.len() * 2];
    hex_into(bytes, &mut out);
    String::from_utf8(out).expect("hex digits are ASCII")
}

/// The lowercase hex digits of `bytes` into `out`, which is twice as long.
pub fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (pair, &b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 15)];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    /// Two processes (two secrets) put a key in different places, and a
    /// map's hasher gives what `hash` gives: nothing outside the process
    /// says where a key lands.
    #[test]
    fn where_a_key_lands_follows_the_secret() {
        use std::hash::BuildHasher;
        let key = RecordKey([7; 32]);
        let (one, two) = (KeyHashes::random(), KeyHashes::random());
        assert_ne!(one.hash(&key), two.hash(&key));
        assert_eq!(one.hash_one(key), one.hash(&key));
    }

    const MAX: usize = 255;

    #[test]
    fn bare_and_quoted_keys_mean_the_same() {
        assert_eq!(parse_key(b"abc", MAX).unwrap(), "abc");
        assert_eq!(parse_key(b"\"abc\"", MAX).unwrap(), "abc");
        assert_eq!(parse_key(b"  abc\t", MAX).unwrap(), "abc");
        let uuid = b"8e03978e-40d5-43e8-bc93-6894a57f9324";
        assert_eq!(parse_key(uuid, MAX).unwrap().as_bytes(), uuid);
    }

    #[test]
    fn quoted_keys_unescape_and_may_hold_spaces() {
        assert_eq!(parse_key(br#""a b""#, MAX).unwrap(), "a b");
        assert_eq!(parse_key(br#""a\"b\\c""#, MAX).unwrap(), r#"a"b\c"#);
        assert!(matches!(
            parse_key(br#""a\"b""#, MAX).unwrap(),
            Cow::Owned(_)
        ));
        assert!(matches!(
            parse_key(b"\"ab\"", MAX).unwrap(),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn malformed_keys_are_refused() {
        assert_eq!(parse_key(b"", MAX), Err(KeyError::Empty));
        assert_eq!(parse_key(b"   ", MAX), Err(KeyError::Empty));
        assert_eq!(parse_key(b"\"\"", MAX), Err(KeyError::Empty));
        assert_eq!(parse_key(b"\"", MAX), Err(KeyError::BadQuoting));
        assert_eq!(parse_key(b"\"abc", MAX), Err(KeyError::BadQuoting));
        assert_eq!(parse_key(br#""a"b""#, MAX), Err(KeyError::BadQuoting));
        assert_eq!(parse_key(br#""a\nb""#, MAX), Err(KeyError::BadQuoting));
        assert_eq!(parse_key(br#""ab\""#, MAX), Err(KeyError::BadQuoting));
        assert_eq!(parse_key(b"a b", MAX), Err(KeyError::InvalidChar));
        assert_eq!(parse_key(b"a\x01b", MAX), Err(KeyError::InvalidChar));
        assert_eq!(parse_key(b"a\x7fb", MAX), Err(KeyError::InvalidChar));
        assert_eq!(parse_key(b"caf\xc3\xa9", MAX), Err(KeyError::InvalidChar));
        assert_eq!(
            parse_key(b"\"caf\xc3\xa9\"", MAX),
            Err(KeyError::InvalidChar)
        );
        assert_eq!(parse_key(b"\"a\\\\\xff\"", MAX), Err(KeyError::InvalidChar));
    }

    #[test]
    fn length_limit_counts_the_unquoted_key() {
        let k = "k".repeat(MAX);
        assert!(parse_key(k.as_bytes(), MAX).is_ok());
        assert!(parse_key(format!("\"{k}\"").as_bytes(), MAX).is_ok());
        let long = "k".repeat(MAX + 1);
        assert_eq!(
            parse_key(long.as_bytes(), MAX),
            Err(KeyError::TooLong { len: 256, max: MAX })
        );
    }

    #[test]
    fn hash_tag_braces_are_just_key_text() {
        let k = parse_key(b"{slot}abc", MAX).unwrap();
        let rk = RecordKey::derive(&HeaderMap::new(), &[], &Method::POST, "/", &k);
        assert!(!rk.to_hex().contains('{'));
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(*n, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn record_key_depends_on_scope_method_path_and_key() {
        let scope = [http::header::AUTHORIZATION];
        let a = headers(&[("authorization", "Bearer A")]);
        let b = headers(&[("authorization", "Bearer B")]);
        let base = RecordKey::derive(&a, &scope, &Method::POST, "/p", "k");
        assert_eq!(
            base,
            RecordKey::derive(&a, &scope, &Method::POST, "/p", "k")
        );
        assert_ne!(
            base,
            RecordKey::derive(&b, &scope, &Method::POST, "/p", "k")
        );
        assert_ne!(
            base,
            RecordKey::derive(&HeaderMap::new(), &scope, &Method::POST, "/p", "k")
        );
        assert_ne!(
            base,
            RecordKey::derive(&a, &scope, &Method::PATCH, "/p", "k")
        );
        assert_ne!(
            base,
            RecordKey::derive(&a, &scope, &Method::POST, "/q", "k")
        );
        assert_ne!(
            base,
            RecordKey::derive(&a, &scope, &Method::POST, "/p", "j")
        );
        // Field boundaries count: path "/pk" + key "" is not path "/p" + key "k".
        assert_ne!(
            base,
            RecordKey::derive(&a, &scope, &Method::POST, "/pk", "")
        );
        // A header sent as two values is not the same as one joined value.
        let two = headers(&[("authorization", "a"), ("authorization", "b")]);
        let one = headers(&[("authorization", "ab")]);
        assert_ne!(
            RecordKey::derive(&two, &scope, &Method::POST, "/p", "k"),
            RecordKey::derive(&one, &scope, &Method::POST, "/p", "k")
        );
        assert_ne!(base, RecordKey::derive_dedup("/p", "k"));
    }

    #[test]
    fn fingerprint_depends_on_query_headers_and_body() {
        let ct = [http::header::CONTENT_TYPE];
        let json = headers(&[("content-type", "application/json")]);
        let form = headers(&[("content-type", "application/x-www-form-urlencoded")]);
        let f = |m: &Method, pq: &str, h: &HeaderMap, body: &[u8]| {
            Fingerprint::compute(m, pq, h, &ct, body)
        };
        let base = f(&Method::POST, "/p?x=1", &json, b"{}");
        assert_eq!(base, f(&Method::POST, "/p?x=1", &json, b"{}"));
        assert_ne!(base, f(&Method::POST, "/p?x=2", &json, b"{}"));
        assert_ne!(base, f(&Method::POST, "/p?x=1", &form, b"{}"));
        assert_ne!(base, f(&Method::POST, "/p?x=1", &json, b"{ }"));
        assert_ne!(base, f(&Method::PATCH, "/p?x=1", &json, b"{}"));
        // Headers outside the fingerprint list do not matter.
        let mut extra = json.clone();
        extra.insert("x-request-id", HeaderValue::from_static("1"));
        assert_eq!(base, f(&Method::POST, "/p?x=1", &extra, b"{}"));
    }

    #[test]
    fn hex_is_lowercase() {
        assert_eq!(hex(&[0x00, 0xab, 0xff]), "00abff");
    }
}
