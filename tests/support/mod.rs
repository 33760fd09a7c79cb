//! Test support: a real upstream that counts its calls, an HTTP client, and
//! idemgate started in-process on free loopback ports; and, as modules, the
//! store contracts ([`contract`], [`dedup_contract`]), real Redis and
//! PostgreSQL servers ([`redis_server`], [`postgres_server`]), idemgate as
//! a process ([`proc`]), a fault-injecting TCP proxy ([`faults`]) and the
//! clean-end load and its replay check ([`durable`]). Each test binary uses
//! a part.
#![allow(dead_code)]

pub mod contract;
pub mod dedup_contract;
pub mod deliveries;
pub mod durable;
pub mod faults;
pub mod ledger;
pub mod nats_server;
pub mod postgres_server;
pub mod proc;
pub mod rabbitmq;
pub mod redis_server;
pub mod streams;
pub mod tls;
pub mod webhooks;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use idemgate::config::{Config, FileConfig, RunArgs};
use idemgate::server::Running;
use tokio::net::TcpListener;

/// What the upstream saw of one call.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: http::Method,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A real HTTP/1.1 upstream on a free port. Each request may steer it:
/// `x-delay-ms` (sleep before answering), `x-status` (default 201),
/// `x-body-size` (answer that many bytes instead of JSON).
pub struct TestUpstream {
    pub addr: SocketAddr,
    calls: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TestUpstream {
    pub async fn start() -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_on(addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (c, s) = (calls.clone(), seen.clone());
        let task = serve_http1(listener, move |req| answer(req, c.clone(), s.clone()));
        TestUpstream {
            addr,
            calls,
            seen,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(
    req: Request<Incoming>,
    calls: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    seen.lock().unwrap().push(Seen {
        method: parts.method.clone(),
        path: parts.uri.path().to_owned(),
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    if let Some(ms) = header("x-delay-ms").and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let status = header("x-status")
        .and_then(|v| v.parse().ok())
        .and_then(|v| StatusCode::from_u16(v).ok())
        .unwrap_or(StatusCode::CREATED);
    let out = match header("x-body-size").and_then(|v| v.parse::<usize>().ok()) {
        Some(size) => Bytes::from(vec![b'x'; size]),
        None => Bytes::from(
            serde_json::json!({
                "call": n,
                "method": parts.method.as_str(),
                "path": parts.uri.path(),
                "fence": header("idempotency-fence"),
                "auth": header("authorization"),
                "body_len": body.len(),
            })
            .to_string(),
        ),
    };
    let mut resp = Response::new(Full::new(out));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert("content-type", "application/json".parse().unwrap());
    h.insert("x-call", n.into());
    h.insert("set-cookie", format!("session={n}").parse().unwrap());
    if header("x-respond-hop").is_some() {
        // Connection-specific headers a proxy must not pass on or store.
        h.insert("connection", "x-secret".parse().unwrap());
        h.insert("x-secret", "hop-value".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("proxy-authenticate", "Basic realm=up".parse().unwrap());
    }
    Ok(resp)
}

/// Serves HTTP/1.1 on `listener` with `handler`, a connection per task,
/// until the returned task is aborted.
pub fn serve_http1<H, F, B>(listener: TcpListener, handler: H) -> tokio::task::JoinHandle<()>
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(handler);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
}

/// A response, read whole.
#[derive(Debug, Clone, PartialEq)]
pub struct Got {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// Asserts an RFC 9457 problem of the given kind.
    pub fn assert_problem(&self, status: u16, kind: &str) {
        assert_eq!(self.status.as_u16(), status, "body: {:?}", self.body);
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json")
        );
        let doc = self.json();
        assert!(
            doc["type"].as_str().unwrap().ends_with(&format!("/{kind}")),
            "type {} is not {kind}",
            doc["type"]
        );
        assert_eq!(doc["status"], status);
        assert!(doc["title"].is_string() && doc["detail"].is_string());
    }
}

/// A pooled HTTP/1.1 client.
#[derive(Clone)]
pub struct TestClient {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
}

impl TestClient {
    pub fn new(addr: SocketAddr) -> Self {
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(256)
            .build_http();
        TestClient {
            client,
            base: format!("http://{addr}"),
        }
    }

    /// An HTTP/2 prior-knowledge (h2c) client.
    pub fn new_h2(addr: SocketAddr) -> Self {
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http();
        TestClient {
            client,
            base: format!("http://{addr}"),
        }
    }

    pub async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Got {
        self.try_send(method, path, headers, body)
            .await
            .unwrap_or_else(|(_, e)| panic!("body failed: {e}"))
    }

    /// [`Self::send`], but a response whose body breaks off (an aborted
    /// stream) is `Err` with its status, rather than a panic.
    pub async fn try_send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<Got, (StatusCode, String)> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        let req = req
            .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
            .unwrap();
        let resp = self.client.request(req).await.expect("request failed");
        let (parts, body) = resp.into_parts();
        match body.collect().await {
            Ok(b) => Ok(Got {
                status: parts.status,
                headers: parts.headers,
                body: b.to_bytes(),
            }),
            Err(e) => Err((parts.status, e.to_string())),
        }
    }

    /// POST with an Idempotency-Key.
    pub async fn post(&self, path: &str, key: &str, body: &str) -> Got {
        self.send(
            "POST",
            path,
            &[
                ("idempotency-key", key),
                ("content-type", "application/json"),
            ],
            body,
        )
        .await
    }
}

/// A config for tests: free ports, the given upstream, extra TOML.
pub fn config(upstream: Option<&str>, extra: &str) -> Config {
    let mut text = String::from("listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n");
    if let Some(u) = upstream {
        text.push_str(&format!("upstream = \"{u}\"\n"));
    }
    text.push_str(extra);
    let file = FileConfig::parse(&text).unwrap_or_else(|e| panic!("bad test config: {e}\n{text}"));
    Config::from_parts(file, &RunArgs::default())
        .unwrap_or_else(|e| panic!("bad test config: {e}\n{text}"))
}

/// Sends `n` concurrent duplicates of one slow covered request (key `key`),
/// spread over `clients`, and asserts that each got 201 and that every body
/// is the same. The caller checks how often the upstream ran.
pub async fn duplicates_agree(clients: &[TestClient], n: usize, key: &str) {
    let mut tasks = Vec::new();
    for i in 0..n {
        let c = clients[i % clients.len()].clone();
        let key = key.to_owned();
        tasks.push(tokio::spawn(async move {
            c.send(
                "POST",
                "/v1/charges",
                &[("idempotency-key", &key), ("x-delay-ms", "300")],
                "{}",
            )
            .await
        }));
    }
    let mut bodies = Vec::new();
    for t in tasks {
        let got = t.await.unwrap();
        assert_eq!(got.status, 201, "{:?}", got.body);
        bodies.push(got.body);
    }
    assert!(bodies.iter().all(|b| *b == bodies[0]));
}

/// Starts idemgate in front of `upstream` with extra config TOML.
pub async fn start(upstream: &TestUpstream, extra: &str) -> (Running, TestClient) {
    start_at(&upstream.url(), extra).await
}

/// Starts idemgate in front of the upstream at `url` with extra config TOML.
pub async fn start_at(url: &str, extra: &str) -> (Running, TestClient) {
    let running = Running::start(config(Some(url), extra)).await.unwrap();
    let client = TestClient::new(running.proxy_addr.unwrap());
    (running, client)
}

/// The record of `key` on `/v1/charges` (POST, no scope), as the admin
/// API at `admin` shows it.
pub async fn charge_record(admin: SocketAddr, key: &str) -> Got {
    TestClient::new(admin)
        .send(
            "GET",
            &format!("/v1/keys?key={key}&path=/v1/charges"),
            &[],
            "",
        )
        .await
}

/// A name no other test of this run uses (tests share Redis servers).
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::AtomicU32;
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}
