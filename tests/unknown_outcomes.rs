//! Unknown outcomes, end to end on real sockets: a request the upstream may
//! have processed (timeout, reset after reading, a gateway status) is never
//! run again blindly. Under `hold` duplicates get 409 `outcome-unknown` and
//! the upstream is not called; under `release` the retry runs (with a
//! higher fence); under `reconcile` idemgate asks the upstream. A request
//! that was never sent (connect refused) frees the key. The core cases run
//! on memory, Redis, Redis Cluster and PostgreSQL.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idemgate::server::Running;
use support::ledger::Ledger;
use support::postgres_server::{self, shared_postgres, PostgresServer};
use support::redis_server::{shared_cluster, shared_server, store_toml, RedisCluster, RedisServer};
use support::{config, Got, TestClient};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

/// idemgate in front of `upstream` with `store` and route lines `route`
/// (under `[idempotency]`), a short upstream timeout.
async fn idemgate(upstream: &str, store: &str, route: &str) -> (Running, TestClient) {
    let toml = format!("upstream_timeout = \"300ms\"\n{store}\n[idempotency]\n{route}");
    let r = Running::start(config(Some(upstream), &toml)).await.unwrap();
    let c = TestClient::new(r.proxy_addr.unwrap());
    (r, c)
}

async fn charge(c: &TestClient, key: &str, extra: &[(&str, &str)]) -> Got {
    let mut headers = vec![
        ("idempotency-key", key),
        ("content-type", "application/json"),
    ];
    headers.extend_from_slice(extra);
    c.send("POST", "/v1/charges", &headers, "{\"amount\":100}")
        .await
}

fn count(r: &Running, cause: &str, resolution: &str) -> u64 {
    r.metrics
        .unknown_outcomes
        .with_label_values(&[cause, resolution])
        .get()
}

/// The record as `GET /v1/keys` shows it.
async fn inspect(r: &Running, key: &str) -> serde_json::Value {
    support::charge_record(r.admin_addr, key).await.json()
}

/// The store section for each backend; the guard keeps its servers up.
async fn memory() -> ((), String) {
    ((), String::new())
}

async fn redis() -> (Arc<RedisServer>, String) {
    let r = shared_server();
    let toml = store_toml(&r.url());
    (r, toml)
}

/// A schema of its own on the shared server: cases reuse key names.
async fn postgres() -> (Arc<PostgresServer>, String) {
    let pg = shared_postgres();
    let toml = postgres_server::store_toml(&pg.url(), &postgres_server::schema("unknown"));
    (pg, toml)
}

async fn cluster() -> (Arc<RedisCluster>, String) {
    let c = shared_cluster();
    let urls: Vec<String> = c.urls().iter().map(|u| format!("\"{u}\"")).collect();
    let toml = format!(
        "[store]\nbackend = \"redis-cluster\"\nurls = [{}]\n",
        urls.join(", ")
    );
    (c, toml)
}

/// An upstream that reads each request whole, then resets the connection
/// without answering; counts what it read.
async fn resetting_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let read = Arc::new(AtomicUsize::new(0));
    let r = read.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let r = r.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                r.fetch_add(1, Ordering::SeqCst);
                // Zero linger: the close sends RST.
                #[allow(deprecated)]
                let _ = s.set_linger(Some(Duration::ZERO));
            });
        }
    });
    (addr, read)
}

async fn timeout_holds_the_key(store: &str) {
    let ledger = Ledger::start().await;
    let (r, c) = idemgate(&ledger.url(), store, "").await;
    charge(&c, "slow", &[("x-delay-ms", "800")])
        .await
        .assert_problem(504, "upstream-timeout");
    // The charge went through upstream after all.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(ledger.charges(), 1);
    let retry = charge(&c, "slow", &[]).await;
    retry.assert_problem(409, "outcome-unknown");
    assert!(
        retry.json()["detail"]
            .as_str()
            .unwrap()
            .contains("may have been processed"),
        "{:?}",
        retry.body
    );
    assert_eq!(ledger.calls(), 1, "a held key never reaches the upstream");
    let doc = inspect(&r, "slow").await;
    assert_eq!(doc["state"], "unknown", "{doc}");
    assert_eq!(doc["cause"], "timeout");
    assert_eq!(count(&r, "timeout", "held"), 1);
    assert_eq!(
        r.metrics
            .requests
            .with_label_values(&["outcome_unknown"])
            .get(),
        1
    );
    r.stop().await;
}

async fn reset_after_reading_holds_the_key(store: &str) {
    let (addr, read) = resetting_upstream().await;
    let (r, c) = idemgate(&format!("http://{addr}"), store, "").await;
    charge(&c, "reset", &[])
        .await
        .assert_problem(502, "upstream-unreachable");
    charge(&c, "reset", &[])
        .await
        .assert_problem(409, "outcome-unknown");
    assert_eq!(read.load(Ordering::SeqCst), 1);
    assert_eq!(inspect(&r, "reset").await["cause"], "reset");
    assert_eq!(count(&r, "reset", "held"), 1);
    r.stop().await;
}

async fn a_gateway_status_holds_the_key(store: &str) {
    let ledger = Ledger::start().await;
    let (r, c) = idemgate(&ledger.url(), store, "").await;
    // The client gets the upstream's own 504; the key is held.
    let first = charge(&c, "gw", &[("x-status", "504")]).await;
    assert_eq!(first.status, 504);
    assert_eq!(first.json()["charged"], "gw");
    charge(&c, "gw", &[])
        .await
        .assert_problem(409, "outcome-unknown");
    assert_eq!(inspect(&r, "gw").await["cause"], "status 504");
    // 503 is uncacheable but not a sign of work done: released, rerun.
    assert_eq!(charge(&c, "busy", &[("x-status", "503")]).await.status, 503);
    assert_eq!(charge(&c, "busy", &[]).await.status, 201);
    assert_eq!(ledger.calls(), 3);
    r.stop().await;
}

async fn reconcile_finds_what_ran(store: &str) {
    let ledger = Ledger::start().await;
    let (r, c) = idemgate(&ledger.url(), store, &ledger.reconcile_toml("10s")).await;
    charge(&c, "rec", &[("x-delay-ms", "800")])
        .await
        .assert_problem(504, "upstream-timeout");
    let found = charge(&c, "rec", &[]).await;
    assert_eq!(found.status, 201, "{:?}", found.body);
    assert_eq!(found.header("idempotent-replayed"), Some("true"));
    assert_eq!(found.header("idempotent-reconciled"), Some("true"));
    assert_eq!(found.json()["charged"], "rec");
    assert_eq!(ledger.asks(), 1);
    let (fence, key) = ledger.asked_with()[0].clone();
    assert_eq!(key.as_deref(), Some("rec"));
    assert!(fence.is_some_and(|f| f.parse::<u64>().unwrap() > 0));
    // Settled: later duplicates replay it without asking.
    let again = charge(&c, "rec", &[]).await;
    assert_eq!(again.body, found.body);
    assert_eq!(ledger.asks(), 1);
    assert_eq!(ledger.calls(), 1, "the side effect ran once");
    assert_eq!(count(&r, "timeout", "reconciled_found"), 1);
    r.stop().await;
}

macro_rules! on_each_store {
    ($($case:ident),*) => {
        mod on_memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let (_guard, store) = super::memory().await;
                    super::$case(&store).await;
                }
            )*
        }
        mod on_redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let (_guard, store) = super::redis().await;
                    super::$case(&store).await;
                }
            )*
        }
        mod on_cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let (_guard, store) = super::cluster().await;
                    super::$case(&store).await;
                }
            )*
        }
        mod on_postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let (_guard, store) = super::postgres().await;
                    super::$case(&store).await;
                }
            )*
        }
    };
}

on_each_store!(
    timeout_holds_the_key,
    reset_after_reading_holds_the_key,
    a_gateway_status_holds_the_key,
    reconcile_finds_what_ran
);

#[tokio::test]
async fn release_runs_the_retry_with_a_higher_fence() {
    let ledger = Ledger::start().await;
    let (r, c) = idemgate(&ledger.url(), "", "on_unknown_outcome = \"release\"\n").await;
    charge(&c, "again", &[("x-delay-ms", "800")])
        .await
        .assert_problem(504, "upstream-timeout");
    let retry = charge(&c, "again", &[]).await;
    assert_eq!(retry.status, 201);
    assert_eq!(ledger.calls(), 2, "release: may run twice");
    let fences = ledger.fences();
    assert!(
        fences.len() == 2 && fences[1] > fences[0],
        "the rerun carries a higher fence: {fences:?}"
    );
    assert_eq!(count(&r, "timeout", "released"), 1);
    r.stop().await;
}

#[tokio::test]
async fn a_request_never_sent_frees_the_key() {
    // A port nothing listens on: bind one, note it, close it.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (r, c) = idemgate(&format!("http://{addr}"), "", "").await;
    charge(&c, "refused", &[])
        .await
        .assert_problem(502, "upstream-unreachable");
    // The upstream comes up; the retry runs.
    let ledger = Ledger::start_on(addr).await;
    assert_eq!(charge(&c, "refused", &[]).await.status, 201);
    assert_eq!(ledger.calls(), 1);
    assert_eq!(count(&r, "reset", "held") + count(&r, "timeout", "held"), 0);
    r.stop().await;
}

#[tokio::test]
async fn reconcile_runs_what_did_not_run() {
    let ledger = Ledger::start().await;
    let (r, c) = idemgate(&ledger.url(), "", &ledger.reconcile_toml("10s")).await;
    charge(&c, "lost", &[("x-delay-ms", "800"), ("x-commit", "no")])
        .await
        .assert_problem(504, "upstream-timeout");
    let ran = charge(&c, "lost", &[]).await;
    assert_eq!(ran.status, 201);
    assert!(ran.header("idempotent-replayed").is_none());
    assert_eq!(ledger.asks(), 1);
    assert_eq!(ledger.calls(), 2);
    assert_eq!(count(&r, "timeout", "reconciled_missing"), 1);
    r.stop().await;
}

#[tokio::test]
async fn an_unanswered_question_is_asked_again_after_the_interval_not_before() {
    let ledger = Ledger::start().await;
    ledger.set_down(true);
    let (r, c) = idemgate(&ledger.url(), "", &ledger.reconcile_toml("600ms")).await;
    charge(&c, "down", &[("x-delay-ms", "800")])
        .await
        .assert_problem(504, "upstream-timeout");
    charge(&c, "down", &[])
        .await
        .assert_problem(409, "outcome-unknown");
    assert_eq!(ledger.asks(), 1);
    for _ in 0..3 {
        charge(&c, "down", &[])
            .await
            .assert_problem(409, "outcome-unknown");
    }
    assert_eq!(ledger.asks(), 1, "not asked again within the interval");
    tokio::time::sleep(Duration::from_millis(700)).await;
    charge(&c, "down", &[])
        .await
        .assert_problem(409, "outcome-unknown");
    assert_eq!(ledger.asks(), 2, "asked again after the interval");
    assert_eq!(count(&r, "timeout", "reconcile_failed"), 2);
    // Up again: the next question after the interval settles it.
    ledger.set_down(false);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let found = charge(&c, "down", &[]).await;
    assert_eq!(found.status, 201);
    assert_eq!(found.header("idempotent-reconciled"), Some("true"));
    assert_eq!(ledger.calls(), 1);
    r.stop().await;
}

#[tokio::test]
async fn an_operator_settles_or_releases_an_unknown_outcome() {
    let ledger = Ledger::start().await;
    let (r, c) = idemgate(&ledger.url(), "", "").await;
    let admin = TestClient::new(r.admin_addr);
    let keys = |key: &str| format!("/v1/keys?key={key}&path=/v1/charges");
    let put = |key: &'static str, body: &'static str| {
        let admin = admin.clone();
        let path = keys(key);
        async move { admin.send("PUT", &path, &[], body).await }
    };
    for k in ["settle", "release"] {
        charge(&c, k, &[("x-delay-ms", "800")])
            .await
            .assert_problem(504, "upstream-timeout");
    }
    // Bad input: named, nothing changed.
    put("settle", "not json")
        .await
        .assert_problem(422, "invalid-field");
    let missing_status = put("settle", "{\"body\": \"x\"}").await;
    missing_status.assert_problem(422, "invalid-field");
    assert_eq!(missing_status.json()["field"], "status");
    put("never-seen", "{\"status\": 201}")
        .await
        .assert_problem(404, "not-found");
    admin
        .send("PUT", "/v1/keys?path=/v1/charges", &[], "{\"status\": 201}")
        .await
        .assert_problem(400, "bad-request");
    assert_eq!(inspect(&r, "settle").await["state"], "unknown");

    // Settled as completed: duplicates replay the operator's answer.
    let settled = put(
        "settle",
        "{\"status\": 201, \"headers\": {\"content-type\": \"application/json\"}, \"body\": \"{\\\"checked\\\":true}\"}",
    )
    .await;
    assert_eq!(settled.status, 200, "{:?}", settled.body);
    let replay = charge(&c, "settle", &[]).await;
    assert_eq!(replay.status, 201);
    assert_eq!(&replay.body[..], b"{\"checked\":true}");
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    // A completed record is not unknown: refused.
    put("settle", "{\"status\": 200}")
        .await
        .assert_problem(409, "not-unknown");

    // Released: the next request runs.
    let deleted = admin.send("DELETE", &keys("release"), &[], "").await;
    assert_eq!(deleted.status, 204);
    assert_eq!(charge(&c, "release", &[]).await.status, 201);
    assert_eq!(ledger.calls(), 3);
    assert_eq!(count(&r, "timeout", "settled_by_admin"), 2);
    r.stop().await;
}

/// `min_replicas = 1` with a real replica: leases and records are
/// acknowledged; with the replica paused (SIGSTOP) a begin is refused with
/// 503 within `replica_ack_timeout` + `store.timeout` and the upstream is
/// not called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_leases_wait_for_a_replica_and_refuse_without_one() {
    durable_leases("").await;
}

/// The same through event loops, whose calls go on connections of their
/// own: `WAIT` must ask about the connection that wrote (on one that did
/// not, it would answer at once that the replica has everything).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_leases_wait_for_a_replica_on_the_connection_that_wrote() {
    durable_leases("event_loops = 2\n").await;
}

async fn durable_leases(top: &str) {
    let primary = RedisServer::start();
    let port = primary.port.to_string();
    let replica = RedisServer::start_with(
        support::redis_server::free_port(false),
        &["--replicaof", "127.0.0.1", &port],
    );
    // Wait for the link: a write on the primary acknowledged by one replica.
    let linked = (0..100).any(|_| {
        primary.cli(&["SET", "probe", "1"]);
        let acked = primary
            .cli(&["WAIT", "1", "100"])
            .and_then(|o| o.trim().parse::<i64>().ok());
        acked == Some(1) || {
            std::thread::sleep(Duration::from_millis(50));
            false
        }
    });
    assert!(linked, "the replica never linked");
    let ledger = Ledger::start().await;
    let store = format!(
        "{top}{}min_replicas = 1\nreplica_ack_timeout = \"100ms\"\n",
        store_toml(&primary.url())
    );
    let (r, c) = idemgate(&ledger.url(), &store, "").await;
    assert_eq!(charge(&c, "durable", &[]).await.status, 201);
    let replay = charge(&c, "durable", &[]).await;
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    // Time for a loop to open its own connection (none opens without loops).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let clients = primary.cli(&["CLIENT", "LIST"]).unwrap_or_default();
    let resp3 = clients.lines().filter(|l| l.contains(" resp=3")).count();
    assert_eq!(resp3, if top.is_empty() { 1 } else { 2 }, "{clients}");
    // The record reached the replica.
    assert!(replica
        .cli(&["DBSIZE"])
        .is_some_and(|n| n.trim().parse::<u64>().unwrap_or(0) >= 1));

    replica.pause(true);
    let started = std::time::Instant::now();
    let refused = charge(&c, "not-durable", &[]).await;
    let took = started.elapsed();
    refused.assert_problem(503, "store-unavailable");
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    assert_eq!(ledger.calls(), 1, "the upstream was not called");
    assert_eq!(
        r.metrics
            .replica_ack_failures
            .with_label_values(&["begin"])
            .get(),
        1
    );
    // The refused lease was undone: with the replica back, the key runs.
    replica.pause(false);
    assert_eq!(charge(&c, "not-durable", &[]).await.status, 201);
    assert_eq!(ledger.calls(), 2);
    r.stop().await;
}
