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

use crate::dedup::state::{ClaimOutcome, ClaimParams, ReleaseOutcome};
use crate::dedup::{ClaimItem, CompleteItem, Cursor, DedupStore, FailedItem, Inspected, Ttls};
use crate::idempotency::key::{Fingerprint, RecordKey};
use crate::idempotency::record::CompletedRecord;
use crate::idempotency::state::{Begin, Lease, State};
use crate::metrics::Metrics;

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

    /// The record's current state and remaining lifetime, for inspection.
    fn get<'a>(&'a self, key: &'a RecordKey) -> StoreFuture<'a, Inspection>;

    /// Deletes the record whatever its state; `false` if there was none.
    fn purge<'a>(&'a self, key: &'a RecordKey) -> StoreFuture<'a, bool>;

    /// Whether the store answers.
    fn ping(&self) -> StoreFuture<'_, ()>;
}

/// What [`Store::get`] finds: the state and how long until it expires.
#[derive(Debug, Clone, PartialEq)]
pub struct Inspection {
    pub state: State,
    pub expires_in: Option<Duration>,
}

/// The backend chosen at start-up, with optional metrics on every call.
/// Static dispatch over the backends rather than `dyn Store` layers.
#[derive(Clone)]
pub struct AnyStore {
    backend: Backend,
    metrics: Option<Metrics>,
}

#[derive(Clone)]
enum Backend {
    Memory(MemoryStore),
    Redis(RedisStore),
}

impl AnyStore {
    pub fn memory(store: MemoryStore) -> Self {
        AnyStore {
            backend: Backend::Memory(store),
            metrics: None,
        }
    }

    pub fn redis(store: RedisStore) -> Self {
        AnyStore {
            backend: Backend::Redis(store),
            metrics: None,
        }
    }

    /// Times every operation and counts failures in `metrics`.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    pub fn as_memory(&self) -> Option<&MemoryStore> {
        match &self.backend {
            Backend::Memory(m) => Some(m),
            Backend::Redis(_) => None,
        }
    }

    pub fn as_redis(&self) -> Option<&RedisStore> {
        match &self.backend {
            Backend::Redis(r) => Some(r),
            Backend::Memory(_) => None,
        }
    }

    fn backend(&self) -> &dyn Store {
        match &self.backend {
            Backend::Memory(s) => s,
            Backend::Redis(s) => s,
        }
    }

    fn observe<'a, T: Send + 'a>(
        &'a self,
        op: &'static str,
        fut: StoreFuture<'a, T>,
    ) -> StoreFuture<'a, T> {
        match &self.metrics {
            None => fut,
            Some(m) => Box::pin(async move {
                let started = Instant::now();
                let result = fut.await;
                m.store_op(op, started.elapsed(), result.is_err());
                result
            }),
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
        self.observe("begin", self.backend().begin(key, fp, lease_ttl))
    }
    fn renew<'a>(
        &'a self,
        key: &'a RecordKey,
        lease: &'a Lease,
        lease_ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        self.observe("renew", self.backend().renew(key, lease, lease_ttl))
    }
    fn complete<'a>(
        &'a self,
        key: &'a RecordKey,
        lease: &'a Lease,
        record: Arc<CompletedRecord>,
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        self.observe("complete", self.backend().complete(key, lease, record, ttl))
    }
    fn release<'a>(&'a self, key: &'a RecordKey, lease: &'a Lease) -> StoreFuture<'a, bool> {
        self.observe("release", self.backend().release(key, lease))
    }
    fn wait<'a>(
        &'a self,
        key: &'a RecordKey,
        fence: u64,
        deadline: Instant,
    ) -> StoreFuture<'a, ()> {
        // Not timed: its duration is the wait, not the store's latency.
        let fut = self.backend().wait(key, fence, deadline);
        match &self.metrics {
            None => fut,
            Some(m) => Box::pin(async move {
                let result = fut.await;
                if result.is_err() {
                    m.store_errors.with_label_values(&["wait"]).inc();
                }
                result
            }),
        }
    }
    fn get<'a>(&'a self, key: &'a RecordKey) -> StoreFuture<'a, Inspection> {
        self.observe("get", self.backend().get(key))
    }
    fn purge<'a>(&'a self, key: &'a RecordKey) -> StoreFuture<'a, bool> {
        self.observe("purge", self.backend().purge(key))
    }
    fn ping(&self) -> StoreFuture<'_, ()> {
        self.backend().ping()
    }
}

impl AnyStore {
    fn dedup_backend(&self) -> &dyn DedupStore {
        match &self.backend {
            Backend::Memory(s) => s,
            Backend::Redis(s) => s,
        }
    }
}

/// Dedup calls are counted by the dedup API itself
/// (`idemgate_dedup_operations_total`), so they pass straight through.
impl DedupStore for AnyStore {
    fn mark<'a>(&'a self, scope: &'a str, key: &'a str, ttl: Duration) -> StoreFuture<'a, bool> {
        self.dedup_backend().mark(scope, key, ttl)
    }
    fn claim<'a>(
        &'a self,
        scope: &'a str,
        key: &'a str,
        p: &'a ClaimParams,
        ttls: Ttls,
    ) -> StoreFuture<'a, ClaimOutcome> {
        self.dedup_backend().claim(scope, key, p, ttls)
    }
    fn extend<'a>(
        &'a self,
        scope: &'a str,
        key: &'a str,
        lease_id: &'a str,
        lease_ms: u64,
    ) -> StoreFuture<'a, Option<u64>> {
        self.dedup_backend().extend(scope, key, lease_id, lease_ms)
    }
    fn complete<'a>(
        &'a self,
        scope: &'a str,
        key: &'a str,
        lease_id: &'a str,
        result: Option<String>,
        retention: Duration,
    ) -> StoreFuture<'a, bool> {
        self.dedup_backend()
            .complete(scope, key, lease_id, result, retention)
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
        self.dedup_backend()
            .release(scope, key, lease_id, outcome, error, ttls)
    }
    fn inspect<'a>(&'a self, scope: &'a str, key: &'a str) -> StoreFuture<'a, Option<Inspected>> {
        self.dedup_backend().inspect(scope, key)
    }
    fn delete<'a>(&'a self, scope: &'a str, key: &'a str) -> StoreFuture<'a, bool> {
        self.dedup_backend().delete(scope, key)
    }
    fn list_failed<'a>(
        &'a self,
        scope: &'a str,
        limit: usize,
        after: Option<Cursor>,
    ) -> StoreFuture<'a, (Vec<FailedItem>, Option<Cursor>)> {
        self.dedup_backend().list_failed(scope, limit, after)
    }
    fn purge_failed<'a>(&'a self, scope: &'a str) -> StoreFuture<'a, u64> {
        self.dedup_backend().purge_failed(scope)
    }
    fn claim_batch<'a>(
        &'a self,
        scope: &'a str,
        items: &'a [ClaimItem],
        ttls: Ttls,
    ) -> StoreFuture<'a, Vec<Result<ClaimOutcome, StoreError>>> {
        self.dedup_backend().claim_batch(scope, items, ttls)
    }
    fn complete_batch<'a>(
        &'a self,
        scope: &'a str,
        items: &'a [CompleteItem],
    ) -> StoreFuture<'a, Vec<Result<bool, StoreError>>> {
        self.dedup_backend().complete_batch(scope, items)
    }
    fn mark_batch<'a>(
        &'a self,
        scope: &'a str,
        items: &'a [(String, Duration)],
    ) -> StoreFuture<'a, Vec<Result<bool, StoreError>>> {
        self.dedup_backend().mark_batch(scope, items)
    }
}
