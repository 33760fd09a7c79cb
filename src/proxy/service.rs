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
use crate::telemetry;
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
        let mut req = req.map(|b| b.map_err(Into::into).boxed());
        let span = if telemetry::on() {
            Self::server_span(&shared, &mut req)
        } else {
            None
        };
        Box::pin(Self::served(shared, req, hold, span))
    }
}

impl Idempotency {
    /// One request, start to end, counted and logged; with traces on, in
    /// its server span, which notes how it ended.
    async fn served(
        shared: Arc<Shared>,
        req: Request<Body>,
        hold: Option<Hold>,
        span: Option<tracing::Span>,
    ) -> Result<Response<Body>, Infallible> {
        use tracing::Instrument;
        let started = Instant::now();
        let method = req.method().clone();
        let grpc = is_grpc(req.headers());
        let metrics = shared.settings.metrics.clone();
        let handled = match &span {
            Some(span) => {
                Self::handle(shared, req, hold)
                    .instrument(span.clone())
                    .await
            }
            None => Self::handle(shared, req, hold).await,
        };
        let elapsed = started.elapsed();
        metrics.request(handled.outcome, elapsed);
        let (outcome, record) = (handled.outcome, handled.record);
        let response = handled.into_response(grpc);
        let status = response.status().as_u16();
        let _in = span.as_ref().map(|span| {
            span.record("http.response.status_code", status);
            span.record("idemgate.outcome", outcome.as_str());
            span.record("idemgate.replayed", outcome == Outcome::Replayed);
            if let Some(k) = &record {
                span.record("idemgate.record", k.to_hex());
            }
            if status >= 500 {
                span.record("otel.status_code", "ERROR");
            }
            span.enter()
        });
        tracing::debug!(
            %method,
            record = record.map(|k| k.to_hex()),
            outcome = outcome.as_str(),
            status,
            elapsed_ms = elapsed.as_secs_f64() * 1e3,
            "request"
        );
        Ok(response)
    }

    /// The server span of a sampled request: its parent the client's
    /// `traceparent`, its name the method and the route's pattern (never
    /// a raw path), its ids in every log line of the request. A request
    /// not sampled gets no span at all (so it costs nothing more), only a
    /// `traceparent` that carries the decision on.
    fn server_span(shared: &Shared, req: &mut Request<Body>) -> Option<tracing::Span> {
        use tracing::field::Empty;
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let parent = telemetry::extract(req.headers());
        if !telemetry::sampled(&parent) {
            let tp = telemetry::unsampled_traceparent(&parent);
            req.headers_mut().insert("traceparent", tp);
            return None;
        }
        let method = req.method();
        let route = {
            let routing = shared.routing.load();
            let p = &routing.policies;
            p.find(req.uri().path())
                .map(|i| p.routes[i].pattern.as_str().to_owned())
        };
        let name = match &route {
            Some(r) => format!("{method} {r}"),
            None => method.to_string(),
        };
        let span = tracing::info_span!(
            "request",
            otel.name = name,
            otel.kind = "server",
            http.request.method = %method,
            http.route = route,
            http.response.status_code = Empty,
            idemgate.outcome = Empty,
            idemgate.record = Empty,
            idemgate.replayed = Empty,
            idemgate.fence = Empty,
            otel.status_code = Empty,
            trace_id = Empty,
            span_id = Empty,
        );
        let _ = span.set_parent(parent);
        if let Some((trace, id)) = telemetry::ids(&span.context()) {
            span.record("trace_id", tracing::field::display(trace));
            span.record("span_id", tracing::field::display(id));
        }
        Some(span)
    }
}
