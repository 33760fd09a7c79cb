//! What the proxy needs to know of gRPC: whether a request is a gRPC call
//! (its refusals then take gRPC's shape), its `grpc-timeout`, and whether
//! its request stream is one message (a unary or server-streaming call,
//! which idemgate covers) or more (a client- or bidi-streaming call, which
//! it passes through without state).

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName};
use http_body::Body as _;
use http_body_util::BodyExt;

use crate::body::concat;
use crate::error::{error_chain, ProxyError};
use crate::Body;

/// How long after a call's first message its request stream must end for
/// the call to count as unary: a unary client ends it with that message,
/// or with an empty frame right after it; a streaming client keeps it open.
pub const UNARY_GRACE: Duration = Duration::from_millis(50);

/// A gRPC call: `content-type: application/grpc`, `+proto`, `+json` (not
/// gRPC-Web, whose clients read trailers from the body).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("application/grpc"))
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['+', ';']))
}

const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// The call's `grpc-timeout`: 1 to 8 digits and a unit (`H`, `M`, `S`,
/// `m`, `u`, `n`); `None` without one.
pub fn timeout(headers: &HeaderMap) -> Result<Option<Duration>, ProxyError> {
    let Some(v) = headers.get(GRPC_TIMEOUT) else {
        return Ok(None);
    };
    let bad = || ProxyError::BadGrpcTimeout(String::from_utf8_lossy(v.as_bytes()).into_owned());
    let text = v.to_str().map_err(|_| bad())?;
    if text.len() < 2 || text.len() > 9 {
        return Err(bad());
    }
    let (digits, unit) = text.split_at(text.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    Ok(Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return Err(bad()),
    }))
}

/// The `grpc-status` a gRPC response carries in `fields` (its trailers, or
/// the head of a trailers-only response).
pub fn status(fields: &HeaderMap) -> Option<u32> {
    fields.get(GRPC_STATUS)?.to_str().ok()?.parse().ok()
}

/// gRPC statuses that mean "not now, try again" (`UNAVAILABLE`,
/// `RESOURCE_EXHAUSTED`, `ABORTED`): not stored, like HTTP's 503 and 429.
pub const RETRYABLE: [u32; 3] = [14, 8, 10];
/// `DEADLINE_EXCEEDED` from the upstream: it may have run, like HTTP's 504.
pub const DEADLINE_EXCEEDED: u32 = 4;

/// A gRPC request stream, read as far as telling what kind of call it is.
pub enum Stream {
    /// One message and the end (and its trailers, if any): covered.
    Unary(Bytes, Option<HeaderMap>),
    /// More than one message, or no end within [`UNARY_GRACE`] of the
    /// first: what was read, and the rest to stream on.
    Streaming(Bytes, Body),
    /// Over `limit` before it could tell.
    TooLarge,
}

/// Reads a gRPC request stream until its first message is complete, then
/// waits up to [`UNARY_GRACE`] for its end.
pub async fn read(mut body: Body, limit: u64) -> Result<Stream, ProxyError> {
    let mut chunks = Vec::new();
    let mut total = 0u64;
    let broken = |e: crate::BoxError| ProxyError::BadBody(error_chain(&*e));
    // The first message's length is in its 5-byte prefix: a flag byte and
    // a big-endian u32.
    let first_len = |chunks: &[Bytes], total: u64| -> Option<u64> {
        if total < 5 {
            return None;
        }
        let mut prefix = [0u8; 5];
        let mut at = 0;
        for c in chunks {
            for &b in c.iter().take(5 - at) {
                prefix[at] = b;
                at += 1;
            }
            if at == 5 {
                break;
            }
        }
        Some(
            5 + u64::from(u32::from_be_bytes([
                prefix[1], prefix[2], prefix[3], prefix[4],
            ])),
        )
    };
    loop {
        let first = first_len(&chunks, total);
        if first.is_some_and(|n| total > n) {
            // A second message in the same read: a streaming client.
            return Ok(Stream::Streaming(concat(chunks, total), body));
        }
        let complete = first.is_some_and(|n| total == n);
        if complete && body.is_end_stream() {
            return Ok(Stream::Unary(concat(chunks, total), None));
        }
        let next = if complete {
            match tokio::time::timeout(UNARY_GRACE, body.frame()).await {
                Ok(next) => next,
                Err(_) => return Ok(Stream::Streaming(concat(chunks, total), body)),
            }
        } else {
            body.frame().await
        };
        let Some(frame) = next else {
            return Ok(Stream::Unary(concat(chunks, total), None));
        };
        match frame.map_err(broken)?.into_data() {
            Ok(data) if data.is_empty() => {}
            Ok(data) => {
                if complete {
                    total += data.len() as u64;
                    chunks.push(data);
                    return Ok(Stream::Streaming(concat(chunks, total), body));
                }
                total += data.len() as u64;
                chunks.push(data);
                if total > limit {
                    return Ok(Stream::TooLarge);
                }
            }
            Err(frame) => {
                let trailers = frame.into_trailers().ok();
                // Trailers end the stream.
                return Ok(Stream::Unary(concat(chunks, total), trailers));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn grpc_content_types() {
        let mut h = HeaderMap::new();
        for (ct, yes) in [
            ("application/grpc", true),
            ("application/grpc+proto", true),
            ("application/grpc+json", true),
            ("application/grpc; charset=utf-8", true),
            ("application/grpc-web", false),
            ("application/json", false),
        ] {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            assert_eq!(is_grpc(&h), yes, "{ct}");
        }
    }

    #[test]
    fn grpc_timeouts() {
        let mut h = HeaderMap::new();
        assert_eq!(timeout(&h).unwrap(), None);
        for (v, want) in [
            ("1S", Duration::from_secs(1)),
            ("250m", Duration::from_millis(250)),
            ("2M", Duration::from_secs(120)),
            ("1H", Duration::from_secs(3600)),
            ("99999999u", Duration::from_micros(99_999_999)),
            ("10n", Duration::from_nanos(10)),
        ] {
            h.insert("grpc-timeout", HeaderValue::from_static(v));
            assert_eq!(timeout(&h).unwrap(), Some(want), "{v}");
        }
        for v in ["", "S", "1", "1s", "123456789S", "-1S", "1.5S", "1 S"] {
            h.insert("grpc-timeout", HeaderValue::from_static(v));
            assert!(timeout(&h).is_err(), "{v:?}");
        }
    }
}
