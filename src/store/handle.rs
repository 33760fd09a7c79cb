//! [`Store`]: the one handle the rest of the program holds. It holds a
//! backend's parts, each behind its own trait object, so a backend can
//! provide the HTTP records before it provides the rest: the records
//! (required), consumer dedup and the fair-share buckets (optional; a
//! handle without one answers [`StoreError::Unsupported`]). It also times
//! and counts the calls it is asked to observe.
//!
//! Dynamic dispatch costs one indirect call per store operation, next to a
//! boxed future and (on Redis) a round trip; the load harness showed no
//! difference from the enum it replaced (benches/RESULTS.md).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::buckets::BucketStore;
use super::dedup::DedupStore;
use super::error::{StoreError, StoreFuture};
use super::records::RecordStore;
use crate::idempotency::key::RecordKey;
use crate::idempotency::rate::Rate;
use crate::metrics::{Metrics, StoreOp};

/// What a backend opens into.
pub struct Parts {
    pub records: Arc<dyn RecordStore>,
    pub dedup: Option<Arc<dyn DedupStore>>,
    pub buckets: Option<Arc<dyn BucketStore>>,
}

/// The store the program holds: the backend chosen at start-up and,
/// optionally, metrics. Cheap to clone; clones share the backend.
#[derive(Clone)]
pub struct Store {
    parts: Arc<Parts>,
    metrics: Option<Metrics>,
    /// With traces on: the backend's `db.system.name` for its spans.
    traced: Option<&'static str>,
}

impl Store {
    /// A backend that provides every part.
    pub fn new<B>(backend: B) -> Self
    where
        B: RecordStore + DedupStore + BucketStore + Clone,
    {
        Store::from_parts(Parts {
            records: Arc::new(backend.clone()),
            dedup: Some(Arc::new(backend.clone())),
            buckets: Some(Arc::new(backend)),
        })
    }

    pub fn from_parts(parts: Parts) -> Self {
        Store {
            parts: Arc::new(parts),
            metrics: None,
            traced: None,
        }
    }

    /// Times every observed operation and counts failures in `metrics`.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Makes a span of every observed operation (and wait), named by the
    /// backend's `db.system.name` (`memory`, `redis`, `postgresql`).
    pub fn with_traces(mut self, db_system: &'static str) -> Self {
        self.traced = Some(db_system);
        self
    }

    /// The consumer-dedup records. Not observed here: the dedup API counts
    /// its operations itself (`idemgate_dedup_operations_total`).
    pub fn dedup(&self) -> Result<&dyn DedupStore, StoreError> {
        self.parts
            .dedup
            .as_deref()
            .ok_or(StoreError::Unsupported("consumer dedup"))
    }

    /// Bytes the store holds in this process, for `idemgate_store_bytes`
    /// (`None` for a remote store).
    pub fn local_bytes(&self) -> Option<u64> {
        self.parts.records.local_bytes()
    }

    /// Whether the store answers (not observed: readiness polls it).
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.parts.records.ping().await
    }

    /// Runs one call on the records as operation `op`: its duration and
    /// failure go to `idemgate_store_operation_duration_seconds{op}` and
    /// `idemgate_store_errors_total{op}`.
    pub async fn observe<'a, T>(
        &'a self,
        op: StoreOp,
        call: impl FnOnce(&'a dyn RecordStore) -> StoreFuture<'a, T>,
    ) -> Result<T, StoreError> {
        self.timed(op, call(&*self.parts.records)).await
    }

    /// Takes a token from the caller `scope`'s fair-share bucket (observed
    /// as `admit`): `Ok(Err(wait))` when it is empty.
    pub async fn admit(
        &self,
        scope: &RecordKey,
        rate: Rate,
    ) -> Result<Result<(), Duration>, StoreError> {
        match &self.parts.buckets {
            Some(b) => self.timed(StoreOp::Admit, b.admit(scope, rate)).await,
            None => Err(StoreError::Unsupported("fair-share buckets")),
        }
    }

    async fn timed<T>(&self, op: StoreOp, fut: StoreFuture<'_, T>) -> Result<T, StoreError> {
        if let Some(system) = self.traced {
            // Only inside a sampled request's span: nothing otherwise.
            if !tracing::Span::current().is_none() {
                return self.traced(system, op, fut).await;
            }
        }
        self.counted(op, fut).await
    }

    /// [`Self::counted`] in a client span of the store call.
    async fn traced<T>(
        &self,
        system: &'static str,
        op: StoreOp,
        fut: StoreFuture<'_, T>,
    ) -> Result<T, StoreError> {
        use tracing::Instrument;
        let span = tracing::debug_span!(
            "store",
            otel.name = format!("{} {system}", op.as_str()),
            otel.kind = "client",
            db.system.name = system,
            db.operation.name = op.as_str(),
            error.type = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let result = self.counted(op, fut).instrument(span.clone()).await;
        if let Err(e) = &result {
            span.record("error.type", e.to_string());
            span.record("otel.status_code", "ERROR");
        }
        result
    }

    async fn counted<T>(&self, op: StoreOp, fut: StoreFuture<'_, T>) -> Result<T, StoreError> {
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
        key: &RecordKey,
        fence: u64,
        deadline: Instant,
    ) -> Result<(), StoreError> {
        let result = self.parts.records.wait(key, fence, deadline).await;
        if let (Err(_), Some(m)) = (&result, &self.metrics) {
            m.store_error(StoreOp::Wait);
        }
        result
    }
}
