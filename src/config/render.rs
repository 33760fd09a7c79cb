//! The effective configuration as TOML, as `check-config` prints it.

use std::time::Duration;

use http::HeaderName;

use super::{Backend, Config, LogFormat, OnStoreError, Policy};
use crate::store::redact_url;

impl Config {
    /// The effective configuration as TOML, for `check-config`.
    pub fn to_toml(&self) -> String {
        use std::fmt::Write;
        let d = |d: Duration| format!("{:?}", humantime::format_duration(d).to_string());
        let names =
            |v: &[HeaderName]| format!("{:?}", v.iter().map(|h| h.as_str()).collect::<Vec<_>>());
        let policy = |out: &mut String, p: &Policy| {
            let methods: Vec<&str> = p.methods.iter().map(|m| m.as_str()).collect();
            let _ = write!(
                out,
                "header = {:?}\nmethods = {:?}\nrequired = {}\nrecord_ttl = {}\nlease_ttl = {}\nwait_timeout = {}\n\
                 scope_headers = {}\nfingerprint_headers = {}\nmax_key_length = {}\nmax_request_body = {}\n\
                 max_response_body = {}\nuncacheable_statuses = {:?}\nreplay_strip_headers = {}\n",
                p.header.as_str(),
                methods,
                p.required,
                d(p.record_ttl),
                d(p.lease_ttl),
                d(p.wait_timeout),
                names(&p.scope_headers),
                names(&p.fingerprint_headers),
                p.max_key_length,
                p.max_request_body,
                p.max_response_body,
                p.uncacheable_statuses,
                names(&p.replay_strip_headers),
            );
        };
        let mut out = String::new();
        let _ = writeln!(out, "listen = {:?}", self.listen.to_string());
        let _ = writeln!(out, "admin_listen = {:?}", self.admin_listen.to_string());
        match &self.upstream {
            Some(u) => {
                let _ = writeln!(out, "upstream = {:?}", u.to_string());
            }
            None => out.push_str("# upstream: not set (dedup-only mode)\n"),
        }
        let _ = writeln!(out, "upstream_timeout = {}", d(self.upstream_timeout));
        let _ = writeln!(out, "drain_timeout = {}", d(self.drain_timeout));
        let _ = writeln!(out, "max_connections = {}", self.max_connections);
        let _ = writeln!(out, "header_read_timeout = {}", d(self.header_read_timeout));
        let _ = writeln!(out, "body_read_timeout = {}", d(self.body_read_timeout));
        let fmt = match self.log_format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        };
        let _ = writeln!(out, "log_format = {fmt:?}\n\n[store]");
        let s = &self.store;
        let backend = match s.backend {
            Backend::Memory => "memory",
            Backend::Redis => "redis",
            Backend::RedisCluster => "redis-cluster",
        };
        let on_err = match s.on_store_error {
            OnStoreError::Reject => "reject",
            OnStoreError::PassThrough => "pass-through",
        };
        // URLs may carry passwords: show only that they are set.
        let urls: Vec<String> = s.urls.iter().map(|u| redact_url(u)).collect();
        let _ = writeln!(
            out,
            "backend = {backend:?}\nurls = {urls:?}\nkey_prefix = {:?}\non_store_error = {on_err:?}\ntimeout = {}\nmax_entries = {}\n\n[idempotency]",
            s.key_prefix,
            d(s.timeout),
            s.max_entries
        );
        policy(&mut out, &self.policies.default);
        for r in &self.policies.routes {
            let _ = writeln!(out, "\n[[routes]]\npath = {:?}", r.pattern.as_str());
            policy(&mut out, &r.policy);
        }
        let x = &self.dedup;
        let _ = write!(
            out,
            "\n[dedup]\nlease_ttl = {}\nretention = {}\nfailed_retention = {}\nmax_attempts = {}\n\
             max_key_length = {}\nmax_result_bytes = {}\nmax_batch = {}\nmax_request_body = {}\n",
            d(x.lease_ttl),
            d(x.retention),
            d(x.failed_retention),
            x.max_attempts,
            x.max_key_length,
            x.max_result_bytes,
            x.max_batch,
            x.max_request_body
        );
        out
    }
}
