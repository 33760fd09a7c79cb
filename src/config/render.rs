//! The effective configuration as TOML, as `check-config` prints it: a
//! serde view of [`Config`] in the file's own layout, so what it prints can
//! be read back as a config file. Redis passwords are shown as `***`.

use std::collections::BTreeMap;

use http::HeaderName;
use serde::Serialize;

use super::consumers::{self, ConsumerConfig, MessageKey};
use super::encryption::KeySource;
use super::model::{Config, DedupConfig, LogFormat, OnStoreError, StoreConfig};
use super::routes::{OnUnknownOutcome, Policy, ReconcileUrl};
use super::traces::TracesConfig;
use super::upstream::{UpstreamConfig, UpstreamProtocol};

/// A duration as the file writes it (`"30s"`, `"1day"`).
fn d(d: std::time::Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn names(v: &[HeaderName]) -> Vec<&str> {
    v.iter().map(HeaderName::as_str).collect()
}

#[derive(Serialize)]
struct FileView<'a> {
    listen: String,
    admin_listen: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream: Option<String>,
    upstream_timeout: String,
    #[serde(flatten)]
    upstream_more: Option<UpstreamView>,
    drain_timeout: String,
    max_connections: usize,
    event_loops: usize,
    header_read_timeout: String,
    body_read_timeout: String,
    log_format: &'static str,
    /// Secrets: shown as set or not, never printed.
    #[serde(skip_serializing_if = "Option::is_none")]
    admin_token: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    admin_read_token: Option<&'static str>,
    metrics_public: bool,
    store: StoreView,
    idempotency: PolicyView<'a>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    routes: Vec<PolicyView<'a>>,
    dedup: DedupView,
    #[serde(skip_serializing_if = "Option::is_none")]
    tracing: Option<TracingView>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    consumers: Vec<ConsumerView>,
}

/// One `[[consumers]]` entry; the broker without its password.
#[derive(Serialize)]
struct ConsumerView {
    name: String,
    broker: String,
    source: String,
    /// None for AMQP (no group), shown as absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    group: Option<String>,
    deliver_to: String,
    key_from: String,
    concurrency: usize,
    batch_size: usize,
    max_attempts: u32,
    retry_backoff: String,
    retry_backoff_max: String,
    delivery_timeout: String,
    /// None: the AMQP queue's own dead-letter exchange.
    #[serde(skip_serializing_if = "Option::is_none")]
    dead_letter: Option<String>,
    on_unknown_outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reconcile_url: Option<String>,
}

impl ConsumerView {
    fn of(c: &ConsumerConfig) -> Self {
        ConsumerView {
            name: c.name.clone(),
            broker: consumers::shown_broker(c),
            source: c.source.clone(),
            group: (!c.group.is_empty()).then(|| c.group.clone()),
            deliver_to: c.deliver_to.to_string(),
            key_from: match &c.key_from {
                MessageKey::MessageId => "message-id".into(),
                MessageKey::Field(f) => format!("field:{f}"),
            },
            concurrency: c.concurrency,
            batch_size: c.batch_size,
            max_attempts: c.max_attempts,
            retry_backoff: d(c.retry_backoff),
            retry_backoff_max: d(c.retry_backoff_max),
            delivery_timeout: d(c.delivery_timeout),
            dead_letter: (!c.dead_letter.is_empty()).then(|| c.dead_letter.clone()),
            on_unknown_outcome: consumers::ON_UNKNOWN
                .iter()
                .find(|(_, v)| *v == c.on_unknown_outcome)
                .map_or("hold", |(name, _)| name),
            reconcile_url: c.reconcile_url.as_ref().map(|u| u.as_str().to_owned()),
        }
    }
}

/// `[tracing]` when it is on; header values (API keys) shown as `***`.
#[derive(Serialize)]
struct TracingView {
    endpoint: String,
    service_name: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    resource_attributes: BTreeMap<String, String>,
    sampler: &'static str,
    sampler_arg: f64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    headers: BTreeMap<String, &'static str>,
    timeout: String,
}

impl TracingView {
    fn of(t: &TracesConfig) -> Option<Self> {
        Some(TracingView {
            endpoint: t.endpoint.as_ref()?.to_string(),
            service_name: t.service_name.clone(),
            resource_attributes: t.resource_attributes.iter().cloned().collect(),
            sampler: t.sampler.as_str(),
            sampler_arg: t.sampler_arg,
            headers: t.headers.keys().map(|k| (k.clone(), "***")).collect(),
            timeout: d(t.timeout),
        })
    }
}

/// A route's own upstream (the top level's extra keys, flattened there).
#[derive(Serialize)]
struct UpstreamView {
    upstream_protocol: UpstreamProtocol,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream_ca_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream_cert_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream_key_file: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    danger_accept_invalid_certs: bool,
    upstream_max_idle: usize,
    upstream_idle_timeout: String,
}

impl UpstreamView {
    fn of(u: &UpstreamConfig) -> Self {
        let path = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.display().to_string());
        UpstreamView {
            upstream_protocol: u.protocol,
            upstream_ca_file: path(&u.ca_file),
            upstream_cert_file: path(&u.cert_file),
            upstream_key_file: path(&u.key_file),
            danger_accept_invalid_certs: u.danger_accept_invalid_certs,
            upstream_max_idle: u.max_idle,
            upstream_idle_timeout: d(u.idle_timeout),
        }
    }
}

/// Which upstream a route sends to, when it is its own.
#[derive(Serialize)]
struct RouteUpstreamView {
    upstream: String,
    upstream_timeout: String,
    #[serde(flatten)]
    more: UpstreamView,
}

#[derive(Serialize)]
struct StoreView {
    backend: &'static str,
    on_store_error: &'static str,
    timeout: String,
    /// The backend's own keys, as it renders them.
    #[serde(flatten)]
    own: toml::Table,
    /// Key ids and where they come from; never the keys.
    #[serde(skip_serializing_if = "Option::is_none")]
    encryption: Option<EncryptionView>,
}

#[derive(Serialize)]
struct EncryptionView {
    keys: Vec<KeyView>,
}

#[derive(Serialize)]
struct KeyView {
    id: String,
    #[serde(flatten)]
    source: KeySource,
}

#[derive(Serialize)]
struct PolicyView<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<&'a str>,
    /// Only on webhook routes; the keys it sets are rendered too.
    #[serde(skip_serializing_if = "Option::is_none")]
    preset: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    secrets: Option<Vec<KeySource>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    signature_tolerance: Option<String>,
    key_from: String,
    methods: Vec<&'a str>,
    required: bool,
    record_ttl: String,
    lease_ttl: String,
    wait_timeout: String,
    scope_headers: Vec<&'a str>,
    fingerprint_headers: Vec<&'a str>,
    fingerprint_body: bool,
    max_key_length: usize,
    max_request_body: u64,
    max_response_body: u64,
    uncacheable_statuses: &'a [u16],
    replay_strip_headers: Vec<&'a str>,
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    no_retry_headers: std::collections::BTreeMap<&'a str, &'a str>,
    on_unknown_outcome: &'static str,
    unknown_statuses: &'a [u16],
    /// Only when set: unset, it follows `record_ttl`.
    #[serde(skip_serializing_if = "Option::is_none")]
    unknown_ttl: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reconcile_url: Option<&'a str>,
    reconcile_timeout: String,
    reconcile_interval: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    new_keys_per_scope: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    new_keys_burst: Option<u32>,
    #[serde(flatten)]
    upstream: Option<RouteUpstreamView>,
}

#[derive(Serialize)]
struct DedupView {
    lease_ttl: String,
    retention: String,
    failed_retention: String,
    max_attempts: u32,
    max_key_length: usize,
    max_result_bytes: u64,
    max_batch: usize,
    max_request_body: u64,
}

impl<'a> PolicyView<'a> {
    fn of(path: Option<&'a str>, p: &'a Policy) -> Self {
        PolicyView {
            path,
            preset: p.webhook.as_ref().map(|w| w.verifier.preset.name()),
            secrets: p.webhook.as_ref().map(|w| w.sources.clone()),
            signature_tolerance: p.webhook.as_ref().map(|w| d(w.verifier.tolerance)),
            key_from: p.key_from.render(),
            methods: p.methods.iter().map(|m| m.as_str()).collect(),
            required: p.required,
            record_ttl: d(p.record_ttl),
            lease_ttl: d(p.lease_ttl),
            wait_timeout: d(p.wait_timeout),
            scope_headers: names(&p.scope_headers),
            fingerprint_headers: names(&p.fingerprint_headers),
            fingerprint_body: p.fingerprint_body,
            max_key_length: p.max_key_length,
            max_request_body: p.max_request_body,
            max_response_body: p.max_response_body,
            uncacheable_statuses: &p.uncacheable_statuses,
            replay_strip_headers: names(&p.replay_strip_headers),
            no_retry_headers: p
                .no_retry_headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.to_str().unwrap_or("")))
                .collect(),
            on_unknown_outcome: match p.on_unknown_outcome {
                OnUnknownOutcome::Hold => "hold",
                OnUnknownOutcome::Release => "release",
                OnUnknownOutcome::Reconcile => "reconcile",
            },
            unknown_statuses: &p.unknown_statuses,
            unknown_ttl: p.unknown_ttl.map(d),
            reconcile_url: p.reconcile_url.as_ref().map(ReconcileUrl::as_str),
            reconcile_timeout: d(p.reconcile_timeout),
            reconcile_interval: d(p.reconcile_interval),
            new_keys_per_scope: p.new_keys.map(|r| format!("{}/s", r.per_second)),
            new_keys_burst: p.new_keys.map(|r| r.burst as u32),
            upstream: None,
        }
    }
}

impl StoreView {
    fn of(s: &StoreConfig) -> Self {
        StoreView {
            backend: s.backend.name(),
            on_store_error: match s.on_store_error {
                OnStoreError::Reject => "reject",
                OnStoreError::PassThrough => "pass-through",
            },
            timeout: d(s.timeout),
            own: s.backend.render(),
            encryption: (!s.encryption.is_empty()).then(|| EncryptionView {
                keys: s
                    .encryption
                    .iter()
                    .map(|k| KeyView {
                        id: k.id.clone(),
                        source: k.source.clone(),
                    })
                    .collect(),
            }),
        }
    }
}

impl DedupView {
    fn of(x: &DedupConfig) -> Self {
        DedupView {
            lease_ttl: d(x.lease_ttl),
            retention: d(x.retention),
            failed_retention: d(x.failed_retention),
            max_attempts: x.max_attempts,
            max_key_length: x.max_key_length,
            max_result_bytes: x.max_result_bytes,
            max_batch: x.max_batch,
            max_request_body: x.max_request_body,
        }
    }
}

impl Config {
    /// The effective configuration as TOML, for `check-config`.
    pub fn to_toml(&self) -> String {
        let view = FileView {
            listen: self.listen.to_string(),
            admin_listen: self.admin_listen.to_string(),
            upstream: self.upstream.as_ref().map(|u| u.to_string()),
            upstream_timeout: d(self.upstream_timeout),
            upstream_more: self.default_upstream.as_ref().map(UpstreamView::of),
            drain_timeout: d(self.drain_timeout),
            max_connections: self.max_connections,
            event_loops: self.event_loops,
            header_read_timeout: d(self.header_read_timeout),
            body_read_timeout: d(self.body_read_timeout),
            log_format: match self.log_format {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            },
            admin_token: self.admin_tokens.write.as_ref().map(|_| "***"),
            admin_read_token: self.admin_tokens.read.as_ref().map(|_| "***"),
            metrics_public: self.admin_tokens.metrics_public,
            store: StoreView::of(&self.store),
            idempotency: PolicyView::of(None, &self.policies.default),
            routes: self
                .policies
                .routes
                .iter()
                .map(|r| {
                    let mut v = PolicyView::of(Some(r.pattern.as_str()), &r.policy);
                    v.upstream = r.upstream.as_ref().map(|u| RouteUpstreamView {
                        upstream: u.uri.to_string(),
                        upstream_timeout: d(u.timeout),
                        more: UpstreamView::of(u),
                    });
                    v
                })
                .collect(),
            dedup: DedupView::of(&self.dedup),
            tracing: TracingView::of(&self.traces),
            consumers: self.consumers.iter().map(ConsumerView::of).collect(),
        };
        // Every field is a string, number, bool or list of those: always
        // representable in TOML.
        toml::to_string(&view).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}
