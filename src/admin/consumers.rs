//! `POST /v1/consumers/{name}/redrive`: a consumer's dead letters sent back
//! to its source with the same key, their records reset. The body names
//! one key (`{"key": "..."}`) or asks for every one (`{"all": true}`); on
//! RabbitMQ it also names the queue holding the dead letters
//! (`"queue"`). The answer lists the keys sent back.

use http::{Method, Response, StatusCode};
use serde_json::{json, Value};

use super::Admin;
use crate::body::{read_limited, Read};
use crate::deliver::RedriveError;
use crate::error::{json as json_response, Problem};
use crate::Body;

/// A redrive request is a few names.
const MAX_BODY: u64 = 64 << 10;

fn invalid(field: &str, detail: impl Into<String>) -> Response<Body> {
    Problem::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid-field",
        "Invalid field",
        detail,
    )
    .field(field)
    .into_response()
}

impl Admin {
    pub(super) async fn consumers(
        &self,
        method: &Method,
        rest: &str,
        body: Body,
    ) -> Response<Body> {
        let Some(name) = rest.strip_suffix("/redrive").filter(|n| !n.contains('/')) else {
            return Problem::new(
                StatusCode::NOT_FOUND,
                "not-found",
                "Not found",
                "no such admin endpoint (POST /v1/consumers/{name}/redrive)",
            )
            .into_response();
        };
        if method != Method::POST {
            return Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
                "redrive takes POST",
            )
            .into_response();
        }
        let bytes = match read_limited(body, MAX_BODY).await {
            Ok(Read::Whole(b, _)) => b,
            Ok(Read::Overflow) => {
                return Problem::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body-too-large",
                    "Request body too large",
                    format!("a redrive request is at most {MAX_BODY} bytes"),
                )
                .into_response()
            }
            Err(e) => return invalid("body", format!("the body could not be read: {e}")),
        };
        let doc: Value = match serde_json::from_slice(&bytes) {
            Ok(Value::Object(m)) => Value::Object(m),
            Ok(_) | Err(_) => {
                return Problem::new(
                    StatusCode::BAD_REQUEST,
                    "invalid-json",
                    "Invalid JSON",
                    "the body must be a JSON object: {\"key\": \"...\"} or {\"all\": true}",
                )
                .into_response()
            }
        };
        for k in doc.as_object().into_iter().flat_map(|m| m.keys()) {
            if !matches!(k.as_str(), "key" | "all" | "queue") {
                return invalid(k, format!("{k:?} is not a field (key, all, queue)"));
            }
        }
        let key = match doc.get("key") {
            None => None,
            Some(Value::String(k)) if !k.is_empty() => Some(k.as_str()),
            Some(_) => return invalid("key", "must be a non-empty string"),
        };
        let all = match doc.get("all") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return invalid("all", "must be true or false"),
        };
        if key.is_some() == all {
            return invalid("key", "give one key, or \"all\": true");
        }
        let queue = match doc.get("queue") {
            None => None,
            Some(Value::String(q)) if !q.is_empty() => Some(q.as_str()),
            Some(_) => return invalid("queue", "must be a non-empty string"),
        };
        match self.consumers.redrive(name, key, queue).await {
            None => Problem::new(
                StatusCode::NOT_FOUND,
                "not-found",
                "Not found",
                format!("no consumer is named {name:?}"),
            )
            .into_response(),
            Some(Ok(done)) => json_response(
                StatusCode::OK,
                &json!({"redriven": done.keys.len(), "keys": done.keys, "more": done.more}),
            ),
            Some(Err(RedriveError::Invalid(field, why))) => invalid(field, why),
            Some(Err(RedriveError::Unavailable(why))) => Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "Broker or store unavailable",
                format!("the redrive stopped: {why}; the keys it sent back before are in the source again, call again for the rest"),
            )
            .retry_after(1)
            .into_response(),
        }
    }
}
