//! `idemgate demo`: a toy payments API behind idemgate on the memory store,
//! driven through the cases that matter, with a short account of what
//! happened; then the delivery mode's act (`demo_queue`). Everything binds
//! free loopback ports and stops at the end.

use std::convert::Infallible;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use idemgate::config::{Config, FileConfig, RunArgs};
use idemgate::server::Running;

use crate::demo_queue::{self, QueueReport};

/// What the demo saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    pub requests: u64,
    pub keys: u64,
    pub charges: u64,
    /// The queue act's, when it ran.
    pub queue: Option<QueueReport>,
}

/// A payments API that charges once per call it receives, slowly.
async fn payments() -> std::io::Result<(String, Arc<AtomicU64>, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let charges = Arc::new(AtomicU64::new(0));
    let c = charges.clone();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let c = c.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let c = c.clone();
                    async move {
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let amount = serde_json::from_slice::<serde_json::Value>(&body)
                            .ok()
                            .and_then(|v| v["amount"].as_u64())
                            .unwrap_or(0);
                        // Charging a card takes a while: duplicates overlap.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                        let doc = serde_json::json!({"id": format!("ch_{n}"), "amount": amount});
                        let mut resp = Response::new(Full::new(Bytes::from(doc.to_string())));
                        *resp.status_mut() = StatusCode::CREATED;
                        resp.headers_mut().insert(
                            "content-type",
                            http::HeaderValue::from_static("application/json"),
                        );
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok((url, charges, task))
}

/// Runs the demo, writing the account to `out`.
pub async fn run(out: &mut impl Write) -> anyhow::Result<Report> {
    let (upstream, charges, payments_task) = payments().await?;
    let text = format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\n"
    );
    let config = Config::from_parts(FileConfig::parse(&text)?, &RunArgs::default())?;
    let idg = Running::start(config).await?;
    let proxy = idg
        .proxy_addr
        .ok_or_else(|| anyhow::anyhow!("no proxy listener"))?;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let charge = |key: &str, amount: u64| {
        let req = Request::post(format!("http://{proxy}/v1/charges"))
            .header("idempotency-key", key)
            .header("content-type", "application/json")
            .header("authorization", "Bearer demo-merchant")
            .body(Full::new(Bytes::from(format!("{{\"amount\":{amount}}}"))));
        let client = client.clone();
        async move {
            let resp = client.request(req?).await?;
            let replayed = resp.headers().contains_key("idempotent-replayed");
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            anyhow::Ok((
                status,
                replayed,
                String::from_utf8_lossy(&body).into_owned(),
            ))
        }
    };
    let mut requests = 0;

    writeln!(
        out,
        "idemgate demo: a toy payments API at {upstream}, idemgate in front at http://{proxy}\n"
    )?;

    writeln!(
        out,
        "1. A client charges order-1 and, unsure it worked, retries twice."
    )?;
    for attempt in 1..=3 {
        let (status, replayed, body) = charge("order-1", 1000).await?;
        requests += 1;
        let how = if replayed {
            "replayed by idemgate"
        } else {
            "sent to the API"
        };
        writeln!(out, "   attempt {attempt}: {status} {body}  ({how})")?;
    }
    writeln!(
        out,
        "   charges so far: {}\n",
        charges.load(Ordering::SeqCst)
    )?;

    writeln!(
        out,
        "2. Ten copies of order-2 arrive at once (a retry storm)."
    )?;
    let storm: Vec<_> = (0..10)
        .map(|_| tokio::spawn(charge("order-2", 2500)))
        .collect();
    let mut bodies = Vec::new();
    for t in storm {
        let (status, _, body) = t.await??;
        requests += 1;
        bodies.push((status, body));
    }
    let same = bodies.iter().all(|b| *b == bodies[0]);
    writeln!(
        out,
        "   all 10 got {} {}{}",
        bodies[0].0,
        bodies[0].1,
        if same {
            " (identical answers)"
        } else {
            " (answers differ!)"
        }
    )?;
    writeln!(
        out,
        "   charges so far: {}\n",
        charges.load(Ordering::SeqCst)
    )?;

    writeln!(
        out,
        "3. A buggy client reuses order-1's key for a different amount."
    )?;
    let (status, _, body) = charge("order-1", 999_999).await?;
    requests += 1;
    let detail = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["title"].as_str().map(str::to_owned))
        .unwrap_or(body);
    writeln!(out, "   {status}: {detail}; nothing charged")?;
    writeln!(
        out,
        "   charges so far: {}\n",
        charges.load(Ordering::SeqCst)
    )?;

    writeln!(out, "4. Five new orders, each with its own key.")?;
    for i in 3..=7 {
        let (status, _, _) = charge(&format!("order-{i}"), 100 * i).await?;
        requests += 1;
        writeln!(out, "   order-{i}: {status}")?;
    }
    idg.stop().await;
    payments_task.abort();
    writeln!(out)?;
    let queue = demo_queue::run(out).await?;
    let report = Report {
        requests,
        keys: 7,
        charges: charges.load(Ordering::SeqCst),
        queue,
    };
    writeln!(
        out,
        "\nSummary: {} requests sent for {} orders; the API charged {} time(s).",
        report.requests, report.keys, report.charges
    )?;
    if report.charges == report.keys {
        writeln!(
            out,
            "Exactly one charge per order: retries and duplicates never charged twice."
        )?;
    } else {
        writeln!(out, "Charges do not match orders: something is wrong.")?;
    }
    if let Some(q) = report.queue {
        writeln!(
            out,
            "Queue: {} messages for {} orders; the worker shipped {} time(s).",
            q.published, q.orders, q.shipped
        )?;
        if q.shipped == q.orders {
            writeln!(
                out,
                "Exactly one shipment per order: duplicates and a crash never shipped twice."
            )?;
        } else {
            writeln!(out, "Shipments do not match orders: something is wrong.")?;
        }
    }
    Ok(report)
}
