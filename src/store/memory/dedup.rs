//! Consumer dedup on the memory store: the pure rules of
//! [`crate::idempotency::dedup`] under the store's shard locks, a per-scope
//! index of dead letters, and the store's one clock.

use std::future::ready;
use std::time::Duration;

use super::store::MemoryStore;
use super::ttl_map::{lock, ms, OnRemove};
use crate::idempotency::dedup::{
    self as rules, ClaimOutcome, ClaimParams, Completion, DedupRecord, ReleaseOutcome, Write,
};
use crate::idempotency::key::RecordKey;
use crate::idempotency::lease::LeaseId;
use crate::store::dedup::{Cursor, DedupStore, FailedItem, Inspected, Ttls};
use crate::store::error::{StoreError, StoreFuture};

/// A dedup record needs no wake-up: nobody waits on it in the store.
impl OnRemove for DedupRecord {
    fn heap_bytes(&self) -> usize {
        let text = |s: &Option<String>| s.as_ref().map_or(0, String::capacity);
        match self {
            DedupRecord::Leased {
                fingerprint,
                worker,
                ..
            } => text(fingerprint) + text(worker),
            DedupRecord::Pending {
                error, fingerprint, ..
            } => text(error) + text(fingerprint),
            DedupRecord::Completed {
                result,
                fingerprint,
                ..
            } => text(result) + text(fingerprint),
            DedupRecord::Failed { error, .. } => text(error),
            DedupRecord::Marked { .. } => 0,
        }
    }
}

impl MemoryStore {
    fn add_failed(&self, scope: &str, key: &str, failed_at_ms: u64) {
        lock(&self.inner.failed)
            .entry(scope.to_owned())
            .or_default()
            .insert((failed_at_ms, key.to_owned()));
    }

    fn remove_failed(&self, scope: &str, key: &str, record: &DedupRecord) {
        if let DedupRecord::Failed { failed_at_ms, .. } = record {
            if let Some(set) = lock(&self.inner.failed).get_mut(scope) {
                set.remove(&(*failed_at_ms, key.to_owned()));
            }
        }
    }

    /// Now on the store's clock: (map time, wall ms for record times).
    fn dedup_now(&self) -> (u64, u64) {
        let now = self.inner.clock.now();
        (now, self.inner.clock.unix_ms(now))
    }

    fn claim_sync(
        &self,
        scope: &str,
        key: &str,
        p: &ClaimParams,
        ttls: Ttls,
    ) -> Result<ClaimOutcome, StoreError> {
        let rk = RecordKey::derive_dedup(scope, key);
        let (now, now_ms) = self.dedup_now();
        if self.inner.dedup.lock(&rk).live(now).is_none() {
            self.ensure_room()?;
        }
        let mut shard = self.inner.dedup.lock(&rk);
        let current = shard.live(now).map(|e| e.value.clone());
        let (out, write) = rules::claim(current.as_ref(), now_ms, p, |_| {
            (LeaseId::random(), self.next_fence())
        });
        match write {
            Write::None => {}
            Write::Put(rec) => {
                let keep = ttls.retention.max(Duration::from_millis(p.lease_ms));
                shard.put(rec, now + ms(keep));
            }
            Write::PutFailed(rec) => {
                shard.put(rec, now + ms(ttls.failed_retention));
                self.add_failed(scope, key, now_ms);
            }
        }
        Ok(match out {
            ClaimOutcome::Completed {
                result,
                completed_at_ms,
            } => ClaimOutcome::Completed {
                result: result.and_then(|r| self.inner.sealing.open_text(&rk, r)),
                completed_at_ms,
            },
            other => other,
        })
    }

    fn complete_sync(
        &self,
        scope: &str,
        key: &str,
        lease_id: LeaseId,
        result: Option<String>,
        retention: Duration,
    ) -> bool {
        let rk = RecordKey::derive_dedup(scope, key);
        let (now, now_ms) = self.dedup_now();
        let mut shard = self.inner.dedup.lock(&rk);
        let current = shard.live(now).map(|e| &e.value);
        let result = result.map(|r| self.inner.sealing.seal_text(&rk, r));
        match rules::complete(current, lease_id, now_ms, result) {
            Completion::Recorded(rec) => {
                shard.put(rec, now + ms(retention));
                true
            }
            Completion::Again => true,
            Completion::LeaseLost => false,
        }
    }

    fn mark_sync(&self, scope: &str, key: &str, ttl: Duration) -> Result<bool, StoreError> {
        let rk = RecordKey::derive_dedup(scope, key);
        let (now, now_ms) = self.dedup_now();
        self.ensure_room()?;
        let mut shard = self.inner.dedup.lock(&rk);
        if shard.live(now).is_some() {
            return Ok(false);
        }
        let rec = DedupRecord::Marked {
            marked_at_ms: now_ms,
        };
        shard.put(rec, now + ms(ttl));
        Ok(true)
    }

    fn release_sync(
        &self,
        scope: &str,
        key: &str,
        lease_id: LeaseId,
        outcome: ReleaseOutcome,
        error: Option<String>,
        ttls: Ttls,
    ) -> bool {
        let rk = RecordKey::derive_dedup(scope, key);
        let (now, now_ms) = self.dedup_now();
        let mut shard = self.inner.dedup.lock(&rk);
        let current = shard.live(now).map(|e| &e.value);
        match rules::release(current, lease_id, now_ms, outcome, error) {
            Some(rec @ DedupRecord::Failed { .. }) => {
                shard.put(rec, now + ms(ttls.failed_retention));
                self.add_failed(scope, key, now_ms);
                true
            }
            Some(rec) => {
                shard.put(rec, now + ms(ttls.retention));
                true
            }
            None => false,
        }
    }

    /// Whether `key` of `scope` is still a dead letter failed at `at`.
    fn still_failed(&self, scope: &str, key: &str, at: u64) -> Option<FailedItem> {
        let rk = RecordKey::derive_dedup(scope, key);
        let now = self.inner.clock.now();
        let mut shard = self.inner.dedup.lock(&rk);
        match shard.live(now).map(|e| &e.value) {
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

    fn list_failed_sync(
        &self,
        scope: &str,
        limit: usize,
        after: Option<Cursor>,
    ) -> (Vec<FailedItem>, Option<Cursor>) {
        let candidates: Vec<(u64, String)> = {
            let failed = lock(&self.inner.failed);
            let Some(set) = failed.get(scope) else {
                return (Vec::new(), None);
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
            if let Some(set) = lock(&self.inner.failed).get_mut(scope) {
                for s in &stale {
                    set.remove(s);
                }
            }
        }
        let next = more.then(|| items.last()).flatten().map(|i| Cursor {
            failed_at_ms: i.failed_at_ms,
            key: i.key.clone(),
        });
        (items, next)
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
        lease_id: LeaseId,
        lease_ms: u64,
    ) -> StoreFuture<'a, Option<u64>> {
        let rk = RecordKey::derive_dedup(scope, key);
        let (now, now_ms) = self.dedup_now();
        let mut shard = self.inner.dedup.lock(&rk);
        let out = shard
            .update(now, |e| {
                rules::extend(Some(&e.value), lease_id, now_ms, lease_ms).map(|rec| {
                    e.value = rec;
                    e.expires = e.expires.max(now + lease_ms);
                    lease_ms
                })
            })
            .flatten();
        Box::pin(ready(Ok(out)))
    }

    fn complete<'a>(
        &'a self,
        scope: &'a str,
        key: &'a str,
        lease_id: LeaseId,
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
        lease_id: LeaseId,
        outcome: ReleaseOutcome,
        error: Option<String>,
        ttls: Ttls,
    ) -> StoreFuture<'a, bool> {
        Box::pin(ready(Ok(
            self.release_sync(scope, key, lease_id, outcome, error, ttls)
        )))
    }

    fn inspect<'a>(&'a self, scope: &'a str, key: &'a str) -> StoreFuture<'a, Option<Inspected>> {
        let rk = RecordKey::derive_dedup(scope, key);
        let (now, now_ms) = self.dedup_now();
        let mut shard = self.inner.dedup.lock(&rk);
        let found = shard.live(now).map(|e| Inspected {
            record: self.inner.sealing.open_record(&rk, e.value.clone()),
            expires_in: Some(Duration::from_millis(e.expires - now)),
            now_ms,
        });
        Box::pin(ready(Ok(found)))
    }

    fn delete<'a>(&'a self, scope: &'a str, key: &'a str) -> StoreFuture<'a, bool> {
        let rk = RecordKey::derive_dedup(scope, key);
        let removed = self.inner.dedup.lock(&rk).remove();
        if let Some(e) = &removed {
            self.remove_failed(scope, key, &e.value);
        }
        Box::pin(ready(Ok(removed.is_some())))
    }

    fn list_failed<'a>(
        &'a self,
        scope: &'a str,
        limit: usize,
        after: Option<Cursor>,
    ) -> StoreFuture<'a, (Vec<FailedItem>, Option<Cursor>)> {
        Box::pin(ready(Ok(self.list_failed_sync(scope, limit, after))))
    }

    fn purge_failed<'a>(&'a self, scope: &'a str) -> StoreFuture<'a, u64> {
        let entries = lock(&self.inner.failed).remove(scope).unwrap_or_default();
        let mut purged = 0;
        for (at, key) in entries {
            if self.still_failed(scope, &key, at).is_some() {
                let rk = RecordKey::derive_dedup(scope, &key);
                if self.inner.dedup.lock(&rk).remove().is_some() {
                    purged += 1;
                }
            }
        }
        Box::pin(ready(Ok(purged)))
    }
}
