//! The storage contract and its backends, at the bottom of the program: this
//! module depends only on the pure core ([`crate::idempotency`]) and on the
//! metrics it reports into.
//!
//! - [`RecordStore`]: HTTP idempotency records (atomic begin / renew /
//!   complete / release / mark unknown / resolve / wait, and the fair-share
//!   buckets). Shaped for Redis: begin takes the lease, reports the
//!   in-flight holder or an unknown outcome, or returns the completed
//!   record in one call, so a replay is one round trip.
//! - [`DedupStore`]: consumer-dedup records (claim / extend / complete /
//!   release / mark and the dead-letter index).
//! - [`Store`]: the one handle the rest of the program holds: a backend
//!   behind `Arc<dyn Backend>` and the metrics wrapper [`Store::observe`].
//!
//! Backends: [`MemoryStore`] (one process) and [`RedisStore`] (standalone and
//! Cluster), both writing records through [`Sealing`] (encoded, and sealed
//! when encryption is on). Every later state change names its lease (or,
//! for an unknown outcome, its fence) and succeeds only while it is current.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::metrics::{Metrics, StoreOp};

pub mod dedup;
pub mod memory;
mod records;
pub mod redis_store;
mod sealing;
mod ttl_map;

pub use dedup::{ClaimItem, CompleteItem, Cursor, DedupStore, FailedItem, Inspected, Ttls};
pub use memory::MemoryStore;
pub use records::{Inspection, RecordStore};
pub use redis_store::{redact_url, RedisOptions, RedisStore};
pub use sealing::Sealing;

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
    #[error("store is full ({0} bytes); refusing new keys rather than evicting live ones")]
    FullBytes(u64),
}

/// A store call's future. Boxed: it keeps the traits object-safe (the
/// handle holds `dyn Backend`) and spares callers a rustc limitation with
/// borrowed `impl Future` returns inside spawned tasks; one small allocation
/// next to a store call.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Everything a backend provides: both halves of the contract.
pub trait Backend: RecordStore + DedupStore {}

impl<T: RecordStore + DedupStore> Backend for T {}

/// The store the program holds: the backend chosen at start-up and,
/// optionally, metrics. Cheap to clone; clones share the backend.
///
/// Dynamic dispatch costs one indirect call per store operation, next to a
/// boxed future and (on Redis) a round trip; the load harness showed no
/// difference from the enum it replaced (benches/RESULTS.md).
#[derive(Clone)]
pub struct Store {
    backend: Arc<dyn Backend>,
    metrics: Option<Metrics>,
}

impl Store {
    pub fn new(backend: impl Backend) -> Self {
        Store {
            backend: Arc::new(backend),
            metrics: None,
        }
    }

    /// Times every observed operation and counts failures in `metrics`.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The consumer-dedup records. Not observed here: the dedup API counts
    /// its operations itself (`idemgate_dedup_operations_total`).
    pub fn dedup(&self) -> &dyn DedupStore {
        &*self.backend
    }

    /// Bytes the store holds in this process, for `idemgate_store_bytes`
    /// (`None` for a remote store).
    pub fn local_bytes(&self) -> Option<u64> {
        self.backend.local_bytes()
    }

    /// Whether the store answers (not observed: readiness polls it).
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.backend.ping().await
    }

    /// Runs one backend call as operation `op`: its duration and failure go
    /// to `idemgate_store_operation_duration_seconds{op}` and
    /// `idemgate_store_errors_total{op}`.
    pub async fn observe<'a, T>(
        &'a self,
        op: StoreOp,
        call: impl FnOnce(&'a dyn RecordStore) -> StoreFuture<'a, T>,
    ) -> Result<T, StoreError> {
        let fut = call(&*self.backend);
        let Some(m) = &self.metrics else {
            return fut.await;
        };
        let started = Instant::now();
        let result = fut.await;
        m.store_op(op, started.elapsed(), result.is_err());
        result
    }

    /// Waits as [`RecordStore::wait`] does; only a failure is counted.
    pub async fn wait(
        &self,
        key: &crate::idempotency::key::RecordKey,
        fence: u64,
        deadline: Instant,
    ) -> Result<(), StoreError> {
        let result = self.backend.wait(key, fence, deadline).await;
        if let (Err(_), Some(m)) = (&result, &self.metrics) {
            m.store_error(StoreOp::Wait);
        }
        result
    }
}
