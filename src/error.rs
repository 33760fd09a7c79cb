//! Typed errors, and the one place they become HTTP statuses.
//!
//! Every error idemgate itself answers with is an RFC 9457 problem document
//! (`application/problem+json` with `type`, `title`, `status`, `detail`).

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::BodyExt;

use crate::idempotency::key::KeyError;
use crate::store::StoreError;
use crate::Body;

/// Where problem `type` URIs live; the last segment names the problem.
pub const PROBLEM_BASE: &str = "https://idemgate.dev/problems/";

/// Why the upstream call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream unreachable: {0}")]
    Unreachable(String),
    #[error("upstream did not answer within {0:?}")]
    Timeout(Duration),
    #[error("upstream response broke off: {0}")]
    Broken(String),
}

/// Everything the proxy can refuse or fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    #[error("this route requires the {0} header")]
    MissingKey(String),
    #[error("invalid {header} header: {reason}")]
    InvalidKey { header: String, reason: KeyError },
    #[error("the request body is larger than {0} bytes")]
    BodyTooLarge(u64),
    #[error("the request body could not be read: {0}")]
    BadBody(String),
    #[error("the request body was not received within {0:?}")]
    BodyTimeout(Duration),
    #[error("this key was used with a different request (method, path, query, body or fingerprinted headers differ)")]
    KeyReused,
    #[error("a request with this key is still in progress; retry later")]
    InProgress,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

impl ProxyError {
    /// The status, problem slug and title this error is answered with.
    pub fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        use ProxyError::*;
        match self {
            MissingKey(_) => (
                StatusCode::BAD_REQUEST,
                "missing-key",
                "Idempotency key required",
            ),
            InvalidKey { .. } => (
                StatusCode::BAD_REQUEST,
                "invalid-key",
                "Invalid idempotency key",
            ),
            BodyTooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "body-too-large",
                "Request body too large",
            ),
            BadBody(_) => (
                StatusCode::BAD_REQUEST,
                "bad-body",
                "Request body unreadable",
            ),
            BodyTimeout(_) => (
                StatusCode::REQUEST_TIMEOUT,
                "body-timeout",
                "Request body too slow",
            ),
            KeyReused => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "key-reused",
                "Idempotency key reused",
            ),
            InProgress => (
                StatusCode::CONFLICT,
                "request-in-progress",
                "Request in progress",
            ),
            Store(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "store-unavailable",
                "Idempotency store unavailable",
            ),
            Upstream(UpstreamError::Timeout(_)) => (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream-timeout",
                "Upstream timed out",
            ),
            Upstream(_) => (
                StatusCode::BAD_GATEWAY,
                "upstream-unreachable",
                "Upstream unreachable",
            ),
        }
    }

    /// The problem response for this error.
    pub fn to_response(&self) -> Response<Body> {
        let (status, slug, title) = self.parts();
        let mut resp = problem(status, slug, title, &self.to_string());
        // Conflicts clear as soon as the original finishes; store outages are
        // usually short. Tell clients when to come back either way.
        if matches!(self, ProxyError::InProgress | ProxyError::Store(_)) {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

/// An RFC 9457 problem response.
pub fn problem(status: StatusCode, slug: &str, title: &str, detail: &str) -> Response<Body> {
    let doc = serde_json::json!({
        "type": format!("{PROBLEM_BASE}{slug}"),
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
    });
    let mut resp = json(status, &doc);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    resp
}

/// A JSON response.
pub fn json(status: StatusCode, doc: &serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(full(Bytes::from(doc.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// A complete body.
pub fn full(bytes: Bytes) -> Body {
    http_body_util::Full::new(bytes)
        .map_err(|never| match never {})
        .boxed()
}
