//! What HTTP clients see of the protocol beyond a request and a response:
//! trailers both ways on HTTP/1.1 (chunked), stored and replayed; refusals
//! that say whether retrying can help (`x-should-retry`, `Retry-After`, a
//! route's `no_retry_headers`), the upstream's own hints passed on
//! unchanged; and `wait_timeout = "0s"`, the strict setting, on memory and
//! on Redis.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;

use support::redis_server::{store_toml, RedisServer};
use support::{serve_http1, start, start_at, TestUpstream};

type BoxBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// An HTTP/1.1 upstream that answers with a chunked body and trailers
/// (`x-checksum: call-N`, declared in `Trailer`), and records the
/// trailers each request came with.
async fn trailing_upstream() -> (SocketAddr, Arc<Mutex<Vec<Option<HeaderMap>>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    serve_http1(listener, move |req: Request<Incoming>| {
        let s = s.clone();
        async move {
            let collected = req.into_body().collect().await.unwrap();
            let n = {
                let mut seen = s.lock().unwrap();
                seen.push(collected.trailers().cloned());
                seen.len()
            };
            let mut trailers = HeaderMap::new();
            trailers.insert("x-checksum", format!("call-{n}").parse().unwrap());
            let frames: Vec<Result<_, Infallible>> = vec![
                Ok(Frame::data(Bytes::from_static(b"part one, "))),
                Ok(Frame::data(Bytes::from_static(b"part two"))),
                Ok(Frame::trailers(trailers)),
            ];
            let mut resp =
                Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed());
            *resp.status_mut() = http::StatusCode::CREATED;
            resp.headers_mut()
                .insert("trailer", HeaderValue::from_static("x-checksum"));
            Ok::<_, Infallible>(resp)
        }
    });
    (addr, seen)
}

/// Sends `body` chunked with `trailers` (when given) and reads the
/// response whole: status, headers, body and trailers.
async fn send(
    proxy: SocketAddr,
    key: &str,
    trailers: Option<HeaderMap>,
) -> (u16, HeaderMap, Bytes, Option<HeaderMap>) {
    let client: Client<_, BoxBody> = Client::builder(TokioExecutor::new()).build_http();
    let mut frames: Vec<Result<_, Infallible>> =
        vec![Ok(Frame::data(Bytes::from_static(b"{\"amount\":1}")))];
    if let Some(t) = trailers {
        frames.push(Ok(Frame::trailers(t)));
    }
    let body = StreamBody::new(futures_util::stream::iter(frames)).boxed();
    let req = Request::post(format!("http://{proxy}/v1/charges"))
        .header("idempotency-key", key)
        .header("te", "trailers")
        // HTTP/1.1 sends the trailers it declares.
        .header("trailer", "x-request-digest")
        .body(body)
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    (
        parts.status.as_u16(),
        parts.headers,
        collected.to_bytes(),
        trailers,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_trailers_are_sent_on_stored_and_replayed() {
    let (up, seen) = trailing_upstream().await;
    let (r, _) = start_at(&format!("http://{up}"), "").await;
    let proxy = r.proxy_addr.unwrap();
    let mut sent = HeaderMap::new();
    sent.insert("x-request-digest", HeaderValue::from_static("sha-1"));
    let first = send(proxy, "tr-1", Some(sent.clone())).await;
    let again = send(proxy, "tr-1", Some(sent)).await;
    for (status, headers, body, trailers) in [&first, &again] {
        assert_eq!(*status, 201);
        assert_eq!(&body[..], b"part one, part two");
        let t = trailers.as_ref().expect("trailers reached the client");
        assert_eq!(t["x-checksum"], "call-1");
        assert_eq!(headers["trailer"], "x-checksum");
    }
    assert_eq!(again.1["idempotent-replayed"], "true");
    // The request's trailers went upstream with it, once.
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].as_ref().unwrap()["x-request-digest"], "sha-1");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_over_the_header_limit_are_refused_like_headers() {
    let (up, seen) = trailing_upstream().await;
    let (r, _) = start_at(&format!("http://{up}"), "").await;
    // 64 KiB of trailers, past the 64 KiB the header section may take.
    let mut big = HeaderMap::new();
    let mut names = Vec::new();
    for i in 0..70 {
        names.push(format!("x-pad-{i}"));
        big.insert(
            http::HeaderName::from_bytes(format!("x-pad-{i}").as_bytes()).unwrap(),
            HeaderValue::from_str(&"p".repeat(1000)).unwrap(),
        );
    }
    let client: Client<_, BoxBody> = Client::builder(TokioExecutor::new()).build_http();
    let frames: Vec<Result<_, Infallible>> = vec![
        Ok(Frame::data(Bytes::from_static(b"{}"))),
        Ok(Frame::trailers(big)),
    ];
    let req = Request::post(format!("http://{}/v1/charges", r.proxy_addr.unwrap()))
        .header("idempotency-key", "tr-big")
        .header("trailer", names.join(", "))
        .body(StreamBody::new(futures_util::stream::iter(frames)).boxed())
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 400);
    let doc: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert!(
        doc["type"].as_str().unwrap().ends_with("/bad-body"),
        "{doc}"
    );
    assert!(seen.lock().unwrap().is_empty(), "the request went upstream");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_say_whether_a_retry_can_help() {
    let up = TestUpstream::start().await;
    let extra = r#"
[[routes]]
path = "/v1/strict/**"
required = true
no_retry_headers = { "Stripe-Should-Retry" = "false" }
"#;
    let (r, c) = start(&up, extra).await;
    // Cannot help: the key reused with another body.
    c.post("/v1/strict/charges", "h-1", "{\"a\":1}").await;
    let reused = c.post("/v1/strict/charges", "h-1", "{\"a\":2}").await;
    reused.assert_problem(422, "key-reused");
    assert_eq!(reused.header("x-should-retry"), Some("false"));
    assert_eq!(reused.header("stripe-should-retry"), Some("false"));
    // Cannot help: no key on a route that requires one.
    let missing = c.send("POST", "/v1/strict/charges", &[], "{}").await;
    missing.assert_problem(400, "missing-key");
    assert_eq!(missing.header("x-should-retry"), Some("false"));
    assert_eq!(missing.header("stripe-should-retry"), Some("false"));
    // (In progress and store outages, which a retry can clear, are below.)
    // An upstream's own answer passes through as it is: no hint added.
    let upstream_said = c
        .send(
            "POST",
            "/v1/other",
            &[("idempotency-key", "h-3"), ("x-status", "409")],
            "{}",
        )
        .await;
    assert_eq!(upstream_said.status, 409);
    assert_eq!(
        upstream_said.header("x-should-retry"),
        None,
        "idemgate adds none to upstream answers"
    );
    r.stop().await;
}

/// The strict setting: a duplicate of a request in flight gets 409 at
/// once, even on the process that runs the original (no joining), while
/// the original is still running.
async fn strict_wait_answers_at_once(store: &str) {
    let up = TestUpstream::start().await;
    let extra = format!("{store}[idempotency]\nwait_timeout = \"0s\"\n");
    let (r, c) = start(&up, &extra).await;
    let first = {
        let c = c.clone();
        tokio::spawn(async move {
            c.send(
                "POST",
                "/v1/charges",
                &[("idempotency-key", "strict"), ("x-delay-ms", "800")],
                "{}",
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let dup = c
        .send(
            "POST",
            "/v1/charges",
            &[("idempotency-key", "strict"), ("x-delay-ms", "800")],
            "{}",
        )
        .await;
    dup.assert_problem(409, "request-in-progress");
    assert_eq!(dup.header("retry-after"), Some("1"));
    assert_eq!(dup.header("x-should-retry"), Some("true"));
    assert!(!first.is_finished(), "answered after the original finished");
    assert_eq!(first.await.unwrap().status, 201);
    // Once it is done, duplicates replay as ever.
    let again = c
        .send(
            "POST",
            "/v1/charges",
            &[("idempotency-key", "strict"), ("x-delay-ms", "800")],
            "{}",
        )
        .await;
    assert_eq!(again.status, 201);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(up.calls(), 1);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_timeout_zero_answers_409_at_once_on_memory() {
    strict_wait_answers_at_once("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_timeout_zero_answers_409_at_once_on_redis() {
    let redis = RedisServer::start();
    strict_wait_answers_at_once(&store_toml(&redis.url())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_says_retry() {
    let redis = RedisServer::start();
    let up = TestUpstream::start().await;
    let (r, c) = start(&up, &store_toml(&redis.url())).await;
    redis.pause(true);
    let got = c.post("/v1/charges", "outage", "{}").await;
    redis.pause(false);
    got.assert_problem(503, "store-unavailable");
    assert_eq!(got.header("x-should-retry"), Some("true"));
    assert_eq!(got.header("retry-after"), Some("1"));
    r.stop().await;
}
