//! Per-path policies: the `[idempotency]` defaults, the `[[routes]]` that
//! override them (first match wins), and their path patterns.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method};

/// The idempotency rules for one path (the defaults, or a route's).
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub header: HeaderName,
    pub methods: Vec<Method>,
    pub required: bool,
    pub record_ttl: Duration,
    pub lease_ttl: Duration,
    pub wait_timeout: Duration,
    pub scope_headers: Vec<HeaderName>,
    pub fingerprint_headers: Vec<HeaderName>,
    pub max_key_length: usize,
    pub max_request_body: u64,
    pub max_response_body: u64,
    pub uncacheable_statuses: Vec<u16>,
    pub replay_strip_headers: Vec<HeaderName>,
}

impl Policy {
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
}

impl Policies {
    pub fn for_path(&self, path: &str) -> &Arc<Policy> {
        self.routes
            .iter()
            .find(|r| r.pattern.matches(path))
            .map_or(&self.default, |r| &r.policy)
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

/// Greedy matching with one backtrack point for the last `**`, as in the
/// classic wildcard algorithm: linear in practice, never exponential.
fn match_segments(pat: &[&str], segs: &[&str]) -> bool {
    let (mut p, mut s) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while s < segs.len() {
        if p < pat.len() && pat[p] == "**" {
            star = Some((p, s));
            p += 1;
        } else if p < pat.len() && match_segment(pat[p].as_bytes(), segs[s].as_bytes()) {
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
    pat[p..].iter().all(|x| *x == "**")
}

/// `*` matches any run of characters within a segment.
fn match_segment(pat: &[u8], seg: &[u8]) -> bool {
    let (mut p, mut s) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while s < seg.len() {
        if p < pat.len() && pat[p] == b'*' {
            star = Some((p, s));
            p += 1;
        } else if p < pat.len() && pat[p] == seg[s] {
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
    pat[p..].iter().all(|&c| c == b'*')
}
