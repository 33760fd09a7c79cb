//! The Redis store, standalone and Cluster: several idemgate replicas share
//! state through it.
//!
//! Every transition is one Lua script over one key (EVALSHA of constant
//! text), so it is atomic and Cluster never sees CROSSSLOT:
//!
//! - a record is one hash at `{prefix}:{hex}` where `hex` is the record key's
//!   SHA-256, inside the hash tag: user text never chooses a slot;
//! - fields: `s` state (`i` in flight, `c` completed, `r` released
//!   tombstone), `t` lease token, `f` fence, `p` fingerprint, `r` the encoded
//!   record ([`CompletedRecord::encode`]);
//! - the fence is Redis `TIME` in microseconds, and never below the last
//!   fence the key held, so it rises strictly per key, across expiry too; a
//!   release leaves a one-second tombstone holding the fence for the same
//!   reason.
//!
//! Begin returns the completed record in the same round trip, so a replay
//! costs one round trip and a first request two (begin, complete). Waiting
//! duplicates subscribe to `{prefix}:done:{hex}` (sharded pub/sub on
//! Cluster, same slot as the record) over RESP3 push messages, and re-check
//! at least every [`RECHECK`] so a lost message only delays them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind, Script, Value};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{Inspection, Store, StoreError, StoreFuture};

mod dedup;
use crate::config::{redact_url, StoreConfig};
use crate::idempotency::key::{Fingerprint, RecordKey};
use crate::idempotency::record::CompletedRecord;
use crate::idempotency::state::{Begin, Lease, State};

/// The longest a waiter goes without re-checking the record itself.
pub const RECHECK: Duration = Duration::from_millis(500);
/// How long a released key keeps its fence.
const TOMBSTONE_MS: u64 = 1000;

const BEGIN: &str = r"
local h = redis.call('HMGET', KEYS[1], 's', 'f', 'p', 'r')
if h[1] == 'i' then return {'i', h[2], h[3]} end
if h[1] == 'c' then return {'c', h[4]} end
local t = redis.call('TIME')
local fence = tonumber(t[1]) * 1000000 + tonumber(t[2])
local last = tonumber(h[2])
if last and last >= fence then fence = last + 1 end
local f = string.format('%d', fence)
if h[1] then redis.call('DEL', KEYS[1]) end
redis.call('HSET', KEYS[1], 's', 'i', 't', ARGV[1], 'f', f, 'p', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {'a', f}
";

const RENEW: &str = r"
local h = redis.call('HMGET', KEYS[1], 's', 't')
if h[1] == 'i' and h[2] == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

const COMPLETE: &str = r"
local h = redis.call('HMGET', KEYS[1], 's', 't')
if h[1] ~= 'i' or h[2] ~= ARGV[1] then return 0 end
redis.call('HDEL', KEYS[1], 't', 'p')
redis.call('HSET', KEYS[1], 's', 'c', 'r', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call(ARGV[5], ARGV[4], 'c')
return 1
";

const RELEASE: &str = r"
local h = redis.call('HMGET', KEYS[1], 's', 't', 'f')
if h[1] ~= 'i' or h[2] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 's', 'r', 'f', h[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call(ARGV[3], ARGV[2], 'r')
return 1
";

const GET: &str = r"
local h = redis.call('HMGET', KEYS[1], 's', 't', 'f', 'p', 'r')
return {h[1], h[2], h[3], h[4], h[5], redis.call('PTTL', KEYS[1])}
";

const PURGE: &str = r"
local n = redis.call('DEL', KEYS[1])
if n > 0 then redis.call(ARGV[2], ARGV[1], 'p') end
return n
";

/// Deletes a completed record only if it still holds the bytes we could not
/// decode, so a newer record written meanwhile survives.
const DISCARD: &str = r"
local h = redis.call('HMGET', KEYS[1], 's', 'r')
if h[1] == 'c' and h[2] == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

struct Scripts {
    begin: Script,
    renew: Script,
    complete: Script,
    release: Script,
    get: Script,
    purge: Script,
    discard: Script,
}

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// The Redis backend. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Conn,
    prefix: String,
    timeout: Duration,
    scripts: Scripts,
    dedup: dedup::DedupScripts,
    waiters: Arc<Waiters>,
    /// The longest a waiter goes without re-checking ([`RECHECK`]).
    recheck: Duration,
    /// Records whose encoding this build cannot read (treated as misses).
    decode_misses: AtomicU64,
    decode_counter: Option<prometheus::IntCounter>,
}

/// Waiting duplicates by channel; the push handler wakes them.
#[derive(Default)]
struct Waiters {
    channels: Mutex<Channels>,
}

/// Channel name → its waiters' notifier and how many wait on it.
type Channels = HashMap<Vec<u8>, (Arc<Notify>, usize)>;

impl Waiters {
    fn lock(&self) -> std::sync::MutexGuard<'_, Channels> {
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn on_push(&self, info: PushInfo) {
        match info.kind {
            PushKind::Message | PushKind::SMessage => {
                if let Some(Value::BulkString(channel)) = info.data.first() {
                    if let Some((n, _)) = self.lock().get(channel) {
                        n.notify_waiters();
                    }
                }
            }
            // The connection dropped: messages may be lost, re-check now.
            PushKind::Disconnection => {
                for (n, _) in self.lock().values() {
                    n.notify_waiters();
                }
            }
            _ => {}
        }
    }

    /// Registers a waiter; `true` if it is the channel's first.
    fn add(&self, channel: &[u8]) -> (Arc<Notify>, bool) {
        let mut map = self.lock();
        let slot = map
            .entry(channel.to_vec())
            .or_insert_with(|| (Arc::new(Notify::new()), 0));
        slot.1 += 1;
        (slot.0.clone(), slot.1 == 1)
    }

    /// Unregisters a waiter; `true` if it was the channel's last.
    fn remove(&self, channel: &[u8]) -> bool {
        let mut map = self.lock();
        match map.get_mut(channel) {
            Some(slot) if slot.1 > 1 => {
                slot.1 -= 1;
                false
            }
            Some(_) => {
                map.remove(channel);
                true
            }
            None => false,
        }
    }
}

fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl RedisStore {
    /// Connects to Redis (standalone: one URL; Cluster: seed URLs).
    pub async fn connect(config: &StoreConfig, cluster: bool) -> Result<Self, StoreError> {
        let waiters = Arc::new(Waiters::default());
        let w = waiters.clone();
        let push = move |info: PushInfo| {
            w.on_push(info);
            Ok::<(), std::convert::Infallible>(())
        };
        let timeout = config.timeout;
        // RESP3 carries pub/sub messages on the same multiplexed connection.
        let infos = config
            .urls
            .iter()
            .map(|u| {
                let info = u
                    .as_str()
                    .into_connection_info()
                    .map_err(|e| StoreError::Unavailable(format!("{}: {e}", redact_url(u))))?;
                let redis = info
                    .redis_settings()
                    .clone()
                    .set_protocol(ProtocolVersion::RESP3);
                Ok(info.set_redis_settings(redis))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let conn = if cluster {
            let client = redis::cluster::ClusterClientBuilder::new(infos)
                .use_protocol(ProtocolVersion::RESP3)
                .push_sender(push)
                .connection_timeout(timeout.max(Duration::from_secs(1)))
                .response_timeout(timeout)
                .retries(2)
                .build()
                .map_err(unavailable)?;
            Conn::Cluster(client.get_async_connection().await.map_err(unavailable)?)
        } else {
            let info = infos
                .into_iter()
                .next()
                .ok_or_else(|| StoreError::Unavailable("no Redis URL".into()))?;
            let client = redis::Client::open(info).map_err(unavailable)?;
            let cfg = ConnectionManagerConfig::new()
                .set_push_sender(push)
                .set_automatic_resubscription()
                .set_connection_timeout(Some(timeout.max(Duration::from_secs(1))))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_millis(500));
            let manager = tokio::time::timeout(
                timeout.max(Duration::from_secs(5)),
                ConnectionManager::new_with_config(client, cfg),
            )
            .await
            .map_err(|_| StoreError::Timeout(timeout.max(Duration::from_secs(5))))?
            .map_err(unavailable)?;
            Conn::Single(manager)
        };
        let store = RedisStore {
            inner: Arc::new(Inner {
                conn,
                prefix: config.key_prefix.clone(),
                timeout,
                scripts: Scripts {
                    begin: Script::new(BEGIN),
                    renew: Script::new(RENEW),
                    complete: Script::new(COMPLETE),
                    release: Script::new(RELEASE),
                    get: Script::new(GET),
                    purge: Script::new(PURGE),
                    discard: Script::new(DISCARD),
                },
                dedup: dedup::DedupScripts::new(),
                waiters,
                recheck: RECHECK,
                decode_misses: AtomicU64::new(0),
                decode_counter: None,
            }),
        };
        store.ping_inner().await?;
        store.warn_if_evicting().await;
        Ok(store)
    }

    /// Sets how long a waiter may go without re-checking the record. Tests
    /// set it long to prove that pub/sub, not the re-check, wakes waiters.
    /// Only before the store is cloned.
    pub fn with_recheck(mut self, recheck: Duration) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.recheck = recheck;
        }
        self
    }

    /// Also counts undecodable records in this metric. Only before the store
    /// is cloned.
    pub fn with_decode_counter(mut self, counter: prometheus::IntCounter) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.decode_counter = Some(counter);
        }
        self
    }

    /// How many stored records could not be decoded (and were treated as
    /// misses) since start.
    pub fn decode_misses(&self) -> u64 {
        self.inner.decode_misses.load(Ordering::Relaxed)
    }

    /// The Redis key of a record.
    pub fn record_key(&self, key: &RecordKey) -> String {
        format!("{}:{{{}}}", self.inner.prefix, key.to_hex())
    }

    fn channel(&self, key: &RecordKey) -> String {
        format!("{}:done:{{{}}}", self.inner.prefix, key.to_hex())
    }

    fn publish_cmd(&self) -> &'static str {
        match self.inner.conn {
            Conn::Single(_) => "PUBLISH",
            Conn::Cluster(_) => "SPUBLISH",
        }
    }

    /// Runs a script over one key, bounded by the store timeout.
    async fn eval<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        key: &str,
        args: &[&[u8]],
    ) -> Result<T, StoreError> {
        let mut inv = script.key(key);
        for a in args {
            inv.arg(*a);
        }
        let fut = async {
            match &self.inner.conn {
                Conn::Single(c) => inv.invoke_async(&mut c.clone()).await,
                Conn::Cluster(c) => inv.invoke_async(&mut c.clone()).await,
            }
        };
        self.bounded(fut).await
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: redis::Cmd) -> Result<T, StoreError> {
        let fut = async {
            match &self.inner.conn {
                Conn::Single(c) => cmd.query_async(&mut c.clone()).await,
                Conn::Cluster(c) => cmd.query_async(&mut c.clone()).await,
            }
        };
        self.bounded(fut).await
    }

    async fn query_pipe<T: redis::FromRedisValue>(
        &self,
        pipe: redis::Pipeline,
    ) -> Result<T, StoreError> {
        let fut = async {
            match &self.inner.conn {
                Conn::Single(c) => pipe.query_async(&mut c.clone()).await,
                Conn::Cluster(c) => pipe.query_async(&mut c.clone()).await,
            }
        };
        self.bounded(fut).await
    }

    async fn bounded<T>(
        &self,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.inner.timeout, fut).await {
            Err(_) => Err(StoreError::Timeout(self.inner.timeout)),
            Ok(r) => r.map_err(unavailable),
        }
    }

    async fn ping_inner(&self) -> Result<(), StoreError> {
        let pong: String = self.query(redis::cmd("PING")).await?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(StoreError::Unavailable(format!(
                "unexpected PING answer {pong:?}"
            )))
        }
    }

    /// Records have TTLs, so every policy but `noeviction` may evict one
    /// early and let a duplicate run. Warn when we can tell.
    async fn warn_if_evicting(&self) {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("GET").arg("maxmemory-policy");
        match self.query::<Vec<String>>(cmd).await {
            Ok(v) => match v.get(1).map(String::as_str) {
                Some("noeviction") | None => {}
                Some(policy) => tracing::warn!(
                    policy,
                    "Redis maxmemory-policy may evict idempotency records; set it to noeviction"
                ),
            },
            Err(e) => {
                tracing::debug!(error = %e, "cannot read maxmemory-policy (CONFIG GET not allowed?)")
            }
        }
    }

    async fn begin_inner(
        &self,
        key: &RecordKey,
        fp: &Fingerprint,
        lease_ttl: Duration,
    ) -> Result<Begin, StoreError> {
        let rkey = self.record_key(key);
        loop {
            let lease = Lease::new(0);
            let token = format!("{:032x}", lease.token);
            let ms = millis(lease_ttl).to_string();
            let v: Value = self
                .eval(
                    &self.inner.scripts.begin,
                    &rkey,
                    &[token.as_bytes(), &fp.0, ms.as_bytes()],
                )
                .await?;
            let parts = array(v)?;
            match (tag(&parts)?, parts.as_slice()) {
                ("a", [_, f]) => {
                    return Ok(Begin::Acquired(Lease {
                        token: lease.token,
                        fence: parse_u64(f)?,
                    }))
                }
                ("i", [_, f, p]) => {
                    return Ok(Begin::InFlight {
                        fingerprint: fingerprint(p)?,
                        fence: parse_u64(f)?,
                    })
                }
                ("c", [_, Value::BulkString(r)]) => {
                    let raw = Bytes::from(r.clone());
                    match CompletedRecord::decode(raw.clone()) {
                        Ok(rec) => return Ok(Begin::Completed(Arc::new(rec))),
                        Err(e) => {
                            // Written by a newer idemgate, or damaged: a miss.
                            self.inner.decode_misses.fetch_add(1, Ordering::Relaxed);
                            if let Some(c) = &self.inner.decode_counter {
                                c.inc();
                            }
                            tracing::warn!(record = %key.to_hex(), error = %e, "undecodable record treated as a miss");
                            let _: i64 = self
                                .eval(&self.inner.scripts.discard, &rkey, &[&raw])
                                .await?;
                        }
                    }
                }
                _ => return Err(malformed("begin")),
            }
        }
    }

    /// Whether the record is still in flight under `fence`.
    async fn still_in_flight(&self, key: &RecordKey, fence: u64) -> Result<bool, StoreError> {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(self.record_key(key)).arg("s").arg("f");
        let (s, f): (Option<String>, Option<String>) = self.query(cmd).await?;
        Ok(s.as_deref() == Some("i") && f.and_then(|f| f.parse().ok()) == Some(fence))
    }

    async fn subscribe(&self, channel: &str) -> Result<(), StoreError> {
        let fut = async {
            match &self.inner.conn {
                Conn::Single(c) => c.clone().subscribe(channel).await,
                Conn::Cluster(c) => c.clone().ssubscribe(channel).await,
            }
        };
        self.bounded(fut).await
    }

    fn unsubscribe_later(&self, channel: String) {
        let conn = self.inner.conn.clone();
        tokio::spawn(async move {
            let r = match conn {
                Conn::Single(mut c) => c.unsubscribe(&channel).await,
                Conn::Cluster(mut c) => c.sunsubscribe(&channel).await,
            };
            if let Err(e) = r {
                tracing::debug!(error = %e, "unsubscribe failed");
            }
        });
    }

    async fn wait_inner(
        &self,
        key: &RecordKey,
        fence: u64,
        deadline: Instant,
    ) -> Result<(), StoreError> {
        let channel = self.channel(key);
        let (notify, first) = self.inner.waiters.add(channel.as_bytes());
        let _registered = Unregister {
            store: self,
            channel: &channel,
        };
        if first {
            self.subscribe(&channel).await?;
        }
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        // Subscribed before this check, so a completion after it is heard;
        // one before it is seen here.
        if !self.still_in_flight(key, fence).await? {
            return Ok(());
        }
        let until = deadline.min(Instant::now() + self.inner.recheck);
        let _ = tokio::time::timeout_at(until, notified).await;
        Ok(())
    }

    async fn get_inner(&self, key: &RecordKey) -> Result<Inspection, StoreError> {
        // Missing hash fields come back as nil, in place: the TTL is last.
        let v: Value = self
            .eval(&self.inner.scripts.get, &self.record_key(key), &[])
            .await?;
        let parts = array(v)?;
        let expires_in = match parts.last() {
            Some(Value::Int(ms)) if *ms >= 0 => Some(Duration::from_millis(*ms as u64)),
            _ => None,
        };
        let state = self.state_of(key, parts)?;
        Ok(Inspection { state, expires_in })
    }

    fn state_of(&self, key: &RecordKey, parts: Vec<Value>) -> Result<State, StoreError> {
        let field = |i: usize| match parts.get(i) {
            Some(Value::BulkString(b)) => Some(b.as_slice()),
            _ => None,
        };
        match field(0) {
            Some(b"i") => {
                let token = field(1)
                    .and_then(|t| std::str::from_utf8(t).ok())
                    .and_then(|t| u128::from_str_radix(t, 16).ok())
                    .ok_or_else(|| malformed("get"))?;
                let fence = parse_u64(parts.get(2).ok_or_else(|| malformed("get"))?)?;
                let fingerprint = fingerprint(parts.get(3).ok_or_else(|| malformed("get"))?)?;
                Ok(State::InFlight {
                    lease: Lease { token, fence },
                    fingerprint,
                })
            }
            Some(b"c") => {
                match field(4).map(|r| CompletedRecord::decode(Bytes::copy_from_slice(r))) {
                    Some(Ok(rec)) => Ok(State::Completed(Arc::new(rec))),
                    // Like begin: a record this build can't read is a miss.
                    _ => {
                        tracing::debug!(record = %key.to_hex(), "undecodable record inspected");
                        Ok(State::Absent)
                    }
                }
            }
            _ => Ok(State::Absent),
        }
    }
}

/// Drops a waiter's registration, unsubscribing after the last one.
struct Unregister<'a> {
    store: &'a RedisStore,
    channel: &'a str,
}

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        if self.store.inner.waiters.remove(self.channel.as_bytes()) {
            self.store.unsubscribe_later(self.channel.to_owned());
        }
    }
}

fn millis(d: Duration) -> u64 {
    (d.as_millis() as u64).max(1)
}

fn malformed(op: &str) -> StoreError {
    StoreError::Unavailable(format!("unexpected answer from the {op} script"))
}

fn array(v: Value) -> Result<Vec<Value>, StoreError> {
    match v {
        Value::Array(a) => Ok(a),
        _ => Err(malformed("store")),
    }
}

fn tag(parts: &[Value]) -> Result<&str, StoreError> {
    match parts.first() {
        Some(Value::BulkString(b)) => std::str::from_utf8(b).map_err(|_| malformed("store")),
        Some(Value::SimpleString(s)) => Ok(s),
        _ => Err(malformed("store")),
    }
}

fn parse_u64(v: &Value) -> Result<u64, StoreError> {
    match v {
        Value::Int(n) => u64::try_from(*n).map_err(|_| malformed("store")),
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| malformed("store")),
        _ => Err(malformed("store")),
    }
}

fn fingerprint(v: &Value) -> Result<Fingerprint, StoreError> {
    match v {
        Value::BulkString(b) => <[u8; 32]>::try_from(b.as_slice())
            .map(Fingerprint)
            .map_err(|_| malformed("store")),
        _ => Err(malformed("store")),
    }
}

impl Store for RedisStore {
    fn begin<'a>(
        &'a self,
        key: &'a RecordKey,
        fp: &'a Fingerprint,
        lease_ttl: Duration,
    ) -> StoreFuture<'a, Begin> {
        Box::pin(self.begin_inner(key, fp, lease_ttl))
    }

    fn renew<'a>(
        &'a self,
        key: &'a RecordKey,
        lease: &'a Lease,
        lease_ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let token = format!("{:032x}", lease.token);
            let ms = millis(lease_ttl).to_string();
            let n: i64 = self
                .eval(
                    &self.inner.scripts.renew,
                    &self.record_key(key),
                    &[token.as_bytes(), ms.as_bytes()],
                )
                .await?;
            Ok(n == 1)
        })
    }

    fn complete<'a>(
        &'a self,
        key: &'a RecordKey,
        lease: &'a Lease,
        record: Arc<CompletedRecord>,
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let token = format!("{:032x}", lease.token);
            let encoded = record.encode();
            let ms = millis(ttl).to_string();
            let channel = self.channel(key);
            let n: i64 = self
                .eval(
                    &self.inner.scripts.complete,
                    &self.record_key(key),
                    &[
                        token.as_bytes(),
                        &encoded,
                        ms.as_bytes(),
                        channel.as_bytes(),
                        self.publish_cmd().as_bytes(),
                    ],
                )
                .await?;
            Ok(n == 1)
        })
    }

    fn release<'a>(&'a self, key: &'a RecordKey, lease: &'a Lease) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let token = format!("{:032x}", lease.token);
            let channel = self.channel(key);
            let tomb = TOMBSTONE_MS.to_string();
            let n: i64 = self
                .eval(
                    &self.inner.scripts.release,
                    &self.record_key(key),
                    &[
                        token.as_bytes(),
                        channel.as_bytes(),
                        self.publish_cmd().as_bytes(),
                        tomb.as_bytes(),
                    ],
                )
                .await?;
            Ok(n == 1)
        })
    }

    fn wait<'a>(
        &'a self,
        key: &'a RecordKey,
        fence: u64,
        deadline: Instant,
    ) -> StoreFuture<'a, ()> {
        Box::pin(self.wait_inner(key, fence, deadline))
    }

    fn get<'a>(&'a self, key: &'a RecordKey) -> StoreFuture<'a, Inspection> {
        Box::pin(self.get_inner(key))
    }

    fn purge<'a>(&'a self, key: &'a RecordKey) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let channel = self.channel(key);
            let n: i64 = self
                .eval(
                    &self.inner.scripts.purge,
                    &self.record_key(key),
                    &[channel.as_bytes(), self.publish_cmd().as_bytes()],
                )
                .await?;
            Ok(n > 0)
        })
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(self.ping_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::idempotency::key::hex;

    #[test]
    fn record_keys_hash_tag_only_the_digest() {
        let k = RecordKey::derive_dedup("s", "{user-chosen-tag}");
        let hexed = k.to_hex();
        let name = format!("idemgate:{{{hexed}}}");
        assert!(!name.contains("user-chosen-tag"));
        assert_eq!(hex(&k.0), hexed);
    }

    #[test]
    fn waiters_count_per_channel() {
        let w = Waiters::default();
        assert!(w.add(b"c").1);
        assert!(!w.add(b"c").1);
        assert!(!w.remove(b"c"));
        assert!(w.remove(b"c"));
        assert!(!w.remove(b"c"));
    }
}
