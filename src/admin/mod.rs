//! The admin listener: health, readiness, metrics, one HTTP idempotency
//! record (`/v1/keys`, see [`keys`]), and the consumer dedup API
//! (`/v1/dedup/...`, see [`crate::dedup`]), dead letters sent back to a
//! consumer's source (`/v1/consumers/...`, see [`consumers`]); who may call
//! which is `auth`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::body::full;
use crate::config::{AdminTokens, DedupConfig, Policies};
use crate::dedup::DedupApi;
use crate::deliver::Consumers;
use crate::error::Problem;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::Body;

mod auth;
mod consumers;
mod keys;

use auth::{Access, Auth};

/// How long `/readyz` waits for the store before calling it unready.
const READY_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Clone)]
pub struct Admin {
    store: Store,
    metrics: Metrics,
    /// Replaced by a reload, as the proxy's are.
    policies: Arc<ArcSwap<Policies>>,
    dedup: DedupApi,
    consumers: Consumers,
    auth: Auth,
}

impl Admin {
    pub fn new(
        store: Store,
        metrics: Metrics,
        policies: Arc<ArcSwap<Policies>>,
        dedup: DedupConfig,
        tokens: &AdminTokens,
        consumers: Consumers,
    ) -> Self {
        Admin {
            consumers,
            dedup: DedupApi::new(store.clone(), dedup, metrics.clone()),
            store,
            metrics,
            policies,
            auth: Auth::new(tokens),
        }
    }

    /// A hyper service over this admin.
    pub fn service(
        &self,
    ) -> impl hyper::service::Service<
        Request<Incoming>,
        Response = Response<Body>,
        Error = Infallible,
        Future: Send,
    > + Clone
           + Send
           + 'static {
        let admin = self.clone();
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let admin = admin.clone();
            let req = req.map(|b| b.map_err(Into::into).boxed());
            async move { Ok::<_, Infallible>(admin.handle(req).await) }
        })
    }

    pub async fn handle(&self, req: Request<Body>) -> Response<Body> {
        let access = Access::of(req.method(), req.uri().path(), self.auth.metrics_public);
        if let Err(refused) = self.auth.check(access, req.headers()) {
            return refused.into_response();
        }
        let query = req.uri().query().unwrap_or("").to_owned();
        let query = query.as_str();
        if let Some(rest) = req.uri().path().strip_prefix("/v1/dedup/") {
            let rest = rest.to_owned();
            let method = req.method().clone();
            return self
                .dedup
                .handle(&method, &rest, query, req.into_body())
                .await;
        }
        if let Some(rest) = req.uri().path().strip_prefix("/v1/consumers/") {
            let rest = rest.to_owned();
            let method = req.method().clone();
            return self.consumers(&method, &rest, req.into_body()).await;
        }
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/healthz") => text(StatusCode::OK, "text/plain", "ok\n".into()),
            (&Method::GET, "/readyz") => self.ready().await,
            (&Method::GET, "/metrics") => {
                // Read at scrape time: no counting on the request path.
                if let Some(bytes) = self.store.local_bytes() {
                    self.metrics.store_bytes.set(bytes as i64);
                }
                text(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    self.metrics.render(),
                )
            }
            (&Method::GET | &Method::DELETE | &Method::PUT, "/v1/keys") => {
                let method = req.method().clone();
                self.keys(&method, query, req.into_body()).await
            }
            (_, "/healthz" | "/readyz" | "/metrics" | "/v1/keys") => Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
                "this endpoint does not take that method",
            )
            .into_response(),
            _ => Problem::new(
                StatusCode::NOT_FOUND,
                "not-found",
                "Not found",
                "no such admin endpoint",
            )
            .into_response(),
        }
    }

    async fn ready(&self) -> Response<Body> {
        let detail = match tokio::time::timeout(READY_TIMEOUT, self.store.ping()).await {
            Ok(Ok(())) => match self.disconnected_consumers() {
                None => return text(StatusCode::OK, "text/plain", "ready\n".into()),
                Some(names) => format!("consumer {names} cannot read its broker"),
            },
            Ok(Err(e)) => e.to_string(),
            Err(_) => "the store did not answer in time".to_owned(),
        };
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not-ready",
            "Not ready",
            &detail,
        )
        .into_response()
    }
}

impl Admin {
    /// The consumers (delivery mode) whose broker does not answer, as the
    /// `idemgate_consumer_connected` gauge says; `None` when every one does.
    fn disconnected_consumers(&self) -> Option<String> {
        use prometheus::core::Collector;
        let down: Vec<String> = self
            .metrics
            .consumer_connected
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .filter(|m| m.get_gauge().get_value() < 1.0)
            .filter_map(|m| {
                m.get_label()
                    .iter()
                    .find(|l| l.name() == "consumer")
                    .map(|l| l.value().to_owned())
            })
            .collect();
        (!down.is_empty()).then(|| down.join(", "))
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut resp = Response::new(full(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}
