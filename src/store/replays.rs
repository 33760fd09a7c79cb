//! Completed records kept in the process, so a replay need not leave it:
//! a completed record does not change until it expires or is purged, so a
//! copy is good until then. A copy is kept when a record is replayed from
//! the store (a key replayed once is the one retried again); new records
//! are not copied, so traffic of fresh keys costs no memory here. Backends
//! that can tell every replica about a purge use it (standalone Redis over
//! pub/sub, PostgreSQL over `LISTEN`/`NOTIFY`).
//!
//! What keeps a copy true:
//! - it lives no longer than the record's remaining TTL (read with the
//!   record, less a margin) and never longer than [`MAX_AGE`];
//! - a purge or discard removes the copy in the replica that made it and
//!   publishes the record's name on the backend's invalidation channel,
//!   which every replica hears: [`ReplayCache::invalidate`] drops its copy;
//! - a copy read from the store is kept only if no invalidation arrived
//!   while it was being read (an epoch taken before the round trip), so a
//!   purge racing the read can never leave a stale copy behind;
//! - while the channel is not heard (before it is first subscribed, after
//!   its connection drops) the cache is off: [`ReplayCache::set_live`]
//!   `false` drops every copy, so a missed invalidation can never be
//!   served.
//!
//! A record deleted in the store by hand (not through idemgate) is seen by
//! no replica: its copies live out [`MAX_AGE`] at most.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use crate::idempotency::record::CompletedRecord;

/// The longest a copy lives, whatever the record's TTL: bounds how long a
/// record deleted behind idemgate's back can still be replayed.
pub const MAX_AGE: Duration = Duration::from_secs(60);
/// Copies expire this much before the record does (clocks and latency).
const MARGIN: Duration = Duration::from_millis(250);
const SHARDS: usize = 16;
/// What a copy costs beyond its bytes.
const ENTRY_OVERHEAD: usize = 1024;

pub struct ReplayCache {
    shards: Vec<Mutex<Shard>>,
    max_bytes_per_shard: usize,
    /// Subscribed and connected: copies may be kept and served.
    live: AtomicBool,
    /// Bumped by every invalidation and drop.
    epoch: AtomicU64,
    bytes: AtomicUsize,
    /// `idemgate_replay_cache_lookups_total{result="hit"}` and `"miss"`,
    /// resolved once (a label lookup per replay would hash the label).
    counters: Option<(prometheus::IntCounter, prometheus::IntCounter)>,
}

#[derive(Default)]
struct Shard {
    map: HashMap<String, Entry>,
    /// Insertion order, for eviction (oldest first).
    order: VecDeque<String>,
    bytes: usize,
}

struct Entry {
    record: Arc<CompletedRecord>,
    until: Instant,
    size: usize,
}

impl ReplayCache {
    /// A cache of at most `max_bytes`, off until [`Self::set_live`].
    pub fn new(max_bytes: usize, lookups: Option<prometheus::IntCounterVec>) -> Self {
        ReplayCache {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            max_bytes_per_shard: max_bytes / SHARDS,
            live: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            bytes: AtomicUsize::new(0),
            counters: lookups.map(|c| {
                (
                    c.with_label_values(&["hit"]),
                    c.with_label_values(&["miss"]),
                )
            }),
        }
    }

    fn shard(&self, name: &str) -> MutexGuard<'_, Shard> {
        // Record names end in hex of a SHA-256: any byte spreads well.
        let i = name.as_bytes().last().map_or(0, |b| *b as usize) % SHARDS;
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets the copy of `name` in shard `s`, counting its bytes out.
    fn forget(&self, s: &mut Shard, name: &str) {
        if let Some(e) = s.map.remove(name) {
            s.bytes -= e.size;
            self.bytes.fetch_sub(e.size, Ordering::Relaxed);
        }
    }

    /// The copy of record `name`, if one is kept and still good.
    pub fn get(&self, name: &str) -> Option<Arc<CompletedRecord>> {
        if !self.live.load(Ordering::Acquire) {
            return None;
        }
        let mut s = self.shard(name);
        let hit = match s.map.get(name) {
            Some(e) if e.until > Instant::now() => Some(e.record.clone()),
            Some(_) => {
                self.forget(&mut s, name);
                None
            }
            None => None,
        };
        drop(s);
        if let Some((hits, misses)) = &self.counters {
            if hit.is_some() { hits } else { misses }.inc();
        }
        hit
    }

    /// The epoch to hand to [`Self::put`]: take it before asking the store.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Keeps a copy of record `name`, which the store holds for `ttl` more, if
    /// nothing was invalidated since `epoch`.
    pub fn put(&self, name: &str, record: Arc<CompletedRecord>, ttl: Duration, epoch: u64) {
        let life = ttl.saturating_sub(MARGIN).min(MAX_AGE);
        if life.is_zero() || !self.live.load(Ordering::Acquire) {
            return;
        }
        // Counted with the allocations around the bytes (the map entry, the
        // name, the record, its header map): about 1 KiB, measured by RSS.
        let size = record.response.body.len()
            + record
                .response
                .headers
                .iter()
                .map(|(k, v)| k.as_str().len() + v.len() + 32)
                .sum::<usize>()
            + name.len()
            + ENTRY_OVERHEAD;
        if size > self.max_bytes_per_shard {
            return;
        }
        let mut s = self.shard(name);
        // Checked under the shard lock that `remove` takes too.
        if self.epoch.load(Ordering::Acquire) != epoch {
            return;
        }
        if let Some(old) = s.map.insert(
            name.to_owned(),
            Entry {
                record,
                until: Instant::now() + life,
                size,
            },
        ) {
            s.bytes -= old.size;
            self.bytes.fetch_sub(old.size, Ordering::Relaxed);
        } else {
            s.order.push_back(name.to_owned());
        }
        s.bytes += size;
        self.bytes.fetch_add(size, Ordering::Relaxed);
        while s.bytes > self.max_bytes_per_shard {
            let Some(oldest) = s.order.pop_front() else {
                break;
            };
            self.forget(&mut s, &oldest);
        }
        // Names whose entries went another way (removed, expired) leave
        // the order queue as they reach its front.
        if s.order.len() > 2 * s.map.len() + 64 {
            let Shard { map, order, .. } = &mut *s;
            order.retain(|n| map.contains_key(n));
        }
    }

    /// Drops the copy of `name`: purged or discarded, here or in another
    /// replica. A read under way when this runs keeps no copy.
    pub fn invalidate(&self, name: &str) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.forget(&mut self.shard(name), name);
    }

    /// Whether the invalidation channel is heard. Going off drops every
    /// copy (invalidations may be lost) and keeps none until it is back.
    pub fn set_live(&self, live: bool) {
        if live {
            self.live.store(true, Ordering::Release);
            return;
        }
        self.live.store(false, Ordering::Release);
        self.epoch.fetch_add(1, Ordering::AcqRel);
        for shard in &self.shards {
            let mut s = shard.lock().unwrap_or_else(|p| p.into_inner());
            self.bytes.fetch_sub(s.bytes, Ordering::Relaxed);
            *s = Shard::default();
        }
    }

    /// Bytes held by the copies.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }
}
