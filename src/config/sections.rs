//! Each section of the file, checked over its defaults: the top level with
//! its flags, `[store]`, `[idempotency]` and `[[routes]]`, `[dedup]`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use toml::Value;

use super::cli::RunArgs;
use super::consumers;
use super::file::{ConfigErrors, DedupFile, FileConfig, PolicyFile};
use super::model::{AdminTokens, Config, DedupConfig, LogFormat, OnStoreError, StoreConfig};
use super::routes::{OnUnknownOutcome, PathPattern, Policies, Policy, ReconcileUrl, Route};
use super::traces;
use super::upstream::UpstreamConfig;
use crate::checker::Checker;
use crate::idempotency::rate::Rate;
use crate::store::registry;

const LOG_FORMATS: &[(&str, LogFormat)] = &[("text", LogFormat::Text), ("json", LogFormat::Json)];
/// The keys of `[store]` every backend shares; the rest are backends'.
const COMMON_STORE_KEYS: &[&str] = &["backend", "on_store_error", "timeout", "encryption"];
const ON_UNKNOWN: &[(&str, OnUnknownOutcome)] = &[
    ("hold", OnUnknownOutcome::Hold),
    ("release", OnUnknownOutcome::Release),
    ("reconcile", OnUnknownOutcome::Reconcile),
];
const ON_STORE_ERROR: &[(&str, OnStoreError)] = &[
    ("reject", OnStoreError::Reject),
    ("pass-through", OnStoreError::PassThrough),
];

impl Config {
    /// Loads the file named by `args.config` (if any) and lays the flags over it.
    pub fn load(args: &RunArgs) -> Result<Self, ConfigErrors> {
        let file = match &args.config {
            Some(p) => FileConfig::read(p)?,
            None => FileConfig::default(),
        };
        Self::from_parts(file, args)
    }

    /// Validates file values with flag/env overrides; lists every problem.
    pub fn from_parts(file: FileConfig, args: &RunArgs) -> Result<Self, ConfigErrors> {
        let mut c = Checker::default();
        let mut cfg = Config::default();
        let f = &file;
        c.set_flagged(
            &mut cfg.listen,
            (&args.listen, "--listen (or IDEMGATE_LISTEN)"),
            &f.listen,
            "listen",
            Checker::addr,
        );
        c.set_flagged(
            &mut cfg.admin_listen,
            (
                &args.admin_listen,
                "--admin-listen (or IDEMGATE_ADMIN_LISTEN)",
            ),
            &f.admin_listen,
            "admin_listen",
            Checker::addr,
        );
        c.set_flagged(
            &mut cfg.upstream,
            (&args.upstream, "--upstream (or IDEMGATE_UPSTREAM)"),
            &f.upstream,
            "upstream",
            |c, path, v| c.upstream(path, v).map(Some),
        );
        c.set_flagged(
            &mut cfg.log_format,
            (&args.log_format, "--log-format (or IDEMGATE_LOG_FORMAT)"),
            &f.log_format,
            "log_format",
            Checker::one_of(LOG_FORMATS),
        );
        let durations = [
            (
                &mut cfg.upstream_timeout,
                &f.upstream_timeout,
                "upstream_timeout",
            ),
            (&mut cfg.drain_timeout, &f.drain_timeout, "drain_timeout"),
            (
                &mut cfg.header_read_timeout,
                &f.header_read_timeout,
                "header_read_timeout",
            ),
            (
                &mut cfg.body_read_timeout,
                &f.body_read_timeout,
                "body_read_timeout",
            ),
        ];
        for (slot, v, path) in durations {
            c.set(slot, v, path, Checker::duration);
        }
        c.set(
            &mut cfg.max_connections,
            &f.max_connections,
            "max_connections",
            Checker::int(1, 1_000_000),
        );
        c.set_flagged(
            &mut cfg.event_loops,
            (&args.event_loops, "--event-loops (or IDEMGATE_EVENT_LOOPS)"),
            &f.event_loops,
            "event_loops",
            |c, path, v| {
                // A flag's value is text; the file's an integer.
                let n = match v {
                    Value::String(s) => s.trim().parse().map_or(v.clone(), Value::Integer),
                    _ => v.clone(),
                };
                Checker::int(0, 256)(c, path, &n)
            },
        );
        cfg.admin_tokens = c.admin_tokens(f, args);
        let top = f.upstream_keys();
        cfg.default_upstream = match cfg.upstream.clone() {
            Some(uri) => Some(c.upstream_config("", &top, uri, None)),
            None => {
                let more = [
                    top.protocol,
                    top.ca_file,
                    top.cert_file,
                    top.key_file,
                    top.danger,
                    top.max_idle,
                    top.idle_timeout,
                ];
                if more.iter().any(|v| v.is_some()) {
                    c.err(
                        "upstream",
                        "is required with upstream_protocol, the TLS keys and the idle keys".into(),
                    );
                }
                None
            }
        };
        cfg.store = c.store(file.store.unwrap_or_default(), args);
        cfg.policies = c.policies(
            file.idempotency.unwrap_or_default(),
            file.routes,
            cfg.default_upstream.as_ref(),
        );
        cfg.dedup = c.dedup(file.dedup.unwrap_or_default());
        cfg.traces = traces::check(&mut c, file.tracing.clone(), &|k| std::env::var(k).ok());
        cfg.consumers =
            consumers::check(&mut c, file.consumers.clone(), &|k| std::env::var(k).ok());
        cfg.warnings = std::mem::take(&mut c.warnings);
        if c.errors.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigErrors(c.errors))
        }
    }
}

impl Checker {
    /// A secret given inline (`key`) or in a file (`key_file`), not both.
    fn secret(
        &mut self,
        key: &str,
        inline: &Option<Value>,
        file: &Option<Value>,
    ) -> Option<String> {
        let file_key = format!("{key}_file");
        match (inline, file) {
            (Some(_), Some(_)) => {
                self.err(&file_key, format!("give {key} or {file_key}, not both"));
                None
            }
            (Some(v), None) => self.string(key, v),
            (None, Some(v)) => {
                let path = self.string(&file_key, v)?;
                match std::fs::read_to_string(&path) {
                    Ok(s) => Some(s.trim().to_owned()),
                    Err(e) => {
                        self.err(&file_key, format!("cannot read {path:?}: {e}"));
                        None
                    }
                }
            }
            (None, None) => None,
        }
        .and_then(|s| {
            if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
                self.err(key, "must be non-empty, without spaces".into());
                None
            } else {
                Some(s)
            }
        })
    }

    fn admin_tokens(&mut self, f: &FileConfig, args: &RunArgs) -> AdminTokens {
        let mut t = AdminTokens {
            metrics_public: true,
            ..AdminTokens::default()
        };
        t.write = match &args.admin_token {
            Some(flag) => {
                let v = Some(Value::String(flag.clone()));
                self.secret("--admin-token (or IDEMGATE_ADMIN_TOKEN)", &v, &None)
            }
            None => self.secret("admin_token", &f.admin_token, &f.admin_token_file),
        };
        t.read = self.secret(
            "admin_read_token",
            &f.admin_read_token,
            &f.admin_read_token_file,
        );
        self.set(
            &mut t.metrics_public,
            &f.metrics_public,
            "metrics_public",
            Checker::bool,
        );
        if t.read.is_some() && t.write.is_none() {
            self.err(
                "admin_read_token",
                "needs admin_token too (the read token alone would leave writes open)".into(),
            );
        }
        if t.write.is_some() && t.write == t.read {
            self.err("admin_read_token", "must differ from admin_token".into());
        }
        t
    }

    /// `[store]`: the shared keys here, the backend's own by the backend
    /// (`crate::store::registry`). `--redis` and `--redis-cluster` choose a
    /// Redis backend and its URLs over the file.
    fn store(&mut self, mut table: toml::Table, args: &RunArgs) -> StoreConfig {
        let mut s = StoreConfig::default();
        for key in table.keys() {
            if !COMMON_STORE_KEYS.contains(&key.as_str()) && !registry::known_key(key) {
                self.err(&format!("store.{key}"), "is not a key of [store]".into());
            }
        }
        let mut flags = BTreeMap::new();
        match (&args.redis, args.redis_cluster.as_slice()) {
            (Some(_), [_, ..]) => {
                self.err(
                    "--redis / --redis-cluster",
                    "give one or the other, not both".into(),
                );
            }
            (Some(url), []) => {
                let flag = "--redis (or IDEMGATE_REDIS)";
                table.insert("backend".into(), "redis".into());
                table.insert("urls".into(), url.clone().into());
                flags.insert("urls".to_owned(), flag.to_owned());
            }
            (None, seeds @ [_, ..]) => {
                let flag = "--redis-cluster (or IDEMGATE_REDIS_CLUSTER)";
                table.insert("backend".into(), "redis-cluster".into());
                let urls = seeds.iter().map(|u| Value::from(u.clone())).collect();
                table.insert("urls".into(), Value::Array(urls));
                flags.insert("urls".to_owned(), flag.to_owned());
            }
            (None, []) => {}
        }
        let mut name = s.backend.name().to_owned();
        self.set(
            &mut name,
            &table.get("backend").cloned(),
            "store.backend",
            |c, p, v| {
                let name = c.string(p, v)?;
                if registry::names().any(|n| n == name) {
                    return Some(name);
                }
                let known: Vec<String> = registry::names().map(|n| format!("{n:?}")).collect();
                c.err(p, format!("{name:?} is not one of {}", known.join(", ")));
                None
            },
        );
        if let Some(backend) = registry::check(&name, &table, &flags, self) {
            s.backend = backend;
        }
        self.set(
            &mut s.on_store_error,
            &table.get("on_store_error").cloned(),
            "store.on_store_error",
            Checker::one_of(ON_STORE_ERROR),
        );
        self.set(
            &mut s.timeout,
            &table.get("timeout").cloned(),
            "store.timeout",
            Checker::duration,
        );
        if let Some(v) = table.get("encryption") {
            s.encryption = self.encryption(v);
        }
        s
    }

    /// `[idempotency]` over the defaults, and each `[[routes]]` over that.
    fn policies(
        &mut self,
        idem: PolicyFile,
        routes: Option<Vec<PolicyFile>>,
        default_upstream: Option<&UpstreamConfig>,
    ) -> Policies {
        if idem.path.is_some() {
            self.err(
                "idempotency.path",
                "only [[routes]] entries take a path".into(),
            );
        }
        if idem.upstream_keys().any() {
            self.err(
                "idempotency",
                "upstream keys belong at the top level or in [[routes]] entries".into(),
            );
        }
        let default = Arc::new(self.policy("idempotency", &idem, &Policy::default()));
        let mut out = Vec::new();
        for (i, r) in routes.unwrap_or_default().iter().enumerate() {
            let at = format!("routes[{i}]");
            let path = format!("{at}.path");
            let pattern = match &r.path {
                None => {
                    self.err(&path, "is required".into());
                    None
                }
                Some(v) => self
                    .string(&path, v)
                    .and_then(|s| PathPattern::parse(&s).map_err(|e| self.err(&path, e)).ok()),
            };
            let policy = Arc::new(self.policy(&at, r, &default));
            let upstream = self.route_upstream(&at, r, default_upstream);
            if let Some(pattern) = pattern {
                out.push(Route {
                    pattern,
                    policy,
                    upstream,
                });
            }
        }
        Policies {
            default,
            routes: out,
        }
    }

    /// `base` with the keys `f` sets; problems reported under `at`.
    fn policy(&mut self, at: &str, f: &PolicyFile, base: &Policy) -> Policy {
        let mut p = base.clone();
        let k = |name: &str| format!("{at}.{name}");
        let preset = self.preset(at, f, &mut p);
        self.set(&mut p.methods, &f.methods, &k("methods"), |c, path, v| {
            c.each(path, v, Checker::method)
        });
        self.set(&mut p.required, &f.required, &k("required"), Checker::bool);
        for (slot, v, name) in [
            (&mut p.record_ttl, &f.record_ttl, "record_ttl"),
            (&mut p.lease_ttl, &f.lease_ttl, "lease_ttl"),
        ] {
            self.set(slot, v, &k(name), Checker::duration);
        }
        // "0s": a duplicate of a request in flight gets 409 at once.
        self.set(
            &mut p.wait_timeout,
            &f.wait_timeout,
            &k("wait_timeout"),
            Checker::duration_or_zero,
        );
        self.set(
            &mut p.no_retry_headers,
            &f.no_retry_headers,
            &k("no_retry_headers"),
            Checker::header_table,
        );
        for (slot, v, name) in [
            (&mut p.scope_headers, &f.scope_headers, "scope_headers"),
            (
                &mut p.fingerprint_headers,
                &f.fingerprint_headers,
                "fingerprint_headers",
            ),
            (
                &mut p.replay_strip_headers,
                &f.replay_strip_headers,
                "replay_strip_headers",
            ),
        ] {
            self.set(slot, v, &k(name), |c, path, v| {
                c.each(path, v, Checker::header_name)
            });
        }
        self.set(
            &mut p.max_key_length,
            &f.max_key_length,
            &k("max_key_length"),
            Checker::int(1, 8192),
        );
        for (slot, v, name) in [
            (
                &mut p.max_request_body,
                &f.max_request_body,
                "max_request_body",
            ),
            (
                &mut p.max_response_body,
                &f.max_response_body,
                "max_response_body",
            ),
        ] {
            self.set(slot, v, &k(name), Checker::size);
        }
        for (slot, v, name) in [
            (
                &mut p.uncacheable_statuses,
                &f.uncacheable_statuses,
                "uncacheable_statuses",
            ),
            (
                &mut p.unknown_statuses,
                &f.unknown_statuses,
                "unknown_statuses",
            ),
        ] {
            self.set(slot, v, &k(name), |c, path, v| {
                c.each(path, v, |c, path, v| Checker::int(100, 599)(c, path, v))
            });
        }
        self.set(
            &mut p.on_unknown_outcome,
            &f.on_unknown_outcome,
            &k("on_unknown_outcome"),
            Checker::one_of(ON_UNKNOWN),
        );
        self.set(
            &mut p.unknown_ttl,
            &f.unknown_ttl,
            &k("unknown_ttl"),
            |c, path, v| c.duration(path, v).map(Some),
        );
        for (slot, v, name) in [
            (
                &mut p.reconcile_timeout,
                &f.reconcile_timeout,
                "reconcile_timeout",
            ),
            (
                &mut p.reconcile_interval,
                &f.reconcile_interval,
                "reconcile_interval",
            ),
        ] {
            self.set(slot, v, &k(name), Checker::duration);
        }
        self.set(
            &mut p.reconcile_url,
            &f.reconcile_url,
            &k("reconcile_url"),
            |c, path, v| {
                let s = c.string(path, v)?;
                ReconcileUrl::parse(s.trim())
                    .map(Some)
                    .map_err(|e| c.err(path, e))
                    .ok()
            },
        );
        if p.on_unknown_outcome == OnUnknownOutcome::Reconcile && p.reconcile_url.is_none() {
            self.err(
                &k("reconcile_url"),
                "is required when on_unknown_outcome = \"reconcile\"".into(),
            );
        }
        self.new_keys(at, f, &mut p);
        self.intake(at, f, &mut p, preset);
        if p.lease_ttl < Duration::from_millis(30) {
            self.err(
                &k("lease_ttl"),
                "must be at least 30ms so it can be renewed in time".into(),
            );
        }
        p
    }

    /// `new_keys_per_scope` ("200/s", "50/m", "10/h") and `new_keys_burst`
    /// over the inherited rate.
    fn new_keys(&mut self, at: &str, f: &PolicyFile, p: &mut Policy) {
        let rate_at = format!("{at}.new_keys_per_scope");
        let burst_at = format!("{at}.new_keys_burst");
        let mut text = None;
        self.set(&mut text, &f.new_keys_per_scope, &rate_at, |c, path, v| {
            c.string(path, v).map(Some)
        });
        let mut burst: Option<u32> = None;
        self.set(&mut burst, &f.new_keys_burst, &burst_at, |c, path, v| {
            Checker::int(1, 1_000_000)(c, path, v).map(Some)
        });
        match (text, burst) {
            (Some(t), b) => match Rate::parse(&t, b) {
                Some(rate) => p.new_keys = Some(rate),
                None => self.err(
                    &rate_at,
                    format!("{t:?} is not a rate (e.g. \"200/s\", \"50/m\", \"10/h\")"),
                ),
            },
            (None, Some(b)) => match &mut p.new_keys {
                Some(rate) => rate.burst = f64::from(b),
                None => self.err(&burst_at, "needs new_keys_per_scope".into()),
            },
            (None, None) => {}
        }
    }

    fn dedup(&mut self, f: DedupFile) -> DedupConfig {
        let mut d = DedupConfig::default();
        for (slot, v, path) in [
            (&mut d.lease_ttl, &f.lease_ttl, "dedup.lease_ttl"),
            (&mut d.retention, &f.retention, "dedup.retention"),
            (
                &mut d.failed_retention,
                &f.failed_retention,
                "dedup.failed_retention",
            ),
        ] {
            self.set(slot, v, path, Checker::duration);
        }
        for (slot, v, path) in [
            (
                &mut d.max_result_bytes,
                &f.max_result_bytes,
                "dedup.max_result_bytes",
            ),
            (
                &mut d.max_request_body,
                &f.max_request_body,
                "dedup.max_request_body",
            ),
        ] {
            self.set(slot, v, path, Checker::size);
        }
        self.set(
            &mut d.max_attempts,
            &f.max_attempts,
            "dedup.max_attempts",
            Checker::int(1, 1000),
        );
        self.set(
            &mut d.max_key_length,
            &f.max_key_length,
            "dedup.max_key_length",
            Checker::int(1, 8192),
        );
        self.set(
            &mut d.max_batch,
            &f.max_batch,
            "dedup.max_batch",
            Checker::int(1, 100_000),
        );
        d
    }
}
