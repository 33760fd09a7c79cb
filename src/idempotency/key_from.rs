//! Where a route's idempotency key comes from (`key_from`): a header (the
//! `Idempotency-Key` by default), a member of a JSON body named by an RFC
//! 6901 pointer (a webhook event's `id`), or the SHA-256 of the body.

use http::HeaderName;
use sha2::{Digest, Sha256};

use super::key::KeyError;
use super::pointer::{JsonPointer, PointerError};

/// A route's key source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyFrom {
    /// `header:NAME`: the header's value, parsed as an `Idempotency-Key`.
    /// `header:NAME|OTHER`: whichever of the spellings the request uses
    /// (a provider that renamed its headers); both at once is a key sent
    /// twice.
    Header(Vec<HeaderName>),
    /// `json:/pointer`: the string or number the pointer names in a JSON body.
    Json(JsonPointer),
    /// `body-sha256`: the body's SHA-256 in hex; identical bodies are one
    /// request.
    BodySha256,
}

impl KeyFrom {
    /// Parses `header:NAME`, `json:/pointer` or `body-sha256`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text == "body-sha256" {
            return Ok(KeyFrom::BodySha256);
        }
        if let Some(names) = text.strip_prefix("header:") {
            return names
                .split('|')
                .map(|name| {
                    HeaderName::from_bytes(name.trim().as_bytes())
                        .map_err(|_| format!("{name:?} is not a header name"))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(KeyFrom::Header);
        }
        if let Some(pointer) = text.strip_prefix("json:") {
            return JsonPointer::parse(pointer).map(KeyFrom::Json);
        }
        Err(format!(
            "{text:?} is not a key source: use \"header:NAME\", \"json:/pointer\" or \"body-sha256\""
        ))
    }

    /// The text `parse` reads back.
    pub fn render(&self) -> String {
        match self {
            KeyFrom::Header(names) => format!("header:{}", join(names, "|")),
            KeyFrom::Json(p) => format!("json:{p}"),
            KeyFrom::BodySha256 => "body-sha256".to_owned(),
        }
    }

    /// What a request must carry, for problem details.
    pub fn describe(&self) -> String {
        match self {
            KeyFrom::Header(names) => match names.split_first() {
                Some((first, [])) => format!("the {first} header"),
                Some((first, rest)) => format!("the {first} header (or {})", join(rest, ", ")),
                None => "a key header".to_owned(),
            },
            KeyFrom::Json(p) => format!("a JSON body with a string or number at {p}"),
            KeyFrom::BodySha256 => "a request body".to_owned(),
        }
    }

    /// The header a key travels in when idemgate sends it on (reconcile):
    /// the route's key header, or `Idempotency-Key` for body keys.
    pub fn header(&self) -> HeaderName {
        match self {
            KeyFrom::Header(names) => names
                .first()
                .cloned()
                .unwrap_or(HeaderName::from_static("idempotency-key")),
            _ => HeaderName::from_static("idempotency-key"),
        }
    }

    /// The header names a header source reads; `None` for body sources.
    pub fn headers(&self) -> Option<&[HeaderName]> {
        match self {
            KeyFrom::Header(names) => Some(names),
            _ => None,
        }
    }

    /// `header:NAME`.
    pub fn header_named(name: HeaderName) -> Self {
        KeyFrom::Header(vec![name])
    }

    /// The key a body carries, for the body sources: `Ok(None)` when it has
    /// none (not JSON, or nothing at the pointer), an error when what it
    /// has is not a usable key. Header sources have no body key.
    pub fn from_body(&self, body: &[u8], max_len: usize) -> Result<Option<String>, KeyError> {
        let key = match self {
            KeyFrom::Header(_) => return Ok(None),
            KeyFrom::BodySha256 => {
                let digest = Sha256::digest(body);
                digest.iter().map(|b| format!("{b:02x}")).collect()
            }
            KeyFrom::Json(p) => match p.find(body) {
                Ok(k) => k,
                Err(PointerError::NotJson | PointerError::Missing(_)) => return Ok(None),
                Err(PointerError::NotScalar(_)) => return Err(KeyError::NotScalar),
                Err(PointerError::Duplicate(_)) => return Err(KeyError::RepeatedMember),
            },
        };
        check_text(key, max_len).map(Some)
    }
}

fn join(names: &[HeaderName], sep: &str) -> String {
    names
        .iter()
        .map(HeaderName::as_str)
        .collect::<Vec<_>>()
        .join(sep)
}

/// A key taken from a body: non-empty printable ASCII (spaces allowed),
/// at most `max_len` characters, so it can travel in a header (reconcile).
fn check_text(key: String, max_len: usize) -> Result<String, KeyError> {
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.bytes().any(|b| !(0x20..=0x7e).contains(&b)) {
        return Err(KeyError::InvalidChar);
    }
    if key.len() > max_len {
        return Err(KeyError::TooLong {
            len: key.len(),
            max: max_len,
        });
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_renders_each_source() {
        for text in [
            "header:x-github-delivery",
            "header:x-shopify-event-id|shopify-event-id",
            "json:/data/id",
            "json:/a~1b",
            "body-sha256",
        ] {
            assert_eq!(KeyFrom::parse(text).unwrap().render(), text);
        }
        assert_eq!(
            KeyFrom::parse("header:X-GitHub-Delivery").unwrap(),
            KeyFrom::header_named(HeaderName::from_static("x-github-delivery"))
        );
        assert_eq!(
            KeyFrom::parse("header:a|b").unwrap().describe(),
            "the a header (or b)"
        );
        for bad in [
            "",
            "id",
            "json:id",
            "header:",
            "header:a b",
            "header:a|",
            "body",
            "json:/a~",
        ] {
            assert!(KeyFrom::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn body_keys() {
        let json = KeyFrom::parse("json:/id").unwrap();
        assert_eq!(
            json.from_body(br#"{"id":"evt_1"}"#, 255),
            Ok(Some("evt_1".into()))
        );
        assert_eq!(json.from_body(br#"{"id":42}"#, 255), Ok(Some("42".into())));
        assert_eq!(json.from_body(br#"{"other":1}"#, 255), Ok(None));
        assert_eq!(json.from_body(b"not json", 255), Ok(None));
        assert_eq!(
            json.from_body(br#"{"id":{}}"#, 255),
            Err(KeyError::NotScalar)
        );
        assert_eq!(json.from_body(br#"{"id":""}"#, 255), Err(KeyError::Empty));
        assert_eq!(
            json.from_body(br#"{"id":"\u00e9"}"#, 255),
            Err(KeyError::InvalidChar)
        );
        assert_eq!(
            json.from_body(br#"{"id":"a\nb"}"#, 255),
            Err(KeyError::InvalidChar)
        );
        assert_eq!(
            json.from_body(br#"{"id":"abcd"}"#, 3),
            Err(KeyError::TooLong { len: 4, max: 3 })
        );
        assert_eq!(
            json.from_body(br#"{"id":"a","id":"b"}"#, 255),
            Err(KeyError::RepeatedMember)
        );
        let sha = KeyFrom::BodySha256;
        assert_eq!(
            sha.from_body(b"abc", 255).unwrap().unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            sha.from_body(b"abc", 63),
            Err(KeyError::TooLong { len: 64, max: 63 })
        );
    }
}
