//! Whether the memory store's RSS follows its live records when they
//! expire quickly: records with a 64 KiB body and a 2 s TTL written at a
//! steady rate (5,000 a second by default, as the bodies run of
//! `benches/load.sh` makes them), RSS and the store's own count of live
//! bytes sampled every 250 ms once the first records have expired, with
//! the allocator the binary uses.
//!
//! ```sh
//! cargo bench --bench memory_expiry            # RATE=5000 SECS=14
//! ```
//!
//! Under `cargo test --all-targets` (no `--bench`) it runs for 4 s at a
//! low rate as a smoke run: long enough for a few samples, which start
//! once the first records have expired (3 s in).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use idemgate::idempotency::key::{Fingerprint, RecordKey};
use idemgate::idempotency::record::{CompletedRecord, StoredResponse};
use idemgate::store::memory::MemoryStore;
use idemgate::store::Sealing;

#[path = "common/records.rs"]
mod records;
#[path = "common/rss.rs"]
mod rss;
use rss::rss;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const TTL: Duration = Duration::from_secs(2);
const MIB: f64 = (1 << 20) as f64;

fn main() {
    // As the binary starts: without transparent huge pages.
    idemgate::pages::small_pages_only().expect("prctl(PR_SET_THP_DISABLE)");
    let full = std::env::args().any(|a| a == "--bench");
    let rate = if full { env("RATE", 5_000) } else { 200 };
    let secs = if full { env("SECS", 14) } else { 4 };
    let body = env("BODY", 64 << 10);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let base = rss();
    let (samples, written, store_bytes) = rt.block_on(async move {
        let store = MemoryStore::bounded(usize::MAX, usize::MAX, Sealing::default());
        let record = Arc::new(CompletedRecord {
            origin: None,
            fingerprint: Fingerprint([7; 32]),
            created_unix_ms: 0,
            response: StoredResponse {
                status: StatusCode::CREATED,
                headers: HeaderMap::new(),
                body: Bytes::from(vec![b'x'; body as usize]),
                body_omitted: false,
                trailers: HeaderMap::new(),
            },
        });
        let writer = {
            let store = store.clone();
            tokio::spawn(async move {
                // Every 10 ms, the records due by then.
                let start = Instant::now();
                let mut tick = tokio::time::interval(Duration::from_millis(10));
                let mut n = 0u64;
                while start.elapsed() < Duration::from_secs(secs) {
                    tick.tick().await;
                    let due = start.elapsed().as_millis() as u64 * rate / 1000;
                    while n < due {
                        let key = RecordKey::derive_dedup("expiry", &n.to_string());
                        records::put(&store, &key, &record, TTL).await;
                        n += 1;
                    }
                }
                n
            })
        };
        // Sampled once the first records have had time to expire.
        tokio::time::sleep(TTL + Duration::from_secs(1)).await;
        let mut samples = Vec::new();
        while !writer.is_finished() {
            samples.push((rss(), store.bytes() as u64));
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        (samples, writer.await.unwrap(), store.bytes())
    });
    println!(
        "{written} records of {body} bytes, {} s TTL, {rate}/s for {secs} s; RSS before {:.0} MiB",
        TTL.as_secs(),
        base as f64 / MIB
    );
    let live = samples.iter().map(|s| s.1).max().unwrap_or(0);
    let peak = samples.iter().map(|s| s.0).max().unwrap_or(0);
    let ratio = |(rss, bytes): &(u64, u64)| *rss as f64 / (*bytes).max(1) as f64;
    let worst = samples.iter().map(ratio).fold(0.0, f64::max);
    let mean = samples.iter().map(ratio).sum::<f64>() / samples.len().max(1) as f64;
    println!(
        "{} samples: live bytes up to {:.0} MiB, RSS up to {:.0} MiB; RSS / live bytes: mean {mean:.2}, worst {worst:.2}",
        samples.len(),
        live as f64 / MIB,
        peak as f64 / MIB
    );
    println!("after the writes: {:.0} MiB live", store_bytes as f64 / MIB);
}
