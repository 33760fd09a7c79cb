//! Consumer dedup on the memory store: the pure rules of
//! [`crate::dedup::state`] under the store's shard locks, a per-scope index
//! of dead letters, and the store's clock (tokio's, so tests can pause it).

use std::collections::{BTreeSet, HashMap};
use std::future::ready;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use super::{lock, MemoryStore};
use crate::dedup::state::{
    self, ClaimOutcome, ClaimParams, Completion, DedupRecord, ReleaseOutcome, Write,
};
use crate::dedup::{Cursor, DedupStore, FailedItem, Inspected, Ttls};
use crate::idempotency::key::RecordKey;
use crate::store::{StoreError, StoreFuture};

struct Entry {
    record: DedupRecord,
    expires: Instant,
}

type Shard = HashMap<RecordKey, Entry>;

pub(super) struct Dedup {
    shards: Box<[Mutex<Shard>]>,
    /// Dead letters per scope, ordered by (failed_at_ms, key).
    failed: Mutex<HashMap<String, BTreeSet<(u64, String)>>>,
    /// Wall time at the store's epoch: record times are this plus the
    /// store's monotonic (tokio) clock.
    epoch_ms: u64,
}

impl Dedup {
    pub(super) fn new(shards: usize) -> Self {
        Dedup {
            shards: (0..shards).map(|_| Mutex::new(Shard::new())).collect(),
            failed: Mutex::new(HashMap::new()),
            epoch_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        }
    }
}

impl MemoryStore {
    fn dedup(&self) -> &Dedup {
        &self.inner.dedup
    }

    fn now_ms(&self, now: Instant) -> u64 {
        let d = self.dedup();
        d.epoch_ms + now.duration_since(self.inner.epoch).as_millis() as u64
    }

    fn dedup_shard(&self, rk: &RecordKey) -> MutexGuard<'_, Shard> {
        let shards = &self.dedup().shards;
        lock(&shards[rk.0[31] as usize % shards.len()])
    }

    /// The live entry, dropping it first if it expired.
    fn live_dedup<'a>(
        &self,
        shard: &'a mut Shard,
        rk: &RecordKey,
        now: Instant,
    ) -> Option<&'a mut Entry> {
        if shard.get(rk).is_some_and(|e| e.expires <= now) {
            shard.remove(rk);
            self.inner.len.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        shard.get_mut(rk)
    }

    /// Writes `record`, counting a new entry against the bound.
    fn put_dedup(&self, shard: &mut Shard, rk: RecordKey, record: DedupRecord, expires: Instant) {
        if let Some(e) = shard.get_mut(&rk) {
            e.record = record;
            e.expires = expires;
        } else {
            shard.insert(rk, Entry { record, expires });
            self.inner.len.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn ensure_room(&self) -> Result<(), StoreError> {
        if self.len() >= self.inner.max_entries {
            self.sweep();
            if self.len() >= self.inner.max_entries {
                return Err(StoreError::Full(self.inner.max_entries));
            }
        }
        Ok(())
    }

    fn add_failed(&self, scope: &str, key: &str, failed_at_ms: u64) {
        lock(&self.dedup().failed)
            .entry(scope.to_owned())
            .or_default()
            .insert((failed_at_ms, key.to_owned()));
    }

    fn remove_failed(&self, scope: &str, key: &str, record: &DedupRecord) {
        if let DedupRecord::Failed { failed_at_ms, .. } = record {
            if let Some(set) = lock(&self.dedup().failed).get_mut(scope) {
                set.remove(&(*failed_at_ms, key.to_owned()));
            }
        }
    }

    pub(super) fn sweep_dedup(&self, now: Instant) -> usize {
        let mut removed = 0;
        for shard in self.dedup().shards.iter() {
            let mut shard = lock(shard);
            let before = shard.len();
            shard.retain(|_, e| e.expires > now);
            removed += before - shard.len();
        }
        self.inner.len.fetch_sub(removed, Ordering::Relaxed);
        removed
    }

    fn new_lease(&self) -> (String, u64) {
        let id = format!("{:032x}", rand::random::<u128>());
        (id, self.inner.fence.fetch_add(1, Ordering::Relaxed) + 1)
    }

    fn claim_sync(
        &self,
        scope: &str,
        key: &str,
        p: &ClaimParams,
        ttls: Ttls,
    ) -> Result<ClaimOutcome, StoreError> {
        let rk = RecordKey::derive_dedup(scope, key);
        let now = Instant::now();
        let now_ms = self.now_ms(now);
        if self.dedup_shard(&rk).get(&rk).is_none() {
            self.ensure_room()?;
        }
        let mut shard = self.dedup_shard(&rk);
        let current = self
            .live_dedup(&mut shard, &rk, now)
            .map(|e| e.record.clone());
        let (out, write) = state::claim(current.as_ref(), now_ms, p, |_| self.new_lease());
        match write {
            Write::None => {}
            Write::Put(rec) => {
                let keep = ttls.retention.max(Duration::from_millis(p.lease_ms));
                self.put_dedup(&mut shard, rk, rec, now + keep);
            }
            Write::PutFailed(rec) => {
                self.put_dedup(&mut shard, rk, rec, now + ttls.failed_retention);
                self.add_failed(scope, key, now_ms);
            }
        }
        Ok(out)
    }

    fn complete_sync(
        &self,
        scope: &str,
        key: &str,
        lease_id: &str,
        result: Option<String>,
        retention: Duration,
    ) -> bool {
        let rk = RecordKey::derive_dedup(scope, key);
        let now = Instant::now();
        let mut shard = self.dedup_shard(&rk);
        let current = self.live_dedup(&mut shard, &rk, now).map(|e| &e.record);
        match state::complete(current, lease_id, self.now_ms(now), result) {
            Completion::Recorded(rec) => {
                self.put_dedup(&mut shard, rk, rec, now + retention);
                true
            }
            Completion::Again => true,
            Completion::LeaseLost => false,
        }
    }

    fn mark_sync(&self, scope: &str, key: &str, ttl: Duration) -> Result<bool, StoreError> {
        let rk = RecordKey::derive_dedup(scope, key);
        let now = Instant::now();
        self.ensure_room()?;
        let mut shard = self.dedup_shard(&rk);
        if self.live_dedup(&mut shard, &rk, now).is_some() {
            return Ok(false);
        }
        let rec = DedupRecord::Marked {
            marked_at_ms: self.now_ms(now),
        };
        self.put_dedup(&mut shard, rk, rec, now + ttl);
        Ok(true)
    }

    /// Whether `key` of `scope` is still a dead letter failed at `at`.
    fn still_failed(&self, scope: &str, key: &str, at: u64) -> Option<FailedItem> {
        let rk = RecordKey::derive_dedup(scope, key);
        let mut shard = self.dedup_shard(&rk);
        match self
            .live_dedup(&mut shard, &rk, Instant::now())
            .map(|e| &e.record)
        {
            Some(DedupRecord::Failed {
                error,
                attempts,
                failed_at_ms,
                ..
            }) if *failed_at_ms == at => Some(FailedItem {
                key: key.to_owned(),
                attempts: *attempts,
                error: error.clone(),
                failed_at_ms: at,
            }),
            _ => None,
        }
    }
}

impl DedupStore for MemoryStore {
    fn mark<'a>(&'a self, scope: &'a str, key: &'a str, ttl: Duration) -> StoreFuture<'a, bool> {
        Box::pin(ready(self.mark_sync(scope, key, ttl)))
    }

    fn claim<'a>(
        &'a self,
        scope: &'a str,
        key: &'a str,
        p: &'a ClaimParams,
        ttls: Ttls,
    ) -> StoreFuture<'a, ClaimOutcome> {
        Box::pin(ready(self.claim_sync(scope, key, p, ttls)))
    }

    fn extend<'a>(
        &'a self,
        scope: &'a str,
        key: &'a str,
        lease_id: &'a str,
        lease_ms: u64,
    ) -> StoreFuture<'a, Option<u64>> {
        let rk = RecordKey::derive_dedup(scope, key);
        let now = Instant::now();
        let mut shard = self.dedup_shard(&rk);
        let entry = self.live_dedup(&mut shard, &rk, now);
        let out = match entry {
            Some(e) => {
                state::extend(Some(&e.record), lease_id, self.now_ms(now), lease_ms).map(|rec| {
                    e.record = rec;
                    e.expires = e.expires.max(now + Duration::from_millis(lease_ms));
                    lease_ms
                })
            }
            None => None,
        };
        Box::pin(ready(Ok(out)))
    }

    fn complete<'a>(
        &'a self,
        scope: &'a str,
        key: &'a str,
        lease_id: &'a str,
        result: Option<String>,
        retention: Duration,
    ) -> StoreFuture<'a, bool> {
        Box::pin(ready(Ok(
            self.complete_sync(scope, key, lease_id, result, retention)
        )))
    }

    fn release<'a>(
        &'a self,
        scope: &'a str,
        key: &'a str,
        lease_id: &'a str,
        outcome: ReleaseOutcome,
        error: Option<String>,
        ttls: Ttls,
    ) -> StoreFuture<'a, bool> {
        let rk = RecordKey::derive_dedup(scope, key);
        let now = Instant::now();
        let now_ms = self.now_ms(now);
        let mut shard = self.dedup_shard(&rk);
        let current = self.live_dedup(&mut shard, &rk, now).map(|e| &e.record);
        let released = match state::release(current, lease_id, now_ms, outcome, error) {
            Some(rec @ DedupRecord::Failed { .. }) => {
                self.put_dedup(&mut shard, rk, rec, now + ttls.failed_retention);
                self.add_failed(scope, key, now_ms);
                true
            }
            Some(rec) => {
                self.put_dedup(&mut shard, rk, rec, now + ttls.retention);
                true
            }
            None => false,
        };
        Box::pin(ready(Ok(released)))
    }

    fn inspect<'a>(&'a self, scope: &'a str, key: &'a str) -> StoreFuture<'a, Option<Inspected>> {
        let rk = RecordKey::derive_dedup(scope, key);
        let now = Instant::now();
        let mut shard = self.dedup_shard(&rk);
        let found = self.live_dedup(&mut shard, &rk, now).map(|e| Inspected {
            record: e.record.clone(),
            expires_in: Some(e.expires - now),
            now_ms: self.now_ms(now),
        });
        Box::pin(ready(Ok(found)))
    }

    fn delete<'a>(&'a self, scope: &'a str, key: &'a str) -> StoreFuture<'a, bool> {
        let rk = RecordKey::derive_dedup(scope, key);
        let removed = self.dedup_shard(&rk).remove(&rk);
        if let Some(e) = &removed {
            self.inner.len.fetch_sub(1, Ordering::Relaxed);
            self.remove_failed(scope, key, &e.record);
        }
        Box::pin(ready(Ok(removed.is_some())))
    }

    fn list_failed<'a>(
        &'a self,
        scope: &'a str,
        limit: usize,
        after: Option<Cursor>,
    ) -> StoreFuture<'a, (Vec<FailedItem>, Option<Cursor>)> {
        let candidates: Vec<(u64, String)> = {
            let failed = lock(&self.dedup().failed);
            let Some(set) = failed.get(scope) else {
                return Box::pin(ready(Ok((Vec::new(), None))));
            };
            let start = after.map(|c| (c.failed_at_ms, c.key));
            set.iter()
                .filter(|e| start.as_ref().is_none_or(|s| *e > s))
                .cloned()
                .collect()
        };
        let mut items = Vec::new();
        let mut stale = Vec::new();
        let mut more = false;
        for (at, key) in candidates {
            if items.len() == limit {
                more = true;
                break;
            }
            match self.still_failed(scope, &key, at) {
                Some(item) => items.push(item),
                None => stale.push((at, key)),
            }
        }
        // Expired or reset records leave index entries behind; drop them.
        if !stale.is_empty() {
            if let Some(set) = lock(&self.dedup().failed).get_mut(scope) {
                for s in &stale {
                    set.remove(s);
                }
            }
        }
        let next = more.then(|| items.last()).flatten().map(|i| Cursor {
            failed_at_ms: i.failed_at_ms,
            key: i.key.clone(),
        });
        Box::pin(ready(Ok((items, next))))
    }

    fn purge_failed<'a>(&'a self, scope: &'a str) -> StoreFuture<'a, u64> {
        let entries = lock(&self.dedup().failed).remove(scope).unwrap_or_default();
        let mut purged = 0;
        for (at, key) in entries {
            if self.still_failed(scope, &key, at).is_some() {
                let rk = RecordKey::derive_dedup(scope, &key);
                if self.dedup_shard(&rk).remove(&rk).is_some() {
                    self.inner.len.fetch_sub(1, Ordering::Relaxed);
                    purged += 1;
                }
            }
        }
        Box::pin(ready(Ok(purged)))
    }
}
