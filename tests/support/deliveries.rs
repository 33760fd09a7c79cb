//! A real HTTP worker for the delivery-mode tests, whatever the broker:
//! it answers each key's deliveries in turn with the statuses its message
//! asks for, and records every delivery it saw — one per request, or many
//! in a CloudEvents JSON batch (batch mode). And the waits and metric
//! reads those tests share.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use super::{serve_http1, TestClient};

/// One delivery the worker saw (recorded as it arrives, before the
/// worker answers).
#[derive(Debug, Clone)]
pub struct Seen {
    pub key: String,
    pub attempt: u32,
    pub fence: u64,
    pub at: Instant,
    pub body: Bytes,
    /// The request's headers (a batch's, for each of its messages).
    pub headers: http::HeaderMap,
    /// How many messages its request carried (1 outside batch mode).
    pub batch: usize,
    /// The message as a CloudEvent, in batch mode.
    pub event: Option<serde_json::Value>,
}

/// A worker: answers each key's deliveries in turn with the statuses its
/// `answers` field lists (comma-separated; the last one repeats; 200 when
/// there is none), after its `delay_ms` field, and records every delivery.
/// Its reconcile endpoint (`GET /reconcile/{key}`) says a key starting
/// `ran-` ran (200 `{"reconciled":"KEY"}`), one starting `not-` did not
/// (404), and fails (500) for any other; each question is recorded.
#[derive(Clone)]
pub struct TestWorker {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Reconcile questions: the key and the fence asked with.
    asked: Arc<Mutex<Vec<(String, u64)>>>,
}

/// A batch: each event answered as a request of its own would be (its
/// `answers` field is `idemgatefieldanswers` in an event), in one JSON
/// list, after the longest `delayms` field of its events; except that a
/// batch holding a key starting `garbled-` is answered `200 ok` (no list:
/// nothing readable of what ran), and one holding a key starting `quiet-`
/// `204` with no body (every message done).
fn answer_batch(
    seen: &Mutex<Vec<Seen>>,
    headers: http::HeaderMap,
    body: &[u8],
) -> (Duration, Response<Full<Bytes>>) {
    let events: Vec<serde_json::Value> = serde_json::from_slice(body).unwrap();
    let text = |e: &serde_json::Value, n: &str| e[n].as_str().unwrap_or_default().to_owned();
    let mut results = Vec::new();
    let mut seen = seen.lock().unwrap();
    for e in &events {
        let key = text(e, "idempotencykey");
        let answers: Vec<u16> = text(e, "idemgatefieldanswers")
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .collect();
        let n = seen.iter().filter(|s| s.key == key).count();
        let data = match (&e["data"], e["data_base64"].as_str()) {
            (serde_json::Value::Null, Some(b)) => Bytes::from(
                base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b).unwrap(),
            ),
            (serde_json::Value::Null, None) => Bytes::new(),
            (v, _) => Bytes::from(v.to_string()),
        };
        seen.push(Seen {
            key: key.clone(),
            attempt: u32::try_from(e["idemgateattempt"].as_u64().unwrap()).unwrap(),
            fence: text(e, "idempotencyfence").parse().unwrap(),
            at: Instant::now(),
            body: data,
            headers: headers.clone(),
            batch: events.len(),
            event: Some(e.clone()),
        });
        let status = answers.get(n).or(answers.last()).copied().unwrap_or(200);
        results
            .push(serde_json::json!({"status": status, "body": format!("{{\"done\":\"{key}\"}}")}));
    }
    let has = |prefix: &str| {
        events.iter().any(|e| {
            e["idempotencykey"]
                .as_str()
                .unwrap_or("")
                .starts_with(prefix)
        })
    };
    let (status, body) = if has("garbled-") {
        (200, Bytes::from_static(b"ok"))
    } else if has("quiet-") {
        (204, Bytes::new())
    } else {
        (200, Bytes::from(serde_json::to_vec(&results).unwrap()))
    };
    let delay = events
        .iter()
        .filter_map(|e| e["idemgatefielddelayms"].as_str()?.parse().ok())
        .max()
        .unwrap_or(0);
    let answer = Response::builder()
        .status(status)
        .body(Full::new(body))
        .unwrap();
    (Duration::from_millis(delay), answer)
}

impl TestWorker {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let w = TestWorker {
            addr: listener.local_addr().unwrap(),
            seen: Arc::default(),
            asked: Arc::default(),
        };
        let (seen, asked) = (w.seen.clone(), w.asked.clone());
        serve_http1(listener, move |req: Request<Incoming>| {
            let (seen, asked) = (seen.clone(), asked.clone());
            async move {
                if let Some(key) = req.uri().path().strip_prefix("/reconcile/") {
                    let key = key.to_owned();
                    let fence = req.headers()["idempotency-fence"]
                        .to_str()
                        .unwrap()
                        .parse()
                        .unwrap();
                    asked.lock().unwrap().push((key.clone(), fence));
                    let (status, body) = if key.starts_with("ran-") {
                        (200, format!("{{\"reconciled\":\"{key}\"}}"))
                    } else if key.starts_with("not-") {
                        (404, String::new())
                    } else {
                        (500, String::new())
                    };
                    return Ok::<_, Infallible>(
                        Response::builder()
                            .status(status)
                            .body(Full::new(Bytes::from(body)))
                            .unwrap(),
                    );
                }
                let headers = req.headers().clone();
                let body = req.into_body().collect().await.unwrap().to_bytes();
                if headers["content-type"] == "application/cloudevents-batch+json" {
                    let (delay, answer) = answer_batch(&seen, headers, &body);
                    tokio::time::sleep(delay).await;
                    return Ok(answer);
                }
                let h = |n: &str| {
                    headers
                        .get(n)
                        .map(|v| v.to_str().unwrap().to_owned())
                        .unwrap_or_default()
                };
                let key = h("idempotency-key");
                let answers: Vec<u16> = h("idemgate-field-answers")
                    .split(',')
                    .filter_map(|s| s.trim().parse().ok())
                    .collect();
                let delay: u64 = h("idemgate-field-delay_ms").parse().unwrap_or(0);
                let status = {
                    let mut seen = seen.lock().unwrap();
                    let n = seen.iter().filter(|s| s.key == key).count();
                    seen.push(Seen {
                        key: key.clone(),
                        attempt: h("idemgate-attempt").parse().unwrap(),
                        fence: h("idempotency-fence").parse().unwrap(),
                        at: Instant::now(),
                        body,
                        headers: headers.clone(),
                        batch: 1,
                        event: None,
                    });
                    answers.get(n).or(answers.last()).copied().unwrap_or(200)
                };
                tokio::time::sleep(Duration::from_millis(delay)).await;
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(status)
                        .body(Full::new(Bytes::from(format!("{{\"done\":\"{key}\"}}"))))
                        .unwrap(),
                )
            }
        });
        w
    }

    pub fn url(&self) -> String {
        format!("http://{}/handle", self.addr)
    }

    pub fn asked(&self) -> Vec<(String, u64)> {
        self.asked.lock().unwrap().clone()
    }

    pub fn reconcile_url(&self) -> String {
        format!("http://{}/reconcile/{{key}}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn per_key(&self) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for s in self.seen() {
            *m.entry(s.key).or_insert(0) += 1;
        }
        m
    }
}

pub async fn until(what: &str, within: Duration, done: impl Fn() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn metric(admin: SocketAddr, outcome: &str) -> f64 {
    let got = TestClient::new(admin)
        .send("GET", "/metrics", &[], "")
        .await;
    let line = format!("idemgate_deliveries_total{{consumer=\"billing\",outcome=\"{outcome}\"}}");
    String::from_utf8_lossy(&got.body)
        .lines()
        .find_map(|l| l.strip_prefix(&line).map(|v| v.trim().parse().unwrap()))
        .unwrap_or(0.0)
}

/// Waits until the `outcomes` counted on the admin listeners `admins`
/// add up to at least `at_least`.
pub async fn until_counted(
    admins: &[SocketAddr],
    outcomes: &[&str],
    at_least: f64,
    within: Duration,
) {
    let started = Instant::now();
    loop {
        let mut total = 0.0;
        for a in admins {
            for o in outcomes {
                total += metric(*a, o).await;
            }
        }
        if total >= at_least {
            return;
        }
        assert!(
            started.elapsed() < within,
            "{outcomes:?}: {total} counted, not {at_least}, within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
