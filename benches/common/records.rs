//! A completed record put into the memory store the way the proxy puts
//! one (a lease taken, then completed), as the memory benches fill it.

use std::sync::Arc;
use std::time::Duration;

use idemgate::idempotency::key::RecordKey;
use idemgate::idempotency::record::CompletedRecord;
use idemgate::idempotency::state::{Begin, BeginOptions};
use idemgate::store::memory::MemoryStore;
use idemgate::store::RecordStore;

/// Begins `key` (it must be new) and completes it with `record`, kept
/// for `ttl`.
pub async fn put(
    store: &MemoryStore,
    key: &RecordKey,
    record: &Arc<CompletedRecord>,
    ttl: Duration,
) {
    let Begin::Acquired(lease) = store
        .begin(
            key,
            &record.fingerprint,
            BeginOptions::lease(Duration::from_secs(30)),
        )
        .await
        .unwrap()
    else {
        unreachable!("a new key is acquired")
    };
    assert!(store
        .complete(key, &lease, record.clone(), ttl)
        .await
        .unwrap());
}
