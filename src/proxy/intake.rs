//! A proxied request's intake: find its route's policy and upstream, check
//! its key, read its body, check a webhook's signature, find the key where
//! the route takes it from. It takes no state: the request comes out
//! [`Covered`] (for the settling loop in `flow`), to be passed through
//! untouched (an uncovered method, no key, an upgrade, a streaming gRPC
//! call), or refused.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderMap, HeaderName, Request};
use http_body_util::BodyExt;

use super::context::{Covered, FoundKey, Shared};
use super::grpc::{self, is_grpc};
use super::headers::IDEMPOTENCY_FENCE;
use super::records::unix_ms;
use super::routing::Routing;
use super::tunnel::is_upgrade;
use super::upstream::Upstream;
use crate::body::{read_limited, whole, Prefixed, Read};
use crate::config::Policy;
use crate::error::{error_chain, ProxyError};
use crate::idempotency::key::{parse_key, KeyError};
use crate::telemetry;
use crate::Body;

/// What the intake made of a request, under the route's policy.
pub(super) struct Taken {
    pub policy: Arc<Policy>,
    pub intake: Intake,
}

/// What becomes of a request.
pub(super) enum Intake {
    /// Its key is found, its body read: settle it against the store.
    /// (Boxed: it is the large one, and it moves twice more.)
    Covered(Box<Covered>),
    /// Not covered (method, no key on a route that does not require one,
    /// a streaming gRPC call): forwarded untouched, without state, within
    /// the deadline if it names one.
    PassThrough(Upstream, Parts, Body, Option<Duration>),
    /// It asks to switch protocols: forwarded untouched, without state,
    /// and joined to the upstream's connection on `101` (`tunnel`).
    Upgrade(Upstream, Parts, Body),
    /// Answered with a problem, without state.
    Refused(ProxyError),
}

pub(super) async fn take(shared: &Shared, routing: &Routing, req: Request<Body>) -> Taken {
    let (mut parts, body) = req.into_parts();
    // Only idemgate chooses the fence an upstream sees.
    parts.headers.remove(IDEMPOTENCY_FENCE);
    let (policy, upstream) = routing.for_path(parts.uri.path());
    let (policy, upstream) = (policy.clone(), upstream.clone());
    let intake = intake(shared, &policy, upstream, parts, body).await;
    Taken { policy, intake }
}

/// A covered request's body as read: whole (with its trailers), or a gRPC
/// call found to stream (what was read, and the rest).
enum BodyRead {
    Whole(Bytes, Option<HeaderMap>),
    Streaming(Bytes, Body),
}

async fn intake(
    shared: &Shared,
    policy: &Arc<Policy>,
    upstream: Upstream,
    parts: Parts,
    body: Body,
) -> Intake {
    if is_upgrade(&parts) {
        return Intake::Upgrade(upstream, parts, body);
    }
    let grpc = is_grpc(&parts.headers);
    let deadline = if grpc {
        match grpc::timeout(&parts.headers) {
            Ok(d) => d,
            Err(e) => return Intake::Refused(e),
        }
    } else {
        None
    };
    if !policy.covers(&parts.method) {
        return Intake::PassThrough(upstream, parts, body, deadline);
    }
    // Off webhook routes a key header is checked before the body is read:
    // a bad one is refused, a missing one passed through streamed.
    let mut found = None;
    if policy.webhook.is_none() {
        if let Some(names) = policy.key_from.headers() {
            match one_header(&parts.headers, names, policy) {
                Err(e) => return Intake::Refused(e),
                Ok(Some(key)) => found = Some(key),
                Ok(None) if policy.required => {
                    return Intake::Refused(ProxyError::MissingKey(policy.key_from.describe()))
                }
                Ok(None) => return Intake::PassThrough(upstream, parts, body, deadline),
            }
        }
    }
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let limit = shared.settings.body_read_timeout;
    let read = async {
        if !grpc {
            let (b, t) = read_body(declared, body, policy.max_request_body).await?;
            return Ok(BodyRead::Whole(b, t));
        }
        // A gRPC call is covered when its request is one message; a
        // client- or bidi-streaming call goes through as it streams.
        match grpc::read(body, policy.max_request_body).await? {
            grpc::Stream::Unary(b, t) => Ok(BodyRead::Whole(b, t)),
            grpc::Stream::TooLarge => Err(ProxyError::BodyTooLarge(policy.max_request_body)),
            grpc::Stream::Streaming(head, rest) => Ok(BodyRead::Streaming(head, rest)),
        }
    };
    let (body, trailers) = match tokio::time::timeout(limit, read).await {
        Ok(Ok(BodyRead::Whole(b, t))) => (b, t),
        Ok(Ok(BodyRead::Streaming(head, rest))) => {
            let body = Prefixed::new(head, rest).boxed();
            return Intake::PassThrough(upstream, parts, body, deadline);
        }
        Ok(Err(e)) => return Intake::Refused(e),
        Err(_) => return Intake::Refused(ProxyError::BodyTimeout(limit)),
    };
    // A webhook's signature is checked before anything else: before its
    // key is looked at, and before any state.
    if let Some(check) = &policy.webhook {
        let preset = check.verifier.preset.name();
        let now = i64::try_from(unix_ms() / 1000).unwrap_or(i64::MAX);
        let span = telemetry::in_sampled_request().then(|| {
            tracing::debug_span!(
                "signature",
                otel.name = "verify signature",
                idemgate.webhook.preset = preset,
                idemgate.signature = tracing::field::Empty,
            )
        });
        let checked = check.verifier.verify(&parts.headers, &body, now);
        if let Some(span) = span {
            let result = checked.as_ref().map_or_else(|e| e.label(), |_| "ok");
            span.record("idemgate.signature", result);
        }
        if let Err(e) = checked {
            shared.settings.metrics.webhook_signature(preset, e.label());
            tracing::info!(preset, path = parts.uri.path(), reason = %e, "webhook signature refused");
            return Intake::Refused(ProxyError::InvalidSignature(e));
        }
        shared.settings.metrics.webhook_signature(preset, "ok");
    }
    let found = found.map_or_else(|| find_key(policy, &parts.headers, &body), |f| Ok(Some(f)));
    let found = match found {
        Ok(Some(found)) => found,
        Ok(None) if policy.required => {
            return Intake::Refused(ProxyError::MissingKey(policy.key_from.describe()))
        }
        Ok(None) => return Intake::PassThrough(upstream, parts, whole(body, trailers), deadline),
        Err(e) => return Intake::Refused(e),
    };
    let covered = Covered::new(parts, body, policy.clone(), upstream, found);
    Intake::Covered(Box::new(
        covered.with_trailers(trailers).with_deadline(deadline),
    ))
}

/// The one value of the key header (of any of `names`, the spellings one
/// provider uses): `None` when absent; sent twice, or not a valid key, is
/// refused.
fn one_header(
    headers: &HeaderMap,
    names: &[HeaderName],
    policy: &Policy,
) -> Result<Option<FoundKey>, ProxyError> {
    let invalid = |reason| ProxyError::InvalidKey {
        place: policy.key_from.describe(),
        reason,
    };
    let mut values = names.iter().flat_map(|n| headers.get_all(n).iter());
    match (values.next(), values.next()) {
        (None, _) => Ok(None),
        (Some(_), Some(_)) => Err(invalid(KeyError::Repeated)),
        (Some(v), None) => match parse_key(v.as_bytes(), policy.max_key_length) {
            Ok(_) => Ok(Some(FoundKey::header(v.clone()))),
            Err(reason) => Err(invalid(reason)),
        },
    }
}

/// The request's key where its route takes it from, once the body is read;
/// `None` when the request carries none.
fn find_key(
    policy: &Arc<Policy>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Option<FoundKey>, ProxyError> {
    if let Some(names) = policy.key_from.headers() {
        return one_header(headers, names, policy);
    }
    let invalid = |reason| ProxyError::InvalidKey {
        place: policy.key_from.describe(),
        reason,
    };
    match policy.key_from.from_body(body, policy.max_key_length) {
        Ok(None) => Ok(None),
        // Body keys are printable ASCII by now: always a header value.
        Ok(Some(key)) => FoundKey::from_text(key)
            .map(Some)
            .map_err(|_| invalid(KeyError::InvalidChar)),
        Err(reason) => Err(invalid(reason)),
    }
}

/// Reads a covered request's body and trailers, refusing it past `limit`
/// without reading it whole: a declared Content-Length over the limit is
/// refused at once.
async fn read_body(
    declared: Option<u64>,
    body: Body,
    limit: u64,
) -> Result<(Bytes, Option<HeaderMap>), ProxyError> {
    if declared.is_some_and(|n| n > limit) {
        return Err(ProxyError::BodyTooLarge(limit));
    }
    match read_limited(body, limit).await {
        Ok(Read::Whole(b, t)) => Ok((b, t)),
        Ok(Read::Overflow) => Err(ProxyError::BodyTooLarge(limit)),
        Err(e) => Err(ProxyError::BadBody(error_chain(&*e))),
    }
}
