//! The life of one proxied request: find the route's policy; pass uncovered
//! methods and keyless requests through streamed; refuse bad keys and
//! oversized bodies before any state is taken; then loop on the store's
//! atomic begin until the request can be run (it took the lease: see
//! [`super::job`]), replayed (completed), refused (different fingerprint)
//! or timed out waiting for an in-flight original.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response};
use tokio::time::Instant;

use super::job::{stored_headers, unix_ms, Job};
use super::layer::{Shared, UpstreamService};
use super::live::Head;
use super::reconcile::Answer;
use super::routing::Routing;
use super::timed::call_upstream;
use super::{
    strip_hop_by_hop, IDEMPOTENCY_FENCE, IDEMPOTENT_BODY_OMITTED, IDEMPOTENT_RECONCILED,
    IDEMPOTENT_REPLAYED,
};
use crate::body::{read_limited, Read};
use crate::config::{OnStoreError, Policy};
use crate::error::{full, ProxyError};
use crate::idempotency::key::{parse_key, Fingerprint, KeyError, RecordKey};
use crate::idempotency::key_from::KeyFrom;
use crate::idempotency::record::{CompletedRecord, StoredResponse};
use crate::idempotency::state::{decide, Begin, Decision, Resolution, Unknown};
use crate::metrics::{Outcome, StoreOp};
use crate::store::StoreError;
use crate::Body;

/// How a request ended, and with what.
pub(super) struct Handled {
    pub outcome: Outcome,
    pub response: Response<Body>,
    /// The record key, once derived (logged as its hash, never the key).
    pub record: Option<RecordKey>,
}

impl Handled {
    pub fn new(outcome: Outcome, response: Response<Body>) -> Self {
        Handled {
            outcome,
            response,
            record: None,
        }
    }

    fn on(mut self, record: RecordKey) -> Self {
        self.record = Some(record);
        self
    }
}

/// A request idemgate answers itself, with a problem.
pub(super) fn refuse(e: ProxyError) -> Handled {
    if matches!(e, ProxyError::Upstream(_) | ProxyError::Store(_)) {
        tracing::warn!(error = %e, "request failed");
    }
    Handled::new(e.outcome(), e.to_response())
}

pub(super) async fn handle(shared: Arc<Shared>, routing: &Routing, req: Request<Body>) -> Handled {
    let (mut parts, body) = req.into_parts();
    // Only idemgate chooses the fence an upstream sees.
    parts.headers.remove(IDEMPOTENCY_FENCE);
    let (policy, upstream) = routing.for_path(parts.uri.path());
    let (policy, inner) = (policy.clone(), upstream.clone());

    if !policy.covers(&parts.method) {
        return pass_through(&shared, inner, parts, body).await;
    }
    // Off webhook routes a key header is checked before the body is read:
    // a bad one is refused, a missing one passed through streamed.
    let mut found = None;
    if policy.webhook.is_none() {
        if let KeyFrom::Header(name) = &policy.key_from {
            match one_header(&parts.headers, name, &policy) {
                Err(e) => return refuse(e),
                Ok(Some(raw)) => found = Some(FoundKey { raw, text: None }),
                Ok(None) if policy.required => {
                    return refuse(ProxyError::MissingKey(policy.key_from.describe()))
                }
                Ok(None) => return pass_through(&shared, inner, parts, body).await,
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
        Ok(Err(e)) => return refuse(e),
        Err(_) => return refuse(ProxyError::BodyTimeout(limit)),
    };
    // A webhook's signature is checked before anything else: before its
    // key is looked at, and before any state.
    if let Some(check) = &policy.webhook {
        let preset = check.verifier.preset.name();
        let now = i64::try_from(unix_ms() / 1000).unwrap_or(i64::MAX);
        if let Err(e) = check.verifier.verify(&parts.headers, &body, now) {
            shared.settings.metrics.webhook_signature(preset, e.label());
            tracing::info!(preset, path = parts.uri.path(), reason = %e, "webhook signature refused");
            return refuse(ProxyError::InvalidSignature(e));
        }
        shared.settings.metrics.webhook_signature(preset, "ok");
    }
    let found =
        match found.map_or_else(|| find_key(&policy, &parts.headers, &body), |f| Ok(Some(f))) {
            Ok(Some(found)) => found,
            Ok(None) if policy.required => {
                return refuse(ProxyError::MissingKey(policy.key_from.describe()))
            }
            Ok(None) => return pass_through(&shared, inner, parts, full(body)).await,
            Err(e) => return refuse(e),
        };
    let record_key = RecordKey::derive(
        &parts.headers,
        &policy.scope_headers,
        &parts.method,
        parts.uri.path(),
        &found.text(policy.max_key_length),
    );
    let fp = {
        let pq = parts
            .uri
            .path_and_query()
            .map_or(parts.uri.path(), |pq| pq.as_str());
        let fingerprinted: &[u8] = if policy.fingerprint_body { &body } else { &[] };
        Fingerprint::compute(
            &parts.method,
            pq,
            &parts.headers,
            &policy.fingerprint_headers,
            fingerprinted,
        )
    };

    let store = &shared.store;
    let deadline = Instant::now() + policy.wait_timeout;
    loop {
        let begun = store
            .observe(StoreOp::Begin, |b| {
                b.begin(&record_key, &fp, policy.begin_options())
            })
            .await;
        let begun = match begun {
            Ok(b) => b,
            Err(e) => {
                return store_failed(&shared, inner, parts, body, e)
                    .await
                    .on(record_key)
            }
        };
        let lapsed_now = matches!(
            begun,
            Begin::Unknown {
                lapsed_now: true,
                ..
            }
        );
        match decide(begun, &fp) {
            Decision::Forward(lease) => {
                if let Err(refused) = admit(&shared, &policy, &parts.headers).await {
                    // Nothing was sent: give the key back at once.
                    let _ = store
                        .observe(StoreOp::Release, |b| b.release(&record_key, &lease))
                        .await;
                    let handled = match refused {
                        Refused::OverRate(wait) => refuse(ProxyError::TooManyKeys(wait)),
                        Refused::Store(e) => store_failed(&shared, inner, parts, body, e).await,
                    };
                    return handled.on(record_key);
                }
                let job = Job::new(&shared, record_key, lease, fp, policy, inner.timeout());
                return job
                    .spawn(&shared.settings.tasks, inner, parts, body)
                    .await
                    .on(record_key);
            }
            Decision::Replay(record) => {
                return Handled::new(Outcome::Replayed, replay(&record.response)).on(record_key)
            }
            Decision::Mismatch => return refuse(ProxyError::KeyReused).on(record_key),
            Decision::Unknown { unknown, reconcile } => {
                if lapsed_now {
                    shared.settings.metrics.unknown_outcome("lapsed", "held");
                    tracing::warn!(record = %record_key.to_hex(), fence = unknown.fence, "outcome unknown: the lease holder stopped renewing after it forwarded; holding the key");
                }
                if !reconcile {
                    return refuse(ProxyError::OutcomeUnknown(unknown)).on(record_key);
                }
                // Owned: borrowed key text must not live across an await.
                let key = found.text(policy.max_key_length).into_owned();
                let asked = ask(
                    &shared,
                    &policy,
                    &record_key,
                    (&found.raw, &key),
                    &parts.headers,
                    &fp,
                    unknown,
                )
                .await;
                match asked {
                    Asked::Replay(resp) => {
                        return Handled::new(Outcome::Replayed, resp).on(record_key);
                    }
                    // It did not run (or was settled meanwhile): begin again.
                    Asked::Again => continue,
                    Asked::Unknown => {
                        return refuse(ProxyError::OutcomeUnknown(unknown)).on(record_key);
                    }
                }
            }
            Decision::Wait { fence } => {
                // The original streams from this process: join it, from
                // its first byte, as soon as its head is in.
                if let Some(live) = shared.lives.get(&record_key, fence) {
                    let joined = {
                        let _waiting = Waiting::new(&shared.settings.metrics.waiting_duplicates);
                        tokio::time::timeout_at(deadline, live.join()).await
                    };
                    if let Ok(Some((head, body))) = joined {
                        return Handled::new(Outcome::Replayed, joined_response(&head, body))
                            .on(record_key);
                    }
                }
                if Instant::now() >= deadline {
                    return refuse(ProxyError::InProgress).on(record_key);
                }
                let waited = {
                    // A guard, not inc/dec: a client that disconnects drops
                    // this future mid-wait, and the gauge must still go down.
                    let _waiting = Waiting::new(&shared.settings.metrics.waiting_duplicates);
                    store.wait(&record_key, fence, deadline).await
                };
                if let Err(e) = waited {
                    return store_failed(&shared, inner, parts, body, e)
                        .await
                        .on(record_key);
                }
            }
        }
    }
}

/// Why a new key was not admitted.
enum Refused {
    /// The caller is over its `new_keys_per_scope`: wait this long.
    OverRate(Duration),
    Store(StoreError),
}

/// Fair share: takes a token from the caller's bucket when the route sets
/// `new_keys_per_scope` (only requests that create a key get here).
async fn admit(shared: &Shared, policy: &Policy, headers: &HeaderMap) -> Result<(), Refused> {
    let Some(rate) = policy.new_keys else {
        return Ok(());
    };
    let scope = RecordKey::derive_scope(headers, &policy.scope_headers);
    match shared
        .store
        .observe(StoreOp::Admit, |b| b.admit(&scope, rate))
        .await
    {
        Ok(Ok(())) => Ok(()),
        Ok(Err(wait)) => Err(Refused::OverRate(wait)),
        Err(e) => Err(Refused::Store(e)),
    }
}

/// What reconciling an unknown record came to.
enum Asked {
    /// The upstream knew the answer: it is stored and replayed.
    Replay(Response<Body>),
    /// It did not run (the key is free now) or was settled meanwhile.
    Again,
    /// Still unknown.
    Unknown,
}

/// Asks the upstream whether the attempt with `unknown.fence` ran, and
/// settles the record by the answer.
async fn ask(
    shared: &Shared,
    policy: &Policy,
    record_key: &RecordKey,
    (raw_key, key): (&HeaderValue, &str),
    headers: &HeaderMap,
    fp: &Fingerprint,
    unknown: Unknown,
) -> Asked {
    let metrics = &shared.settings.metrics;
    let cause = unknown.cause.label();
    let answer = shared
        .reconciler
        .ask(policy, key, raw_key, unknown.fence, headers)
        .await;
    let (resolution, found) = match answer {
        Answer::Found(mut response) => {
            strip_hop_by_hop(&mut response.headers);
            response.headers = stored_headers(policy, &response.headers);
            let record = Arc::new(CompletedRecord {
                fingerprint: *fp,
                created_unix_ms: unix_ms(),
                response,
            });
            (
                Resolution::Completed(record.clone(), policy.record_ttl),
                Some(record),
            )
        }
        Answer::Missing => (Resolution::Release, None),
        Answer::Failed(why) => {
            metrics.unknown_outcome(cause, "reconcile_failed");
            tracing::warn!(fence = unknown.fence, error = %why, "reconciling an unknown outcome failed; still unknown");
            return Asked::Unknown;
        }
    };
    let settled = shared
        .store
        .observe(StoreOp::Resolve, |b| {
            b.resolve(record_key, unknown.fence, resolution)
        })
        .await;
    match (settled, found) {
        (Ok(true), Some(record)) => {
            metrics.unknown_outcome(cause, "reconciled_found");
            let mut resp = replay(&record.response);
            resp.headers_mut()
                .insert(IDEMPOTENT_RECONCILED, HeaderValue::from_static("true"));
            Asked::Replay(resp)
        }
        (Ok(true), None) => {
            metrics.unknown_outcome(cause, "reconciled_missing");
            Asked::Again
        }
        (Ok(false), _) => Asked::Again,
        (Err(e), _) => {
            tracing::warn!(error = %e, "settling a reconciled outcome failed; still unknown");
            Asked::Unknown
        }
    }
}

/// The one value of the key header `name`: `None` when absent; sent twice,
/// or not a valid key, is refused.
fn one_header(
    headers: &HeaderMap,
    name: &HeaderName,
    policy: &Policy,
) -> Result<Option<HeaderValue>, ProxyError> {
    let invalid = |reason| ProxyError::InvalidKey {
        place: policy.key_from.describe(),
        reason,
    };
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (None, _) => Ok(None),
        (Some(_), Some(_)) => Err(invalid(KeyError::Repeated)),
        (Some(v), None) => match parse_key(v.as_bytes(), policy.max_key_length) {
            Ok(_) => Ok(Some(v.clone())),
            Err(reason) => Err(invalid(reason)),
        },
    }
}

/// A request's key, found and checked: the header value it came in (or
/// that carries a body key on, to reconcile), and a body key's text.
struct FoundKey {
    raw: HeaderValue,
    /// `None`: a header key, whose text is parsed from `raw` when needed
    /// (no allocation on the hot path).
    text: Option<String>,
}

impl FoundKey {
    fn text(&self, max_len: usize) -> Cow<'_, str> {
        match &self.text {
            Some(t) => Cow::Borrowed(t),
            // `one_header` checked it: parsing cannot fail here.
            None => parse_key(self.raw.as_bytes(), max_len).unwrap_or_default(),
        }
    }
}

/// The request's key where its route takes it from, once the body is read;
/// `None` when the request carries none.
fn find_key(
    policy: &Policy,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Option<FoundKey>, ProxyError> {
    if let KeyFrom::Header(name) = &policy.key_from {
        let raw = one_header(headers, name, policy)?;
        return Ok(raw.map(|raw| FoundKey { raw, text: None }));
    }
    let invalid = |reason| ProxyError::InvalidKey {
        place: policy.key_from.describe(),
        reason,
    };
    match policy.key_from.from_body(body, policy.max_key_length) {
        Ok(None) => Ok(None),
        // Body keys are printable ASCII by now: always a header value.
        Ok(Some(key)) => HeaderValue::from_str(&key)
            .map(|raw| {
                Some(FoundKey {
                    raw,
                    text: Some(key),
                })
            })
            .map_err(|_| invalid(KeyError::InvalidChar)),
        Err(reason) => Err(invalid(reason)),
    }
}

/// Counts one waiting duplicate for as long as it lives.
struct Waiting<'a>(&'a prometheus::IntGauge);

impl<'a> Waiting<'a> {
    fn new(gauge: &'a prometheus::IntGauge) -> Self {
        gauge.inc();
        Waiting(gauge)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.dec();
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
        Err(e) => Err(ProxyError::BadBody(super::error_chain(&*e))),
    }
}

/// The store failed: refuse (503), or forward without idempotency.
async fn store_failed<S: UpstreamService>(
    shared: &Shared,
    inner: S,
    parts: Parts,
    body: Bytes,
    err: StoreError,
) -> Handled {
    match shared.settings.on_store_error {
        OnStoreError::Reject => {
            tracing::warn!(error = %err, "store failed; refusing the request");
            refuse(ProxyError::Store(err))
        }
        OnStoreError::PassThrough => {
            tracing::warn!(error = %err, "store failed; forwarding without idempotency");
            pass_through(shared, inner, parts, full(body)).await
        }
    }
}

/// Forwards a request untouched (streamed) and without state.
async fn pass_through<S: UpstreamService>(
    shared: &Shared,
    inner: S,
    parts: Parts,
    body: Body,
) -> Handled {
    let req = Request::from_parts(parts, body);
    match call_upstream(&shared.settings.metrics, inner, req).await {
        Ok(resp) => Handled::new(Outcome::PassThrough, resp),
        Err(e) => refuse(ProxyError::Upstream(e)),
    }
}

/// A live response, as a duplicate that joined it receives it.
fn joined_response(head: &Head, body: Body) -> Response<Body> {
    let mut resp = Response::new(body);
    *resp.status_mut() = head.status;
    *resp.headers_mut() = head.headers.clone();
    resp.headers_mut()
        .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    resp
}

/// A stored response, as a duplicate receives it.
fn replay(stored: &StoredResponse) -> Response<Body> {
    let body = if stored.body_omitted {
        Bytes::new()
    } else {
        stored.body.clone()
    };
    let mut resp = Response::new(full(body));
    *resp.status_mut() = stored.status;
    *resp.headers_mut() = stored.headers.clone();
    resp.headers_mut()
        .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    if stored.body_omitted {
        resp.headers_mut()
            .insert(IDEMPOTENT_BODY_OMITTED, HeaderValue::from_static("true"));
    }
    resp
}
