//! The worker's side of a delivery: one `POST deliver_to` with the message
//! and what idemgate knows of it (or, in batch mode, many messages as one
//! CloudEvents JSON batch), and its answer sorted into what becomes of
//! each message.

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

/// The largest worker answer kept (a batch's: this per message).
const MAX_ANSWER: usize = 1 << 20;

/// The media type of a CloudEvents JSON batch (CloudEvents HTTP binding,
/// batched content mode).
pub const BATCH_TYPE: &str = "application/cloudevents-batch+json";

/// One message of a batch, with what idemgate knows of it.
#[derive(Debug, Clone)]
pub struct Item {
    pub msg: Message,
    pub key: String,
    pub fence: u64,
    pub attempt: u32,
}

/// One message of a batch as a CloudEvent in the JSON format: the same
/// facts the binary mode puts in headers, as attributes. Extension names
/// are lower-case letters and digits only (the CloudEvents rule), so the
/// fence, a 64-bit number, travels as text (an extension integer is 32
/// bits).
#[derive(serde::Serialize)]
struct Event<'a> {
    specversion: &'static str,
    id: &'a str,
    source: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    time: Option<&'a str>,
    datacontenttype: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a serde_json::value::RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_base64: Option<String>,
    idempotencykey: &'a str,
    idempotencyfence: String,
    idemgateattempt: u32,
    idemgateredelivered: bool,
    /// The message's fields whose names are letters and digits, as
    /// `idemgatefield<name>` (lower-cased), where their values are text.
    #[serde(flatten)]
    fields: std::collections::BTreeMap<String, &'a str>,
}

impl<'a> Event<'a> {
    fn of(it: &'a Item) -> Self {
        let msg = &it.msg;
        let ct = msg
            .content_type
            .as_deref()
            .unwrap_or("application/octet-stream");
        // A JSON body goes in as JSON (the format's rule for a JSON
        // `datacontenttype`), anything else as base64.
        let essence = ct.split(';').next().unwrap_or("").trim();
        let json = (essence.eq_ignore_ascii_case("application/json")
            || essence
                .get(essence.len().saturating_sub(5)..)
                .is_some_and(|tail| tail.eq_ignore_ascii_case("+json")))
        .then(|| std::str::from_utf8(&msg.body).ok())
        .flatten()
        .and_then(|t| serde_json::from_str::<&serde_json::value::RawValue>(t).ok());
        let data_base64 = match (json, msg.body.is_empty()) {
            (None, false) => Some(base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                &msg.body,
            )),
            _ => None,
        };
        let fields = msg
            .fields
            .iter()
            .filter(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_alphanumeric()))
            .filter_map(|(n, v)| {
                let v = std::str::from_utf8(v).ok()?;
                Some((format!("idemgatefield{}", n.to_ascii_lowercase()), v))
            })
            .collect();
        Event {
            specversion: "1.0",
            id: &msg.id,
            source: &msg.source,
            kind: msg.kind.as_deref().unwrap_or("idemgate.message"),
            time: msg.time.as_deref(),
            datacontenttype: ct,
            data: json,
            data_base64,
            idempotencykey: &it.key,
            idempotencyfence: it.fence.to_string(),
            idemgateattempt: it.attempt,
            idemgateredelivered: msg.redelivered || it.attempt > 1,
            fields,
        }
    }
}

/// The worker's answer for one message of a batch: `{"status": 200}`, with
/// `"body"` (text, or any JSON, kept as its text) when it has one.
#[derive(serde::Deserialize)]
struct ItemAnswer {
    status: u16,
    #[serde(default)]
    body: Option<Box<serde_json::value::RawValue>>,
}

impl ItemAnswer {
    fn answer(self) -> Option<Answer> {
        let status = StatusCode::from_u16(self.status).ok()?;
        let body = match self.body {
            None => Bytes::new(),
            Some(raw) => match serde_json::from_str::<String>(raw.get()) {
                Ok(text) => Bytes::from(text),
                Err(_) => Bytes::copy_from_slice(raw.get().as_bytes()),
            },
        };
        Some(classify(status, body))
    }
}

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
    /// Delivers `items` in one `POST` as a CloudEvents JSON batch; one
    /// answer per item, in order. A 2xx whose body is empty completes
    /// every item; a 2xx with a JSON array, one `{"status", "body"}` per
    /// item in order, settles each by its own status; any other 2xx body
    /// says nothing readable of what ran, so every item's outcome is
    /// unknown. A non-2xx, a timeout or a broken call applies to all.
    pub async fn deliver_batch(&self, items: &[Item]) -> Vec<Answer> {
        let events: Vec<Event> = items.iter().map(Event::of).collect();
        let body = match serde_json::to_vec(&events) {
            Ok(b) => Bytes::from(b),
            // Cannot happen (text and numbers only); said, and retried.
            Err(e) => return all(items.len(), || Answer::Retry(format!("encoding: {e}"))),
        };
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.url.clone();
        req.headers_mut().insert(
            HeaderName::from_static("content-type"),
            HeaderValue::from_static(BATCH_TYPE),
        );
        let n = items.len();
        let limit = MAX_ANSWER.saturating_mul(n);
        let call = async {
            let resp = match self.client.request(req).await {
                Ok(r) => r,
                Err(e) if e.is_connect() => {
                    return all(n, || Answer::Retry(format!("cannot connect: {e}")))
                }
                Err(e) => return all(n, || Answer::Unknown(format!("the call broke: {e}"))),
            };
            let status = resp.status();
            if !status.is_success() {
                return all(n, || classify(status, Bytes::new()));
            }
            let body = match Limited::new(resp.into_body(), limit).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return all(n, || Answer::Unknown(format!("the answer broke off: {e}"))),
            };
            if body.iter().all(u8::is_ascii_whitespace) {
                return all(n, || Answer::Done(Bytes::new()));
            }
            match serde_json::from_slice::<Vec<ItemAnswer>>(&body) {
                Ok(each) if each.len() == n => {
                    let read: Option<Vec<Answer>> =
                        each.into_iter().map(ItemAnswer::answer).collect();
                    read.unwrap_or_else(|| {
                        all(n, || {
                            Answer::Unknown(
                                "the worker's batch answer holds a status that is not one".into(),
                            )
                        })
                    })
                }
                Ok(each) => all(n, || {
                    Answer::Unknown(format!(
                        "the worker's batch answer has {} results for {n} messages",
                        each.len()
                    ))
                }),
                Err(e) => all(n, || {
                    Answer::Unknown(format!(
                        "the worker's batch answer is not a list of results: {e}"
                    ))
                }),
            }
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(a) => a,
            Err(_) => all(n, || {
                Answer::Unknown(format!("no answer within {:?}", self.timeout))
            }),
        }
    }
}

/// `n` answers made by `f`.
fn all(n: usize, f: impl Fn() -> Answer) -> Vec<Answer> {
    (0..n).map(|_| f()).collect()
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
