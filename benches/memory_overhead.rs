//! Memory held per completed record by the memory store, measured with one
//! million records (RSS before and after, with the same allocator the binary
//! uses).
//!
//! ```sh
//! cargo bench --bench memory_overhead
//! ```
//!
//! Under `cargo test --all-targets` (no `--bench`) it stores 10,000 records
//! as a smoke run.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use idemgate::idempotency::key::{Fingerprint, RecordKey};
use idemgate::idempotency::record::{CompletedRecord, StoredResponse};
use idemgate::store::memory::MemoryStore;

#[path = "common/records.rs"]
mod records;
#[path = "common/rss.rs"]
mod rss;
use rss::rss;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    // As the binary starts: without transparent huge pages.
    idemgate::pages::small_pages_only().expect("prctl(PR_SET_THP_DISABLE)");
    let full = std::env::args().any(|a| a == "--bench");
    let n: u64 = if full { 1_000_000 } else { 10_000 };
    let body_len = 64;
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    let record = Arc::new(CompletedRecord {
        origin: None,
        fingerprint: Fingerprint([7; 32]),
        created_unix_ms: 1_764_291_600_000,
        response: StoredResponse {
            status: StatusCode::CREATED,
            headers,
            body: Bytes::from(vec![b'x'; body_len]),
            body_omitted: false,
            trailers: http::HeaderMap::new(),
        },
    });
    let encoded = record.encode().len() as u64;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = MemoryStore::new(n as usize + 1);
    let before = rss();
    rt.block_on(async {
        for i in 0..n {
            let key = RecordKey::derive_dedup("mem", &i.to_string());
            records::put(&store, &key, &record, Duration::from_secs(3600)).await;
        }
    });
    let per = (rss() - before) as f64 / n as f64;
    println!("{n} completed records, {body_len}-byte body, 1 header: {encoded} bytes encoded");
    println!("RSS per record: {per:.0} bytes");
    println!(
        "  overhead beyond the body:             {:.0} bytes",
        per - body_len as f64
    );
    println!(
        "  overhead beyond the encoded response: {:.0} bytes",
        per - encoded as f64
    );
    assert_eq!(store.len() as u64, n);
}
