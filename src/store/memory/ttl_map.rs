//! The memory store's one data structure: a sharded map from record key to
//! a value with an expiry, on one millisecond clock, counted against one
//! bound shared by every map of the store.
//!
//! Many small shards behind short `std` mutex sections (never held across
//! an await): a shard's map rehashes under its lock as it grows, and smaller
//! maps rehash faster and block fewer requests (16 shards showed a 16 ms p99
//! under unique-key load; see benches/RESULTS.md); a key's shard and its
//! bucket follow a secret of the map's own ([`KeyHashes`]), so clients
//! cannot aim their keys at one of them. Expiry is lazy on access
//! and by deadline: each shard keeps its entries' deadlines in a min-heap,
//! and [`TtlMap::expire`] removes the entries that are due, earliest first,
//! doing work in proportion to what expires rather than to what is held (a
//! sweep over every entry every 10 s held up to 12 s of 2-second records).
//!
//! Every entry has an item in its shard's heap at or before its expiry.
//! Extending an entry pushes nothing: when its item comes up, the entry is
//! found still live and pushed again at its new expiry. A new entry, or one
//! moved earlier, pushes an item; items whose entry has gone, or that come
//! up early, cost one lookup when they do. An item is the deadline and the
//! key's hash, 16 bytes (the key itself made it 40, a third of a small
//! record's overhead): the table is found by that hash (hashbrown's
//! `HashTable`, which `std`'s map is built on), and an item stands for
//! every entry with its hash, which is almost always one (two keys share
//! a 64-bit hash by chance only; the secret keeps clients from choosing
//! it). An entry moved earlier holds two items until the first comes up,
//! and a heap grown past two items an entry is rebuilt from the entries.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hashbrown::hash_table::{self, HashTable};
use tokio::time::Instant;

use crate::idempotency::key::{KeyHashes, RecordKey};

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

/// One entry of a shard's table.
type Bucket<V> = (RecordKey, Entry<V>);

/// One shard: its entries and, earliest first, when they fall due.
struct Shard<V> {
    map: HashTable<Bucket<V>>,
    /// (deadline, hash of the key): the entries with that hash are due then
    /// or later.
    due: BinaryHeap<Reverse<(u64, u64)>>,
    hashes: KeyHashes,
}

/// Items a shard's heap may hold beyond two per entry before it is rebuilt.
const STALE_ITEMS: usize = 64;

impl<V> Shard<V> {
    fn new(hashes: KeyHashes) -> Self {
        Shard {
            map: HashTable::new(),
            due: BinaryHeap::new(),
            hashes,
        }
    }

    /// The entry for `key`, whose hash is `hash`.
    fn find(
        &mut self,
        key: &RecordKey,
        hash: u64,
    ) -> Option<hash_table::OccupiedEntry<'_, Bucket<V>>> {
        self.map.find_entry(hash, |(k, _)| k == key).ok()
    }

    /// Adds an item due `at` for the key hashed `hash`, whose entry the map
    /// holds with that expiry already. An entry moved earlier leaves its old
    /// item behind until that comes up, which is a lease's term (30 s by
    /// default) for every record completed with a shorter TTL: held 2 s at
    /// 20,000 a second, 600,000 items for 40,000 records. So a heap past two
    /// items per entry is rebuilt from the entries, one item each: linear,
    /// after at least as many pushes.
    fn push_due(&mut self, at: u64, hash: u64) {
        if self.due.len() >= 2 * self.map.len() + STALE_ITEMS {
            let mut items = std::mem::take(&mut self.due).into_vec();
            items.clear();
            let hashes = self.hashes;
            items.extend(
                self.map
                    .iter()
                    .map(|(k, e)| Reverse((e.expires, hashes.hash(k)))),
            );
            self.due = BinaryHeap::from(items);
            return; // the key's item among them
        }
        self.due.push(Reverse((at, hash)));
    }
}

/// The most heap items one shard lock handles before letting requests in.
const EXPIRE_PER_LOCK: usize = 1024;

/// Below a quarter of its capacity a shard's map or heap gives memory back
/// (neither does by itself), so a burst's peak is not held afterwards.
const SHRINK_ABOVE: usize = 1024;

pub(super) struct TtlMap<V> {
    shards: Box<[Mutex<Shard<V>>]>,
    /// Which shard a key is in, and where in its table: one secret for
    /// both, so a client cannot choose either ([`KeyHashes`] says why).
    hashes: KeyHashes,
    bound: Arc<Bound>,
}

/// One key's shard, locked: what is done through it is done to that key,
/// whose hash is taken once, when it is locked.
pub(super) struct Locked<'a, V> {
    shard: MutexGuard<'a, Shard<V>>,
    bound: &'a Bound,
    key: RecordKey,
    hash: u64,
}

/// What one entry costs: its bucket plus its value's heap.
fn weight<V: OnRemove>(value: &V) -> usize {
    std::mem::size_of::<(RecordKey, Entry<V>)>() + value.heap_bytes()
}

impl<V: OnRemove> TtlMap<V> {
    pub fn new(bound: Arc<Bound>) -> Self {
        let hashes = KeyHashes::random();
        TtlMap {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(Shard::new(hashes)))
                .collect(),
            hashes,
            bound,
        }
    }

    /// Locks the shard holding `key`, for `key`.
    pub fn lock(&self, key: &RecordKey) -> Locked<'_, V> {
        let hash = self.hashes.hash(key);
        Locked {
            shard: lock(&self.shards[shard_of(hash)]),
            bound: &self.bound,
            key: *key,
            hash,
        }
    }

    /// Removes every entry expired at `now`, earliest deadline first;
    /// returns how many went and the earliest deadline still ahead.
    pub fn expire(&self, now: u64) -> (usize, Option<u64>) {
        let (mut removed, mut freed, mut next) = (0, 0, None::<u64>);
        for cell in self.shards.iter() {
            loop {
                let mut shard = lock(cell);
                let Shard { map, due, hashes } = &mut *shard;
                let of_hash = |k: &RecordKey, hash: u64| hashes.hash(k) == hash;
                let mut handled = 0;
                while let Some(&Reverse((at, hash))) = due.peek() {
                    if at > now || handled == EXPIRE_PER_LOCK {
                        break;
                    }
                    due.pop();
                    handled += 1;
                    // The entries with this hash (almost always one; the
                    // table's probe also meets entries of other hashes that
                    // share a tag): those due go; the earliest expiry of the
                    // rest, extended since or left by an item from before a
                    // move earlier, is due again.
                    let due_here = |(k, e): &Bucket<V>| e.expires <= now && of_hash(k, hash);
                    while let Ok(found) = map.find_entry(hash, due_here) {
                        let ((_, mut e), _) = found.remove();
                        e.value.removed();
                        removed += 1;
                        freed += weight(&e.value);
                    }
                    let later = map
                        .iter_hash(hash)
                        .filter(|(k, _)| of_hash(k, hash))
                        .map(|(_, e)| e.expires)
                        .min();
                    if let Some(at) = later {
                        due.push(Reverse((at, hash)));
                    }
                }
                if handled == EXPIRE_PER_LOCK {
                    continue; // more due: let waiting requests in first
                }
                if map.capacity() > SHRINK_ABOVE && map.len() < map.capacity() / 4 {
                    map.shrink_to(map.len() * 2, |(k, _)| hashes.hash(k));
                }
                if due.capacity() > SHRINK_ABOVE && due.len() < due.capacity() / 4 {
                    due.shrink_to(due.len() * 2);
                }
                if let Some(&Reverse((at, _))) = due.peek() {
                    next = Some(next.map_or(at, |n| n.min(at)));
                }
                break;
            }
        }
        self.bound.len.fetch_sub(removed, Ordering::Relaxed);
        self.bound.sub(freed);
        (removed, next)
    }
}

impl<V: OnRemove> Locked<'_, V> {
    /// The key's live entry, removing it first if it has expired.
    pub fn live(&mut self, now: u64) -> Option<&mut Entry<V>> {
        let found = self.shard.find(&self.key, self.hash)?;
        if found.get().1.expires <= now {
            let ((_, mut e), _) = found.remove();
            gone(self.bound, &mut e);
            return None;
        }
        Some(&mut found.into_mut().1)
    }

    /// Changes the key's live entry through `f`, keeping the byte count
    /// true; `None` if there is none.
    pub fn update<R>(&mut self, now: u64, f: impl FnOnce(&mut Entry<V>) -> R) -> Option<R> {
        let bound = self.bound;
        let e = self.live(now)?;
        let before = weight(&e.value);
        let before_expires = e.expires;
        let out = f(e);
        let after = weight(&e.value);
        bound.add(after);
        bound.sub(before);
        // Moved earlier: a new item (a later expiry waits for the item it
        // has).
        let earlier = (e.expires < before_expires).then_some(e.expires);
        if let Some(at) = earlier {
            self.shard.push_due(at, self.hash);
        }
        Some(out)
    }

    /// Writes `value` under the key, counting a new entry against the bound.
    pub fn put(&mut self, value: V, expires: u64) {
        self.bound.add(weight(&value));
        let (key, hash) = (self.key, self.hash);
        let shard = &mut *self.shard;
        let hashes = shard.hashes;
        let new = Entry { value, expires };
        let eq = |(k, _): &Bucket<V>| *k == key;
        // A key written again keeps its item if that comes up no later.
        let due_item = match shard.map.entry(hash, eq, |(k, _)| hashes.hash(k)) {
            hash_table::Entry::Occupied(mut found) => {
                let mut old = std::mem::replace(&mut found.get_mut().1, new);
                old.value.removed();
                self.bound.sub(weight(&old.value));
                old.expires > expires
            }
            hash_table::Entry::Vacant(slot) => {
                slot.insert((key, new));
                self.bound.len.fetch_add(1, Ordering::Relaxed);
                true
            }
        };
        if due_item {
            shard.push_due(expires, hash);
        }
    }

    /// Removes the key's entry (live or not).
    pub fn remove(&mut self) -> Option<Entry<V>> {
        let ((_, mut e), _) = self.shard.find(&self.key, self.hash)?.remove();
        gone(self.bound, &mut e);
        Some(e)
    }
}

/// Counts out an entry taken from its table, telling its value first.
fn gone<V: OnRemove>(bound: &Bound, e: &mut Entry<V>) {
    e.value.removed();
    bound.len.fetch_sub(1, Ordering::Relaxed);
    bound.sub(weight(&e.value));
}

/// A poisoned lock only means another thread panicked mid-update of plain
/// data; the map itself is still sound, so keep serving.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The shard of a key whose hash is `hash`: bits its shard's table does
/// not use (hashbrown takes the low bits for the bucket and the top seven
/// for the tag; a tag shared by a whole shard would match every slot).
fn shard_of(hash: u64) -> usize {
    (hash >> 48) as usize % SHARDS
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct V;
    impl OnRemove for V {
        fn heap_bytes(&self) -> usize {
            0
        }
    }

    fn key(i: u64) -> RecordKey {
        let mut k = [0u8; 32];
        k[..8].copy_from_slice(&i.to_le_bytes());
        k[31] = i as u8;
        RecordKey(k)
    }

    /// Keys ground to share what picked their shard and their bucket when
    /// record keys were hashed by their own bytes (byte 31; the low bits of
    /// the first eight) spread over the shards and over a table's buckets
    /// all the same: where a key lands follows the map's secret.
    #[test]
    fn keys_ground_to_collide_spread_over_shards_and_buckets() {
        use std::collections::HashSet;
        let map: TtlMap<V> = TtlMap::new(Bound::new(usize::MAX, usize::MAX));
        let ground: Vec<RecordKey> = (0..1_000u64)
            .map(|i| {
                let mut k = [0u8; 32];
                k[..8].copy_from_slice(&(i << 12).to_le_bytes());
                k[8..16].copy_from_slice(&i.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
                RecordKey(k)
            })
            .collect();
        let shards: HashSet<usize> = ground
            .iter()
            .map(|k| shard_of(map.hashes.hash(k)))
            .collect();
        // 1,000 keys over 128 shards leave about none empty.
        assert!(shards.len() >= 100, "{} shards", shards.len());
        let table = lock(&map.shards[0]);
        let buckets: HashSet<u64> = ground.iter().map(|k| table.hashes.hash(k) & 4095).collect();
        // 1,000 keys over 4,096 buckets take about 884 of them.
        assert!(buckets.len() >= 800, "{} buckets", buckets.len());
    }

    /// Random writes, rewrites, expiries moved earlier and later, and
    /// removals, against a plain model: each `expire` removes exactly the
    /// entries expired by then, and the heap never holds more than a few
    /// items an entry.
    #[test]
    fn expire_removes_exactly_what_is_due() {
        expires_as_the_model_does(key);
    }

    /// The same with keys that share their hash four by four (a hash reads
    /// a key's first 16 bytes; these differ only after them), as two keys
    /// could by chance: an item stands for each entry of its hash.
    #[test]
    fn keys_sharing_a_hash_expire_exactly_when_due() {
        let shared = |i| {
            let mut k = key(i / 4);
            k.0[16] = i as u8 % 4;
            k
        };
        let hashes = KeyHashes::random();
        assert_eq!(hashes.hash(&shared(4)), hashes.hash(&shared(7)));
        assert_ne!(shared(4), shared(7));
        expires_as_the_model_does(shared);
    }

    fn expires_as_the_model_does(key: impl Fn(u64) -> RecordKey) {
        let map: TtlMap<V> = TtlMap::new(Bound::new(usize::MAX, usize::MAX));
        let mut model: HashMap<RecordKey, u64> = HashMap::new();
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut rand = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut now = 0;
        for _ in 0..20_000 {
            let k = key(rand(500));
            match rand(5) {
                0 | 1 => {
                    let at = now + 1 + rand(1_000);
                    map.lock(&k).put(V, at);
                    model.insert(k, at);
                }
                2 => {
                    let at = now + 1 + rand(1_000);
                    let mut shard = map.lock(&k);
                    if shard.update(now, |e| e.expires = at).is_some() {
                        model.insert(k, at);
                    }
                }
                3 => {
                    map.lock(&k).remove();
                    model.remove(&k);
                }
                _ => {
                    now += rand(50);
                    let before = model.len();
                    model.retain(|_, at| *at > now);
                    let (removed, next) = map.expire(now);
                    assert_eq!(removed, before - model.len(), "at {now}");
                    assert_eq!(map.bound.len(), model.len());
                    assert_eq!(next.is_some(), !model.is_empty());
                    if let Some(next) = next {
                        assert!(next > now);
                        assert!(next <= *model.values().min().unwrap());
                    }
                }
            }
        }
        let items: usize = map.shards.iter().map(|s| lock(s).due.len()).sum();
        assert!(items <= 4 * model.len() + 500, "{items} items");
        assert_eq!(map.expire(u64::MAX - 1).0, model.len());
        let items: usize = map.shards.iter().map(|s| lock(s).due.len()).sum();
        assert_eq!(items, 0);
    }

    /// Records begun with a long in-flight expiry and completed with a
    /// short one, as a 2 s TTL under a 30 s lease: the items left by their
    /// begins do not pile up for the lease's term.
    #[test]
    fn items_left_by_entries_moved_earlier_do_not_pile_up() {
        let map: TtlMap<V> = TtlMap::new(Bound::new(usize::MAX, usize::MAX));
        let mut n = 0;
        for now in 0..20_000u64 {
            for _ in 0..5 {
                let k = key(n);
                n += 1;
                map.lock(&k).put(V, now + 30_000);
                map.lock(&k).update(now, |e| e.expires = now + 2_000);
            }
            if now % 10 == 0 {
                map.expire(now);
            }
        }
        let live = map.bound.len();
        assert!((9_900..=10_100).contains(&live), "{live} live");
        let items: usize = map.shards.iter().map(|s| lock(s).due.len()).sum();
        assert!(
            items <= 2 * live + SHARDS * STALE_ITEMS,
            "{items} items for {live} entries"
        );
    }
}
