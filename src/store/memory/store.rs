//! The embedded in-memory store: one process, no dependencies.
//!
//! Both keyspaces, HTTP records (`records.rs`) and consumer-dedup records
//! (`dedup.rs`), are [`TtlMap`]s on one [`Clock`] and one bound,
//! `max_entries`: when full the store sweeps expired entries, and if it is
//! still full it refuses new keys ([`StoreError::Full`]) rather than
//! evicting a live record, which would break the at-most-once promise. The
//! store starts its own expirer, which removes records at their deadlines
//! (so memory follows the live records, also of keys nobody asks for
//! again) and stops when the last clone of the store is dropped.
//! Times use tokio's clock so tests can pause and advance it.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use super::packer::Packer;
use super::slot::Slot;
use super::ttl_map::{ms, Bound, Clock, TtlMap};
use crate::idempotency::dedup::DedupRecord;
use crate::idempotency::rate::Bucket;
use crate::store::error::StoreError;
use crate::store::sealing::Sealing;

/// The longest the expirer sleeps: a record written meanwhile with an
/// earlier deadline than the one it sleeps for leaves at most this late.
const EXPIRE_AT_LEAST_EVERY: Duration = Duration::from_millis(100);
/// The shortest: records falling due within it leave together (a steady
/// stream of records would otherwise wake the expirer every millisecond).
const EXPIRE_AT_MOST_EVERY: Duration = Duration::from_millis(10);

/// The in-memory backend. Cheap to clone; clones share the records.
#[derive(Clone)]
pub struct MemoryStore {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub(super) records: TtlMap<Slot>,
    /// The open chunks completed records are packed into.
    pub(super) packer: Packer,
    pub(super) dedup: TtlMap<DedupRecord>,
    /// Fair-share buckets per caller scope: tiny, outside the bound.
    pub(super) buckets: TtlMap<Bucket>,
    /// Dead letters per scope, ordered by (failed_at_ms, key).
    pub(super) failed: Mutex<HashMap<String, BTreeSet<(u64, String)>>>,
    pub(super) bound: Arc<Bound>,
    pub(super) clock: Clock,
    /// One counter for every key: strictly increasing per key, also across
    /// expiry, which is all a fence needs.
    pub(super) fence: AtomicU64,
    pub(super) sealing: Sealing,
}

impl MemoryStore {
    /// A store that holds at most `max_entries` records, with no bound in
    /// bytes (tests, tools). Inside a tokio runtime it starts its expirer.
    pub fn new(max_entries: usize) -> Self {
        Self::bounded(max_entries, usize::MAX, Sealing::default())
    }

    /// A store bounded in records and in bytes (`store.max_bytes`: keys,
    /// records and in-flight entries), writing records through `sealing`.
    pub fn bounded(max_entries: usize, max_bytes: usize, sealing: Sealing) -> Self {
        let bound = Bound::new(max_entries, max_bytes);
        let store = MemoryStore {
            inner: Arc::new(Inner {
                records: TtlMap::new(bound.clone()),
                packer: Packer::default(),
                dedup: TtlMap::new(bound.clone()),
                buckets: TtlMap::new(Bound::new(usize::MAX, usize::MAX)),
                failed: Mutex::default(),
                bound,
                clock: Clock::start(),
                sealing,
                fence: AtomicU64::new(0),
            }),
        };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(expirer(Arc::downgrade(&store.inner)));
        }
        store
    }

    /// How many records are held, expired ones not yet swept included.
    pub fn len(&self) -> usize {
        self.inner.bound.len()
    }

    /// Bytes held: buckets and what their records hold on the heap.
    pub fn bytes(&self) -> usize {
        self.inner.bound.bytes()
    }

    /// Whether no records are held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes every expired record; returns how many went.
    pub fn sweep(&self) -> usize {
        self.expire().0
    }

    /// Removes every expired entry; how many records went, and the
    /// earliest deadline still ahead.
    fn expire(&self) -> (usize, Option<u64>) {
        let now = self.inner.clock.now();
        let (_, buckets) = self.inner.buckets.expire(now);
        let (records, r) = self.inner.records.expire(now);
        let (dedup, d) = self.inner.dedup.expire(now);
        let next = [buckets, r, d].into_iter().flatten().min();
        (records + dedup, next)
    }

    /// Before writing a new key: room for it, after a sweep if need be.
    pub(super) fn ensure_room(&self) -> Result<(), StoreError> {
        let bound = &self.inner.bound;
        if bound.full() {
            self.sweep();
            if bound.len() >= bound.max {
                return Err(StoreError::Full(bound.max));
            }
            if bound.bytes() >= bound.max_bytes {
                return Err(StoreError::FullBytes(bound.max_bytes as u64));
            }
        }
        Ok(())
    }

    /// The next fence: above every fence this store handed out.
    pub(super) fn next_fence(&self) -> u64 {
        self.inner.fence.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// Removes entries as they fall due, while the store lives: sleeps until
/// the earliest deadline, no less than [`EXPIRE_AT_MOST_EVERY`] and no
/// more than [`EXPIRE_AT_LEAST_EVERY`].
async fn expirer(store: Weak<Inner>) {
    loop {
        let until = match store.upgrade() {
            Some(inner) => {
                let store = MemoryStore { inner };
                let (_, next) = store.expire();
                let clock = store.inner.clock;
                let now = clock.now();
                let latest = now + ms(EXPIRE_AT_LEAST_EVERY);
                let earliest = now + ms(EXPIRE_AT_MOST_EVERY);
                // A deadline in this millisecond is due in the next.
                let at = next.map_or(latest, |n| (n + 1).clamp(earliest, latest));
                clock.instant(at)
            }
            None => return,
        };
        tokio::time::sleep_until(until).await;
    }
}
