//! A covered request that holds the lease, run on a detached task: the
//! upstream call finishes, and its result is stored, even if the client goes
//! away, so a disconnect never leaves a lease stuck until it lapses.
//!
//! The lease is held by a [`LeaseGuard`] (as pingora's cache lock holds its
//! permit): settling it (complete or release) consumes the guard, so every
//! path settles it at most once, and a guard dropped unsettled (the task was
//! cancelled at shutdown) says so in the log; its lease then lapses after
//! `lease_ttl`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderMap, HeaderValue, Request, Response};
use http_body_util::BodyExt;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use super::flow::{refuse, Handled};
use super::layer::{Shared, UpstreamService};
use super::timed::call_upstream;
use super::IDEMPOTENCY_FENCE;
use crate::body::{read_limited, Prefixed, Read};
use crate::config::{OnUnknownOutcome, Policy};
use crate::error::{full, ProxyError, UpstreamError};
use crate::idempotency::key::{Fingerprint, RecordKey};
use crate::idempotency::record::{CompletedRecord, StoredResponse};
use crate::idempotency::state::{Lease, UnknownCause};
use crate::metrics::{Metrics, Outcome, StoreOp};
use crate::store::Store;
use crate::Body;

pub(super) struct Job {
    guard: LeaseGuard,
    fingerprint: Fingerprint,
    policy: Arc<Policy>,
    timeout: Duration,
}

/// What the upstream answered, read up to `max_response_body`.
enum Answer {
    /// The whole body fit.
    Whole(http::response::Parts, Bytes),
    /// The body outgrew the limit: what was read, and the rest to stream.
    Overflow(http::response::Parts, Vec<Bytes>, Body),
}

impl Job {
    pub fn new(
        shared: &Shared,
        key: RecordKey,
        lease: Lease,
        fingerprint: Fingerprint,
        policy: Arc<Policy>,
    ) -> Self {
        Job {
            guard: LeaseGuard {
                store: shared.store.clone(),
                key,
                lease,
                metrics: shared.settings.metrics.clone(),
                settled: false,
            },
            fingerprint,
            policy,
            timeout: shared.settings.upstream_timeout,
        }
    }

    /// Runs the job on `tasks` and waits for its answer (if the caller is
    /// still there to take it).
    pub async fn spawn<S: UpstreamService>(
        self,
        tasks: &TaskTracker,
        inner: S,
        mut parts: Parts,
        body: Bytes,
    ) -> Handled {
        parts
            .headers
            .insert(IDEMPOTENCY_FENCE, HeaderValue::from(self.guard.lease.fence));
        let req = Request::from_parts(parts, full(body));
        let (tx, rx) = oneshot::channel();
        tasks.spawn(async move {
            let handled = self.run(inner, req).await;
            // The caller may be gone; the record is stored either way.
            let _ = tx.send(handled);
        });
        rx.await.unwrap_or_else(|_| {
            refuse(ProxyError::Upstream(UpstreamError::Broken(
                "the upstream call was abandoned".into(),
            )))
        })
    }

    async fn run<S: UpstreamService>(self, inner: S, req: Request<Body>) -> Handled {
        let answer = {
            let work = tokio::time::timeout(
                self.timeout,
                call_and_read(
                    &self.guard.metrics,
                    inner,
                    req,
                    self.policy.max_response_body,
                ),
            );
            tokio::pin!(work);
            let renew = self.guard.renew_loop(self.policy.lease_ttl);
            tokio::pin!(renew);
            // The renew loop only ends when the lease is lost; then let the
            // call finish without it (complete will be refused, and counted).
            tokio::select! {
                a = &mut work => a,
                () = &mut renew => work.await,
            }
        };
        let answer = match answer {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                self.failed(&e).await;
                return refuse(ProxyError::Upstream(e));
            }
            Err(_) => {
                let e = UpstreamError::Timeout(self.timeout);
                self.failed(&e).await;
                return refuse(ProxyError::Upstream(e));
            }
        };
        let (parts, whole) = match &answer {
            Answer::Whole(p, b) => (p, Some(b)),
            Answer::Overflow(p, _, _) => (p, None),
        };
        let status = parts.status.as_u16();
        if self.policy.unknown_statuses.contains(&status) {
            // A gateway behind the upstream gave up: the client gets its
            // answer, the key is held as the policy says.
            self.guard
                .unknown(&self.policy, UnknownCause::Status(status))
                .await;
        } else if self.policy.uncacheable_statuses.contains(&status) {
            self.guard.release().await;
        } else {
            let record = CompletedRecord {
                fingerprint: self.fingerprint,
                created_unix_ms: unix_ms(),
                response: StoredResponse {
                    status: parts.status,
                    headers: stored_headers(&self.policy, &parts.headers),
                    body: whole.cloned().unwrap_or_default(),
                    body_omitted: whole.is_none(),
                },
            };
            self.guard
                .complete(Arc::new(record), self.policy.record_ttl)
                .await;
        }
        let resp = match answer {
            Answer::Whole(p, b) => Response::from_parts(p, full(b)),
            Answer::Overflow(p, read, rest) => {
                Response::from_parts(p, Prefixed::new(read, rest).boxed())
            }
        };
        Handled::new(Outcome::Forwarded, resp)
    }
}

impl Job {
    /// The upstream call failed: free the key if nothing was sent, else the
    /// outcome is unknown.
    async fn failed(self, e: &UpstreamError) {
        match e.unknown_cause() {
            None => self.guard.release().await,
            Some(cause) => self.guard.unknown(&self.policy, cause).await,
        }
    }
}

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

/// The lease a job holds, until it is settled.
struct LeaseGuard {
    store: Store,
    key: RecordKey,
    lease: Lease,
    metrics: Metrics,
    settled: bool,
}

impl LeaseGuard {
    /// Renews the lease every `ttl / 3`; returns only if it was lost.
    async fn renew_loop(&self, ttl: Duration) {
        let period = ttl / 3;
        let mut tick = tokio::time::interval_at(Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let renewed = self
                .store
                .observe(StoreOp::Renew, |b| b.renew(&self.key, &self.lease, ttl))
                .await;
            match renewed {
                Ok(true) => self.metrics.lease_renewals.inc(),
                Ok(false) => {
                    self.lost("while the upstream call ran");
                    return;
                }
                // Keep trying: the lease outlives a few missed renewals.
                Err(e) => {
                    tracing::warn!(record = %self.key.to_hex(), error = %e, "lease renewal failed")
                }
            }
        }
    }

    fn lost(&self, when: &str) {
        self.metrics.lease_lost.inc();
        tracing::warn!(record = %self.key.to_hex(), fence = self.lease.fence, "lease lost {when}");
    }

    /// Stores the record under the lease.
    async fn complete(mut self, record: Arc<CompletedRecord>, ttl: Duration) {
        self.settled = true;
        // A failed write leaves the lease to lapse and a retry to run again:
        // worth a couple of quick retries before giving up.
        for attempt in 0..3u32 {
            let stored = self
                .store
                .observe(StoreOp::Complete, |b| {
                    b.complete(&self.key, &self.lease, record.clone(), ttl)
                })
                .await;
            match stored {
                Ok(true) => return,
                Ok(false) => {
                    return self.lost("before completion; response returned but not stored")
                }
                Err(e) => {
                    tracing::error!(record = %self.key.to_hex(), attempt, error = %e, "storing the response failed");
                    tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                }
            }
        }
    }

    /// The request may have run: hold the key as unknown, or free it, as
    /// the route's `on_unknown_outcome` says.
    async fn unknown(mut self, policy: &Policy, cause: UnknownCause) {
        if policy.on_unknown_outcome == OnUnknownOutcome::Release {
            self.metrics.unknown_outcome(cause.label(), "released");
            return self.release().await;
        }
        self.settled = true;
        tracing::warn!(
            record = %self.key.to_hex(),
            fence = self.lease.fence,
            cause = %cause.encode(),
            "outcome unknown: the request may have been processed; holding the key"
        );
        let ttl = policy.unknown_ttl();
        let marked = self
            .store
            .observe(StoreOp::MarkUnknown, |b| {
                b.mark_unknown(&self.key, &self.lease, cause, ttl)
            })
            .await;
        match marked {
            Ok(true) => self.metrics.unknown_outcome(cause.label(), "held"),
            Ok(false) => self.lost("before the outcome could be recorded as unknown"),
            // The lease lapses; the next begin holds the key as lapsed.
            Err(e) => {
                tracing::error!(record = %self.key.to_hex(), error = %e, "recording an unknown outcome failed")
            }
        }
    }

    /// Frees the key so a retry runs.
    async fn release(mut self) {
        self.settled = true;
        let released = self
            .store
            .observe(StoreOp::Release, |b| b.release(&self.key, &self.lease))
            .await;
        match released {
            Ok(true) => {}
            Ok(false) => self.lost("before release"),
            // The lease lapses by itself after lease_ttl.
            Err(e) => {
                tracing::error!(record = %self.key.to_hex(), error = %e, "releasing the lease failed")
            }
        }
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if !self.settled {
            tracing::warn!(
                record = %self.key.to_hex(),
                fence = self.lease.fence,
                "upstream call abandoned with the lease held; it lapses after lease_ttl, then follows on_unknown_outcome"
            );
        }
    }
}

/// Calls the upstream and reads the body up to `max` bytes.
async fn call_and_read<S: UpstreamService>(
    metrics: &Metrics,
    inner: S,
    req: Request<Body>,
    max: u64,
) -> Result<Answer, UpstreamError> {
    let resp = call_upstream(metrics, inner, req).await?;
    let (parts, body) = resp.into_parts();
    match read_limited(body, max).await {
        Ok(Read::Whole(b)) => Ok(Answer::Whole(parts, b)),
        Ok(Read::Overflow(read, rest)) => Ok(Answer::Overflow(parts, read, rest)),
        Err(e) => Err(UpstreamError::Broken(super::error_chain(&*e))),
    }
}

pub(super) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
