//! Asking the upstream whether a request whose outcome is unknown ran
//! (`on_unknown_outcome = "reconcile"`).
//!
//! `GET reconcile_url` with `{key}` filled in, the original key header, the
//! fence of the attempt that may have run, and the caller's scope headers.
//! `200` with a settlement document (see
//! [`crate::idempotency::settlement`]): it ran, and this was its answer.
//! `404`: it did not run. Anything else, or no answer within
//! `reconcile_timeout`: still unknown.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::headers::IDEMPOTENCY_FENCE;
use crate::config::Policy;
use crate::idempotency::record::StoredResponse;
use crate::idempotency::settlement;
use crate::telemetry;

/// What the upstream said.
pub(super) enum Answer {
    /// It ran; this was its response.
    Found(Box<StoredResponse>),
    /// It did not run.
    Missing,
    /// No usable answer: why.
    Failed(String),
}

/// A small pooled client for reconcile questions; cheap to clone.
#[derive(Clone)]
pub(super) struct Reconciler {
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl Reconciler {
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        Reconciler {
            client: Client::builder(TokioExecutor::new())
                .timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(connector),
        }
    }

    /// Asks about `key` (its original header value `raw_key`) whose attempt
    /// with `fence` may have run. `request` holds the caller's headers (for
    /// the scope headers).
    pub async fn ask(
        &self,
        policy: &Policy,
        key: &str,
        raw_key: &HeaderValue,
        fence: u64,
        request: &HeaderMap,
    ) -> Answer {
        let Some(url) = &policy.reconcile_url else {
            return Answer::Failed("no reconcile_url".into());
        };
        let mut req = Request::new(Empty::new());
        *req.method_mut() = Method::GET;
        match url.for_key(key).parse() {
            Ok(uri) => *req.uri_mut() = uri,
            Err(e) => return Answer::Failed(format!("reconcile URL: {e}")),
        }
        let headers = req.headers_mut();
        headers.insert(policy.key_from.header(), raw_key.clone());
        headers.insert(IDEMPOTENCY_FENCE, HeaderValue::from(fence));
        for name in &policy.scope_headers {
            for v in request.get_all(name) {
                headers.append(name.clone(), v.clone());
            }
        }
        // With traces on: a client span of its own, whose context the
        // reconcile endpoint gets.
        let span = telemetry::in_sampled_request().then(|| {
            use tracing_opentelemetry::OpenTelemetrySpanExt;
            let span = tracing::debug_span!(
                "reconcile",
                otel.name = "GET reconcile",
                otel.kind = "client",
                http.request.method = "GET",
                server.address = req.uri().host().unwrap_or(""),
                server.port = req.uri().port_u16().unwrap_or(80),
                http.response.status_code = tracing::field::Empty,
                idemgate.fence = fence,
            );
            telemetry::inject(&span.context(), req.headers_mut());
            span
        });
        let span = span.unwrap_or_else(tracing::Span::none);
        // A settlement carries the body, base64 at worst: bound what is read.
        let limit = (policy.max_response_body as usize).saturating_mul(2) + (64 << 10);
        let noted = span.clone();
        let asked = async {
            let resp = self.client.request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            noted.record("http.response.status_code", status.as_u16());
            let body = Limited::new(resp.into_body(), limit)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((status, body))
        };
        let asked = tracing::Instrument::instrument(asked, span);
        match tokio::time::timeout(policy.reconcile_timeout, asked).await {
            Err(_) => Answer::Failed(format!("no answer within {:?}", policy.reconcile_timeout)),
            Ok(Err(e)) => Answer::Failed(e),
            Ok(Ok((StatusCode::OK, body))) => match settlement::parse(&body) {
                Ok(found) => Answer::Found(Box::new(found)),
                Err(e) => Answer::Failed(format!("unreadable answer: {e}")),
            },
            Ok(Ok((StatusCode::NOT_FOUND, _))) => Answer::Missing,
            Ok(Ok((status, _))) => Answer::Failed(format!("answered {status}")),
        }
    }
}
