//! Typed errors, and the one place they become HTTP responses.
//!
//! Every error idemgate itself answers with, on the proxy and the admin
//! listener alike, is a [`Problem`]: an RFC 9457 document
//! (`application/problem+json` with `type`, `title`, `status`, `detail`).

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::BodyExt;

use crate::idempotency::key::KeyError;
use crate::idempotency::state::{Unknown, UnknownCause};
use crate::metrics::Outcome;
use crate::store::StoreError;
use crate::webhook::SignatureError;
use crate::Body;

/// Where problem `type` URIs live; the last segment names the problem.
pub const PROBLEM_BASE: &str = "https://idemgate.dev/problems/";

/// Why the upstream call failed, by whether the request could have reached
/// the application.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// Nothing was sent: no connection could be made.
    #[error("upstream unreachable: {0}")]
    Unreachable(String),
    /// The request was (maybe partly) sent; no answer in time.
    #[error("upstream did not answer within {0:?}")]
    Timeout(Duration),
    /// The request was (maybe partly) sent, then the connection failed.
    #[error("upstream connection failed after the request was sent: {0}")]
    Failed(String),
    /// The answer began, then broke off.
    #[error("upstream response broke off: {0}")]
    Broken(String),
}

impl UpstreamError {
    /// Why the request may have run, or `None` if it cannot have.
    pub fn unknown_cause(&self) -> Option<UnknownCause> {
        match self {
            UpstreamError::Unreachable(_) => None,
            UpstreamError::Timeout(_) => Some(UnknownCause::Timeout),
            UpstreamError::Failed(_) | UpstreamError::Broken(_) => Some(UnknownCause::Reset),
        }
    }
}

/// Everything the proxy can refuse or fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    /// What the route needs (e.g. "the idempotency-key header").
    #[error("this route requires {0}")]
    MissingKey(String),
    /// `place`: where the route takes its key from.
    #[error("invalid key in {place}: {reason}")]
    InvalidKey { place: String, reason: KeyError },
    #[error("webhook signature refused: {0}; nothing was stored or forwarded")]
    InvalidSignature(SignatureError),
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
    #[error("an earlier request with this key was forwarded and may have been processed (cause: {}); idemgate will not run it again until the upstream or an operator settles it", .0.cause.encode())]
    OutcomeUnknown(Unknown),
    #[error("this caller creates new keys faster than new_keys_per_scope allows; retry in {0:?}")]
    TooManyKeys(Duration),
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
            InvalidSignature(_) => (
                StatusCode::UNAUTHORIZED,
                "invalid-signature",
                "Invalid webhook signature",
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
            OutcomeUnknown(_) => (
                StatusCode::CONFLICT,
                "outcome-unknown",
                "Outcome of an earlier attempt unknown",
            ),
            TooManyKeys(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "too-many-keys",
                "Too many new keys",
            ),
            Store(_) => STORE_UNAVAILABLE,
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

    /// The problem document for this error.
    pub fn problem(&self) -> Problem {
        if let ProxyError::Store(e) = self {
            return Problem::from(e);
        }
        let (status, slug, title) = self.parts();
        let problem = Problem::new(status, slug, title, self.to_string());
        // Conflicts clear as soon as the original finishes: tell clients
        // when to come back.
        match self {
            ProxyError::InProgress => problem.retry_after(1),
            ProxyError::TooManyKeys(wait) => {
                problem.retry_after(u32::try_from(wait.as_secs() + 1).unwrap_or(u32::MAX))
            }
            _ => problem,
        }
    }

    /// The problem response for this error.
    pub fn to_response(&self) -> Response<Body> {
        self.problem().into_response()
    }

    /// How a request that failed with this error ended, for the metrics.
    pub fn outcome(&self) -> Outcome {
        match self {
            ProxyError::MissingKey(_) => Outcome::MissingKey,
            ProxyError::InvalidKey { .. } => Outcome::InvalidKey,
            ProxyError::InvalidSignature(_) => Outcome::InvalidSignature,
            ProxyError::BodyTooLarge(_) => Outcome::TooLarge,
            ProxyError::BadBody(_) | ProxyError::BodyTimeout(_) => Outcome::ClientError,
            ProxyError::KeyReused => Outcome::Mismatch,
            ProxyError::InProgress => Outcome::Conflict,
            ProxyError::OutcomeUnknown(_) => Outcome::OutcomeUnknown,
            ProxyError::TooManyKeys(_) => Outcome::TooManyKeys,
            ProxyError::Store(_) => Outcome::StoreUnavailable,
            ProxyError::Upstream(_) => Outcome::UpstreamError,
        }
    }
}

/// An RFC 9457 problem document: every error idemgate answers with, on
/// every listener, becomes a response here and only here.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub status: StatusCode,
    /// The last segment of the `type` URI.
    pub slug: &'static str,
    pub title: &'static str,
    pub detail: String,
    /// The request field at fault (dedup API), as a `field` member.
    pub field: Option<String>,
    /// Seconds for `Retry-After`.
    pub retry_after: Option<u32>,
}

impl Problem {
    pub fn new(
        status: StatusCode,
        slug: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Problem {
            status,
            slug,
            title,
            detail: detail.into(),
            field: None,
            retry_after: None,
        }
    }

    pub fn field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    pub fn retry_after(mut self, seconds: u32) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// The JSON document.
    pub fn doc(&self) -> serde_json::Value {
        let mut doc = serde_json::json!({
            "type": format!("{PROBLEM_BASE}{}", self.slug),
            "title": self.title,
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        if let Some(f) = &self.field {
            doc["field"] = serde_json::json!(f);
        }
        doc
    }

    pub fn into_response(self) -> Response<Body> {
        let mut resp = json(self.status, &self.doc());
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(s) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

/// A store that failed is 503 with `Retry-After` on every listener: outages
/// are usually short, and the caller must not treat the key as new.
/// Status, slug and title of a store failure, on every listener.
const STORE_UNAVAILABLE: (StatusCode, &str, &str) = (
    StatusCode::SERVICE_UNAVAILABLE,
    "store-unavailable",
    "Idempotency store unavailable",
);

impl From<&StoreError> for Problem {
    fn from(e: &StoreError) -> Self {
        let (status, slug, title) = STORE_UNAVAILABLE;
        Problem::new(status, slug, title, e.to_string()).retry_after(1)
    }
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

/// An error with its sources, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}
