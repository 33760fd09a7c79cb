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
use http::{header, Request, Response};
use http_body::Body as HttpBody;
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::Service;

use super::context::{refuse, Covered, Handled, Settings, Shared};
use super::flow::{pass_through, settle};
use super::grpc::is_grpc;
use super::intake::{take, Intake, Taken};
use super::live::Lives;
use super::reconcile::Reconciler;
use super::routing::SharedRouting;
use super::tunnel::{self, Hold};
use crate::error::ProxyError;
use crate::metrics::Outcome;
use crate::store::Store;
use crate::{Body, BoxError};

/// The idempotency service. Never fails: every error is a problem response
/// (or a gRPC status, for a gRPC client).
#[derive(Clone)]
pub struct Idempotency {
    shared: Arc<Shared>,
    /// What keeps this service's client connection counted: handed to a
    /// tunnel the connection becomes ([`Idempotency::holding`]).
    hold: Option<Hold>,
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
            hold: None,
        }
    }

    /// This service for one client connection, whose place under
    /// `max_connections` `hold` keeps: a tunnel the connection becomes
    /// holds it too, so it is counted until the tunnel closes.
    pub fn holding(&self, hold: Hold) -> Self {
        Idempotency {
            shared: self.shared.clone(),
            hold: Some(hold),
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
    async fn handle(shared: Arc<Shared>, req: Request<Body>, hold: Option<Hold>) -> Handled {
        let routing = shared.routing.load_full();
        let Taken { policy, intake } = take(&shared, &routing, req).await;
        match intake {
            Intake::Covered(covered) => settle(&shared, *covered).await,
            Intake::PassThrough(upstream, parts, body, deadline) => {
                pass_through(&shared, &policy, upstream, parts, body, deadline).await
            }
            Intake::Upgrade(upstream, parts, body) => {
                let tunnels = &shared.settings.tunnels;
                match tunnel::forward(tunnels, upstream, parts, body, hold).await {
                    Ok((resp, true)) => Handled::new(Outcome::Upgraded, resp),
                    Ok((resp, false)) => Handled::new(Outcome::PassThrough, resp),
                    Err(e) => refuse(ProxyError::Upstream(e), &policy),
                }
            }
            Intake::Refused(e) => refuse(e, &policy),
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
        // Only a request that may become a tunnel takes the hold along.
        let hold = if req.headers().contains_key(header::UPGRADE) {
            self.hold.clone()
        } else {
            None
        };
        let req = req.map(|b| b.map_err(Into::into).boxed());
        Box::pin(async move {
            let started = Instant::now();
            let method = req.method().clone();
            let grpc = is_grpc(req.headers());
            let metrics = shared.settings.metrics.clone();
            let handled = Self::handle(shared, req, hold).await;
            let elapsed = started.elapsed();
            metrics.request(handled.outcome, elapsed);
            let (outcome, record) = (handled.outcome, handled.record);
            let response = handled.into_response(grpc);
            tracing::debug!(
                %method,
                record = record.map(|k| k.to_hex()),
                outcome = outcome.as_str(),
                status = response.status().as_u16(),
                elapsed_ms = elapsed.as_secs_f64() * 1e3,
                "request"
            );
            Ok(response)
        })
    }
}
