//! Prometheus metrics (SPEC §5). The registry is made by the caller (`main`,
//! or a test) and passed in, so each instance's counters stand alone.
//! How a proxy request ended and which store operation ran (the `outcome`
//! and `op` labels) are in `outcome`.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

mod outcome;

pub use outcome::{Outcome, StoreOp};

/// Buckets from 50 µs to a minute: fine enough to resolve sub-millisecond
/// proxy overhead, wide enough for slow upstreams.
const BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The consumer dedup API's operations and their usual results, pre-created
/// so the series exist from the start. Errors (`bad_request`,
/// `unavailable`) appear when they first happen.
pub const DEDUP_RESULTS: &[(&str, &[&str])] = &[
    ("mark", &["new", "duplicate"]),
    (
        "claim",
        &["acquired", "completed", "failed", "in_progress", "mismatch"],
    ),
    ("extend", &["ok", "lease_lost"]),
    ("complete", &["ok", "lease_lost"]),
    ("release", &["ok", "lease_lost"]),
];

/// Why an outcome was unknown (`cause` label).
/// The `result` label of `idemgate_webhook_signatures_total`.
pub const SIGNATURE_RESULTS: [&str; 5] = ["ok", "missing", "malformed", "stale", "mismatch"];

pub const UNKNOWN_CAUSES: [&str; 5] = ["timeout", "reset", "status", "lapsed", "unstored"];

/// What became of an unknown outcome (`resolution` label).
pub const UNKNOWN_RESOLUTIONS: [&str; 6] = [
    "held",
    "released",
    "reconciled_found",
    "reconciled_missing",
    "reconcile_failed",
    "settled_by_admin",
];

/// Every idemgate metric: one shared set, cloned as one `Arc` (a clone of
/// every series handle was two atomic operations per handle, on every
/// request; the profile showed it).
#[derive(Clone)]
pub struct Metrics(Arc<MetricSet>);

impl std::ops::Deref for Metrics {
    type Target = MetricSet;
    fn deref(&self) -> &MetricSet {
        &self.0
    }
}

/// The series behind [`Metrics`].
pub struct MetricSet {
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub upstream_duration: Histogram,
    pub store_duration: HistogramVec,
    pub store_errors: IntCounterVec,
    pub waiting_duplicates: IntGauge,
    /// Upgraded connections (WebSockets) joined to their upstream now.
    pub open_tunnels: IntGauge,
    pub lease_renewals: IntCounter,
    pub lease_lost: IntCounter,
    pub dedup_operations: IntCounterVec,
    pub record_decode_errors: IntCounter,
    /// `{cause, resolution}`: see [`UNKNOWN_CAUSES`], [`UNKNOWN_RESOLUTIONS`].
    pub unknown_outcomes: IntCounterVec,
    /// `{op}`: a begin or complete Redis did not confirm on `min_replicas`.
    pub replica_ack_failures: IntCounterVec,
    /// Bytes the memory store holds (keys, records, in-flight entries).
    pub store_bytes: IntGauge,
    /// `{preset, result}`: webhook signature checks; see [`SIGNATURE_RESULTS`].
    pub webhook_signatures: IntCounterVec,
    /// `{result}`: `hit` or `miss` of the replay cache.
    pub replay_cache_lookups: IntCounterVec,
    /// Spans not exported: the queue was full, or the collector failed.
    pub trace_spans_dropped: IntCounter,
    /// `{consumer, outcome}`: messages a consumer took to an end.
    pub deliveries: IntCounterVec,
    /// `{consumer}`: 1 while its broker answers.
    pub consumer_connected: IntGaugeVec,
    /// `{consumer}`: one message from its claim to its end, retries and
    /// backoff included.
    pub delivery_duration: HistogramVec,
    /// `{consumer}`: messages being handled now.
    pub deliveries_in_flight: IntGaugeVec,
    /// `{result}`: `success` or `failure` of a configuration reload.
    pub config_reloads: IntCounterVec,
    /// When the configuration in force was loaded (start or reload).
    pub config_last_reload_success: prometheus::Gauge,
    /// Per-label handles resolved once: the hot path indexes an array
    /// instead of hashing label values under a lock on every request.
    by_outcome: Arc<[(IntCounter, Histogram)]>,
    by_store_op: Arc<[(Histogram, IntCounter)]>,
    registry: Registry,
}

impl Metrics {
    /// Creates the metrics and registers them (and the process collector).
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new(
                "idemgate_requests_total",
                "Proxy requests by how they ended.",
            ),
            &["outcome"],
        )?;
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "idemgate_request_duration_seconds",
                "Proxy request duration by outcome.",
            )
            .buckets(BUCKETS.to_vec()),
            &["outcome"],
        )?;
        let upstream_duration = Histogram::with_opts(
            HistogramOpts::new(
                "idemgate_upstream_duration_seconds",
                "Upstream call duration, to the response head.",
            )
            .buckets(BUCKETS.to_vec()),
        )?;
        let store_duration = HistogramVec::new(
            HistogramOpts::new(
                "idemgate_store_operation_duration_seconds",
                "Store operation duration.",
            )
            .buckets(BUCKETS.to_vec()),
            &["op"],
        )?;
        let store_errors = IntCounterVec::new(
            Opts::new("idemgate_store_errors_total", "Failed store operations."),
            &["op"],
        )?;
        let waiting_duplicates = IntGauge::new(
            "idemgate_waiting_duplicates",
            "Duplicates waiting for an in-flight original.",
        )?;
        let open_tunnels = IntGauge::new(
            "idemgate_open_tunnels",
            "Upgraded connections (WebSockets and the like) joined to their upstream.",
        )?;
        let lease_renewals = IntCounter::new(
            "idemgate_lease_renewals_total",
            "Successful lease renewals.",
        )?;
        let lease_lost = IntCounter::new(
            "idemgate_lease_lost_total",
            "Leases found lost on renewal, completion or release.",
        )?;
        let dedup_operations = IntCounterVec::new(
            Opts::new(
                "idemgate_dedup_operations_total",
                "Consumer dedup API operations.",
            ),
            &["op", "result"],
        )?;
        let record_decode_errors = IntCounter::new(
            "idemgate_record_decode_errors_total",
            "Stored records this build could not decode (treated as misses).",
        )?;
        let unknown_outcomes = IntCounterVec::new(
            Opts::new(
                "idemgate_unknown_outcomes_total",
                "Forwarded requests whose outcome was unknown, by cause and what became of them.",
            ),
            &["cause", "resolution"],
        )?;
        let replica_ack_failures = IntCounterVec::new(
            Opts::new(
                "idemgate_replica_ack_failures_total",
                "Redis writes not acknowledged by min_replicas replicas in time.",
            ),
            &["op"],
        )?;
        let trace_spans_dropped = IntCounter::new(
            "idemgate_trace_spans_dropped_total",
            "Trace spans dropped: the export queue was full, or the collector was down, slow or failing.",
        )?;
        let deliveries = IntCounterVec::new(
            Opts::new(
                "idemgate_deliveries_total",
                "Messages a consumer took to an end, by outcome: delivered, duplicate, retried, dead_lettered, unknown, reconciled, no_key, in_progress, store_error.",
            ),
            &["consumer", "outcome"],
        )?;
        let consumer_connected = IntGaugeVec::new(
            Opts::new(
                "idemgate_consumer_connected",
                "1 while a consumer's broker answers, else 0.",
            ),
            &["consumer"],
        )?;
        let delivery_duration = HistogramVec::new(
            HistogramOpts::new(
                "idemgate_delivery_duration_seconds",
                "One message from its claim to its end (retries and backoff included), by consumer.",
            )
            .buckets(BUCKETS.to_vec()),
            &["consumer"],
        )?;
        let deliveries_in_flight = IntGaugeVec::new(
            Opts::new(
                "idemgate_deliveries_in_flight",
                "Messages a consumer is handling now.",
            ),
            &["consumer"],
        )?;
        let webhook_signatures = IntCounterVec::new(
            Opts::new(
                "idemgate_webhook_signatures_total",
                "Webhook signature checks on preset routes, by provider and result.",
            ),
            &["preset", "result"],
        )?;
        let replay_cache_lookups = IntCounterVec::new(
            Opts::new(
                "idemgate_replay_cache_lookups_total",
                "Lookups of completed records kept in the process (Redis), by result.",
            ),
            &["result"],
        )?;
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "idemgate_config_reloads_total",
                "Configuration reloads (SIGHUP or a change of the file), by result.",
            ),
            &["result"],
        )?;
        let config_last_reload_success = prometheus::Gauge::new(
            "idemgate_config_last_reload_success_timestamp_seconds",
            "Unix time the configuration in force was loaded (at start or by a reload).",
        )?;
        let store_bytes = IntGauge::new(
            "idemgate_store_bytes",
            "Bytes the memory store holds: keys, records and in-flight entries (0 on Redis).",
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new(
                "idemgate_build_info",
                "Always 1; labelled with the build's version.",
            ),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(request_duration.clone()))?;
        registry.register(Box::new(upstream_duration.clone()))?;
        registry.register(Box::new(store_duration.clone()))?;
        registry.register(Box::new(store_errors.clone()))?;
        registry.register(Box::new(waiting_duplicates.clone()))?;
        registry.register(Box::new(open_tunnels.clone()))?;
        registry.register(Box::new(lease_renewals.clone()))?;
        registry.register(Box::new(lease_lost.clone()))?;
        registry.register(Box::new(dedup_operations.clone()))?;
        registry.register(Box::new(record_decode_errors.clone()))?;
        registry.register(Box::new(unknown_outcomes.clone()))?;
        registry.register(Box::new(replica_ack_failures.clone()))?;
        registry.register(Box::new(store_bytes.clone()))?;
        registry.register(Box::new(webhook_signatures.clone()))?;
        registry.register(Box::new(config_reloads.clone()))?;
        registry.register(Box::new(replay_cache_lookups.clone()))?;
        registry.register(Box::new(trace_spans_dropped.clone()))?;
        registry.register(Box::new(deliveries.clone()))?;
        registry.register(Box::new(consumer_connected.clone()))?;
        registry.register(Box::new(delivery_duration.clone()))?;
        registry.register(Box::new(deliveries_in_flight.clone()))?;
        for result in ["hit", "miss"] {
            replay_cache_lookups.with_label_values(&[result]);
        }
        registry.register(Box::new(config_last_reload_success.clone()))?;
        for result in ["success", "failure"] {
            config_reloads.with_label_values(&[result]);
        }
        registry.register(Box::new(build_info))?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;

        // Pre-create every label value so dashboards and alerts see zeros
        // rather than absent series.
        for o in Outcome::ALL {
            requests.with_label_values(&[o.as_str()]);
            request_duration.with_label_values(&[o.as_str()]);
        }
        for op in StoreOp::ALL {
            store_errors.with_label_values(&[op.as_str()]);
            store_duration.with_label_values(&[op.as_str()]);
        }
        for cause in UNKNOWN_CAUSES {
            for resolution in UNKNOWN_RESOLUTIONS {
                unknown_outcomes.with_label_values(&[cause, resolution]);
            }
        }
        for op in ["begin", "complete"] {
            replica_ack_failures.with_label_values(&[op]);
        }
        for (op, results) in DEDUP_RESULTS {
            for result in *results {
                dedup_operations.with_label_values(&[op, result]);
            }
        }

        let by_outcome = Outcome::ALL
            .iter()
            .map(|o| {
                (
                    requests.with_label_values(&[o.as_str()]),
                    request_duration.with_label_values(&[o.as_str()]),
                )
            })
            .collect();
        let by_store_op = StoreOp::ALL
            .iter()
            .map(|op| {
                (
                    store_duration.with_label_values(&[op.as_str()]),
                    store_errors.with_label_values(&[op.as_str()]),
                )
            })
            .collect();
        Ok(Metrics(Arc::new(MetricSet {
            by_outcome,
            by_store_op,
            requests,
            request_duration,
            upstream_duration,
            store_duration,
            store_errors,
            waiting_duplicates,
            open_tunnels,
            lease_renewals,
            lease_lost,
            dedup_operations,
            record_decode_errors,
            unknown_outcomes,
            replica_ack_failures,
            store_bytes,
            webhook_signatures,
            config_reloads,
            config_last_reload_success,
            replay_cache_lookups,
            trace_spans_dropped,
            deliveries,
            consumer_connected,
            delivery_duration,
            deliveries_in_flight,
            registry: registry.clone(),
        })))
    }

    /// Metrics on a private registry, for tests and tools.
    pub fn standalone() -> Self {
        Self::new(&Registry::new()).expect("fresh registry accepts every metric")
    }

    /// Counts one finished proxy request.
    pub fn request(&self, outcome: Outcome, elapsed: Duration) {
        let (count, duration) = &self.by_outcome[outcome as usize];
        count.inc();
        duration.observe(elapsed.as_secs_f64());
    }

    /// Records one store operation.
    pub fn store_op(&self, op: StoreOp, elapsed: Duration, failed: bool) {
        let (duration, errors) = &self.by_store_op[op as usize];
        duration.observe(elapsed.as_secs_f64());
        if failed {
            errors.inc();
        }
    }

    /// Counts one failed store operation whose duration is not observed.
    pub fn store_error(&self, op: StoreOp) {
        self.by_store_op[op as usize].1.inc();
    }

    /// Counts one unknown outcome's `resolution` (one of
    /// [`UNKNOWN_RESOLUTIONS`]) under its cause label.
    /// Creates the series of one configured preset, so they read 0 rather
    /// than absent before the first delivery.
    pub fn webhook_preset(&self, preset: &str) {
        for result in SIGNATURE_RESULTS {
            self.webhook_signatures.with_label_values(&[preset, result]);
        }
    }

    pub fn webhook_signature(&self, preset: &str, result: &str) {
        self.webhook_signatures
            .with_label_values(&[preset, result])
            .inc();
    }

    pub fn unknown_outcome(&self, cause: &'static str, resolution: &'static str) {
        self.unknown_outcomes
            .with_label_values(&[cause, resolution])
            .inc();
    }

    /// The text exposition of everything registered.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_index_their_own_handles() {
        for (i, o) in Outcome::ALL.iter().enumerate() {
            assert_eq!(*o as usize, i);
        }
        let m = Metrics::standalone();
        m.request(Outcome::Replayed, Duration::from_millis(1));
        assert_eq!(m.requests.with_label_values(&["replayed"]).get(), 1);
        assert_eq!(m.requests.with_label_values(&["forwarded"]).get(), 0);
        for (i, op) in StoreOp::ALL.iter().enumerate() {
            assert_eq!(*op as usize, i);
        }
        m.store_op(StoreOp::Complete, Duration::from_millis(1), true);
        assert_eq!(m.store_errors.with_label_values(&["complete"]).get(), 1);
    }
}
