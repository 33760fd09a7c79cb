//! Typed errors, and the one place they become HTTP responses.
//!
//! Every error idemgate itself answers with, on the proxy and the admin
//! listener alike, is a [`Problem`]: an RFC 9457 document
//! (`application/problem+json` with `type`, `title`, `status`, `detail`),
//! with `x-should-retry` saying whether the same request may succeed later.
//! A gRPC client gets the same refusal in its own shape instead
//! ([`Problem::into_grpc_response`]: a trailers-only response with
//! `grpc-status` and `grpc-message`).

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Response, StatusCode};

use crate::body::full;
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
    #[error("the grpc-timeout header {0:?} is malformed")]
    BadGrpcTimeout(String),
    #[error("an earlier request with this key was forwarded and may have been processed (cause: {}); idemgate will not run it again until the upstream or an operator settles it", .0.cause.encode())]
    OutcomeUnknown(Unknown),
    #[error("this caller creates new keys faster than new_keys_per_scope allows; retry in {0:?}")]
    TooManyKeys(Duration),
    /// The upstream answered; the store did not take the answer.
    #[error("the upstream answered, but its answer could not be stored ({0}); the outcome is held as unknown")]
    NotStored(String),
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
            BadGrpcTimeout(_) => (
                StatusCode::BAD_REQUEST,
                "invalid-grpc-timeout",
                "Invalid grpc-timeout",
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
            NotStored(_) => (
                StatusCode::BAD_GATEWAY,
                "response-not-stored",
                "Response not stored",
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
        let problem = Problem::new(status, slug, title, self.to_string())
            .should_retry(self.retry_helps())
            .grpc(self.grpc_code());
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

    /// Whether sending the same request again may get another answer: yes
    /// for what clears by itself (in progress, a store outage, a rate, a
    /// request that never reached the upstream, a body that broke off);
    /// no for what only an operator or a different request changes (an
    /// unknown outcome, a reused key, bad input, a refused signature).
    pub fn retry_helps(&self) -> bool {
        use ProxyError::*;
        match self {
            InProgress | TooManyKeys(_) | Store(_) | BadBody(_) | BodyTimeout(_) => true,
            Upstream(e) => e.unknown_cause().is_none(),
            MissingKey(_)
            | InvalidKey { .. }
            | InvalidSignature(_)
            | BodyTooLarge(_)
            | KeyReused
            | OutcomeUnknown(_)
            | BadGrpcTimeout(_)
            | NotStored(_) => false,
        }
    }

    /// The gRPC status a gRPC client gets for this refusal (the README's
    /// table), by the meaning the gRPC spec gives each code.
    pub fn grpc_code(&self) -> GrpcCode {
        use ProxyError::*;
        match self {
            MissingKey(_) | InvalidKey { .. } | KeyReused | BadBody(_) | BadGrpcTimeout(_) => {
                GrpcCode::InvalidArgument
            }
            InvalidSignature(_) => GrpcCode::Unauthenticated,
            BodyTooLarge(_) | TooManyKeys(_) => GrpcCode::ResourceExhausted,
            BodyTimeout(_) | Upstream(UpstreamError::Timeout(_)) => GrpcCode::DeadlineExceeded,
            InProgress => GrpcCode::Aborted,
            // "Clients should not retry until the system state has been
            // explicitly fixed": an operator or the upstream settles it.
            OutcomeUnknown(_) => GrpcCode::FailedPrecondition,
            NotStored(_) => GrpcCode::Unknown,
            Store(_) | Upstream(_) => GrpcCode::Unavailable,
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
            ProxyError::BadGrpcTimeout(_) => Outcome::ClientError,
            ProxyError::OutcomeUnknown(_) => Outcome::OutcomeUnknown,
            ProxyError::TooManyKeys(_) => Outcome::TooManyKeys,
            ProxyError::Store(_) => Outcome::StoreUnavailable,
            ProxyError::Upstream(_) | ProxyError::NotStored(_) => Outcome::UpstreamError,
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
    /// `x-should-retry`: whether the same request may succeed later.
    pub should_retry: Option<bool>,
    /// The status a gRPC client gets instead.
    pub grpc: GrpcCode,
}

/// gRPC status codes idemgate answers with (grpc/doc/statuscodes.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrpcCode {
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    FailedPrecondition = 9,
    Aborted = 10,
    ResourceExhausted = 8,
    Unauthenticated = 16,
    Unavailable = 14,
    Internal = 13,
    Unknown = 2,
}

/// `x-should-retry`, as Stainless-generated SDKs (openai-python, anthropic)
/// read it.
pub const X_SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");
/// The refusal's problem type, as response metadata on a gRPC refusal.
pub const IDEMGATE_PROBLEM: HeaderName = HeaderName::from_static("idemgate-problem");

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
            should_retry: None,
            grpc: GrpcCode::Internal,
        }
    }

    pub fn should_retry(mut self, yes: bool) -> Self {
        self.should_retry = Some(yes);
        self
    }

    pub fn grpc(mut self, code: GrpcCode) -> Self {
        self.grpc = code;
        self
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
        self.hint(resp.headers_mut());
        resp
    }

    /// The same refusal as a gRPC client reads it: HTTP 200, trailers only
    /// (`grpc-status`, `grpc-message` percent-encoded, the problem type in
    /// `idemgate-problem`), and the retry hints as metadata.
    pub fn into_grpc_response(self) -> Response<Body> {
        let mut resp = Response::new(full(Bytes::new()));
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from(self.grpc as u16));
        if let Ok(message) = HeaderValue::from_str(&grpc_percent_encode(&self.detail)) {
            h.insert("grpc-message", message);
        }
        if let Ok(kind) = HeaderValue::from_str(&format!("{PROBLEM_BASE}{}", self.slug)) {
            h.insert(IDEMGATE_PROBLEM, kind);
        }
        self.hint(h);
        resp
    }

    fn hint(&self, h: &mut http::HeaderMap) {
        if let Some(s) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if let Some(yes) = self.should_retry {
            let v = if yes { "true" } else { "false" };
            h.insert(X_SHOULD_RETRY, HeaderValue::from_static(v));
        }
    }
}

/// `grpc-message` text: bytes outside printable ASCII, and `%`, as `%XX`
/// (the gRPC over HTTP/2 spec's Percent-Encoded).
fn grpc_percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
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
        Problem::new(status, slug, title, e.to_string())
            .retry_after(1)
            .should_retry(true)
            .grpc(GrpcCode::Unavailable)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grpc_refusal_is_trailers_only_with_its_code_and_percent_encoded_message() {
        let e = ProxyError::InProgress;
        let resp = e.problem().into_grpc_response();
        assert_eq!(resp.status(), StatusCode::OK);
        let h = resp.headers();
        assert_eq!(h["content-type"], "application/grpc");
        assert_eq!(h["grpc-status"], "10");
        assert_eq!(h["x-should-retry"], "true");
        assert_eq!(h["retry-after"], "1");
        assert!(h["idemgate-problem"]
            .to_str()
            .unwrap()
            .ends_with("/request-in-progress"));
        assert_eq!(grpc_percent_encode("100% sûr\n"), "100%25 s%C3%BBr%0A");
    }

    #[test]
    fn every_refusal_says_whether_retrying_helps() {
        let cases = [
            (ProxyError::InProgress, true),
            (ProxyError::TooManyKeys(Duration::from_secs(1)), true),
            (
                ProxyError::Store(StoreError::Timeout(Duration::from_secs(1))),
                true,
            ),
            (
                ProxyError::Upstream(UpstreamError::Unreachable("x".into())),
                true,
            ),
            (
                ProxyError::Upstream(UpstreamError::Timeout(Duration::from_secs(1))),
                false,
            ),
            (ProxyError::KeyReused, false),
            (ProxyError::BodyTooLarge(1), false),
            (ProxyError::NotStored("x".into()), false),
        ];
        for (e, helps) in cases {
            let hint = if helps { "true" } else { "false" };
            assert_eq!(e.to_response().headers()["x-should-retry"], hint, "{e}");
        }
    }
}
