//! The idempotency service: [`Idempotency`] takes the current routing
//! snapshot (policies and upstream clients, see [`super::routing`]), runs a
//! request through the intake (`intake`) and, when it is covered, the
//! settling loop (`flow`), and counts how it ended.
//!
//! [`Idempotency::covered`] is the covered path without the intake, for an
//! intake of another kind that builds its request in code.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body as HttpBody;
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::Service;

use super::context::{refuse, Covered, Handled, Settings, Shared};
use super::flow::{pass_through, settle};
use super::intake::{take, Intake};
use super::live::Lives;
use super::reconcile::Reconciler;
use super::routing::SharedRouting;
use crate::store::Store;
use crate::{Body, BoxError};

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
                lives: Arc::new(Lives::default()),
                routing,
            }),
        }
    }

    /// Runs a covered request through the settling loop, as the proxy does
    /// once its intake has found the key: begin, then run, replay, wait
    /// (joining a live response of this process), reconcile or refuse. Not
    /// counted in `idemgate_requests_total`: the caller counts its own.
    pub async fn covered(&self, covered: Covered) -> Handled {
        settle(&self.shared, covered).await
    }

    /// One proxied request, start to end.
    async fn handle(shared: Arc<Shared>, req: Request<Body>) -> Handled {
        let routing = shared.routing.load_full();
        match take(&shared, &routing, req).await {
            Intake::Covered(covered) => settle(&shared, covered).await,
            Intake::PassThrough(upstream, parts, body) => {
                pass_through(&shared, upstream, parts, body).await
            }
            Intake::Refused(e) => refuse(e),
        }
    }
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
            let handled = Self::handle(shared, req).await;
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
