//! The delivery mode's throughput on Redis Streams against a plain consumer
//! of the same stream, in one run: messages per second taken to their end
//! (the plain consumer acknowledges without work; idemgate claims each key
//! in the store, POSTs the message to a worker that answers 200 at once,
//! completes the record and acknowledges), and the latency from `XADD` to
//! the worker at a low rate.
//!
//! ```sh
//! cargo bench --bench delivery            # 20,000 messages a side
//! cargo bench --bench delivery -- 50000   # another count
//! ```
//!
//! Starts its own redis-server on a free loopback port; idemgate runs in
//! this process on the memory store. Under `cargo test --all-targets` (no
//! `--bench` flag) it does a short smoke run instead.

#[path = "common/redis_server.rs"]
mod redis_server;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use idemgate::config::{Config, FileConfig, RunArgs};
use idemgate::server::Running;
use redis::aio::MultiplexedConnection;
use redis_server::RedisServer;

fn micros_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

async fn publish(conn: &mut MultiplexedConnection, stream: &str, n: usize, tag: &str) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            pipe.cmd("XADD")
                .arg(stream)
                .arg("*")
                .arg("id")
                .arg(format!("{tag}-{i}"))
                .arg("body")
                .arg("{\"amount\":100}")
                .ignore();
        }
        let () = pipe.query_async(conn).await.unwrap();
    }
}

/// A plain consumer: read 200 at a time, acknowledge, until `n`.
async fn plain(conn: &mut MultiplexedConnection, n: usize) -> Duration {
    let _: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg("plain")
        .arg("g")
        .arg("0")
        .query_async(conn)
        .await;
    let started = Instant::now();
    let mut done = 0;
    while done < n {
        let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg("c")
            .arg("COUNT")
            .arg(200)
            .arg("BLOCK")
            .arg(100)
            .arg("STREAMS")
            .arg("plain")
            .arg(">")
            .query_async(conn)
            .await
            .unwrap();
        let ids: Vec<String> = reply
            .map(|r| {
                r.keys
                    .into_iter()
                    .flat_map(|k| k.ids)
                    .map(|e| e.id)
                    .collect()
            })
            .unwrap_or_default();
        if ids.is_empty() {
            continue;
        }
        let _: i64 = redis::cmd("XACK")
            .arg("plain")
            .arg("g")
            .arg(&ids)
            .query_async(conn)
            .await
            .unwrap();
        done += ids.len();
    }
    started.elapsed()
}

/// A worker answering 200 at once; counts deliveries and, for messages
/// carrying a `t` field, the latency from their publication.
struct Worker {
    count: AtomicU64,
    latencies: Mutex<Vec<Duration>>,
}

async fn worker() -> (String, Arc<Worker>) {
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

fn pending(conn_url: &str, stream: &str, group: &str) -> u64 {
    let c = redis::Client::open(conn_url).unwrap();
    let mut c = c.get_connection().unwrap();
    let v: redis::Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query(&mut c)
        .unwrap();
    match v {
        redis::Value::Array(items) => match items.first() {
            Some(redis::Value::Int(n)) => *n as u64,
            _ => 0,
        },
        _ => 0,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p) as usize]
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let full = args.iter().any(|a| a == "--bench");
    let n: usize =
        args.iter()
            .find_map(|a| a.parse().ok())
            .unwrap_or(if full { 20_000 } else { 300 });
    let Some(server) = RedisServer::start("delivery") else {
        eprintln!("redis-server is needed (apt-get install redis-server)");
        return;
    };
    let url = server.url();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();

    publish(&mut conn, "plain", n, "p").await;
    let plain_took = plain(&mut conn, n).await;

    publish(&mut conn, "orders", n, "k").await;
    let (worker_url, w) = worker().await;
    let text = format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[store]\nmax_entries = 10000000\n\
         [[consumers]]\nname = \"bench\"\nbroker = \"{url}\"\nsource = \"orders\"\ngroup = \"bench\"\n\
         deliver_to = \"{worker_url}\"\nconcurrency = 64\n"
    );
    let config =
        Config::from_parts(FileConfig::parse(&text).unwrap(), &RunArgs::default()).unwrap();
    let started = Instant::now();
    let running = Running::start(config).await.unwrap();
    while w.count.load(Ordering::Relaxed) < n as u64 || pending(&url, "orders", "bench") > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let idem_took = started.elapsed();

    // Latency at a low rate: one message every 5 ms.
    let slow = if full { 400 } else { 20 };
    for i in 0..slow {
        let _: String = redis::cmd("XADD")
            .arg("orders")
            .arg("*")
            .arg("id")
            .arg(format!("lat-{i}"))
            .arg("t")
            .arg(micros_now())
            .query_async(&mut conn)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    while w.latencies.lock().unwrap().len() < slow {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    running.stop().await;
    let mut lat = w.latencies.lock().unwrap().clone();
    lat.sort();

    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    println!("delivery on Redis Streams at {url}: {n} messages a side, 2 cores shared\n");
    println!("| consumer | messages/s | ratio |");
    println!("|---|---|---|");
    println!(
        "| plain (XREADGROUP 200, XACK, no work) | {:.0} | 1.00× |",
        rate(plain_took)
    );
    println!(
        "| idemgate (claim, POST to the worker, complete, XACK; concurrency 64) | {:.0} | {:.2}× |",
        rate(idem_took),
        rate(idem_took) / rate(plain_took)
    );
    println!(
        "\nXADD to the worker at one message per 5 ms ({slow}): p50 {:.2} ms, p99 {:.2} ms",
        percentile(&lat, 0.5).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3
    );
}
