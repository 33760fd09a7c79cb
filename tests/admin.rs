//! Metrics and the admin listener (SPEC §5): counters move exactly once per
//! request, readiness follows the store, and `/v1/keys` inspects and purges.

mod support;

use std::time::Duration;

use idemgate::server::Running;
use support::redis_server::RedisServer;
use support::{config, start, TestClient, TestUpstream};

fn count(r: &Running, outcome: &str) -> u64 {
    r.metrics.requests.with_label_values(&[outcome]).get()
}

#[tokio::test]
async fn request_counters_move_exactly_once_per_request() {
    let up = TestUpstream::start().await;
    let (idg, client) = start(&up, "").await;
    client.post("/v1/c", "k", "{}").await;
    client.post("/v1/c", "k", "{}").await;
    client.post("/v1/c", "k", "{}").await;
    client.post("/v1/c", "k", "{\"other\":1}").await;
    client.send("GET", "/v1/c", &[], "").await;
    client
        .send("POST", "/v1/c", &[("idempotency-key", "")], "{}")
        .await;
    assert_eq!(count(&idg, "forwarded"), 1);
    assert_eq!(count(&idg, "replayed"), 2);
    assert_eq!(count(&idg, "mismatch"), 1);
    assert_eq!(count(&idg, "pass_through"), 1);
    assert_eq!(count(&idg, "invalid_key"), 1);
    assert_eq!(count(&idg, "conflict"), 0);

    // The same numbers over HTTP, in the text format.
    let admin = TestClient::new(idg.admin_addr);
    let text =
        String::from_utf8(admin.send("GET", "/metrics", &[], "").await.body.to_vec()).unwrap();
    for line in [
        "idemgate_requests_total{outcome=\"forwarded\"} 1",
        "idemgate_requests_total{outcome=\"replayed\"} 2",
        "idemgate_requests_total{outcome=\"mismatch\"} 1",
        "idemgate_requests_total{outcome=\"store_unavailable\"} 0",
        "idemgate_request_duration_seconds_count{outcome=\"replayed\"} 2",
        "idemgate_upstream_duration_seconds_count 2",
        "idemgate_store_operation_duration_seconds_count{op=\"begin\"} 4",
        "idemgate_store_operation_duration_seconds_count{op=\"complete\"} 1",
        "idemgate_store_errors_total{op=\"begin\"} 0",
        "idemgate_waiting_duplicates 0",
        "idemgate_lease_lost_total 0",
        "idemgate_build_info{version=\"",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    for name in [
        "idemgate_lease_renewals_total",
        "process_resident_memory_bytes",
        "process_open_fds",
    ] {
        assert!(text.contains(name), "missing {name}");
    }
    // Sub-millisecond buckets exist to resolve proxy overhead.
    assert!(text.contains("le=\"0.0001\""));
    idg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_duplicates_and_lease_renewals_are_visible() {
    let up = TestUpstream::start().await;
    let (idg, client) = start(&up, "[idempotency]\nlease_ttl = \"300ms\"\n").await;
    let c = client.clone();
    let first = tokio::spawn(async move {
        c.send(
            "POST",
            "/v1/c",
            &[("idempotency-key", "w"), ("x-delay-ms", "1200")],
            "{}",
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let c = client.clone();
    let dup = tokio::spawn(async move {
        c.send(
            "POST",
            "/v1/c",
            &[("idempotency-key", "w"), ("x-delay-ms", "1200")],
            "{}",
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(idg.metrics.waiting_duplicates.get(), 1);
    assert_eq!(
        dup.await.unwrap().header("idempotent-replayed"),
        Some("true")
    );
    first.await.unwrap();
    assert_eq!(idg.metrics.waiting_duplicates.get(), 0);
    // A waiting duplicate whose client goes away stops counting.
    let c = client.clone();
    let busy = tokio::spawn(async move {
        c.send(
            "POST",
            "/v1/c",
            &[("idempotency-key", "gone"), ("x-delay-ms", "800")],
            "{}",
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut s = tokio::net::TcpStream::connect(idg.proxy_addr.unwrap())
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut s,
        b"POST /v1/c HTTP/1.1\r\nhost: x\r\nidempotency-key: gone\r\nx-delay-ms: 800\r\ncontent-length: 2\r\n\r\n{}",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(idg.metrics.waiting_duplicates.get(), 1);
    drop(s);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        idg.metrics.waiting_duplicates.get(),
        0,
        "a gone client still counts as waiting"
    );
    busy.await.unwrap();
    // 1.2 s under a 300 ms lease renewed every 100 ms.
    assert!(
        idg.metrics.lease_renewals.get() >= 8,
        "{}",
        idg.metrics.lease_renewals.get()
    );
    assert_eq!(idg.metrics.lease_lost.get(), 0);
    idg.stop().await;
}

#[tokio::test]
async fn keys_endpoint_inspects_and_purges_a_record() {
    let up = TestUpstream::start().await;
    let (idg, client) = start(&up, "").await;
    let admin = TestClient::new(idg.admin_addr);
    client
        .send(
            "POST",
            "/v1/pay",
            &[("idempotency-key", "k-1"), ("authorization", "Bearer A")],
            "{}",
        )
        .await;
    let q = "/v1/keys?key=k-1&path=%2Fv1%2Fpay&method=post&scope=Bearer%20A";
    let got = admin.send("GET", q, &[], "").await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    let doc = got.json();
    assert_eq!(doc["state"], "completed");
    assert_eq!(doc["status"], 201);
    assert!(doc["created_unix_ms"].as_u64().unwrap() > 1_700_000_000_000);
    let ttl = doc["expires_in_ms"].as_u64().unwrap();
    assert!(ttl > 23 * 3600 * 1000 && ttl <= 24 * 3600 * 1000);
    // Another caller's scope is another record.
    admin
        .send(
            "GET",
            "/v1/keys?key=k-1&path=/v1/pay&scope=Bearer%20B",
            &[],
            "",
        )
        .await
        .assert_problem(404, "not-found");
    assert_eq!(admin.send("DELETE", q, &[], "").await.status, 204);
    admin
        .send("DELETE", q, &[], "")
        .await
        .assert_problem(404, "not-found");
    // Purged: the next request runs again.
    let again = client
        .send(
            "POST",
            "/v1/pay",
            &[("idempotency-key", "k-1"), ("authorization", "Bearer A")],
            "{}",
        )
        .await;
    assert_eq!(again.header("idempotent-replayed"), None);
    assert_eq!(up.calls(), 2);
    // Bad queries are clear 400s.
    admin
        .send("GET", "/v1/keys?path=/x", &[], "")
        .await
        .assert_problem(400, "bad-request");
    admin
        .send("GET", "/v1/keys?key=a&path=x", &[], "")
        .await
        .assert_problem(400, "bad-request");
    admin
        .send("GET", "/v1/keys?key=a&path=/x&bogus=1", &[], "")
        .await
        .assert_problem(400, "bad-request");
    admin
        .send("GET", "/nope", &[], "")
        .await
        .assert_problem(404, "not-found");
    admin
        .send("POST", "/healthz", &[], "")
        .await
        .assert_problem(405, "method-not-allowed");
    idg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_redis_while_health_stays_up() {
    let mut redis = RedisServer::start();
    let up = TestUpstream::start().await;
    let toml = support::redis_server::store_toml(&redis.url());
    let idg = Running::start(config(Some(&up.url()), &toml))
        .await
        .unwrap();
    let admin = TestClient::new(idg.admin_addr);
    assert_eq!(admin.send("GET", "/readyz", &[], "").await.status, 200);
    redis.kill();
    admin
        .send("GET", "/readyz", &[], "")
        .await
        .assert_problem(503, "not-ready");
    assert_eq!(admin.send("GET", "/healthz", &[], "").await.status, 200);
    redis.restart();
    let mut ready = false;
    for _ in 0..50 {
        if admin.send("GET", "/readyz", &[], "").await.status == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "readiness did not come back");
    idg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_errors_are_counted() {
    let mut redis = RedisServer::start();
    let up = TestUpstream::start().await;
    let toml = support::redis_server::store_toml(&redis.url());
    let idg = Running::start(config(Some(&up.url()), &toml))
        .await
        .unwrap();
    let client = TestClient::new(idg.proxy_addr.unwrap());
    redis.kill();
    client
        .post("/v1/x", "k", "{}")
        .await
        .assert_problem(503, "store-unavailable");
    assert_eq!(
        idg.metrics.store_errors.with_label_values(&["begin"]).get(),
        1
    );
    assert_eq!(count(&idg, "store_unavailable"), 1);
    idg.stop().await;
}

#[tokio::test]
async fn with_tokens_every_endpoint_asks_who_you_are() {
    let up = TestUpstream::start().await;
    let dir = std::env::temp_dir().join(format!("idemgate-admin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let read_file = dir.join("read-token");
    std::fs::write(&read_file, "r3ad-only\n").unwrap();
    for metrics_public in [true, false] {
        let extra = format!(
            "admin_token = \"wr1te\"\nadmin_read_token_file = \"{}\"\nmetrics_public = {metrics_public}\n",
            read_file.display()
        );
        let (r, client) = start(&up, &extra).await;
        assert_eq!(client.post("/v1/charges", "k", "{}").await.status, 201);
        let admin = TestClient::new(r.admin_addr);
        let call = |method: &'static str, path: &'static str, token: Option<&'static str>| {
            let admin = admin.clone();
            async move {
                let auth = token.map(|t| format!("Bearer {t}"));
                let mut headers = vec![("content-type", "application/json")];
                if let Some(a) = &auth {
                    headers.push(("authorization", a.as_str()));
                }
                let body = if method == "POST" {
                    "{\"key\":\"m\"}"
                } else {
                    ""
                };
                admin
                    .send(method, path, &headers, body)
                    .await
                    .status
                    .as_u16()
            }
        };
        let keys = "/v1/keys?key=k&path=/v1/charges";
        // Always open.
        assert_eq!(call("GET", "/healthz", None).await, 200);
        assert_eq!(call("GET", "/readyz", None).await, 200);
        let metrics = call("GET", "/metrics", None).await;
        assert_eq!(metrics, if metrics_public { 200 } else { 401 });
        assert_eq!(call("GET", "/metrics", Some("r3ad-only")).await, 200);
        // Reads: the read or the write token; nothing else.
        for path in [keys, "/v1/dedup/s/failed", "/no-such-endpoint"] {
            assert_eq!(call("GET", path, None).await, 401, "{path}");
            assert_eq!(call("GET", path, Some("guess")).await, 401, "{path}");
        }
        assert_eq!(call("GET", keys, Some("r3ad-only")).await, 200);
        assert_eq!(call("GET", "/v1/dedup/s/failed", Some("wr1te")).await, 200);
        // Writes: the write token only.
        for (method, path) in [
            ("POST", "/v1/dedup/s/mark"),
            ("DELETE", keys),
            ("PUT", keys),
        ] {
            assert_eq!(call(method, path, None).await, 401, "{method} {path}");
            assert_eq!(
                call(method, path, Some("guess")).await,
                401,
                "{method} {path}"
            );
            assert_eq!(
                call(method, path, Some("r3ad-only")).await,
                403,
                "{method} {path}"
            );
        }
        assert_eq!(call("POST", "/v1/dedup/s/mark", Some("wr1te")).await, 201);
        assert_eq!(call("DELETE", keys, Some("wr1te")).await, 204);
        // A refusal names the scheme.
        let refused = admin.send("GET", keys, &[], "").await;
        refused.assert_problem(401, "unauthorized");
        assert_eq!(
            refused.header("www-authenticate"),
            Some("Bearer realm=\"idemgate-admin\"")
        );
        r.stop().await;
    }
    let _ = std::fs::remove_dir_all(dir);
}
