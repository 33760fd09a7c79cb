//! Faults with real processes: a lease holder killed mid-request, Redis
//! restarted under load, Redis paused, an upstream that resets mid-response,
//! and a fault-injecting proxy in front of both the store (Redis, and
//! PostgreSQL) and the upstream.
//! Every request must end within its deadline with a defined status, and a
//! key whose response was stored must never run again.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idemgate::server::Running;
use support::faults::{Fault, FaultProxy};
use support::ledger::Ledger;
use support::postgres_server::{self, PostgresServer};
use support::proc::Proc;
use support::redis_server::RedisServer;
use support::{config, TestClient, TestUpstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn redis_toml(url: &str, extra: &str) -> String {
    format!("{}{extra}", support::redis_server::store_toml(url))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_lease_holder_is_taken_over_once_its_lease_lapses_under_release() {
    let redis = RedisServer::start();
    let up = TestUpstream::start().await;
    let file = std::env::temp_dir().join(format!("idemgate-faults-{}.toml", std::process::id()));
    std::fs::write(
        &file,
        "[idempotency]\nlease_ttl = \"1s\"\nwait_timeout = \"10s\"\non_unknown_outcome = \"release\"\n",
    )
    .unwrap();
    let args = ["--redis", &redis.url(), "--config", file.to_str().unwrap()];
    let a = Proc::start(&up.url(), &args, &[]).await;
    let b = Proc::start(&up.url(), &args, &[]).await;
    let headers = [("idempotency-key", "charge-1"), ("x-delay-ms", "2000")];
    let ca = TestClient::new(a.proxy);
    let first = tokio::spawn(async move { ca.send("POST", "/v1/charges", &headers, "{}").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(up.calls(), 1);
    let mut a = a;
    a.child.kill().unwrap(); // SIGKILL: no drain, no release
    a.child.wait().unwrap();
    drop(first); // its connection just died
                 // The retry through B waits for A's lease to lapse (it is no longer
                 // renewed), then takes it over and runs.
    let started = Instant::now();
    let retry = TestClient::new(b.proxy)
        .send("POST", "/v1/charges", &headers, "{}")
        .await;
    assert_eq!(retry.status, 201, "{:?}", retry.body);
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "the retry took {:?}",
        started.elapsed()
    );
    assert_eq!(
        up.calls(),
        2,
        "at most twice: the killed holder's call and the takeover"
    );
    let fences: Vec<u64> = up
        .seen()
        .iter()
        .map(|s| {
            s.headers["idempotency-fence"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert!(
        fences[1] > fences[0],
        "the takeover carries a higher fence: {fences:?}"
    );
    // From now on it is stored: replays only.
    let again = TestClient::new(b.proxy)
        .send("POST", "/v1/charges", &headers, "{}")
        .await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(up.calls(), 2);
    b.signal("-TERM");
    let _ = tokio::task::spawn_blocking(move || b.finish()).await;
    let _ = std::fs::remove_file(file);
}

/// A holder SIGKILLed after it forwarded: under `hold` the retry through
/// another replica gets `outcome-unknown` once the lease lapses (never a
/// second charge); under `reconcile` the upstream is asked and its answer
/// replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_lease_holder_leaves_an_unknown_outcome_not_a_second_charge() {
    let redis = RedisServer::start();
    let ledger = Ledger::start().await;
    for (policy, tag) in [
        (String::new(), "hold"),
        (ledger.reconcile_toml("10s"), "reconcile"),
    ] {
        let file =
            std::env::temp_dir().join(format!("idemgate-faults-{tag}-{}.toml", std::process::id()));
        std::fs::write(
            &file,
            format!("[idempotency]\nlease_ttl = \"1s\"\nwait_timeout = \"10s\"\n{policy}"),
        )
        .unwrap();
        let args = ["--redis", &redis.url(), "--config", file.to_str().unwrap()];
        let a = Proc::start(&ledger.url(), &args, &[]).await;
        let b = Proc::start(&ledger.url(), &args, &[]).await;
        let calls = ledger.calls();
        let key = format!("killed-{tag}");
        let headers = [("idempotency-key", key.as_str()), ("x-delay-ms", "3000")];
        let ca = TestClient::new(a.proxy);
        let h = headers.map(|(k, v)| (k, v.to_owned()));
        let first = tokio::spawn(async move {
            let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            ca.send("POST", "/v1/charges", &h, "{}").await
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(ledger.calls(), calls + 1);
        let mut a = a;
        a.child.kill().unwrap(); // SIGKILL after it forwarded
        a.child.wait().unwrap();
        drop(first);
        let retry = TestClient::new(b.proxy)
            .send(
                "POST",
                "/v1/charges",
                &[("idempotency-key", key.as_str())],
                "{}",
            )
            .await;
        if tag == "hold" {
            retry.assert_problem(409, "outcome-unknown");
        } else {
            assert_eq!(retry.status, 201, "{:?}", retry.body);
            assert_eq!(retry.header("idempotent-reconciled"), Some("true"));
            assert_eq!(ledger.asks(), 1);
        }
        assert_eq!(ledger.calls(), calls + 1, "{tag}: the charge ran once");
        b.signal("-TERM");
        let _ = tokio::task::spawn_blocking(move || b.finish()).await;
        let _ = std::fs::remove_file(file);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_under_load_never_hangs_a_request() {
    let mut redis = RedisServer::start();
    let up = TestUpstream::start().await;
    let idg = Running::start(config(Some(&up.url()), &redis_toml(&redis.url(), "")))
        .await
        .unwrap();
    let client = TestClient::new(idg.proxy_addr.unwrap());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let n = Arc::new(AtomicUsize::new(0));
    let loads: Vec<_> = (0..8)
        .map(|w| {
            let (c, stop, n) = (client.clone(), stop.clone(), n.clone());
            tokio::spawn(async move {
                let mut statuses = HashMap::new();
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("load-{w}-{}", n.fetch_add(1, Ordering::Relaxed));
                    let started = Instant::now();
                    let headers = [
                        ("idempotency-key", key.as_str()),
                        ("content-type", "application/json"),
                    ];
                    let got = tokio::time::timeout(
                        Duration::from_secs(5),
                        c.try_send("POST", "/v1/x", &headers, "{}"),
                    )
                    .await
                    .expect("a request hung while Redis restarted");
                    assert!(
                        started.elapsed() < Duration::from_secs(3),
                        "{:?}",
                        started.elapsed()
                    );
                    // A response whose record Redis did not take (it died
                    // at the completion) is never ended as if complete:
                    // aborted (0 here) once its head went out, else (this
                    // upstream's small body comes whole, so its head waits
                    // for the record) a 502 that says so.
                    let status = got.map_or(0, |g| {
                        if g.status == 502 {
                            g.assert_problem(502, "response-not-stored");
                        }
                        g.status.as_u16()
                    });
                    *statuses.entry(status).or_insert(0) += 1;
                }
                statuses
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut redis = tokio::task::spawn_blocking(move || {
        redis.kill();
        redis
    })
    .await
    .unwrap();
    // While it is down: 503, and quickly.
    let started = Instant::now();
    client
        .post("/v1/x", "during-outage", "{}")
        .await
        .assert_problem(503, "store-unavailable");
    assert!(started.elapsed() < Duration::from_secs(2));
    let r = tokio::task::spawn_blocking(move || {
        redis.restart();
        redis
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total: HashMap<u16, usize> = HashMap::new();
    for l in loads {
        for (s, c) in l.await.unwrap() {
            *total.entry(s).or_insert(0) += c;
        }
    }
    assert!(
        total.keys().all(|s| matches!(s, 0 | 201 | 502 | 503)),
        "{total:?}"
    );
    assert!(total.get(&201).copied().unwrap_or(0) > 0, "{total:?}");
    // Recovered without a restart of idemgate: each new key runs once.
    let before = up.calls();
    for i in 0..20 {
        let key = format!("after-{i}");
        assert_eq!(client.post("/v1/x", &key, "{}").await.status, 201);
        assert_eq!(
            client
                .post("/v1/x", &key, "{}")
                .await
                .header("idempotent-replayed"),
            Some("true")
        );
    }
    assert_eq!(up.calls() - before, 20);
    idg.stop().await;
    drop(r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_redis_gives_503_within_the_store_timeout() {
    let redis = RedisServer::start();
    let up = TestUpstream::start().await;
    let idg = Running::start(config(Some(&up.url()), &redis_toml(&redis.url(), "")))
        .await
        .unwrap();
    let client = TestClient::new(idg.proxy_addr.unwrap());
    let admin = TestClient::new(idg.admin_addr);
    assert_eq!(client.post("/v1/x", "warm", "{}").await.status, 201);
    redis.pause(true);
    let started = Instant::now();
    let got = client.post("/v1/x", "paused", "{}").await;
    let took = started.elapsed();
    got.assert_problem(503, "store-unavailable");
    assert!(
        took < Duration::from_millis(1500),
        "503 took {took:?} with a 300 ms store timeout"
    );
    admin
        .send("GET", "/readyz", &[], "")
        .await
        .assert_problem(503, "not-ready");
    assert_eq!(up.calls(), 1);
    redis.pause(false);
    let mut ready = false;
    for _ in 0..50 {
        if admin.send("GET", "/readyz", &[], "").await.status == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready);
    assert_eq!(client.post("/v1/x", "resumed", "{}").await.status, 201);
    idg.stop().await;
}

/// An upstream whose first `resets` requests get half a response and a TCP
/// reset; later ones a normal 201.
async fn flaky_upstream(resets: usize) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let c = c.clone();
            tokio::spawn(async move {
                loop {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    // Read one request: headers, then the declared body.
                    let head_end = loop {
                        let Ok(n) = s.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        let Ok(n) = s.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    if c.fetch_add(1, Ordering::SeqCst) < resets {
                        let _ = s
                            .write_all(
                                b"HTTP/1.1 201 Created\r\ncontent-length: 100\r\n\r\npartial",
                            )
                            .await;
                        // Zero linger: the close sends RST (and never blocks).
                        #[allow(deprecated)]
                        let _ = s.set_linger(Some(Duration::ZERO));
                        return;
                    }
                    let _ = s
                        .write_all(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                }
            });
        }
    });
    (addr, calls)
}

#[tokio::test]
async fn an_upstream_reset_mid_response_aborts_it_and_frees_the_key_under_release() {
    let (addr, calls) = flaky_upstream(1).await;
    let idg = Running::start(config(
        Some(&format!("http://{addr}")),
        "[idempotency]\non_unknown_outcome = \"release\"\n",
    ))
    .await
    .unwrap();
    let client = TestClient::new(idg.proxy_addr.unwrap());
    // The head was sent on as it came; the body broke off, and so does the
    // client's response: never a truncated body that ends cleanly.
    let first = client
        .try_send("POST", "/v1/x", &[("idempotency-key", "reset")], "{}")
        .await;
    let (status, _) = first.expect_err("a broken body must reach the client broken");
    assert_eq!(status, 201);
    // The lease was released: the retry runs now rather than waiting.
    let started = Instant::now();
    let retry = client.post("/v1/x", "reset", "{}").await;
    assert_eq!(retry.status, 201);
    assert_eq!(&retry.body[..], b"ok");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    idg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_injected_faults_every_request_ends_and_stored_keys_never_rerun() {
    let redis = RedisServer::start();
    let target = format!("127.0.0.1:{}", redis.port).parse().unwrap();
    under_injected_faults(target, |at| redis_toml(&format!("redis://{at}"), "")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_injected_faults_on_postgres_every_request_ends_and_stored_keys_never_rerun() {
    let pg = PostgresServer::start();
    let target = format!("127.0.0.1:{}", pg.port).parse().unwrap();
    under_injected_faults(target, |at| {
        postgres_server::store_toml(&format!("postgres://postgres@{at}/postgres"), "faults")
    })
    .await;
}

/// How a response whose body broke off is counted.
const ABORTED: u16 = 0;

/// Six clients over 40 keys while a fault proxy in front of the store (at
/// `store`; `store_toml` makes the `[store]` section for the proxy's
/// address) and one in front of the upstream go through latency, byte
/// slicing, stalls and resets; then every key whose response was stored
/// replays and never reaches the upstream again.
async fn under_injected_faults(store: SocketAddr, store_toml: impl Fn(SocketAddr) -> String) {
    let up = TestUpstream::start().await;
    let store_proxy = FaultProxy::start(store).await;
    let up_proxy = FaultProxy::start(up.addr).await;
    let toml = format!(
        "upstream_timeout = \"1s\"\n{}[idempotency]\nlease_ttl = \"1s\"\nwait_timeout = \"1s\"\n",
        store_toml(store_proxy.addr)
    );
    let idg = Running::start(config(Some(&format!("http://{}", up_proxy.addr)), &toml))
        .await
        .unwrap();
    let client = TestClient::new(idg.proxy_addr.unwrap());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..6)
        .map(|w| {
            let (c, stop) = (client.clone(), stop.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("k{}", (i * 7 + w * 3) % 40);
                    i += 1;
                    let started = Instant::now();
                    // As `post` sends it, so the replays below match.
                    let headers = [
                        ("idempotency-key", key.as_str()),
                        ("content-type", "application/json"),
                    ];
                    let got = tokio::time::timeout(
                        Duration::from_secs(8),
                        c.try_send("POST", "/v1/x", &headers, "{}"),
                    )
                    .await
                    .unwrap_or_else(|_| panic!("request for {key} hung"));
                    assert!(
                        started.elapsed() < Duration::from_secs(6),
                        "{key} took {:?}",
                        started.elapsed()
                    );
                    // A body broken off (an upstream reset mid-body, or a
                    // completion the store did not confirm) is an end too:
                    // the client sees it broken, never cleanly truncated.
                    // Counted as `ABORTED`; its head was the upstream's 201.
                    seen.push(match got {
                        Ok(got) => got.status.as_u16(),
                        Err((head, _)) => {
                            assert_eq!(head, 201, "{key}: aborted after a {head} head");
                            ABORTED
                        }
                    });
                }
                seen
            })
        })
        .collect();
    let schedule = [
        (Fault::Latency(Duration::from_millis(50)), Fault::Pass),
        (Fault::Slice, Fault::Slice),
        (Fault::Pass, Fault::Stall),
        (Fault::Stall, Fault::Pass),
        (Fault::Reset, Fault::Latency(Duration::from_millis(30))),
        (Fault::Pass, Fault::Reset),
        (Fault::Pass, Fault::Pass),
    ];
    for (r, u) in schedule {
        store_proxy.set(r);
        up_proxy.set(u);
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut statuses: HashMap<u16, usize> = HashMap::new();
    for w in workers {
        for s in w.await.unwrap() {
            *statuses.entry(s).or_insert(0) += 1;
        }
    }
    for s in statuses.keys() {
        assert!(
            [201, 409, 502, 503, 504, ABORTED].contains(s),
            "undefined status {s}: {statuses:?}"
        );
    }
    assert!(statuses.get(&201).copied().unwrap_or(0) > 0, "{statuses:?}");

    // Faults cleared and leases lapsed: every key whose response is stored
    // replays it and never reaches the upstream again.
    store_proxy.set(Fault::Pass);
    up_proxy.set(Fault::Pass);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let admin = TestClient::new(idg.admin_addr);
    let calls_per_key = |up: &TestUpstream| {
        let mut m: HashMap<String, usize> = HashMap::new();
        for s in up.seen() {
            *m.entry(s.headers["idempotency-key"].to_str().unwrap().to_owned())
                .or_insert(0) += 1;
        }
        m
    };
    let before = calls_per_key(&up);
    let mut stored = Vec::new();
    for k in 0..40 {
        let key = format!("k{k}");
        let rec = admin
            .send("GET", &format!("/v1/keys?key={key}&path=/v1/x"), &[], "")
            .await;
        if rec.status == 200 && rec.json()["state"] == "completed" {
            stored.push(key);
        }
    }
    assert!(!stored.is_empty());
    for key in &stored {
        let got = client.post("/v1/x", key, "{}").await;
        assert_eq!(got.header("idempotent-replayed"), Some("true"), "{key}");
    }
    let after = calls_per_key(&up);
    for key in &stored {
        assert_eq!(
            before.get(key),
            after.get(key),
            "{key} ran again after its response was stored"
        );
    }
    idg.stop().await;
}
