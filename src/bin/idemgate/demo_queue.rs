//! `idemgate demo`, the queue act: the delivery mode. A Redis stream of
//! shipping orders, two of them published twice, a shipping worker that
//! crashes after shipping one order before it answers, and idemgate reading
//! the stream and asking the worker (`reconcile`) what it could not know:
//! each order shipped once. It needs `redis-server` on the PATH (started on
//! a free loopback port, its files in a temporary folder, stopped at the
//! end); without one the act says so and is skipped.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use idemgate::config::{Config, FileConfig, RunArgs};
use idemgate::server::Running;

/// What the queue act saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueReport {
    pub published: u64,
    pub orders: u64,
    pub shipped: u64,
}

/// The order whose first delivery the worker ships and then crashes on.
const CRASHES: &str = "order-13";

/// A redis-server of the demo's own, killed and its folder removed on drop.
struct Redis {
    child: Child,
    dir: std::path::PathBuf,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_redis() -> anyhow::Result<Option<(Redis, String)>> {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        return Ok(None);
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let dir = std::env::temp_dir().join(format!("idemgate-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok(Some((
        Redis { child, dir },
        format!("redis://127.0.0.1:{port}"),
    )))
}

/// Shipments per order, and whether the crash happened yet.
#[derive(Default)]
struct Shipping {
    shipped: Mutex<BTreeMap<String, u64>>,
    crashed: AtomicBool,
}

/// The shipping worker: `POST /ship` ships the order its
/// `Idempotency-Key` names (and, once, crashes right after shipping
/// `CRASHES`, before answering); `GET /shipped/{key}` says whether it did.
async fn worker(state: Arc<Shipping>) -> std::io::Result<(String, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let state = state.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let state = state.clone();
                    async move {
                        let answer = |status: StatusCode, body: String| {
                            let mut r = Response::new(Full::new(Bytes::from(body)));
                            *r.status_mut() = status;
                            r
                        };
                        if let Some(key) = req.uri().path().strip_prefix("/shipped/") {
                            let done = state.shipped.lock().unwrap().contains_key(key);
                            return Ok(if done {
                                answer(StatusCode::OK, format!("{{\"shipped\":\"{key}\"}}"))
                            } else {
                                answer(StatusCode::NOT_FOUND, String::new())
                            });
                        }
                        let key = req
                            .headers()
                            .get("idempotency-key")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned();
                        *state
                            .shipped
                            .lock()
                            .unwrap()
                            .entry(key.clone())
                            .or_insert(0) += 1;
                        if key == CRASHES && !state.crashed.swap(true, Ordering::SeqCst) {
                            // Shipped, then gone before answering.
                            return Err("the shipping worker crashed");
                        }
                        Ok::<_, &str>(answer(StatusCode::OK, format!("{{\"shipped\":\"{key}\"}}")))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok((url, task))
}

/// Runs the act, writing the account to `out`; `None` when it had no
/// redis-server to run with.
pub async fn run(out: &mut impl Write) -> anyhow::Result<Option<QueueReport>> {
    writeln!(
        out,
        "5. The delivery mode: idemgate reads a queue of shipping orders itself\n   and POSTs each to a shipping worker."
    )?;
    let Some((redis, url)) = start_redis()? else {
        writeln!(
            out,
            "   (skipped: it needs redis-server on the PATH for its queue)"
        )?;
        return Ok(None);
    };
    let client = redis::Client::open(url.as_str())?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut conn = loop {
        match client.get_multiplexed_async_connection().await {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    // Five orders; a producer's retry publishes two of them twice.
    let published = [
        "order-10", "order-11", "order-12", "order-11", "order-13", "order-14", "order-13",
    ];
    for key in published {
        let _: String = redis::cmd("XADD")
            .arg("orders")
            .arg("*")
            .arg("id")
            .arg(key)
            .arg("body")
            .arg(format!("{{\"order\":\"{key}\"}}"))
            .query_async(&mut conn)
            .await?;
    }
    let state = Arc::new(Shipping::default());
    let (worker_url, worker_task) = worker(state.clone()).await?;
    // One delivery at a time: a duplicate never finds its key in flight
    // (which would leave it pending for the reclaim, seconds later).
    let text = format!(
        "admin_listen = \"127.0.0.1:0\"\n[[consumers]]\nname = \"shipping\"\nbroker = \"{url}\"\n\
         source = \"orders\"\ngroup = \"shipping\"\ndeliver_to = \"{worker_url}/ship\"\n\
         retry_backoff = \"100ms\"\ndelivery_timeout = \"2s\"\nconcurrency = 1\n\
         on_unknown_outcome = \"reconcile\"\nreconcile_url = \"{worker_url}/shipped/{{key}}\"\n"
    );
    let config = Config::from_parts(FileConfig::parse(&text)?, &RunArgs::default())?;
    let idg = Running::start(config).await?;
    writeln!(
        out,
        "   {} messages on a Redis stream for 5 orders: order-11 and order-13 twice.\n   The worker crashes right after shipping {CRASHES} the first time, before it answers.",
        published.len()
    )?;
    // Until the group has read every entry and acknowledged it.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let groups: redis::streams::StreamInfoGroupsReply = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg("orders")
            .query_async(&mut conn)
            .await?;
        let done = groups
            .groups
            .first()
            .is_some_and(|g| g.pending == 0 && g.lag == Some(0) && g.entries_read.is_some());
        if done {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the queue did not drain in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    idg.stop().await;
    worker_task.abort();
    drop(redis);
    let shipped = state.shipped.lock().unwrap().clone();
    if state.crashed.load(Ordering::SeqCst) {
        writeln!(
            out,
            "   idemgate could not know whether {CRASHES} shipped, asked the worker, and recorded it shipped."
        )?;
    }
    let each: Vec<String> = shipped.iter().map(|(k, n)| format!("{k} {n}")).collect();
    writeln!(out, "   shipments per order: {}", each.join(", "))?;
    Ok(Some(QueueReport {
        published: published.len() as u64,
        orders: 5,
        shipped: shipped.values().sum(),
    }))
}
