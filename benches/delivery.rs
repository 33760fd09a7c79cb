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
//! CONCURRENCY=256 cargo bench --bench delivery   # deliveries in flight (64)
//! BATCH=64 cargo bench --bench delivery   # batch mode: up to 64 messages per request
//! ```
//!
//! Starts its own redis-server on a free loopback port; idemgate runs in
//! this process on the memory store. Under `cargo test --all-targets` (no
//! `--bench` flag) it does a short smoke run instead.

#[path = "common/redis_server.rs"]
mod redis_server;
#[path = "common/worker.rs"]
mod worker;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use idemgate::config::{Config, FileConfig, RunArgs};
use idemgate::server::Running;
use redis::aio::MultiplexedConnection;
use redis_server::RedisServer;
use worker::{batch_size, micros_now, report, run_args, worker};

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

// The allocator the idemgate binary runs with: idemgate runs in this
// process, and the system allocator's arena locks would be measured instead.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let (full, n, concurrency) = run_args(64);
    let batch = batch_size();
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
         deliver_to = \"{worker_url}\"\nconcurrency = {concurrency}\nbatch_size = {batch}\n"
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

    report(
        &format!("delivery on Redis Streams at {url}"),
        n,
        ("plain (XREADGROUP 200, XACK, no work)", plain_took),
        (
            &format!(
                "idemgate (claim, POST to the worker, complete, XACK; concurrency {concurrency}, batch {batch})"
            ),
            idem_took,
        ),
        "XADD",
        &lat,
    );
}
