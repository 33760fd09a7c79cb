//! A real streaming upstream and a client that reads frame by frame, for
//! the streaming tests. Requests steer the upstream: `x-events: N` and
//! `x-interval-ms: M` send N server-sent events M ms apart (`data: event
//! i`); `x-reset-after: K` breaks the connection off after event K;
//! `x-stream-bytes: N` sends N deterministic bytes in 64 KiB chunks as
//! fast as the reader takes them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Byte `i` of an `x-stream-bytes` body.
pub fn stream_byte(i: u64) -> u8 {
    ((i * 31 + 7) % 251) as u8
}

pub struct StreamUpstream {
    pub addr: SocketAddr,
    calls: Arc<AtomicUsize>,
    /// When each event of the latest call was written.
    pub sent: Arc<Mutex<Vec<Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

impl StreamUpstream {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let sent = Arc::new(Mutex::new(Vec::new()));
        let (c, s) = (calls.clone(), sent.clone());
        let task = super::serve_http1(listener, move |req| {
            let (c, s) = (c.clone(), s.clone());
            async move { Ok::<_, Infallible>(answer(req, c, s)) }
        });
        StreamUpstream {
            addr,
            calls,
            sent,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Drop for StreamUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn num(h: &HeaderMap, name: &str) -> Option<u64> {
    h.get(name)?.to_str().ok()?.parse().ok()
}

fn answer(
    req: Request<Incoming>,
    calls: Arc<AtomicUsize>,
    sent: Arc<Mutex<Vec<Instant>>>,
) -> Response<BoxBody<Bytes, Error>> {
    calls.fetch_add(1, Ordering::SeqCst);
    let h = req.headers();
    let body: BoxBody<Bytes, Error> = if let Some(total) = num(h, "x-stream-bytes") {
        let stream = futures_util::stream::unfold(0u64, move |at| async move {
            if at >= total {
                return None;
            }
            let n = (64 << 10).min(total - at);
            let chunk: Vec<u8> = (at..at + n).map(stream_byte).collect();
            Some((Ok::<_, Error>(Frame::data(Bytes::from(chunk))), at + n))
        });
        StreamBody::new(stream).boxed()
    } else {
        let events = num(h, "x-events").unwrap_or(10);
        let interval = Duration::from_millis(num(h, "x-interval-ms").unwrap_or(200));
        let reset_after = num(h, "x-reset-after");
        sent.lock().unwrap().clear();
        let stream = futures_util::stream::unfold(0u64, move |i| {
            let sent = sent.clone();
            async move {
                if i == events {
                    return None;
                }
                if i > 0 {
                    tokio::time::sleep(interval).await;
                }
                if reset_after == Some(i) {
                    return Some((Err::<Frame<Bytes>, Error>("reset".into()), i + 1));
                }
                sent.lock().unwrap().push(Instant::now());
                let event = format!("id: {i}\ndata: event {i}\n\n");
                Some((Ok(Frame::data(Bytes::from(event))), i + 1))
            }
        });
        StreamBody::new(stream).boxed()
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut()
        .insert("content-type", "text/event-stream".parse().unwrap());
    resp
}

/// The sse body the upstream sends for `n` events.
pub fn events(n: u64) -> Vec<u8> {
    (0..n)
        .flat_map(|i| format!("id: {i}\ndata: event {i}\n\n").into_bytes())
        .collect()
}

/// A client that reads a response frame by frame, with arrival times.
#[derive(Clone)]
pub struct StreamClient {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
}

/// A response read as it arrived.
pub struct Streamed {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub sent_at: Instant,
    /// Each data frame and when it arrived.
    pub frames: Vec<(Instant, Bytes)>,
    /// `Some` when the body broke off.
    pub error: Option<String>,
}

impl Streamed {
    pub fn body(&self) -> Vec<u8> {
        self.frames.iter().flat_map(|(_, b)| b.to_vec()).collect()
    }

    pub fn first_byte_after_sending(&self) -> Duration {
        self.frames[0].0 - self.sent_at
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

impl StreamClient {
    pub fn new(addr: SocketAddr, h2: bool) -> Self {
        let mut b = Client::builder(TokioExecutor::new());
        if h2 {
            b.http2_only(true);
        }
        StreamClient {
            client: b.build_http(),
            base: format!("http://{addr}"),
        }
    }

    /// Sends a covered POST and returns the open response.
    pub async fn open(&self, key: &str, headers: &[(&str, &str)]) -> (Instant, Response<Incoming>) {
        let mut req = Request::builder()
            .method("POST")
            .uri(format!("{}/v1/completions", self.base))
            .header("content-type", "application/json");
        // An empty key sends none (pass-through).
        if !key.is_empty() {
            req = req.header("idempotency-key", key);
        }
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        let req = req
            .body(Full::new(Bytes::from_static(b"{\"stream\":true}")))
            .unwrap();
        let sent_at = Instant::now();
        let resp = self.client.request(req).await.expect("request failed");
        (sent_at, resp)
    }

    /// Sends and reads the whole response as it arrives.
    pub async fn stream(&self, key: &str, headers: &[(&str, &str)]) -> Streamed {
        let (sent_at, resp) = self.open(key, headers).await;
        read(sent_at, resp).await
    }
}

/// Reads an open response to its end (or its break).
pub async fn read(sent_at: Instant, resp: Response<Incoming>) -> Streamed {
    let (parts, mut body) = resp.into_parts();
    let mut out = Streamed {
        status: parts.status,
        headers: parts.headers,
        sent_at,
        frames: Vec::new(),
        error: None,
    };
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Ok(d) = f.into_data() {
                    out.frames.push((Instant::now(), d));
                }
            }
            Err(e) => {
                out.error = Some(e.to_string());
                break;
            }
        }
    }
    out
}
