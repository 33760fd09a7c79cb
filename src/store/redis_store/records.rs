//! HTTP idempotency records on Redis: [`RecordStore`] over the scripts
//! `begin`, `renew`, `complete`, `release`, `get`, `in_flight`, `purge` and
//! `discard`.

use std::sync::Arc;
use std::time::Duration;

use redis::Value;
use tokio::time::Instant;

use super::{array, fingerprint, malformed, millis, parse_u64, tag, RedisStore, Shared};
use crate::idempotency::key::{Fingerprint, RecordKey};
use crate::idempotency::lease::LeaseId;
use crate::idempotency::rate::Rate;
use crate::idempotency::record::CompletedRecord;
use crate::idempotency::state::{
    Begin, BeginOptions, Lease, Resolution, State, Unknown, UnknownCause,
};
use crate::store::buckets::BucketStore;
use crate::store::error::{StoreError, StoreFuture};
use crate::store::records::{Inspection, RecordStore};

/// The encoded record in a completed record's value as `begin` returns it:
/// `c`, the fence, a space, then the record (`lua/lib.lua`).
fn encoded(held: &[u8]) -> Result<&[u8], StoreError> {
    match held.iter().position(|&b| b == b' ') {
        Some(space) if held.first() == Some(&b'c') => Ok(&held[space + 1..]),
        _ => Err(malformed("begin")),
    }
}

/// How long a released key keeps its fence.
const TOMBSTONE_MS: &[u8] = b"1000";

impl RedisStore {
    async fn begin_inner(
        &self,
        key: &RecordKey,
        fp: &Fingerprint,
        opts: BeginOptions,
    ) -> Result<Begin, StoreError> {
        let rkey = self.record_key(key);
        let replays = self.inner.replays.as_ref().map(|r| &*r.cache);
        if let Some(rec) = replays.and_then(|c| c.get(&rkey)) {
            return Ok(Begin::Completed(rec));
        }
        let epoch = replays.map_or(0, |c| c.epoch());
        // ARGV 3 to 6 of begin.lua; the same for every try of the loop.
        let optional = |d: Option<Duration>| d.map(millis).unwrap_or_default();
        let lease_ms = millis(opts.lease_ttl);
        let in_flight_ms = millis(opts.in_flight_ttl());
        let hold_ms = optional(opts.hold_lapsed);
        let reconcile_ms = optional(opts.reconcile_every);
        loop {
            let token = LeaseId::random();
            // The `WAIT` below must follow on the connection that wrote.
            let conn = self.inner.conns.pick();
            let v: Value = self
                .eval_on(
                    conn.clone(),
                    &self.inner.scripts.begin,
                    &rkey,
                    &[
                        token.to_string().as_bytes(),
                        &fp.0,
                        lease_ms.as_bytes(),
                        in_flight_ms.as_bytes(),
                        hold_ms.as_bytes(),
                        reconcile_ms.as_bytes(),
                    ],
                )
                .await?;
            let parts = array(v)?;
            match (tag(&parts)?, parts.as_slice()) {
                ("a", [_, f]) => {
                    let lease = Lease {
                        token,
                        fence: parse_u64(f)?,
                    };
                    if !self.replicated(conn, "begin").await? {
                        // Not durable enough to rely on: undo it, refuse.
                        let _ = RecordStore::release(self, key, &lease).await;
                        return Err(StoreError::Unavailable(format!(
                            "the lease was not acknowledged by {} replica(s) within {:?}",
                            self.inner.min_replicas, self.inner.replica_ack_timeout
                        )));
                    }
                    return Ok(Begin::Acquired(lease));
                }
                ("i", [_, f, p]) => {
                    return Ok(Begin::InFlight {
                        fingerprint: fingerprint(p)?,
                        fence: parse_u64(f)?,
                    })
                }
                ("u", [_, f, p, cause, since, next, reconcile, held_now]) => {
                    return Ok(Begin::Unknown {
                        unknown: unknown(f, p, cause, since, next)?,
                        reconcile: parse_u64(reconcile)? == 1,
                        lapsed_now: parse_u64(held_now)? == 1,
                    })
                }
                ("c", [_, Value::BulkString(held), pttl]) => match self.decode(key, encoded(held)?)
                {
                    Some(rec) => {
                        if let (Some(c), Ok(ms)) = (replays, parse_u64(pttl)) {
                            c.put(&rkey, rec.clone(), Duration::from_millis(ms), epoch);
                        }
                        return Ok(Begin::Completed(rec));
                    }
                    // Drop it (unless rewritten meanwhile) and begin again.
                    None => {
                        let _: i64 = self
                            .eval(
                                &self.inner.scripts.discard,
                                &rkey,
                                &[held, self.replays_channel()],
                            )
                            .await?;
                        if let Some(c) = replays {
                            c.invalidate(&rkey);
                        }
                    }
                },
                _ => return Err(malformed("begin")),
            }
        }
    }

    /// Decodes (and opens) a stored record; one that does not read is a
    /// miss, counted and logged once by the sealing.
    fn decode(&self, key: &RecordKey, raw: &[u8]) -> Option<Arc<CompletedRecord>> {
        self.inner.sealing.decode(key, raw).map(Arc::new)
    }

    /// Whether the record is still in flight under `fence` (the
    /// `in_flight` script reads either layout: a string, or an earlier
    /// version's hash). Once per waiting duplicate.
    async fn still_in_flight(&self, key: &RecordKey, fence: u64) -> Result<bool, StoreError> {
        let held: Option<u64> = self
            .eval(&self.inner.scripts.in_flight, &self.record_key(key), &[])
            .await?;
        Ok(held == Some(fence))
    }

    pub(super) async fn subscribe(&self, channel: &str) -> Result<(), StoreError> {
        let fut = async {
            match self.inner.conns.shared() {
                Shared::Single(c) => c.clone().subscribe(channel).await,
                Shared::Cluster(c) => c.clone().ssubscribe(channel).await,
            }
        };
        self.bounded(fut).await
    }

    fn unsubscribe_later(&self, channel: String) {
        let conn = self.inner.conns.shared().clone();
        tokio::spawn(async move {
            let r = match conn {
                Shared::Single(mut c) => c.unsubscribe(&channel).await,
                Shared::Cluster(mut c) => c.sunsubscribe(&channel).await,
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
                    .and_then(|t| t.parse().ok())
                    .ok_or_else(|| malformed("get"))?;
                let fence = parse_u64(parts.get(2).ok_or_else(|| malformed("get"))?)?;
                let fingerprint = fingerprint(parts.get(3).ok_or_else(|| malformed("get"))?)?;
                Ok(State::InFlight {
                    lease: Lease { token, fence },
                    fingerprint,
                })
            }
            // Like begin: a record this build can't read is a miss.
            Some(b"c") => Ok(field(4)
                .and_then(|r| self.decode(key, r))
                .map_or(State::Absent, State::Completed)),
            Some(b"u") => {
                let at = |i: usize| parts.get(i).ok_or_else(|| malformed("get"));
                Ok(State::Unknown(unknown(
                    at(2)?,
                    at(3)?,
                    at(5)?,
                    at(6)?,
                    at(7)?,
                )?))
            }
            _ => Ok(State::Absent),
        }
    }
}

/// An unknown record from its fields: fence, fingerprint, cause, since,
/// next check.
fn unknown(
    fence: &Value,
    fp: &Value,
    cause: &Value,
    since: &Value,
    next: &Value,
) -> Result<Unknown, StoreError> {
    let cause = match cause {
        Value::BulkString(b) => std::str::from_utf8(b).ok().and_then(UnknownCause::decode),
        _ => None,
    };
    Ok(Unknown {
        fence: parse_u64(fence)?,
        fingerprint: fingerprint(fp)?,
        cause: cause.ok_or_else(|| malformed("unknown record"))?,
        since_unix_ms: parse_u64(since)?,
        next_check_unix_ms: parse_u64(next).unwrap_or(0),
    })
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

impl RecordStore for RedisStore {
    fn begin<'a>(
        &'a self,
        key: &'a RecordKey,
        fp: &'a Fingerprint,
        opts: BeginOptions,
    ) -> StoreFuture<'a, Begin> {
        Box::pin(self.begin_inner(key, fp, opts))
    }

    fn mark_unknown<'a>(
        &'a self,
        key: &'a RecordKey,
        lease: &'a Lease,
        cause: UnknownCause,
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let n: i64 = self
                .eval(
                    &self.inner.scripts.mark_unknown,
                    &self.record_key(key),
                    &[
                        lease.token.to_string().as_bytes(),
                        cause.encode().as_bytes(),
                        millis(ttl).as_bytes(),
                        self.channel(key).as_bytes(),
                        self.sharded(),
                    ],
                )
                .await?;
            Ok(n == 1)
        })
    }

    fn resolve<'a>(
        &'a self,
        key: &'a RecordKey,
        fence: u64,
        resolution: Resolution,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let (how, record, ttl) = match &resolution {
                Resolution::Completed(record, ttl) => (
                    "complete",
                    self.inner.sealing.encode(key, record),
                    millis(*ttl),
                ),
                Resolution::Release => ("release", Default::default(), String::new()),
            };
            let n: i64 = self
                .eval(
                    &self.inner.scripts.resolve,
                    &self.record_key(key),
                    &[
                        fence.to_string().as_bytes(),
                        how.as_bytes(),
                        &record,
                        ttl.as_bytes(),
                        self.channel(key).as_bytes(),
                        self.sharded(),
                        TOMBSTONE_MS,
                    ],
                )
                .await?;
            Ok(n == 1)
        })
    }

    fn renew<'a>(
        &'a self,
        key: &'a RecordKey,
        lease: &'a Lease,
        lease_ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let n: i64 = self
                .eval(
                    &self.inner.scripts.renew,
                    &self.record_key(key),
                    &[
                        lease.token.to_string().as_bytes(),
                        millis(lease_ttl).as_bytes(),
                    ],
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
            let conn = self.inner.conns.pick();
            let n: i64 = self
                .eval_on(
                    conn.clone(),
                    &self.inner.scripts.complete,
                    &self.record_key(key),
                    &[
                        lease.token.to_string().as_bytes(),
                        &self.inner.sealing.encode(key, &record),
                        millis(ttl).as_bytes(),
                        self.channel(key).as_bytes(),
                        self.sharded(),
                    ],
                )
                .await?;
            // Stored either way; a record not yet on a replica is at risk
            // only if the primary fails before it gets there.
            if n == 1 && !self.replicated(conn, "complete").await.unwrap_or(false) {
                tracing::warn!(
                    record = %key.to_hex(),
                    min_replicas = self.inner.min_replicas,
                    "record stored but not acknowledged by the replicas in time"
                );
            }
            Ok(n == 1)
        })
    }

    fn release<'a>(&'a self, key: &'a RecordKey, lease: &'a Lease) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let n: i64 = self
                .eval(
                    &self.inner.scripts.release,
                    &self.record_key(key),
                    &[
                        lease.token.to_string().as_bytes(),
                        self.channel(key).as_bytes(),
                        self.sharded(),
                        TOMBSTONE_MS,
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
            let n: i64 = self
                .eval(
                    &self.inner.scripts.purge,
                    &self.record_key(key),
                    &[
                        self.channel(key).as_bytes(),
                        self.sharded(),
                        self.replays_channel(),
                    ],
                )
                .await?;
            // The others hear the script's message; this replica forgets
            // its copy now rather than trust that message's order.
            if let Some(r) = &self.inner.replays {
                r.cache.invalidate(&self.record_key(key));
            }
            Ok(n > 0)
        })
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(self.ping_inner())
    }
}

impl BucketStore for RedisStore {
    fn admit<'a>(
        &'a self,
        scope: &'a RecordKey,
        rate: Rate,
    ) -> StoreFuture<'a, Result<(), Duration>> {
        Box::pin(async move {
            let bucket = self.name(":rl:", &scope.0);
            let wait: i64 = self
                .eval(
                    &self.inner.scripts.admit,
                    &bucket,
                    &[
                        rate.per_second.to_string().as_bytes(),
                        rate.burst.to_string().as_bytes(),
                        millis(rate.refill()).as_bytes(),
                    ],
                )
                .await?;
            Ok(match u64::try_from(wait) {
                Ok(0) | Err(_) => Ok(()),
                Ok(ms) => Err(Duration::from_millis(ms)),
            })
        })
    }
}
