//! `[[consumers]]`: queues idemgate reads itself, handing each message to a
//! worker over HTTP, its effect once (the delivery mode). Each entry names
//! its broker (a Redis stream or a RabbitMQ queue), its source and group,
//! where messages go, where the key comes from, and how failures are
//! retried and dead-lettered. Checking never connects; an `amqp://` URL is
//! parsed here, once, into what the connection needs ([`AmqpUrl`]).

use std::collections::HashSet;
use std::time::Duration;

use http::Uri;
use toml::Value;

use super::routes::ReconcileUrl;
use crate::checker::{show, Checker};

/// The keys of a `[[consumers]]` entry.
pub const KEYS: &[&str] = &[
    "name",
    "broker",
    "broker_env",
    "broker_file",
    "source",
    "group",
    "deliver_to",
    "key_from",
    "concurrency",
    "batch_size",
    "max_attempts",
    "retry_backoff",
    "retry_backoff_max",
    "delivery_timeout",
    "dead_letter",
    "on_unknown_outcome",
    "reconcile_url",
];

/// Where a message's key comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum MessageKey {
    /// The broker's message id: a Redis entry's `id` field, else its entry
    /// id; an AMQP message's `message_id` property.
    MessageId,
    /// A field of the message (a Redis entry field, an AMQP header).
    Field(String),
}

/// The broker a consumer reads.
#[derive(Debug, Clone, PartialEq)]
pub enum Broker {
    /// A Redis stream through a consumer group (`redis://`, `rediss://`).
    Redis,
    /// A RabbitMQ queue (`amqp://`, `amqps://`).
    Amqp(AmqpUrl),
    /// A NATS JetStream stream through a durable pull consumer (`nats://`,
    /// `tls://`).
    Nats,
}

/// An `amqp://` or `amqps://` URL, parsed (RabbitMQ's URI spec: user and
/// password percent-decoded, default `guest`; the vhost is the path,
/// percent-decoded, `/` when empty; `?heartbeat=N`).
#[derive(Clone, PartialEq)]
pub struct AmqpUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub vhost: String,
    pub heartbeat: Option<u16>,
}

impl std::fmt::Debug for AmqpUrl {
    // Never the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}://{}@{}:{}/{}",
            if self.tls { "amqps" } else { "amqp" },
            self.user,
            self.host,
            self.port,
            self.vhost
        )
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("{:?} has a bad percent-escape", s))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

impl AmqpUrl {
    pub fn parse(text: &str) -> Result<AmqpUrl, String> {
        let (scheme, rest) = text
            .split_once("://")
            .ok_or("is not a URL (scheme://host)")?;
        let tls = match scheme {
            "amqp" => false,
            "amqps" => true,
            _ => return Err(format!("{scheme}:// is not amqp:// or amqps://")),
        };
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            Some(u) => {
                let (n, p) = u.split_once(':').unwrap_or((u, ""));
                (percent_decode(n)?, percent_decode(p)?)
            }
            None => ("guest".to_owned(), "guest".to_owned()),
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or("has an unclosed [ in its host")?;
            (h.to_owned(), after.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), Some(p)),
                None => (hostport.to_owned(), None),
            }
        };
        if host.is_empty() {
            return Err("names no host".into());
        }
        let port = match port {
            Some(p) => p
                .parse()
                .map_err(|_| format!("port {p:?} is not a number"))?,
            None if tls => 5671,
            None => 5672,
        };
        let vhost = if path.is_empty() {
            "/".to_owned()
        } else {
            percent_decode(path)?
        };
        let mut heartbeat = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("heartbeat", v)) => {
                    heartbeat = Some(
                        v.parse()
                            .map_err(|_| format!("heartbeat {v:?} is not 0-65535 seconds"))?,
                    );
                }
                _ => return Err(format!("{pair:?} is not a known query (heartbeat=N)")),
            }
        }
        Ok(AmqpUrl {
            tls,
            host,
            port,
            user,
            password,
            vhost,
            heartbeat,
        })
    }
}

/// What a delivery whose outcome is unknown becomes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OnUnknown {
    /// Dead-lettered with reason `outcome-unknown`: an operator settles it.
    Hold,
    /// Delivered again, with a higher fence.
    Release,
    /// Ask the worker's `reconcile_url`: it ran (its answer is the
    /// result), it did not (delivered again), or no answer (held).
    Reconcile,
}

/// One checked `[[consumers]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsumerConfig {
    /// Its records' scope, its metrics label.
    pub name: String,
    /// `redis://`, `rediss://`, `amqp://` or `amqps://` (may carry a
    /// password: never printed).
    pub broker: String,
    /// What `broker` is.
    pub kind: Broker,
    /// Where `broker` was read from, when it came from a variable.
    pub broker_env: Option<String>,
    /// Where `broker` was read from, when it came from a file.
    pub broker_file: Option<String>,
    /// The Redis stream, the AMQP queue, or the JetStream stream.
    pub source: String,
    /// The Redis consumer group or the JetStream durable consumer (not
    /// used for AMQP).
    pub group: String,
    pub deliver_to: Uri,
    pub key_from: MessageKey,
    pub concurrency: usize,
    /// Messages per request to the worker, at most: 1 is one `POST` per
    /// message; more sends what is ready as one CloudEvents JSON batch.
    pub batch_size: usize,
    pub max_attempts: u32,
    pub retry_backoff: Duration,
    pub retry_backoff_max: Duration,
    pub delivery_timeout: Duration,
    /// The stream dead letters are added to (Redis), the exchange they are
    /// published to (AMQP; empty: the queue's own dead-letter exchange, by
    /// rejecting the message), or the subject (NATS; a stream must capture
    /// it).
    pub dead_letter: String,
    pub on_unknown_outcome: OnUnknown,
    /// Where `reconcile` asks (`{key}` filled in).
    pub reconcile_url: Option<ReconcileUrl>,
}

/// `on_unknown_outcome`'s values and what each means.
pub const ON_UNKNOWN: &[(&str, OnUnknown)] = &[
    ("hold", OnUnknown::Hold),
    ("release", OnUnknown::Release),
    ("reconcile", OnUnknown::Reconcile),
];

/// A name fit for a scope, a metrics label and an admin path.
fn name(c: &mut Checker, path: &str, v: &Value) -> Option<String> {
    let s = c.string(path, v)?;
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !ok {
        c.err(
            path,
            format!("{s:?} must be 1-64 letters, digits, '-', '_' or '.'"),
        );
        return None;
    }
    Some(s)
}

fn broker(c: &mut Checker, path: &str, text: &str) -> Option<(String, Broker)> {
    let t = text.trim();
    match t.split_once("://").map(|(s, _)| s) {
        Some("redis" | "rediss") => match redis::IntoConnectionInfo::into_connection_info(t) {
            Ok(_) => Some((t.to_owned(), Broker::Redis)),
            Err(e) => {
                c.err(path, format!("not a Redis URL: {e}"));
                None
            }
        },
        Some("amqp" | "amqps") => match AmqpUrl::parse(t) {
            Ok(u) => Some((t.to_owned(), Broker::Amqp(u))),
            Err(e) => {
                c.err(path, format!("not an AMQP URL: {e}"));
                None
            }
        },
        Some("nats" | "tls") => match t.parse::<Uri>() {
            Ok(u) if u.host().is_some_and(|h| !h.is_empty()) => Some((t.to_owned(), Broker::Nats)),
            _ => {
                c.err(path, "not a NATS URL (nats://host:port)".into());
                None
            }
        },
        _ => {
            c.err(
                path,
                "must be a redis://, rediss://, amqp://, amqps://, nats:// or tls:// URL".into(),
            );
            None
        }
    }
}

fn key_from(c: &mut Checker, path: &str, v: &Value) -> Option<MessageKey> {
    let s = c.string(path, v)?;
    match s.split_once(':') {
        None if s == "message-id" => Some(MessageKey::MessageId),
        // A header is an AMQP message's field: one spelling for each.
        Some(("field" | "header", f)) if !f.is_empty() => Some(MessageKey::Field(f.to_owned())),
        _ => {
            c.err(
                path,
                format!("{s:?} is not \"message-id\", \"field:NAME\" or \"header:NAME\""),
            );
            None
        }
    }
}

fn http_url(c: &mut Checker, path: &str, v: &Value) -> Option<Uri> {
    let s = c.string(path, v)?;
    match s.trim().parse::<Uri>() {
        Ok(u) if u.scheme_str() == Some("http") && u.host().is_some() => Some(u),
        Ok(_) => {
            c.err(path, format!("{s:?} must be an http:// URL with a host"));
            None
        }
        Err(e) => {
            c.err(path, format!("{s:?} is not a URL: {e}"));
            None
        }
    }
}

/// Checks every entry; `env` reads `broker_env` variables.
pub fn check(
    c: &mut Checker,
    entries: Option<Vec<toml::Table>>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Vec<ConsumerConfig> {
    let mut out = Vec::new();
    let mut names = HashSet::new();
    for (i, t) in entries.unwrap_or_default().into_iter().enumerate() {
        let at = |k: &str| format!("consumers[{i}].{k}");
        let before = c.errors.len();
        for k in t.keys() {
            if !KEYS.contains(&k.as_str()) {
                c.err(
                    &at(k),
                    format!("is not a key of [[consumers]] (known: {})", KEYS.join(", ")),
                );
            }
        }
        let get = |k: &str| t.get(k).cloned();
        let required = |c: &mut Checker, k: &str| -> Option<Value> {
            let v = get(k);
            if v.is_none() {
                c.err(&at(k), "is required".into());
            }
            v
        };
        let name_v = required(c, "name").and_then(|v| name(c, &at("name"), &v));
        let mut broker_url = None;
        let mut broker_env = None;
        let mut broker_file = None;
        let given: Vec<&str> = ["broker", "broker_env", "broker_file"]
            .into_iter()
            .filter(|k| t.contains_key(*k))
            .collect();
        match given.as_slice() {
            [] => c.err(
                &at("broker"),
                "is required (or broker_env, or broker_file)".into(),
            ),
            ["broker"] => {
                if let Some(s) = get("broker").and_then(|v| c.string(&at("broker"), &v)) {
                    broker_url = broker(c, &at("broker"), &s);
                }
            }
            ["broker_env"] => {
                if let Some(var) = get("broker_env").and_then(|v| c.string(&at("broker_env"), &v)) {
                    match env(&var) {
                        Some(text) => broker_url = broker(c, &at("broker_env"), &text),
                        None => c.err(
                            &at("broker_env"),
                            format!("the environment variable {var} is not set"),
                        ),
                    }
                    broker_env = Some(var);
                }
            }
            ["broker_file"] => {
                if let Some(path) =
                    get("broker_file").and_then(|v| c.string(&at("broker_file"), &v))
                {
                    // A URL with a password, kept out of the file itself.
                    match std::fs::read_to_string(&path) {
                        Ok(text) => broker_url = broker(c, &at("broker_file"), text.trim()),
                        Err(e) => c.err(&at("broker_file"), format!("cannot read {path:?}: {e}")),
                    }
                    broker_file = Some(path);
                }
            }
            _ => c.err(
                &at("broker"),
                format!("give one of {}, not several", given.join(", ")),
            ),
        }
        let source = required(c, "source").and_then(|v| name(c, &at("source"), &v));
        let amqp = matches!(&broker_url, Some((_, Broker::Amqp(_))));
        let grouped = matches!(&broker_url, Some((_, Broker::Redis | Broker::Nats)));
        // AMQP consumers share a queue without a group.
        let group = match get("group") {
            Some(v) => name(c, &at("group"), &v),
            None if grouped => {
                c.err(
                    &at("group"),
                    "is required (the Redis consumer group, or the JetStream durable consumer)"
                        .into(),
                );
                None
            }
            None => Some(String::new()),
        };
        let deliver_to = required(c, "deliver_to").and_then(|v| http_url(c, &at("deliver_to"), &v));
        let mut cfg = ConsumerConfig {
            name: name_v.clone().unwrap_or_default(),
            broker: broker_url.clone().map(|(u, _)| u).unwrap_or_default(),
            kind: broker_url.map_or(Broker::Redis, |(_, k)| k),
            broker_env,
            broker_file,
            source: source.clone().unwrap_or_default(),
            group: group.unwrap_or_default(),
            deliver_to: deliver_to
                .clone()
                .unwrap_or_else(|| Uri::from_static("http://invalid")),
            key_from: MessageKey::MessageId,
            concurrency: 16,
            batch_size: 1,
            max_attempts: 10,
            retry_backoff: Duration::from_secs(1),
            retry_backoff_max: Duration::from_secs(60),
            delivery_timeout: Duration::from_secs(30),
            // AMQP: the queue's own dead-letter exchange unless one is named.
            dead_letter: match &source {
                Some(s) if !amqp => format!("{s}.dead"),
                _ => String::new(),
            },
            on_unknown_outcome: OnUnknown::Hold,
            reconcile_url: None,
        };
        c.set(
            &mut cfg.key_from,
            &get("key_from"),
            &at("key_from"),
            key_from,
        );
        c.set(
            &mut cfg.concurrency,
            &get("concurrency"),
            &at("concurrency"),
            Checker::int(1, 1024),
        );
        c.set(
            &mut cfg.batch_size,
            &get("batch_size"),
            &at("batch_size"),
            Checker::int(1, 1024),
        );
        // A batch is made of deliveries in flight: it cannot hold more.
        if cfg.batch_size > cfg.concurrency {
            c.err(
                &at("batch_size"),
                format!(
                    "must not exceed concurrency ({}): a batch holds deliveries in flight",
                    cfg.concurrency
                ),
            );
        }
        c.set(
            &mut cfg.max_attempts,
            &get("max_attempts"),
            &at("max_attempts"),
            Checker::int(1, 1000),
        );
        c.set(
            &mut cfg.retry_backoff,
            &get("retry_backoff"),
            &at("retry_backoff"),
            Checker::duration,
        );
        c.set(
            &mut cfg.retry_backoff_max,
            &get("retry_backoff_max"),
            &at("retry_backoff_max"),
            Checker::duration,
        );
        c.set(
            &mut cfg.delivery_timeout,
            &get("delivery_timeout"),
            &at("delivery_timeout"),
            Checker::duration,
        );
        c.set(
            &mut cfg.dead_letter,
            &get("dead_letter"),
            &at("dead_letter"),
            name,
        );
        c.set(
            &mut cfg.on_unknown_outcome,
            &get("on_unknown_outcome"),
            &at("on_unknown_outcome"),
            Checker::one_of(ON_UNKNOWN),
        );
        if let Some(v) = get("reconcile_url") {
            if let Some(text) = c.string(&at("reconcile_url"), &v) {
                match ReconcileUrl::parse(&text) {
                    Ok(u) => cfg.reconcile_url = Some(u),
                    Err(e) => c.err(&at("reconcile_url"), e),
                }
            }
        }
        if cfg.on_unknown_outcome == OnUnknown::Reconcile && cfg.reconcile_url.is_none() {
            c.err(
                &at("reconcile_url"),
                "is required with on_unknown_outcome = \"reconcile\"".into(),
            );
        }
        if cfg.retry_backoff_max < cfg.retry_backoff {
            c.err(
                &at("retry_backoff_max"),
                format!(
                    "is shorter than retry_backoff ({})",
                    humantime::format_duration(cfg.retry_backoff)
                ),
            );
        }
        if let Some(n) = &name_v {
            if !names.insert(n.clone()) {
                c.err(&at("name"), format!("{n:?} names two consumers"));
            }
        }
        if cfg.dead_letter == cfg.source && !cfg.source.is_empty() {
            c.err(&at("dead_letter"), "must not be the source itself".into());
        }
        if c.errors.len() == before {
            out.push(cfg);
        }
    }
    out
}

/// `consumers` as `check-config` shows it: the broker as scheme, host and
/// port only (never a password), or the variable it came from.
pub fn shown_broker(c: &ConsumerConfig) -> String {
    if let Some(var) = &c.broker_env {
        return format!("${var}");
    }
    if let Some(path) = &c.broker_file {
        return format!("(read from {path})");
    }
    match c.broker.parse::<Uri>() {
        Ok(u) => format!(
            "{}://{}{}",
            u.scheme_str().unwrap_or("redis"),
            u.host().unwrap_or(""),
            u.port_u16().map(|p| format!(":{p}")).unwrap_or_default()
        ),
        Err(_) => show(&Value::String("***".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(text: &str) -> (Vec<ConsumerConfig>, Vec<String>) {
        #[derive(serde::Deserialize)]
        struct F {
            consumers: Option<Vec<toml::Table>>,
        }
        let f: F = toml::from_str(text).unwrap();
        let mut c = Checker::default();
        let env = |k: &str| (k == "BROKER").then(|| "redis://:pw@127.0.0.1:6379".to_owned());
        let out = check(&mut c, f.consumers, &env);
        (out, c.errors)
    }

    #[test]
    fn a_consumer_with_its_defaults() {
        let (out, errors) = run(
            "[[consumers]]\nname = \"billing\"\nbroker_env = \"BROKER\"\nsource = \"orders\"\n\
             group = \"billing\"\ndeliver_to = \"http://127.0.0.1:8080/handle\"\n",
        );
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(out[0].dead_letter, "orders.dead");
        assert_eq!(out[0].key_from, MessageKey::MessageId);
        assert_eq!(out[0].concurrency, 16);
        assert_eq!(out[0].batch_size, 1);
        assert_eq!(shown_broker(&out[0]), "$BROKER");
    }

    #[test]
    fn every_problem_is_named() {
        let (out, errors) = run(
            "[[consumers]]\nname = \"a b\"\nbroker = \"mqtt://x\"\nsource = \"s\"\ngroup = \"g\"\n\
             deliver_to = \"ftp://x\"\nkey_from = \"header\"\nconcurrency = 0\ncolour = 1\n\
             [[consumers]]\nname = \"b\"\nbroker = \"redis://127.0.0.1\"\nsource = \"s\"\n",
        );
        assert!(out.is_empty());
        let all = errors.join("\n");
        for needle in [
            "consumers[0].name",
            "consumers[0].broker: must be a redis://",
            "consumers[0].deliver_to",
            "consumers[0].key_from",
            "consumers[0].concurrency",
            "consumers[0].colour",
            "consumers[1].group: is required",
            "consumers[1].deliver_to: is required",
        ] {
            assert!(all.contains(needle), "{needle} missing from {all}");
        }
    }

    #[test]
    fn a_batch_cannot_hold_more_than_the_deliveries_in_flight() {
        let base = "[[consumers]]\nname = \"b\"\nbroker = \"redis://127.0.0.1\"\nsource = \"s\"\n\
                    group = \"g\"\ndeliver_to = \"http://127.0.0.1:8080/h\"\n";
        let (out, errors) = run(&format!("{base}concurrency = 64\nbatch_size = 32\n"));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(out[0].batch_size, 32);
        let (_, errors) = run(&format!("{base}batch_size = 32\n"));
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("consumers[0].batch_size: must not exceed concurrency (16)")),
            "{errors:?}"
        );
        let (_, errors) = run(&format!("{base}batch_size = 0\n"));
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("consumers[0].batch_size")),
            "{errors:?}"
        );
    }

    #[test]
    fn an_amqp_consumer_needs_no_group_and_defaults_to_the_queues_dead_letters() {
        let (out, errors) = run(
            "[[consumers]]\nname = \"billing\"\nbroker = \"amqp://app:p%40ss@mq.internal/%2f\"\n\
             source = \"orders\"\ndeliver_to = \"http://127.0.0.1:8080/handle\"\n",
        );
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(out[0].dead_letter, "");
        let Broker::Amqp(u) = &out[0].kind else {
            panic!("not AMQP: {:?}", out[0].kind)
        };
        assert_eq!(
            (
                u.tls,
                u.host.as_str(),
                u.port,
                u.user.as_str(),
                u.password.as_str(),
                u.vhost.as_str()
            ),
            (false, "mq.internal", 5672, "app", "p@ss", "/")
        );
        assert_eq!(shown_broker(&out[0]), "amqp://mq.internal");
        assert!(!format!("{u:?}").contains("p@ss"));
    }

    #[test]
    fn amqp_urls() {
        let u = AmqpUrl::parse("amqps://[::1]:5999/billing?heartbeat=10").unwrap();
        assert_eq!(
            (
                u.tls,
                u.host.as_str(),
                u.port,
                u.vhost.as_str(),
                u.heartbeat
            ),
            (true, "::1", 5999, "billing", Some(10))
        );
        assert_eq!(u.user, "guest");
        for bad in [
            "amqp://",
            "amqp://h:x",
            "amqp://h/%zz",
            "amqp://h?heartbeat",
            "amqp://h?colour=red",
            "http://h",
        ] {
            assert!(AmqpUrl::parse(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn reconcile_needs_a_reconcile_url() {
        let base = "[[consumers]]\nname = \"b\"\nbroker = \"redis://127.0.0.1\"\nsource = \"s\"\n\
                    group = \"g\"\ndeliver_to = \"http://127.0.0.1:8080/h\"\n\
                    on_unknown_outcome = \"reconcile\"\n";
        let (_, errors) = run(base);
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("consumers[0].reconcile_url: is required")),
            "{errors:?}"
        );
        let (out, errors) = run(&format!(
            "{base}reconcile_url = \"http://127.0.0.1:8080/runs/{{key}}\"\n"
        ));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(out[0].on_unknown_outcome, OnUnknown::Reconcile);
        let (_, errors) = run(&format!("{base}reconcile_url = \"ftp://x/{{key}}\"\n"));
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("consumers[0].reconcile_url")),
            "{errors:?}"
        );
    }

    #[test]
    fn the_broker_url_can_come_from_a_file_and_only_one_source_is_taken() {
        let path = std::env::temp_dir().join(format!("idemgate-broker-{}", std::process::id()));
        std::fs::write(&path, "amqp://app:s3cret@127.0.0.1:5672/%2f\n").unwrap();
        let base = "[[consumers]]\nname = \"b\"\nsource = \"s\"\n\
                    deliver_to = \"http://127.0.0.1:8080/h\"\n";
        let (out, errors) = run(&format!(
            "{base}broker_file = {:?}\n",
            path.to_str().unwrap()
        ));
        assert!(errors.is_empty(), "{errors:?}");
        assert!(matches!(out[0].kind, Broker::Amqp(_)));
        assert!(!shown_broker(&out[0]).contains("s3cret"));
        let (_, errors) = run(&format!(
            "{base}broker_file = {:?}\nbroker = \"amqp://x\"\n",
            path.to_str().unwrap()
        ));
        assert!(
            errors.iter().any(|e| e.contains("not several")),
            "{errors:?}"
        );
        let (_, errors) = run(&format!("{base}broker_file = \"/nonexistent/idemgate\"\n"));
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("consumers[0].broker_file: cannot read")),
            "{errors:?}"
        );
        let _ = std::fs::remove_file(&path);
    }
}
