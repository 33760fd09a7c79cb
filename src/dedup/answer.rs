//! What the dedup API answers: [`Answer`] documents, [`ApiError`] refusals
//! (problems through [`crate::error::Problem`], the one path to a problem
//! response), and the answer of each store outcome.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use serde_json::{json, Value};

use crate::body::full;
use crate::error::{json, Problem};
use crate::idempotency::dedup::ClaimOutcome;
use crate::store::StoreError;
use crate::Body;

/// Why a call was refused.
#[derive(Debug)]
pub(super) enum ApiError {
    /// 400: the body is not a JSON object.
    Json(String),
    /// 422 naming the field.
    Field(String, String),
    /// 404, 405, 413 and the like.
    Status(StatusCode, &'static str, String),
    /// The call names a lease that is not (or no longer) current: answered
    /// as `409 {"status":"lease_lost"}`, like a lease the store refused.
    LeaseLost,
    Store(StoreError),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::Store(e)
    }
}

impl ApiError {
    fn problem(&self) -> Problem {
        match self {
            ApiError::Json(d) => Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid-json",
                "Invalid JSON body",
                d.clone(),
            ),
            ApiError::Field(f, d) => Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid-field",
                "Invalid field",
                format!("{f}: {d}"),
            )
            .field(f.clone()),
            ApiError::Status(status, slug, d) => {
                Problem::new(*status, slug, "Request refused", d.clone())
            }
            ApiError::LeaseLost => unreachable_lease_lost(),
            ApiError::Store(e) => Problem::from(e),
        }
    }

    pub fn metric_result(&self) -> &'static str {
        match self {
            ApiError::Store(_) => "unavailable",
            ApiError::LeaseLost => "lease_lost",
            _ => "bad_request",
        }
    }

    /// The answer: a lost lease is an ordinary answer, the rest problems.
    pub fn into_answer(self) -> Answer {
        match self {
            ApiError::LeaseLost => lease_lost(),
            e => {
                let p = e.problem();
                Answer {
                    retry_after: p.retry_after.map(u64::from),
                    problem: true,
                    ..Answer::new(p.status, e.metric_result(), p.doc())
                }
            }
        }
    }
}

/// [`ApiError::LeaseLost`] never becomes a problem: [`ApiError::into_answer`]
/// answers it first.
fn unreachable_lease_lost() -> Problem {
    Problem::new(
        StatusCode::CONFLICT,
        "lease-lost",
        "Lease lost",
        "the lease is not current",
    )
}

/// An answer: status and JSON document (or no body for 204).
pub(super) struct Answer {
    pub status: StatusCode,
    pub doc: Option<Value>,
    /// `Retry-After` seconds, for 409 in progress and 503.
    pub retry_after: Option<u64>,
    /// The `result` label of `idemgate_dedup_operations_total`.
    pub result: &'static str,
    /// The document is an RFC 9457 problem.
    pub problem: bool,
}

impl Answer {
    pub fn new(status: StatusCode, result: &'static str, doc: Value) -> Self {
        Answer {
            status,
            doc: Some(doc),
            retry_after: None,
            result,
            problem: false,
        }
    }

    /// A 204.
    pub fn empty() -> Self {
        Answer {
            doc: None,
            ..Answer::new(StatusCode::NO_CONTENT, "ok", Value::Null)
        }
    }

    pub fn into_response(self) -> Response<Body> {
        let mut resp = match &self.doc {
            Some(doc) => json(self.status, doc),
            None => {
                let mut r = Response::new(full(Bytes::new()));
                *r.status_mut() = self.status;
                r
            }
        };
        if self.problem {
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/problem+json"),
            );
        }
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

pub(super) fn parse_result(result: Option<String>) -> Value {
    result
        .and_then(|r| serde_json::from_str(&r).ok())
        .unwrap_or(Value::Null)
}

pub(super) fn lease_lost() -> Answer {
    Answer::new(
        StatusCode::CONFLICT,
        "lease_lost",
        json!({"status": "lease_lost"}),
    )
}

pub(super) fn mark_answer(new: bool) -> Answer {
    if new {
        Answer::new(StatusCode::CREATED, "new", json!({"status": "new"}))
    } else {
        Answer::new(StatusCode::OK, "duplicate", json!({"status": "duplicate"}))
    }
}

pub(super) fn complete_answer(done: bool) -> Answer {
    if done {
        Answer::new(StatusCode::OK, "ok", json!({"status": "completed"}))
    } else {
        lease_lost()
    }
}

pub(super) fn claim_answer(key: &str, out: ClaimOutcome) -> Answer {
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
                "lease_id": lease_id.to_string(),
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
        ClaimOutcome::Mismatch => Answer {
            result: "mismatch",
            ..ApiError::Status(
                StatusCode::UNPROCESSABLE_ENTITY,
                "fingerprint-mismatch",
                "this key was claimed with a different fingerprint".into(),
            )
            .into_answer()
        },
    }
}

/// One batch item's answer: its document plus the status it would have had.
pub(super) fn item_answer(a: Result<Answer, StoreError>) -> Value {
    match a {
        Ok(a) => {
            let mut doc = a.doc.unwrap_or_else(|| json!({}));
            doc["code"] = json!(a.status.as_u16());
            doc
        }
        Err(e) => item_error(ApiError::Store(e)),
    }
}

/// One batch item's refusal, as its answer document.
pub(super) fn item_error(e: ApiError) -> Value {
    item_answer(Ok(e.into_answer()))
}
