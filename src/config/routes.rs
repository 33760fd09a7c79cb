//! Per-path policies: the `[idempotency]` defaults, the `[[routes]]` that
//! override them (first match wins), and their path patterns.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};

use super::encryption::KeySource;
use super::upstream::UpstreamConfig;
use crate::idempotency::key_from::KeyFrom;
use crate::idempotency::rate::Rate;
use crate::idempotency::state::BeginOptions;
use crate::webhook::Verifier;

/// The idempotency rules for one path (the defaults, or a route's).
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Where the key comes from (`key_from`, or `header`).
    pub key_from: KeyFrom,
    pub methods: Vec<Method>,
    pub required: bool,
    pub record_ttl: Duration,
    pub lease_ttl: Duration,
    pub wait_timeout: Duration,
    pub scope_headers: Vec<HeaderName>,
    pub fingerprint_headers: Vec<HeaderName>,
    /// Whether the body is part of the fingerprint (presets: no, since the
    /// signature already ties the body to the provider, and a provider may
    /// change incidental fields between retries of one event).
    pub fingerprint_body: bool,
    pub max_key_length: usize,
    pub max_request_body: u64,
    pub max_response_body: u64,
    pub uncacheable_statuses: Vec<u16>,
    pub replay_strip_headers: Vec<HeaderName>,
    /// Sent with every refusal that retrying cannot change (next to
    /// `x-should-retry: false`), e.g. `Stripe-Should-Retry: false`.
    pub no_retry_headers: Vec<(HeaderName, HeaderValue)>,
    /// What a forwarded request whose outcome is unknown leaves behind.
    pub on_unknown_outcome: OnUnknownOutcome,
    /// Upstream statuses that mean "a gateway behind the upstream gave up":
    /// the request may have run (checked before `uncacheable_statuses`).
    pub unknown_statuses: Vec<u16>,
    /// How long an unknown record is held; `None`: `record_ttl`.
    pub unknown_ttl: Option<Duration>,
    /// Where to ask the upstream whether a request ran (`reconcile`).
    pub reconcile_url: Option<ReconcileUrl>,
    pub reconcile_timeout: Duration,
    /// The least time between two questions about one key.
    pub reconcile_interval: Duration,
    /// Fair share: new keys per caller scope (`new_keys_per_scope`,
    /// `new_keys_burst`); `None`: unlimited.
    pub new_keys: Option<Rate>,
    /// A webhook provider's signature check (`preset`, `secrets`).
    pub webhook: Option<WebhookCheck>,
}

/// A route's webhook provider and the check every covered request passes
/// before any state is taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookCheck {
    pub verifier: Verifier,
    /// Where each secret was read from (shown by check-config; the secrets
    /// never are).
    pub sources: Vec<KeySource>,
}

/// `on_unknown_outcome`: what to do when idemgate cannot know whether the
/// upstream acted on a forwarded request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnUnknownOutcome {
    /// Keep the key: duplicates get 409 `outcome-unknown`, never a rerun.
    Hold,
    /// Free the key: a retry runs again (the fence tells the upstream).
    Release,
    /// Keep the key and ask the upstream's reconcile endpoint.
    Reconcile,
}

/// A reconcile URL template: `http://host:port/path/{key}`, `{key}`
/// replaced by the percent-encoded idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconcileUrl(String);

impl ReconcileUrl {
    /// Checks the template: an http:// URL once `{key}` is filled in.
    pub fn parse(text: &str) -> Result<Self, String> {
        let probe = text.replace("{key}", "k");
        match probe.parse::<http::Uri>() {
            Ok(u) if u.scheme_str() == Some("http") && u.authority().is_some() => {
                Ok(ReconcileUrl(text.to_owned()))
            }
            _ => Err(format!(
                "{text:?} is not an http:// URL template (e.g. \"http://127.0.0.1:8080/idempotency/{{key}}\")"
            )),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The URL for `key`: unreserved characters kept, the rest %XX.
    pub fn for_key(&self, key: &str) -> String {
        let mut encoded = String::with_capacity(key.len());
        for b in key.bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                encoded.push(b as char);
            } else {
                encoded.push_str(&format!("%{b:02X}"));
            }
        }
        self.0.replace("{key}", &encoded)
    }
}

impl Policy {
    /// How long an unknown record is held.
    pub fn unknown_ttl(&self) -> Duration {
        self.unknown_ttl.unwrap_or(self.record_ttl)
    }

    /// What a begin on this route asks of the store.
    pub fn begin_options(&self) -> BeginOptions {
        BeginOptions {
            lease_ttl: self.lease_ttl,
            hold_lapsed: (self.on_unknown_outcome != OnUnknownOutcome::Release)
                .then(|| self.unknown_ttl()),
            reconcile_every: (self.on_unknown_outcome == OnUnknownOutcome::Reconcile)
                .then_some(self.reconcile_interval),
        }
    }

    pub fn covers(&self, method: &Method) -> bool {
        self.methods.iter().any(|m| m == method)
    }
}

/// The default policy and the `[[routes]]` that override it; first match wins.
#[derive(Debug, Clone)]
pub struct Policies {
    pub default: Arc<Policy>,
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone)]
pub struct Route {
    pub pattern: PathPattern,
    pub policy: Arc<Policy>,
    /// The route's own upstream, if it sets any upstream key; `None`: the
    /// top-level one.
    pub upstream: Option<UpstreamConfig>,
}

impl Policies {
    pub fn for_path(&self, path: &str) -> &Arc<Policy> {
        self.find(path)
            .map_or(&self.default, |i| &self.routes[i].policy)
    }

    /// The index of the first route matching `path`.
    pub fn find(&self, path: &str) -> Option<usize> {
        self.routes.iter().position(|r| r.pattern.matches(path))
    }
}

/// A path pattern: `*` matches within one segment, a `**` segment matches any
/// number of segments (zero included, so `/a/**` matches `/a` too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    text: String,
}

impl PathPattern {
    pub fn parse(text: &str) -> Result<Self, String> {
        if !text.starts_with('/') {
            return Err(format!("{text:?} must start with '/'"));
        }
        Ok(PathPattern {
            text: text.to_owned(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn matches(&self, path: &str) -> bool {
        let pat: Vec<&str> = self.text.split('/').collect();
        let segs: Vec<&str> = path.split('/').collect();
        match_segments(&pat, &segs)
    }
}

/// `**` segments match any run of segments; other segments match one
/// segment, `*` in them any run of characters.
fn match_segments(pat: &[&str], segs: &[&str]) -> bool {
    wildcard(
        pat,
        segs,
        |p| *p == "**",
        |p, s| match_segment(p.as_bytes(), s.as_bytes()),
    )
}

/// `*` matches any run of characters within a segment.
fn match_segment(pat: &[u8], seg: &[u8]) -> bool {
    wildcard(pat, seg, |p| *p == b'*', |p, s| p == s)
}

/// Greedy wildcard matching with one backtrack point for the last star, as
/// in the classic algorithm: linear in practice, never exponential.
fn wildcard<P, S>(
    pat: &[P],
    items: &[S],
    is_star: impl Fn(&P) -> bool,
    matches: impl Fn(&P, &S) -> bool,
) -> bool {
    let (mut p, mut s) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while s < items.len() {
        if p < pat.len() && is_star(&pat[p]) {
            star = Some((p, s));
            p += 1;
        } else if p < pat.len() && matches(&pat[p], &items[s]) {
            p += 1;
            s += 1;
        } else if let Some((sp, ss)) = star {
            p = sp + 1;
            s = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    pat[p..].iter().all(is_star)
}
