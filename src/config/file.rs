//! The config file as written: every leaf an untyped TOML value, so the
//! checker can name each problem with its key path.

use std::path::Path;

use serde::Deserialize;
use toml::Value;

/// Every problem found, one line each, each naming its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("\n"))
    }
}

impl std::error::Error for ConfigErrors {}

/// The file as written: every leaf untyped so each problem can be named.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub(super) listen: Option<Value>,
    pub(super) admin_listen: Option<Value>,
    pub(super) upstream: Option<Value>,
    pub(super) upstream_timeout: Option<Value>,
    pub(super) upstream_protocol: Option<Value>,
    pub(super) upstream_ca_file: Option<Value>,
    pub(super) upstream_cert_file: Option<Value>,
    pub(super) upstream_key_file: Option<Value>,
    pub(super) danger_accept_invalid_certs: Option<Value>,
    pub(super) upstream_max_idle: Option<Value>,
    pub(super) upstream_idle_timeout: Option<Value>,
    pub(super) drain_timeout: Option<Value>,
    pub(super) max_connections: Option<Value>,
    pub(super) event_loops: Option<Value>,
    pub(super) admin_token: Option<Value>,
    pub(super) admin_token_file: Option<Value>,
    pub(super) admin_read_token: Option<Value>,
    pub(super) admin_read_token_file: Option<Value>,
    pub(super) metrics_public: Option<Value>,
    pub(super) header_read_timeout: Option<Value>,
    pub(super) body_read_timeout: Option<Value>,
    pub(super) log_format: Option<Value>,
    /// `[store]`: its keys depend on the backend, which checks its own.
    pub(super) store: Option<toml::Table>,
    pub(super) idempotency: Option<PolicyFile>,
    pub(super) routes: Option<Vec<PolicyFile>>,
    pub(super) dedup: Option<DedupFile>,
    /// `[tracing]`: checked key by key against the environment.
    pub(super) tracing: Option<toml::Table>,
    /// `[[consumers]]`: checked key by key.
    pub(super) consumers: Option<Vec<toml::Table>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DedupFile {
    pub(super) lease_ttl: Option<Value>,
    pub(super) retention: Option<Value>,
    pub(super) failed_retention: Option<Value>,
    pub(super) max_attempts: Option<Value>,
    pub(super) max_key_length: Option<Value>,
    pub(super) max_result_bytes: Option<Value>,
    pub(super) max_batch: Option<Value>,
    pub(super) max_request_body: Option<Value>,
}

/// `[idempotency]` and each `[[routes]]` entry (which adds `path`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PolicyFile {
    pub(super) path: Option<Value>,
    pub(super) header: Option<Value>,
    pub(super) key_from: Option<Value>,
    pub(super) preset: Option<Value>,
    pub(super) secrets: Option<Value>,
    pub(super) signature_tolerance: Option<Value>,
    pub(super) fingerprint_body: Option<Value>,
    pub(super) methods: Option<Value>,
    pub(super) required: Option<Value>,
    pub(super) record_ttl: Option<Value>,
    pub(super) lease_ttl: Option<Value>,
    pub(super) wait_timeout: Option<Value>,
    pub(super) scope_headers: Option<Value>,
    pub(super) fingerprint_headers: Option<Value>,
    pub(super) max_key_length: Option<Value>,
    pub(super) max_request_body: Option<Value>,
    pub(super) max_response_body: Option<Value>,
    pub(super) uncacheable_statuses: Option<Value>,
    pub(super) replay_strip_headers: Option<Value>,
    pub(super) no_retry_headers: Option<Value>,
    pub(super) on_unknown_outcome: Option<Value>,
    pub(super) unknown_statuses: Option<Value>,
    pub(super) unknown_ttl: Option<Value>,
    pub(super) reconcile_url: Option<Value>,
    pub(super) reconcile_timeout: Option<Value>,
    pub(super) reconcile_interval: Option<Value>,
    pub(super) new_keys_per_scope: Option<Value>,
    pub(super) new_keys_burst: Option<Value>,
    pub(super) upstream: Option<Value>,
    pub(super) upstream_timeout: Option<Value>,
    pub(super) upstream_protocol: Option<Value>,
    pub(super) upstream_ca_file: Option<Value>,
    pub(super) upstream_cert_file: Option<Value>,
    pub(super) upstream_key_file: Option<Value>,
    pub(super) danger_accept_invalid_certs: Option<Value>,
    pub(super) upstream_max_idle: Option<Value>,
    pub(super) upstream_idle_timeout: Option<Value>,
}

/// The upstream keys as one section (the top level or a route) writes them.
pub(super) struct UpstreamKeys<'a> {
    pub upstream: &'a Option<Value>,
    pub timeout: &'a Option<Value>,
    pub protocol: &'a Option<Value>,
    pub ca_file: &'a Option<Value>,
    pub cert_file: &'a Option<Value>,
    pub key_file: &'a Option<Value>,
    pub danger: &'a Option<Value>,
    pub max_idle: &'a Option<Value>,
    pub idle_timeout: &'a Option<Value>,
}

impl UpstreamKeys<'_> {
    pub fn any(&self) -> bool {
        [
            self.upstream,
            self.timeout,
            self.protocol,
            self.ca_file,
            self.cert_file,
            self.key_file,
            self.danger,
            self.max_idle,
            self.idle_timeout,
        ]
        .iter()
        .any(|v| v.is_some())
    }
}

/// The upstream keys of a section that has them (same names in both).
macro_rules! upstream_keys {
    ($section:ty) => {
        impl $section {
            pub(super) fn upstream_keys(&self) -> UpstreamKeys<'_> {
                UpstreamKeys {
                    upstream: &self.upstream,
                    timeout: &self.upstream_timeout,
                    protocol: &self.upstream_protocol,
                    ca_file: &self.upstream_ca_file,
                    cert_file: &self.upstream_cert_file,
                    key_file: &self.upstream_key_file,
                    danger: &self.danger_accept_invalid_certs,
                    max_idle: &self.upstream_max_idle,
                    idle_timeout: &self.upstream_idle_timeout,
                }
            }
        }
    };
}
upstream_keys!(FileConfig);
upstream_keys!(PolicyFile);

impl FileConfig {
    /// Parses TOML text. A syntax or shape error is one line with its place.
    pub fn parse(text: &str) -> Result<Self, ConfigErrors> {
        toml::from_str(text).map_err(|e| {
            let place = e.span().map(|s| {
                let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
                format!(" (line {line})")
            });
            let msg = e.message().trim().replace('\n', " ");
            ConfigErrors(vec![format!("config{}: {msg}", place.unwrap_or_default())])
        })
    }

    /// Reads and parses a file.
    pub fn read(path: &Path) -> Result<Self, ConfigErrors> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors(vec![format!("{}: cannot read: {e}", path.display())]))?;
        Self::parse(&text).map_err(|ConfigErrors(v)| {
            ConfigErrors(
                v.into_iter()
                    .map(|m| format!("{}: {m}", path.display()))
                    .collect(),
            )
        })
    }
}
