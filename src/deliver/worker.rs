//! The worker's side of a delivery: one `POST deliver_to` with the message
//! and what idemgate knows of it, and its answer sorted into what becomes
//! of the message.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::config::routes::ReconcileUrl;

/// A message as a broker hands it over.
#[derive(Debug, Clone)]
pub struct Message {
    /// The broker's id of this message (a Redis entry id; an AMQP
    /// `message_id`, else the queue and delivery tag; on NATS its key, else
    /// the stream and sequence).
    pub id: String,
    /// Where it came from, for `ce-source` (never credentials).
    pub source: String,
    /// Its idempotency key; `None`: it names none.
    pub key: Option<String>,
    pub body: Bytes,
    pub content_type: Option<String>,
    /// Its other fields, sent as `Idemgate-Field-<name>` where the name is
    /// a valid header name and the value a valid header value.
    pub fields: Vec<(String, Bytes)>,
    /// The broker delivered it before (to this or another consumer).
    pub redelivered: bool,
    /// Its type, for `ce-type` (an AMQP `type` property); else
    /// `idemgate.message`.
    pub kind: Option<String>,
    /// When it was published (RFC 3339), for `ce-time`, where the broker
    /// says.
    pub time: Option<String>,
}

/// `secs` since the epoch as RFC 3339 (for `ce-time`).
pub fn rfc3339(secs: u64) -> Option<String> {
    let t = std::time::SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs))?;
    Some(humantime::format_rfc3339_seconds(t).to_string())
}

/// What the worker's answer means for the message.
#[derive(Debug)]
pub enum Answer {
    /// 2xx: done; its body is kept as the record's result.
    Done(Bytes),
    /// A 4xx that will not change: dead letter.
    Permanent(String),
    /// Not now (408, 409, 425, 429, 503, refused): deliver again later.
    Retry(String),
    /// It may have run (a timeout or reset after sending, 502, 504).
    Unknown(String),
}

/// What the worker's reconcile endpoint said of a delivery that may have
/// run.
#[derive(Debug)]
pub enum Asked {
    /// 200: it ran; this was its answer.
    Ran(Bytes),
    /// 404: it did not run.
    NotRun,
    /// Anything else, or no answer.
    Failed(String),
}

/// The largest worker answer kept.
const MAX_ANSWER: usize = 1 << 20;

/// A pooled HTTP/1.1 client for one `deliver_to`.
#[derive(Clone)]
pub struct Worker {
    client: Client<HttpConnector, Full<Bytes>>,
    url: Uri,
    timeout: Duration,
}

impl Worker {
    pub fn new(url: Uri, timeout: Duration) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(timeout.min(Duration::from_secs(5))));
        Worker {
            client: Client::builder(TokioExecutor::new()).build(http),
            url,
            timeout,
        }
    }

    /// Delivers `msg` under `key` with `fence`, as attempt `attempt`.
    pub async fn deliver(&self, msg: &Message, key: &str, fence: u64, attempt: u32) -> Answer {
        let mut req = Request::new(Full::new(msg.body.clone()));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.url.clone();
        let h = req.headers_mut();
        // Names known at compile time: no parsing per message.
        let mut put = |name: &'static str, value: &str| {
            if let Ok(v) = HeaderValue::from_str(value) {
                h.insert(HeaderName::from_static(name), v);
            }
        };
        put(
            "content-type",
            msg.content_type
                .as_deref()
                .unwrap_or("application/octet-stream"),
        );
        put("idempotency-key", key);
        put("idempotency-fence", &fence.to_string());
        put("ce-specversion", "1.0");
        put("ce-id", &msg.id);
        put("ce-source", &msg.source);
        put("ce-type", msg.kind.as_deref().unwrap_or("idemgate.message"));
        if let Some(t) = &msg.time {
            put("ce-time", t);
        }
        put("idemgate-attempt", &attempt.to_string());
        put(
            "idemgate-redelivered",
            if msg.redelivered || attempt > 1 {
                "true"
            } else {
                "false"
            },
        );
        for (name, value) in &msg.fields {
            let header = format!("idemgate-field-{name}");
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(header.as_bytes()),
                HeaderValue::from_bytes(value),
            ) {
                req.headers_mut().append(n, v);
            }
        }
        let call = async {
            let resp = self.client.request(req).await;
            let resp = match resp {
                Ok(r) => r,
                // Nothing was sent: safe to deliver again.
                Err(e) if e.is_connect() => return Answer::Retry(format!("cannot connect: {e}")),
                Err(e) => return Answer::Unknown(format!("the call broke: {e}")),
            };
            let status = resp.status();
            let body = match Limited::new(resp.into_body(), MAX_ANSWER).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) if status.is_success() => {
                    return Answer::Unknown(format!("the answer broke off: {e}"))
                }
                Err(_) => Bytes::new(),
            };
            classify(status, body)
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(a) => a,
            Err(_) => Answer::Unknown(format!("no answer within {:?}", self.timeout)),
        }
    }
}

impl Worker {
    /// `GET url` for `key`, with `Idempotency-Key` and the
    /// `Idempotency-Fence` of the delivery that may have run.
    pub async fn ask(&self, url: &ReconcileUrl, key: &str, fence: u64) -> Asked {
        let uri: Uri = match url.for_key(key).parse() {
            Ok(u) => u,
            Err(e) => return Asked::Failed(format!("reconcile URL: {e}")),
        };
        let mut req = Request::new(Full::new(Bytes::new()));
        *req.uri_mut() = uri;
        if let Ok(v) = HeaderValue::from_str(key) {
            req.headers_mut().insert("idempotency-key", v);
        }
        req.headers_mut()
            .insert("idempotency-fence", HeaderValue::from(fence));
        let call = async {
            let resp = self.client.request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((status, body))
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok((StatusCode::OK, body))) => Asked::Ran(body),
            Ok(Ok((StatusCode::NOT_FOUND, _))) => Asked::NotRun,
            Ok(Ok((status, _))) => Asked::Failed(format!("it answered {}", status.as_u16())),
            Ok(Err(e)) => Asked::Failed(e),
            Err(_) => Asked::Failed(format!("no answer within {:?}", self.timeout)),
        }
    }
}

fn classify(status: StatusCode, body: Bytes) -> Answer {
    let why = || format!("the worker answered {}", status.as_u16());
    match status.as_u16() {
        200..=299 => Answer::Done(body),
        408 | 409 | 425 | 429 | 503 => Answer::Retry(why()),
        502 | 504 => Answer::Unknown(why()),
        400..=499 => Answer::Permanent(why()),
        // Other 5xx: the worker failed; it may be a bug or a blip, and it
        // says it did not finish: try again, up to max_attempts.
        _ => Answer::Retry(why()),
    }
}
