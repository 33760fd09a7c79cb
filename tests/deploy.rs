//! The deploy files stay true to the code: alert rules and the scrape config
//! pass promtool, every metric they and the dashboard use exists, and the
//! Kubernetes ConfigMap holds a config idemgate accepts.

use std::collections::BTreeSet;
use std::process::Command;

use idemgate::config::{Config, FileConfig, RunArgs};
use idemgate::metrics::Metrics;

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{}/deploy/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn promtool(args: &[&str]) -> Option<std::process::Output> {
    match Command::new("promtool")
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus"))
        .output()
    {
        Ok(o) => Some(o),
        Err(e) => {
            // scripts/test.sh installs it; only a machine that cannot gets here.
            println!(
                "SKIPPED: promtool is not available ({e}); install Debian's prometheus package"
            );
            None
        }
    }
}

#[test]
fn alert_rules_pass_promtool() {
    if let Some(o) = promtool(&["check", "rules", "alerts.yml"]) {
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{out}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(out.contains("SUCCESS: 11 rules found"), "{out}");
    }
}

#[test]
fn scrape_config_passes_promtool() {
    if let Some(o) = promtool(&["check", "config", "prometheus.yml"]) {
        assert!(
            o.status.success(),
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// Metric names (`idemgate_*`, `process_*`) mentioned in a text, with
/// histogram suffixes folded into their family.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        if (rest.starts_with("idemgate_") || rest.starts_with("process_"))
            && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_'))
        {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            let mut name = &rest[..end];
            for suffix in ["_bucket", "_count", "_sum"] {
                name = name.strip_suffix(suffix).unwrap_or(name);
            }
            names.insert(name.to_owned());
            i += end;
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn alerts_and_dashboard_use_only_metrics_idemgate_exports() {
    let m = Metrics::standalone();
    // Per-consumer series exist once a consumer is configured.
    m.deliveries
        .with_label_values(&["billing", "dead_lettered"]);
    m.consumer_connected.with_label_values(&["billing"]);
    let exported = m.render();
    let alerts = read("prometheus/alerts.yml");
    let dashboard = read("grafana/idemgate-dashboard.json");
    let used: BTreeSet<String> = metric_names(&alerts)
        .into_iter()
        .chain(metric_names(&dashboard))
        .collect();
    assert!(used.len() >= 10, "{used:?}");
    for name in &used {
        assert!(
            exported.contains(&format!("# TYPE {name} ")),
            "{name} is used but not exported"
        );
    }
}

#[test]
fn dashboard_covers_what_operators_watch() {
    let doc: serde_json::Value =
        serde_json::from_str(&read("grafana/idemgate-dashboard.json")).unwrap();
    let titles: Vec<&str> = doc["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for want in [
        "Requests by outcome",
        "Request latency",
        "Replays and conflicts",
        "Waiting duplicates",
        "Store latency p99 by operation",
        "Store errors by operation",
        "Delivery mode: messages by outcome",
        "Delivery mode: dead letters and broker connections",
    ] {
        assert!(titles.contains(&want), "no panel {want:?} in {titles:?}");
    }
}

#[test]
fn kubernetes_configmap_holds_a_valid_config() {
    let manifest = read("kubernetes/idemgate-sidecar.yaml");
    let start = manifest.find("idemgate.toml: |\n").unwrap() + "idemgate.toml: |\n".len();
    let toml: String = manifest[start..]
        .lines()
        .take_while(|l| l.starts_with("    ") || l.is_empty())
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    // The Redis URL comes from the Secret through IDEMGATE_REDIS.
    let args = RunArgs {
        redis: Some("redis://idemgate:x@redis:6379/0".into()),
        ..Default::default()
    };
    let config = Config::from_parts(FileConfig::parse(&toml).unwrap(), &args).unwrap();
    assert_eq!(config.admin_listen.port(), 9901);
    assert!(config.policies.for_path("/v1/payments/p1").required);
    for probe in [
        "path: /healthz, port: admin",
        "path: /readyz, port: admin",
        "secretKeyRef: {name: idemgate-redis, key: url}",
    ] {
        assert!(manifest.contains(probe), "manifest lacks {probe:?}");
    }
}

#[test]
fn dockerfile_is_multi_stage_non_root_with_a_healthcheck() {
    let d = read("Dockerfile");
    assert_eq!(d.lines().filter(|l| l.starts_with("FROM ")).count(), 2);
    let user = d.lines().find(|l| l.starts_with("USER ")).expect("no USER");
    assert!(!user.contains("root") && !user.contains(" 0"), "{user}");
    assert!(d.contains("HEALTHCHECK") && d.contains("\"healthcheck\""));
}
