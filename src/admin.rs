//! The admin listener: health, readiness, metrics, inspecting or purging one
//! HTTP idempotency record (`/v1/keys`), and the consumer dedup API
//! (`/v1/dedup/...`, see [`crate::dedup::api`]).

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use http_body_util::BodyExt;

use crate::config::{DedupConfig, Policies};
use crate::dedup::DedupApi;
use crate::error::{full, json, Problem};
use crate::idempotency::key::{parse_key, RecordKey};
use crate::idempotency::state::State;
use crate::metrics::Metrics;
use crate::metrics::StoreOp;
use crate::store::Store;
use crate::Body;

/// How long `/readyz` waits for the store before calling it unready.
const READY_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Clone)]
pub struct Admin {
    store: Store,
    metrics: Metrics,
    policies: Policies,
    dedup: DedupApi,
}

impl Admin {
    pub fn new(store: Store, metrics: Metrics, policies: Policies, dedup: DedupConfig) -> Self {
        Admin {
            dedup: DedupApi::new(store.clone(), dedup, metrics.clone()),
            store,
            metrics,
            policies,
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
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/healthz") => text(StatusCode::OK, "text/plain", "ok\n".into()),
            (&Method::GET, "/readyz") => self.ready().await,
            (&Method::GET, "/metrics") => text(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.metrics.render(),
            ),
            (&Method::GET, "/v1/keys") => self.key(query, false).await,
            (&Method::DELETE, "/v1/keys") => self.key(query, true).await,
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
            Ok(Ok(())) => return text(StatusCode::OK, "text/plain", "ready\n".into()),
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

    /// `GET`/`DELETE /v1/keys?key=K&scope=S&method=M&path=P`.
    async fn key(&self, query: &str, delete: bool) -> Response<Body> {
        let record_key = match self.record_key(query) {
            Ok(k) => k,
            Err(detail) => {
                return Problem::new(
                    StatusCode::BAD_REQUEST,
                    "bad-request",
                    "Bad request",
                    &detail,
                )
                .into_response()
            }
        };
        let unavailable = |e: crate::store::StoreError| Problem::from(&e).into_response();
        let not_found = || {
            Problem::new(
                StatusCode::NOT_FOUND,
                "not-found",
                "Not found",
                "no record for that key",
            )
            .into_response()
        };
        if delete {
            return match self
                .store
                .observe(StoreOp::Purge, |b| b.purge(&record_key))
                .await
            {
                Ok(true) => {
                    let mut resp = Response::new(full(Bytes::new()));
                    *resp.status_mut() = StatusCode::NO_CONTENT;
                    resp
                }
                Ok(false) => not_found(),
                Err(e) => unavailable(e),
            };
        }
        let found = match self
            .store
            .observe(StoreOp::Get, |b| b.get(&record_key))
            .await
        {
            Ok(f) => f,
            Err(e) => return unavailable(e),
        };
        let expires_in_ms = found.expires_in.map(|d| d.as_millis() as u64);
        let doc = match found.state {
            State::Absent => return not_found(),
            State::InFlight { lease, .. } => serde_json::json!({
                "record": record_key.to_hex(),
                "state": "in_flight",
                "fence": lease.fence,
                "expires_in_ms": expires_in_ms,
            }),
            State::Completed(rec) => serde_json::json!({
                "record": record_key.to_hex(),
                "state": "completed",
                "status": rec.response.status.as_u16(),
                "created_unix_ms": rec.created_unix_ms,
                "expires_in_ms": expires_in_ms,
                "body_bytes": rec.response.body.len(),
                "body_omitted": rec.response.body_omitted,
            }),
        };
        json(StatusCode::OK, &doc)
    }

    /// Derives the record key exactly as the proxy does for that request.
    fn record_key(&self, query: &str) -> Result<RecordKey, String> {
        let mut key = None;
        let mut path = None;
        let mut method = Method::POST;
        let mut scopes = Vec::new();
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            match &*k {
                "key" => key = Some(v.into_owned()),
                "path" => path = Some(v.into_owned()),
                "scope" => scopes.push(v.into_owned()),
                "method" => {
                    method = Method::from_bytes(v.to_ascii_uppercase().as_bytes())
                        .map_err(|_| format!("method: {v:?} is not an HTTP method"))?
                }
                other => return Err(format!("unknown parameter {other:?}")),
            }
        }
        let key = key.ok_or("the key parameter is required")?;
        let path = path.ok_or("the path parameter is required")?;
        if !path.starts_with('/') {
            return Err(format!("path: {path:?} must start with '/'"));
        }
        let policy = self.policies.for_path(&path);
        let key =
            parse_key(key.as_bytes(), policy.max_key_length).map_err(|e| format!("key: {e}"))?;
        if scopes.len() > policy.scope_headers.len() {
            return Err(format!(
                "scope: {} values given, but this path is scoped by {} header(s)",
                scopes.len(),
                policy.scope_headers.len()
            ));
        }
        let mut headers = HeaderMap::new();
        for (name, value) in policy.scope_headers.iter().zip(&scopes) {
            let value = HeaderValue::from_str(value)
                .map_err(|_| format!("scope: {value:?} is not a valid header value"))?;
            headers.insert::<HeaderName>(name.clone(), value);
        }
        Ok(RecordKey::derive(
            &headers,
            &policy.scope_headers,
            &method,
            &path,
            &key,
        ))
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut resp = Response::new(full(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}
