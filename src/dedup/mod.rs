//! Consumer dedup: turning at-least-once delivery into effectively-once
//! processing (SPEC §4). The HTTP/JSON API, served on the admin listener
//! under `/v1/dedup/{scope}/...`; the rules are pure
//! ([`crate::idempotency::dedup`]) and the records live in the store
//! ([`crate::store::DedupStore`]).
//!
//! Bodies are JSON objects read field by field ([`fields`]), so every
//! refusal names its field: malformed JSON is 400 `invalid-json`; a missing,
//! unknown or out-of-range field is 422 `invalid-field` with a `field`
//! member. A store that does not answer is 503, never "treat as new"
//! ([`answer`]).

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use serde_json::{json, Value};

mod answer;
mod fields;

use answer::{
    claim_answer, complete_answer, item_answer, lease_lost, mark_answer, parse_result, Answer,
    ApiError,
};
use fields::{decode_segment, kind, parse_batch, valid_scope, Fields, MAX_SCOPE};

use crate::body::{read_limited, Read};
use crate::config::DedupConfig;
use crate::idempotency::dedup::{ClaimParams, DedupRecord, ReleaseOutcome};
use crate::metrics::Metrics;
use crate::store::{ClaimItem, CompleteItem, Cursor, Store, Ttls};
use crate::Body;

const MAX_TEXT: usize = 4096;
const MAX_LEASE_MS: u64 = 7 * 24 * 3600 * 1000;
const MAX_RETENTION_MS: u64 = 366 * 24 * 3600 * 1000;

/// The dedup API over a store.
#[derive(Clone)]
pub struct DedupApi {
    store: Store,
    config: DedupConfig,
    metrics: Metrics,
}

/// One operation of the API: what a path and method name, and the `op`
/// label of `idemgate_dedup_operations_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Mark,
    Claim,
    Extend,
    Complete,
    Release,
    MarkBatch,
    ClaimBatch,
    CompleteBatch,
    FailedList,
    FailedPurge,
    Get,
    Delete,
    Reset,
}

impl Op {
    /// The operation a path (after the scope) and method name; 404 or 405.
    fn of(path: &[&str], method: &Method) -> Result<Op, ApiError> {
        let by_path: &[(Method, Op)] = match path {
            ["mark"] => &[(Method::POST, Op::Mark)],
            ["claim"] => &[(Method::POST, Op::Claim)],
            ["extend"] => &[(Method::POST, Op::Extend)],
            ["complete"] => &[(Method::POST, Op::Complete)],
            ["release"] => &[(Method::POST, Op::Release)],
            ["mark:batch"] => &[(Method::POST, Op::MarkBatch)],
            ["claim:batch"] => &[(Method::POST, Op::ClaimBatch)],
            ["complete:batch"] => &[(Method::POST, Op::CompleteBatch)],
            ["failed"] => &[
                (Method::GET, Op::FailedList),
                (Method::DELETE, Op::FailedPurge),
            ],
            ["keys", _] => &[(Method::GET, Op::Get), (Method::DELETE, Op::Delete)],
            ["keys", _, "reset"] => &[(Method::POST, Op::Reset)],
            _ => return Err(not_found("no such dedup endpoint")),
        };
        by_path
            .iter()
            .find(|(m, _)| m == method)
            .map(|(_, op)| *op)
            .ok_or_else(|| {
                ApiError::Status(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method-not-allowed",
                    "this endpoint does not take that method".into(),
                )
            })
    }

    fn label(self) -> &'static str {
        match self {
            Op::Mark => "mark",
            Op::Claim => "claim",
            Op::Extend => "extend",
            Op::Complete => "complete",
            Op::Release => "release",
            Op::MarkBatch => "mark_batch",
            Op::ClaimBatch => "claim_batch",
            Op::CompleteBatch => "complete_batch",
            Op::FailedList => "failed_list",
            Op::FailedPurge => "failed_purge",
            Op::Get => "get",
            Op::Delete => "delete",
            Op::Reset => "reset",
        }
    }
}

fn not_found(detail: &str) -> ApiError {
    ApiError::Status(StatusCode::NOT_FOUND, "not-found", detail.into())
}

impl DedupApi {
    pub fn new(store: Store, config: DedupConfig, metrics: Metrics) -> Self {
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
        let label = op.map_or("unknown", Op::label);
        let answer = outcome.unwrap_or_else(|e| {
            if let ApiError::Store(err) = &e {
                tracing::warn!(op = label, error = %err, "dedup store call failed");
            }
            e.into_answer()
        });
        self.metrics
            .dedup_operations
            .with_label_values(&[label, answer.result])
            .inc();
        answer.into_response()
    }

    async fn route(
        &self,
        method: &Method,
        rest: &str,
        query: &str,
        body: Body,
    ) -> (Option<Op>, Result<Answer, ApiError>) {
        let segments: Vec<&str> = rest.split('/').collect();
        let Some(scope) = segments.first().and_then(|s| decode_segment(s)) else {
            return (None, Err(not_found("no such dedup endpoint")));
        };
        if !valid_scope(&scope) {
            let detail =
                format!("scope must be 1 to {MAX_SCOPE} characters of A-Z a-z 0-9 . _ - :");
            let e = ApiError::Status(StatusCode::NOT_FOUND, "invalid-scope", detail);
            return (None, Err(e));
        }
        let op = match Op::of(&segments[1..], method) {
            Ok(op) => op,
            Err(e) => return (None, Err(e)),
        };
        let path_key = || {
            segments
                .get(2)
                .and_then(|k| decode_segment(k))
                .filter(|k| !k.is_empty() && k.len() <= self.config.max_key_length)
                .ok_or_else(|| not_found("the key in the path is empty, too long or badly encoded"))
        };
        let result = match op {
            Op::FailedList => self.failed_list(&scope, query).await,
            Op::FailedPurge => self.failed_purge(&scope).await,
            Op::Get => match path_key() {
                Ok(k) => self.get(&scope, &k).await,
                Err(e) => Err(e),
            },
            Op::Delete => match path_key() {
                Ok(k) => self.delete(&scope, &k).await,
                Err(e) => Err(e),
            },
            Op::Reset => match path_key() {
                Ok(k) => self.reset(&scope, &k).await,
                Err(e) => Err(e),
            },
            _ => match self.read(body).await {
                Ok(bytes) => self.post(op, &scope, &bytes).await,
                Err(e) => Err(e),
            },
        };
        (Some(op), result)
    }

    async fn read(&self, body: Body) -> Result<Bytes, ApiError> {
        let limit = self.config.max_request_body;
        match read_limited(body, limit).await {
            Ok(Read::Whole(b, _)) => Ok(b),
            Ok(Read::Overflow) => Err(ApiError::Status(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body-too-large",
                format!("the body is larger than {limit} bytes"),
            )),
            Err(e) => Err(ApiError::Json(format!("the body could not be read: {e}"))),
        }
    }

    async fn post(&self, op: Op, scope: &str, body: &[u8]) -> Result<Answer, ApiError> {
        let mut f = Fields::parse(body)?;
        match op {
            Op::Mark => {
                let (key, ttl) = self.mark_fields(&mut f)?;
                f.done()?;
                let new = self.store.dedup()?.mark(scope, &key, ttl).await?;
                Ok(mark_answer(new))
            }
            Op::Claim => {
                let item = self.claim_fields(&mut f)?;
                f.done()?;
                let out = self
                    .store
                    .dedup()?
                    .claim(scope, &item.key, &item.params, self.ttls())
                    .await?;
                Ok(claim_answer(&item.key, out))
            }
            Op::Extend => {
                let key = f.key(self.config.max_key_length)?;
                let lease_id = f.lease_id()?;
                let lease_ms = f
                    .uint("lease_ms", 1, MAX_LEASE_MS)?
                    .unwrap_or(self.config.lease_ttl.as_millis() as u64);
                f.done()?;
                let lease_id = lease_id.ok_or(ApiError::LeaseLost)?;
                Ok(
                    match self
                        .store
                        .dedup()?
                        .extend(scope, &key, lease_id, lease_ms)
                        .await?
                    {
                        Some(ms) => Answer::new(
                            StatusCode::OK,
                            "ok",
                            json!({"status": "extended", "lease_expires_in_ms": ms}),
                        ),
                        None => lease_lost(),
                    },
                )
            }
            Op::Complete => {
                let item = self.complete_fields(&mut f)?;
                f.done()?;
                let done = self
                    .store
                    .dedup()?
                    .complete(scope, &item.key, item.lease_id, item.result, item.retention)
                    .await?;
                Ok(complete_answer(done))
            }
            Op::Release => {
                let key = f.key(self.config.max_key_length)?;
                let lease_id = f.lease_id()?;
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
                let lease_id = lease_id.ok_or(ApiError::LeaseLost)?;
                let released = self
                    .store
                    .dedup()?
                    .release(scope, &key, lease_id, outcome, error, self.ttls())
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
            Op::MarkBatch | Op::ClaimBatch | Op::CompleteBatch => self.batch(op, scope, f).await,
            _ => Err(not_found("no such dedup endpoint")),
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
        let lease_id = f.lease_id()?;
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
        // Every field is checked before a lease that names nothing answers.
        f.done()?;
        Ok(CompleteItem {
            key,
            lease_id: lease_id.ok_or(ApiError::LeaseLost)?,
            result,
            retention,
        })
    }

    async fn batch(&self, op: Op, scope: &str, mut f: Fields) -> Result<Answer, ApiError> {
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
            Op::MarkBatch => {
                let (at, marks) = parse_batch(items, &mut results, |f| self.mark_fields(f));
                let answers = self.store.dedup()?.mark_batch(scope, &marks).await?;
                for (i, a) in at.into_iter().zip(answers) {
                    results[i] = Some(item_answer(a.map(mark_answer)));
                }
            }
            Op::ClaimBatch => {
                let (at, claims) = parse_batch(items, &mut results, |f| self.claim_fields(f));
                let answers = self
                    .store
                    .dedup()?
                    .claim_batch(scope, &claims, self.ttls())
                    .await?;
                for ((i, item), a) in at.into_iter().zip(&claims).zip(answers) {
                    results[i] = Some(item_answer(a.map(|o| claim_answer(&item.key, o))));
                }
            }
            _ => {
                let (at, completes) = parse_batch(items, &mut results, |f| self.complete_fields(f));
                let answers = self
                    .store
                    .dedup()?
                    .complete_batch(scope, &completes)
                    .await?;
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
        let Some(found) = self.store.dedup()?.inspect(scope, key).await? else {
            return Err(not_found("no record for that key"));
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
        if self.store.dedup()?.delete(scope, key).await? {
            Ok(Answer::empty())
        } else {
            Err(not_found("no record for that key"))
        }
    }

    async fn reset(&self, scope: &str, key: &str) -> Result<Answer, ApiError> {
        let previous = self
            .store
            .dedup()?
            .inspect(scope, key)
            .await?
            .map(|f| f.record.state_name());
        self.store.dedup()?.delete(scope, key).await?;
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
        let (items, next) = self.store.dedup()?.list_failed(scope, limit, after).await?;
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
        let purged = self.store.dedup()?.purge_failed(scope).await?;
        Ok(Answer::new(
            StatusCode::OK,
            "ok",
            json!({ "purged": purged }),
        ))
    }
}
