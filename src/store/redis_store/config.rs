//! The Redis backends' keys of `[store]` (`urls`, `key_prefix`,
//! `min_replicas`, `replica_ack_timeout`, `replay_cache`), their checks and
//! defaults, and how they open: `redis` (standalone, one URL) and
//! `redis-cluster` (seed URLs).

use std::sync::Arc;
use std::time::Duration;

use toml::Value;

use super::{redact_url, RedisOptions, RedisStore};
use crate::checker::Checker;
use crate::store::backend::{BackendConfig, Opening, Registration, Section};
use crate::store::error::StoreFuture;
use crate::store::handle::Store;

const KEYS: &[&str] = &[
    "urls",
    "key_prefix",
    "min_replicas",
    "replica_ack_timeout",
    "replay_cache",
];

/// `backend = "redis"`: one server (with replicas, optionally).
pub const STANDALONE: Registration = Registration {
    name: "redis",
    keys: KEYS,
    check: |s| check(s, false),
};

/// `backend = "redis-cluster"`: seed nodes of a Cluster.
pub const CLUSTER: Registration = Registration {
    name: "redis-cluster",
    keys: KEYS,
    check: |s| check(s, true),
};

/// A Redis backend's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisConfig {
    pub cluster: bool,
    /// One URL (standalone) or seed URLs (Cluster); may carry a password.
    pub urls: Vec<String>,
    /// Prefix of every key idemgate writes.
    pub key_prefix: String,
    /// Replicas that must acknowledge a lease (and a record) before
    /// idemgate relies on it (`WAIT`); 0: none. Standalone only.
    pub min_replicas: u32,
    pub replica_ack_timeout: Duration,
    /// Bytes of completed records kept in the process so replays need no
    /// round trip; 0: off. Standalone only.
    pub replay_cache: u64,
}

impl RedisConfig {
    pub fn new(urls: Vec<String>, cluster: bool) -> Self {
        RedisConfig {
            cluster,
            urls,
            key_prefix: "idemgate".into(),
            min_replicas: 0,
            replica_ack_timeout: Duration::from_millis(100),
            replay_cache: 64 << 20,
        }
    }
}

fn check(s: &mut Section<'_>, cluster: bool) -> Option<Arc<dyn BackendConfig>> {
    let mut c = RedisConfig::new(Vec::new(), cluster);
    let before = s.checker.errors.len();
    s.set(&mut c.urls, "urls", |c, p, v| match v {
        // A flag sets one URL; the file a list.
        Value::String(_) => redis_url(c, p, v).map(|u| vec![u]),
        _ => c.each(p, v, redis_url),
    });
    s.set(&mut c.key_prefix, "key_prefix", key_prefix);
    s.set(&mut c.min_replicas, "min_replicas", Checker::int(0, 16));
    s.set(
        &mut c.replica_ack_timeout,
        "replica_ack_timeout",
        Checker::duration,
    );
    s.set(&mut c.replay_cache, "replay_cache", Checker::size);
    if c.urls.is_empty() && s.checker.errors.len() == before {
        s.err("urls", "a Redis backend needs at least one URL".into());
    }
    if c.min_replicas > 0 && cluster {
        s.err(
            "min_replicas",
            "is supported on the \"redis\" backend (a primary with replicas) only".into(),
        );
    }
    if !cluster && c.urls.len() > 1 {
        s.err(
            "urls",
            "the \"redis\" backend takes one URL; use \"redis-cluster\" for several".into(),
        );
    }
    (s.checker.errors.len() == before).then(|| Arc::new(c) as Arc<dyn BackendConfig>)
}

fn redis_url(c: &mut Checker, path: &str, v: &Value) -> Option<String> {
    let s = c.string(path, v)?;
    let s = s.trim().to_owned();
    if !(s.starts_with("redis://") || s.starts_with("rediss://")) || s.len() <= "rediss://".len() {
        c.err(
            path,
            format!("{:?} is not a redis:// or rediss:// URL", redact_url(&s)),
        );
        return None;
    }
    Some(s)
}

fn key_prefix(c: &mut Checker, path: &str, v: &Value) -> Option<String> {
    let s = c.string(path, v)?;
    if s.is_empty()
        || s.contains(['{', '}'])
        || s.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        c.err(
            path,
            format!("{s:?} must be non-empty, without spaces or braces"),
        );
        return None;
    }
    Some(s)
}

impl BackendConfig for RedisConfig {
    fn name(&self) -> &'static str {
        if self.cluster {
            CLUSTER.name
        } else {
            STANDALONE.name
        }
    }

    fn render(&self) -> toml::Table {
        let mut t = toml::Table::new();
        // URLs may carry passwords: show only that they are set.
        let urls = self.urls.iter().map(|u| Value::from(redact_url(u)));
        t.insert("urls".into(), Value::Array(urls.collect()));
        t.insert("key_prefix".into(), self.key_prefix.clone().into());
        if !self.cluster {
            let ack = humantime::format_duration(self.replica_ack_timeout).to_string();
            let cache = i64::try_from(self.replay_cache).unwrap_or(i64::MAX);
            t.insert("min_replicas".into(), i64::from(self.min_replicas).into());
            t.insert("replica_ack_timeout".into(), ack.into());
            t.insert("replay_cache".into(), cache.into());
        }
        t
    }

    fn open<'a>(&'a self, opening: Opening<'a>) -> StoreFuture<'a, Store> {
        let options = RedisOptions {
            key_prefix: self.key_prefix.clone(),
            timeout: opening.timeout,
            min_replicas: self.min_replicas,
            replica_ack_timeout: self.replica_ack_timeout,
            replay_cache_bytes: usize::try_from(self.replay_cache).unwrap_or(usize::MAX),
            sealing: opening.sealing,
            ack_failures: opening.metrics.map(|m| m.replica_ack_failures.clone()),
            replay_cache_lookups: opening.metrics.map(|m| m.replay_cache_lookups.clone()),
            ..RedisOptions::new(self.urls.clone(), self.cluster)
        };
        Box::pin(async move { Ok(Store::new(RedisStore::connect(options).await?)) })
    }
}
