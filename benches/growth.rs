//! How the stores' cost grows with the records they hold: throughput and
//! latency percentiles of first requests (begin + complete of a new key)
//! and replays (begin of a random completed key) with 10 k and with 10 M
//! live records, on the memory store, on a local Redis and on a local
//! PostgreSQL (every commit flushed, 1 GiB of shared buffers), the replay
//! caches off so every replay is the store's, plus the memory each holds
//! (for PostgreSQL, the size of its table and indexes).
//!
//! ```sh
//! cargo bench --bench growth                       # 10 k and 10 M records
//! RECORDS="10000 1000000" cargo bench --bench growth
//! STORES=postgres cargo bench --bench growth       # some of memory, redis, postgres
//! ```
//!
//! The HTTP path in front of the store does the same work whatever the
//! store holds, so the store is measured alone here. Records are filled
//! through the memory store's own API and, on Redis and PostgreSQL, as
//! copies of a record the store wrote (pipelined on Redis, 10,000 rows a
//! statement on PostgreSQL, so ten million take minutes, not hours).
//! Under `cargo test --all-targets` (no `--bench`) it runs with 1,000
//! records as a smoke run. Redis and PostgreSQL are skipped where they are
//! not installed.

#[path = "../tests/support/postgres_server.rs"]
mod postgres_server;
#[path = "common/redis_server.rs"]
mod redis_server;
use postgres_server::PostgresServer;
use redis_server::RedisServer;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use http::{HeaderMap, HeaderValue, StatusCode};
use idemgate::idempotency::key::{Fingerprint, RecordKey};
use idemgate::idempotency::record::{CompletedRecord, StoredResponse};
use idemgate::idempotency::state::{Begin, BeginOptions};
use idemgate::store::memory::MemoryStore;
use idemgate::store::postgres::{PostgresOptions, PostgresStore};
use idemgate::store::redis_store::{RedisOptions, RedisStore};
use idemgate::store::RecordStore;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);
/// Operations in flight at once (as many as the load harness's connections).
const IN_FLIGHT: usize = 64;

fn rss_mib() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: f64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096.0 / (1 << 20) as f64
}

fn record() -> Arc<CompletedRecord> {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    Arc::new(CompletedRecord {
        origin: None,
        fingerprint: Fingerprint([7; 32]),
        created_unix_ms: 1_764_291_600_000,
        response: StoredResponse {
            status: StatusCode::CREATED,
            headers,
            body: Bytes::from_static(br#"{"id":"ch_1","amount":100,"currency":"eur"}"#),
            body_omitted: false,
            trailers: http::HeaderMap::new(),
        },
    })
}

fn key(run: &str, i: u64) -> RecordKey {
    RecordKey::derive_dedup(run, &i.to_string())
}

async fn first_request<S: RecordStore>(store: &S, k: RecordKey, rec: Arc<CompletedRecord>) {
    let Begin::Acquired(lease) = store
        .begin(&k, &rec.fingerprint, BeginOptions::lease(LEASE))
        .await
        .unwrap()
    else {
        panic!("a new key was not acquired")
    };
    assert!(store.complete(&k, &lease, rec, TTL).await.unwrap());
}

async fn replay<S: RecordStore>(store: &S, k: RecordKey, fp: Fingerprint) {
    match store
        .begin(&k, &fp, BeginOptions::lease(LEASE))
        .await
        .unwrap()
    {
        Begin::Completed(_) => {}
        other => panic!("a filled key was not completed: {other:?}"),
    }
}

/// Runs `n` operations, `IN_FLIGHT` at a time: ops/s, p50 and p99 in µs.
async fn measure<F, Fut>(n: u64, op: F) -> (f64, f64, f64)
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut lat = Vec::with_capacity(n as usize);
    let started = Instant::now();
    let mut running = FuturesUnordered::new();
    let timed = |i| {
        let fut = op(i);
        async move {
            let t = Instant::now();
            fut.await;
            t.elapsed()
        }
    };
    let mut next = 0;
    while next < n.min(IN_FLIGHT as u64) {
        running.push(timed(next));
        next += 1;
    }
    while let Some(d) = running.next().await {
        lat.push(d);
        if next < n {
            running.push(timed(next));
            next += 1;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6;
    (n as f64 / secs, pct(0.5), pct(0.99))
}

/// First requests on new keys, then replays spread over the whole
/// keyspace (the `n` filled keys of `run`), as replays of many keys are.
#[allow(clippy::too_many_arguments)]
fn measure_both<S: RecordStore>(
    rt: &tokio::runtime::Runtime,
    store: &S,
    name: &str,
    run: &str,
    n: u64,
    ops: u64,
    rec: &Arc<CompletedRecord>,
    rss: f64,
) {
    let fresh = format!("{run}{n}-new");
    let first = rt.block_on(measure(ops, |i| {
        first_request(store, key(&fresh, i), rec.clone())
    }));
    report(name, n, "first request", first, rss);
    let stride = (n / ops).max(1) | 1;
    let fp = rec.fingerprint;
    let replays = rt.block_on(measure(ops, |i| {
        replay(store, key(run, (i * stride) % n), fp)
    }));
    report(name, n, "replay", replays, rss);
}

fn report(store: &str, records: u64, what: &str, (ops, p50, p99): (f64, f64, f64), rss: f64) {
    println!(
        "| {store:<6} | {records:>10} | {what:<14} | {ops:>9.0} | {p50:>7.1} | {p99:>7.1} | {rss:>8.0} |"
    );
}

fn main() {
    // As the binary starts: without transparent huge pages.
    idemgate::pages::small_pages_only().expect("prctl(PR_SET_THP_DISABLE)");
    let full = std::env::args().any(|a| a == "--bench");
    let sizes: Vec<u64> = match std::env::var("RECORDS") {
        Ok(s) => s
            .split_whitespace()
            .map(|v| {
                v.parse().unwrap_or_else(|_| {
                    eprintln!("growth: RECORDS is record counts separated by spaces, not {s:?}");
                    std::process::exit(2)
                })
            })
            .collect(),
        Err(_) if full => vec![10_000, 10_000_000],
        Err(_) => vec![1_000],
    };
    let ops: u64 = if full { 200_000 } else { 1_000 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let rec = record();
    let stores = std::env::var("STORES").unwrap_or_else(|_| "memory redis postgres".into());
    let wanted = |s: &str| stores.split_whitespace().any(|w| w == s);
    println!("| store  |    records | operation      |     ops/s | p50 µs  | p99 µs  | MiB held |");
    println!("|--------|------------|----------------|-----------|---------|---------|----------|");

    for &n in sizes.iter().filter(|_| wanted("memory")) {
        let run = format!("mem{n}");
        let store = MemoryStore::new((n + 2 * ops) as usize + 1);
        rt.block_on(async {
            for i in 0..n {
                first_request(&store, key(&run, i), rec.clone()).await;
            }
        });
        let rss = rss_mib();
        measure_both(&rt, &store, "memory", &run, n, ops, &rec, rss);
        drop(store);
    }

    if wanted("redis") {
        redis(&rt, &sizes, ops, &rec);
    }
    if wanted("postgres") {
        postgres(&rt, &sizes, ops, &rec);
    }
}

fn redis(rt: &tokio::runtime::Runtime, sizes: &[u64], ops: u64, rec: &Arc<CompletedRecord>) {
    let Some(server) = RedisServer::start("growth") else {
        println!("SKIPPED redis: redis-server is not installed");
        return;
    };
    let url = server.url();
    let store = rt
        .block_on(RedisStore::connect(RedisOptions::new(
            vec![url.clone()],
            false,
        )))
        .unwrap();
    let mut raw = rt
        .block_on(async {
            redis::Client::open(url.as_str())?
                .get_multiplexed_async_connection()
                .await
        })
        .unwrap();
    // One record written by the store (one string), which every filled key
    // copies.
    let model = key("model", 0);
    rt.block_on(first_request(&store, model, rec.clone()));
    let held: Vec<u8> = rt
        .block_on(
            redis::cmd("GET")
                .arg(store.record_key(&model))
                .query_async(&mut raw),
        )
        .unwrap();
    let redis_rss = |raw: &mut redis::aio::MultiplexedConnection| -> f64 {
        let info: String = rt
            .block_on(redis::cmd("INFO").arg("memory").query_async(raw))
            .unwrap();
        let used: f64 = info
            .lines()
            .find_map(|l| l.strip_prefix("used_memory_rss:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0);
        used / (1 << 20) as f64
    };
    let mut filled = 0u64;
    for &n in sizes {
        // Grows the keyspace to n records (the sizes ascend).
        rt.block_on(async {
            while filled < n {
                let batch = (n - filled).min(10_000);
                let mut pipe = redis::pipe();
                for i in filled..filled + batch {
                    let name = store.record_key(&key("redis", i));
                    pipe.cmd("SET")
                        .arg(&name)
                        .arg(&held)
                        .arg("PX")
                        .arg(TTL.as_millis() as u64)
                        .ignore();
                }
                let () = pipe.query_async(&mut raw).await.unwrap();
                filled += batch;
            }
        });
        let rss = redis_rss(&mut raw);
        measure_both(rt, &store, "redis", "redis", n, ops, rec, rss);
    }
}

fn postgres(rt: &tokio::runtime::Runtime, sizes: &[u64], ops: u64, rec: &Arc<CompletedRecord>) {
    if !std::path::Path::new("/usr/lib/postgresql").is_dir() {
        println!("SKIPPED postgres: PostgreSQL is not installed");
        return;
    }
    // PG_SETTINGS="name=value ..." adds server settings (to compare, say,
    // synchronous_commit=off).
    let extra = std::env::var("PG_SETTINGS").unwrap_or_default();
    let mut settings = vec!["shared_buffers=1GB", "synchronous_commit=on"];
    settings.extend(extra.split_whitespace());
    let server = PostgresServer::start_with(&settings);
    let mut options = PostgresOptions::new(&server.url(), "growth").unwrap();
    // PG_POOL=N: connections in idemgate's pool (`store.pool_size`).
    if let Some(n) = std::env::var("PG_POOL").ok().and_then(|v| v.parse().ok()) {
        options.pool_size = n;
    }
    let store = rt.block_on(PostgresStore::connect(options)).unwrap();
    let (raw, connection) = rt
        .block_on(
            server
                .url()
                .parse::<tokio_postgres::Config>()
                .unwrap()
                .connect(tokio_postgres::NoTls),
        )
        .unwrap();
    rt.spawn(connection);
    // One record written by the store, whose columns every filled row copies.
    let model = key("model", 0);
    rt.block_on(first_request(&store, model, rec.clone()));
    let fill = "INSERT INTO growth.records (key, state, token, fence, fp, record, expires_ms) \
                SELECT k, m.state, m.token, m.fence, m.fp, m.record, m.expires_ms \
                FROM unnest($1::bytea[]) AS k, growth.records AS m WHERE m.key = $2";
    let size = || -> f64 {
        let sql = "SELECT pg_total_relation_size('growth.records')";
        let bytes: i64 = rt.block_on(raw.query_one(sql, &[])).unwrap().get(0);
        bytes as f64 / (1 << 20) as f64
    };
    let mut filled = 0u64;
    for &n in sizes {
        rt.block_on(async {
            while filled < n {
                let batch = (n - filled).min(10_000);
                let keys: Vec<Vec<u8>> = (filled..filled + batch)
                    .map(|i| key("postgres", i).0.to_vec())
                    .collect();
                raw.execute(fill, &[&keys, &model.0.as_slice()])
                    .await
                    .unwrap();
                filled += batch;
            }
            // As autovacuum would have by then: visibility map and statistics.
            raw.batch_execute("VACUUM ANALYZE growth.records")
                .await
                .unwrap();
        });
        measure_both(rt, &store, "pg", "postgres", n, ops, rec, size());
    }
}
