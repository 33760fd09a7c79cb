//! What every part of the proxy path shares: the service's [`Settings`] and
//! [`Shared`] state, a request's [`Covered`] form once its key is found,
//! and how a request ended ([`Handled`], [`refuse`]).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Response};
use tokio_util::task::TaskTracker;

use super::live::Lives;
use super::reconcile::Reconciler;
use super::routing::SharedRouting;
use super::tunnel::Tunnels;
use super::upstream::Upstream;
use crate::config::{OnStoreError, Policy};
use crate::error::ProxyError;
use crate::idempotency::key::{parse_key, Fingerprint, RecordKey};
use crate::metrics::{Metrics, Outcome};
use crate::store::Store;
use crate::Body;

/// What the service needs besides the store.
#[derive(Clone)]
pub struct Settings {
    pub on_store_error: OnStoreError,
    /// Bounds reading a covered request's body.
    pub body_read_timeout: Duration,
    /// `store.timeout`: bounds storing a response, retries included.
    pub store_timeout: Duration,
    /// Detached upstream calls are spawned here so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// Upgraded connections joined to their upstream, closed on drain.
    pub tunnels: Tunnels,
    pub metrics: Metrics,
}

/// What every request of the service shares.
pub(super) struct Shared {
    pub store: Store,
    pub settings: Settings,
    pub reconciler: Reconciler,
    /// Covered responses streaming now, for duplicates to join.
    pub lives: Arc<Lives>,
    /// Policies and upstreams; replaced whole by a reload.
    pub routing: SharedRouting,
}

/// How a request ended, and with what.
pub struct Handled {
    pub outcome: Outcome,
    pub reply: Reply,
    /// The record key, once derived (logged as its hash, never the key).
    pub record: Option<RecordKey>,
}

/// What the client gets: a response (the upstream's, a replay), or a
/// refusal of idemgate's own, rendered in the shape the client speaks.
pub enum Reply {
    Response(Response<Body>),
    Refused(ProxyError, Arc<Policy>),
}

impl Handled {
    pub fn new(outcome: Outcome, response: Response<Body>) -> Self {
        Handled {
            outcome,
            reply: Reply::Response(response),
            record: None,
        }
    }

    pub(super) fn on(mut self, record: RecordKey) -> Self {
        self.record = Some(record);
        self
    }

    /// The response for a client: a refusal as problem JSON, or in gRPC's
    /// shape for a gRPC client; with the route's `no_retry_headers` where
    /// retrying cannot help.
    pub fn into_response(self, grpc: bool) -> Response<Body> {
        match self.reply {
            Reply::Response(r) => r,
            Reply::Refused(e, policy) => {
                let problem = e.problem();
                let no_retry = problem.should_retry == Some(false);
                let mut resp = if grpc {
                    problem.into_grpc_response()
                } else {
                    problem.into_response()
                };
                if no_retry {
                    for (name, value) in &policy.no_retry_headers {
                        resp.headers_mut().insert(name.clone(), value.clone());
                    }
                }
                resp
            }
        }
    }
}

/// A request idemgate answers itself, refusing it under the route's
/// `policy`.
pub(super) fn refuse(e: ProxyError, policy: &Arc<Policy>) -> Handled {
    if matches!(e, ProxyError::Upstream(_) | ProxyError::Store(_)) {
        tracing::warn!(error = %e, "request failed");
    }
    Handled {
        outcome: e.outcome(),
        reply: Reply::Refused(e, policy.clone()),
        record: None,
    }
}

/// A request's key, found and checked: the header value it came in (or
/// that carries a body key on, to reconcile), and a body key's text.
pub struct FoundKey {
    pub(super) raw: HeaderValue,
    /// `None`: a header key, whose text is parsed from `raw` when needed
    /// (no allocation on the hot path).
    pub(super) text: Option<String>,
}

impl FoundKey {
    /// A key an intake found itself (a message id, a body field): printable
    /// ASCII within the route's `max_key_length`, which the caller checked.
    pub fn from_text(text: String) -> Result<Self, http::header::InvalidHeaderValue> {
        Ok(FoundKey {
            raw: HeaderValue::from_str(&text)?,
            text: Some(text),
        })
    }

    /// A key header's value, already checked by `parse_key`.
    pub(super) fn header(raw: HeaderValue) -> Self {
        FoundKey { raw, text: None }
    }

    pub(super) fn text(&self, max_len: usize) -> Cow<'_, str> {
        match &self.text {
            Some(t) => Cow::Borrowed(t),
            // Checked when found: parsing cannot fail here.
            None => parse_key(self.raw.as_bytes(), max_len).unwrap_or_default(),
        }
    }
}

/// A covered request with its body read and its key found: everything the
/// settling loop (`flow`) needs, with no state taken yet. The proxy's intake
/// makes one from an HTTP request; another intake can make one in code.
pub struct Covered {
    pub(super) parts: Parts,
    pub(super) body: Bytes,
    /// The request body's trailers, sent on after it.
    pub(super) trailers: Option<HeaderMap>,
    /// A bound on the upstream call shorter than the upstream's own
    /// timeout (a gRPC call's `grpc-timeout`).
    pub(super) deadline: Option<Duration>,
    pub(super) policy: Arc<Policy>,
    pub(super) upstream: Upstream,
    pub(super) key: FoundKey,
    pub(super) record_key: RecordKey,
    pub(super) fingerprint: Fingerprint,
}

impl Covered {
    /// Derives the record key (caller scope, method, path, key) and the
    /// fingerprint as the route's policy says.
    pub fn new(
        parts: Parts,
        body: Bytes,
        policy: Arc<Policy>,
        upstream: Upstream,
        key: FoundKey,
    ) -> Self {
        let record_key = RecordKey::derive(
            &parts.headers,
            &policy.scope_headers,
            &parts.method,
            parts.uri.path(),
            &key.text(policy.max_key_length),
        );
        let fingerprint = {
            let pq = parts
                .uri
                .path_and_query()
                .map_or(parts.uri.path(), |pq| pq.as_str());
            let fingerprinted: &[u8] = if policy.fingerprint_body { &body } else { &[] };
            Fingerprint::compute(
                &parts.method,
                pq,
                &parts.headers,
                &policy.fingerprint_headers,
                fingerprinted,
            )
        };
        Covered {
            parts,
            body,
            trailers: None,
            deadline: None,
            policy,
            upstream,
            key,
            record_key,
            fingerprint,
        }
    }

    /// The record this request settles.
    pub fn record_key(&self) -> RecordKey {
        self.record_key
    }

    /// Trailers to send after the body.
    pub fn with_trailers(mut self, trailers: Option<HeaderMap>) -> Self {
        self.trailers = trailers;
        self
    }

    /// Bounds the upstream call by `deadline` where it is shorter than the
    /// upstream's timeout.
    pub fn with_deadline(mut self, deadline: Option<Duration>) -> Self {
        self.deadline = deadline;
        self
    }
}
