//! `/v1/keys?key=K&scope=S&method=M&path=P`: one HTTP idempotency record,
//! named as the proxy names it. `GET` shows it; `DELETE` purges it (an
//! unknown outcome released: the next request runs); `PUT` with a
//! settlement document (see [`crate::idempotency::settlement`]) settles an
//! unknown outcome as completed, for an operator who checked the upstream's
//! books.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode};

use super::Admin;
use crate::body::full;
use crate::body::{read_limited, Read};
use crate::config::Policy;
use crate::error::{json, Problem};
use crate::idempotency::key::{parse_key, RecordKey};
use crate::idempotency::record::CompletedRecord;
use crate::idempotency::settlement;
use crate::idempotency::state::{Resolution, State};
use crate::metrics::StoreOp;
use crate::store::StoreError;
use crate::Body;

/// Largest settlement an operator may PUT.
const MAX_SETTLEMENT: u64 = 16 << 20;

fn not_found() -> Response<Body> {
    Problem::new(
        StatusCode::NOT_FOUND,
        "not-found",
        "Not found",
        "no record for that key",
    )
    .into_response()
}

fn unavailable(e: StoreError) -> Response<Body> {
    Problem::from(&e).into_response()
}

fn bad_request(detail: impl Into<String>) -> Response<Body> {
    Problem::new(
        StatusCode::BAD_REQUEST,
        "bad-request",
        "Bad request",
        detail,
    )
    .into_response()
}

impl Admin {
    pub(super) async fn keys(&self, method: &Method, query: &str, body: Body) -> Response<Body> {
        let (record_key, policy) = match self.record_key(query) {
            Ok(k) => k,
            Err(detail) => return bad_request(detail),
        };
        let found = match self
            .store
            .observe(StoreOp::Get, |b| b.get(&record_key))
            .await
        {
            Ok(f) => f,
            Err(e) => return unavailable(e),
        };
        match *method {
            Method::DELETE => self.purge(&record_key, &found.state).await,
            Method::PUT => self.settle(&record_key, &policy, &found.state, body).await,
            _ => {
                let expires_in_ms = found.expires_in.map(|d| d.as_millis() as u64);
                match describe(&record_key, found.state, expires_in_ms) {
                    Some(doc) => json(StatusCode::OK, &doc),
                    None => not_found(),
                }
            }
        }
    }

    async fn purge(&self, record_key: &RecordKey, state: &State) -> Response<Body> {
        match self
            .store
            .observe(StoreOp::Purge, |b| b.purge(record_key))
            .await
        {
            Ok(true) => {
                if let State::Unknown(u) = state {
                    self.metrics
                        .unknown_outcome(u.cause.label(), "settled_by_admin");
                    tracing::warn!(record = %record_key.to_hex(), fence = u.fence, "unknown outcome released by an operator");
                }
                let mut resp = Response::new(full(Bytes::new()));
                *resp.status_mut() = StatusCode::NO_CONTENT;
                resp
            }
            Ok(false) => not_found(),
            Err(e) => unavailable(e),
        }
    }

    async fn settle(
        &self,
        record_key: &RecordKey,
        policy: &Policy,
        state: &State,
        body: Body,
    ) -> Response<Body> {
        let bytes = match read_limited(body, MAX_SETTLEMENT).await {
            Ok(Read::Whole(b, _)) => b,
            Ok(Read::Overflow) => {
                return Problem::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body-too-large",
                    "Request body too large",
                    format!("a settlement is at most {MAX_SETTLEMENT} bytes"),
                )
                .into_response()
            }
            Err(e) => return bad_request(format!("the body could not be read: {e}")),
        };
        let response = match settlement::parse(&bytes) {
            Ok(r) => r,
            Err(e) => {
                return Problem::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid-field",
                    "Invalid field",
                    e.to_string(),
                )
                .field(e.field)
                .into_response()
            }
        };
        let unknown = match state {
            State::Unknown(u) => *u,
            State::Absent => return not_found(),
            _ => {
                return Problem::new(
                    StatusCode::CONFLICT,
                    "not-unknown",
                    "Outcome not unknown",
                    "only a record whose outcome is unknown can be settled; this one is in flight or completed",
                )
                .into_response()
            }
        };
        let record = Arc::new(CompletedRecord {
            origin: None,
            fingerprint: unknown.fingerprint,
            created_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            response,
        });
        let resolution = Resolution::Completed(record, policy.record_ttl);
        match self
            .store
            .observe(StoreOp::Resolve, |b| {
                b.resolve(record_key, unknown.fence, resolution)
            })
            .await
        {
            Ok(true) => {
                self.metrics
                    .unknown_outcome(unknown.cause.label(), "settled_by_admin");
                tracing::warn!(record = %record_key.to_hex(), fence = unknown.fence, "unknown outcome settled as completed by an operator");
                json(
                    StatusCode::OK,
                    &serde_json::json!({"record": record_key.to_hex(), "state": "completed"}),
                )
            }
            Ok(false) => Problem::new(
                StatusCode::CONFLICT,
                "not-unknown",
                "Outcome not unknown",
                "the record changed meanwhile; look again",
            )
            .into_response(),
            Err(e) => unavailable(e),
        }
    }

    /// Derives the record key exactly as the proxy does for that request.
    fn record_key(&self, query: &str) -> Result<(RecordKey, Arc<Policy>), String> {
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
        let policies = self.policies.load_full();
        let policy = policies.for_path(&path);
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
        let record_key = RecordKey::derive(&headers, &policy.scope_headers, &method, &path, &key);
        Ok((record_key, policy.clone()))
    }
}

/// A record as `GET /v1/keys` shows it; `None` if there is none.
fn describe(
    record_key: &RecordKey,
    state: State,
    expires_in_ms: Option<u64>,
) -> Option<serde_json::Value> {
    Some(match state {
        State::Absent => return None,
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
        State::Unknown(u) => serde_json::json!({
            "record": record_key.to_hex(),
            "state": "unknown",
            "fence": u.fence,
            "cause": u.cause.encode(),
            "since_unix_ms": u.since_unix_ms,
            "expires_in_ms": expires_in_ms,
        }),
    })
}
