//! What a completed request leaves behind, and its compact versioned encoding.
//!
//! Layout of version 1 (all integers big-endian):
//!
//! ```text
//! u8  version = 1
//! u8  flags            bit 0: body omitted (response was over max_response_body)
//! [32] fingerprint
//! u64 created_unix_ms
//! u16 status
//! u16 header count, then per header: u16 name len, name, u32 value len, value
//! ..  body (the rest of the bytes, raw)
//! ```
//!
//! Version 2 adds the response's trailers (gRPC's `grpc-status`, a chunked
//! response's trailer fields) after the headers, in the same form: `u16
//! trailer count`, then per trailer as per header. A record without
//! trailers is still written as version 1, byte for byte what earlier
//! builds wrote and read; both versions are read.
//!
//! Version 3 is version 2 with the origin's trace after `created_unix_ms`:
//! `[16] trace id, [8] span id, u8 trace flags` (the request that ran
//! upstream, so replays can link to its trace). Written only when traces
//! are on and the request was sampled; otherwise nothing changes.
//!
//! Raw body bytes, no base64: a replay is one read and one copy-free slice.

use bytes::{Buf, BufMut, Bytes};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::key::Fingerprint;

/// The encoding version of a record without trailers.
pub const VERSION: u8 = 1;
/// The encoding version of a record with trailers.
pub const VERSION_TRAILERS: u8 = 2;
/// The encoding version of a record that names the trace that made it.
pub const VERSION_ORIGIN: u8 = 3;
const FLAG_BODY_OMITTED: u8 = 1;
/// Trace id, span id, flags.
const ORIGIN_LEN: usize = 16 + 8 + 1;

/// A stored response, replayed to duplicates.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The upstream body was larger than `max_response_body`: replays carry an
    /// empty body and `Idempotent-Body-Omitted: true`.
    pub body_omitted: bool,
    /// Trailer fields that followed the body (empty: none).
    pub trailers: HeaderMap,
}

/// A completed record: the request it answered and the answer.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletedRecord {
    /// The trace of the request that ran upstream, when traces were on
    /// and it was sampled: replays link to it.
    pub origin: Option<Origin>,
    pub fingerprint: Fingerprint,
    pub created_unix_ms: u64,
    pub response: StoredResponse,
}

/// Where a record came from: the W3C trace id, span id and trace flags of
/// the request that ran upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

/// Why stored bytes could not be decoded. Callers treat every variant as a
/// miss, never a panic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown record encoding version {0}")]
    UnknownVersion(u8),
    #[error("record is truncated")]
    Truncated,
    #[error("record holds an invalid status or header")]
    Invalid,
}

impl CompletedRecord {
    /// Encodes the record in the current version.
    pub fn encode(&self) -> Bytes {
        Bytes::from(self.encode_vec())
    }

    /// Encodes into a vector of exactly the encoded length.
    pub fn encode_vec(&self) -> Vec<u8> {
        let r = &self.response;
        let fields_len = |h: &HeaderMap| -> usize {
            h.iter().map(|(n, v)| 6 + n.as_str().len() + v.len()).sum()
        };
        // Version 3 holds the trailer count whether or not there are any.
        let trailers = !r.trailers.is_empty() || self.origin.is_some();
        let len = 1 + 1 + 32 + 8 + 2 + 2 + fields_len(&r.headers) + r.body.len();
        let len =
            len + if trailers {
                2 + fields_len(&r.trailers)
            } else {
                0
            } + if self.origin.is_some() { ORIGIN_LEN } else { 0 };
        let mut b = Vec::with_capacity(len);
        b.put_u8(match (&self.origin, trailers) {
            (Some(_), _) => VERSION_ORIGIN,
            (None, true) => VERSION_TRAILERS,
            (None, false) => VERSION,
        });
        b.put_u8(if r.body_omitted { FLAG_BODY_OMITTED } else { 0 });
        b.put_slice(&self.fingerprint.0);
        b.put_u64(self.created_unix_ms);
        if let Some(o) = &self.origin {
            b.put_slice(&o.trace_id);
            b.put_slice(&o.span_id);
            b.put_u8(o.flags);
        }
        b.put_u16(r.status.as_u16());
        put_fields(&mut b, &r.headers);
        if trailers {
            put_fields(&mut b, &r.trailers);
        }
        b.put_slice(&r.body);
        b
    }

    /// Decodes a record; the body is a zero-copy slice of `bytes`.
    pub fn decode(mut bytes: Bytes) -> Result<Self, DecodeError> {
        fn need(b: &Bytes, n: usize) -> Result<(), DecodeError> {
            if b.remaining() < n {
                Err(DecodeError::Truncated)
            } else {
                Ok(())
            }
        }
        need(&bytes, 1)?;
        let version = bytes.get_u8();
        if !(VERSION..=VERSION_ORIGIN).contains(&version) {
            return Err(DecodeError::UnknownVersion(version));
        }
        need(&bytes, 1 + 32 + 8 + 2 + 2)?;
        let flags = bytes.get_u8();
        let mut fp = [0u8; 32];
        bytes.copy_to_slice(&mut fp);
        let created_unix_ms = bytes.get_u64();
        let origin = if version == VERSION_ORIGIN {
            need(&bytes, ORIGIN_LEN + 2 + 2)?;
            let mut o = Origin {
                trace_id: [0; 16],
                span_id: [0; 8],
                flags: 0,
            };
            bytes.copy_to_slice(&mut o.trace_id);
            bytes.copy_to_slice(&mut o.span_id);
            o.flags = bytes.get_u8();
            Some(o)
        } else {
            None
        };
        let status = StatusCode::from_u16(bytes.get_u16()).map_err(|_| DecodeError::Invalid)?;
        let headers = get_fields(&mut bytes)?;
        let trailers = if version >= VERSION_TRAILERS {
            need(&bytes, 2)?;
            get_fields(&mut bytes)?
        } else {
            HeaderMap::new()
        };
        Ok(CompletedRecord {
            origin,
            fingerprint: Fingerprint(fp),
            created_unix_ms,
            response: StoredResponse {
                status,
                headers,
                body: bytes,
                body_omitted: flags & FLAG_BODY_OMITTED != 0,
                trailers,
            },
        })
    }
}

/// A field section: `u16` count, then per field `u16` name length, name,
/// `u32` value length, value. Counts and lengths are bounded well below
/// these limits by hyper's own header limits; saturate rather than wrap.
fn put_fields(b: &mut Vec<u8>, fields: &HeaderMap) {
    let count = fields.len().min(u16::MAX as usize);
    b.put_u16(count as u16);
    for (n, v) in fields.iter().take(count) {
        b.put_u16(n.as_str().len() as u16);
        b.put_slice(n.as_str().as_bytes());
        b.put_u32(v.len() as u32);
        b.put_slice(v.as_bytes());
    }
}

/// Reads what [`put_fields`] wrote (its count not yet read).
fn get_fields(bytes: &mut Bytes) -> Result<HeaderMap, DecodeError> {
    let need = |b: &Bytes, n: usize| {
        if b.remaining() < n {
            Err(DecodeError::Truncated)
        } else {
            Ok(())
        }
    };
    let count = bytes.get_u16() as usize;
    // The count is data, not a promise: a field takes at least 6 bytes, so
    // never reserve more than the rest could hold (and HeaderMap panics
    // past its own maximum unless asked fallibly).
    let capacity = count.min(bytes.remaining() / 6);
    let mut fields = HeaderMap::try_with_capacity(capacity).map_err(|_| DecodeError::Invalid)?;
    for _ in 0..count {
        need(bytes, 2)?;
        let n = bytes.get_u16() as usize;
        need(bytes, n)?;
        let name = HeaderName::from_bytes(&bytes.split_to(n)).map_err(|_| DecodeError::Invalid)?;
        need(bytes, 4)?;
        let n = bytes.get_u32() as usize;
        need(bytes, n)?;
        let value =
            HeaderValue::from_maybe_shared(bytes.split_to(n)).map_err(|_| DecodeError::Invalid)?;
        fields
            .try_append(name, value)
            .map_err(|_| DecodeError::Invalid)?;
    }
    Ok(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(body: &'static [u8], omitted: bool) -> CompletedRecord {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("x-multi", HeaderValue::from_static("1"));
        headers.append("x-multi", HeaderValue::from_static("2"));
        CompletedRecord {
            origin: None,
            fingerprint: Fingerprint([7; 32]),
            created_unix_ms: 1_700_000_000_123,
            response: StoredResponse {
                status: StatusCode::CREATED,
                headers,
                body: Bytes::from_static(body),
                body_omitted: omitted,
                trailers: HeaderMap::new(),
            },
        }
    }

    #[test]
    fn the_origin_round_trips_in_version_3_and_is_absent_otherwise() {
        let mut r = sample(b"{\"id\":1}", false);
        assert_eq!(r.encode()[0], VERSION);
        r.origin = Some(Origin {
            trace_id: [0xab; 16],
            span_id: [0xcd; 8],
            flags: 1,
        });
        let bytes = r.encode();
        assert_eq!(bytes[0], VERSION_ORIGIN);
        assert_eq!(bytes.len(), r.encode_vec().capacity());
        assert_eq!(CompletedRecord::decode(bytes.clone()).unwrap(), r);
        r.response
            .trailers
            .insert("grpc-status", HeaderValue::from_static("0"));
        assert_eq!(CompletedRecord::decode(r.encode()).unwrap(), r);
        // Cut anywhere, it is an error, never a panic.
        for n in 0..bytes.len() - 8 {
            assert!(CompletedRecord::decode(bytes.slice(..n)).is_err(), "{n}");
        }
    }

    #[test]
    fn trailers_round_trip_in_version_2_and_version_1_stays_as_it_was() {
        let plain = sample(b"{}", false);
        assert_eq!(plain.encode()[0], VERSION, "no trailers: version 1");
        let mut rec = sample(b"\0\0\0\0\x02hi", false);
        rec.response
            .trailers
            .insert("grpc-status", HeaderValue::from_static("0"));
        rec.response
            .trailers
            .insert("x-meta", HeaderValue::from_static("a"));
        let enc = rec.encode();
        assert_eq!(enc[0], VERSION_TRAILERS);
        assert_eq!(CompletedRecord::decode(enc.clone()).unwrap(), rec);
        assert!(enc.ends_with(b"\0\0\0\0\x02hi"), "the body is still last");
    }

    #[test]
    fn round_trips() {
        for rec in [
            sample(b"{\"id\":1}", false),
            sample(b"", true),
            sample(&[0, 255, 10], false),
        ] {
            assert_eq!(CompletedRecord::decode(rec.encode()).unwrap(), rec);
        }
    }

    #[test]
    fn body_is_raw_bytes_at_the_end() {
        let enc = sample(b"BODY", false).encode();
        assert!(enc.ends_with(b"BODY"));
        assert_eq!(enc[0], VERSION);
    }

    #[test]
    fn unknown_version_and_truncation_are_errors_not_panics() {
        let mut enc = sample(b"x", false).encode().to_vec();
        for cut in 0..enc.len() - 1 {
            // Every strict prefix that ends inside the header section fails;
            // prefixes inside the body just yield a shorter body.
            let _ = CompletedRecord::decode(Bytes::copy_from_slice(&enc[..cut]));
        }
        assert_eq!(
            CompletedRecord::decode(Bytes::new()),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            CompletedRecord::decode(Bytes::copy_from_slice(&enc[..20])),
            Err(DecodeError::Truncated)
        );
        enc[0] = 9;
        assert_eq!(
            CompletedRecord::decode(Bytes::from(enc)),
            Err(DecodeError::UnknownVersion(9))
        );
    }

    /// Found by fuzzing: a record claiming more headers than a HeaderMap can
    /// hold made the decoder panic.
    #[test]
    fn a_huge_header_count_is_an_error_not_a_panic() {
        let crash = include_bytes!("../../fuzz/corpus/record/regression-huge-header-count");
        assert!(CompletedRecord::decode(Bytes::from_static(crash)).is_err());
        let mut enc = sample(b"", false).encode().to_vec();
        enc[44..46].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(CompletedRecord::decode(Bytes::from(enc)).is_err());
    }

    #[test]
    fn invalid_header_bytes_are_refused() {
        let mut enc = sample(b"", false).encode().to_vec();
        // First header name starts after version, flags, fp, created, status,
        // count and its own u16 length.
        let name_at = 1 + 1 + 32 + 8 + 2 + 2 + 2;
        enc[name_at] = b' ';
        assert_eq!(
            CompletedRecord::decode(Bytes::from(enc)),
            Err(DecodeError::Invalid)
        );
    }
}
