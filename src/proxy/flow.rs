//! The settling loop of a covered request: the store's atomic begin, then
//! what it decided. Run the request (it took the lease: see [`super::job`]),
//! replay it (completed), refuse it (different fingerprint, outcome
//! unknown), reconcile it, or wait for an in-flight original (joining its
//! live response on this process) and begin again, until `wait_timeout`.
//! Also what a request that takes no state goes through: [`pass_through`].

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Request, Response};
use tokio::time::Instant;

use super::context::{refuse, Covered, Handled, Shared};
use super::headers::{strip_hop_by_hop, IDEMPOTENT_RECONCILED};
use super::job::Job;
use super::reconcile::Answer;
use super::records::{joined_response, replay, stored_headers, unix_ms};
use super::timed::call_upstream;
use super::upstream::Upstream;
use crate::body::whole;
use crate::config::{OnStoreError, Policy};
use crate::error::{ProxyError, UpstreamError};
use crate::idempotency::key::{Fingerprint, RecordKey};
use crate::idempotency::record::CompletedRecord;
use crate::idempotency::state::{decide, Begin, Decision, Resolution, Unknown};
use crate::metrics::{Outcome, StoreOp};
use crate::store::StoreError;
use crate::telemetry;
use crate::Body;

/// Settles a covered request against the store.
///
/// The paths most requests never take (a store failure, reconciling) are
/// awaited boxed: an `async fn`'s future is as large as the largest thing
/// it awaits, and this one is moved (copied whole) several times a
/// request on its way into its task, so it is kept to what the common
/// paths need.
pub(super) async fn settle(shared: &Arc<Shared>, covered: Covered) -> Handled {
    let Covered {
        parts,
        body,
        trailers,
        deadline: call_deadline,
        policy,
        upstream: inner,
        key: found,
        record_key,
        fingerprint: fp,
    } = covered;
    let refused_with = |e| refuse(e, &policy).on(record_key);
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
                return Box::pin(store_failed(
                    shared, &policy, inner, parts, body, trailers, e,
                ))
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
        if telemetry::in_sampled_request() {
            if let Some(f) = fence_of(&begun) {
                tracing::Span::current().record("idemgate.fence", f);
            }
        }
        match decide(begun, &fp) {
            Decision::Forward(lease) => {
                if let Err(refused) = admit(shared, &policy, &parts.headers).await {
                    // Nothing was sent: give the key back at once.
                    let _ = store
                        .observe(StoreOp::Release, |b| b.release(&record_key, &lease))
                        .await;
                    return match refused {
                        Refused::OverRate(wait) => refused_with(ProxyError::TooManyKeys(wait)),
                        Refused::Store(e) => Box::pin(store_failed(
                            shared, &policy, inner, parts, body, trailers, e,
                        ))
                        .await
                        .on(record_key),
                    };
                }
                // A call's own deadline (grpc-timeout) bounds it where it is
                // shorter than the upstream's timeout.
                let timeout = call_deadline.map_or(inner.timeout(), |d| d.min(inner.timeout()));
                let job = Job::new(shared, record_key, lease, fp, policy, timeout);
                return job
                    .spawn(&shared.settings.tasks, inner, parts, body, trailers)
                    .await
                    .on(record_key);
            }
            Decision::Replay(record) => {
                telemetry::link_to_origin(record.origin.as_ref());
                return Handled::new(Outcome::Replayed, replay(&record.response)).on(record_key);
            }
            Decision::Mismatch => return refused_with(ProxyError::KeyReused),
            Decision::Unknown { unknown, reconcile } => {
                if lapsed_now {
                    shared.settings.metrics.unknown_outcome("lapsed", "held");
                    tracing::warn!(record = %record_key.to_hex(), fence = unknown.fence, "outcome unknown: the lease holder stopped renewing after it forwarded; holding the key");
                }
                if !reconcile {
                    return refused_with(ProxyError::OutcomeUnknown(unknown));
                }
                // Owned: borrowed key text must not live across an await.
                let key = found.text(policy.max_key_length).into_owned();
                let asked = Box::pin(ask(
                    shared,
                    &policy,
                    &record_key,
                    (&found.raw, &key),
                    &parts.headers,
                    &fp,
                    unknown,
                ))
                .await;
                match asked {
                    Asked::Replay(resp) => {
                        return Handled::new(Outcome::Replayed, resp).on(record_key);
                    }
                    // It did not run (or was settled meanwhile): begin again.
                    Asked::Again => continue,
                    Asked::Unknown => return refused_with(ProxyError::OutcomeUnknown(unknown)),
                }
            }
            Decision::Wait { fence } => {
                // `wait_timeout = "0s"`, the strict setting: 409 at once,
                // without joining or waiting.
                if policy.wait_timeout.is_zero() {
                    return refused_with(ProxyError::InProgress);
                }
                // The original streams from this process: join it, from
                // its first byte, as soon as its head is in.
                let span = WaitSpan::new(fence);
                if let Some(live) = shared.lives.get(&record_key, fence) {
                    let joined = {
                        let _waiting = Waiting::new(&shared.settings.metrics.waiting_duplicates);
                        span.during(tokio::time::timeout_at(deadline, live.join()))
                            .await
                    };
                    if let Ok(Some((head, body))) = joined {
                        span.ended("joined live");
                        telemetry::link_to_origin(live.origin.as_ref());
                        return Handled::new(Outcome::Replayed, joined_response(&head, body))
                            .on(record_key);
                    }
                }
                if Instant::now() >= deadline {
                    span.ended("timed out");
                    return refused_with(ProxyError::InProgress);
                }
                let waited = {
                    // A guard, not inc/dec: a client that disconnects drops
                    // this future mid-wait, and the gauge must still go down.
                    let _waiting = Waiting::new(&shared.settings.metrics.waiting_duplicates);
                    span.during(store.wait(&record_key, fence, deadline)).await
                };
                span.ended(match &waited {
                    Err(_) => "store failed",
                    Ok(()) if Instant::now() >= deadline => "timed out",
                    Ok(()) => "woken",
                });
                if let Err(e) = waited {
                    return Box::pin(store_failed(
                        shared, &policy, inner, parts, body, trailers, e,
                    ))
                    .await
                    .on(record_key);
                }
            }
        }
    }
}

/// The fence a begin answered with, if any (for the request's span).
fn fence_of(begun: &Begin) -> Option<u64> {
    match begun {
        Begin::Acquired(lease) => Some(lease.fence),
        Begin::InFlight { fence, .. } => Some(*fence),
        Begin::Unknown { unknown, .. } => Some(unknown.fence),
        Begin::Completed(_) => None,
    }
}

/// The span of one wait for an in-flight original (with traces on), and
/// how it ended: `woken`, `timed out`, `joined live`, `store failed`.
struct WaitSpan(Option<tracing::Span>);

impl WaitSpan {
    fn new(fence: u64) -> Self {
        WaitSpan(telemetry::in_sampled_request().then(|| {
            tracing::debug_span!(
                "wait",
                otel.name = "wait for duplicate",
                idemgate.fence = fence,
                idemgate.wait = tracing::field::Empty,
            )
        }))
    }

    async fn during<F: std::future::Future>(&self, f: F) -> F::Output {
        use tracing::Instrument;
        match &self.0 {
            Some(span) => f.instrument(span.clone()).await,
            None => f.await,
        }
    }

    fn ended(&self, how: &'static str) {
        if let Some(span) = &self.0 {
            span.record("idemgate.wait", how);
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
    match shared.store.admit(&scope, rate).await {
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
        Answer::Found(response) => {
            let mut response = *response;
            strip_hop_by_hop(&mut response.headers);
            response.headers = stored_headers(policy, &response.headers);
            let record = Arc::new(CompletedRecord {
                origin: None,
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

/// The store failed: refuse (503), or forward without idempotency.
async fn store_failed(
    shared: &Shared,
    policy: &Arc<Policy>,
    inner: Upstream,
    parts: Parts,
    body: Bytes,
    trailers: Option<HeaderMap>,
    err: StoreError,
) -> Handled {
    match shared.settings.on_store_error {
        OnStoreError::Reject => {
            tracing::warn!(error = %err, "store failed; refusing the request");
            refuse(ProxyError::Store(err), policy)
        }
        OnStoreError::PassThrough => {
            tracing::warn!(error = %err, "store failed; forwarding without idempotency");
            pass_through(shared, policy, inner, parts, whole(body, trailers), None).await
        }
    }
}

/// Forwards a request untouched (streamed) and without state, its head
/// within `deadline` where that is shorter than the upstream's timeout.
pub(super) async fn pass_through(
    shared: &Shared,
    policy: &Arc<Policy>,
    upstream: Upstream,
    parts: Parts,
    body: Body,
    deadline: Option<Duration>,
) -> Handled {
    let req = Request::from_parts(parts, body);
    let call = call_upstream(&shared.settings.metrics, upstream, req);
    let answered = match deadline {
        None => call.await,
        Some(d) => tokio::time::timeout(d, call)
            .await
            .unwrap_or(Err(UpstreamError::Timeout(d))),
    };
    match answered {
        Ok(resp) => Handled::new(Outcome::PassThrough, resp),
        Err(e) => refuse(ProxyError::Upstream(e), policy),
    }
}
