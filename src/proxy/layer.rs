//! The idempotency middleware: one tower `Layer`/`Service`.
//!
//! Per request: find the route's policy; pass uncovered methods and keyless
//! requests through streamed; refuse bad keys and oversized bodies before any
//! state is taken; then loop on the store's atomic begin until the request
//! can be run (it took the lease), replayed (completed), refused (different
//! fingerprint) or timed out waiting for an in-flight original.
//!
//! A request that takes the lease runs on a detached task: the upstream call
//! finishes, and its result is stored, even if the client goes away, so a
//! disconnect never leaves a lease stuck until it lapses.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderMap, HeaderValue, Request, Response};
use http_body::Body as HttpBody;
use http_body_util::BodyExt;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tower::{Service, ServiceExt};

use super::body::{read_limited, Prefixed, Read};
use super::{IDEMPOTENCY_FENCE, IDEMPOTENT_BODY_OMITTED, IDEMPOTENT_REPLAYED};
use crate::config::{OnStoreError, Policies, Policy};
use crate::error::{full, ProxyError, UpstreamError};
use crate::idempotency::key::{parse_key, Fingerprint, KeyError, RecordKey};
use crate::idempotency::record::{CompletedRecord, StoredResponse};
use crate::idempotency::state::{decide, Decision, Lease};
use crate::metrics::Metrics;
use crate::store::{AnyStore, Store};
use crate::{Body, BoxError};

/// How a request ended; one per request, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Forwarded,
    Replayed,
    Conflict,
    Mismatch,
    MissingKey,
    InvalidKey,
    TooLarge,
    PassThrough,
    StoreUnavailable,
    UpstreamError,
    /// The client's own request body failed mid-read (it went away).
    ClientError,
}

impl Outcome {
    /// Every outcome, in declaration order (`ALL[o as usize] == o`).
    pub const ALL: [Outcome; 11] = [
        Outcome::Forwarded,
        Outcome::Replayed,
        Outcome::Conflict,
        Outcome::Mismatch,
        Outcome::MissingKey,
        Outcome::InvalidKey,
        Outcome::TooLarge,
        Outcome::PassThrough,
        Outcome::StoreUnavailable,
        Outcome::UpstreamError,
        Outcome::ClientError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Forwarded => "forwarded",
            Outcome::Replayed => "replayed",
            Outcome::Conflict => "conflict",
            Outcome::Mismatch => "mismatch",
            Outcome::MissingKey => "missing_key",
            Outcome::InvalidKey => "invalid_key",
            Outcome::TooLarge => "too_large",
            Outcome::PassThrough => "pass_through",
            Outcome::StoreUnavailable => "store_unavailable",
            Outcome::UpstreamError => "upstream_error",
            Outcome::ClientError => "client_error",
        }
    }

    fn of(e: &ProxyError) -> Outcome {
        match e {
            ProxyError::MissingKey(_) => Outcome::MissingKey,
            ProxyError::InvalidKey { .. } => Outcome::InvalidKey,
            ProxyError::BodyTooLarge(_) => Outcome::TooLarge,
            ProxyError::BadBody(_) | ProxyError::BodyTimeout(_) => Outcome::ClientError,
            ProxyError::KeyReused => Outcome::Mismatch,
            ProxyError::InProgress => Outcome::Conflict,
            ProxyError::Store(_) => Outcome::StoreUnavailable,
            ProxyError::Upstream(_) => Outcome::UpstreamError,
        }
    }
}

/// What the layer needs besides the store.
#[derive(Clone)]
pub struct Settings {
    pub policies: Policies,
    pub on_store_error: OnStoreError,
    /// Bounds a covered call: response head and buffered body together.
    pub upstream_timeout: Duration,
    /// Bounds reading a covered request's body.
    pub body_read_timeout: Duration,
    /// Detached upstream calls are spawned here so shutdown can wait for them.
    pub tasks: TaskTracker,
    pub metrics: Metrics,
}

/// Applies idempotency to the wrapped upstream service.
#[derive(Clone)]
pub struct IdempotencyLayer {
    shared: Arc<Shared>,
}

/// The store is the concrete [`AnyStore`]: backends are chosen at start-up,
/// and a concrete type keeps the request future provably `Send` (a generic
/// store's RPITIT futures trip a rustc limitation across spawned tasks).
struct Shared {
    store: AnyStore,
    settings: Settings,
}

impl IdempotencyLayer {
    pub fn new(store: AnyStore, settings: Settings) -> Self {
        IdempotencyLayer {
            shared: Arc::new(Shared { store, settings }),
        }
    }
}

impl<S> tower::Layer<S> for IdempotencyLayer {
    type Service = Idempotency<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Idempotency {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The idempotency service. Never fails: every error is a problem response.
pub struct Idempotency<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: Clone> Clone for Idempotency<S> {
    fn clone(&self) -> Self {
        Idempotency {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

/// The upstream service the layer wraps.
pub trait UpstreamService:
    Service<Request<Body>, Response = Response<Body>, Error = UpstreamError, Future: Send>
    + Clone
    + Send
    + 'static
{
}
impl<T> UpstreamService for T where
    T: Service<Request<Body>, Response = Response<Body>, Error = UpstreamError, Future: Send>
        + Clone
        + Send
        + 'static
{
}

impl<S, B> Service<Request<B>> for Idempotency<S>
where
    S: UpstreamService,
    B: HttpBody<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The upstream is a pooled client: always ready, so is this.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        let shared = self.shared.clone();
        let req = req.map(|b| b.map_err(Into::into).boxed());
        Box::pin(async move {
            let started = Instant::now();
            let method = req.method().clone();
            let metrics = shared.settings.metrics.clone();
            let handled = handle(shared, inner, req).await;
            let elapsed = started.elapsed();
            metrics.request(handled.outcome, elapsed);
            tracing::debug!(
                %method,
                record = handled.record.map(|k| k.to_hex()),
                outcome = handled.outcome.as_str(),
                status = handled.response.status().as_u16(),
                elapsed_ms = elapsed.as_secs_f64() * 1e3,
                "request"
            );
            Ok(handled.response)
        })
    }
}

/// How a request ended, and with what.
struct Handled {
    outcome: Outcome,
    response: Response<Body>,
    /// The record key, once derived (logged as its hash, never the key).
    record: Option<RecordKey>,
}

impl Handled {
    fn new(outcome: Outcome, response: Response<Body>) -> Self {
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

fn refuse(e: ProxyError) -> Handled {
    if matches!(e, ProxyError::Upstream(_) | ProxyError::Store(_)) {
        tracing::warn!(error = %e, "request failed");
    }
    Handled::new(Outcome::of(&e), e.to_response())
}

async fn handle<S: UpstreamService>(shared: Arc<Shared>, inner: S, req: Request<Body>) -> Handled {
    let (mut parts, body) = req.into_parts();
    // Only idemgate chooses the fence an upstream sees.
    parts.headers.remove(IDEMPOTENCY_FENCE);
    let policy = shared.settings.policies.for_path(parts.uri.path()).clone();

    if !policy.covers(&parts.method) {
        return forward(
            &shared.settings.metrics,
            inner,
            Request::from_parts(parts, body),
            Outcome::PassThrough,
        )
        .await;
    }
    // Look at the key header without holding a borrow of it across an await.
    let raw_key = {
        let mut values = parts.headers.get_all(&policy.header).iter();
        match (values.next(), values.next()) {
            (None, _) => None,
            (Some(_), Some(_)) => {
                return refuse(ProxyError::InvalidKey {
                    header: policy.header.to_string(),
                    reason: KeyError::Repeated,
                })
            }
            (Some(v), None) => Some(v.clone()),
        }
    };
    let Some(raw_key) = raw_key else {
        if policy.required {
            return refuse(ProxyError::MissingKey(policy.header.to_string()));
        }
        return forward(
            &shared.settings.metrics,
            inner,
            Request::from_parts(parts, body),
            Outcome::PassThrough,
        )
        .await;
    };
    // Borrowed key text must not live across an await (the future would not
    // be provably Send), so derive the record key in this block.
    let record_key = match parse_key(raw_key.as_bytes(), policy.max_key_length) {
        Ok(key) => RecordKey::derive(
            &parts.headers,
            &policy.scope_headers,
            &parts.method,
            parts.uri.path(),
            &key,
        ),
        Err(reason) => {
            return refuse(ProxyError::InvalidKey {
                header: policy.header.to_string(),
                reason,
            })
        }
    };
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
    let fp = {
        let pq = parts
            .uri
            .path_and_query()
            .map_or(parts.uri.path(), |pq| pq.as_str());
        Fingerprint::compute(
            &parts.method,
            pq,
            &parts.headers,
            &policy.fingerprint_headers,
            &body,
        )
    };

    let deadline = Instant::now() + policy.wait_timeout;
    loop {
        let begun = match shared.store.begin(&record_key, &fp, policy.lease_ttl).await {
            Ok(b) => b,
            Err(e) => {
                return store_failed(&shared, inner, parts, body, e)
                    .await
                    .on(record_key)
            }
        };
        match decide(begun, &fp) {
            Decision::Forward(lease) => {
                let job = Job {
                    store: shared.store.clone(),
                    record_key,
                    lease,
                    fingerprint: fp,
                    policy,
                    timeout: shared.settings.upstream_timeout,
                    metrics: shared.settings.metrics.clone(),
                };
                return job
                    .spawn(&shared.settings.tasks, inner, parts, body)
                    .await
                    .on(record_key);
            }
            Decision::Replay(record) => {
                return Handled::new(Outcome::Replayed, replay(&record.response)).on(record_key)
            }
            Decision::Mismatch => return refuse(ProxyError::KeyReused).on(record_key),
            Decision::Wait { fence } => {
                if Instant::now() >= deadline {
                    return refuse(ProxyError::InProgress).on(record_key);
                }
                let waited = {
                    // A guard, not inc/dec: a client that disconnects drops
                    // this future mid-wait, and the gauge must still go down.
                    let _waiting = Waiting::new(&shared.settings.metrics.waiting_duplicates);
                    shared.store.wait(&record_key, fence, deadline).await
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
        Ok(Read::Overflow(..)) => Err(ProxyError::BodyTooLarge(limit)),
        Err(e) => Err(ProxyError::BadBody(super::error_chain(&*e))),
    }
}

/// The store failed: refuse (503), or forward without idempotency.
async fn store_failed<S: UpstreamService>(
    shared: &Shared,
    inner: S,
    parts: Parts,
    body: Bytes,
    err: crate::store::StoreError,
) -> Handled {
    match shared.settings.on_store_error {
        OnStoreError::Reject => {
            tracing::warn!(error = %err, "store failed; refusing the request");
            refuse(ProxyError::Store(err))
        }
        OnStoreError::PassThrough => {
            tracing::warn!(error = %err, "store failed; forwarding without idempotency");
            forward(
                &shared.settings.metrics,
                inner,
                Request::from_parts(parts, full(body)),
                Outcome::PassThrough,
            )
            .await
        }
    }
}

/// Forwards a request untouched (streamed), mapping upstream failures.
async fn forward<S: UpstreamService>(
    metrics: &Metrics,
    inner: S,
    req: Request<Body>,
    outcome: Outcome,
) -> Handled {
    match call_upstream(metrics, inner, req).await {
        Ok(resp) => Handled::new(outcome, resp),
        Err(e) => refuse(ProxyError::Upstream(e)),
    }
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

/// A covered request that holds the lease, run detached from its caller.
struct Job {
    store: AnyStore,
    record_key: RecordKey,
    lease: Lease,
    fingerprint: Fingerprint,
    policy: Arc<Policy>,
    timeout: Duration,
    metrics: Metrics,
}

/// What the upstream answered, read up to `max_response_body`.
enum Answer {
    /// The whole body fit.
    Whole(http::response::Parts, Bytes),
    /// The body outgrew the limit: what was read, and the rest to stream.
    Overflow(http::response::Parts, Vec<Bytes>, Body),
}

impl Job {
    async fn spawn<S: UpstreamService>(
        self,
        tasks: &TaskTracker,
        inner: S,
        mut parts: Parts,
        body: Bytes,
    ) -> Handled {
        parts
            .headers
            .insert(IDEMPOTENCY_FENCE, HeaderValue::from(self.lease.fence));
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
        let work = tokio::time::timeout(
            self.timeout,
            call_and_read(&self.metrics, inner, req, self.policy.max_response_body),
        );
        tokio::pin!(work);
        let renew = self.renew_loop();
        tokio::pin!(renew);
        // The renew loop only ends when the lease is lost; then let the call
        // finish without it (complete will be refused, and counted).
        let answer = tokio::select! {
            a = &mut work => a,
            () = &mut renew => work.await,
        };
        let answer = match answer {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                self.release().await;
                return refuse(ProxyError::Upstream(e));
            }
            Err(_) => {
                self.release().await;
                return refuse(ProxyError::Upstream(UpstreamError::Timeout(self.timeout)));
            }
        };
        let status = match &answer {
            Answer::Whole(p, _) | Answer::Overflow(p, _, _) => p.status,
        };
        if self.policy.uncacheable_statuses.contains(&status.as_u16()) {
            self.release().await;
        } else {
            let (headers, body, omitted) = match &answer {
                Answer::Whole(p, b) => (&p.headers, b.clone(), false),
                Answer::Overflow(p, _, _) => (&p.headers, Bytes::new(), true),
            };
            let record = CompletedRecord {
                fingerprint: self.fingerprint,
                created_unix_ms: unix_ms(),
                response: StoredResponse {
                    status,
                    headers: self.stored_headers(headers),
                    body,
                    body_omitted: omitted,
                },
            };
            self.complete(Arc::new(record)).await;
        }
        let resp = match answer {
            Answer::Whole(p, b) => Response::from_parts(p, full(b)),
            Answer::Overflow(p, read, rest) => {
                Response::from_parts(p, Prefixed::new(read, rest).boxed())
            }
        };
        Handled::new(Outcome::Forwarded, resp)
    }

    /// Response headers worth replaying: no framing (hyper sets
    /// Content-Length from the stored body) and none of `replay_strip_headers`.
    fn stored_headers(&self, headers: &HeaderMap) -> HeaderMap {
        let mut h = headers.clone();
        h.remove(header::CONTENT_LENGTH);
        for name in &self.policy.replay_strip_headers {
            h.remove(name);
        }
        h
    }

    /// Renews the lease every `lease_ttl / 3`; returns only if it was lost.
    async fn renew_loop(&self) {
        let ttl = self.policy.lease_ttl;
        let period = ttl / 3;
        let mut tick = tokio::time::interval_at(Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match self.store.renew(&self.record_key, &self.lease, ttl).await {
                Ok(true) => self.metrics.lease_renewals.inc(),
                Ok(false) => {
                    self.metrics.lease_lost.inc();
                    tracing::warn!(record = %self.record_key.to_hex(), fence = self.lease.fence, "lease lost while the upstream call ran");
                    return;
                }
                // Keep trying: the lease outlives a few missed renewals.
                Err(e) => {
                    tracing::warn!(record = %self.record_key.to_hex(), error = %e, "lease renewal failed")
                }
            }
        }
    }

    async fn complete(&self, record: Arc<CompletedRecord>) {
        // A failed write leaves the lease to lapse and a retry to run again:
        // worth a couple of quick retries before giving up.
        for attempt in 0..3u32 {
            match self
                .store
                .complete(
                    &self.record_key,
                    &self.lease,
                    record.clone(),
                    self.policy.record_ttl,
                )
                .await
            {
                Ok(true) => return,
                Ok(false) => {
                    self.metrics.lease_lost.inc();
                    tracing::warn!(record = %self.record_key.to_hex(), fence = self.lease.fence, "lease lost before completion; response returned but not stored");
                    return;
                }
                Err(e) => {
                    tracing::error!(record = %self.record_key.to_hex(), attempt, error = %e, "storing the response failed");
                    tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                }
            }
        }
    }

    async fn release(&self) {
        match self.store.release(&self.record_key, &self.lease).await {
            Ok(true) => {}
            Ok(false) => {
                self.metrics.lease_lost.inc();
                tracing::warn!(record = %self.record_key.to_hex(), fence = self.lease.fence, "lease lost before release")
            }
            // The lease lapses by itself after lease_ttl.
            Err(e) => {
                tracing::error!(record = %self.record_key.to_hex(), error = %e, "releasing the lease failed")
            }
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

/// Calls the upstream through a boxed future. Boxing outside any async body
/// sidesteps a rustc limitation (it cannot prove an associated future `Send`
/// for every lifetime inside a spawned generic task); it is one allocation
/// next to a network round trip.
fn call_upstream<S: UpstreamService>(
    metrics: &Metrics,
    inner: S,
    req: Request<Body>,
) -> Pin<Box<dyn Future<Output = Result<Response<Body>, UpstreamError>> + Send>> {
    Box::pin(Timed {
        inner: inner.oneshot(req),
        started: Instant::now(),
        histogram: metrics.upstream_duration.clone(),
    })
}

pin_project_lite::pin_project! {
    /// Observes how long a future took. A named type rather than an async
    /// block, for the same rustc limitation as above.
    struct Timed<F> {
        #[pin]
        inner: F,
        started: Instant,
        histogram: prometheus::Histogram,
    }
}

impl<F: Future> Future for Timed<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        this.histogram.observe(this.started.elapsed().as_secs_f64());
        Poll::Ready(out)
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
