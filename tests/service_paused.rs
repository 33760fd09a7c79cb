//! The idempotency Service driven with `oneshot` under tokio's paused clock:
//! lease renewal (also once the caller has gone, or while it does not read
//! its body), wait timeouts and takeover of a lapsed lease, with minutes of
//! virtual time passing instantly.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use idemgate::body::full;
use idemgate::config::{FileConfig, OnStoreError, RunArgs};
use idemgate::error::UpstreamError;
use idemgate::idempotency::key::{Fingerprint, RecordKey};
use idemgate::idempotency::state::BeginOptions;
use idemgate::proxy::{Idempotency, Routing, Settings, Tunnels, Upstream};
use idemgate::store::memory::MemoryStore;
use idemgate::store::{RecordStore, Store};
use idemgate::Body;
use tokio_util::task::TaskTracker;
use tower::{Service, ServiceExt};

/// An upstream that counts calls and answers "call N" after `delay` of
/// (virtual) time, or, `head_first`, sends its head at once and that body
/// after `delay`.
#[derive(Clone)]
struct Counting {
    calls: Arc<AtomicUsize>,
    delay: Duration,
    head_first: bool,
}

impl Service<Request<Body>> for Counting {
    type Response = Response<Body>;
    type Error = UpstreamError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, UpstreamError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), UpstreamError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<Body>) -> Self::Future {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let delay = self.delay;
        let body = async move {
            tokio::time::sleep(delay).await;
            Bytes::from(format!("call {n}"))
        };
        if self.head_first {
            let later = futures_util::stream::once(async move {
                Ok::<_, idemgate::BoxError>(Frame::data(body.await))
            });
            Box::pin(async move { Ok(Response::new(StreamBody::new(later).boxed())) })
        } else {
            Box::pin(async move { Ok(Response::new(full(body.await))) })
        }
    }
}

fn policies(idempotency: &str) -> idemgate::config::Policies {
    let file = FileConfig::parse(&format!("[idempotency]\n{idempotency}")).unwrap();
    idemgate::config::Config::from_parts(file, &RunArgs::default())
        .unwrap()
        .policies
}

fn settings() -> Settings {
    let metrics = idemgate::metrics::Metrics::standalone();
    Settings {
        on_store_error: OnStoreError::Reject,
        body_read_timeout: Duration::from_secs(600),
        store_timeout: Duration::from_secs(1),
        tasks: TaskTracker::new(),
        tunnels: Tunnels::new(metrics.open_tunnels.clone()),
        metrics,
    }
}

fn request(key: &str) -> Request<Full<Bytes>> {
    Request::post("/v1/charges")
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap()
}

async fn body(resp: Response<Body>) -> String {
    String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap()
}

type Svc = Idempotency;

fn service(store: &Store, idempotency: &str, calls: Arc<AtomicUsize>, delay: Duration) -> Svc {
    let upstream = Upstream::from_service(
        Counting {
            calls,
            delay,
            head_first: false,
        },
        Duration::from_secs(600),
    );
    service_on(store, idempotency, upstream)
}

fn service_on(store: &Store, idempotency: &str, upstream: Upstream) -> Svc {
    let routing = Routing::single(policies(idempotency), upstream);
    Idempotency::new(
        store.clone(),
        settings(),
        Arc::new(arc_swap::ArcSwap::from_pointee(routing)),
    )
}

async fn call(svc: &Svc, key: &str) -> Result<Response<Body>, Infallible> {
    svc.clone().oneshot(request(key)).await
}

#[tokio::test(start_paused = true)]
async fn lease_renewal_keeps_a_long_call_exclusive() {
    a_long_call_stays_exclusive(false).await;
}

#[tokio::test(start_paused = true)]
async fn a_caller_gone_before_the_head_leaves_its_call_renewed_and_stored() {
    a_long_call_stays_exclusive(true).await;
}

/// The call takes 10 s; the lease is 3 s and must be renewed three times,
/// whether its caller waits for it or goes away after 1 s: a duplicate past
/// the first lease term (which would run it again without renewal) gets
/// its stored answer.
async fn a_long_call_stays_exclusive(caller_leaves: bool) {
    let store = Store::new(MemoryStore::new(100));
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = service(
        &store,
        "lease_ttl = \"3s\"\nwait_timeout = \"20s\"",
        calls.clone(),
        Duration::from_secs(10),
    );
    let s1 = svc.clone();
    let first = tokio::spawn(async move { call(&s1, "long").await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let first = if caller_leaves {
        first.abort();
        assert!(first.await.unwrap_err().is_cancelled());
        None
    } else {
        Some(first)
    };
    tokio::time::sleep(Duration::from_secs(4)).await;
    let dup = call(&svc, "long").await.unwrap();
    assert_eq!(dup.headers().get("idempotent-replayed").unwrap(), "true");
    assert_eq!(body(dup).await, "call 1");
    if let Some(first) = first {
        assert_eq!(body(first.await.unwrap().unwrap()).await, "call 1");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_caller_that_does_not_read_its_body_holds_up_neither_renewal_nor_joiners() {
    let store = Store::new(MemoryStore::new(100));
    let calls = Arc::new(AtomicUsize::new(0));
    let upstream = Upstream::from_service(
        Counting {
            calls: calls.clone(),
            delay: Duration::from_secs(10),
            head_first: true,
        },
        Duration::from_secs(600),
    );
    let svc = service_on(
        &store,
        "lease_ttl = \"3s\"\nwait_timeout = \"20s\"",
        upstream,
    );
    // The head comes at once; its body is never read.
    let unread = call(&svc, "trickle").await.unwrap();
    assert_eq!(unread.status(), 200);
    tokio::time::sleep(Duration::from_secs(5)).await;
    // A duplicate past the first lease term joins the running call and
    // reads its body when the upstream sends it.
    let joined = call(&svc, "trickle").await.unwrap();
    let started = tokio::time::Instant::now();
    assert_eq!(body(joined).await, "call 1");
    assert!(
        started.elapsed() <= Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    // And the record was stored meanwhile.
    let replay = call(&svc, "trickle").await.unwrap();
    assert_eq!(replay.headers().get("idempotent-replayed").unwrap(), "true");
    assert_eq!(body(replay).await, "call 1");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(body(unread).await, "call 1");
}

#[tokio::test(start_paused = true)]
async fn a_waiting_duplicate_gives_up_at_wait_timeout() {
    let store = Store::new(MemoryStore::new(100));
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = service(
        &store,
        "wait_timeout = \"10s\"",
        calls.clone(),
        Duration::from_secs(60),
    );
    let s1 = svc.clone();
    let first = tokio::spawn(async move { call(&s1, "slow").await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = tokio::time::Instant::now();
    let dup = call(&svc, "slow").await.unwrap();
    assert_eq!(dup.status(), 409);
    assert_eq!(dup.headers().get("retry-after").unwrap(), "1");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(10) && waited < Duration::from_secs(11),
        "{waited:?}"
    );
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_lapsed_lease_of_a_dead_holder_is_taken_over() {
    let memory = MemoryStore::new(100);
    let store = Store::new(memory.clone());
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = service(
        &store,
        "lease_ttl = \"30s\"\nwait_timeout = \"60s\"",
        calls.clone(),
        Duration::from_millis(10),
    );
    // A holder that took the lease and died (never renews or completes).
    let req = request("orphan");
    let rk = RecordKey::derive(
        req.headers(),
        &[http::header::AUTHORIZATION],
        req.method(),
        "/v1/charges",
        "orphan",
    );
    let fp = Fingerprint::compute(
        req.method(),
        "/v1/charges",
        req.headers(),
        &[http::header::CONTENT_TYPE],
        b"{}",
    );
    memory
        .begin(&rk, &fp, BeginOptions::lease(Duration::from_secs(30)))
        .await
        .unwrap();
    // A duplicate waits for the lease to lapse, then runs itself.
    let started = tokio::time::Instant::now();
    let resp = call(&svc, "orphan").await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("idempotent-replayed").is_none());
    assert!(started.elapsed() >= Duration::from_secs(30));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// Another intake (a broker consumer, say) builds its request in code and
/// runs it through the covered path with `Idempotency::covered`: the key it
/// found itself, run once, replayed after, a different request refused.
#[tokio::test(start_paused = true)]
async fn a_request_built_in_code_runs_once_through_the_covered_path() {
    use idemgate::error::ProxyError;
    use idemgate::metrics::Outcome;
    use idemgate::proxy::{Covered, FoundKey, Reply};

    let store = Store::new(MemoryStore::new(100));
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = service(&store, "", calls.clone(), Duration::from_millis(10));
    let policy = policies("").default;
    let upstream = Upstream::from_service(
        Counting {
            calls: calls.clone(),
            delay: Duration::from_millis(10),
            head_first: false,
        },
        Duration::from_secs(600),
    );
    let covered = |body: &'static str| {
        let (parts, ()) = Request::post("/deliver")
            .header("content-type", "application/json")
            .body(())
            .unwrap()
            .into_parts();
        let key = FoundKey::from_text("msg-42".into()).unwrap();
        Covered::new(
            parts,
            Bytes::from_static(body.as_bytes()),
            policy.clone(),
            upstream.clone(),
            key,
        )
    };
    let first = svc.covered(covered("{\"n\":1}")).await;
    assert_eq!(first.outcome, Outcome::Forwarded);
    let again = svc.covered(covered("{\"n\":1}")).await;
    assert_eq!(again.outcome, Outcome::Replayed);
    assert_eq!(again.record, first.record);
    let Reply::Response(replayed) = again.reply else {
        panic!("a replay is a response");
    };
    assert_eq!(body(replayed).await, "call 1");
    // The same key with another body: refused, as a typed error the
    // caller can act on.
    let other = svc.covered(covered("{\"n\":2}")).await;
    assert!(matches!(
        other.reply,
        Reply::Refused(ProxyError::KeyReused, _)
    ));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}
