//! A covered request that holds the lease, run on a detached task: the
//! upstream call finishes, and its result is stored, even if the client goes
//! away, so a disconnect never leaves a lease stuck until it lapses.
//!
//! The lease is held by a [`LeaseGuard`] (as pingora's cache lock holds its
//! permit): settling it (complete or release) consumes the guard, so every
//! path settles it at most once, and a guard dropped unsettled (the task was
//! cancelled at shutdown) says so in the log; its lease then lapses after
//! `lease_ttl`.

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderMap, HeaderValue, Request, Response};
use http_body_util::BodyExt;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use super::context::{refuse, Handled, Shared};
use super::grpc;
use super::headers::IDEMPOTENCY_FENCE;
use super::live::{Head, Live, Lives};
use super::records::{disposition, stored_headers, unix_ms, Disposition};
use super::timed::call_upstream;
use super::upstream::Upstream;
use crate::body::whole;
use crate::config::{OnUnknownOutcome, Policy};
use crate::error::{error_chain, ProxyError, UpstreamError};
use crate::idempotency::key::{Fingerprint, RecordKey};
use crate::idempotency::record::{CompletedRecord, StoredResponse};
use crate::idempotency::state::{Lease, UnknownCause};
use crate::metrics::{Metrics, Outcome, StoreOp};
use crate::store::Store;
use crate::telemetry;
use crate::Body;

pub(super) struct Job {
    guard: LeaseGuard,
    fingerprint: Fingerprint,
    policy: Arc<Policy>,
    timeout: Duration,
    lives: Arc<Lives>,
}

impl Job {
    pub fn new(
        shared: &Shared,
        key: RecordKey,
        lease: Lease,
        fingerprint: Fingerprint,
        policy: Arc<Policy>,
        timeout: Duration,
    ) -> Self {
        Job {
            guard: LeaseGuard {
                store: shared.store.clone(),
                store_timeout: shared.settings.store_timeout,
                key,
                lease,
                metrics: shared.settings.metrics.clone(),
                settled: false,
            },
            fingerprint,
            policy,
            timeout,
            lives: shared.lives.clone(),
        }
    }

    /// Runs the job on `tasks` and waits for the response head (if the
    /// caller is still there to take it); the body follows as it arrives.
    pub async fn spawn(
        self,
        tasks: &TaskTracker,
        inner: Upstream,
        mut parts: Parts,
        body: Bytes,
        trailers: Option<HeaderMap>,
    ) -> Handled {
        parts
            .headers
            .insert(IDEMPOTENCY_FENCE, HeaderValue::from(self.guard.lease.fence));
        let req = Request::from_parts(parts, whole(body, trailers));
        let policy = self.policy.clone();
        let (tx, rx) = oneshot::channel();
        let run = async move {
            // The caller may be gone; the record is stored either way.
            self.run(inner, req, tx).await;
        };
        // Boxed: the task then holds a pointer, where it would hold (and
        // tokio copy whole, at spawn and at each change of the task's
        // stage) a future of a few KiB.
        let run = Box::pin(run);
        if telemetry::in_sampled_request() {
            // The request's span is the parent of what the job does, even
            // after the client has gone.
            use tracing::Instrument;
            tasks.spawn(run.instrument(tracing::Span::current()));
        } else {
            tasks.spawn(run);
        }
        rx.await.unwrap_or_else(|_| {
            let e = UpstreamError::Broken("the upstream call was abandoned".into());
            refuse(ProxyError::Upstream(e), &policy)
        })
    }

    /// Calls the upstream; answers `tx` once the head is in and the body
    /// is still coming (or, for a body that came whole, once its record is
    /// stored); records the body and settles the lease when it ends.
    /// The ways it can fail, and settling an answer that is not kept, are
    /// awaited boxed, so that they do not make this future (moved into its
    /// box whole) larger than the common path needs.
    async fn run(mut self, inner: Upstream, req: Request<Body>, tx: oneshot::Sender<Handled>) {
        let deadline = Instant::now() + self.timeout;
        // Duplicates on this process find the attempt here from now on, and
        // join it once its head is in.
        let live = Live::traced(
            self.guard.lease.fence,
            self.policy.max_response_body,
            telemetry::origin(),
        );
        self.lives.insert(self.guard.key, live.clone());
        let head = self
            .renewing(tokio::time::timeout_at(
                deadline,
                call_upstream(&self.guard.metrics, inner, req),
            ))
            .await;
        let resp = match head {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => return Box::pin(self.fail_before_head(&live, e, tx)).await,
            Err(_) => {
                let e = UpstreamError::Timeout(self.timeout);
                return Box::pin(self.fail_before_head(&live, e, tx)).await;
            }
        };
        let (parts, body) = resp.into_parts();
        let status_code = parts.status;
        let status = status_code.as_u16();
        let head_grpc = grpc::status(&parts.headers);
        let disposed = disposition(&self.policy, status, head_grpc);
        let stored = disposed == Disposition::Keep;
        let headers = stored_headers(&self.policy, &parts.headers);
        live.set_head(
            Head {
                status: parts.status,
                headers: headers.clone(),
            },
            stored,
        );
        if !stored {
            // Not stored: settle now, and the client reads the upstream's
            // body as it comes (no duplicate joins it).
            self.lives.remove(&self.guard.key, &live);
            live.finish(Ok(()));
            Box::pin(self.dispose(disposed)).await;
            let _ = tx.send(Handled::new(
                Outcome::Forwarded,
                Response::from_parts(parts, body),
            ));
            return;
        }
        // The client's response ends only once its record is stored: its
        // bytes stream as they come, but its last byte (a known length),
        // terminating chunk or END_STREAM waits for the store. A body that
        // needs no wait to read whole (empty, or the small answer that came
        // in the head's packet) has nothing to stream: its head waits too,
        // and the response goes out in one write rather than all but its
        // end now and the end a store round trip later (a second write, and
        // a second wake-up of the client, for no byte it could use sooner).
        let length = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok());
        let mut answer = Some((
            tx,
            Handled::new(
                Outcome::Forwarded,
                Response::from_parts(parts, live.first_reader(length)),
            ),
        ));
        let pumped = {
            let pumping = self.renewing(tokio::time::timeout_at(deadline, pump(body, &live)));
            tokio::pin!(pumping);
            // One poll: did the body end without waiting?
            match std::future::poll_fn(|cx| Poll::Ready(pumping.as_mut().poll(cx))).await {
                Poll::Ready(pumped) => pumped,
                Poll::Pending => {
                    if let Some((tx, handled)) = answer.take() {
                        let _ = tx.send(handled);
                    }
                    pumping.await
                }
            }
        };
        // Sends the head if it waited: as it is, or as `instead`.
        let answer = move |instead: Option<ProxyError>, policy: &Arc<Policy>| {
            if let Some((tx, handled)) = answer {
                let _ = tx.send(match instead {
                    None => handled,
                    Some(e) => refuse(e, policy),
                });
            }
        };
        let (lives, key, policy) = (self.lives.clone(), self.guard.key, self.policy.clone());
        match pumped {
            Ok(Ok(())) => {
                let (body, trailers) = live.recorded();
                // A gRPC status comes last, in the trailers: it may say
                // the answer is not one to keep after all.
                let trailed = disposition(&self.policy, status, grpc::status(&trailers));
                if trailed != Disposition::Keep {
                    live.finish(Ok(()));
                    answer(None, &policy);
                    Box::pin(self.dispose(trailed)).await;
                    lives.remove(&key, &live);
                    return;
                }
                let record = CompletedRecord {
                    // The request's own span: this task runs in it.
                    origin: telemetry::origin(),
                    fingerprint: self.fingerprint,
                    created_unix_ms: unix_ms(),
                    response: StoredResponse {
                        status: status_code,
                        headers,
                        body_omitted: body.is_none(),
                        body: body.unwrap_or_default(),
                        trailers,
                    },
                };
                let ttl = self.policy.record_ttl;
                match self.guard.complete(Arc::new(record), ttl).await {
                    Completion::Stored => {
                        // Now readers get their clean end (a duplicate
                        // arriving meanwhile joined this stream).
                        live.finish(Ok(()));
                        answer(None, &policy);
                    }
                    Completion::Lost => {
                        let why = "the lease was lost before the response was stored";
                        live.finish(Err(why.into()));
                        answer(Some(ProxyError::NotStored(why.into())), &policy);
                    }
                    Completion::Failed(why) => {
                        live.finish(Err(format!("the response could not be stored: {why}")));
                        answer(Some(ProxyError::NotStored(why)), &policy);
                        Box::pin(self.guard.unknown(&self.policy, UnknownCause::Unstored)).await;
                    }
                }
                lives.remove(&key, &live);
            }
            Ok(Err(why)) => {
                live.finish(Err(format!("the upstream response broke off: {why}")));
                answer(None, &policy);
                Box::pin(self.failed(&UpstreamError::Broken(why))).await;
                lives.remove(&key, &live);
            }
            Err(_) => {
                live.finish(Err(
                    "the upstream response did not finish within upstream_timeout".into(),
                ));
                answer(None, &policy);
                let e = UpstreamError::Timeout(self.timeout);
                Box::pin(self.failed(&e)).await;
                lives.remove(&key, &live);
            }
        }
    }

    /// Runs `work` while renewing the lease. The renew loop only ends when
    /// the lease is lost; then the work finishes without it (settling will
    /// be refused, and counted).
    async fn renewing<F: std::future::Future>(&self, work: F) -> F::Output {
        tokio::pin!(work);
        let renew = self.guard.renew_loop(self.policy.lease_ttl);
        tokio::pin!(renew);
        tokio::select! {
            out = &mut work => out,
            () = &mut renew => work.await,
        }
    }

    /// The call failed before any response: settle, and tell the caller.
    async fn fail_before_head(
        self,
        live: &Arc<Live>,
        e: UpstreamError,
        tx: oneshot::Sender<Handled>,
    ) {
        self.lives.remove(&self.guard.key, live);
        live.finish(Err(e.to_string()));
        let policy = self.policy.clone();
        self.failed(&e).await;
        let _ = tx.send(refuse(ProxyError::Upstream(e), &policy));
    }
}

/// Reads the upstream body into `live` until it ends; its trailers go to
/// `live` too (readers get them last, the record keeps them).
async fn pump(mut body: Body, live: &Live) -> Result<(), String> {
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| error_chain(&*e))?;
        match frame.into_data() {
            Ok(data) if data.is_empty() => {}
            Ok(data) => live.push(data).await,
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    live.trailers(t);
                }
            }
        }
    }
    Ok(())
}

impl Job {
    /// Settles a response that is not stored: released, or held as
    /// unknown (a gateway behind the upstream gave up: the client has its
    /// answer, the key is held as the policy says).
    async fn dispose(self, disposed: Disposition) {
        match disposed {
            Disposition::Keep => {}
            Disposition::Release => self.guard.release().await,
            Disposition::Unknown(cause) => {
                let key = self.guard.key;
                self.guard.unknown(&self.policy, cause).await;
                tracing::debug!(record = %key.to_hex(), cause = %cause.encode(), "unknown status; key held");
            }
        }
    }

    /// The upstream call failed: free the key if nothing was sent, else the
    /// outcome is unknown.
    async fn failed(self, e: &UpstreamError) {
        match e.unknown_cause() {
            None => self.guard.release().await,
            Some(cause) => self.guard.unknown(&self.policy, cause).await,
        }
    }
}

/// How storing a record went.
enum Completion {
    Stored,
    /// The lease was lost first: nothing was written.
    Lost,
    /// The store did not take the write (why), within `store.timeout`.
    Failed(String),
}

/// The lease a job holds, until it is settled.
struct LeaseGuard {
    store: Store,
    /// `store.timeout`: how long a completion may take, retries included.
    store_timeout: Duration,
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

    /// Stores the record under the lease: a write that fails is tried
    /// again, briefly, while `store.timeout` since the first attempt has not
    /// run out (each attempt is itself bounded by it, in the backend; the
    /// usual write that succeeds at once sets no timer here). Settles the
    /// lease unless the write failed (the caller then settles it).
    async fn complete(&mut self, record: Arc<CompletedRecord>, ttl: Duration) -> Completion {
        let started = Instant::now();
        let mut attempt = 0u32;
        let completion = loop {
            let stored = self
                .store
                .observe(StoreOp::Complete, |b| {
                    b.complete(&self.key, &self.lease, record.clone(), ttl)
                })
                .await;
            match stored {
                Ok(true) => break Completion::Stored,
                Ok(false) => break Completion::Lost,
                Err(e) => {
                    tracing::error!(record = %self.key.to_hex(), attempt, error = %e, "storing the response failed");
                    let pause = Duration::from_millis(20 << attempt.min(4));
                    if started.elapsed() + pause >= self.store_timeout {
                        break Completion::Failed(format!(
                            "{e}; not taken within store.timeout ({:?})",
                            self.store_timeout
                        ));
                    }
                    tokio::time::sleep(pause).await;
                    attempt += 1;
                }
            }
        };
        match &completion {
            Completion::Stored => self.settled = true,
            Completion::Lost => {
                self.settled = true;
                self.lost("before completion; the response was aborted, not stored");
            }
            Completion::Failed(_) => {}
        }
        completion
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
