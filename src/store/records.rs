//! The HTTP records of the storage contract: [`RecordStore`], the atomic
//! transitions of one idempotency record ([`crate::idempotency::state`]).
//! The invariants every backend keeps are in `CONTRACT.md` beside this
//! file.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::error::StoreFuture;
use crate::idempotency::key::{Fingerprint, RecordKey};
use crate::idempotency::record::CompletedRecord;
use crate::idempotency::state::{Begin, BeginOptions, Lease, Resolution, State, UnknownCause};

/// Where idempotency records live. Cheap to clone; clones share state.
pub trait RecordStore: Send + Sync + 'static {
    /// Atomically: absent → in flight under a new lease (`opts.lease_ttl`);
    /// in flight → report the holder (or, if its lease lapsed, take it over
    /// or hold the record as unknown, as `opts` says); completed → return
    /// the record; unknown → report it (telling one caller per
    /// `opts.reconcile_every` to reconcile).
    fn begin<'a>(
        &'a self,
        key: &'a RecordKey,
        fingerprint: &'a Fingerprint,
        opts: BeginOptions,
    ) -> StoreFuture<'a, Begin>;

    /// Extends the lease to `lease_ttl` from now; `false` if it was lost.
    fn renew<'a>(
        &'a self,
        key: &'a RecordKey,
        lease: &'a Lease,
        lease_ttl: Duration,
    ) -> StoreFuture<'a, bool>;

    /// Stores the record for `ttl`; `false` (and nothing written) if the lease
    /// was lost.
    fn complete<'a>(
        &'a self,
        key: &'a RecordKey,
        lease: &'a Lease,
        record: Arc<CompletedRecord>,
        ttl: Duration,
    ) -> StoreFuture<'a, bool>;

    /// Deletes the in-flight record so a retry runs; `false` if the lease
    /// was lost (and then nothing is deleted).
    fn release<'a>(&'a self, key: &'a RecordKey, lease: &'a Lease) -> StoreFuture<'a, bool>;

    /// In flight → unknown (`cause`), kept for `ttl` with its fence, waiters
    /// woken; `false` (and nothing written) if the lease was lost.
    fn mark_unknown<'a>(
        &'a self,
        key: &'a RecordKey,
        lease: &'a Lease,
        cause: UnknownCause,
        ttl: Duration,
    ) -> StoreFuture<'a, bool>;

    /// Settles the unknown record with `fence`: completed, or released so
    /// the next request runs; `false` (nothing written) if the record is not
    /// (or no longer) unknown with that fence.
    fn resolve<'a>(
        &'a self,
        key: &'a RecordKey,
        fence: u64,
        resolution: Resolution,
    ) -> StoreFuture<'a, bool>;

    /// Resolves once the lease with `fence` may have ended (completed,
    /// released, expired), or at `deadline`. Callers then `begin` again.
    fn wait<'a>(&'a self, key: &'a RecordKey, fence: u64, deadline: Instant)
        -> StoreFuture<'a, ()>;

    /// The record's current state and remaining lifetime, for inspection.
    fn get<'a>(&'a self, key: &'a RecordKey) -> StoreFuture<'a, Inspection>;

    /// Deletes the record whatever its state; `false` if there was none.
    fn purge<'a>(&'a self, key: &'a RecordKey) -> StoreFuture<'a, bool>;

    /// Whether the store answers.
    fn ping(&self) -> StoreFuture<'_, ()>;

    /// Bytes held in this process (the memory store); `None` otherwise.
    fn local_bytes(&self) -> Option<u64> {
        None
    }
}

/// What [`RecordStore::get`] finds: the state and how long until it expires.
#[derive(Debug, Clone, PartialEq)]
pub struct Inspection {
    pub state: State,
    pub expires_in: Option<Duration>,
}
