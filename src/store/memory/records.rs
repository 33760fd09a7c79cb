//! HTTP idempotency records in memory: [`RecordStore`] over the store's
//! record map, with waiters parked on a per-record [`Notify`] created only
//! when someone waits.

use std::future::ready;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::slot::Slot;
use super::store::MemoryStore;
use super::ttl_map::{ms, Entry, OnRemove};
use crate::idempotency::key::{Fingerprint, RecordKey};
use crate::idempotency::rate::{self, Rate};
use crate::idempotency::record::CompletedRecord;
use crate::idempotency::state::{
    self, Begin, BeginOptions, Lease, Resolution, State, Unknown, UnknownCause,
};
use crate::store::buckets::BucketStore;
use crate::store::error::{StoreError, StoreFuture};
use crate::store::records::{Inspection, RecordStore};

impl MemoryStore {
    fn begin_sync(
        &self,
        key: &RecordKey,
        fp: &Fingerprint,
        opts: BeginOptions,
    ) -> Result<Begin, StoreError> {
        let now = self.inner.clock.now();
        let mut checked_room = false;
        loop {
            let mut shard = self.inner.records.lock(key);
            let (current, lapsed, expires) = match shard.live(now) {
                Some(e) => (
                    e.value.state(key, &self.inner.sealing),
                    e.value.lapsed(now),
                    e.expires,
                ),
                None => (State::Absent, false, 0),
            };
            if matches!(current, State::Absent) && !checked_room && self.inner.bound.full() {
                drop(shard);
                self.ensure_room()?;
                checked_room = true;
                continue;
            }
            let (begin, next) = state::begin(
                &current,
                lapsed,
                *fp,
                &opts,
                self.inner.clock.unix_ms(now),
                || Lease::new(self.next_fence()),
            );
            let expires = match (&begin, &current) {
                (Begin::Acquired(_), _) => now + ms(opts.in_flight_ttl()),
                // A lapsed lease held as unknown: kept for hold_lapsed.
                (_, State::InFlight { .. }) => now + ms(opts.hold_lapsed.unwrap_or_default()),
                _ => expires,
            };
            if let Some(slot) =
                next.and_then(|n| Slot::of(n, now + ms(opts.lease_ttl), key, &self.inner.sealing))
            {
                shard.put(slot, expires);
            }
            return Ok(begin);
        }
    }

    /// Runs `f` on the record if `lease` is current; `false` otherwise.
    fn with_lease(
        &self,
        key: &RecordKey,
        lease: &Lease,
        f: impl FnOnce(&mut Entry<Slot>, u64),
    ) -> bool {
        let now = self.inner.clock.now();
        let mut shard = self.inner.records.lock(key);
        shard
            .update(now, |e| {
                let held = e.value.holds(lease);
                if held {
                    f(e, now);
                }
                held
            })
            .unwrap_or(false)
    }

    /// Whether `key` is still in flight under the live lease with `fence`.
    fn still_waiting(&self, key: &RecordKey, fence: u64) -> bool {
        let now = self.inner.clock.now();
        let mut shard = self.inner.records.lock(key);
        shard.live(now).is_some_and(|e| {
            !e.value.lapsed(now) && e.value.lease().is_some_and(|l| l.fence == fence)
        })
    }
}

impl RecordStore for MemoryStore {
    fn begin<'a>(
        &'a self,
        key: &'a RecordKey,
        fp: &'a Fingerprint,
        opts: BeginOptions,
    ) -> StoreFuture<'a, Begin> {
        Box::pin(ready(self.begin_sync(key, fp, opts)))
    }

    fn renew<'a>(
        &'a self,
        key: &'a RecordKey,
        lease: &'a Lease,
        lease_ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        Box::pin(ready(Ok(self.with_lease(key, lease, |e, now| {
            let until = now + ms(lease_ttl);
            if let Slot::InFlight(f) = &mut e.value {
                f.lease_until = until;
            }
            e.expires = e.expires.max(until);
        }))))
    }

    fn mark_unknown<'a>(
        &'a self,
        key: &'a RecordKey,
        lease: &'a Lease,
        cause: UnknownCause,
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        let unix = self.inner.clock.unix_ms(self.inner.clock.now());
        let done = self.with_lease(key, lease, |e, now| {
            let State::InFlight { fingerprint, .. } = e.value.state(key, &self.inner.sealing)
            else {
                return;
            };
            e.value.removed();
            e.value = Slot::Unknown(Box::new(Unknown {
                fence: lease.fence,
                fingerprint,
                cause,
                since_unix_ms: unix,
                next_check_unix_ms: 0,
            }));
            e.expires = now + ms(ttl);
        });
        Box::pin(ready(Ok(done)))
    }

    fn resolve<'a>(
        &'a self,
        key: &'a RecordKey,
        fence: u64,
        resolution: Resolution,
    ) -> StoreFuture<'a, bool> {
        let now = self.inner.clock.now();
        let mut shard = self.inner.records.lock(key);
        let unknown = shard.live(now).is_some_and(|e| {
            state::is_unknown_with(&e.value.state(key, &self.inner.sealing), fence)
        });
        if unknown {
            match resolution {
                Resolution::Completed(record, ttl) => {
                    let encoded = self.inner.sealing.encode(key, &record);
                    let slot = Slot::completed(encoded, &self.inner.packer, ms(ttl), now);
                    shard.put(slot, now + ms(ttl));
                }
                Resolution::Release => {
                    shard.remove();
                }
            }
        }
        Box::pin(ready(Ok(unknown)))
    }

    fn complete<'a>(
        &'a self,
        key: &'a RecordKey,
        lease: &'a Lease,
        record: Arc<CompletedRecord>,
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        // Encode and pack outside the shard lock.
        let encoded = self.inner.sealing.encode(key, &record);
        let now = self.inner.clock.now();
        let slot = Slot::completed(encoded, &self.inner.packer, ms(ttl), now);
        let done = self.with_lease(key, lease, |e, now| {
            // Waiters re-check under this shard lock, so they see the record.
            e.value.removed();
            e.value = slot;
            e.expires = now + ms(ttl);
        });
        Box::pin(ready(Ok(done)))
    }

    fn release<'a>(&'a self, key: &'a RecordKey, lease: &'a Lease) -> StoreFuture<'a, bool> {
        // Check and remove under one lock so a new holder can't slip between.
        let now = self.inner.clock.now();
        let mut shard = self.inner.records.lock(key);
        let held = shard.live(now).is_some_and(|e| e.value.holds(lease));
        if held {
            shard.remove();
        }
        Box::pin(ready(Ok(held)))
    }

    fn wait<'a>(
        &'a self,
        key: &'a RecordKey,
        fence: u64,
        deadline: Instant,
    ) -> StoreFuture<'a, ()> {
        let (notify, until) = {
            let now = self.inner.clock.now();
            let mut shard = self.inner.records.lock(key);
            match shard.live(now) {
                Some(Entry {
                    value: Slot::InFlight(f),
                    ..
                }) if f.lease.fence == fence && f.lease_until > now => {
                    let notify: Arc<Notify> = f.notify.get_or_insert_with(Default::default).clone();
                    // The lease may lapse without anyone completing it: wake
                    // then too, so the waiter can act on the lapse.
                    (
                        notify,
                        deadline.min(self.inner.clock.instant(f.lease_until)),
                    )
                }
                _ => return Box::pin(ready(Ok(()))),
            }
        };
        Box::pin(async move {
            // Register, then re-check: a wake between the unlock above and
            // this registration would otherwise be lost.
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.still_waiting(key, fence) {
                return Ok(());
            }
            let _ = tokio::time::timeout_at(until, notified).await;
            Ok(())
        })
    }

    fn get<'a>(&'a self, key: &'a RecordKey) -> StoreFuture<'a, Inspection> {
        let now = self.inner.clock.now();
        let mut shard = self.inner.records.lock(key);
        let found = match shard.live(now) {
            Some(e) => Inspection {
                state: e.value.state(key, &self.inner.sealing),
                expires_in: Some(Duration::from_millis(e.expires - now)),
            },
            None => Inspection {
                state: State::Absent,
                expires_in: None,
            },
        };
        Box::pin(ready(Ok(found)))
    }

    fn purge<'a>(&'a self, key: &'a RecordKey) -> StoreFuture<'a, bool> {
        let removed = self.inner.records.lock(key).remove().is_some();
        Box::pin(ready(Ok(removed)))
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(ready(Ok(())))
    }

    fn local_bytes(&self) -> Option<u64> {
        Some(self.bytes() as u64)
    }
}

impl BucketStore for MemoryStore {
    fn admit<'a>(
        &'a self,
        scope: &'a RecordKey,
        rate: Rate,
    ) -> StoreFuture<'a, Result<(), Duration>> {
        let now = self.inner.clock.now();
        let mut shard = self.inner.buckets.lock(scope);
        let current = shard.live(now).map(|e| e.value);
        let (bucket, admitted) = rate::take(current, &rate, now);
        shard.put(bucket, now + ms(rate.refill()));
        Box::pin(ready(Ok(admitted)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every stored record pays for a bucket: keep it small. A packed
    /// record's view of its chunk (`Bytes`, 32 bytes) sizes it, 16 bytes
    /// more than a boxed slice: packing saves a 1 KiB record far more (its
    /// size class's rounding, 18 %) and about evens out on tiny ones
    /// (benches/RESULTS.md, "Small records").
    #[test]
    fn a_bucket_stays_small() {
        type E = Entry<Slot>;
        assert!(
            std::mem::size_of::<E>() <= 48,
            "{}",
            std::mem::size_of::<E>()
        );
        assert_eq!(
            std::mem::size_of::<(RecordKey, E)>(),
            32 + std::mem::size_of::<E>()
        );
    }
}
