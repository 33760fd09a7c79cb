//! The memory store: the shared contract, its bound, and lease expiry under
//! tokio's paused clock.

mod support;

use std::time::Duration;

use idemgate::idempotency::key::{Fingerprint, RecordKey};
use idemgate::idempotency::state::{Begin, BeginOptions};
use idemgate::store::{MemoryStore, RecordStore, StoreError};

/// A fresh store per contract case.
async fn memory(_case: &str) -> ((), MemoryStore) {
    ((), MemoryStore::new(10_000))
}

support::contract::record_contract!(record_contract, memory);
support::dedup_contract::dedup_contract!(dedup_contract, memory);

fn k(i: u32) -> RecordKey {
    RecordKey::derive_dedup("bound", &i.to_string())
}

const FP: Fingerprint = Fingerprint([9; 32]);

#[tokio::test(start_paused = true)]
async fn full_store_refuses_new_keys_but_never_evicts_live_ones() {
    let s = MemoryStore::new(3);
    for i in 0..3 {
        assert!(matches!(
            s.begin(&k(i), &FP, BeginOptions::lease(Duration::from_secs(10)))
                .await
                .unwrap(),
            Begin::Acquired(_)
        ));
    }
    assert!(matches!(
        s.begin(&k(3), &FP, BeginOptions::lease(Duration::from_secs(10)))
            .await,
        Err(StoreError::Full(3))
    ));
    // Existing keys still answer.
    assert!(matches!(
        s.begin(&k(0), &FP, BeginOptions::lease(Duration::from_secs(10)))
            .await
            .unwrap(),
        Begin::InFlight { .. }
    ));
    // Once records expire, the sweep on a full store makes room.
    tokio::time::advance(Duration::from_secs(11)).await;
    assert!(matches!(
        s.begin(&k(3), &FP, BeginOptions::lease(Duration::from_secs(10)))
            .await
            .unwrap(),
        Begin::Acquired(_)
    ));
    assert_eq!(s.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn leases_lapse_on_the_paused_clock() {
    let s = MemoryStore::new(100);
    let Begin::Acquired(first) = s
        .begin(&k(1), &FP, BeginOptions::lease(Duration::from_secs(30)))
        .await
        .unwrap()
    else {
        panic!()
    };
    tokio::time::advance(Duration::from_secs(29)).await;
    assert!(matches!(
        s.begin(&k(1), &FP, BeginOptions::lease(Duration::from_secs(30)))
            .await
            .unwrap(),
        Begin::InFlight { .. }
    ));
    tokio::time::advance(Duration::from_secs(2)).await;
    let Begin::Acquired(second) = s
        .begin(&k(1), &FP, BeginOptions::lease(Duration::from_secs(30)))
        .await
        .unwrap()
    else {
        panic!("the lapsed lease was not taken over")
    };
    assert!(second.fence > first.fence);
    assert!(!s
        .renew(&k(1), &first, Duration::from_secs(30))
        .await
        .unwrap());
}

#[tokio::test(start_paused = true)]
async fn sweep_drops_only_expired_records() {
    let s = MemoryStore::new(100);
    s.begin(&k(1), &FP, BeginOptions::lease(Duration::from_secs(5)))
        .await
        .unwrap();
    s.begin(&k(2), &FP, BeginOptions::lease(Duration::from_secs(50)))
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(s.sweep(), 1);
    assert_eq!(s.len(), 1);
}
