//! A proxied request's intake: find its route's policy and upstream, check
//! its key, read its body, check a webhook's signature, find the key where
//! the route takes it from. It takes no state: the request comes out
//! [`Covered`] (for the settling loop in `flow`), to be passed through
//! untouched, or refused.

use std::sync::Arc;

use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderMap, HeaderName, Request};

use super::context::{Covered, FoundKey, Shared};
use super::headers::IDEMPOTENCY_FENCE;
use super::records::unix_ms;
use super::routing::Routing;
use super::upstream::Upstream;
use crate::body::{read_limited, Read};
use crate::config::Policy;
use crate::error::{error_chain, full, ProxyError};
use crate::idempotency::key::{parse_key, KeyError};
use crate::idempotency::key_from::KeyFrom;
use crate::Body;

/// What the intake made of a request.
pub(super) enum Intake {
    /// Its key is found, its body read: settle it against the store.
    Covered(Covered),
    /// Not covered (method, or no key on a route that does not require
    /// one): forwarded untouched, without state.
    PassThrough(Upstream, Parts, Body),
    /// Answered with a problem, without state.
    Refused(ProxyError),
}

pub(super) async fn take(shared: &Shared, routing: &Routing, req: Request<Body>) -> Intake {
    let (mut parts, body) = req.into_parts();
    // Only idemgate chooses the fence an upstream sees.
    parts.headers.remove(IDEMPOTENCY_FENCE);
    let (policy, upstream) = routing.for_path(parts.uri.path());
    let (policy, upstream) = (policy.clone(), upstream.clone());

    if !policy.covers(&parts.method) {
        return Intake::PassThrough(upstream, parts, body);
    }
    // Off webhook routes a key header is checked before the body is read:
    // a bad one is refused, a missing one passed through streamed.
    let mut found = None;
    if policy.webhook.is_none() {
        if let KeyFrom::Header(name) = &policy.key_from {
            match one_header(&parts.headers, name, &policy) {
                Err(e) => return Intake::Refused(e),
                Ok(Some(key)) => found = Some(key),
                Ok(None) if policy.required => {
                    return Intake::Refused(ProxyError::MissingKey(policy.key_from.describe()))
                }
                Ok(None) => return Intake::PassThrough(upstream, parts, body),
            }
        }
    }
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let limit = shared.settings.body_read_timeout;
    let body = match tokio::time::timeout(limit, read_body(declared, body, policy.max_request_body))
        .await
    {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => return Intake::Refused(e),
        Err(_) => return Intake::Refused(ProxyError::BodyTimeout(limit)),
    };
    // A webhook's signature is checked before anything else: before its
    // key is looked at, and before any state.
    if let Some(check) = &policy.webhook {
        let preset = check.verifier.preset.name();
        let now = i64::try_from(unix_ms() / 1000).unwrap_or(i64::MAX);
        if let Err(e) = check.verifier.verify(&parts.headers, &body, now) {
            shared.settings.metrics.webhook_signature(preset, e.label());
            tracing::info!(preset, path = parts.uri.path(), reason = %e, "webhook signature refused");
            return Intake::Refused(ProxyError::InvalidSignature(e));
        }
        shared.settings.metrics.webhook_signature(preset, "ok");
    }
    let found =
        match found.map_or_else(|| find_key(&policy, &parts.headers, &body), |f| Ok(Some(f))) {
            Ok(Some(found)) => found,
            Ok(None) if policy.required => {
                return Intake::Refused(ProxyError::MissingKey(policy.key_from.describe()))
            }
            Ok(None) => return Intake::PassThrough(upstream, parts, full(body)),
            Err(e) => return Intake::Refused(e),
        };
    Intake::Covered(Covered::new(parts, body, policy, upstream, found))
}

/// The one value of the key header `name`: `None` when absent; sent twice,
/// or not a valid key, is refused.
fn one_header(
    headers: &HeaderMap,
    name: &HeaderName,
    policy: &Policy,
) -> Result<Option<FoundKey>, ProxyError> {
    let invalid = |reason| ProxyError::InvalidKey {
        place: policy.key_from.describe(),
        reason,
    };
    let mut values = headers.get_all(name).iter();
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
    if let KeyFrom::Header(name) = &policy.key_from {
        return one_header(headers, name, policy);
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

/// Reads a covered request's body, refusing it past `limit` without reading
/// it whole: a declared Content-Length over the limit is refused at once.
async fn read_body(declared: Option<u64>, body: Body, limit: u64) -> Result<Bytes, ProxyError> {
    if declared.is_some_and(|n| n > limit) {
        return Err(ProxyError::BodyTooLarge(limit));
    }
    match read_limited(body, limit).await {
        Ok(Read::Whole(b)) => Ok(b),
        Ok(Read::Overflow) => Err(ProxyError::BodyTooLarge(limit)),
        Err(e) => Err(ProxyError::BadBody(error_chain(&*e))),
    }
}
