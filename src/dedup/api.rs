//! The consumer dedup HTTP/JSON API (SPEC §4), served on the admin listener
//! under `/v1/dedup/{scope}/...`.
//!
//! Bodies are JSON objects read field by field, so every refusal names its
//! field: malformed JSON is 400 `invalid-json`; a missing, unknown or
//! out-of-range field is 422 `invalid-field` with a `field` member. A store
//! that does not answer is 503, never "treat as new".

use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Response, StatusCode};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::state::{ClaimOutcome, ClaimParams, DedupRecord, ReleaseOutcome};
use super::{ClaimItem, CompleteItem, Cursor, DedupStore, Ttls};
use crate::config::DedupConfig;
use crate::error::{full, json, PROBLEM_BASE};
use crate::idempotency::key::hex;
use crate::metrics::Metrics;
use crate::proxy::body::{read_limited, Read};
use crate::store::{AnyStore, StoreError};
use crate::Body;

/// Longest scope name, and the characters it may use.
const MAX_SCOPE: usize = 128;
const MAX_TEXT: usize = 4096;
const MAX_LEASE_MS: u64 = 7 * 24 * 3600 * 1000;
const MAX_RETENTION_MS: u64 = 366 * 24 * 3600 * 1000;

/// The dedup API over a store.
#[derive(Clone)]
pub struct DedupApi {
    store: AnyStore,
    config: DedupConfig,
    metrics: Metrics,
}

/// Why a call was refused.
#[derive(Debug)]
enum ApiError {
    /// 400: the body is not a JSON object.
    Json(String),
    /// 422 naming the field.
    Field(String, String),
    /// 404, 405, 413 and the like.
    Status(StatusCode, &'static str, String),
    Store(StoreError),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::Store(e)
    }
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::Json(_) => StatusCode::BAD_REQUEST,
            ApiError::Field(..) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Status(s, ..) => *s,
            ApiError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn doc(&self) -> Value {
        let (slug, title, detail, field) = match self {
            ApiError::Json(d) => ("invalid-json", "Invalid JSON body", d.clone(), None),
            ApiError::Field(f, d) => (
                "invalid-field",
                "Invalid field",
                format!("{f}: {d}"),
                Some(f.clone()),
            ),
            ApiError::Status(_, slug, d) => (*slug, "Request refused", d.clone(), None),
            ApiError::Store(e) => (
                "store-unavailable",
                "Dedup store unavailable",
                e.to_string(),
                None,
            ),
        };
        let mut doc = json!({
            "type": format!("{PROBLEM_BASE}{slug}"),
            "title": title,
            "status": self.status().as_u16(),
            "detail": detail,
        });
        if let Some(f) = field {
            doc["field"] = json!(f);
        }
        doc
    }

    fn metric_result(&self) -> &'static str {
        match self {
            ApiError::Store(_) => "unavailable",
            _ => "bad_request",
        }
    }

    fn into_response(self) -> Response<Body> {
        let mut resp = json(self.status(), &self.doc());
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if matches!(self, ApiError::Store(_)) {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

/// An answer: status and JSON document (or no body for 204).
struct Answer {
    status: StatusCode,
    doc: Option<Value>,
    /// `Retry-After` seconds, for 409 in progress.
    retry_after: Option<u64>,
    /// The `result` label of `idemgate_dedup_operations_total`.
    result: &'static str,
    /// The document is an RFC 9457 problem.
    problem: bool,
}

impl Answer {
    fn new(status: StatusCode, result: &'static str, doc: Value) -> Self {
        Answer {
            status,
            doc: Some(doc),
            retry_after: None,
            result,
            problem: false,
        }
    }
}

/// A request body's fields, taken one by one; whatever is left is unknown.
struct Fields {
    map: Map<String, Value>,
}

impl Fields {
    fn parse(body: &[u8]) -> Result<Self, ApiError> {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(map)) => Ok(Fields { map }),
            Ok(_) => Err(ApiError::Json("the body must be a JSON object".into())),
            Err(e) => Err(ApiError::Json(e.to_string())),
        }
    }

    fn from_value(v: Value) -> Result<Self, ApiError> {
        match v {
            Value::Object(map) => Ok(Fields { map }),
            _ => Err(ApiError::Field(
                "items".into(),
                "each item must be a JSON object".into(),
            )),
        }
    }

    fn take(&mut self, name: &str) -> Option<Value> {
        self.map.remove(name).filter(|v| !v.is_null())
    }

    fn string(&mut self, name: &'static str, max: usize) -> Result<Option<String>, ApiError> {
        let bad = |msg: String| Err(ApiError::Field(name.into(), msg));
        match self.take(name) {
            None => Ok(None),
            Some(Value::String(s)) if s.is_empty() => bad("must not be empty".into()),
            Some(Value::String(s)) if s.len() > max => bad(format!(
                "is {} bytes long; at most {max} are allowed",
                s.len()
            )),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => bad(format!("must be a string, not {}", kind(&other))),
        }
    }

    fn required(&mut self, name: &'static str, max: usize) -> Result<String, ApiError> {
        self.string(name, max)?
            .ok_or_else(|| ApiError::Field(name.into(), "is required".into()))
    }

    fn uint(&mut self, name: &'static str, min: u64, max: u64) -> Result<Option<u64>, ApiError> {
        let bad = |msg: String| Err(ApiError::Field(name.into(), msg));
        match self.take(name) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(v) if (min..=max).contains(&v) => Ok(Some(v)),
                _ => bad(format!("{n} is out of range ({min} to {max})")),
            },
            Some(other) => bad(format!("must be a whole number, not {}", kind(&other))),
        }
    }

    /// The key: `key`, or the SHA-256 (lowercase hex) of `content_b64`.
    fn key(&mut self, max: usize) -> Result<String, ApiError> {
        let key = self.string("key", max)?;
        let content = match self.take("content_b64") {
            None => None,
            Some(Value::String(s)) => Some(s),
            Some(other) => {
                return Err(ApiError::Field(
                    "content_b64".into(),
                    format!("must be a base64 string, not {}", kind(&other)),
                ))
            }
        };
        match (key, content) {
            (Some(k), None) => Ok(k),
            (None, Some(c)) => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(c.trim())
                    .map_err(|e| {
                        ApiError::Field("content_b64".into(), format!("is not valid base64: {e}"))
                    })?;
                Ok(hex(&Sha256::digest(&bytes)))
            }
            (Some(_), Some(_)) => Err(ApiError::Field(
                "content_b64".into(),
                "give key or content_b64, not both".into(),
            )),
            (None, None) => Err(ApiError::Field(
                "key".into(),
                "is required (or content_b64)".into(),
            )),
        }
    }

    /// Refuses any field not taken.
    fn done(self) -> Result<(), ApiError> {
        match self.map.keys().next() {
            Some(unknown) => {
                // The name is the client's; keep only a printable prefix.
                let shown: String = unknown.chars().take(64).collect();
                Err(ApiError::Field(shown, "is not a field of this call".into()))
            }
            None => Ok(()),
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Percent-decodes one path segment.
fn decode_segment(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let h = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn valid_scope(scope: &str) -> bool {
    !scope.is_empty()
        && scope.len() <= MAX_SCOPE
        && scope
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'))
}

impl DedupApi {
    pub fn new(store: AnyStore, config: DedupConfig, metrics: Metrics) -> Self {
        DedupApi {
            store,
            config,
            metrics,
        }
    }

    fn ttls(&self) -> Ttls {
        Ttls {
            retention: self.config.retention,
            failed_retention: self.config.failed_retention,
        }
    }

    /// Serves `/v1/dedup/{rest}`.
    pub async fn handle(
        &self,
        method: &Method,
        rest: &str,
        query: &str,
        body: Body,
    ) -> Response<Body> {
        let (op, outcome) = self.route(method, rest, query, body).await;
        match outcome {
            Ok(answer) => {
                self.metrics
                    .dedup_operations
                    .with_label_values(&[op, answer.result])
                    .inc();
                let mut resp = match &answer.doc {
                    Some(doc) if answer.problem => {
                        let mut r = json(answer.status, doc);
                        r.headers_mut().insert(
                            header::CONTENT_TYPE,
                            HeaderValue::from_static("application/problem+json"),
                        );
                        r
                    }
                    Some(doc) => json(answer.status, doc),
                    None => {
                        let mut r = Response::new(full(Bytes::new()));
                        *r.status_mut() = answer.status;
                        r
                    }
                };
                if let Some(secs) = answer.retry_after {
                    resp.headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
                }
                resp
            }
            Err(e) => {
                self.metrics
                    .dedup_operations
                    .with_label_values(&[op, e.metric_result()])
                    .inc();
                if let ApiError::Store(err) = &e {
                    tracing::warn!(op, error = %err, "dedup store call failed");
                }
                e.into_response()
            }
        }
    }

    async fn route(
        &self,
        method: &Method,
        rest: &str,
        query: &str,
        body: Body,
    ) -> (&'static str, Result<Answer, ApiError>) {
        let segments: Vec<&str> = rest.split('/').collect();
        let Some(scope) = segments.first().and_then(|s| decode_segment(s)) else {
            return (
                "unknown",
                Err(ApiError::Status(
                    StatusCode::NOT_FOUND,
                    "not-found",
                    "no such dedup endpoint".into(),
                )),
            );
        };
        if !valid_scope(&scope) {
            let detail =
                format!("scope must be 1 to {MAX_SCOPE} characters of A-Z a-z 0-9 . _ - :");
            return (
                "unknown",
                Err(ApiError::Status(
                    StatusCode::NOT_FOUND,
                    "invalid-scope",
                    detail,
                )),
            );
        }
        let post = method == Method::POST;
        let op: &'static str = match (&segments[1..], method) {
            (["mark"], _) if post => "mark",
            (["claim"], _) if post => "claim",
            (["extend"], _) if post => "extend",
            (["complete"], _) if post => "complete",
            (["release"], _) if post => "release",
            (["mark:batch"], _) if post => "mark_batch",
            (["claim:batch"], _) if post => "claim_batch",
            (["complete:batch"], _) if post => "complete_batch",
            (["failed"], &Method::GET) => "failed_list",
            (["failed"], &Method::DELETE) => "failed_purge",
            (["keys", _], &Method::GET) => "get",
            (["keys", _], &Method::DELETE) => "delete",
            (["keys", _, "reset"], _) if post => "reset",
            (
                ["mark" | "claim" | "extend" | "complete" | "release" | "mark:batch" | "claim:batch"
                | "complete:batch"],
                _,
            )
            | (["failed"], _)
            | (["keys", _], _)
            | (["keys", _, "reset"], _) => {
                let e = ApiError::Status(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method-not-allowed",
                    "this endpoint does not take that method".into(),
                );
                return ("unknown", Err(e));
            }
            _ => {
                return (
                    "unknown",
                    Err(ApiError::Status(
                        StatusCode::NOT_FOUND,
                        "not-found",
                        "no such dedup endpoint".into(),
                    )),
                );
            }
        };
        let path_key = || {
            segments
                .get(2)
                .and_then(|k| decode_segment(k))
                .filter(|k| !k.is_empty() && k.len() <= self.config.max_key_length)
                .ok_or_else(|| {
                    ApiError::Status(
                        StatusCode::NOT_FOUND,
                        "not-found",
                        "the key in the path is empty, too long or badly encoded".into(),
                    )
                })
        };
        let result = match op {
            "failed_list" => self.failed_list(&scope, query).await,
            "failed_purge" => self.failed_purge(&scope).await,
            "get" => match path_key() {
                Ok(k) => self.get(&scope, &k).await,
                Err(e) => Err(e),
            },
            "delete" => match path_key() {
                Ok(k) => self.delete(&scope, &k).await,
                Err(e) => Err(e),
            },
            "reset" => match path_key() {
                Ok(k) => self.reset(&scope, &k).await,
                Err(e) => Err(e),
            },
            _ => match self.read(body).await {
                Ok(bytes) => self.post(op, &scope, &bytes).await,
                Err(e) => Err(e),
            },
        };
        (op, result)
    }

    async fn read(&self, body: Body) -> Result<Bytes, ApiError> {
        let limit = self.config.max_request_body;
        match read_limited(body, limit).await {
            Ok(Read::Whole(b)) => Ok(b),
            Ok(Read::Overflow(..)) => Err(ApiError::Status(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body-too-large",
                format!("the body is larger than {limit} bytes"),
            )),
            Err(e) => Err(ApiError::Json(format!("the body could not be read: {e}"))),
        }
    }

    async fn post(&self, op: &'static str, scope: &str, body: &[u8]) -> Result<Answer, ApiError> {
        let mut f = Fields::parse(body)?;
        match op {
            "mark" => {
                let (key, ttl) = self.mark_fields(&mut f)?;
                f.done()?;
                let new = self.store.mark(scope, &key, ttl).await?;
                Ok(mark_answer(new))
            }
            "claim" => {
                let item = self.claim_fields(&mut f)?;
                f.done()?;
                let out = self
                    .store
                    .claim(scope, &item.key, &item.params, self.ttls())
                    .await?;
                Ok(claim_answer(&item.key, out))
            }
            "extend" => {
                let key = f.key(self.config.max_key_length)?;
                let lease_id = f.required("lease_id", 64)?;
                let lease_ms = f
                    .uint("lease_ms", 1, MAX_LEASE_MS)?
                    .unwrap_or(self.config.lease_ttl.as_millis() as u64);
                f.done()?;
                Ok(
                    match self.store.extend(scope, &key, &lease_id, lease_ms).await? {
                        Some(ms) => Answer::new(
                            StatusCode::OK,
                            "ok",
                            json!({"status": "extended", "lease_expires_in_ms": ms}),
                        ),
                        None => lease_lost(),
                    },
                )
            }
            "complete" => {
                let item = self.complete_fields(&mut f)?;
                f.done()?;
                let done = self
                    .store
                    .complete(
                        scope,
                        &item.key,
                        &item.lease_id,
                        item.result,
                        item.retention,
                    )
                    .await?;
                Ok(complete_answer(done))
            }
            "release" => {
                let key = f.key(self.config.max_key_length)?;
                let lease_id = f.required("lease_id", 64)?;
                let outcome = match f.required("outcome", 16)?.as_str() {
                    "retry" => ReleaseOutcome::Retry,
                    "permanent" => ReleaseOutcome::Permanent,
                    other => {
                        return Err(ApiError::Field(
                            "outcome".into(),
                            format!("{other:?} is not \"retry\" or \"permanent\""),
                        ))
                    }
                };
                let error = f.string("error", MAX_TEXT)?;
                f.done()?;
                let released = self
                    .store
                    .release(scope, &key, &lease_id, outcome, error, self.ttls())
                    .await?;
                Ok(if released {
                    let how = if outcome == ReleaseOutcome::Retry {
                        "retry"
                    } else {
                        "permanent"
                    };
                    Answer::new(
                        StatusCode::OK,
                        "ok",
                        json!({"status": "released", "outcome": how}),
                    )
                } else {
                    lease_lost()
                })
            }
            "mark_batch" | "claim_batch" | "complete_batch" => self.batch(op, scope, f).await,
            _ => Err(ApiError::Status(
                StatusCode::NOT_FOUND,
                "not-found",
                "no such dedup endpoint".into(),
            )),
        }
    }

    fn mark_fields(&self, f: &mut Fields) -> Result<(String, Duration), ApiError> {
        let key = f.key(self.config.max_key_length)?;
        let ttl = f
            .uint("ttl_ms", 1, MAX_RETENTION_MS)?
            .map_or(self.config.retention, Duration::from_millis);
        Ok((key, ttl))
    }

    fn claim_fields(&self, f: &mut Fields) -> Result<ClaimItem, ApiError> {
        let key = f.key(self.config.max_key_length)?;
        let lease_ms = f
            .uint("lease_ms", 1, MAX_LEASE_MS)?
            .unwrap_or(self.config.lease_ttl.as_millis() as u64);
        let fingerprint = f.string("fingerprint", 256)?;
        let max_attempts = f
            .uint("max_attempts", 1, 1000)?
            .map_or(self.config.max_attempts, |n| n as u32);
        let worker = f.string("worker", 256)?;
        Ok(ClaimItem {
            key,
            params: ClaimParams {
                lease_ms,
                fingerprint,
                max_attempts,
                worker,
            },
        })
    }

    fn complete_fields(&self, f: &mut Fields) -> Result<CompleteItem, ApiError> {
        let key = f.key(self.config.max_key_length)?;
        let lease_id = f.required("lease_id", 64)?;
        let result = match f.take("result") {
            None => None,
            Some(v) => {
                let text = v.to_string();
                if text.len() as u64 > self.config.max_result_bytes {
                    return Err(ApiError::Field(
                        "result".into(),
                        format!(
                            "is {} bytes of JSON; at most {} are allowed",
                            text.len(),
                            self.config.max_result_bytes
                        ),
                    ));
                }
                Some(text)
            }
        };
        let retention = f
            .uint("retention_ms", 1, MAX_RETENTION_MS)?
            .map_or(self.config.retention, Duration::from_millis);
        Ok(CompleteItem {
            key,
            lease_id,
            result,
            retention,
        })
    }

    async fn batch(
        &self,
        op: &'static str,
        scope: &str,
        mut f: Fields,
    ) -> Result<Answer, ApiError> {
        let items = match f.take("items") {
            Some(Value::Array(items)) => items,
            Some(other) => {
                return Err(ApiError::Field(
                    "items".into(),
                    format!("must be an array, not {}", kind(&other)),
                ))
            }
            None => return Err(ApiError::Field("items".into(), "is required".into())),
        };
        f.done()?;
        if items.len() > self.config.max_batch {
            return Err(ApiError::Field(
                "items".into(),
                format!(
                    "holds {} items; at most {} are allowed",
                    items.len(),
                    self.config.max_batch
                ),
            ));
        }
        // Parse every item first; bad ones answer alone, good ones go to the
        // store together (one pipeline on Redis).
        let mut results: Vec<Option<Value>> = vec![None; items.len()];
        match op {
            "mark_batch" => {
                let (at, marks) = parse_batch(items, &mut results, |f| self.mark_fields(f));
                let answers = self.store.mark_batch(scope, &marks).await?;
                for (i, a) in at.into_iter().zip(answers) {
                    results[i] = Some(item_answer(a.map(mark_answer)));
                }
            }
            "claim_batch" => {
                let (at, claims) = parse_batch(items, &mut results, |f| self.claim_fields(f));
                let answers = self.store.claim_batch(scope, &claims, self.ttls()).await?;
                for ((i, item), a) in at.into_iter().zip(&claims).zip(answers) {
                    results[i] = Some(item_answer(a.map(|o| claim_answer(&item.key, o))));
                }
            }
            _ => {
                let (at, completes) = parse_batch(items, &mut results, |f| self.complete_fields(f));
                let answers = self.store.complete_batch(scope, &completes).await?;
                for (i, a) in at.into_iter().zip(answers) {
                    results[i] = Some(item_answer(a.map(complete_answer)));
                }
            }
        }
        let results: Vec<Value> = results
            .into_iter()
            .map(|r| r.unwrap_or(Value::Null))
            .collect();
        Ok(Answer::new(
            StatusCode::OK,
            "ok",
            json!({ "results": results }),
        ))
    }

    async fn get(&self, scope: &str, key: &str) -> Result<Answer, ApiError> {
        let Some(found) = self.store.inspect(scope, key).await? else {
            return Err(ApiError::Status(
                StatusCode::NOT_FOUND,
                "not-found",
                "no record for that key".into(),
            ));
        };
        let mut doc = json!({
            "key": key,
            "state": found.record.state_name(),
            "expires_in_ms": found.expires_in.map(|d| d.as_millis() as u64),
        });
        match found.record {
            DedupRecord::Leased {
                fence,
                attempt,
                lease_until_ms,
                worker,
                ..
            } => {
                doc["fence"] = json!(fence);
                doc["attempt"] = json!(attempt);
                doc["lease_expires_in_ms"] = json!(lease_until_ms.saturating_sub(found.now_ms));
                doc["worker"] = json!(worker);
            }
            DedupRecord::Pending {
                attempts, error, ..
            } => {
                doc["attempts"] = json!(attempts);
                doc["error"] = json!(error);
            }
            DedupRecord::Completed {
                result,
                completed_at_ms,
                attempts,
                ..
            } => {
                doc["result"] = parse_result(result);
                doc["completed_at_ms"] = json!(completed_at_ms);
                doc["attempts"] = json!(attempts);
            }
            DedupRecord::Failed {
                error,
                attempts,
                failed_at_ms,
                ..
            } => {
                doc["error"] = json!(error);
                doc["attempts"] = json!(attempts);
                doc["failed_at_ms"] = json!(failed_at_ms);
            }
            DedupRecord::Marked { marked_at_ms } => doc["marked_at_ms"] = json!(marked_at_ms),
        }
        Ok(Answer::new(StatusCode::OK, "ok", doc))
    }

    async fn delete(&self, scope: &str, key: &str) -> Result<Answer, ApiError> {
        if self.store.delete(scope, key).await? {
            Ok(Answer {
                doc: None,
                ..Answer::new(StatusCode::NO_CONTENT, "ok", Value::Null)
            })
        } else {
            Err(ApiError::Status(
                StatusCode::NOT_FOUND,
                "not-found",
                "no record for that key".into(),
            ))
        }
    }

    async fn reset(&self, scope: &str, key: &str) -> Result<Answer, ApiError> {
        let previous = self
            .store
            .inspect(scope, key)
            .await?
            .map(|f| f.record.state_name());
        self.store.delete(scope, key).await?;
        Ok(Answer::new(
            StatusCode::OK,
            "ok",
            json!({"status": "reset", "key": key, "previous": previous.unwrap_or("absent")}),
        ))
    }

    async fn failed_list(&self, scope: &str, query: &str) -> Result<Answer, ApiError> {
        let mut limit = 100usize;
        let mut after = None;
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            match &*k {
                "limit" => {
                    limit =
                        v.parse()
                            .ok()
                            .filter(|n| (1..=1000).contains(n))
                            .ok_or(ApiError::Field(
                                "limit".into(),
                                format!("{v:?} is not a number from 1 to 1000"),
                            ))?
                }
                "after" => {
                    after = Some(Cursor::decode(&v).ok_or(ApiError::Field(
                        "after".into(),
                        "is not a cursor from a previous page".into(),
                    ))?)
                }
                _ => {
                    return Err(ApiError::Field(
                        "query".into(),
                        format!(
                            "unknown parameter {:?}",
                            k.chars().take(64).collect::<String>()
                        ),
                    ))
                }
            }
        }
        let (items, next) = self.store.list_failed(scope, limit, after).await?;
        let items: Vec<Value> = items
            .into_iter()
            .map(|i| json!({"key": i.key, "attempts": i.attempts, "error": i.error, "failed_at_ms": i.failed_at_ms}))
            .collect();
        Ok(Answer::new(
            StatusCode::OK,
            "ok",
            json!({"items": items, "next": next.map(|c| c.encode())}),
        ))
    }

    async fn failed_purge(&self, scope: &str) -> Result<Answer, ApiError> {
        let purged = self.store.purge_failed(scope).await?;
        Ok(Answer::new(
            StatusCode::OK,
            "ok",
            json!({ "purged": purged }),
        ))
    }
}

fn parse_result(result: Option<String>) -> Value {
    result
        .and_then(|r| serde_json::from_str(&r).ok())
        .unwrap_or(Value::Null)
}

fn lease_lost() -> Answer {
    Answer::new(
        StatusCode::CONFLICT,
        "lease_lost",
        json!({"status": "lease_lost"}),
    )
}

fn mark_answer(new: bool) -> Answer {
    if new {
        Answer::new(StatusCode::CREATED, "new", json!({"status": "new"}))
    } else {
        Answer::new(StatusCode::OK, "duplicate", json!({"status": "duplicate"}))
    }
}

fn complete_answer(done: bool) -> Answer {
    if done {
        Answer::new(StatusCode::OK, "ok", json!({"status": "completed"}))
    } else {
        lease_lost()
    }
}

fn claim_answer(key: &str, out: ClaimOutcome) -> Answer {
    match out {
        ClaimOutcome::Acquired {
            lease_id,
            fence,
            attempt,
            lease_expires_in_ms,
            recovered,
        } => Answer::new(
            StatusCode::CREATED,
            "acquired",
            json!({
                "status": "acquired",
                "key": key,
                "lease_id": lease_id,
                "fence": fence,
                "attempt": attempt,
                "lease_expires_in_ms": lease_expires_in_ms,
                "recovered": recovered,
            }),
        ),
        ClaimOutcome::Completed {
            result,
            completed_at_ms,
        } => Answer::new(
            StatusCode::OK,
            "completed",
            json!({"status": "completed", "key": key, "result": parse_result(result), "completed_at_ms": completed_at_ms}),
        ),
        ClaimOutcome::Failed { error, attempts } => Answer::new(
            StatusCode::OK,
            "failed",
            json!({"status": "failed", "key": key, "error": error, "attempts": attempts}),
        ),
        ClaimOutcome::InProgress { retry_after_ms } => Answer {
            retry_after: Some(retry_after_ms.div_ceil(1000).max(1)),
            ..Answer::new(
                StatusCode::CONFLICT,
                "in_progress",
                json!({"status": "in_progress", "key": key, "retry_after_ms": retry_after_ms}),
            )
        },
        ClaimOutcome::Mismatch => {
            let e = ApiError::Status(
                StatusCode::UNPROCESSABLE_ENTITY,
                "fingerprint-mismatch",
                "this key was claimed with a different fingerprint".into(),
            );
            Answer {
                problem: true,
                ..Answer::new(StatusCode::UNPROCESSABLE_ENTITY, "mismatch", e.doc())
            }
        }
    }
}

/// Parses batch items; a bad item's error goes straight into `results`.
/// Returns the good items and their positions.
fn parse_batch<T>(
    items: Vec<Value>,
    results: &mut [Option<Value>],
    parse: impl Fn(&mut Fields) -> Result<T, ApiError>,
) -> (Vec<usize>, Vec<T>) {
    let mut at = Vec::new();
    let mut good = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let parsed = Fields::from_value(item).and_then(|mut f| {
            let v = parse(&mut f)?;
            f.done()?;
            Ok(v)
        });
        match parsed {
            Ok(v) => {
                at.push(i);
                good.push(v);
            }
            Err(e) => results[i] = Some(item_error(&e)),
        }
    }
    (at, good)
}

/// One batch item's answer: its document plus the status it would have had.
fn item_answer(a: Result<Answer, StoreError>) -> Value {
    match a {
        Ok(a) => {
            let mut doc = a.doc.unwrap_or_else(|| json!({}));
            doc["code"] = json!(a.status.as_u16());
            doc
        }
        Err(e) => item_error(&ApiError::Store(e)),
    }
}

fn item_error(e: &ApiError) -> Value {
    let mut doc = e.doc();
    doc["code"] = json!(e.status().as_u16());
    doc
}
