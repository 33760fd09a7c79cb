//! The idempotency service: [`Idempotency`] takes the current routing
//! snapshot (policies and upstream clients, see [`super::routing`]), runs
//! the request flow ([`super::flow`]) against the route's upstream, and
//! counts how it ended.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use super::routing::SharedRouting;

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
use crate::config::OnStoreError;
use crate::error::UpstreamError;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::{Body, BoxError};

/// What the layer needs besides the store.
#[derive(Clone)]
pub struct Settings {
    pub on_store_error: OnStoreError,
    /// Bounds reading a covered request's body.
    pub body_read_timeout: Duration,
    /// Detached upstream calls are spawned here so shutdown can wait for them.
    pub tasks: TaskTracker,
    pub metrics: Metrics,
}

/// What every request of the service shares.
pub(super) struct Shared {
    pub store: Store,
    pub settings: Settings,
    pub reconciler: Reconciler,
    /// Covered responses streaming now, for duplicates to join.
    pub lives: Arc<Lives>,
    /// Policies and upstreams; replaced whole by a reload.
    pub routing: SharedRouting,
}

/// The idempotency service. Never fails: every error is a problem response.
#[derive(Clone)]
pub struct Idempotency {
    shared: Arc<Shared>,
}

impl Idempotency {
    pub fn new(store: Store, settings: Settings, routing: SharedRouting) -> Self {
        Idempotency {
            shared: Arc::new(Shared {
                store,
                settings,
                reconciler: Reconciler::new(),
                lives: Arc::default(),
                routing,
            }),
        }
    }
}

/// What the flow calls upstream (the route's [`super::Upstream`]).
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

impl<B> Service<Request<B>> for Idempotency
where
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
        let shared = self.shared.clone();
        let req = req.map(|b| b.map_err(Into::into).boxed());
        Box::pin(async move {
            let started = Instant::now();
            let method = req.method().clone();
            let metrics = shared.settings.metrics.clone();
            let routing = shared.routing.load_full();
            let handled = flow::handle(shared, &routing, req).await;
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
