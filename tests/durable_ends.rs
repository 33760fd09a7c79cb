//! A response the client saw complete is a response the store kept: Redis
//! (and a Cluster node) SIGKILLed while first requests finish, and Redis
//! stalled past `store.timeout`, leave no clean-ended response without its
//! record; the others end aborted or with a problem. A stream's first
//! bytes still flow at once: only its end waits.

mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Response;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use idemgate::server::Running;
use tokio::net::TcpListener;

use support::durable::{every_clean_end_replays, load};
use support::redis_server::{free_port, RedisServer};
use support::{config, serve_http1, TestClient, TestUpstream};

/// Redis that keeps every acknowledged write: AOF, fsync on every write
/// (and takes `DEBUG SLEEP`, for the stall tests).
const DURABLE: &[&str] = &[
    "--appendonly",
    "yes",
    "--appendfsync",
    "always",
    "--enable-debug-command",
    "yes",
];

fn store_toml(urls: &[String], cluster: bool) -> String {
    let list: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
    format!(
        "[store]\nbackend = \"{}\"\nurls = [{}]\ntimeout = \"300ms\"\nreplay_cache = 0\n",
        if cluster { "redis-cluster" } else { "redis" },
        list.join(", ")
    )
}

/// Sixteen clients of new keys through idemgate on `store`; 700 ms in,
/// `kill` SIGKILLs a server and starts it again (on a blocking thread);
/// a second later every clean-ended key must replay. Returns the server(s)
/// `kill` handed back, and the tally.
async fn under_a_kill<S: Send + 'static>(
    store: &str,
    kill: impl FnOnce() -> S + Send + 'static,
) -> (S, HashMap<&'static str, usize>) {
    let up = TestUpstream::start().await;
    let r = Running::start(config(Some(&up.url()), store))
        .await
        .unwrap();
    let c = TestClient::new(r.proxy_addr.unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let loads = load(&c, &stop);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let servers = tokio::task::spawn_blocking(kill).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    let mut ended = Vec::new();
    for l in loads {
        ended.extend(l.await.unwrap());
    }
    let tally = every_clean_end_replays(&c, &ended).await;
    assert!(tally.get("clean").copied().unwrap_or(0) > 100, "{tally:?}");
    r.stop().await;
    (servers, tally)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_while_requests_finish_keeps_every_clean_end() {
    let mut redis = RedisServer::start_with(free_port(false), DURABLE);
    let store = store_toml(&[redis.url()], false);
    let (_redis, tally) = under_a_kill(&store, move || {
        redis.kill();
        std::thread::sleep(Duration::from_millis(300));
        redis.restart();
        redis
    })
    .await;
    println!("Redis SIGKILLed and restarted under load: {tally:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_node_killed_while_requests_finish_keeps_every_clean_end() {
    let mut cluster = support::redis_server::RedisCluster::start_with(DURABLE);
    let store = store_toml(&cluster.urls(), true);
    let (_cluster, tally) = under_a_kill(&store, move || {
        cluster.nodes[1].kill();
        std::thread::sleep(Duration::from_millis(300));
        cluster.nodes[1].restart();
        cluster.wait_ok();
        cluster
    })
    .await;
    println!("a Cluster master SIGKILLed and restarted under load: {tally:?}");
}

/// One request whose end comes while Redis is stalled by `stall` for
/// longer than `store.timeout`: a `streamed` response (its first event sent
/// at once, the others 150 ms apart) is aborted after its first bytes; a
/// whole one (the upstream answers after 600 ms) never sent its head, and is
/// a `502 response-not-stored` instead. Either way it never runs twice.
async fn a_stall_at_the_end(stall: &[&str], streamed: bool) {
    let redis = RedisServer::start_with(free_port(false), DURABLE);
    let up = TestUpstream::start().await;
    let (sse, sse_calls) = sse_upstream().await;
    let url = if streamed {
        format!("http://{sse}")
    } else {
        up.url()
    };
    // A short wait: a retry that finds the lease still held says so soon.
    let extra = format!(
        "{}[idempotency]\nwait_timeout = \"500ms\"\n",
        store_toml(&[redis.url()], false)
    );
    let r = Running::start(config(Some(&url), &extra)).await.unwrap();
    let c = TestClient::new(r.proxy_addr.unwrap());
    let headers = [("idempotency-key", "stalled"), ("x-delay-ms", "600")];
    let first = {
        let c = c.clone();
        tokio::spawn(async move { c.try_send("POST", "/v1/charges", &headers, "{}").await })
    };
    // Before the end: 300 ms of the upstream's 600, or between the
    // stream's first event and its last (at 300 ms).
    tokio::time::sleep(Duration::from_millis(if streamed { 100 } else { 300 })).await;
    let stall: Vec<String> = stall.iter().map(|s| s.to_string()).collect();
    let stalled = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = stall.iter().map(String::as_str).collect();
        redis.cli(&args);
        redis
    });
    let got = first.await.unwrap();
    if streamed {
        // Its head (200) went out with the first event; its end never did.
        let (status, _) = got.expect_err("ended as if complete");
        assert_eq!(status, 200);
    } else {
        let got = got.expect("a problem, whole");
        got.assert_problem(502, "response-not-stored");
        assert_eq!(got.header("x-should-retry"), Some("false"));
    }
    let redis = stalled.await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // The retry finds the record (Redis ran the write once it woke), the
    // outcome held as unknown, or (the store took neither write) the lease
    // still held until it lapses: never a second call upstream.
    let again = c.send("POST", "/v1/charges", &headers, "{}").await;
    // The SSE upstream answers 200, the other 201.
    let answered = if streamed { 200 } else { 201 };
    match again.status.as_u16() {
        s if s == answered => assert_eq!(again.header("idempotent-replayed"), Some("true")),
        409 => {
            let kind = again.json()["type"].as_str().unwrap().to_owned();
            assert!(
                kind.ends_with("/outcome-unknown") || kind.ends_with("/request-in-progress"),
                "{kind}"
            );
        }
        other => panic!("{other}: {:?}", again.body),
    }
    let calls = if streamed {
        sse_calls.load(Ordering::SeqCst)
    } else {
        up.calls()
    };
    assert_eq!(calls, 1);
    r.stop().await;
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_asleep_past_the_store_timeout_aborts_a_streamed_response() {
    a_stall_at_the_end(&["DEBUG", "SLEEP", "1.5"], true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_paused_past_the_store_timeout_aborts_a_streamed_response() {
    a_stall_at_the_end(&["CLIENT", "PAUSE", "1500", "WRITE"], true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_body_not_stored_is_a_problem_not_a_clean_201() {
    a_stall_at_the_end(&["DEBUG", "SLEEP", "1.5"], false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_body_not_stored_through_a_paused_redis_is_a_problem() {
    a_stall_at_the_end(&["CLIENT", "PAUSE", "1500", "WRITE"], false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_body_not_stored_is_a_problem_not_a_clean_204() {
    let redis = RedisServer::start_with(free_port(false), DURABLE);
    let up = TestUpstream::start().await;
    let r = Running::start(config(Some(&up.url()), &store_toml(&[redis.url()], false)))
        .await
        .unwrap();
    let c = TestClient::new(r.proxy_addr.unwrap());
    let headers = [
        ("idempotency-key", "empty"),
        ("x-delay-ms", "600"),
        ("x-status", "204"),
    ];
    let first = {
        let c = c.clone();
        tokio::spawn(async move { c.send("POST", "/v1/charges", &headers, "{}").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stalled = tokio::task::spawn_blocking(move || {
        redis.cli(&["DEBUG", "SLEEP", "1.5"]);
        redis
    });
    // The 204's head is its end: it waited for the store, which did not
    // take it in time.
    let got = first.await.unwrap();
    got.assert_problem(502, "response-not-stored");
    assert_eq!(got.header("x-should-retry"), Some("false"));
    drop(stalled.await.unwrap());
    r.stop().await;
}

/// An SSE upstream: three events 150 ms apart, each flushed; and how
/// many requests it has had.
async fn sse_upstream() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    serve_http1(listener, move |_req| {
        counted.fetch_add(1, Ordering::SeqCst);
        async {
            let events = futures_util::stream::unfold(0, |i| async move {
                if i == 3 {
                    return None;
                }
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(150)).await;
                }
                let data = Bytes::from(format!("data: {i}\n\n"));
                Some((Ok::<_, Infallible>(Frame::data(data)), i + 1))
            });
            let mut resp = Response::new(StreamBody::new(events).boxed());
            resp.headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            Ok::<_, Infallible>(resp)
        }
    });
    (addr, calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_flows_at_once_and_ends_once_its_record_is_kept() {
    let redis = RedisServer::start_with(free_port(false), DURABLE);
    let (up, _) = sse_upstream().await;
    let r = Running::start(config(
        Some(&format!("http://{up}")),
        &store_toml(&[redis.url()], false),
    ))
    .await
    .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<Bytes>>();
    let req = http::Request::post(format!("http://{}/v1/chat", r.proxy_addr.unwrap()))
        .header("idempotency-key", "sse-1")
        .body(http_body_util::Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let started = Instant::now();
    let mut body = client.request(req).await.unwrap().into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"data: 0\n\n");
    let ttfb = started.elapsed();
    assert!(
        ttfb < Duration::from_millis(300),
        "first byte after {ttfb:?}"
    );
    let mut rest = Vec::new();
    while let Some(f) = body.frame().await {
        if let Ok(d) = f.unwrap().into_data() {
            rest.extend_from_slice(&d);
        }
    }
    assert_eq!(&rest[..], b"data: 1\n\ndata: 2\n\n");
    // The clean end came after the record: it is there at once.
    let record = TestClient::new(r.admin_addr)
        .send("GET", "/v1/keys?key=sse-1&path=/v1/chat", &[], "")
        .await;
    assert_eq!(record.status, 200, "{:?}", record.body);
    assert_eq!(record.json()["state"], "completed");
    r.stop().await;
    drop(redis);
}
