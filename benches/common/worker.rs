//! What the delivery benches share: the worker they hand messages to (a
//! hyper server answering 200 at once, counting deliveries and, for
//! messages carrying a `t` field (a publication time in microseconds),
//! their latency; in batch mode it reads the CloudEvents batch and answers
//! one result per message), the run's arguments and the report.
#![allow(dead_code)]

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

pub fn micros_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A worker answering 200 at once; counts deliveries and, for messages
/// carrying a `t` field, the latency from their publication.
pub struct Worker {
    pub count: AtomicU64,
    pub latencies: Mutex<Vec<Duration>>,
}

pub async fn worker() -> (String, Arc<Worker>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let w = Arc::new(Worker {
        count: AtomicU64::new(0),
        latencies: Mutex::new(Vec::new()),
    });
    let me = w.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            let me = me.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let me = me.clone();
                    async move {
                        if req.headers()["content-type"] == "application/cloudevents-batch+json" {
                            return Ok(me.batch(req).await);
                        }
                        if let Some(t) = req
                            .headers()
                            .get("idemgate-field-t")
                            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                        {
                            let took = Duration::from_micros(micros_now().saturating_sub(t));
                            me.latencies.lock().unwrap().push(took);
                        }
                        me.count.fetch_add(1, Ordering::Relaxed);
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(
                            b"{}",
                        ))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (format!("http://{addr}/handle"), w)
}

impl Worker {
    /// A batch: every message done, one `{"status":200,"body":{}}` each.
    async fn batch(&self, req: http::Request<Incoming>) -> http::Response<Full<Bytes>> {
        use http_body_util::BodyExt;
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let events: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
        let now = micros_now();
        for e in &events {
            if let Some(t) = e["idemgatefieldt"]
                .as_str()
                .and_then(|t| t.parse::<u64>().ok())
            {
                let took = Duration::from_micros(now.saturating_sub(t));
                self.latencies.lock().unwrap().push(took);
            }
        }
        self.count.fetch_add(events.len() as u64, Ordering::Relaxed);
        let mut out = Vec::with_capacity(events.len() * 28 + 2);
        out.push(b'[');
        for i in 0..events.len() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"status\":200,\"body\":{}}");
        }
        out.push(b']');
        http::Response::new(Full::new(Bytes::from(out)))
    }
}

/// Messages per request to the worker (`BATCH`, else 1): the consumer's
/// `batch_size`.
pub fn batch_size() -> usize {
    std::env::var("BATCH")
        .ok()
        .and_then(|b| b.parse().ok())
        .unwrap_or(1)
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p) as usize]
}

/// The run's arguments: whether it is a real run (`--bench`), the message
/// count (a number argument; 20,000, or 300 for the smoke run under `cargo
/// test`), and the deliveries in flight (`CONCURRENCY`, else `default`).
pub fn run_args(default_concurrency: usize) -> (bool, usize, usize) {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let full = args.iter().any(|a| a == "--bench");
    let n = args
        .iter()
        .find_map(|a| a.parse().ok())
        .unwrap_or(if full { 20_000 } else { 300 });
    let concurrency = std::env::var("CONCURRENCY")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(default_concurrency);
    (full, n, concurrency)
}

/// Prints the table (`plain` and `idem` describe each side) and the
/// latency line (`lat` sorted, from `from` to the worker).
pub fn report(
    title: &str,
    n: usize,
    (plain, plain_took): (&str, Duration),
    (idem, idem_took): (&str, Duration),
    from: &str,
    lat: &[Duration],
) {
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    println!("{title}: {n} messages a side, 2 cores shared\n");
    println!("| consumer | messages/s | ratio |");
    println!("|---|---|---|");
    println!("| {plain} | {:.0} | 1.00× |", rate(plain_took));
    println!(
        "| {idem} | {:.0} | {:.2}× |",
        rate(idem_took),
        rate(idem_took) / rate(plain_took)
    );
    println!(
        "\n{from} to the worker at one message per 5 ms ({}): p50 {:.2} ms, p99 {:.2} ms",
        lat.len(),
        percentile(lat, 0.5).as_secs_f64() * 1e3,
        percentile(lat, 0.99).as_secs_f64() * 1e3
    );
}
