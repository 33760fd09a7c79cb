//! Consumer dedup throughput on a local Redis: claim+complete pairs per
//! second, straight on the store and through the HTTP API, and batched claims.
//!
//! ```sh
//! cargo bench --bench dedup_claims            # 5 s per phase
//! cargo bench --bench dedup_claims -- 10      # 10 s per phase
//! ```
//!
//! Starts its own redis-server (Debian's `redis-server` package) on a free
//! loopback port and stops it at the end. Under `cargo test --all-targets`
//! (no `--bench` flag) it does a short smoke run instead, so the suite checks
//! that the bench works without timing anything.

#[path = "common/redis_server.rs"]
mod redis_server;
use redis_server::RedisServer;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use idemgate::config::{Config, FileConfig, RunArgs};
use idemgate::idempotency::dedup::{ClaimOutcome, ClaimParams};
use idemgate::server::Running;
use idemgate::store::redis_store::{RedisOptions, RedisStore};
use idemgate::store::{DedupStore, Ttls};

const TTLS: Ttls = Ttls {
    retention: Duration::from_secs(300),
    failed_retention: Duration::from_secs(300),
};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p) as usize]
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let full = args.iter().any(|a| a == "--bench");
    let secs: u64 = args.iter().find_map(|a| a.parse().ok()).unwrap_or(5);
    let server =
        RedisServer::start("dedup").expect("redis-server is needed (apt-get install redis-server)");
    let url = server.url();
    let store = RedisStore::connect(RedisOptions::new(vec![url.clone()], false))
        .await
        .unwrap();
    let text = format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[store]\nbackend = \"redis\"\nurls = [\"{url}\"]\n"
    );
    let config =
        Config::from_parts(FileConfig::parse(&text).unwrap(), &RunArgs::default()).unwrap();
    let run = if full {
        Duration::from_secs(secs)
    } else {
        Duration::from_millis(200)
    };
    println!("dedup on Redis at {url}, {run:?} per phase\n");

    // 1. One client, sequential: the latency of one claim + complete.
    let mut lat = Vec::new();
    let params = ClaimParams {
        lease_ms: 30_000,
        fingerprint: None,
        max_attempts: 10,
        worker: None,
    };
    let started = Instant::now();
    let mut i = 0u64;
    while started.elapsed() < run.min(Duration::from_secs(2)) {
        let key = format!("seq-{i}");
        let t = Instant::now();
        let ClaimOutcome::Acquired { lease_id, .. } =
            store.claim("bench", &key, &params, TTLS).await.unwrap()
        else {
            panic!()
        };
        assert!(store
            .complete("bench", &key, lease_id, None, TTLS.retention)
            .await
            .unwrap());
        lat.push(t.elapsed());
        i += 1;
    }
    lat.sort();
    println!(
        "store, 1 client:      claim+complete p50 {:>7.1} µs  p99 {:>7.1} µs  (2 round trips)",
        percentile(&lat, 0.5).as_secs_f64() * 1e6,
        percentile(&lat, 0.99).as_secs_f64() * 1e6
    );

    // 2. 64 concurrent clients on the store.
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..64)
        .map(|w| {
            let (store, done, params) = (store.clone(), done.clone(), params.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while started.elapsed() < run {
                    let key = format!("par-{w}-{n}");
                    if let Ok(ClaimOutcome::Acquired { lease_id, .. }) =
                        store.claim("bench", &key, &params, TTLS).await
                    {
                        let _ = store
                            .complete("bench", &key, lease_id, None, TTLS.retention)
                            .await;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    n += 1;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let pairs = done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    println!("store, 64 clients:     {pairs:>9.0} claim+complete/s");

    // 3. Through the HTTP API, 64 concurrent clients.
    let idg = Running::start(config).await.unwrap();
    let base = format!("http://{}/v1/dedup/bench-http", idg.admin_addr);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(128)
        .build_http();
    let post = |client: Client<_, Full<Bytes>>, url: String, body: String| async move {
        let req = http::Request::post(url)
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        let status = resp.status();
        (status, resp.into_body().collect().await.unwrap().to_bytes())
    };
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..64)
        .map(|w| {
            let (client, base, done) = (client.clone(), base.clone(), done.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while started.elapsed() < run {
                    let key = format!("http-{w}-{n}");
                    let (status, body) = post(
                        client.clone(),
                        format!("{base}/claim"),
                        format!("{{\"key\":\"{key}\"}}"),
                    )
                    .await;
                    if status == 201 {
                        let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
                        let complete = format!(
                            "{{\"key\":\"{key}\",\"lease_id\":\"{}\"}}",
                            doc["lease_id"].as_str().unwrap()
                        );
                        post(client.clone(), format!("{base}/complete"), complete).await;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    n += 1;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let pairs = done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    println!("HTTP, 64 clients:      {pairs:>9.0} claim+complete/s");

    // 4. claim:batch of 100 items, 8 concurrent clients.
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..8)
        .map(|w| {
            let (client, base, done) = (client.clone(), base.clone(), done.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while started.elapsed() < run {
                    let items: Vec<String> = (0..100)
                        .map(|i| format!("{{\"key\":\"b-{w}-{n}-{i}\"}}"))
                        .collect();
                    let body = format!("{{\"items\":[{}]}}", items.join(","));
                    let (status, _) =
                        post(client.clone(), format!("{base}/claim:batch"), body).await;
                    assert_eq!(status, 200);
                    done.fetch_add(100, Ordering::Relaxed);
                    n += 1;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let claims = done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    println!("HTTP claim:batch x100: {claims:>9.0} claims/s");

    idg.stop().await;
}
