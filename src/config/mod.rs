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
//! `defaults` (every default, once), `check` (loose values → checked ones,
//! every problem named), `sections` (each section over its defaults),
//! [`routes`] (policies and path patterns), `render` (the effective config
//! as TOML, through serde).

use std::net::SocketAddr;
use std::time::Duration;

use http::Uri;

use crate::store::RedisOptions;

mod check;
pub mod cli;
mod defaults;
pub mod encryption;
pub mod file;
mod intake;
mod render;
pub mod routes;
mod sections;
pub mod upstream;

pub use cli::{Cli, Command, RunArgs};
pub use encryption::{EncryptionKey, KeySource};
pub use file::FileConfig;
pub use routes::{
    OnUnknownOutcome, PathPattern, Policies, Policy, ReconcileUrl, Route, WebhookCheck,
};
pub use upstream::{UpstreamConfig, UpstreamProtocol};

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// `http://host:port`; `None` runs dedup-only (no proxy listener).
    pub upstream: Option<Uri>,
    pub upstream_timeout: Duration,
    /// Everything about the top-level upstream (`upstream`,
    /// `upstream_timeout`, `upstream_protocol`, the TLS keys), if any.
    pub default_upstream: Option<UpstreamConfig>,
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
    pub admin_tokens: AdminTokens,
    /// Legal but risky choices (e.g. `key_from = "body-sha256"`): printed by
    /// check-config, logged at start.
    pub warnings: Vec<String>,
}

/// Who may call the admin API (see `admin::auth`). No `write` token: open.
#[derive(Clone, Default, PartialEq)]
pub struct AdminTokens {
    /// `admin_token` / `admin_token_file` / `--admin-token`: every endpoint.
    pub write: Option<String>,
    /// `admin_read_token` / `admin_read_token_file`: read-only endpoints.
    pub read: Option<String>,
    /// `metrics_public` (default true): `/metrics` needs no token.
    pub metrics_public: bool,
}

/// Tokens are secrets: never printed.
impl std::fmt::Debug for AdminTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminTokens")
            .field("write", &self.write.as_ref().map(|_| "***"))
            .field("read", &self.read.as_ref().map(|_| "***"))
            .field("metrics_public", &self.metrics_public)
            .finish()
    }
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

#[derive(Debug, Clone, PartialEq)]
pub struct StoreConfig {
    pub backend: Backend,
    pub urls: Vec<String>,
    pub key_prefix: String,
    pub on_store_error: OnStoreError,
    /// Upper bound on any one store call.
    pub timeout: Duration,
    /// Memory store bound; new keys get 503 beyond it.
    pub max_entries: usize,
    /// Memory store bound in bytes (keys, records, in-flight entries).
    pub max_bytes: u64,
    /// Redis: replicas that must acknowledge a lease (and a record) before
    /// idemgate relies on it (`WAIT`); 0: none.
    pub min_replicas: u32,
    pub replica_ack_timeout: Duration,
    /// Redis (standalone): bytes of completed records kept in the process
    /// so replays need no round trip; 0: off.
    pub replay_cache: u64,
    /// Keys that seal stored responses and dedup results; empty: off.
    pub encryption: Vec<EncryptionKey>,
}

impl StoreConfig {
    /// How to reach Redis, for the Redis backends.
    pub fn redis_options(&self) -> RedisOptions {
        RedisOptions {
            key_prefix: self.key_prefix.clone(),
            timeout: self.timeout,
            min_replicas: self.min_replicas,
            replica_ack_timeout: self.replica_ack_timeout,
            replay_cache_bytes: usize::try_from(self.replay_cache).unwrap_or(usize::MAX),
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
