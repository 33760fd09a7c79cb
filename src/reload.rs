//! Reloading the configuration without a restart: on `SIGHUP`, and when
//! the file changes (polled every half second; a change is applied once
//! the file reads the same twice running, so a half-written file or a
//! Kubernetes ConfigMap's symlink swap is never read midway).
//!
//! A reload reads the file with the same flags and checks it with the same
//! checker as `check-config`. A bad file changes nothing and every problem
//! is logged. A good one replaces the routes, their policies (webhook
//! secrets included) and the upstreams in one swap; requests in flight
//! finish on the snapshot they started with. Listeners, the store, the
//! admin tokens and the other process-wide keys keep their values; a
//! change to one of them is logged as needing a restart.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};

use crate::config::{Config, Policies, RunArgs};
use crate::metrics::Metrics;
use crate::proxy::{Routing, SharedRouting};

/// Where the configuration comes from: the file and the flags laid over it.
#[derive(Clone)]
pub struct ConfigSource {
    pub args: RunArgs,
}

impl ConfigSource {
    fn path(&self) -> Option<PathBuf> {
        self.args.config.clone()
    }
}

/// What a reload replaces.
pub(crate) struct Targets {
    pub routing: Option<SharedRouting>,
    pub admin_policies: Arc<ArcSwap<Policies>>,
    pub metrics: Metrics,
}

/// Watches for SIGHUP and file changes until the process ends.
pub(crate) async fn watch(source: ConfigSource, mut current: Config, targets: Targets) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGHUP; reloads follow the file only");
            None
        }
    };
    let path = source.path();
    let mut applied = path.as_deref().and_then(digest);
    let mut last = applied;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let why = tokio::select! {
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => "SIGHUP",
            _ = tick.tick() => {
                let Some(p) = path.as_deref() else { continue };
                let now = digest(p);
                let stable = now.is_some() && now == last && now != applied;
                last = now;
                if !stable {
                    continue;
                }
                "the file changed"
            }
        };
        if let Some(p) = path.as_deref() {
            applied = digest(p);
            last = applied;
        }
        if let Some(next) = reload(&source, &current, &targets, why) {
            current = next;
        }
    }
}

fn digest(path: &std::path::Path) -> Option<[u8; 32]> {
    std::fs::read(path).ok().map(|b| Sha256::digest(b).into())
}

/// One reload: the new config if it was applied.
fn reload(source: &ConfigSource, current: &Config, t: &Targets, why: &str) -> Option<Config> {
    let failed = |problems: &[String]| {
        for p in problems {
            tracing::error!(problem = %p, "config reload refused; the running config stays");
        }
        t.metrics
            .config_reloads
            .with_label_values(&["failure"])
            .inc();
        None
    };
    let next = match Config::load(&source.args) {
        Ok(c) => c,
        Err(e) => return failed(&e.0),
    };
    let routing = match &t.routing {
        Some(shared) => match Routing::build(&next, Some(&shared.load())) {
            Ok(Some(r)) => Some((shared, r)),
            Ok(None) => {
                return failed(&["upstream: cannot be removed at run time".to_owned()]);
            }
            Err(e) => return failed(&[format!("upstream: {e}")]),
        },
        None => None,
    };
    for key in fixed_changes(current, &next) {
        tracing::warn!(key, "config reload: this key changed but takes effect only on restart; it keeps its old value");
    }
    for w in &next.warnings {
        tracing::warn!("config: {w}");
    }
    if let Some((shared, r)) = routing {
        shared.store(Arc::new(r));
    }
    t.admin_policies.store(Arc::new(next.policies.clone()));
    for route in &next.policies.routes {
        if let Some(check) = &route.policy.webhook {
            t.metrics.webhook_preset(check.verifier.preset.name());
        }
    }
    t.metrics
        .config_reloads
        .with_label_values(&["success"])
        .inc();
    t.metrics.config_last_reload_success.set(unix_now());
    tracing::info!(
        trigger = why,
        routes = next.policies.routes.len(),
        "config reloaded"
    );
    // What stays in force is the old value of every fixed key.
    let mut applied = current.clone();
    applied.policies = next.policies;
    applied.default_upstream = next.default_upstream;
    applied.upstream = next.upstream;
    applied.upstream_timeout = next.upstream_timeout;
    Some(applied)
}

pub(crate) fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The keys a reload cannot apply that differ between `a` and `b`.
fn fixed_changes(a: &Config, b: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut check = |changed: bool, key: &'static str| {
        if changed {
            out.push(key);
        }
    };
    check(a.listen != b.listen, "listen");
    check(a.admin_listen != b.admin_listen, "admin_listen");
    check(
        a.upstream.is_some() != b.upstream.is_some(),
        "upstream (dedup-only mode)",
    );
    check(a.drain_timeout != b.drain_timeout, "drain_timeout");
    check(a.max_connections != b.max_connections, "max_connections");
    check(a.event_loops != b.event_loops, "event_loops");
    check(
        a.header_read_timeout != b.header_read_timeout,
        "header_read_timeout",
    );
    check(
        a.body_read_timeout != b.body_read_timeout,
        "body_read_timeout",
    );
    check(a.log_format != b.log_format, "log_format");
    check(a.store != b.store, "store");
    check(a.dedup != b.dedup, "dedup");
    check(a.admin_tokens != b.admin_tokens, "admin tokens");
    check(a.traces != b.traces, "tracing");
    check(a.consumers != b.consumers, "consumers");
    out
}
