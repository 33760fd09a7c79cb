//! The checked configuration: [`Config`] and the sections it holds, as
//! the rest of the program reads them. How they are made from the file and
//! the flags is in `sections`; their defaults in `defaults`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::Uri;

use super::consumers::ConsumerConfig;
use super::encryption::EncryptionKey;
use super::routes::Policies;
use super::traces::TracesConfig;
use super::upstream::UpstreamConfig;
use crate::store::BackendConfig;

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
    /// Event loops serving the proxy listener, each a thread with a
    /// single-threaded runtime and a listening socket of its own
    /// (`SO_REUSEPORT`); 0 serves it on the shared work-stealing runtime.
    pub event_loops: usize,
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
    /// `[tracing]` over the `OTEL_*` environment.
    pub traces: TracesConfig,
    /// `[[consumers]]`: queues idemgate reads and delivers from.
    pub consumers: Vec<ConsumerConfig>,
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
pub enum OnStoreError {
    /// 503 with Retry-After; the upstream is not called.
    Reject,
    /// Forward without idempotency, logged and counted.
    PassThrough,
}

/// `[store]`: the keys every backend shares, and the chosen backend's own
/// (checked by the backend itself; see `crate::store::registry`).
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub backend: Arc<dyn BackendConfig>,
    pub on_store_error: OnStoreError,
    /// Upper bound on any one store call.
    pub timeout: Duration,
    /// Keys that seal stored responses and dedup results; empty: off.
    pub encryption: Vec<EncryptionKey>,
}

/// Equal when every key in force is: a reload compares them to tell
/// whether `[store]` changed (which needs a restart).
impl PartialEq for StoreConfig {
    fn eq(&self, other: &Self) -> bool {
        self.backend.name() == other.backend.name()
            && self.backend.render() == other.backend.render()
            && self.on_store_error == other.on_store_error
            && self.timeout == other.timeout
            && self.encryption == other.encryption
    }
}
