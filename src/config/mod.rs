//! Configuration in two steps: loose input → checked [`Config`].
//!
//! The file is read into [`FileConfig`], whose leaves are untyped TOML values,
//! so that [`Config::from_parts`] can report *every* problem with its key path
//! (`idempotency.record_ttl: "forever" is not a duration ...`) instead of
//! stopping at the first type error. CLI flags and `IDEMGATE_*` variables
//! (clap reads both, flag first) are laid over the file: flag > env > file >
//! default.
//!
//! Rooms: [`cli`] (flags and subcommands), [`file`] (the file as written),
//! `check` (loose values → checked ones, every problem named), [`routes`]
//! (policies and path patterns), `render` (the effective config as TOML).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::Uri;
use toml::Value;

use crate::store::RedisOptions;

mod check;
pub mod cli;
pub mod file;
mod render;
pub mod routes;

use check::Checker;
pub use cli::{Cli, Command, RunArgs};
pub use file::FileConfig;
pub use routes::{PathPattern, Policies, Policy, Route};

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// `http://host:port`; `None` runs dedup-only (no proxy listener).
    pub upstream: Option<Uri>,
    pub upstream_timeout: Duration,
    /// How long SIGTERM waits for in-flight requests.
    pub drain_timeout: Duration,
    /// Open connections each listener serves at once; the next waits in
    /// the listen backlog until one closes.
    pub max_connections: usize,
    /// How long a client may take to send request headers.
    pub header_read_timeout: Duration,
    /// How long a client may take to send a covered request's body (it is
    /// buffered before the lease is taken).
    pub body_read_timeout: Duration,
    pub log_format: LogFormat,
    pub store: StoreConfig,
    pub policies: Policies,
    pub dedup: DedupConfig,
}

/// Defaults and limits of the consumer dedup API (`[dedup]`).
#[derive(Debug, Clone, PartialEq)]
pub struct DedupConfig {
    /// Lease of a claim that names no `lease_ms`.
    pub lease_ttl: Duration,
    /// How long completed (and leased, pending) records are kept, unless a
    /// call says `retention_ms`/`ttl_ms`. Must outlast the broker's
    /// redelivery horizon.
    pub retention: Duration,
    /// How long dead letters are kept.
    pub failed_retention: Duration,
    /// Claims allowed per key before it fails, unless a claim says.
    pub max_attempts: u32,
    pub max_key_length: usize,
    /// Largest `result` a complete call may record (serialized JSON).
    pub max_result_bytes: u64,
    /// Most items in one `:batch` call.
    pub max_batch: usize,
    /// Largest request body on the dedup API.
    pub max_request_body: u64,
}

impl Default for DedupConfig {
    fn default() -> Self {
        DedupConfig {
            lease_ttl: Duration::from_secs(30),
            retention: Duration::from_secs(24 * 3600),
            failed_retention: Duration::from_secs(7 * 24 * 3600),
            max_attempts: 10,
            max_key_length: 512,
            max_result_bytes: 64 << 10,
            max_batch: 1000,
            max_request_body: 4 << 20,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Memory,
    Redis,
    RedisCluster,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStoreError {
    /// 503 with Retry-After; the upstream is not called.
    Reject,
    /// Forward without idempotency, logged and counted.
    PassThrough,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub backend: Backend,
    pub urls: Vec<String>,
    pub key_prefix: String,
    pub on_store_error: OnStoreError,
    /// Upper bound on any one store call.
    pub timeout: Duration,
    /// Memory store bound; new keys get 503 beyond it.
    pub max_entries: usize,
}

impl StoreConfig {
    /// How to reach Redis, for the Redis backends.
    pub fn redis_options(&self) -> RedisOptions {
        RedisOptions {
            key_prefix: self.key_prefix.clone(),
            timeout: self.timeout,
            ..RedisOptions::new(self.urls.clone(), self.backend == Backend::RedisCluster)
        }
    }
}

/// Every problem found, one line each, each naming its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("\n"))
    }
}

impl std::error::Error for ConfigErrors {}

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
        let flag = |name: &str, env: &str| format!("--{name} (or {env})");

        let listen = match &args.listen {
            Some(v) => c.addr(
                &flag("listen", "IDEMGATE_LISTEN"),
                &Value::String(v.clone()),
            ),
            None => file.listen.as_ref().and_then(|v| c.addr("listen", v)),
        };
        let admin_listen = match &args.admin_listen {
            Some(v) => c.addr(
                &flag("admin-listen", "IDEMGATE_ADMIN_LISTEN"),
                &Value::String(v.clone()),
            ),
            None => file
                .admin_listen
                .as_ref()
                .and_then(|v| c.addr("admin_listen", v)),
        };
        let upstream = match &args.upstream {
            Some(v) => c.upstream(
                &flag("upstream", "IDEMGATE_UPSTREAM"),
                &Value::String(v.clone()),
            ),
            None => file
                .upstream
                .as_ref()
                .and_then(|v| c.upstream("upstream", v)),
        };
        let upstream_timeout = c.opt(
            &file.upstream_timeout,
            "upstream_timeout",
            Checker::duration,
        );
        let drain_timeout = c.opt(&file.drain_timeout, "drain_timeout", Checker::duration);
        let max_connections = file
            .max_connections
            .as_ref()
            .and_then(|v| c.uint("max_connections", v, 1, 1_000_000));
        let header_read_timeout = c.opt(
            &file.header_read_timeout,
            "header_read_timeout",
            Checker::duration,
        );
        let body_read_timeout = c.opt(
            &file.body_read_timeout,
            "body_read_timeout",
            Checker::duration,
        );
        let log_format = match &args.log_format {
            Some(v) => c.log_format(
                &flag("log-format", "IDEMGATE_LOG_FORMAT"),
                &Value::String(v.clone()),
            ),
            None => file
                .log_format
                .as_ref()
                .and_then(|v| c.log_format("log_format", v)),
        };

        let store = c.store(file.store.unwrap_or_default(), args);

        let idem = file.idempotency.unwrap_or_default();
        if idem.path.is_some() {
            c.err(
                "idempotency.path",
                "only [[routes]] entries take a path".into(),
            );
        }
        let default = Arc::new(c.policy("idempotency", &idem, &Policy::default()));
        let mut routes = Vec::new();
        for (i, r) in file.routes.unwrap_or_default().iter().enumerate() {
            let at = format!("routes[{i}]");
            let pattern = match &r.path {
                None => {
                    c.err(&format!("{at}.path"), "is required".into());
                    None
                }
                Some(v) => c.string(&format!("{at}.path"), v).and_then(|s| {
                    PathPattern::parse(&s)
                        .map_err(|e| c.err(&format!("{at}.path"), e))
                        .ok()
                }),
            };
            let policy = Arc::new(c.policy(&at, r, &default));
            if let Some(pattern) = pattern {
                routes.push(Route { pattern, policy });
            }
        }

        let dedup = c.dedup(file.dedup.unwrap_or_default());

        if !c.errors.is_empty() {
            return Err(ConfigErrors(c.errors));
        }
        Ok(Config {
            listen: listen.unwrap_or(([127, 0, 0, 1], 8081).into()),
            admin_listen: admin_listen.unwrap_or(([127, 0, 0, 1], 9901).into()),
            upstream,
            upstream_timeout: upstream_timeout.unwrap_or(Duration::from_secs(60)),
            drain_timeout: drain_timeout.unwrap_or(Duration::from_secs(30)),
            max_connections: max_connections.map_or(10_000, |n| n as usize),
            header_read_timeout: header_read_timeout.unwrap_or(Duration::from_secs(10)),
            body_read_timeout: body_read_timeout.unwrap_or(Duration::from_secs(30)),
            log_format: log_format.unwrap_or(LogFormat::Text),
            store,
            policies: Policies { default, routes },
            dedup,
        })
    }
}

/// Parses `"1MiB"`, `"512KiB"`, `"2MB"`, `"100B"` or `"4096"`.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests;
