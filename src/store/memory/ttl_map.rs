//! The memory store's one data structure: a sharded map from record key to
//! a value with an expiry, on one millisecond clock, counted against one
//! bound shared by every map of the store.
//!
//! Many small shards behind short `std` mutex sections (never held across
//! an await): a shard's map rehashes under its lock as it grows, and smaller
//! maps rehash faster and block fewer requests (16 shards showed a 16 ms p99
//! under unique-key load; see benches/RESULTS.md). Expiry is lazy on access
//! plus [`TtlMap::sweep`].

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use crate::idempotency::key::RecordKey;

const SHARDS: usize = 128;

/// A value that must hear when it leaves the map (to wake its waiters),
/// and says how many heap bytes it holds (for `max_bytes`).
pub(super) trait OnRemove {
    fn removed(&mut self) {}
    fn heap_bytes(&self) -> usize;
}

/// A stored value and when it expires, in ms on the [`Clock`].
pub(super) struct Entry<V> {
    pub value: V,
    pub expires: u64,
}

/// The store's clock: tokio's (so tests can pause it) in milliseconds since
/// the store began, and the wall time at that start for record timestamps.
#[derive(Clone, Copy)]
pub(super) struct Clock {
    epoch: Instant,
    unix_epoch_ms: u64,
}

impl Clock {
    pub fn start() -> Self {
        Clock {
            epoch: Instant::now(),
            unix_epoch_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        }
    }

    /// Now, in ms since the store began.
    pub fn now(&self) -> u64 {
        ms(Instant::now().duration_since(self.epoch))
    }

    /// A clock reading as wall time (Unix ms).
    pub fn unix_ms(&self, at: u64) -> u64 {
        self.unix_epoch_ms + at
    }

    /// A clock reading as a tokio instant.
    pub fn instant(&self, at: u64) -> Instant {
        self.epoch + Duration::from_millis(at)
    }
}

pub(super) fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// How many entries and bytes all maps of a store hold, and how many they
/// may. Bytes count each entry's bucket (key and entry) and what its value
/// holds on the heap.
pub(super) struct Bound {
    len: AtomicUsize,
    bytes: AtomicUsize,
    pub max: usize,
    pub max_bytes: usize,
}

impl Bound {
    pub fn new(max: usize, max_bytes: usize) -> Arc<Self> {
        Arc::new(Bound {
            len: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            max,
            max_bytes,
        })
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn full(&self) -> bool {
        self.len() >= self.max || self.bytes() >= self.max_bytes
    }

    fn add(&self, n: usize) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
    }

    fn sub(&self, n: usize) {
        self.bytes.fetch_sub(n, Ordering::Relaxed);
    }
}

type Shard<V> = HashMap<RecordKey, Entry<V>, BuildHasherDefault<KeyHasher>>;

pub(super) struct TtlMap<V> {
    shards: Box<[Mutex<Shard<V>>]>,
    bound: Arc<Bound>,
}

/// One locked shard.
pub(super) struct Locked<'a, V> {
    shard: MutexGuard<'a, Shard<V>>,
    bound: &'a Bound,
}

/// What one entry costs: its bucket plus its value's heap.
fn weight<V: OnRemove>(value: &V) -> usize {
    std::mem::size_of::<(RecordKey, Entry<V>)>() + value.heap_bytes()
}

impl<V: OnRemove> TtlMap<V> {
    pub fn new(bound: Arc<Bound>) -> Self {
        TtlMap {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            bound,
        }
    }

    /// Locks the shard holding `key`.
    pub fn lock(&self, key: &RecordKey) -> Locked<'_, V> {
        Locked {
            shard: lock(&self.shards[key.0[31] as usize % SHARDS]),
            bound: &self.bound,
        }
    }

    /// Removes every entry expired at `now`; returns how many went.
    pub fn sweep(&self, now: u64) -> usize {
        let (mut removed, mut freed) = (0, 0);
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            shard.retain(|_, e| {
                let live = e.expires > now;
                if !live {
                    e.value.removed();
                    removed += 1;
                    freed += weight(&e.value);
                }
                live
            });
        }
        self.bound.len.fetch_sub(removed, Ordering::Relaxed);
        self.bound.sub(freed);
        removed
    }
}

impl<V: OnRemove> Locked<'_, V> {
    /// The live entry for `key`, removing it first if it has expired.
    pub fn live(&mut self, key: &RecordKey, now: u64) -> Option<&mut Entry<V>> {
        if self.shard.get(key).is_some_and(|e| e.expires <= now) {
            self.remove(key);
            return None;
        }
        self.shard.get_mut(key)
    }

    /// Changes the live entry for `key` through `f`, keeping the byte count
    /// true; `None` if there is none.
    pub fn update<R>(
        &mut self,
        key: &RecordKey,
        now: u64,
        f: impl FnOnce(&mut Entry<V>) -> R,
    ) -> Option<R> {
        let bound = self.bound;
        let e = self.live(key, now)?;
        let before = weight(&e.value);
        let out = f(e);
        let after = weight(&e.value);
        bound.add(after);
        bound.sub(before);
        Some(out)
    }

    /// Writes `value` under `key`, counting a new entry against the bound.
    pub fn put(&mut self, key: RecordKey, value: V, expires: u64) {
        self.bound.add(weight(&value));
        let previous = self.shard.insert(key, Entry { value, expires });
        match previous {
            Some(mut old) => {
                old.value.removed();
                self.bound.sub(weight(&old.value));
            }
            None => {
                self.bound.len.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Removes `key`'s entry (live or not).
    pub fn remove(&mut self, key: &RecordKey) -> Option<Entry<V>> {
        let mut e = self.shard.remove(key)?;
        e.value.removed();
        self.bound.len.fetch_sub(1, Ordering::Relaxed);
        self.bound.sub(weight(&e.value));
        Some(e)
    }
}

/// A poisoned lock only means another thread panicked mid-update of plain
/// data; the map itself is still sound, so keep serving.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Record keys are already SHA-256 outputs: their first eight bytes are a
/// perfectly good hash, so skip hashing them again.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8).take(1) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(b);
        }
    }
}
