//! Spans out of the process without slowing a request: a finished span goes
//! into a bounded queue ([`Queue`], never blocking; a full queue drops the
//! span), and one task sends them in batches over OTLP/HTTP (protobuf),
//! up to four exports at once, with a client on the rustls stack the rest
//! of idemgate uses. A collector that
//! is down, slow or failing costs the spans of the batch, never a request:
//! every dropped span is counted (`idemgate_trace_spans_dropped_total`) and
//! a warning is logged at most once a minute.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use opentelemetry::Context;
use opentelemetry_http::{HttpClient, HttpError};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};
use tokio::sync::{mpsc, oneshot};

/// Spans waiting for export at most; past it, new spans are dropped.
pub const QUEUE: usize = 4096;
/// Spans per export request at most.
const BATCH: usize = 512;
/// How long a span may wait for its batch to fill.
const LINGER: Duration = Duration::from_millis(500);
/// Exports in flight at once: one at a time could not keep up with a
/// request rate of tens of thousands (measured: 8 % of spans dropped).
const IN_FLIGHT: u32 = 4;
/// A collector's answer is read up to this many bytes.
const MAX_ANSWER: usize = 64 << 10;

enum Item {
    Span(Box<SpanData>),
    Flush(oneshot::Sender<()>),
}

/// Counts dropped spans and says so in the log, once a minute at most.
#[derive(Clone)]
pub struct Drops {
    counter: prometheus::IntCounter,
    last_warned_s: Arc<AtomicU64>,
}

impl Drops {
    pub fn new(counter: prometheus::IntCounter) -> Self {
        Drops {
            counter,
            last_warned_s: Arc::new(AtomicU64::new(0)),
        }
    }

    fn add(&self, n: usize, why: &str) {
        self.counter.inc_by(n as u64);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last_warned_s.load(Ordering::Relaxed);
        if now >= last + 60
            && self
                .last_warned_s
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                dropped = n,
                why,
                "trace spans dropped (counted in idemgate_trace_spans_dropped_total; this is said once a minute)"
            );
        }
    }
}

/// The span processor: finished spans into the bounded queue.
pub struct Queue {
    tx: mpsc::Sender<Item>,
    drops: Drops,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").finish_non_exhaustive()
    }
}

/// Sends queued spans to the collector until every sender is gone.
pub struct Sender {
    tx: mpsc::Sender<Item>,
}

impl Sender {
    /// Exports what is queued now, waiting at most `within`.
    pub async fn flush(&self, within: Duration) {
        let (done, wait) = oneshot::channel();
        let asked = async {
            if self.tx.send(Item::Flush(done)).await.is_ok() {
                let _ = wait.await;
            }
        };
        let _ = tokio::time::timeout(within, asked).await;
    }
}

/// The queue, its sender and the task that exports (spawned here: call
/// within the runtime).
pub fn start<E: SpanExporter + 'static>(
    exporter: E,
    drops: Drops,
    timeout: Duration,
) -> (Queue, Sender) {
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(run(exporter, rx, drops.clone(), timeout));
    (
        Queue {
            tx: tx.clone(),
            drops,
        },
        Sender { tx },
    )
}

impl SpanProcessor for Queue {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if self.tx.try_send(Item::Span(Box::new(span))).is_err() {
            self.drops.add(1, "the export queue is full");
        }
    }

    /// Flushing is [`Sender::flush`] (async, bounded); the SDK's blocking
    /// flush would stall a runtime thread.
    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

async fn run<E: SpanExporter + 'static>(
    exporter: E,
    mut rx: mpsc::Receiver<Item>,
    drops: Drops,
    timeout: Duration,
) {
    let exporter = Arc::new(exporter);
    let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT as usize));
    let mut batch: Vec<SpanData> = Vec::with_capacity(BATCH);
    loop {
        let mut flushed = None;
        // The first span starts the batch; it waits LINGER for company.
        match rx.recv().await {
            None => break,
            Some(Item::Span(s)) => batch.push(*s),
            Some(Item::Flush(done)) => flushed = Some(done),
        }
        if flushed.is_none() {
            let until = tokio::time::Instant::now() + LINGER;
            while batch.len() < BATCH {
                match tokio::time::timeout_at(until, rx.recv()).await {
                    Ok(Some(Item::Span(s))) => batch.push(*s),
                    Ok(Some(Item::Flush(done))) => {
                        flushed = Some(done);
                        break;
                    }
                    Ok(None) | Err(_) => break,
                }
            }
        }
        if !batch.is_empty() {
            let n = batch.len();
            let spans = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
            // Waits while IN_FLIGHT exports run: the queue fills meanwhile,
            // and past it spans are dropped, never a request slowed.
            let Ok(slot) = slots.clone().acquire_owned().await else {
                break;
            };
            let (exporter, drops) = (exporter.clone(), drops.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(timeout, exporter.export(spans)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => drops.add(n, &format!("the collector failed: {e}")),
                    Err(_) => drops.add(n, "the collector did not answer in time"),
                }
                drop(slot);
            });
        }
        if let Some(done) = flushed {
            // Every export started before the flush has ended.
            if let Ok(all) = slots.acquire_many(IN_FLIGHT).await {
                drop(all);
            }
            let _ = done.send(());
        }
    }
}

/// The exporter's HTTP client: hyper over rustls (webpki roots), HTTP/1.1.
#[derive(Clone)]
pub struct Http {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl std::fmt::Debug for Http {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http").finish_non_exhaustive()
    }
}

impl Http {
    pub fn new() -> Result<Self, String> {
        let tls = crate::tls::client(None)?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Http { client })
    }
}

impl HttpClient for Http {
    fn send_bytes<'a, 'b>(
        &'a self,
        request: Request<Bytes>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<Bytes>, HttpError>> + Send + 'b>>
    where
        'a: 'b,
        Self: 'b,
    {
        Box::pin(async move {
            let resp = self.client.request(request.map(Full::new)).await?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_ANSWER).collect().await?.to_bytes();
            Ok(Response::from_parts(parts, body))
        })
    }
}
