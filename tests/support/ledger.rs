//! A payments upstream with a memory of what it did, for the unknown-outcome
//! tests: `POST /v1/charges` commits a charge for its `Idempotency-Key` at
//! once (unless `x-commit: no`), then sleeps `x-delay-ms` and answers
//! `x-status` (default 201); `GET /idempotency/{key}` is its reconcile
//! endpoint: 200 with the charge's answer, 404 if it never charged, 503
//! while set down. It counts charges and questions.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

#[derive(Default)]
struct Books {
    /// Key → the answer given for it.
    charged: Mutex<HashMap<String, String>>,
    calls: AtomicUsize,
    asks: AtomicUsize,
    down: AtomicBool,
    /// The fence and key header each question carried.
    asked_with: Mutex<Vec<(Option<String>, Option<String>)>>,
    /// The Idempotency-Fence of each charge request, in arrival order.
    fences: Mutex<Vec<u64>>,
}

pub struct Ledger {
    pub addr: SocketAddr,
    books: Arc<Books>,
    task: tokio::task::JoinHandle<()>,
}

impl Ledger {
    pub async fn start() -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_on(addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let books = Arc::new(Books::default());
        let b = books.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let b = b.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| answer(req, b.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ledger { addr, books, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The config lines of a route that reconciles against this ledger.
    pub fn reconcile_toml(&self, interval: &str) -> String {
        format!(
            "on_unknown_outcome = \"reconcile\"\nreconcile_url = \"{}/idempotency/{{key}}\"\nreconcile_interval = \"{interval}\"\n",
            self.url()
        )
    }

    /// Charge requests received.
    pub fn calls(&self) -> usize {
        self.books.calls.load(Ordering::SeqCst)
    }

    /// Charges committed.
    pub fn charges(&self) -> usize {
        self.books.charged.lock().unwrap().len()
    }

    /// Reconcile questions received.
    pub fn asks(&self) -> usize {
        self.books.asks.load(Ordering::SeqCst)
    }

    /// (Idempotency-Fence, Idempotency-Key) of each question.
    pub fn asked_with(&self) -> Vec<(Option<String>, Option<String>)> {
        self.books.asked_with.lock().unwrap().clone()
    }

    /// The `Idempotency-Fence` of each charge request received.
    pub fn fences(&self) -> Vec<u64> {
        self.books.fences.lock().unwrap().clone()
    }

    pub fn set_down(&self, down: bool) {
        self.books.down.store(down, Ordering::SeqCst);
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(
    req: Request<Incoming>,
    books: Arc<Books>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let key = header("idempotency-key").unwrap_or_default();
    if let Some(asked) = req.uri().path().strip_prefix("/idempotency/") {
        books.asks.fetch_add(1, Ordering::SeqCst);
        books
            .asked_with
            .lock()
            .unwrap()
            .push((header("idempotency-fence"), header("idempotency-key")));
        if books.down.load(Ordering::SeqCst) {
            return Ok(reply(StatusCode::SERVICE_UNAVAILABLE, "down".into()));
        }
        let asked = asked.replace("%20", " ");
        let found = books.charged.lock().unwrap().get(&asked).cloned();
        return Ok(match found {
            Some(body) => reply(
                StatusCode::OK,
                serde_json::json!({
                    "status": 201,
                    "headers": {"content-type": "application/json"},
                    "body": body,
                })
                .to_string(),
            ),
            None => reply(StatusCode::NOT_FOUND, String::new()),
        });
    }
    let commit = header("x-commit").as_deref() != Some("no");
    let delay: Option<u64> = header("x-delay-ms").and_then(|v| v.parse().ok());
    let status = header("x-status")
        .and_then(|v| v.parse().ok())
        .and_then(|v| StatusCode::from_u16(v).ok())
        .unwrap_or(StatusCode::CREATED);
    if let Some(f) = header("idempotency-fence").and_then(|f| f.parse().ok()) {
        books.fences.lock().unwrap().push(f);
    }
    let n = books.calls.fetch_add(1, Ordering::SeqCst) + 1;
    let body = serde_json::json!({"charged": key, "call": n}).to_string();
    if commit {
        books
            .charged
            .lock()
            .unwrap()
            .insert(key.clone(), body.clone());
    }
    let _ = req.into_body().collect().await;
    if let Some(ms) = delay {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    Ok(reply(status, body))
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    resp
}
