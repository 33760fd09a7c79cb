//! The store contract: one suite every backend must pass (memory, Redis,
//! Redis Cluster). Real time with short TTLs, so it runs the same on all.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use idemgate::idempotency::key::{Fingerprint, RecordKey};
use idemgate::idempotency::lease::LeaseId;
use idemgate::idempotency::record::{CompletedRecord, StoredResponse};
use idemgate::idempotency::state::{Begin, Lease, State};
use idemgate::store::RecordStore;
use tokio::time::Instant;

fn key(tag: &str) -> RecordKey {
    // Unique per run so a shared Redis never sees an old record.
    RecordKey::derive_dedup("contract", &format!("{tag}-{}", rand_suffix()))
}

fn rand_suffix() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        ^ N.fetch_add(1, std::sync::atomic::Ordering::Relaxed) << 48
}

const FP: Fingerprint = Fingerprint([1; 32]);
const OTHER_FP: Fingerprint = Fingerprint([2; 32]);
const LEASE: Duration = Duration::from_secs(30);

pub fn record(body: &'static str) -> Arc<CompletedRecord> {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    headers.append("x-multi", HeaderValue::from_static("a"));
    headers.append("x-multi", HeaderValue::from_static("b"));
    Arc::new(CompletedRecord {
        fingerprint: FP,
        created_unix_ms: 1_700_000_000_000,
        response: StoredResponse {
            status: StatusCode::CREATED,
            headers,
            body: Bytes::from_static(body.as_bytes()),
            body_omitted: false,
        },
    })
}

async fn acquire<S: RecordStore>(s: &S, k: &RecordKey, ttl: Duration) -> Lease {
    match s.begin(k, &FP, ttl).await.unwrap() {
        Begin::Acquired(l) => l,
        other => panic!("expected to acquire, got {other:?}"),
    }
}

/// One `#[test]` per case of the record contract. `$setup` is an async fn
/// (a name in the test's module) taking the case's name and returning (a guard kept for the test, the
/// store).
#[allow(unused_macros)] // each test binary uses a part of support
macro_rules! record_contract {
    ($name:ident, $setup:ident) => {
        $crate::support::contract::record_contract!(@cases $name, $setup;
            begin_reports_holder_and_completion,
            only_the_current_token_acts,
            release_frees_the_key_with_a_higher_fence,
            expired_leases_are_taken_over_and_fences_keep_rising,
            records_expire_after_their_ttl,
            waiters_are_woken_by_completion,
            wait_returns_at_once_when_the_lease_is_gone,
            get_and_purge,
            the_store_answers_ping
        );
    };
    (@cases $name:ident, $setup:ident; $($case:ident),*) => {
        mod $name {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let (_guard, store) = super::$setup(stringify!($case)).await;
                    $crate::support::contract::$case(&store).await;
                }
            )*
        }
    };
}
#[allow(unused_imports)]
pub(crate) use record_contract;

pub async fn the_store_answers_ping<S: RecordStore>(s: &S) {
    s.ping().await.unwrap();
}

pub async fn begin_reports_holder_and_completion<S: RecordStore>(s: &S) {
    let k = key("begin");
    let lease = acquire(s, &k, LEASE).await;
    assert_eq!(
        s.begin(&k, &FP, LEASE).await.unwrap(),
        Begin::InFlight {
            fingerprint: FP,
            fence: lease.fence
        }
    );
    // The holder's fingerprint is reported whatever the caller's.
    assert_eq!(
        s.begin(&k, &OTHER_FP, LEASE).await.unwrap(),
        Begin::InFlight {
            fingerprint: FP,
            fence: lease.fence
        }
    );
    let rec = record(r#"{"id":1}"#);
    assert!(s.complete(&k, &lease, rec.clone(), LEASE).await.unwrap());
    match s.begin(&k, &FP, LEASE).await.unwrap() {
        Begin::Completed(got) => assert_eq!(*got, *rec),
        other => panic!("expected completed, got {other:?}"),
    }
}

pub async fn only_the_current_token_acts<S: RecordStore>(s: &S) {
    let k = key("token");
    let lease = acquire(s, &k, LEASE).await;
    let thief = Lease {
        token: LeaseId::from_u128(lease.token.as_u128() ^ 1),
        fence: lease.fence,
    };
    assert!(!s.renew(&k, &thief, LEASE).await.unwrap());
    assert!(!s.complete(&k, &thief, record("x"), LEASE).await.unwrap());
    assert!(!s.release(&k, &thief).await.unwrap());
    assert!(matches!(
        s.get(&k).await.unwrap().state,
        State::InFlight { .. }
    ));
    assert!(s.renew(&k, &lease, LEASE).await.unwrap());
    assert!(s.complete(&k, &lease, record("y"), LEASE).await.unwrap());
    // Once completed the lease is over: it can neither complete again nor
    // release (delete) the record.
    assert!(!s.complete(&k, &lease, record("z"), LEASE).await.unwrap());
    assert!(!s.release(&k, &lease).await.unwrap());
    assert!(!s.renew(&k, &lease, LEASE).await.unwrap());
    match s.get(&k).await.unwrap().state {
        State::Completed(r) => assert_eq!(r.response.body, "y"),
        other => panic!("expected completed, got {other:?}"),
    }
}

pub async fn release_frees_the_key_with_a_higher_fence<S: RecordStore>(s: &S) {
    let k = key("release");
    let first = acquire(s, &k, LEASE).await;
    assert!(s.release(&k, &first).await.unwrap());
    assert_eq!(s.get(&k).await.unwrap().state, State::Absent);
    let second = acquire(s, &k, LEASE).await;
    assert!(second.fence > first.fence);
    assert_ne!(second.token, first.token);
    // The old holder can't touch the new lease.
    assert!(!s.release(&k, &first).await.unwrap());
    assert!(!s.complete(&k, &first, record("late"), LEASE).await.unwrap());
    assert!(s.complete(&k, &second, record("ok"), LEASE).await.unwrap());
}

pub async fn expired_leases_are_taken_over_and_fences_keep_rising<S: RecordStore>(s: &S) {
    let k = key("expiry");
    let old = acquire(s, &k, Duration::from_millis(150)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let new = acquire(s, &k, LEASE).await;
    assert!(new.fence > old.fence, "fence must rise across expiry");
    assert!(!s.renew(&k, &old, LEASE).await.unwrap());
    assert!(!s.complete(&k, &old, record("stale"), LEASE).await.unwrap());
    assert!(!s.release(&k, &old).await.unwrap());
    // Renewal keeps a short lease alive past its first term.
    let k2 = key("renew");
    let lease = acquire(s, &k2, Duration::from_millis(300)).await;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(s
            .renew(&k2, &lease, Duration::from_millis(300))
            .await
            .unwrap());
    }
    assert!(matches!(
        s.begin(&k2, &FP, LEASE).await.unwrap(),
        Begin::InFlight { .. }
    ));
}

pub async fn records_expire_after_their_ttl<S: RecordStore>(s: &S) {
    let k = key("ttl");
    let lease = acquire(s, &k, LEASE).await;
    assert!(s
        .complete(&k, &lease, record("t"), Duration::from_millis(150))
        .await
        .unwrap());
    assert!(matches!(
        s.begin(&k, &FP, LEASE).await.unwrap(),
        Begin::Completed(_)
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(matches!(
        s.begin(&k, &FP, LEASE).await.unwrap(),
        Begin::Acquired(_)
    ));
}

pub async fn waiters_are_woken_by_completion<S: RecordStore + Clone>(s: &S) {
    let s = s.clone();
    let k = key("wait");
    let lease = acquire(&s, &k, LEASE).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let waiters: Vec<_> = (0..20)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move {
                s.wait(&k, lease.fence, deadline).await.unwrap();
                Instant::now()
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let completed_at = Instant::now();
    assert!(s.complete(&k, &lease, record("w"), LEASE).await.unwrap());
    for w in waiters {
        let woke = w.await.unwrap();
        assert!(
            woke >= completed_at,
            "a waiter returned before the completion"
        );
        // Woken by the completion, far before the 20 s deadline.
        assert!(
            woke < deadline - Duration::from_secs(15),
            "waiter was not woken"
        );
    }
}

pub async fn wait_returns_at_once_when_the_lease_is_gone<S: RecordStore>(s: &S) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let started = Instant::now();
    s.wait(&key("absent"), 1, deadline).await.unwrap();
    let k = key("other-fence");
    let lease = acquire(s, &k, LEASE).await;
    s.wait(&k, lease.fence + 1, deadline).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
}

pub async fn get_and_purge<S: RecordStore>(s: &S) {
    let k = key("purge");
    assert_eq!(s.get(&k).await.unwrap().state, State::Absent);
    assert!(!s.purge(&k).await.unwrap());
    let lease = acquire(s, &k, LEASE).await;
    assert!(
        matches!(s.get(&k).await.unwrap().state, State::InFlight { lease: l, .. } if l == lease)
    );
    assert!(s.purge(&k).await.unwrap());
    assert_eq!(s.get(&k).await.unwrap().state, State::Absent);
    assert!(!s.complete(&k, &lease, record("gone"), LEASE).await.unwrap());
}
