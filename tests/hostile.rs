//! Hostile clients: request smuggling, connection-specific headers, header
//! floods, slow senders, odd keys, cross-tenant key reuse and huge bodies.
//! Each test checks the status and that nothing unintended reached the
//! upstream.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use idemgate::server::Running;
use support::redis_server::RedisServer;
use support::{config, start, TestClient, TestUpstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends raw bytes, then reads until the server closes or `wait` passes.
async fn raw(addr: SocketAddr, bytes: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(resp: &str) -> Option<u16> {
    resp.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

#[tokio::test]
async fn smuggling_framings_are_refused_and_nothing_is_smuggled() {
    let up = TestUpstream::start().await;
    let (idg, _) = start(&up, "").await;
    let addr = idg.proxy_addr.unwrap();
    let smuggled = "GET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n";
    let cases = [
        // Content-Length and Transfer-Encoding together.
        format!("POST /v1/a HTTP/1.1\r\nhost: x\r\nidempotency-key: s1\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"),
        // Two different Content-Lengths.
        format!("POST /v1/a HTTP/1.1\r\nhost: x\r\nidempotency-key: s2\r\ncontent-length: 2\r\ncontent-length: 40\r\n\r\n{{}}{smuggled}"),
        // A Transfer-Encoding that does not end in chunked.
        format!("POST /v1/a HTTP/1.1\r\nhost: x\r\nidempotency-key: s3\r\ntransfer-encoding: gzip\r\n\r\n{smuggled}"),
        format!("POST /v1/a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked, gzip\r\n\r\n{smuggled}"),
        // Obfuscated chunked.
        format!("POST /v1/a HTTP/1.1\r\nhost: x\r\nidempotency-key: s5\r\ntransfer-encoding: xchunked\r\n\r\n{smuggled}"),
    ];
    // CL+TE is normalised (Transfer-Encoding wins) and the connection then
    // closed, so the trailing request is never read; the rest are refused.
    let expected = [201, 400, 400, 400, 400];
    for (case, want) in cases.iter().zip(expected) {
        let resp = raw(addr, case.as_bytes(), Duration::from_secs(3)).await;
        assert_eq!(status_of(&resp), Some(want), "{case:?} -> {resp}");
        assert_eq!(
            resp.matches("HTTP/1.1 ").count(),
            1,
            "one request, one response: {resp}"
        );
    }
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/v1/a");
    // Forwarded with the framing of what was actually received: no body.
    assert!(seen[0].body.is_empty());
    assert!(
        seen[0]
            .headers
            .get("content-length")
            .is_none_or(|v| v == "0"),
        "{:?}",
        seen[0].headers
    );
    idg.stop().await;
}

#[tokio::test]
async fn connection_specific_response_headers_are_neither_passed_on_nor_stored() {
    let up = TestUpstream::start().await;
    let (idg, client) = start(&up, "").await;
    let send = || {
        client.send(
            "POST",
            "/v1/hop",
            &[("idempotency-key", "hop"), ("x-respond-hop", "1")],
            "{}",
        )
    };
    let first = send().await;
    let replay = send().await;
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    for resp in [&first, &replay] {
        for name in ["x-secret", "keep-alive", "proxy-authenticate"] {
            assert!(
                !resp.headers.contains_key(name),
                "{name} leaked: {:?}",
                resp.headers
            );
        }
        assert_ne!(resp.header("connection"), Some("x-secret"));
    }
    assert_eq!(up.calls(), 1);
    idg.stop().await;
}

/// The README's limit, exactly: 100 request headers pass, 101 get 431.
#[tokio::test]
async fn a_hundred_request_headers_pass_and_the_hundred_and_first_gets_431() {
    let up = TestUpstream::start().await;
    let (idg, _) = start(&up, "").await;
    let addr = idg.proxy_addr.unwrap();
    let with = |n: usize| {
        let mut r = String::from("GET /v1/a HTTP/1.1\r\nhost: x\r\nconnection: close\r\n");
        for i in 2..n {
            r.push_str(&format!("x-h{i}: v\r\n"));
        }
        r + "\r\n"
    };
    let resp = raw(addr, with(100).as_bytes(), Duration::from_secs(3)).await;
    assert_eq!(status_of(&resp), Some(201), "{resp}");
    let resp = raw(addr, with(101).as_bytes(), Duration::from_secs(3)).await;
    assert_eq!(status_of(&resp), Some(431), "{resp}");
    assert_eq!(up.calls(), 1);
    idg.stop().await;
}

#[tokio::test]
async fn header_floods_get_431_and_reach_nothing() {
    let up = TestUpstream::start().await;
    let (idg, _) = start(&up, "").await;
    let addr = idg.proxy_addr.unwrap();
    let mut many = String::from("POST /v1/a HTTP/1.1\r\nhost: x\r\nidempotency-key: f1\r\n");
    for i in 0..300 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("content-length: 0\r\n\r\n");
    let resp = raw(addr, many.as_bytes(), Duration::from_secs(3)).await;
    assert_eq!(status_of(&resp), Some(431), "{resp}");
    let huge = format!(
        "POST /v1/a HTTP/1.1\r\nhost: x\r\nidempotency-key: f2\r\nx-big: {}\r\ncontent-length: 0\r\n\r\n",
        "v".repeat(200 * 1024)
    );
    let resp = raw(addr, huge.as_bytes(), Duration::from_secs(3)).await;
    assert_eq!(
        status_of(&resp),
        Some(431),
        "{}",
        &resp[..resp.len().min(200)]
    );
    assert_eq!(up.calls(), 0);
    idg.stop().await;
}

#[tokio::test]
async fn half_sent_headers_and_slow_bodies_are_cut_off() {
    let up = TestUpstream::start().await;
    let (idg, _) = start(
        &up,
        "header_read_timeout = \"300ms\"\nbody_read_timeout = \"300ms\"\n",
    )
    .await;
    let addr = idg.proxy_addr.unwrap();
    // Headers that never finish: the connection is closed by the timer.
    let started = Instant::now();
    let resp = raw(
        addr,
        b"POST /v1/a HTTP/1.1\r\nhost: x\r\nidempotency-key: slow",
        Duration::from_secs(5),
    )
    .await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "a half-sent header held the connection for {took:?}"
    );
    assert!(resp.is_empty() || status_of(&resp) == Some(408), "{resp}");
    // A body that stops arriving: 408, and the upstream is never called.
    let started = Instant::now();
    let resp = raw(
        addr,
        b"POST /v1/a HTTP/1.1\r\nhost: x\r\nidempotency-key: slowbody\r\ncontent-length: 100\r\n\r\n0123456789",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(status_of(&resp), Some(408), "{resp}");
    assert!(resp.contains("body-timeout"));
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(up.calls(), 0);
    idg.stop().await;
}

#[tokio::test]
async fn hostile_keys_are_refused_or_safely_hashed() {
    let up = TestUpstream::start().await;
    let (idg, client) = start(&up, "").await;
    let addr = idg.proxy_addr.unwrap();
    for key in [
        &b""[..],
        b"a\x01b",
        b"tab\there",
        b"\xff\xfe",
        b"\x7f",
        &[b'k'; 256][..],
    ] {
        let mut req = b"POST /v1/k HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\nconnection: close\r\nidempotency-key: ".to_vec();
        req.extend_from_slice(key);
        req.extend_from_slice(b"\r\n\r\n{}");
        let resp = raw(addr, &req, Duration::from_secs(3)).await;
        assert_eq!(status_of(&resp), Some(400), "key {key:?}: {resp}");
    }
    // Braces are key text like any other: accepted, hashed, replayed.
    let a = client.post("/v1/k", "{slot-7}order", "{}").await;
    assert_eq!(a.status, 201);
    let b = client.post("/v1/k", "{slot-7}order", "{}").await;
    assert_eq!(b.header("idempotent-replayed"), Some("true"));
    assert_eq!(up.calls(), 1);
    idg.stop().await;
}

#[tokio::test]
async fn declared_huge_bodies_are_refused_before_they_are_sent() {
    let up = TestUpstream::start().await;
    let (idg, _) = start(&up, "").await;
    let addr = idg.proxy_addr.unwrap();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /v1/a HTTP/1.1\r\nhost: x\r\nidempotency-key: big\r\ncontent-length: 104857600\r\n\r\n")
        .await
        .unwrap();
    // No body is sent at all: the answer comes from the declared length.
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let resp = String::from_utf8_lossy(&buf[..n]);
    assert_eq!(status_of(&resp), Some(413), "{resp}");
    assert_eq!(up.calls(), 0);
    idg.stop().await;
}

/// 40 callers send the same key at once, each with its own Authorization:
/// every one gets its own response, never another caller's.
async fn tenants_apart(client: &TestClient, up: &TestUpstream) {
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let c = client.clone();
            tokio::spawn(async move {
                let auth = format!("Bearer tenant-{i}");
                let got = c
                    .send(
                        "POST",
                        "/v1/pay",
                        &[
                            ("idempotency-key", "shared-key"),
                            ("authorization", &auth),
                            ("x-delay-ms", "100"),
                        ],
                        "{}",
                    )
                    .await;
                (auth, got)
            })
        })
        .collect();
    for t in tasks {
        let (auth, got) = t.await.unwrap();
        assert_eq!(got.status, 201);
        assert_eq!(
            got.json()["auth"],
            auth.as_str(),
            "a tenant got another tenant's response"
        );
    }
    assert_eq!(up.calls(), 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_never_see_each_others_responses_on_memory() {
    let up = TestUpstream::start().await;
    let (idg, client) = start(&up, "").await;
    tenants_apart(&client, &up).await;
    idg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_never_see_each_others_responses_on_redis() {
    let redis = RedisServer::start();
    let up = TestUpstream::start().await;
    let toml = support::redis_server::store_toml(&redis.url());
    let idg = Running::start(config(Some(&up.url()), &toml))
        .await
        .unwrap();
    let client = TestClient::new(idg.proxy_addr.unwrap());
    tenants_apart(&client, &up).await;
    idg.stop().await;
}
