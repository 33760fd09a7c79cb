//! The consumer-dedup store contract: one suite for memory, Redis and Redis
//! Cluster. Real time with short leases so it runs the same everywhere.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use idemgate::idempotency::dedup::{ClaimOutcome, ClaimParams, DedupRecord, ReleaseOutcome};
use idemgate::idempotency::lease::LeaseId;
use idemgate::store::{ClaimItem, CompleteItem, DedupStore, Ttls};

const TTLS: Ttls = Ttls {
    retention: Duration::from_secs(600),
    failed_retention: Duration::from_secs(600),
};

fn scope(tag: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{tag}.{nanos}.{}", N.fetch_add(1, Ordering::Relaxed))
}

fn params(lease_ms: u64, max_attempts: u32) -> ClaimParams {
    ClaimParams {
        lease_ms,
        fingerprint: None,
        max_attempts,
        worker: Some("w".into()),
    }
}

async fn acquire<S: DedupStore + ?Sized>(
    s: &S,
    scope: &str,
    key: &str,
    p: &ClaimParams,
) -> (LeaseId, u64, u32, bool) {
    match s.claim(scope, key, p, TTLS).await.unwrap() {
        ClaimOutcome::Acquired {
            lease_id,
            fence,
            attempt,
            recovered,
            ..
        } => (lease_id, fence, attempt, recovered),
        other => panic!("expected acquired, got {other:?}"),
    }
}

/// One `#[test]` per case of the dedup contract; `$setup` as for
/// [`super::contract::record_contract`].
#[allow(unused_macros)] // each test binary uses a part of support
macro_rules! dedup_contract {
    ($name:ident, $setup:ident) => {
        $crate::support::dedup_contract::dedup_contract!(
            $name, $setup, #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        );
    };
    ($name:ident, $setup:ident, #[$test:meta]) => {
        $crate::support::dedup_contract::dedup_contract!(@cases $name, $setup, #[$test];
            lifecycle,
            racing_claims_have_one_winner,
            expired_leases_are_taken_over,
            attempts_run_out_into_a_dead_letter,
            dead_letters_are_listed_reset_and_purged,
            marks,
            scopes_are_apart,
            batches_answer_in_order,
            retention_bounds_completed_records,
            fingerprints
        );
    };
    (@cases $name:ident, $setup:ident, #[$test:meta]; $($case:ident),*) => {
        mod $name {
            $(
                #[$test]
                async fn $case() {
                    let (_guard, store) = super::$setup(stringify!($case)).await;
                    $crate::support::dedup_contract::$case(&store).await;
                }
            )*
        }
    };
}
#[allow(unused_imports)]
pub(crate) use dedup_contract;

pub async fn lifecycle<S: DedupStore>(s: &S) {
    let sc = scope("life");
    let p = params(30_000, 5);
    let (lease, fence, attempt, recovered) = acquire(s, &sc, "m1", &p).await;
    assert_eq!((attempt, recovered), (1, false));
    assert!(fence > 0);
    assert!(matches!(
        s.claim(&sc, "m1", &p, TTLS).await.unwrap(),
        ClaimOutcome::InProgress { retry_after_ms } if retry_after_ms > 25_000 && retry_after_ms <= 30_000
    ));
    assert_eq!(
        s.extend(&sc, "m1", lease, 60_000).await.unwrap(),
        Some(60_000)
    );
    assert_eq!(
        s.extend(&sc, "m1", LeaseId::random(), 60_000)
            .await
            .unwrap(),
        None
    );
    let found = s.inspect(&sc, "m1").await.unwrap().unwrap();
    match found.record {
        DedupRecord::Leased {
            lease_until_ms,
            worker,
            ..
        } => {
            assert!(lease_until_ms > found.now_ms + 55_000);
            assert_eq!(worker.as_deref(), Some("w"));
        }
        other => panic!("{other:?}"),
    }
    assert!(!s
        .complete(&sc, "m1", LeaseId::random(), None, TTLS.retention)
        .await
        .unwrap());
    assert!(s
        .complete(&sc, "m1", lease, Some("{\"n\":1}".into()), TTLS.retention)
        .await
        .unwrap());
    // Idempotent for the same lease; refused for another.
    assert!(s
        .complete(&sc, "m1", lease, Some("{\"n\":2}".into()), TTLS.retention)
        .await
        .unwrap());
    assert!(!s
        .complete(&sc, "m1", LeaseId::random(), None, TTLS.retention)
        .await
        .unwrap());
    match s.claim(&sc, "m1", &p, TTLS).await.unwrap() {
        ClaimOutcome::Completed {
            result,
            completed_at_ms,
        } => {
            assert_eq!(result.as_deref(), Some("{\"n\":1}"));
            assert!(completed_at_ms > 1_700_000_000_000);
        }
        other => panic!("{other:?}"),
    }
    assert!(!s
        .release(&sc, "m1", lease, ReleaseOutcome::Retry, None, TTLS)
        .await
        .unwrap());
    assert!(s.delete(&sc, "m1").await.unwrap());
    assert!(!s.delete(&sc, "m1").await.unwrap());
    assert!(s.inspect(&sc, "m1").await.unwrap().is_none());
}

pub async fn racing_claims_have_one_winner<S: DedupStore + Clone + 'static>(s: &S) {
    let s = s.clone();
    let sc = Arc::new(scope("race"));
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (s, sc) = (s.clone(), sc.clone());
            tokio::spawn(
                async move { s.claim(&sc, "hot", &params(30_000, 5), TTLS).await.unwrap() },
            )
        })
        .collect();
    let mut acquired = 0;
    for t in tasks {
        match t.await.unwrap() {
            ClaimOutcome::Acquired { .. } => acquired += 1,
            ClaimOutcome::InProgress { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(acquired, 1);
}

pub async fn expired_leases_are_taken_over<S: DedupStore>(s: &S) {
    let sc = scope("expiry");
    let (old, old_fence, _, _) = acquire(s, &sc, "m", &params(150, 5)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (new, new_fence, attempt, recovered) = acquire(s, &sc, "m", &params(30_000, 5)).await;
    assert!(recovered);
    assert_eq!(attempt, 2);
    assert!(new_fence > old_fence);
    assert_ne!(new, old);
    // The old holder is fenced off.
    assert!(!s
        .complete(&sc, "m", old, None, TTLS.retention)
        .await
        .unwrap());
    assert!(!s
        .release(&sc, "m", old, ReleaseOutcome::Retry, None, TTLS)
        .await
        .unwrap());
    assert_eq!(s.extend(&sc, "m", old, 1000).await.unwrap(), None);
    assert!(s
        .complete(&sc, "m", new, None, TTLS.retention)
        .await
        .unwrap());
}

pub async fn attempts_run_out_into_a_dead_letter<S: DedupStore>(s: &S) {
    let sc = scope("attempts");
    let p = params(30_000, 2);
    for expect in 1..=2 {
        let (lease, _, attempt, _) = acquire(s, &sc, "m", &p).await;
        assert_eq!(attempt, expect);
        let err = format!("boom {expect}");
        assert!(s
            .release(&sc, "m", lease, ReleaseOutcome::Retry, Some(err), TTLS)
            .await
            .unwrap());
    }
    assert_eq!(
        s.claim(&sc, "m", &p, TTLS).await.unwrap(),
        ClaimOutcome::Failed {
            error: Some("boom 2".into()),
            attempts: 2
        }
    );
    let (items, next) = s.list_failed(&sc, 10, None).await.unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!((items[0].key.as_str(), items[0].attempts), ("m", 2));
    assert_eq!(next, None);
}

pub async fn dead_letters_are_listed_reset_and_purged<S: DedupStore>(s: &S) {
    let sc = scope("dlq");
    for i in 0..5 {
        let key = format!("k{i}");
        let (lease, ..) = acquire(s, &sc, &key, &params(30_000, 5)).await;
        let err = Some(format!("bad {i}"));
        assert!(s
            .release(&sc, &key, lease, ReleaseOutcome::Permanent, err, TTLS)
            .await
            .unwrap());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Pages of two, oldest first, every item once.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let (items, next) = s.list_failed(&sc, 2, after).await.unwrap();
        assert!(items.len() <= 2);
        seen.extend(items);
        match next {
            Some(c) => after = Some(c),
            None => break,
        }
    }
    let keys: Vec<&str> = seen.iter().map(|i| i.key.as_str()).collect();
    assert_eq!(keys, ["k0", "k1", "k2", "k3", "k4"]);
    assert!(seen
        .windows(2)
        .all(|w| w[0].failed_at_ms <= w[1].failed_at_ms));
    assert_eq!(seen[3].error.as_deref(), Some("bad 3"));
    // A failed key answers failed to claims until it is reset.
    assert!(matches!(
        s.claim(&sc, "k1", &params(30_000, 5), TTLS).await.unwrap(),
        ClaimOutcome::Failed { attempts: 1, .. }
    ));
    assert!(s.delete(&sc, "k1").await.unwrap());
    let (_, _, attempt, _) = acquire(s, &sc, "k1", &params(30_000, 5)).await;
    assert_eq!(attempt, 1);
    let (items, _) = s.list_failed(&sc, 10, None).await.unwrap();
    assert_eq!(items.len(), 4);
    assert_eq!(s.purge_failed(&sc).await.unwrap(), 4);
    assert!(s.list_failed(&sc, 10, None).await.unwrap().0.is_empty());
    assert!(s.inspect(&sc, "k0").await.unwrap().is_none());
    // The reset key, now leased again, was not purged.
    assert!(s.inspect(&sc, "k1").await.unwrap().is_some());
}

pub async fn marks<S: DedupStore>(s: &S) {
    let sc = scope("mark");
    assert!(s.mark(&sc, "e1", TTLS.retention).await.unwrap());
    assert!(!s.mark(&sc, "e1", TTLS.retention).await.unwrap());
    assert!(matches!(
        s.claim(&sc, "e1", &params(1000, 5), TTLS).await.unwrap(),
        ClaimOutcome::Completed { result: None, .. }
    ));
    acquire(s, &sc, "e2", &params(30_000, 5)).await;
    assert!(!s.mark(&sc, "e2", TTLS.retention).await.unwrap());
    assert!(s
        .mark(&sc, "short", Duration::from_millis(150))
        .await
        .unwrap());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(s.mark(&sc, "short", TTLS.retention).await.unwrap());
}

pub async fn scopes_are_apart<S: DedupStore>(s: &S) {
    let (a, b) = (scope("a"), scope("b"));
    acquire(s, &a, "same", &params(30_000, 5)).await;
    acquire(s, &b, "same", &params(30_000, 5)).await;
    assert!(s.mark(&a, "m", TTLS.retention).await.unwrap());
    assert!(s.mark(&b, "m", TTLS.retention).await.unwrap());
}

pub async fn batches_answer_in_order<S: DedupStore>(s: &S) {
    let sc = scope("batch");
    let item = |k: &str| ClaimItem {
        key: k.into(),
        params: params(30_000, 5),
    };
    let out = s
        .claim_batch(&sc, &[item("x"), item("y"), item("x")], TTLS)
        .await
        .unwrap();
    let leases: Vec<LeaseId> = out
        .iter()
        .take(2)
        .map(|o| match o.as_ref().unwrap() {
            ClaimOutcome::Acquired { lease_id, .. } => *lease_id,
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(matches!(
        out[2].as_ref().unwrap(),
        ClaimOutcome::InProgress { .. }
    ));
    let done = s
        .complete_batch(
            &sc,
            &[
                CompleteItem {
                    key: "x".into(),
                    lease_id: leases[0],
                    result: None,
                    retention: TTLS.retention,
                },
                CompleteItem {
                    key: "y".into(),
                    lease_id: LeaseId::random(),
                    result: None,
                    retention: TTLS.retention,
                },
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        done.into_iter().map(Result::unwrap).collect::<Vec<_>>(),
        [true, false]
    );
    let marks = s
        .mark_batch(
            &sc,
            &[
                ("n1".into(), TTLS.retention),
                ("n1".into(), TTLS.retention),
                ("x".into(), TTLS.retention),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        marks.into_iter().map(Result::unwrap).collect::<Vec<_>>(),
        [true, false, false]
    );
    // Many keys in one batch land on many Cluster slots; every one is
    // acquired under its own lease. (Fences rise per key only: two keys may
    // share one, e.g. on two Cluster nodes in the same microsecond.)
    let many: Vec<ClaimItem> = (0..200).map(|i| item(&format!("many-{i}"))).collect();
    let out = s.claim_batch(&sc, &many, TTLS).await.unwrap();
    let leases: HashSet<LeaseId> = out
        .iter()
        .map(|o| match o.as_ref().unwrap() {
            ClaimOutcome::Acquired {
                lease_id,
                attempt: 1,
                ..
            } => *lease_id,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(leases.len(), 200);
}

pub async fn retention_bounds_completed_records<S: DedupStore>(s: &S) {
    let sc = scope("retention");
    let (lease, ..) = acquire(s, &sc, "r", &params(30_000, 5)).await;
    assert!(s
        .complete(&sc, "r", lease, None, Duration::from_millis(150))
        .await
        .unwrap());
    assert!(matches!(
        s.claim(&sc, "r", &params(30_000, 5), TTLS).await.unwrap(),
        ClaimOutcome::Completed { .. }
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, _, attempt, _) = acquire(s, &sc, "r", &params(30_000, 5)).await;
    assert_eq!(attempt, 1);
}

pub async fn fingerprints<S: DedupStore>(s: &S) {
    let sc = scope("fp");
    let mut p = params(30_000, 5);
    p.fingerprint = Some("v1".into());
    let (lease, ..) = acquire(s, &sc, "f", &p).await;
    let mut other = p.clone();
    other.fingerprint = Some("v2".into());
    assert_eq!(
        s.claim(&sc, "f", &other, TTLS).await.unwrap(),
        ClaimOutcome::Mismatch
    );
    assert!(s
        .complete(&sc, "f", lease, None, TTLS.retention)
        .await
        .unwrap());
    assert_eq!(
        s.claim(&sc, "f", &other, TTLS).await.unwrap(),
        ClaimOutcome::Mismatch
    );
    assert!(matches!(
        s.claim(&sc, "f", &p, TTLS).await.unwrap(),
        ClaimOutcome::Completed { .. }
    ));
}
