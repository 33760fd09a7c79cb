//! What a record is made from and what it gives back: the response headers
//! worth storing, the time it is stamped with, and the response a duplicate
//! receives (from a stored record, or joining a live one).

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response};

use super::grpc::{DEADLINE_EXCEEDED, RETRYABLE};
use super::headers::{IDEMPOTENT_BODY_OMITTED, IDEMPOTENT_REPLAYED};
use super::live::Head;
use crate::body::whole;
use crate::config::Policy;
use crate::idempotency::record::StoredResponse;
use crate::idempotency::state::UnknownCause;
use crate::Body;

/// Response headers worth replaying: no framing (hyper sets Content-Length
/// from the stored body) and none of `replay_strip_headers`.
pub(super) fn stored_headers(policy: &Policy, headers: &HeaderMap) -> HeaderMap {
    let mut h = headers.clone();
    h.remove(header::CONTENT_LENGTH);
    for name in &policy.replay_strip_headers {
        h.remove(name);
    }
    h
}

/// What becomes of a response's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Disposition {
    /// Stored and replayed.
    Keep,
    /// Returned, not stored: the key is released and a retry runs.
    Release,
    /// Returned, not stored: it may have run, the key is held as the
    /// route's `on_unknown_outcome` says.
    Unknown(UnknownCause),
}

/// What the route does with a response of HTTP `status` whose gRPC status
/// (if any, from its head or its trailers) is `grpc`: `unknown_statuses`
/// first, then `uncacheable_statuses`; a gRPC `DEADLINE_EXCEEDED` counts as
/// a 504 and the retryable gRPC statuses as uncacheable.
pub(super) fn disposition(policy: &Policy, status: u16, grpc: Option<u32>) -> Disposition {
    if policy.unknown_statuses.contains(&status) {
        return Disposition::Unknown(UnknownCause::Status(status));
    }
    if policy.uncacheable_statuses.contains(&status) {
        return Disposition::Release;
    }
    match grpc {
        Some(DEADLINE_EXCEEDED) => Disposition::Unknown(UnknownCause::Status(504)),
        Some(code) if RETRYABLE.contains(&code) => Disposition::Release,
        _ => Disposition::Keep,
    }
}

/// Now, as a record's creation time.
pub(super) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A live response, as a duplicate that joined it receives it.
pub(super) fn joined_response(head: &Head, body: Body) -> Response<Body> {
    let mut resp = Response::new(body);
    *resp.status_mut() = head.status;
    *resp.headers_mut() = head.headers.clone();
    resp.headers_mut()
        .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    resp
}

/// A stored response, as a duplicate receives it: its trailers after the
/// body, declared in `Trailer` (which HTTP/1.1 needs to send them) when the
/// upstream did not declare them itself.
pub(super) fn replay(stored: &StoredResponse) -> Response<Body> {
    let body = if stored.body_omitted {
        Bytes::new()
    } else {
        stored.body.clone()
    };
    let trailers = (!stored.trailers.is_empty()).then(|| stored.trailers.clone());
    let mut resp = Response::new(whole(body, trailers));
    *resp.status_mut() = stored.status;
    *resp.headers_mut() = stored.headers.clone();
    if !stored.trailers.is_empty() && !resp.headers().contains_key(header::TRAILER) {
        let names: Vec<&str> = stored.trailers.keys().map(|n| n.as_str()).collect();
        if let Ok(v) = HeaderValue::from_str(&names.join(", ")) {
            resp.headers_mut().insert(header::TRAILER, v);
        }
    }
    resp.headers_mut()
        .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    if stored.body_omitted {
        resp.headers_mut()
            .insert(IDEMPOTENT_BODY_OMITTED, HeaderValue::from_static("true"));
    }
    resp
}
