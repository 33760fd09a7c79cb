//! The worker both delivery benches hand messages to: a hyper server
//! answering 200 at once, counting deliveries and, for messages carrying a
//! `t` field (a publication time in microseconds), their latency.
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

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p) as usize]
}
