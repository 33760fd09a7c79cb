//! HTTP idempotency records in memory: [`RecordStore`] over the store's
//! record map, with waiters parked on a per-record [`Notify`] created only
//! when someone waits.

use std::future::ready;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::MemoryStore;
use crate::idempotency::key::{Fingerprint, RecordKey};
use crate::idempotency::record::CompletedRecord;
use crate::idempotency::state::{self, Begin, Lease, State};
use crate::store::ttl_map::{ms, Entry, OnRemove};
use crate::store::{Inspection, RecordStore, StoreError, StoreFuture};

/// What a record holds, kept small because most are completed records: the
/// rare in-flight data is boxed (see benches/RESULTS.md for the bytes per
/// record). A completed response is kept encoded in one
/// exact-size allocation. Holding the upstream's `Bytes` instead would pin
/// whole hyper read buffers (body and header values are slices of them) for
/// the record's lifetime; decoding on replay costs a few hundred ns.
pub(super) enum Slot {
    InFlight(Box<InFlight>),
    Completed(Box<[u8]>),
}

/// The in-flight part of a record; waiters only ever wait on these.
pub(super) struct InFlight {
    lease: Lease,
    fingerprint: Fingerprint,
    notify: Option<Arc<Notify>>,
}

impl OnRemove for Slot {
    /// Wakes whoever waits on this record's lease.
    fn removed(&mut self) {
        if let Slot::InFlight(f) = self {
            if let Some(n) = f.notify.take() {
                n.notify_waiters();
            }
        }
    }
}

impl Slot {
    fn of(state: State) -> Option<Slot> {
        match state {
            State::Absent => None,
            State::InFlight { lease, fingerprint } => Some(Slot::InFlight(Box::new(InFlight {
                lease,
                fingerprint,
                notify: None,
            }))),
            State::Completed(rec) => Some(Slot::Completed(rec.encode_vec().into_boxed_slice())),
        }
    }

    /// The state this slot stands for. A record that fails to decode (it
    /// cannot: this process encoded it) reads as absent rather than panicking.
    fn state(&self) -> State {
        match self {
            Slot::InFlight(f) => State::InFlight {
                lease: f.lease,
                fingerprint: f.fingerprint,
            },
            Slot::Completed(bytes) => CompletedRecord::decode(Bytes::copy_from_slice(bytes))
                .map(|r| State::Completed(Arc::new(r)))
                .unwrap_or(State::Absent),
        }
    }

    fn lease(&self) -> Option<&Lease> {
        match self {
            Slot::InFlight(f) => Some(&f.lease),
            Slot::Completed(_) => None,
        }
    }

    fn holds(&self, lease: &Lease) -> bool {
        self.lease().is_some_and(|l| l.token == lease.token)
    }
}

impl MemoryStore {
    fn begin_sync(
        &self,
        key: &RecordKey,
        fp: &Fingerprint,
        lease_ttl: Duration,
    ) -> Result<Begin, StoreError> {
        let now = self.inner.clock.now();
        let mut checked_room = false;
        loop {
            let mut shard = self.inner.records.lock(key);
            let current = shard
                .live(key, now)
                .map_or(State::Absent, |e| e.value.state());
            if matches!(current, State::Absent) && !checked_room && self.inner.bound.full() {
                drop(shard);
                self.ensure_room()?;
                checked_room = true;
                continue;
            }
            let (begin, next) = state::begin(&current, *fp, || Lease::new(self.next_fence()));
            if let Some(slot) = next.and_then(Slot::of) {
                shard.put(*key, slot, now + ms(lease_ttl));
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
        match shard.live(key, now) {
            Some(e) if e.value.holds(lease) => {
                f(e, now);
                true
            }
            _ => false,
        }
    }

    /// Whether `key` is still in flight under the lease with `fence`.
    fn still_waiting(&self, key: &RecordKey, fence: u64) -> bool {
        let now = self.inner.clock.now();
        let mut shard = self.inner.records.lock(key);
        shard
            .live(key, now)
            .is_some_and(|e| e.value.lease().is_some_and(|l| l.fence == fence))
    }
}

impl RecordStore for MemoryStore {
    fn begin<'a>(
        &'a self,
        key: &'a RecordKey,
        fp: &'a Fingerprint,
        lease_ttl: Duration,
    ) -> StoreFuture<'a, Begin> {
        Box::pin(ready(self.begin_sync(key, fp, lease_ttl)))
    }

    fn renew<'a>(
        &'a self,
        key: &'a RecordKey,
        lease: &'a Lease,
        lease_ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        Box::pin(ready(Ok(self.with_lease(key, lease, |e, now| {
            e.expires = now + ms(lease_ttl)
        }))))
    }

    fn complete<'a>(
        &'a self,
        key: &'a RecordKey,
        lease: &'a Lease,
        record: Arc<CompletedRecord>,
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        // Encode outside the shard lock.
        let encoded = record.encode_vec().into_boxed_slice();
        let done = self.with_lease(key, lease, |e, now| {
            // Waiters re-check under this shard lock, so they see the record.
            e.value.removed();
            e.value = Slot::Completed(encoded);
            e.expires = now + ms(ttl);
        });
        Box::pin(ready(Ok(done)))
    }

    fn release<'a>(&'a self, key: &'a RecordKey, lease: &'a Lease) -> StoreFuture<'a, bool> {
        // Check and remove under one lock so a new holder can't slip between.
        let now = self.inner.clock.now();
        let mut shard = self.inner.records.lock(key);
        let held = shard.live(key, now).is_some_and(|e| e.value.holds(lease));
        if held {
            shard.remove(key);
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
            match shard.live(key, now) {
                Some(Entry {
                    value: Slot::InFlight(f),
                    expires,
                }) if f.lease.fence == fence => {
                    let notify: Arc<Notify> = f.notify.get_or_insert_with(Default::default).clone();
                    // The lease may lapse without anyone completing it: wake
                    // then too, so the waiter can take it over.
                    (notify, deadline.min(self.inner.clock.instant(*expires)))
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
        let found = match shard.live(key, now) {
            Some(e) => Inspection {
                state: e.value.state(),
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
        let removed = self.inner.records.lock(key).remove(key).is_some();
        Box::pin(ready(Ok(removed)))
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(ready(Ok(())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every stored record pays for a bucket: keep it small.
    #[test]
    fn a_bucket_stays_small() {
        type E = Entry<Slot>;
        assert!(
            std::mem::size_of::<E>() <= 32,
            "{}",
            std::mem::size_of::<E>()
        );
        assert_eq!(
            std::mem::size_of::<(RecordKey, E)>(),
            32 + std::mem::size_of::<E>()
        );
    }
}
