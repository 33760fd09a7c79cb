//! The Redis store, standalone and Cluster: several idemgate replicas share
//! state through it.
//!
//! Every transition is one Lua script over one key ([`scripts`], EVALSHA of
//! constant text), so it is atomic and Cluster never sees CROSSSLOT:
//!
//! - a record is one hash at `{prefix}:{hex}` where `hex` is the record key's
//!   SHA-256, inside the hash tag: user text never chooses a slot;
//! - fields: `s` state (`i` in flight, `c` completed, `r` released
//!   tombstone), `t` lease id, `f` fence, `p` fingerprint, `r` the encoded
//!   record ([`crate::idempotency::record::CompletedRecord::encode`]);
//! - the fence is Redis `TIME` in microseconds, and never below the last
//!   fence the key held, so it rises strictly per key, across expiry too; a
//!   release leaves a one-second tombstone holding the fence for the same
//!   reason.
//!
//! Begin returns the completed record in the same round trip, so a replay
//! costs one round trip and a first request two (begin, complete). Waiting
//! duplicates subscribe to `{prefix}:done:{hex}` (sharded pub/sub on
//! Cluster, same slot as the record) over RESP3 push messages
//! ([`waiters`]), and re-check at least every [`RECHECK`] so a lost message
//! only delays them. The HTTP records' transitions and the fair-share
//! bucket are in `records`, consumer-dedup records in `dedup`, the
//! connections in `local` (the shared one, which carries pub/sub, and one
//! per event loop: on standalone Redis over plain TCP the one in `driven`,
//! written and read by its calls), the Lua scripts in `scripts`, the waiters in
//! `waiters`, and the process-local copies of completed records in
//! `replays`; [`config`] is the backends' keys of `[store]` and how they
//! open.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{IntoConnectionInfo, ProtocolVersion, PushInfo, Script, Value};

use crate::idempotency::key::{hex_into, Fingerprint, RecordKey};
use crate::store::error::StoreError;
use crate::store::sealing::Sealing;

pub mod config;
mod dedup;
mod driven;
mod local;
mod records;
mod replays;
mod scripts;
mod waiters;

use local::{Conn, Conns, Opener, Shared};
use replays::Replays;
use scripts::Scripts;
use waiters::Waiters;

/// The longest a waiter goes without re-checking the record itself.
pub const RECHECK: Duration = Duration::from_millis(500);

/// How to reach Redis and how to behave there.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// One URL (standalone) or seed URLs (Cluster).
    pub urls: Vec<String>,
    pub cluster: bool,
    pub key_prefix: String,
    /// Upper bound on any one call.
    pub timeout: Duration,
    /// The longest a waiter goes without re-checking ([`RECHECK`]). Tests set
    /// it long to prove that pub/sub, not the re-check, wakes waiters.
    pub recheck: Duration,
    /// How records are written and read (encryption, decode errors).
    pub sealing: Sealing,
    /// Replicas that must acknowledge a begin (else it is undone and
    /// refused) and a complete (else it is logged and counted); 0: none.
    pub min_replicas: u32,
    pub replica_ack_timeout: Duration,
    /// Counts writes not acknowledged in time, by `op`.
    pub ack_failures: Option<prometheus::IntCounterVec>,
    /// Bytes of completed records kept in the process so replays need no
    /// round trip (standalone Redis; 0: off). See `replays.rs`.
    pub replay_cache_bytes: usize,
    /// Counts replay-cache lookups, by `result` (`hit`, `miss`).
    pub replay_cache_lookups: Option<prometheus::IntCounterVec>,
}

impl RedisOptions {
    pub fn new(urls: Vec<String>, cluster: bool) -> Self {
        RedisOptions {
            urls,
            cluster,
            key_prefix: "idemgate".into(),
            timeout: Duration::from_secs(1),
            recheck: RECHECK,
            sealing: Sealing::default(),
            min_replicas: 0,
            replica_ack_timeout: Duration::from_millis(100),
            ack_failures: None,
            replay_cache_bytes: 0,
            replay_cache_lookups: None,
        }
    }
}

/// The Redis backend. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    conns: Conns,
    prefix: String,
    timeout: Duration,
    recheck: Duration,
    scripts: Scripts,
    waiters: Arc<Waiters>,
    sealing: Sealing,
    min_replicas: u32,
    replica_ack_timeout: Duration,
    ack_failures: Option<prometheus::IntCounterVec>,
    /// Completed records kept in the process (standalone, when enabled).
    replays: Option<Arc<Replays>>,
}

fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// A Redis URL with its password replaced, for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}:***{}", &url[..s + 3], user, &url[at..])
        }
        _ => url.to_owned(),
    }
}

impl RedisStore {
    /// Connects to Redis (standalone: one URL; Cluster: seed URLs).
    pub async fn connect(options: RedisOptions) -> Result<Self, StoreError> {
        let waiters = Arc::new(Waiters::default());
        let replays = (!options.cluster && options.replay_cache_bytes > 0).then(|| {
            Arc::new(Replays::new(
                format!("{}:replays", options.key_prefix),
                options.replay_cache_bytes,
                options.replay_cache_lookups.clone(),
            ))
        });
        let (w, r) = (waiters.clone(), replays.clone());
        let push = move |info: PushInfo| {
            if let Some(r) = &r {
                r.on_push(&info);
            }
            w.on_push(info);
            Ok::<(), std::convert::Infallible>(())
        };
        let timeout = options.timeout;
        // RESP3 carries pub/sub messages on the same multiplexed connection.
        let infos = options
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
        let (conn, opener) = if options.cluster {
            let builder = || {
                redis::cluster::ClusterClientBuilder::new(infos.clone())
                    .use_protocol(ProtocolVersion::RESP3)
                    .connection_timeout(timeout.max(Duration::from_secs(1)))
                    .response_timeout(timeout)
                    .retries(2)
            };
            // Each event loop's own connection carries no pub/sub.
            let loops = builder().build().map_err(unavailable)?;
            let client = builder().push_sender(push).build().map_err(unavailable)?;
            let conn = Shared::Cluster(client.get_async_connection().await.map_err(unavailable)?);
            (conn, Opener::Cluster(loops))
        } else {
            let info = infos
                .into_iter()
                .next()
                .ok_or_else(|| StoreError::Unavailable("no Redis URL".into()))?;
            let client = redis::Client::open(info).map_err(unavailable)?;
            let loops = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout.max(Duration::from_secs(1))))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_millis(500));
            let cfg = loops
                .clone()
                .set_push_sender(push)
                .set_automatic_resubscription();
            let manager = tokio::time::timeout(
                timeout.max(Duration::from_secs(5)),
                ConnectionManager::new_with_config(client.clone(), cfg),
            )
            .await
            .map_err(|_| StoreError::Timeout(timeout.max(Duration::from_secs(5))))?
            .map_err(unavailable)?;
            (Shared::Single(manager), Opener::Single(client, loops))
        };
        let store = RedisStore {
            inner: Arc::new(Inner {
                conns: Conns::new(conn, opener, timeout.max(Duration::from_secs(5))),
                prefix: options.key_prefix,
                timeout,
                recheck: options.recheck,
                scripts: Scripts::load(),
                waiters,
                sealing: options.sealing,
                min_replicas: options.min_replicas,
                replica_ack_timeout: options.replica_ack_timeout,
                ack_failures: options.ack_failures,
                replays,
            }),
        };
        store.ping_inner().await?;
        if let Some(r) = &store.inner.replays {
            // Copies are kept once this subscription is confirmed (and
            // again after each reconnect's automatic resubscription).
            let channel = String::from_utf8_lossy(r.channel()).into_owned();
            store.subscribe(&channel).await?;
        }
        store.warn_if_evicting().await;
        Ok(store)
    }

    /// A Redis name of `kind` (`:`, `:done:`, `:rl:`, `:d:`, `:dlq:`) for
    /// `digest` ([`tagged`]).
    fn name(&self, kind: &str, digest: &[u8]) -> String {
        tagged(&self.inner.prefix, kind, digest)
    }

    /// The Redis key of a record.
    pub fn record_key(&self, key: &RecordKey) -> String {
        self.name(":", &key.0)
    }

    fn channel(&self, key: &RecordKey) -> String {
        self.name(":done:", &key.0)
    }

    /// The replay caches' invalidation channel, or `b""` without them.
    fn replays_channel(&self) -> &[u8] {
        self.inner.replays.as_ref().map_or(b"", |r| r.channel())
    }

    /// What the calling event loop's own connection is once it is open:
    /// `"driven"` (standalone over plain TCP, `driven.rs`) or `"crate"`;
    /// `None` until then and off the loops. For tests and diagnostics.
    #[doc(hidden)]
    pub fn loop_connection(&self) -> Option<&'static str> {
        self.inner.conns.kind_here()
    }

    /// Bytes the replay cache holds (0 without one).
    pub fn replay_cache_bytes(&self) -> usize {
        self.inner.replays.as_ref().map_or(0, |r| r.cache.bytes())
    }

    /// The scripts' `sharded` argument: `1` on Cluster (SPUBLISH).
    fn sharded(&self) -> &'static [u8] {
        match self.inner.conns.shared() {
            Shared::Single(_) => b"0",
            Shared::Cluster(_) => b"1",
        }
    }

    fn is_cluster(&self) -> bool {
        matches!(self.inner.conns.shared(), Shared::Cluster(_))
    }

    /// Runs a script over one key, bounded by the store timeout.
    async fn eval<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        key: &str,
        args: &[&[u8]],
    ) -> Result<T, StoreError> {
        self.eval_on(self.inner.conns.pick(), script, key, args)
            .await
    }

    /// [`Self::eval`] on a given connection (one a `WAIT` will follow on).
    async fn eval_on<T: redis::FromRedisValue>(
        &self,
        mut conn: Conn,
        script: &Script,
        key: &str,
        args: &[&[u8]],
    ) -> Result<T, StoreError> {
        let mut inv = script.key(key);
        for a in args {
            inv.arg(*a);
        }
        self.bounded(inv.invoke_async(&mut conn)).await
    }

    /// [`Self::eval`] with owned arguments.
    async fn eval_args<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        key: &str,
        args: &[Vec<u8>],
    ) -> Result<T, StoreError> {
        let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
        self.eval(script, key, &refs).await
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: redis::Cmd) -> Result<T, StoreError> {
        let mut conn = self.inner.conns.pick();
        self.bounded(cmd.query_async(&mut conn)).await
    }

    async fn query_pipe<T: redis::FromRedisValue>(
        &self,
        pipe: redis::Pipeline,
    ) -> Result<T, StoreError> {
        let mut conn = self.inner.conns.pick();
        self.bounded(pipe.query_async(&mut conn)).await
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

    /// Runs one script for many keys without a round trip each: one
    /// pipeline on standalone; on Cluster (whose pipelines cannot span
    /// slots) concurrent calls, which the multiplexed connections pipeline
    /// per node, items of one key in their order (as a pipeline keeps
    /// them). Items whose script was not loaded (NOSCRIPT: a restarted
    /// Redis) run again one by one, which loads it.
    async fn pipelined(
        &self,
        script: &Script,
        calls: &[(String, Vec<Vec<u8>>)],
    ) -> Result<Vec<Result<Value, StoreError>>, StoreError> {
        if calls.is_empty() {
            return Ok(Vec::new());
        }
        if self.is_cluster() {
            // Items for the same key run in their order (one chain per
            // key); chains for different keys run concurrently.
            let mut chains: std::collections::HashMap<&str, Vec<usize>> = Default::default();
            for (i, (key, _)) in calls.iter().enumerate() {
                chains.entry(key.as_str()).or_default().push(i);
            }
            let runs = chains.into_values().map(|items| async move {
                let mut done = Vec::with_capacity(items.len());
                for i in items {
                    let (key, args) = &calls[i];
                    done.push((i, self.eval_args::<Value>(script, key, args).await));
                }
                done
            });
            let mut out: Vec<(usize, Result<Value, StoreError>)> =
                futures_util::future::join_all(runs)
                    .await
                    .into_iter()
                    .flatten()
                    .collect();
            out.sort_by_key(|(i, _)| *i);
            return Ok(out.into_iter().map(|(_, r)| r).collect());
        }
        let invocations: Vec<_> = calls
            .iter()
            .map(|(key, args)| {
                let mut inv = script.key(key.as_str());
                for a in args {
                    inv.arg(a.as_slice());
                }
                inv
            })
            .collect();
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for inv in &invocations {
            pipe.invoke_script(inv);
        }
        let results: Vec<redis::RedisResult<Value>> = self.query_pipe(pipe).await?;
        let mut out = Vec::with_capacity(results.len());
        for (r, (key, args)) in results.into_iter().zip(calls) {
            out.push(match r {
                Ok(v) => Ok(v),
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    self.eval_args(script, key, args).await
                }
                Err(e) => Err(StoreError::Unavailable(e.to_string())),
            });
        }
        Ok(out)
    }

    /// Runs commands on many keys without a round trip each (see
    /// [`Self::pipelined`]).
    async fn query_many<T: redis::FromRedisValue>(
        &self,
        cmds: Vec<redis::Cmd>,
    ) -> Result<Vec<T>, StoreError> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        if self.is_cluster() {
            let each = cmds.into_iter().map(|c| self.query::<T>(c));
            return futures_util::future::join_all(each)
                .await
                .into_iter()
                .collect();
        }
        let mut pipe = redis::pipe();
        for c in &cmds {
            pipe.add_command(c.clone());
        }
        self.query_pipe(pipe).await
    }

    /// Whether `min_replicas` replicas acknowledged the writes made on
    /// `conn` within `replica_ack_timeout` (`WAIT`; always with none
    /// required). A refusal is counted under `op`.
    async fn replicated(&self, mut conn: Conn, op: &str) -> Result<bool, StoreError> {
        let need = self.inner.min_replicas;
        if need == 0 {
            return Ok(true);
        }
        let wait_ms = self.inner.replica_ack_timeout.as_millis().max(1) as u64;
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(need).arg(wait_ms);
        let fut = cmd.query_async::<i64>(&mut conn);
        // WAIT itself blocks up to replica_ack_timeout: bound the call by
        // that plus the store timeout.
        let bound = self.inner.replica_ack_timeout + self.inner.timeout;
        let acked = match tokio::time::timeout(bound, fut).await {
            Err(_) => return Err(StoreError::Timeout(bound)),
            Ok(r) => r.map_err(unavailable)?,
        };
        let ok = acked >= i64::from(need);
        if !ok {
            if let Some(c) = &self.inner.ack_failures {
                c.with_label_values(&[op]).inc();
            }
        }
        Ok(ok)
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
        // A map on RESP3 (a flat list on RESP2): read by name either way.
        match self
            .query::<std::collections::HashMap<String, String>>(cmd)
            .await
        {
            Ok(v) => match v.get("maxmemory-policy").map(String::as_str) {
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
}

/// Milliseconds as a script argument; at least 1 (PEXPIRE 0 deletes).
fn millis(d: Duration) -> String {
    (d.as_millis() as u64).max(1).to_string()
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

/// `prefix`, `kind` and a digest's hex as the hash tag, so that Cluster
/// places the name by the digest alone. Written into one buffer, not
/// formatted: a request builds two or three, and the formatter's machinery
/// and a separate hex string cost more than the bytes (benches/RESULTS.md,
/// "Moves and lookups").
fn tagged(prefix: &str, kind: &str, digest: &[u8]) -> String {
    let mut name = Vec::with_capacity(prefix.len() + kind.len() + 2 * digest.len() + 2);
    name.extend_from_slice(prefix.as_bytes());
    name.extend_from_slice(kind.as_bytes());
    name.push(b'{');
    let at = name.len();
    name.resize(at + 2 * digest.len(), 0);
    hex_into(digest, &mut name[at..]);
    name.push(b'}');
    String::from_utf8(name).expect("text and hex digits")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::idempotency::key::hex;

    #[test]
    fn record_keys_hash_tag_only_the_digest() {
        let k = RecordKey::derive_dedup("s", "{user-chosen-tag}");
        let hexed = k.to_hex();
        let name = tagged("idemgate", ":", &k.0);
        assert_eq!(name, format!("idemgate:{{{hexed}}}"));
        assert!(!name.contains("user-chosen-tag"));
        assert_eq!(hex(&k.0), hexed);
        assert_eq!(tagged("p", ":dlq:", &[0xab, 1]), "p:dlq:{ab01}");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact_url("redis://u:secret@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(redact_url("redis://h:1"), "redis://h:1");
    }
}
