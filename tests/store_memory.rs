//! The memory store: the shared contract, its bound, and lease expiry under
//! tokio's paused clock.

mod support;

use std::time::Duration;

use idemgate::idempotency::key::{Fingerprint, RecordKey};
use idemgate::idempotency::state::{Begin, BeginOptions};
use idemgate::store::memory::MemoryStore;
use idemgate::store::{RecordStore, StoreError};

/// A fresh store per contract case.
async fn memory(_case: &str) -> ((), MemoryStore) {
    ((), MemoryStore::new(10_000))
}

support::contract::record_contract!(record_contract, memory);
support::contract::bucket_contract!(bucket_contract, memory);
support::dedup_contract::dedup_contract!(dedup_contract, memory);

fn k(i: u32) -> RecordKey {
    RecordKey::derive_dedup("bound", &i.to_string())
}

const FP: Fingerprint = Fingerprint([9; 32]);

/// A completed record with a 1 KiB body.
fn record() -> std::sync::Arc<idemgate::idempotency::record::CompletedRecord> {
    record_of(1024)
}

/// A completed record with a body of `len` bytes, each its own.
fn record_of(len: usize) -> std::sync::Arc<idemgate::idempotency::record::CompletedRecord> {
    std::sync::Arc::new(idemgate::idempotency::record::CompletedRecord {
        origin: None,
        fingerprint: FP,
        created_unix_ms: 0,
        response: idemgate::idempotency::record::StoredResponse {
            status: http::StatusCode::OK,
            headers: Default::default(),
            body: bytes::Bytes::from((0..len).map(|i| (i % 251) as u8).collect::<Vec<_>>()),
            body_omitted: false,
            trailers: http::HeaderMap::new(),
        },
    })
}

/// Records of every size around the ones held in two parts (16 to 128
/// KiB), plaintext and sealed, replay byte for byte; the bytes counted
/// are the record's.
#[tokio::test]
async fn records_of_every_size_replay_whole() {
    let keyring = idemgate::idempotency::seal::Keyring::new(&[("k1".into(), vec![7; 32])]).unwrap();
    for sealing in [
        idemgate::store::Sealing::default(),
        idemgate::store::Sealing::new(Some(keyring), None),
    ] {
        let sealed = sealing.is_on();
        let s = MemoryStore::bounded(1000, usize::MAX, sealing);
        for (i, len) in [
            1000,
            16 << 10,
            65_000,
            64 << 10,
            65_536 + 100,
            100_000,
            130_000,
        ]
        .into_iter()
        .enumerate()
        {
            let key = k(i as u32);
            let Begin::Acquired(lease) = s
                .begin(&key, &FP, BeginOptions::lease(Duration::from_secs(10)))
                .await
                .unwrap()
            else {
                panic!("not acquired")
            };
            let before = s.bytes();
            let rec = record_of(len);
            assert!(s
                .complete(&key, &lease, rec.clone(), Duration::from_secs(60))
                .await
                .unwrap());
            let grew = s.bytes() - before;
            assert!(
                grew + 256 >= len && grew < len + 1024,
                "{len} bytes (sealed {sealed}): {grew} counted"
            );
            let Begin::Completed(back) = s
                .begin(&key, &FP, BeginOptions::lease(Duration::from_secs(10)))
                .await
                .unwrap()
            else {
                panic!("not replayed")
            };
            assert_eq!(
                back.response.body, rec.response.body,
                "{len} bytes (sealed {sealed})"
            );
        }
    }
}

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
    // Outside a runtime: no expirer, only the explicit sweep.
    let s = std::thread::spawn(|| MemoryStore::new(100)).join().unwrap();
    s.begin(&k(1), &FP, BeginOptions::lease(Duration::from_secs(5)))
        .await
        .unwrap();
    s.begin(&k(2), &FP, BeginOptions::lease(Duration::from_secs(50)))
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(s.len(), 2, "nothing removes them but a sweep or a read");
    assert_eq!(s.sweep(), 1);
    assert_eq!(s.len(), 1);
    assert_eq!(s.sweep(), 0);
}

/// Records leave at their deadlines, nobody reading them: the expirer
/// sleeps until the earliest one. A record moved earlier (completed with
/// a TTL shorter than its lease) leaves at its new deadline, one extended
/// (a renewed lease) at its later one, and the bytes they held go with
/// them.
#[tokio::test(start_paused = true)]
async fn records_leave_at_their_deadlines() {
    let s = MemoryStore::new(100);
    let lease = |secs| BeginOptions::lease(Duration::from_secs(secs));
    s.begin(&k(1), &FP, lease(5)).await.unwrap();
    let Begin::Acquired(l2) = s.begin(&k(2), &FP, lease(60)).await.unwrap() else {
        panic!("not acquired")
    };
    let Begin::Acquired(l3) = s.begin(&k(3), &FP, lease(5)).await.unwrap() else {
        panic!("not acquired")
    };
    let empty = s.bytes();
    assert!(s
        .complete(&k(2), &l2, record(), Duration::from_secs(2))
        .await
        .unwrap());
    assert!(s.renew(&k(3), &l3, Duration::from_secs(30)).await.unwrap());
    assert!(
        s.bytes() > empty,
        "the completed record's bytes are counted"
    );

    tokio::time::sleep(Duration::from_millis(2_200)).await;
    assert_eq!(s.len(), 2, "k(2) completed with a 2 s TTL has left");
    assert!(s.bytes() < empty, "{} < {empty}", s.bytes());
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    assert_eq!(s.len(), 1, "k(1) at its 5 s lease, k(3) renewed");
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(s.len(), 0, "k(3) at its renewed lease");
    assert_eq!(s.bytes(), 0);
}

#[tokio::test]
async fn bytes_are_counted_and_bound_new_keys() {
    // Room for a few 100 KiB records, not for ten.
    let s = MemoryStore::bounded(1000, 400 << 10, idemgate::store::Sealing::default());
    assert_eq!(s.bytes(), 0);
    let mut stored = 0;
    let mut refused = None;
    for i in 0..10u32 {
        match s
            .begin(&k(i), &FP, BeginOptions::lease(Duration::from_secs(10)))
            .await
        {
            Ok(Begin::Acquired(lease)) => {
                assert!(s
                    .complete(&k(i), &lease, record_of(100 << 10), Duration::from_secs(60))
                    .await
                    .unwrap());
                stored += 1;
            }
            Err(e) => {
                refused = Some(e);
                break;
            }
            Ok(other) => panic!("{other:?}"),
        }
    }
    assert!(
        matches!(refused, Some(StoreError::FullBytes(_))),
        "{refused:?}"
    );
    assert!((3..=5).contains(&stored), "stored {stored}");
    assert!(s.bytes() >= 300 << 10, "{}", s.bytes());
    // Live records are never evicted: each still replays.
    for i in 0..stored {
        assert!(matches!(
            s.begin(&k(i), &FP, BeginOptions::lease(Duration::from_secs(10)))
                .await
                .unwrap(),
            Begin::Completed(_)
        ));
    }
    // Purged, the bytes come back.
    for i in 0..stored {
        assert!(s.purge(&k(i)).await.unwrap());
    }
    assert_eq!(s.bytes(), 0);
}
