//! gRPC through idemgate with tonic's own client and server code paths:
//! unary and server-streaming calls with a key run once and replay with
//! their status, message and trailing metadata; client- and bidi-streaming
//! calls pass through; every refusal is a gRPC status a gRPC client reads.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use http::uri::PathAndQuery;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use idemgate::server::Running;
use tokio::net::TcpListener;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};
use tonic_prost::ProstCodec;

use support::config;

#[derive(Clone, PartialEq, prost::Message)]
struct Charge {
    #[prost(string, tag = "1")]
    order: String,
    #[prost(int64, tag = "2")]
    amount: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Receipt {
    #[prost(string, tag = "1")]
    order: String,
    /// Which upstream call made it.
    #[prost(int64, tag = "2")]
    call: i64,
    #[prost(int64, tag = "3")]
    part: i64,
}

/// What the upstream counts: calls begun and answered.
#[derive(Default)]
struct Counts {
    begun: AtomicUsize,
    answered: AtomicUsize,
}

/// A gRPC server (tonic's server-side call handling on hyper's HTTP/2) on a
/// free port, service `pay.Payments`:
///
/// - `Charge` (unary): a receipt, trailing metadata `x-ledger`; waits
///   `x-delay-ms` first;
/// - `Fail` (unary): `FAILED_PRECONDITION` "card declined" with `x-ledger`;
/// - `Flaky` (unary): `UNAVAILABLE`;
/// - `Watch` (server streaming): three receipts;
/// - `Collect` (client streaming): one receipt for every charge sent;
/// - `Chat` (bidi): a receipt back for each charge, as it comes.
async fn upstream() -> (SocketAddr, Arc<Counts>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = Arc::new(Counts::default());
    let c = counts.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let c = c.clone();
            let svc = hyper::service::service_fn(move |req| route(req, c.clone()));
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc),
            );
        }
    });
    (addr, counts)
}

type Codec = ProstCodec<Receipt, Charge>;

async fn route(
    req: http::Request<hyper::body::Incoming>,
    counts: Arc<Counts>,
) -> Result<http::Response<tonic::body::Body>, std::convert::Infallible> {
    let n = counts.begun.fetch_add(1, SeqCst) as i64 + 1;
    let mut grpc = tonic::server::Grpc::new(Codec::default());
    let delay = req
        .headers()
        .get("x-delay-ms")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(0);
    let resp = match req.uri().path() {
        "/pay.Payments/Charge" => {
            let svc = tower::service_fn(move |r: Request<Charge>| async move {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                let c = r.into_inner();
                Ok::<_, Status>(Response::new(Receipt {
                    order: c.order,
                    call: n,
                    part: 0,
                }))
            });
            with_ledger(grpc.unary(svc, req).await, n)
        }
        "/pay.Payments/Fail" => {
            let svc = tower::service_fn(move |_: Request<Charge>| async move {
                let mut s = Status::failed_precondition("card declined");
                s.metadata_mut()
                    .insert("x-ledger", format!("entry-{n}").parse().unwrap());
                Err::<Response<Receipt>, _>(s)
            });
            grpc.unary(svc, req).await
        }
        "/pay.Payments/Flaky" => {
            let svc = tower::service_fn(|_: Request<Charge>| async {
                Err::<Response<Receipt>, _>(Status::unavailable("try later"))
            });
            grpc.unary(svc, req).await
        }
        "/pay.Payments/Watch" => {
            let svc = tower::service_fn(move |r: Request<Charge>| async move {
                let order = r.into_inner().order;
                let parts = (0..3).map(move |part| {
                    Ok(Receipt {
                        order: order.clone(),
                        call: n,
                        part,
                    })
                });
                Ok::<_, Status>(Response::new(futures_util::stream::iter(parts)))
            });
            with_ledger(grpc.server_streaming(svc, req).await, n)
        }
        "/pay.Payments/Collect" => {
            let svc = tower::service_fn(move |r: Request<tonic::Streaming<Charge>>| async move {
                let mut s = r.into_inner();
                let mut count = 0;
                while let Some(c) = s.message().await? {
                    count += c.amount;
                }
                Ok::<_, Status>(Response::new(Receipt {
                    order: "collected".into(),
                    call: n,
                    part: count,
                }))
            });
            grpc.client_streaming(svc, req).await
        }
        "/pay.Payments/Chat" => {
            let svc = tower::service_fn(move |r: Request<tonic::Streaming<Charge>>| async move {
                let replies = r.into_inner().map(move |c| {
                    c.map(|c| Receipt {
                        order: c.order,
                        call: n,
                        part: c.amount,
                    })
                });
                Ok::<_, Status>(Response::new(replies))
            });
            grpc.streaming(svc, req).await
        }
        _ => http::Response::new(tonic::body::Body::empty()),
    };
    counts.answered.fetch_add(1, SeqCst);
    Ok(resp)
}

/// Adds trailing metadata `x-ledger: entry-N` to a successful response.
fn with_ledger(
    resp: http::Response<tonic::body::Body>,
    n: i64,
) -> http::Response<tonic::body::Body> {
    resp.map(|body| {
        tonic::body::Body::new(body.map_frame(move |frame| match frame.into_trailers() {
            Ok(mut t) => {
                t.insert("x-ledger", format!("entry-{n}").parse().unwrap());
                http_body::Frame::trailers(t)
            }
            Err(frame) => frame,
        }))
    })
}

async fn idemgate(up: SocketAddr, extra: &str) -> Running {
    let text = format!("upstream_protocol = \"h2c\"\n{extra}");
    Running::start(config(Some(&format!("http://{up}")), &text))
        .await
        .unwrap()
}

async fn client(r: &Running) -> tonic::client::Grpc<Channel> {
    let channel = Channel::from_shared(format!("http://{}", r.proxy_addr.unwrap()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    tonic::client::Grpc::new(channel)
}

fn charge(order: &str, key: Option<&str>) -> Request<Charge> {
    let mut req = Request::new(Charge {
        order: order.into(),
        amount: 100,
    });
    if let Some(k) = key {
        req.metadata_mut()
            .insert("idempotency-key", k.parse().unwrap());
    }
    req
}

async fn unary(
    c: &mut tonic::client::Grpc<Channel>,
    method: &'static str,
    req: Request<Charge>,
) -> Result<Response<Receipt>, Status> {
    c.ready().await.unwrap();
    let codec = ProstCodec::<Charge, Receipt>::default();
    c.unary(req, PathAndQuery::from_static(method), codec).await
}

fn meta<'a>(m: &'a tonic::metadata::MetadataMap, name: &str) -> Option<&'a str> {
    m.get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_without_a_key_is_unchanged() {
    let (up, counts) = upstream().await;
    let r = idemgate(up, "").await;
    let mut c = client(&r).await;
    for call in 1..=2 {
        let got = unary(&mut c, "/pay.Payments/Charge", charge("o-1", None))
            .await
            .unwrap();
        assert_eq!(got.get_ref().call, call);
        assert_eq!(
            meta(got.metadata(), "x-ledger"),
            Some(&*format!("entry-{call}"))
        );
        assert_eq!(meta(got.metadata(), "idempotent-replayed"), None);
    }
    assert_eq!(counts.begun.load(SeqCst), 2);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unary_call_with_a_key_runs_once_and_replays_with_its_trailers() {
    let (up, counts) = upstream().await;
    let r = idemgate(up, "").await;
    let mut c = client(&r).await;
    let first = unary(&mut c, "/pay.Payments/Charge", charge("o-2", Some("g-1")))
        .await
        .unwrap();
    let again = unary(&mut c, "/pay.Payments/Charge", charge("o-2", Some("g-1")))
        .await
        .unwrap();
    assert_eq!(first.get_ref(), again.get_ref());
    assert_eq!(again.get_ref().call, 1);
    assert_eq!(meta(first.metadata(), "x-ledger"), Some("entry-1"));
    assert_eq!(meta(again.metadata(), "x-ledger"), Some("entry-1"));
    assert_eq!(meta(again.metadata(), "idempotent-replayed"), Some("true"));
    assert_eq!(counts.begun.load(SeqCst), 1);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_duplicate_joins_the_call_in_flight() {
    let (up, counts) = upstream().await;
    let r = idemgate(up, "").await;
    let mut calls = Vec::new();
    for _ in 0..2 {
        let mut c = client(&r).await;
        calls.push(tokio::spawn(async move {
            let mut req = charge("o-3", Some("g-join"));
            req.metadata_mut()
                .insert("x-delay-ms", MetadataValue::from_static("300"));
            unary(&mut c, "/pay.Payments/Charge", req).await.unwrap()
        }));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let a = calls.remove(0).await.unwrap();
    let b = calls.remove(0).await.unwrap();
    assert_eq!(a.get_ref(), b.get_ref());
    assert_eq!(meta(b.metadata(), "x-ledger"), Some("entry-1"));
    assert_eq!(meta(b.metadata(), "idempotent-replayed"), Some("true"));
    assert_eq!(counts.begun.load(SeqCst), 1);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_status_replays_with_its_message_and_metadata() {
    let (up, counts) = upstream().await;
    let r = idemgate(up, "").await;
    let mut c = client(&r).await;
    for _ in 0..2 {
        let e = unary(&mut c, "/pay.Payments/Fail", charge("o-4", Some("g-fail")))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert_eq!(e.message(), "card declined");
        assert_eq!(meta(e.metadata(), "x-ledger"), Some("entry-1"));
    }
    assert_eq!(counts.begun.load(SeqCst), 1);
    // UNAVAILABLE says "try again": not stored, the retry runs.
    for _ in 0..2 {
        let e = unary(
            &mut c,
            "/pay.Payments/Flaky",
            charge("o-5", Some("g-flaky")),
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), Code::Unavailable);
    }
    assert_eq!(counts.begun.load(SeqCst), 3);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_streaming_call_with_a_key_runs_once_and_replays_whole() {
    let (up, counts) = upstream().await;
    let r = idemgate(up, "").await;
    let mut c = client(&r).await;
    let mut runs = Vec::new();
    for _ in 0..2 {
        c.ready().await.unwrap();
        let resp = c
            .server_streaming(
                charge("o-6", Some("g-watch")),
                PathAndQuery::from_static("/pay.Payments/Watch"),
                ProstCodec::<Charge, Receipt>::default(),
            )
            .await
            .unwrap();
        let replayed = meta(resp.metadata(), "idempotent-replayed").map(str::to_owned);
        let mut stream = resp.into_inner();
        let mut got = Vec::new();
        while let Some(m) = stream.message().await.unwrap() {
            got.push(m);
        }
        let trailers = stream.trailers().await.unwrap().unwrap();
        runs.push((
            got,
            meta(&trailers, "x-ledger").map(str::to_owned),
            replayed,
        ));
    }
    assert_eq!(runs[0].0.len(), 3);
    assert_eq!(runs[0].0, runs[1].0);
    assert_eq!(runs[0].1.as_deref(), Some("entry-1"));
    assert_eq!(runs[1].1.as_deref(), Some("entry-1"));
    assert_eq!(runs[1].2.as_deref(), Some("true"));
    assert_eq!(counts.begun.load(SeqCst), 1);
    r.stop().await;
}

/// A request stream fed by a channel, for the streaming calls.
fn fed() -> (
    tokio::sync::mpsc::Sender<Charge>,
    impl futures_util::Stream<Item = Charge> + Send + 'static,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    (tx, stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_and_bidi_streaming_calls_pass_through_without_state() {
    let (up, counts) = upstream().await;
    let r = idemgate(up, "").await;
    let mut c = client(&r).await;
    // Client streaming, the same key twice: both run.
    for call in 1..=2 {
        let (tx, stream) = fed();
        let mut req = Request::new(stream);
        req.metadata_mut()
            .insert("idempotency-key", "g-collect".parse().unwrap());
        c.ready().await.unwrap();
        let sending = tokio::spawn(async move {
            for amount in [1, 2, 3] {
                tx.send(Charge {
                    order: "x".into(),
                    amount,
                })
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let got = c
            .client_streaming(
                req,
                PathAndQuery::from_static("/pay.Payments/Collect"),
                ProstCodec::<Charge, Receipt>::default(),
            )
            .await
            .unwrap();
        sending.await.unwrap();
        assert_eq!(got.get_ref().part, 6);
        assert_eq!(got.get_ref().call, call);
    }
    // Bidi: each reply comes before the next message is sent.
    let (tx, stream) = fed();
    let mut req = Request::new(stream);
    req.metadata_mut()
        .insert("idempotency-key", "g-chat".parse().unwrap());
    c.ready().await.unwrap();
    tx.send(Charge {
        order: "hello".into(),
        amount: 1,
    })
    .await
    .unwrap();
    let mut replies = c
        .streaming(
            req,
            PathAndQuery::from_static("/pay.Payments/Chat"),
            ProstCodec::<Charge, Receipt>::default(),
        )
        .await
        .unwrap()
        .into_inner();
    for amount in 1..=3 {
        let reply = tokio::time::timeout(Duration::from_secs(5), replies.message())
            .await
            .expect("a reply before the next message")
            .unwrap()
            .unwrap();
        assert_eq!(reply.part, amount);
        if amount < 3 {
            tx.send(Charge {
                order: "more".into(),
                amount: amount + 1,
            })
            .await
            .unwrap();
        }
    }
    drop(tx);
    assert!(replies.message().await.unwrap().is_none());
    assert_eq!(counts.begun.load(SeqCst), 3);
    assert_eq!(
        r.metrics
            .requests
            .with_label_values(&["pass_through"])
            .get(),
        3
    );
    r.stop().await;
}

/// A refusal as a gRPC client reads it: `code`, idemgate's problem type in
/// `idemgate-problem`, and whether a retry can help.
fn assert_refused(e: &Status, code: Code, problem: &str, retry: bool) {
    assert_eq!(e.code(), code, "{e:?}");
    let kind = meta(e.metadata(), "idemgate-problem").unwrap_or_default();
    assert!(
        kind.ends_with(&format!("/{problem}")),
        "{kind} is not {problem}"
    );
    let hint = if retry { "true" } else { "false" };
    assert_eq!(meta(e.metadata(), "x-should-retry"), Some(hint), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_is_a_grpc_status() {
    let (up, counts) = upstream().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let extra = format!(
        r#"
[[routes]]
path = "/pay.Payments/Fail"
required = true
[[routes]]
path = "/pay.Payments/Flaky"
upstream = "http://{closed}"
[[routes]]
path = "/pay.Payments/Watch"
max_request_body = 5
[[routes]]
path = "/pay.Payments/Collect"
preset = "github"
secrets = [{{ env = "PATH" }}]
[[routes]]
path = "/pay.Payments/Chat"
new_keys_per_scope = "1/h"
[[routes]]
path = "/pay.Payments/Charge"
wait_timeout = "0s"
upstream_timeout = "400ms"
"#
    );
    let r = idemgate(up, &extra).await;
    let mut c = client(&r).await;
    let call = |m: &'static str, key: Option<&'static str>| {
        let mut c = c.clone();
        async move { unary(&mut c, m, charge("o", key)).await.unwrap_err() }
    };
    // A required key, missing; a malformed one.
    assert_refused(
        &call("/pay.Payments/Fail", None).await,
        Code::InvalidArgument,
        "missing-key",
        false,
    );
    let long: &'static str = Box::leak("k".repeat(300).into_boxed_str());
    assert_refused(
        &call("/pay.Payments/Fail", Some(long)).await,
        Code::InvalidArgument,
        "invalid-key",
        false,
    );
    // Upstream unreachable: nothing sent, the retry may work.
    assert_refused(
        &call("/pay.Payments/Flaky", Some("g-u")).await,
        Code::Unavailable,
        "upstream-unreachable",
        true,
    );
    // Body too large.
    assert_refused(
        &call("/pay.Payments/Watch", Some("g-big")).await,
        Code::ResourceExhausted,
        "body-too-large",
        false,
    );
    // A webhook route's signature, missing.
    assert_refused(
        &call("/pay.Payments/Collect", Some("g-sig")).await,
        Code::Unauthenticated,
        "invalid-signature",
        false,
    );
    // A key reused with a different request.
    let mut c2 = c.clone();
    unary(
        &mut c2,
        "/pay.Payments/Charge",
        charge("o-a", Some("g-reuse")),
    )
    .await
    .unwrap();
    let e = unary(
        &mut c2,
        "/pay.Payments/Charge",
        charge("o-b", Some("g-reuse")),
    )
    .await
    .unwrap_err();
    assert_refused(&e, Code::InvalidArgument, "key-reused", false);
    // Over the caller's rate of new keys.
    let _ = unary(&mut c2, "/pay.Payments/Chat", charge("o", Some("g-rate-1"))).await;
    let e = unary(&mut c2, "/pay.Payments/Chat", charge("o", Some("g-rate-2")))
        .await
        .unwrap_err();
    assert_refused(&e, Code::ResourceExhausted, "too-many-keys", true);
    // In progress with wait_timeout = "0s": ABORTED at once, while the
    // original still runs.
    let mut c3 = c.clone();
    let first = tokio::spawn(async move {
        unary(
            &mut c3,
            "/pay.Payments/Charge",
            delayed("o-slow", "g-slow", "300"),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let e = unary(
        &mut c,
        "/pay.Payments/Charge",
        delayed("o-slow", "g-slow", "300"),
    )
    .await
    .unwrap_err();
    assert_refused(&e, Code::Aborted, "request-in-progress", true);
    assert!(!first.is_finished(), "answered after the original");
    first.await.unwrap().unwrap();
    // The upstream times out (400 ms): DEADLINE_EXCEEDED; the retry finds
    // the outcome unknown: FAILED_PRECONDITION, not to be retried blindly.
    let e = unary(
        &mut c,
        "/pay.Payments/Charge",
        delayed("o-late", "g-late", "2000"),
    )
    .await
    .unwrap_err();
    assert_refused(&e, Code::DeadlineExceeded, "upstream-timeout", false);
    let e = unary(
        &mut c,
        "/pay.Payments/Charge",
        delayed("o-late", "g-late", "2000"),
    )
    .await
    .unwrap_err();
    assert_refused(&e, Code::FailedPrecondition, "outcome-unknown", false);
    let _ = counts;
    r.stop().await;
}

fn delayed(order: &str, key: &str, ms: &'static str) -> Request<Charge> {
    let mut req = charge(order, Some(key));
    req.metadata_mut()
        .insert("x-delay-ms", MetadataValue::from_static(ms));
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_take_the_key_is_unavailable() {
    let (up, counts) = upstream().await;
    let r = idemgate(up, "[store]\nmax_entries = 1\n").await;
    let mut c = client(&r).await;
    unary(&mut c, "/pay.Payments/Charge", charge("o", Some("g-s1")))
        .await
        .unwrap();
    let e = unary(&mut c, "/pay.Payments/Charge", charge("o", Some("g-s2")))
        .await
        .unwrap_err();
    assert_refused(&e, Code::Unavailable, "store-unavailable", true);
    assert_eq!(counts.begun.load(SeqCst), 1);
    r.stop().await;
}

/// A unary call made by hand over h2c (tonic's client enforces
/// `grpc-timeout` on its own side, which would race idemgate's answer):
/// the response's head and trailers, merged.
async fn raw_call(proxy: SocketAddr, path: &str, headers: &[(&str, &str)]) -> http::HeaderMap {
    use prost::Message;
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let msg = Charge {
        order: "raw".into(),
        amount: 1,
    }
    .encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    let mut req = http::Request::post(format!("http://{proxy}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let req = req
        .body(http_body_util::Full::new(bytes::Bytes::from(frame)))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let mut all = parts.headers;
    if let Some(t) = body.collect().await.unwrap().trailers() {
        all.extend(t.clone());
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_timeout_bounds_the_upstream_call() {
    let (up, counts) = upstream().await;
    let r = idemgate(up, "").await;
    let proxy = r.proxy_addr.unwrap();
    let status =
        |h: &http::HeaderMap, name: &str| h.get(name).map(|v| v.to_str().unwrap().to_owned());
    // Shorter than upstream_timeout (60 s): idemgate answers when it is up,
    // while the upstream is still at work.
    let got = raw_call(
        proxy,
        "/pay.Payments/Charge",
        &[
            ("idempotency-key", "g-deadline"),
            ("x-delay-ms", "3000"),
            ("grpc-timeout", "300m"),
        ],
    )
    .await;
    assert_eq!(status(&got, "grpc-status").as_deref(), Some("4"), "{got:?}");
    assert!(status(&got, "idemgate-problem")
        .unwrap()
        .ends_with("/upstream-timeout"));
    assert_eq!(counts.begun.load(SeqCst), 1);
    assert_eq!(
        counts.answered.load(SeqCst),
        0,
        "answered before the upstream did"
    );
    // Without a key too (pass-through).
    let got = raw_call(
        proxy,
        "/pay.Payments/Charge",
        &[("x-delay-ms", "3000"), ("grpc-timeout", "300m")],
    )
    .await;
    assert_eq!(status(&got, "grpc-status").as_deref(), Some("4"), "{got:?}");
    assert_eq!(counts.answered.load(SeqCst), 0);
    // A malformed one is refused before anything else.
    let got = raw_call(
        proxy,
        "/pay.Payments/Charge",
        &[("idempotency-key", "g-bad"), ("grpc-timeout", "soon")],
    )
    .await;
    assert_eq!(status(&got, "grpc-status").as_deref(), Some("3"), "{got:?}");
    assert!(status(&got, "idemgate-problem")
        .unwrap()
        .ends_with("/invalid-grpc-timeout"));
    assert_eq!(counts.begun.load(SeqCst), 2);
    r.stop().await;
}
