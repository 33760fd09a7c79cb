//! The config file as written: every leaf an untyped TOML value, so the
//! checker can name each problem with its key path.

use std::path::Path;

use serde::Deserialize;
use toml::Value;

use super::ConfigErrors;

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
    pub(super) drain_timeout: Option<Value>,
    pub(super) max_connections: Option<Value>,
    pub(super) admin_token: Option<Value>,
    pub(super) admin_token_file: Option<Value>,
    pub(super) admin_read_token: Option<Value>,
    pub(super) admin_read_token_file: Option<Value>,
    pub(super) metrics_public: Option<Value>,
    pub(super) header_read_timeout: Option<Value>,
    pub(super) body_read_timeout: Option<Value>,
    pub(super) log_format: Option<Value>,
    pub(super) store: Option<StoreFile>,
    pub(super) idempotency: Option<PolicyFile>,
    pub(super) routes: Option<Vec<PolicyFile>>,
    pub(super) dedup: Option<DedupFile>,
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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StoreFile {
    pub(super) backend: Option<Value>,
    pub(super) urls: Option<Value>,
    pub(super) key_prefix: Option<Value>,
    pub(super) on_store_error: Option<Value>,
    pub(super) timeout: Option<Value>,
    pub(super) max_entries: Option<Value>,
    pub(super) max_bytes: Option<Value>,
    pub(super) min_replicas: Option<Value>,
    pub(super) replica_ack_timeout: Option<Value>,
    pub(super) replay_cache: Option<Value>,
    pub(super) encryption: Option<Value>,
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
}

/// The upstream keys of a section that has them (same names in both).
macro_rules! upstream_keys {
    ($section:ty) => {
        impl $section {
            pub(super) fn upstream_keys(&self) -> super::upstream::UpstreamKeys<'_> {
                super::upstream::UpstreamKeys {
                    upstream: &self.upstream,
                    timeout: &self.upstream_timeout,
                    protocol: &self.upstream_protocol,
                    ca_file: &self.upstream_ca_file,
                    cert_file: &self.upstream_cert_file,
                    key_file: &self.upstream_key_file,
                    danger: &self.danger_accept_invalid_certs,
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
