//! `[tracing]`: where idemgate sends its OpenTelemetry spans (OTLP over
//! HTTP/protobuf), what it calls itself and how it samples. Each key
//! mirrors a standard `OTEL_*` environment variable; the file wins over
//! the environment, and `check-config` shows the result. Off unless an
//! endpoint is given (in the file or the environment).

use std::collections::BTreeMap;
use std::time::Duration;

use http::Uri;
use toml::Value;

use crate::checker::{show, Checker};

/// The keys of `[tracing]`.
pub const KEYS: &[&str] = &[
    "enabled",
    "endpoint",
    "service_name",
    "resource_attributes",
    "sampler",
    "sampler_arg",
    "headers",
    "timeout",
];

/// How traces are sampled (`OTEL_TRACES_SAMPLER`'s names).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampler {
    AlwaysOn,
    AlwaysOff,
    TraceIdRatio,
    ParentBasedAlwaysOn,
    ParentBasedAlwaysOff,
    ParentBasedTraceIdRatio,
}

pub const SAMPLERS: &[(&str, Sampler)] = &[
    ("always_on", Sampler::AlwaysOn),
    ("always_off", Sampler::AlwaysOff),
    ("traceidratio", Sampler::TraceIdRatio),
    ("parentbased_always_on", Sampler::ParentBasedAlwaysOn),
    ("parentbased_always_off", Sampler::ParentBasedAlwaysOff),
    ("parentbased_traceidratio", Sampler::ParentBasedTraceIdRatio),
];

impl Sampler {
    pub fn as_str(self) -> &'static str {
        SAMPLERS
            .iter()
            .find(|(_, s)| *s == self)
            .map_or("parentbased_always_on", |(n, _)| n)
    }
}

/// The checked `[tracing]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct TracesConfig {
    /// The full URL spans are POSTed to (`…/v1/traces`); `None`: off.
    pub endpoint: Option<Uri>,
    pub service_name: String,
    /// `OTEL_RESOURCE_ATTRIBUTES` as pairs, in order.
    pub resource_attributes: Vec<(String, String)>,
    pub sampler: Sampler,
    /// The ratio for the `traceidratio` samplers, 0 to 1.
    pub sampler_arg: f64,
    /// Sent with every export (an API key for a hosted collector).
    pub headers: BTreeMap<String, String>,
    /// The longest one export may take; past it its spans are dropped.
    pub timeout: Duration,
}

impl Default for TracesConfig {
    fn default() -> Self {
        TracesConfig {
            endpoint: None,
            service_name: "idemgate".into(),
            resource_attributes: Vec::new(),
            sampler: Sampler::ParentBasedAlwaysOn,
            sampler_arg: 1.0,
            headers: BTreeMap::new(),
            timeout: Duration::from_secs(10),
        }
    }
}

/// The environment as the check reads it (a map in tests).
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// `OTEL_EXPORTER_OTLP_ENDPOINT` is a base URL the signal's path is
/// appended to; the per-signal variable and the file's key are used as
/// they are, `/v1/traces` appended only when they give no path.
fn endpoint(c: &mut Checker, path: &str, text: &str, base: bool) -> Option<Uri> {
    let trimmed = text.trim();
    let uri: Uri = match trimmed.parse() {
        Ok(u) => u,
        Err(e) => {
            c.err(path, format!("{trimmed:?} is not a URL: {e}"));
            return None;
        }
    };
    match uri.scheme_str() {
        Some("http" | "https") if uri.host().is_some() => {}
        _ => {
            c.err(
                path,
                format!("{trimmed:?} must be an http:// or https:// URL with a host"),
            );
            return None;
        }
    }
    let p = uri.path();
    let full = if base || p.is_empty() || p == "/" {
        format!("{}/v1/traces", trimmed.trim_end_matches('/'))
    } else {
        trimmed.to_owned()
    };
    full.parse().ok()
}

/// `k1=v1,k2=v2` (`OTEL_RESOURCE_ATTRIBUTES`, `OTEL_EXPORTER_OTLP_HEADERS`).
fn pairs(c: &mut Checker, path: &str, text: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                let decode =
                    |s: &str| percent_decode(s.trim()).unwrap_or_else(|| s.trim().to_owned());
                out.push((decode(k), decode(v)));
            }
            _ => {
                c.err(path, format!("{part:?} is not key=value"));
                return None;
            }
        }
    }
    Some(out)
}

/// The W3C Baggage-style percent-decoding the OTel variables use.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn ratio(c: &mut Checker, path: &str, v: &Value) -> Option<f64> {
    let x = match v {
        Value::Float(f) => *f,
        Value::Integer(i) => *i as f64,
        Value::String(s) => match s.trim().parse::<f64>() {
            Ok(f) => f,
            Err(_) => {
                c.err(path, format!("{} is not a number from 0 to 1", show(v)));
                return None;
            }
        },
        other => {
            c.err(path, format!("{} is not a number from 0 to 1", show(other)));
            return None;
        }
    };
    if !(0.0..=1.0).contains(&x) {
        c.err(path, format!("{x} is not a number from 0 to 1"));
        return None;
    }
    Some(x)
}

fn table_pairs(c: &mut Checker, path: &str, v: &Value) -> Option<Vec<(String, String)>> {
    match v {
        Value::Table(t) => {
            let mut out = Vec::new();
            for (k, v) in t {
                out.push((k.clone(), c.string(&format!("{path}.{k}"), v)?));
            }
            Some(out)
        }
        Value::String(s) => pairs(c, path, s),
        other => {
            c.err(
                path,
                format!(
                    "{} is not a table of strings (or \"k=v,k2=v2\")",
                    show(other)
                ),
            );
            None
        }
    }
}

/// Checks `[tracing]` over the environment: each key the file sets wins
/// over its variable.
pub fn check(c: &mut Checker, file: Option<toml::Table>, env: Env<'_>) -> TracesConfig {
    let mut t = TracesConfig::default();
    let file = file.unwrap_or_default();
    for k in file.keys() {
        if !KEYS.contains(&k.as_str()) {
            c.err(
                &format!("tracing.{k}"),
                format!("is not a key of [tracing] (known: {})", KEYS.join(", ")),
            );
        }
    }
    let get = |k: &str| file.get(k).cloned();
    // The environment first, then the file over it.
    if let Some(e) = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        t.endpoint = endpoint(c, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &e, false);
    } else if let Some(e) = env("OTEL_EXPORTER_OTLP_ENDPOINT") {
        t.endpoint = endpoint(c, "OTEL_EXPORTER_OTLP_ENDPOINT", &e, true);
    }
    if let Some(v) = get("endpoint") {
        if let Some(s) = c.string("tracing.endpoint", &v) {
            t.endpoint = endpoint(c, "tracing.endpoint", &s, false);
        }
    }
    if let Some(name) = env("OTEL_SERVICE_NAME").filter(|n| !n.trim().is_empty()) {
        t.service_name = name.trim().to_owned();
    }
    c.set(
        &mut t.service_name,
        &get("service_name"),
        "tracing.service_name",
        Checker::string,
    );
    if let Some(a) = env("OTEL_RESOURCE_ATTRIBUTES") {
        if let Some(p) = pairs(c, "OTEL_RESOURCE_ATTRIBUTES", &a) {
            t.resource_attributes = p;
        }
    }
    c.set(
        &mut t.resource_attributes,
        &get("resource_attributes"),
        "tracing.resource_attributes",
        table_pairs,
    );
    if let Some(s) = env("OTEL_TRACES_SAMPLER") {
        let v = Value::String(s.trim().to_owned());
        c.set(
            &mut t.sampler,
            &Some(v),
            "OTEL_TRACES_SAMPLER",
            Checker::one_of(SAMPLERS),
        );
    }
    c.set(
        &mut t.sampler,
        &get("sampler"),
        "tracing.sampler",
        Checker::one_of(SAMPLERS),
    );
    if let Some(s) = env("OTEL_TRACES_SAMPLER_ARG") {
        c.set(
            &mut t.sampler_arg,
            &Some(Value::String(s)),
            "OTEL_TRACES_SAMPLER_ARG",
            ratio,
        );
    }
    c.set(
        &mut t.sampler_arg,
        &get("sampler_arg"),
        "tracing.sampler_arg",
        ratio,
    );
    for var in [
        "OTEL_EXPORTER_OTLP_HEADERS",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    ] {
        if let Some(h) = env(var) {
            if let Some(p) = pairs(c, var, &h) {
                t.headers.extend(p);
            }
        }
    }
    let mut headers = None;
    c.set(
        &mut headers,
        &get("headers"),
        "tracing.headers",
        |c, p, v| table_pairs(c, p, v).map(Some),
    );
    if let Some(h) = headers {
        t.headers = h.into_iter().collect();
    }
    for (k, v) in &t.headers {
        if http::HeaderName::try_from(k.as_str()).is_err()
            || http::HeaderValue::try_from(v.as_str()).is_err()
        {
            c.err("tracing.headers", format!("{k:?} is not a valid header"));
        }
    }
    if let Some(p) = env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .filter(|p| p.trim() != "http/protobuf")
    {
        c.err(
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            format!("{p:?}: idemgate exports OTLP as \"http/protobuf\" only"),
        );
    }
    if let Some(ms) =
        env("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT").or_else(|| env("OTEL_EXPORTER_OTLP_TIMEOUT"))
    {
        match ms.trim().parse::<u64>() {
            Ok(ms) if ms > 0 => t.timeout = Duration::from_millis(ms),
            _ => c.err(
                "OTEL_EXPORTER_OTLP_TIMEOUT",
                format!("{ms:?} is not a number of milliseconds above 0"),
            ),
        }
    }
    c.set(
        &mut t.timeout,
        &get("timeout"),
        "tracing.timeout",
        Checker::duration,
    );
    let mut enabled = true;
    c.set(
        &mut enabled,
        &get("enabled"),
        "tracing.enabled",
        Checker::bool,
    );
    if !enabled {
        t.endpoint = None;
    } else if file.contains_key("enabled") && t.endpoint.is_none() {
        c.err(
            "tracing.enabled",
            "is true but no endpoint is set (tracing.endpoint or OTEL_EXPORTER_OTLP_ENDPOINT)"
                .into(),
        );
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(file: &str, env: &[(&str, &str)]) -> (TracesConfig, Vec<String>) {
        let mut c = Checker::default();
        let table: toml::Table = toml::from_str(file).unwrap();
        let lookup = |k: &str| {
            env.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        };
        let t = check(&mut c, Some(table), &lookup);
        (t, c.errors)
    }

    #[test]
    fn off_unless_an_endpoint_is_given() {
        let (t, errors) = run("", &[]);
        assert!(errors.is_empty());
        assert_eq!(t.endpoint, None);
    }

    #[test]
    fn the_file_wins_over_the_environment() {
        let env = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4318"),
            ("OTEL_SERVICE_NAME", "from-env"),
            ("OTEL_TRACES_SAMPLER", "traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.5"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment=prod,team=pay%20ments",
            ),
        ];
        let (t, errors) = run("", &env);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(t.endpoint.unwrap().to_string(), "http://env:4318/v1/traces");
        assert_eq!(t.service_name, "from-env");
        assert_eq!(t.sampler, Sampler::TraceIdRatio);
        assert_eq!(t.sampler_arg, 0.5);
        assert_eq!(
            t.resource_attributes[1],
            ("team".into(), "pay ments".into())
        );
        let (t, errors) = run(
            "endpoint = \"https://collector:4318/custom\"\nservice_name = \"file\"\n\
             sampler = \"parentbased_traceidratio\"\nsampler_arg = 0.25",
            &env,
        );
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            t.endpoint.unwrap().to_string(),
            "https://collector:4318/custom"
        );
        assert_eq!(t.service_name, "file");
        assert_eq!(t.sampler, Sampler::ParentBasedTraceIdRatio);
        assert_eq!(t.sampler_arg, 0.25);
        let (t, _) = run("enabled = false", &env);
        assert_eq!(t.endpoint, None);
    }

    #[test]
    fn bad_values_are_named() {
        let (_, errors) = run(
            "endpoint = \"ftp://x\"\nsampler = \"sometimes\"\nsampler_arg = 2\ncolour = 1",
            &[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")],
        );
        let all = errors.join("\n");
        for needle in [
            "tracing.endpoint",
            "tracing.sampler:",
            "tracing.sampler_arg",
            "tracing.colour",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ] {
            assert!(all.contains(needle), "{needle} missing from {all}");
        }
    }
}
