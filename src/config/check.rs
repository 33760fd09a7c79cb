//! Loose values → checked ones. The [`Checker`] collects every problem, one
//! line each naming its key path, instead of stopping at the first.

use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderName, Method, Uri};
use toml::Value;

use super::file::{DedupFile, PolicyFile, StoreFile};
use super::{
    parse_size, Backend, DedupConfig, LogFormat, OnStoreError, Policy, RunArgs, StoreConfig,
};
use crate::store::redact_url;

/// Collects problems while converting loose values.
#[derive(Default)]
pub(super) struct Checker {
    pub errors: Vec<String>,
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

impl Checker {
    pub(super) fn err(&mut self, path: &str, msg: String) {
        self.errors.push(format!("{path}: {msg}"));
    }

    pub(super) fn opt<T>(
        &mut self,
        v: &Option<Value>,
        path: &str,
        f: fn(&mut Self, &str, &Value) -> Option<T>,
    ) -> Option<T> {
        v.as_ref().and_then(|v| f(self, path, v))
    }

    pub(super) fn string(&mut self, path: &str, v: &Value) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            other => {
                self.err(path, format!("{} is not a string", show(other)));
                None
            }
        }
    }

    pub(super) fn bool(&mut self, path: &str, v: &Value) -> Option<bool> {
        match v {
            Value::Boolean(b) => Some(*b),
            other => {
                self.err(path, format!("{} is not true or false", show(other)));
                None
            }
        }
    }

    pub(super) fn uint(&mut self, path: &str, v: &Value, min: i64, max: i64) -> Option<i64> {
        match v {
            Value::Integer(n) if (min..=max).contains(n) => Some(*n),
            Value::Integer(n) => {
                self.err(path, format!("{n} is out of range ({min} to {max})"));
                None
            }
            other => {
                self.err(path, format!("{} is not a whole number", show(other)));
                None
            }
        }
    }

    pub(super) fn duration(&mut self, path: &str, v: &Value) -> Option<Duration> {
        let parsed = match v {
            Value::String(s) => humantime::parse_duration(s.trim()).ok(),
            _ => None,
        };
        match parsed {
            Some(d) if !d.is_zero() => Some(d),
            Some(_) => {
                self.err(path, format!("{} must be longer than zero", show(v)));
                None
            }
            None => {
                self.err(
                    path,
                    format!(
                        "{} is not a duration (e.g. \"500ms\", \"30s\", \"24h\")",
                        show(v)
                    ),
                );
                None
            }
        }
    }

    pub(super) fn size(&mut self, path: &str, v: &Value) -> Option<u64> {
        let parsed = match v {
            Value::Integer(n) if *n >= 0 => Some(*n as u64),
            Value::String(s) => parse_size(s),
            _ => None,
        };
        if parsed.is_none() {
            self.err(
                path,
                format!(
                    "{} is not a size (e.g. \"512KiB\", \"1MiB\", or bytes)",
                    show(v)
                ),
            );
        }
        parsed
    }

    pub(super) fn list(&mut self, path: &str, v: &Value) -> Option<Vec<Value>> {
        match v {
            Value::Array(a) => Some(a.clone()),
            other => {
                self.err(path, format!("{} is not a list", show(other)));
                None
            }
        }
    }

    pub(super) fn header_name(&mut self, path: &str, v: &Value) -> Option<HeaderName> {
        let s = self.string(path, v)?;
        match HeaderName::from_bytes(s.trim().as_bytes()) {
            Ok(h) => Some(h),
            Err(_) => {
                self.err(path, format!("{s:?} is not a valid header name"));
                None
            }
        }
    }

    pub(super) fn each<T>(
        &mut self,
        path: &str,
        v: &Value,
        f: impl Fn(&mut Self, &str, &Value) -> Option<T>,
    ) -> Option<Vec<T>> {
        let items = self.list(path, v)?;
        let before = self.errors.len();
        let out: Vec<T> = items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| f(self, &format!("{path}[{i}]"), item))
            .collect();
        (self.errors.len() == before).then_some(out)
    }

    pub(super) fn method(&mut self, path: &str, v: &Value) -> Option<Method> {
        let s = self.string(path, v)?;
        match Method::from_bytes(s.trim().to_ascii_uppercase().as_bytes()) {
            Ok(m) => Some(m),
            Err(_) => {
                self.err(path, format!("{s:?} is not an HTTP method"));
                None
            }
        }
    }

    pub(super) fn addr(&mut self, path: &str, v: &Value) -> Option<SocketAddr> {
        let s = self.string(path, v)?;
        match s.trim().parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(
                    path,
                    format!("{s:?} is not an address (e.g. \"127.0.0.1:8081\")"),
                );
                None
            }
        }
    }

    pub(super) fn upstream(&mut self, path: &str, v: &Value) -> Option<Uri> {
        let s = self.string(path, v)?;
        let uri: Uri = match s.trim().parse() {
            Ok(u) => u,
            Err(_) => {
                self.err(
                    path,
                    format!("{s:?} is not a URL (e.g. \"http://127.0.0.1:8080\")"),
                );
                return None;
            }
        };
        if uri.scheme_str() != Some("http") || uri.authority().is_none() {
            self.err(
                path,
                format!(
                    "{s:?} must be an http:// URL with a host (e.g. \"http://127.0.0.1:8080\")"
                ),
            );
            return None;
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            self.err(
                path,
                format!("{s:?} must not have a path or query; requests keep their own"),
            );
            return None;
        }
        Some(uri)
    }

    pub(super) fn log_format(&mut self, path: &str, v: &Value) -> Option<LogFormat> {
        match self.string(path, v)?.as_str() {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            other => {
                self.err(path, format!("{other:?} is not \"text\" or \"json\""));
                None
            }
        }
    }

    pub(super) fn store(&mut self, f: StoreFile, args: &RunArgs) -> StoreConfig {
        let backend =
            f.backend
                .as_ref()
                .and_then(|v| match self.string("store.backend", v)?.as_str() {
                    "memory" => Some(Backend::Memory),
                    "redis" => Some(Backend::Redis),
                    "redis-cluster" => Some(Backend::RedisCluster),
                    other => {
                        self.err(
                            "store.backend",
                            format!("{other:?} is not \"memory\", \"redis\" or \"redis-cluster\""),
                        );
                        None
                    }
                });
        let urls = f
            .urls
            .as_ref()
            .and_then(|v| self.each("store.urls", v, |c, p, v| c.redis_url(p, v)));
        let on_store_error = f.on_store_error.as_ref().and_then(|v| {
            match self.string("store.on_store_error", v)?.as_str() {
                "reject" => Some(OnStoreError::Reject),
                "pass-through" => Some(OnStoreError::PassThrough),
                other => {
                    self.err(
                        "store.on_store_error",
                        format!("{other:?} is not \"reject\" or \"pass-through\""),
                    );
                    None
                }
            }
        });
        let key_prefix = f.key_prefix.as_ref().and_then(|v| {
            let s = self.string("store.key_prefix", v)?;
            if s.is_empty()
                || s.contains(['{', '}'])
                || s.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                self.err(
                    "store.key_prefix",
                    format!("{s:?} must be non-empty, without spaces or braces"),
                );
                return None;
            }
            Some(s)
        });
        let timeout = self.opt(&f.timeout, "store.timeout", Checker::duration);
        let max_entries = f
            .max_entries
            .as_ref()
            .and_then(|v| self.uint("store.max_entries", v, 1, i64::MAX));

        // Flags choose the backend over the file.
        let (backend, urls) = match (&args.redis, args.redis_cluster.as_slice()) {
            (Some(_), [_, ..]) => {
                self.err(
                    "--redis / --redis-cluster",
                    "give one or the other, not both".into(),
                );
                (Backend::Memory, vec![])
            }
            (Some(url), []) => {
                let u = self.redis_url("--redis (or IDEMGATE_REDIS)", &Value::String(url.clone()));
                (Backend::Redis, u.into_iter().collect())
            }
            (None, seeds @ [_, ..]) => {
                let mut v = Vec::new();
                for s in seeds {
                    v.extend(self.redis_url(
                        "--redis-cluster (or IDEMGATE_REDIS_CLUSTER)",
                        &Value::String(s.clone()),
                    ));
                }
                (Backend::RedisCluster, v)
            }
            (None, []) => (backend.unwrap_or(Backend::Memory), urls.unwrap_or_default()),
        };
        if backend != Backend::Memory && urls.is_empty() && self.errors.is_empty() {
            self.err(
                "store.urls",
                "a Redis backend needs at least one URL".into(),
            );
        }
        if backend == Backend::Redis && urls.len() > 1 {
            self.err(
                "store.urls",
                "the \"redis\" backend takes one URL; use \"redis-cluster\" for several".into(),
            );
        }
        StoreConfig {
            backend,
            urls,
            key_prefix: key_prefix.unwrap_or_else(|| "idemgate".into()),
            on_store_error: on_store_error.unwrap_or(OnStoreError::Reject),
            timeout: timeout.unwrap_or(Duration::from_secs(1)),
            max_entries: max_entries.map_or(1_000_000, |n| n as usize),
        }
    }

    pub(super) fn dedup(&mut self, f: DedupFile) -> DedupConfig {
        let mut d = DedupConfig::default();
        if let Some(v) = &f.lease_ttl {
            d.lease_ttl = self.duration("dedup.lease_ttl", v).unwrap_or(d.lease_ttl);
        }
        if let Some(v) = &f.retention {
            d.retention = self.duration("dedup.retention", v).unwrap_or(d.retention);
        }
        if let Some(v) = &f.failed_retention {
            d.failed_retention = self
                .duration("dedup.failed_retention", v)
                .unwrap_or(d.failed_retention);
        }
        if let Some(v) = &f.max_attempts {
            d.max_attempts = self
                .uint("dedup.max_attempts", v, 1, 1000)
                .map_or(d.max_attempts, |n| n as u32);
        }
        if let Some(v) = &f.max_key_length {
            d.max_key_length = self
                .uint("dedup.max_key_length", v, 1, 8192)
                .map_or(d.max_key_length, |n| n as usize);
        }
        if let Some(v) = &f.max_result_bytes {
            d.max_result_bytes = self
                .size("dedup.max_result_bytes", v)
                .unwrap_or(d.max_result_bytes);
        }
        if let Some(v) = &f.max_batch {
            d.max_batch = self
                .uint("dedup.max_batch", v, 1, 100_000)
                .map_or(d.max_batch, |n| n as usize);
        }
        if let Some(v) = &f.max_request_body {
            d.max_request_body = self
                .size("dedup.max_request_body", v)
                .unwrap_or(d.max_request_body);
        }
        d
    }

    pub(super) fn redis_url(&mut self, path: &str, v: &Value) -> Option<String> {
        let s = self.string(path, v)?;
        let s = s.trim().to_owned();
        if !(s.starts_with("redis://") || s.starts_with("rediss://"))
            || s.len() <= "rediss://".len()
        {
            self.err(
                path,
                format!("{:?} is not a redis:// or rediss:// URL", redact_url(&s)),
            );
            return None;
        }
        Some(s)
    }

    /// `base` with the keys `f` sets; problems reported under `at`.
    pub(super) fn policy(&mut self, at: &str, f: &PolicyFile, base: &Policy) -> Policy {
        let mut p = base.clone();
        let k = |name: &str| format!("{at}.{name}");
        if let Some(v) = &f.header {
            p.header = self.header_name(&k("header"), v).unwrap_or(p.header);
        }
        if let Some(v) = &f.methods {
            p.methods = self
                .each(&k("methods"), v, Checker::method)
                .unwrap_or(p.methods);
        }
        if let Some(v) = &f.required {
            p.required = self.bool(&k("required"), v).unwrap_or(p.required);
        }
        if let Some(v) = &f.record_ttl {
            p.record_ttl = self.duration(&k("record_ttl"), v).unwrap_or(p.record_ttl);
        }
        if let Some(v) = &f.lease_ttl {
            p.lease_ttl = self.duration(&k("lease_ttl"), v).unwrap_or(p.lease_ttl);
        }
        if let Some(v) = &f.wait_timeout {
            p.wait_timeout = self
                .duration(&k("wait_timeout"), v)
                .unwrap_or(p.wait_timeout);
        }
        if let Some(v) = &f.scope_headers {
            p.scope_headers = self
                .each(&k("scope_headers"), v, Checker::header_name)
                .unwrap_or(p.scope_headers);
        }
        if let Some(v) = &f.fingerprint_headers {
            p.fingerprint_headers = self
                .each(&k("fingerprint_headers"), v, Checker::header_name)
                .unwrap_or(p.fingerprint_headers);
        }
        if let Some(v) = &f.max_key_length {
            p.max_key_length = self
                .uint(&k("max_key_length"), v, 1, 8192)
                .map_or(p.max_key_length, |n| n as usize);
        }
        if let Some(v) = &f.max_request_body {
            p.max_request_body = self
                .size(&k("max_request_body"), v)
                .unwrap_or(p.max_request_body);
        }
        if let Some(v) = &f.max_response_body {
            p.max_response_body = self
                .size(&k("max_response_body"), v)
                .unwrap_or(p.max_response_body);
        }
        if let Some(v) = &f.uncacheable_statuses {
            p.uncacheable_statuses = self
                .each(&k("uncacheable_statuses"), v, |c, path, v| {
                    c.uint(path, v, 100, 599).map(|n| n as u16)
                })
                .unwrap_or(p.uncacheable_statuses);
        }
        if let Some(v) = &f.replay_strip_headers {
            p.replay_strip_headers = self
                .each(&k("replay_strip_headers"), v, Checker::header_name)
                .unwrap_or(p.replay_strip_headers);
        }
        if p.lease_ttl < Duration::from_millis(30) {
            self.err(
                &k("lease_ttl"),
                "must be at least 30ms so it can be renewed in time".into(),
            );
        }
        p
    }
}
