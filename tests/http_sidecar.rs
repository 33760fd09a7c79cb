//! The HTTP sidecar end to end on the memory store: real sockets, a real
//! upstream that counts its calls (SPEC §3).

mod support;

use std::time::Duration;

use support::{duplicates_agree, start, TestUpstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn replay_is_byte_identical_and_marked() {
    let up = TestUpstream::start().await;
    let (idg, client) = start(&up, "").await;
    let first = client.post("/v1/charges", "k1", r#"{"amount":100}"#).await;
    assert_eq!(first.status, 201);
    assert_eq!(first.header("idempotent-replayed"), None);
    let second = client.post("/v1/charges", "k1", r#"{"amount":100}"#).await;
    assert_eq!(second.status, 201);
    assert_eq!(second.body, first.body);
    assert_eq!(second.header("idempotent-replayed"), Some("true"));
    // Every stored header comes back as it was (set-cookie is stripped).
    for (name, value) in first.headers.iter() {
        if name == "set-cookie" {
            continue;
        }
        assert_eq!(second.headers.get(name), Some(value), "header {name}");
    }
    assert_eq!(first.header("set-cookie"), Some("session=1"));
    assert_eq!(second.header("set-cookie"), None);
    assert_eq!(up.calls(), 1);
    idg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_run_once_and_get_the_same_answer() {
    let up = TestUpstream::start().await;
    let (idg, client) = start(&up, "").await;
    duplicates_agree(&[client], 200, "same").await;
    assert_eq!(up.calls(), 1);
    idg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_keys_each_run() {
    let up = TestUpstream::start().await;
    let (idg, client) = start(&up, "").await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            c.post("/v1/charges", &format!("key-{i}"), "{}").await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().status, 201);
    }
    assert_eq!(up.calls(), 200);
    idg.stop().await;
}

#[tokio::test]
async fn same_key_different_request_is_422() {
    let up = TestUpstream::start().await;
    let (idg, client) = start(&up, "").await;
    assert_eq!(
        client
            .post("/v1/charges", "k", r#"{"amount":1}"#)
            .await
            .status,
        201
    );
    client
        .post("/v1/charges", "k", r#"{"amount":2}"#)
        .await
        .assert_problem(422, "key-reused");
    // A different query string is a different request too.
    client
        .post("/v1/charges?x=1", "k", r#"{"amount":1}"#)
        .await
        .assert_problem(422, "key-reused");
    // And a different fingerprinted header.
    client
        .send(
            "POST",
            "/v1/charges",
            &[("idempotency-key", "k"), ("content-type", "text/plain")],
            r#"{"amount":1}"#,
        )
        .await
        .assert_problem(422, "key-reused");
    assert_eq!(up.calls(), 1);
    idg.stop().await;
}

#[tokio::test]
async fn malformed_keys_are_400_and_reach_nothing() {
    let up = TestUpstream::start().await;
    let (idg, client) = start(&up, "").await;
    let long = "k".repeat(256);
    for key in ["", "\"unterminated", "has space", "\"a\"b\"", long.as_str()] {
        client
            .send("POST", "/v1/charges", &[("idempotency-key", key)], "{}")
            .await
            .assert_problem(400, "invalid-key");
    }
    // 255 characters is fine.
    let max = "k".repeat(255);
    assert_eq!(client.post("/v1/charges", &max, "{}").await.status, 201);
    // The header sent twice.
    client
        .send(
            "POST",
            "/v1/charges",
            &[("idempotency-key", "a"), ("idempotency-key", "b")],
            "{}",
        )
        .await
        .assert_problem(400, "invalid-key");
    // Non-ASCII bytes, which a well-behaved client library refuses to send.
    let raw = raw_request(
        idg.proxy_addr.unwrap(),
        b"POST /v1/charges HTTP/1.1\r\nhost: x\r\nidempotency-key: caf\xc3\xa9\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    assert!(raw.contains("invalid-key"), "{raw}");
    assert_eq!(up.calls(), 1);
    idg.stop().await;
}

#[tokio::test]
async fn required_routes_refuse_keyless_requests() {
    let up = TestUpstream::start().await;
    let (idg, client) = start(
        &up,
        "[[routes]]\npath = \"/v1/payments/**\"\nrequired = true\n",
    )
    .await;
    client
        .send("POST", "/v1/payments/p1", &[], "{}")
        .await
        .assert_problem(400, "missing-key");
    // Elsewhere a keyless POST passes through, every time.
    assert_eq!(
        client.send("POST", "/v1/other", &[], "{}").await.status,
        201
    );
    assert_eq!(
        client.send("POST", "/v1/other", &[], "{}").await.status,
        201
    );
    assert_eq!(up.calls(), 2);
    idg.stop().await;
}

#[tokio::test]
async fn oversized_request_bodies_are_413_without_state() {
    let up = TestUpstream::start().await;
    let (idg, client) = start(&up, "[idempotency]\nmax_request_body = \"1KiB\"\n").await;
    let big = "x".repeat(1025);
    client
        .post("/v1/charges", "k", &big)
        .await
        .assert_problem(413, "body-too-large");
    // Chunked, with no Content-Length to refuse early on.
    let mut chunked = Vec::new();
    chunked.extend_from_slice(
        b"POST /v1/charges HTTP/1.1\r\nhost: x\r\nidempotency-key: k\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n",
    );
    for _ in 0..3 {
        chunked.extend_from_slice(b"200\r\n");
        chunked.extend_from_slice(&[b'y'; 0x200]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let raw = raw_request(idg.proxy_addr.unwrap(), &chunked).await;
    assert!(raw.starts_with("HTTP/1.1 413"), "{raw}");
    assert_eq!(up.calls(), 0);
    // No state was taken: the same key with a small body runs.
    assert_eq!(client.post("/v1/charges", "k", "{}").await.status, 201);
    assert_eq!(up.calls(), 1);
    idg.stop().await;
}

#[tokio::test]
async fn uncovered_methods_and_keyless_requests_pass_through() {
    let up = TestUpstream::start().await;
    let (idg, client) = start(&up, "").await;
    for _ in 0..2 {
        let got = client
            .send("GET", "/v1/charges", &[("idempotency-key", "k")], "")
            .await;
        assert_eq!(got.status, 201);
        assert_eq!(got.header("idempotent-replayed"), None);
        let got = client
            .send("PUT", "/v1/charges", &[("idempotency-key", "k")], "{}")
            .await;
        assert_eq!(got.header("idempotent-replayed"), None);
        client.send("POST", "/v1/charges", &[], "{}").await;
    }
    assert_eq!(up.calls(), 6);
    // Pass-through requests carry no fence.
    assert!(up
        .seen()
        .iter()
        .all(|s| !s.headers.contains_key("idempotency-fence")));
    idg.stop().await;
}

#[tokio::test]
async fn callers_are_scoped_by_authorization() {
    let up = TestUpstream::start().await;
    let (idg, client) = start(&up, "").await;
    let a = client
        .send(
            "POST",
            "/v1/charges",
            &[("idempotency-key", "k"), ("authorization", "Bearer A")],
            "{}",
        )
        .await;
    let b = client
        .send(
            "POST",
            "/v1/charges",
            &[("idempotency-key", "k"), ("authorization", "Bearer B")],
            "{}",
        )
        .await;
    assert_eq!(b.header("idempotent-replayed"), None);
    assert_ne!(a.body, b.body);
    assert_eq!(up.calls(), 2);
    let a2 = client
        .send(
            "POST",
            "/v1/charges",
            &[("idempotency-key", "k"), ("authorization", "Bearer A")],
            "{}",
        )
        .await;
    assert_eq!(a2.body, a.body);
    assert_eq!(up.calls(), 2);
    idg.stop().await;
}

#[tokio::test]
async fn path_is_part_of_the_key() {
    let up = TestUpstream::start().await;
    let (idg, client) = start(&up, "").await;
    assert_eq!(client.post("/v1/a", "k", "{}").await.status, 201);
    let b = client.post("/v1/b", "k", "{}").await;
    assert_eq!(b.status, 201);
    assert_eq!(b.header("idempotent-replayed"), None);
    assert_eq!(up.calls(), 2);
    idg.stop().await;
}

#[tokio::test]
async fn uncacheable_statuses_are_not_stored_but_others_are() {
    let up = TestUpstream::start().await;
    let (idg, client) = start(&up, "").await;
    let send = |key: &'static str, status: &'static str| {
        let c = client.clone();
        async move {
            c.send(
                "POST",
                "/v1/x",
                &[("idempotency-key", key), ("x-status", status)],
                "{}",
            )
            .await
        }
    };
    assert_eq!(send("k503", "503").await.status, 503);
    assert_eq!(send("k503", "503").await.status, 503);
    assert_eq!(up.calls(), 2, "a 503 must not be replayed");
    assert_eq!(send("k400", "400").await.status, 400);
    let again = send("k400", "400").await;
    assert_eq!(again.status, 400);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(up.calls(), 3);
    idg.stop().await;
}

#[tokio::test]
async fn a_disconnected_client_still_gets_its_result_stored() {
    let up = TestUpstream::start().await;
    let (idg, client) = start(&up, "").await;
    let addr = idg.proxy_addr.unwrap();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /v1/charges HTTP/1.1\r\nhost: x\r\nidempotency-key: gone\r\nx-delay-ms: 400\r\ncontent-length: 2\r\n\r\n{}")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(s);
    // The retry waits for the detached call and replays its answer.
    let retry = client
        .send(
            "POST",
            "/v1/charges",
            &[("idempotency-key", "gone"), ("x-delay-ms", "400")],
            "{}",
        )
        .await;
    assert_eq!(retry.status, 201);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(up.calls(), 1);
    idg.stop().await;
}

#[tokio::test]
async fn upstream_sees_key_and_fence_but_no_hop_by_hop_headers() {
    let up = TestUpstream::start().await;
    let (idg, client) = start(&up, "").await;
    client
        .send(
            "POST",
            "/v1/charges",
            &[
                ("idempotency-key", "k1"),
                ("idempotency-fence", "999999"),
                ("connection", "x-private"),
                ("x-private", "secret"),
                ("proxy-authorization", "Basic abc"),
                ("keep-alive", "timeout=5"),
            ],
            "{}",
        )
        .await;
    client.post("/v1/charges", "k2", "{}").await;
    let seen = up.seen();
    assert_eq!(seen.len(), 2);
    let h = &seen[0].headers;
    assert_eq!(h.get("idempotency-key").unwrap(), "k1");
    let f1: u64 = h
        .get("idempotency-fence")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let f2: u64 = seen[1]
        .headers
        .get("idempotency-fence")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(f1, 999999, "a client must not choose the fence");
    assert!(f2 > f1);
    for name in ["x-private", "proxy-authorization", "keep-alive"] {
        assert!(!h.contains_key(name), "{name} was forwarded");
    }
    idg.stop().await;
}

#[tokio::test]
async fn oversized_responses_pass_through_and_replay_without_body() {
    let up = TestUpstream::start().await;
    let (idg, client) = start(&up, "[idempotency]\nmax_response_body = \"1KiB\"\n").await;
    let send = || {
        client.send(
            "POST",
            "/v1/export",
            &[("idempotency-key", "big"), ("x-body-size", "100000")],
            "{}",
        )
    };
    let first = send().await;
    assert_eq!(first.status, 201);
    assert_eq!(first.body.len(), 100_000);
    let replay = send().await;
    assert_eq!(replay.status, 201);
    assert!(replay.body.is_empty());
    assert_eq!(replay.header("idempotent-body-omitted"), Some("true"));
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.header("x-call"), Some("1"));
    assert_eq!(up.calls(), 1);
    idg.stop().await;
}

#[tokio::test]
async fn upstream_timeout_is_504_and_releases_the_lease_under_release() {
    let up = TestUpstream::start().await;
    let (idg, client) = start(
        &up,
        "upstream_timeout = \"200ms\"\n[idempotency]\non_unknown_outcome = \"release\"\n",
    )
    .await;
    let slow = client
        .send(
            "POST",
            "/v1/x",
            &[("idempotency-key", "t"), ("x-delay-ms", "1000")],
            "{}",
        )
        .await;
    slow.assert_problem(504, "upstream-timeout");
    let fast = client
        .send("POST", "/v1/x", &[("idempotency-key", "t")], "{}")
        .await;
    assert_eq!(fast.status, 201);
    assert_eq!(up.calls(), 2);
    idg.stop().await;
}

#[tokio::test]
async fn unreachable_upstream_is_502() {
    // A port nothing listens on: bind one, note it, close it.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let running =
        idemgate::server::Running::start(support::config(Some(&format!("http://{addr}")), ""))
            .await
            .unwrap();
    let client = support::TestClient::new(running.proxy_addr.unwrap());
    client
        .post("/v1/x", "k", "{}")
        .await
        .assert_problem(502, "upstream-unreachable");
    // The lease was released: the retry runs (and fails the same way) rather
    // than waiting for a lease nobody holds.
    client
        .post("/v1/x", "k", "{}")
        .await
        .assert_problem(502, "upstream-unreachable");
    client
        .send("GET", "/", &[], "")
        .await
        .assert_problem(502, "upstream-unreachable");
    running.stop().await;
}

#[tokio::test]
async fn h2c_and_http1_share_the_listener_and_the_records() {
    let up = TestUpstream::start().await;
    let (idg, client) = start(&up, "").await;
    let h2 = support::TestClient::new_h2(idg.proxy_addr.unwrap());
    let a = h2.post("/v1/charges", "h2", "{}").await;
    assert_eq!(a.status, 201);
    let b = client.post("/v1/charges", "h2", "{}").await;
    assert_eq!(b.header("idempotent-replayed"), Some("true"));
    assert_eq!(a.body, b.body);
    assert_eq!(up.calls(), 1);
    idg.stop().await;
}

#[tokio::test]
async fn route_rules_override_methods_and_ttls() {
    let up = TestUpstream::start().await;
    let (idg, client) = start(
        &up,
        r#"
[[routes]]
path = "/v1/*/refunds"
methods = ["PUT"]
[[routes]]
path = "/v1/payments/**"
required = true
"#,
    )
    .await;
    // PUT is covered on refunds, POST is not.
    client
        .send("PUT", "/v1/o1/refunds", &[("idempotency-key", "r")], "{}")
        .await;
    let again = client
        .send("PUT", "/v1/o1/refunds", &[("idempotency-key", "r")], "{}")
        .await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    client
        .send("POST", "/v1/o1/refunds", &[("idempotency-key", "r")], "{}")
        .await;
    client
        .send("POST", "/v1/o1/refunds", &[("idempotency-key", "r")], "{}")
        .await;
    assert_eq!(up.calls(), 3);
    // `*` stays within a segment: this path falls to the defaults.
    client
        .send("PUT", "/v1/a/b/refunds", &[("idempotency-key", "r")], "{}")
        .await;
    client
        .send("PUT", "/v1/a/b/refunds", &[("idempotency-key", "r")], "{}")
        .await;
    assert_eq!(up.calls(), 5);
    client
        .send("POST", "/v1/payments/deep/path", &[], "{}")
        .await
        .assert_problem(400, "missing-key");
    idg.stop().await;
}

#[tokio::test]
async fn a_duplicate_waits_then_gets_409_with_retry_after() {
    let up = TestUpstream::start().await;
    let (idg, client) = start(&up, "[idempotency]\nwait_timeout = \"200ms\"\n").await;
    let c = client.clone();
    let first = tokio::spawn(async move {
        c.send(
            "POST",
            "/v1/x",
            &[("idempotency-key", "w"), ("x-delay-ms", "1000")],
            "{}",
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let dup = client
        .send(
            "POST",
            "/v1/x",
            &[("idempotency-key", "w"), ("x-delay-ms", "1000")],
            "{}",
        )
        .await;
    dup.assert_problem(409, "request-in-progress");
    assert_eq!(dup.header("retry-after"), Some("1"));
    assert_eq!(first.await.unwrap().status, 201);
    assert_eq!(up.calls(), 1);
    idg.stop().await;
}

/// Sends raw bytes and reads the whole answer (the request says close).
async fn raw_request(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends one keep-alive GET and reads until the response head and its
/// body have arrived (the test upstream answers with Content-Length).
async fn get_on(s: &mut TcpStream) -> String {
    s.write_all(b"GET /v1/limits HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "connection closed before a full response");
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if body.len() >= len {
                return head.to_owned();
            }
        }
    }
}

#[tokio::test]
async fn max_connections_holds_the_next_connection_until_one_closes() {
    let up = TestUpstream::start().await;
    let (running, _client) = start(&up, "max_connections = 2\n").await;
    let addr = running.proxy_addr.unwrap();
    let mut a = TcpStream::connect(addr).await.unwrap();
    let mut b = TcpStream::connect(addr).await.unwrap();
    let head = get_on(&mut a).await;
    assert!(head.starts_with("HTTP/1.1 201"), "{head}");
    assert!(get_on(&mut b).await.starts_with("HTTP/1.1 201"));
    // A third connection is accepted by the kernel but not served...
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"GET /v1/limits HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(300), c.read(&mut byte)).await;
    assert!(early.is_err(), "the third connection was served at once");
    assert_eq!(up.calls(), 2);
    // ...until one of the two closes: then its request runs, not lost.
    drop(a);
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&rest).contains("\r\n\r\n") {
            let n = c.read(&mut buf).await.unwrap();
            assert!(n > 0);
            rest.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert!(read.is_ok(), "the waiting connection was never served");
    assert!(String::from_utf8_lossy(&rest).starts_with("HTTP/1.1 201"));
    assert_eq!(up.calls(), 3);
    drop(b);
    running.stop().await;
}

/// An upstream that answers `HTTP/1.0` (as `python3 -m http.server` does)
/// must not make idemgate answer an HTTP/1.1 client in HTTP/1.0, on the
/// covered path or passed through.
#[tokio::test]
async fn an_http_1_0_upstream_does_not_change_the_clients_version() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.0 201 Created\r\ncontent-length: 2\r\n\r\nok")
                    .await;
            });
        }
    });
    let running =
        idemgate::server::Running::start(support::config(Some(&format!("http://{addr}")), ""))
            .await
            .unwrap();
    let proxy = running.proxy_addr.unwrap();
    for req in [
        &b"POST /v1/x HTTP/1.1\r\nhost: x\r\nidempotency-key: v10\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}"[..],
        &b"GET /v1/x HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"[..],
    ] {
        let resp = raw_request(proxy, req).await;
        assert!(resp.starts_with("HTTP/1.1 201"), "{resp}");
    }
    running.stop().await;
}
