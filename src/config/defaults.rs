//! Every default, in one place: what idemgate does for each key the file,
//! the flags and the environment leave unset (the README and
//! `config/idemgate.example.toml` list the same values).

use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderName, Method};

use super::model::{AdminTokens, Config, DedupConfig, LogFormat, OnStoreError, StoreConfig};
use super::routes::{OnUnknownOutcome, Policies, Policy};
use super::traces::TracesConfig;
use crate::idempotency::key_from::KeyFrom;
use crate::store::registry;

/// How far a webhook's signed timestamp may be from now: five minutes, as
/// Stripe, Slack and Standard Webhooks recommend.
pub(super) const SIGNATURE_TOLERANCE: Duration = Duration::from_secs(300);

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: ([127, 0, 0, 1], 8081).into(),
            admin_listen: ([127, 0, 0, 1], 9901).into(),
            upstream: None,
            upstream_timeout: Duration::from_secs(60),
            default_upstream: None,
            drain_timeout: Duration::from_secs(30),
            max_connections: 10_000,
            event_loops: 0,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            log_format: LogFormat::Text,
            store: StoreConfig::default(),
            policies: Policies::default(),
            dedup: DedupConfig::default(),
            admin_tokens: AdminTokens {
                write: None,
                read: None,
                metrics_public: true,
            },
            traces: TracesConfig::default(),
            consumers: Vec::new(),
            warnings: Vec::new(),
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: registry::default_backend(),
            on_store_error: OnStoreError::Reject,
            timeout: Duration::from_secs(1),
            encryption: Vec::new(),
        }
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            key_from: KeyFrom::header_named(HeaderName::from_static("idempotency-key")),
            methods: vec![Method::POST, Method::PATCH],
            required: false,
            record_ttl: Duration::from_secs(24 * 3600),
            lease_ttl: Duration::from_secs(30),
            wait_timeout: Duration::from_secs(10),
            scope_headers: vec![header::AUTHORIZATION],
            fingerprint_headers: vec![header::CONTENT_TYPE],
            fingerprint_body: true,
            max_key_length: 255,
            max_request_body: 1 << 20,
            max_response_body: 4 << 20,
            uncacheable_statuses: vec![408, 429, 502, 503, 504],
            replay_strip_headers: vec![header::SET_COOKIE],
            no_retry_headers: Vec::new(),
            on_unknown_outcome: OnUnknownOutcome::Hold,
            unknown_statuses: vec![502, 504],
            unknown_ttl: None,
            reconcile_url: None,
            reconcile_timeout: Duration::from_secs(2),
            reconcile_interval: Duration::from_secs(10),
            new_keys: None,
            webhook: None,
        }
    }
}

impl Default for Policies {
    fn default() -> Self {
        Policies {
            default: Arc::new(Policy::default()),
            routes: Vec::new(),
        }
    }
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
