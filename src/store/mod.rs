//! The [`Store`] trait and its backends.
//!
//! The trait is shaped for Redis: [`Store::begin`] is one atomic call that
//! takes the lease, reports the in-flight holder, or returns the completed
//! record, so a replay is a single round trip. Every later state change names
//! the lease and succeeds only while that lease's token is current.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::idempotency::key::{Fingerprint, RecordKey};
use crate::idempotency::record::CompletedRecord;
use crate::idempotency::state::{Begin, Lease, State};

pub mod memory;
pub mod redis;

pub use self::redis::RedisStore;
pub use memory::MemoryStore;

/// A store failure. The proxy answers every variant with 503 (or passes the
/// request through, when configured to).
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store did not answer within {0:?}")]
    Timeout(Duration),
    #[error("store is full ({0} records); refusing new keys rather than evicting live ones")]
    Full(usize),
}

/// A store call's future. Boxed: it keeps the trait object-safe and spares
/// callers a rustc limitation with borrowed `impl Future` returns inside
/// spawned tasks; one small allocation next to a store round trip.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Where idempotency records live. Cheap to clone; clones share state.
pub trait Store: Send + Sync + 'static {
    /// Atomically: absent → in flight under a new lease (`lease_ttl`); in
    /// flight → report the holder; completed → return the record.
    fn begin<'a>(
        &'a self,
        key: &'a RecordKey,
        fingerprint: &'a Fingerprint,
        lease_ttl: Duration,
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

    /// Resolves once the lease with `fence` may have ended (completed,
    /// released, expired), or at `deadline`. Callers then `begin` again.
    fn wait<'a>(&'a self, key: &'a RecordKey, fence: u64, deadline: Instant)
        -> StoreFuture<'a, ()>;

    /// The record's current state, for inspection.
    fn get<'a>(&'a self, key: &'a RecordKey) -> StoreFuture<'a, State>;

    /// Deletes the record whatever its state; `false` if there was none.
    fn purge<'a>(&'a self, key: &'a RecordKey) -> StoreFuture<'a, bool>;

    /// Whether the store answers.
    fn ping(&self) -> StoreFuture<'_, ()>;
}

/// The backend chosen at start-up. An enum rather than `dyn Store` so the
/// choice is made once per call with a match, not a vtable per layer.
#[derive(Clone)]
pub enum AnyStore {
    Memory(MemoryStore),
    Redis(RedisStore),
}

impl AnyStore {
    fn backend(&self) -> &dyn Store {
        match self {
            AnyStore::Memory(s) => s,
            AnyStore::Redis(s) => s,
        }
    }
}

impl Store for AnyStore {
    fn begin<'a>(
        &'a self,
        key: &'a RecordKey,
        fp: &'a Fingerprint,
        lease_ttl: Duration,
    ) -> StoreFuture<'a, Begin> {
        self.backend().begin(key, fp, lease_ttl)
    }
    fn renew<'a>(
        &'a self,
        key: &'a RecordKey,
        lease: &'a Lease,
        lease_ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        self.backend().renew(key, lease, lease_ttl)
    }
    fn complete<'a>(
        &'a self,
        key: &'a RecordKey,
        lease: &'a Lease,
        record: Arc<CompletedRecord>,
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        self.backend().complete(key, lease, record, ttl)
    }
    fn release<'a>(&'a self, key: &'a RecordKey, lease: &'a Lease) -> StoreFuture<'a, bool> {
        self.backend().release(key, lease)
    }
    fn wait<'a>(
        &'a self,
        key: &'a RecordKey,
        fence: u64,
        deadline: Instant,
    ) -> StoreFuture<'a, ()> {
        self.backend().wait(key, fence, deadline)
    }
    fn get<'a>(&'a self, key: &'a RecordKey) -> StoreFuture<'a, State> {
        self.backend().get(key)
    }
    fn purge<'a>(&'a self, key: &'a RecordKey) -> StoreFuture<'a, bool> {
        self.backend().purge(key)
    }
    fn ping(&self) -> StoreFuture<'_, ()> {
        self.backend().ping()
    }
}
