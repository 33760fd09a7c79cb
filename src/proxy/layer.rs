//! The idempotency middleware as tower lays one out: [`IdempotencyLayer`]
//! wraps the upstream service in [`Idempotency`], whose future runs the
//! request flow ([`super::flow`]) and counts how it ended.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body as HttpBody;
use http_body_util::BodyExt;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tower::Service;

use super::flow;
use super::live::Lives;
use super::reconcile::Reconciler;
use crate::config::{OnStoreError, Policies};
use crate::error::UpstreamError;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::{Body, BoxError};

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

/// What every request of the layer shares.
pub(super) struct Shared {
    pub store: Store,
    pub settings: Settings,
    pub reconciler: Reconciler,
    /// Covered responses streaming now, for duplicates to join.
    pub lives: Arc<Lives>,
}

impl IdempotencyLayer {
    pub fn new(store: Store, settings: Settings) -> Self {
        IdempotencyLayer {
            shared: Arc::new(Shared {
                store,
                settings,
                reconciler: Reconciler::new(),
                lives: Arc::default(),
            }),
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
            let handled = flow::handle(shared, inner, req).await;
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
