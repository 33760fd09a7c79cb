//! The store contract: one suite every backend must pass (memory, Redis,
//! Redis Cluster). Real time with short TTLs, so it runs the same on all.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use idemgate::idempotency::key::{Fingerprint, RecordKey};
use idemgate::idempotency::lease::LeaseId;
use idemgate::idempotency::rate::Rate;
use idemgate::idempotency::record::{CompletedRecord, StoredResponse};
use idemgate::idempotency::state::{
    Begin, BeginOptions, Lease, Resolution, State, Unknown, UnknownCause,
};
use idemgate::store::{BucketStore, RecordStore};
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
        origin: None,
        fingerprint: FP,
        created_unix_ms: 1_700_000_000_000,
        response: StoredResponse {
            status: StatusCode::CREATED,
            headers,
            body: Bytes::from_static(body.as_bytes()),
            body_omitted: false,
            trailers: http::HeaderMap::new(),
        },
    })
}

async fn acquire<S: RecordStore>(s: &S, k: &RecordKey, ttl: Duration) -> Lease {
    match s.begin(k, &FP, BeginOptions::lease(ttl)).await.unwrap() {
        Begin::Acquired(l) => l,
        other => panic!("expected to acquire, got {other:?}"),
    }
}

/// One `#[test]` per case of the record contract. `$setup` is an async fn
/// (a name in the test's module) taking the case's name and returning (a guard kept for the test, the
/// store). A third argument, `#[tokio::test(...)]`, picks the runtime the
/// cases run on (a multi-threaded one by default).
#[allow(unused_macros)] // each test binary uses a part of support
macro_rules! record_contract {
    ($name:ident, $setup:ident) => {
        $crate::support::contract::record_contract!(
            $name, $setup, #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        );
    };
    ($name:ident, $setup:ident, #[$test:meta]) => {
        $crate::support::contract::record_contract!(@cases $name, $setup, #[$test];
            begin_reports_holder_and_completion,
            only_the_current_token_acts,
            release_frees_the_key_with_a_higher_fence,
            expired_leases_are_taken_over_and_fences_keep_rising,
            records_expire_after_their_ttl,
            waiters_are_woken_by_completion,
            wait_returns_at_once_when_the_lease_is_gone,
            get_and_purge,
            the_store_answers_ping,
            an_unknown_outcome_keeps_its_fence_until_it_expires,
            only_the_current_lease_marks_an_outcome_unknown,
            a_lapsed_lease_is_held_as_unknown_or_taken_over,
            resolve_settles_only_the_named_unknown_record,
            one_caller_per_interval_reconciles,
            waiters_are_woken_when_the_outcome_becomes_unknown
        );
    };
    (@cases $name:ident, $setup:ident, #[$test:meta]; $($case:ident),*) => {
        mod $name {
            $(
                #[$test]
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

/// One `#[test]` per case of the fair-share bucket contract, as above.
#[allow(unused_macros)]
macro_rules! bucket_contract {
    ($name:ident, $setup:ident) => {
        $crate::support::contract::bucket_contract!(
            $name, $setup, #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        );
    };
    ($name:ident, $setup:ident, #[$test:meta]) => {
        $crate::support::contract::record_contract!(@cases $name, $setup, #[$test];
            a_bucket_admits_its_burst_then_says_how_long_to_wait,
            a_bucket_refills_at_its_rate,
            buckets_of_two_callers_are_apart
        );
    };
}
#[allow(unused_imports)]
pub(crate) use bucket_contract;

fn scope(tag: &str) -> RecordKey {
    RecordKey::derive_dedup("bucket", &format!("{tag}-{}", rand_suffix()))
}

pub async fn a_bucket_admits_its_burst_then_says_how_long_to_wait<S: BucketStore>(s: &S) {
    let k = scope("burst");
    let rate = Rate {
        per_second: 1.0,
        burst: 3.0,
    };
    for i in 0..3 {
        assert_eq!(s.admit(&k, rate).await.unwrap(), Ok(()), "token {i}");
    }
    match s.admit(&k, rate).await.unwrap() {
        Err(wait) => assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        ),
        Ok(()) => panic!("a fourth token out of a burst of three"),
    }
}

pub async fn a_bucket_refills_at_its_rate<S: BucketStore>(s: &S) {
    let k = scope("refill");
    let rate = Rate {
        per_second: 20.0,
        burst: 1.0,
    };
    assert_eq!(s.admit(&k, rate).await.unwrap(), Ok(()));
    let wait = s.admit(&k, rate).await.unwrap().unwrap_err();
    assert!(wait <= Duration::from_millis(50), "{wait:?}");
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(s.admit(&k, rate).await.unwrap(), Ok(()));
}

pub async fn buckets_of_two_callers_are_apart<S: BucketStore>(s: &S) {
    let (a, b) = (scope("a"), scope("b"));
    let rate = Rate {
        per_second: 0.1,
        burst: 1.0,
    };
    assert_eq!(s.admit(&a, rate).await.unwrap(), Ok(()));
    assert!(s.admit(&a, rate).await.unwrap().is_err());
    assert_eq!(s.admit(&b, rate).await.unwrap(), Ok(()));
}

pub async fn the_store_answers_ping<S: RecordStore>(s: &S) {
    s.ping().await.unwrap();
}

pub async fn begin_reports_holder_and_completion<S: RecordStore>(s: &S) {
    let k = key("begin");
    let lease = acquire(s, &k, LEASE).await;
    assert_eq!(
        s.begin(&k, &FP, BeginOptions::lease(LEASE)).await.unwrap(),
        Begin::InFlight {
            fingerprint: FP,
            fence: lease.fence
        }
    );
    // The holder's fingerprint is reported whatever the caller's.
    assert_eq!(
        s.begin(&k, &OTHER_FP, BeginOptions::lease(LEASE))
            .await
            .unwrap(),
        Begin::InFlight {
            fingerprint: FP,
            fence: lease.fence
        }
    );
    let rec = record(r#"{"id":1}"#);
    assert!(s.complete(&k, &lease, rec.clone(), LEASE).await.unwrap());
    match s.begin(&k, &FP, BeginOptions::lease(LEASE)).await.unwrap() {
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
        s.begin(&k2, &FP, BeginOptions::lease(LEASE)).await.unwrap(),
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
        s.begin(&k, &FP, BeginOptions::lease(LEASE)).await.unwrap(),
        Begin::Completed(_)
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(matches!(
        s.begin(&k, &FP, BeginOptions::lease(LEASE)).await.unwrap(),
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

/// Options of a route that holds unknown outcomes for `hold`.
fn holding(lease: Duration, hold: Duration) -> BeginOptions {
    BeginOptions {
        lease_ttl: lease,
        hold_lapsed: Some(hold),
        reconcile_every: None,
    }
}

async fn unknown_of<S: RecordStore>(s: &S, k: &RecordKey) -> Unknown {
    match s.get(k).await.unwrap().state {
        State::Unknown(u) => u,
        other => panic!("expected unknown, got {other:?}"),
    }
}

pub async fn an_unknown_outcome_keeps_its_fence_until_it_expires<S: RecordStore>(s: &S) {
    let k = key("unknown");
    let lease = acquire(s, &k, LEASE).await;
    assert!(s
        .mark_unknown(
            &k,
            &lease,
            UnknownCause::Timeout,
            Duration::from_millis(300)
        )
        .await
        .unwrap());
    let u = unknown_of(s, &k).await;
    assert_eq!(
        (u.fence, u.cause, u.fingerprint),
        (lease.fence, UnknownCause::Timeout, FP)
    );
    assert!(u.since_unix_ms > 1_700_000_000_000);
    // Whatever the asking route's policy: never run again, never replayed.
    for opts in [BeginOptions::lease(LEASE), holding(LEASE, LEASE)] {
        match s.begin(&k, &FP, opts).await.unwrap() {
            Begin::Unknown {
                unknown,
                reconcile: false,
                lapsed_now: false,
            } => assert_eq!(unknown.fence, lease.fence),
            other => panic!("expected unknown, got {other:?}"),
        }
    }
    // The lease is gone: its holder can do nothing more.
    assert!(!s.complete(&k, &lease, record("late"), LEASE).await.unwrap());
    assert!(!s.release(&k, &lease).await.unwrap());
    // It expires by itself; the next lease's fence is higher.
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(s.get(&k).await.unwrap().state, State::Absent);
    let next = acquire(s, &k, LEASE).await;
    assert!(next.fence > lease.fence);
}

pub async fn only_the_current_lease_marks_an_outcome_unknown<S: RecordStore>(s: &S) {
    let k = key("unknown-thief");
    let lease = acquire(s, &k, LEASE).await;
    let thief = Lease {
        token: LeaseId::random(),
        fence: lease.fence,
    };
    assert!(!s
        .mark_unknown(&k, &thief, UnknownCause::Reset, LEASE)
        .await
        .unwrap());
    assert!(matches!(
        s.get(&k).await.unwrap().state,
        State::InFlight { .. }
    ));
    assert!(s
        .mark_unknown(&k, &lease, UnknownCause::Status(504), LEASE)
        .await
        .unwrap());
    assert_eq!(unknown_of(s, &k).await.cause, UnknownCause::Status(504));
    // Marking twice is refused: the lease ended with the first.
    assert!(!s
        .mark_unknown(&k, &lease, UnknownCause::Reset, LEASE)
        .await
        .unwrap());
}

pub async fn a_lapsed_lease_is_held_as_unknown_or_taken_over<S: RecordStore>(s: &S) {
    let short = Duration::from_millis(100);
    let hold = holding(short, Duration::from_secs(30));
    let k = key("lapsed");
    let Begin::Acquired(dead) = s.begin(&k, &FP, hold).await.unwrap() else {
        panic!("expected to acquire")
    };
    // Live: in flight.
    assert!(matches!(
        s.begin(&k, &FP, hold).await.unwrap(),
        Begin::InFlight { .. }
    ));
    tokio::time::sleep(Duration::from_millis(250)).await;
    // Lapsed under a holding route: unknown, counted once by whoever saw it.
    match s.begin(&k, &FP, hold).await.unwrap() {
        Begin::Unknown {
            unknown,
            lapsed_now: true,
            ..
        } => {
            assert_eq!(unknown.cause, UnknownCause::Lapsed);
            assert_eq!(unknown.fence, dead.fence);
        }
        other => panic!("expected a lapsed unknown, got {other:?}"),
    }
    assert!(matches!(
        s.begin(&k, &FP, hold).await.unwrap(),
        Begin::Unknown {
            lapsed_now: false,
            ..
        }
    ));
    // The dead holder cannot come back and complete it.
    assert!(!s.complete(&k, &dead, record("late"), LEASE).await.unwrap());

    // Under a releasing route a lapsed lease is taken over, fence higher.
    let k = key("lapsed-release");
    let dead = acquire(s, &k, short).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    match s.begin(&k, &FP, BeginOptions::lease(LEASE)).await.unwrap() {
        Begin::Acquired(next) => assert!(next.fence > dead.fence),
        other => panic!("expected a takeover, got {other:?}"),
    }
}

pub async fn resolve_settles_only_the_named_unknown_record<S: RecordStore>(s: &S) {
    let k = key("resolve");
    let lease = acquire(s, &k, LEASE).await;
    // Not unknown yet: nothing to settle.
    assert!(!s
        .resolve(&k, lease.fence, Resolution::Release)
        .await
        .unwrap());
    assert!(s
        .mark_unknown(&k, &lease, UnknownCause::Timeout, LEASE)
        .await
        .unwrap());
    assert!(!s
        .resolve(&k, lease.fence + 1, Resolution::Release)
        .await
        .unwrap());
    let settled = record("settled");
    assert!(s
        .resolve(
            &k,
            lease.fence,
            Resolution::Completed(settled.clone(), LEASE)
        )
        .await
        .unwrap());
    match s.begin(&k, &FP, BeginOptions::lease(LEASE)).await.unwrap() {
        Begin::Completed(r) => assert_eq!(r, settled),
        other => panic!("expected the settled record, got {other:?}"),
    }
    assert!(!s
        .resolve(&k, lease.fence, Resolution::Release)
        .await
        .unwrap());

    // Released: the next request runs, with a higher fence.
    let k = key("resolve-release");
    let lease = acquire(s, &k, LEASE).await;
    assert!(s
        .mark_unknown(&k, &lease, UnknownCause::Reset, LEASE)
        .await
        .unwrap());
    assert!(s
        .resolve(&k, lease.fence, Resolution::Release)
        .await
        .unwrap());
    let next = acquire(s, &k, LEASE).await;
    assert!(next.fence > lease.fence);
}

pub async fn one_caller_per_interval_reconciles<S: RecordStore>(s: &S) {
    let k = key("reconcile");
    let lease = acquire(s, &k, LEASE).await;
    assert!(s
        .mark_unknown(&k, &lease, UnknownCause::Timeout, LEASE)
        .await
        .unwrap());
    let opts = BeginOptions {
        reconcile_every: Some(Duration::from_millis(300)),
        ..holding(LEASE, LEASE)
    };
    let reconciles = |b: Begin| match b {
        Begin::Unknown { reconcile, .. } => reconcile,
        other => panic!("expected unknown, got {other:?}"),
    };
    assert!(reconciles(s.begin(&k, &FP, opts).await.unwrap()));
    assert!(!reconciles(s.begin(&k, &FP, opts).await.unwrap()));
    assert!(!reconciles(s.begin(&k, &FP, opts).await.unwrap()));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(reconciles(s.begin(&k, &FP, opts).await.unwrap()));
    assert!(!reconciles(s.begin(&k, &FP, opts).await.unwrap()));
}

pub async fn waiters_are_woken_when_the_outcome_becomes_unknown<S: RecordStore + Clone>(s: &S) {
    let k = key("unknown-wait");
    let lease = acquire(s, &k, LEASE).await;
    let waiter = {
        let s = s.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            s.wait(&k, lease.fence, Instant::now() + Duration::from_secs(5))
                .await
                .unwrap();
            started.elapsed()
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(s
        .mark_unknown(&k, &lease, UnknownCause::Reset, LEASE)
        .await
        .unwrap());
    let waited = waiter.await.unwrap();
    assert!(waited < Duration::from_secs(3), "waited {waited:?}");
}
