//! Micro-benchmarks of the hot path: key parsing, scope hashing and
//! fingerprinting, record encoding, the decision function, and store
//! begin/complete/replay on memory and on a local Redis.
//!
//! ```sh
//! cargo bench --bench core
//! ```
//!
//! The Redis group starts its own redis-server on a free loopback port; it is
//! skipped (with a printed reason) where redis-server is not installed.

use std::hint::black_box;
#[path = "common/redis_server.rs"]
mod redis_server;
use redis_server::RedisServer;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use idemgate::idempotency::key::{parse_key, Fingerprint, RecordKey};
use idemgate::idempotency::record::{CompletedRecord, StoredResponse};
use idemgate::idempotency::seal::Keyring;
use idemgate::idempotency::state::{decide, Begin, BeginOptions, Decision};
use idemgate::store::memory::MemoryStore;
use idemgate::store::redis_store::{RedisOptions, RedisStore};
use idemgate::store::RecordStore;

fn request_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        "authorization",
        HeaderValue::from_static("Bearer sk_live_4eC39HqLyjWDarjtT1zdp7dc"),
    );
    h.insert("content-type", HeaderValue::from_static("application/json"));
    h.insert(
        "idempotency-key",
        HeaderValue::from_static("8e03978e-40d5-43e8-bc93-6894a57f9324"),
    );
    h.insert("user-agent", HeaderValue::from_static("bench/1.0"));
    h
}

fn record(body_len: usize) -> CompletedRecord {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    headers.insert("x-request-id", HeaderValue::from_static("req_8f3a9b2c"));
    headers.insert("cache-control", HeaderValue::from_static("no-store"));
    headers.insert(
        "date",
        HeaderValue::from_static("Sat, 28 Nov 2026 01:00:00 GMT"),
    );
    headers.insert("server", HeaderValue::from_static("api"));
    CompletedRecord {
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
    }
}

fn core(c: &mut Criterion) {
    let headers = request_headers();
    let scope = [http::header::AUTHORIZATION];
    let fp_headers = [http::header::CONTENT_TYPE];
    let body = vec![b'{'; 1024];

    let mut g = c.benchmark_group("key");
    g.bench_function("parse_key (uuid)", |b| {
        b.iter(|| parse_key(black_box(b"8e03978e-40d5-43e8-bc93-6894a57f9324"), 255).unwrap())
    });
    g.bench_function("record key (scope+method+path+key)", |b| {
        b.iter(|| {
            RecordKey::derive(
                black_box(&headers),
                &scope,
                &Method::POST,
                "/v1/charges",
                "8e03978e-40d5",
            )
        })
    });
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("fingerprint (1 KiB body)", |b| {
        b.iter(|| {
            Fingerprint::compute(
                &Method::POST,
                "/v1/charges?x=1",
                black_box(&headers),
                &fp_headers,
                &body,
            )
        })
    });
    g.finish();

    let rec = record(512);
    let encoded = rec.encode();
    let mut g = c.benchmark_group("record");
    g.bench_function("encode (512 B body, 5 headers)", |b| {
        b.iter(|| black_box(&rec).encode())
    });
    g.bench_function("decode (512 B body, 5 headers)", |b| {
        b.iter(|| CompletedRecord::decode(black_box(encoded.clone())).unwrap())
    });
    g.finish();

    // Encryption at rest: seal + open of one record (AES-256-GCM).
    let ring = Keyring::new(&[("k1".into(), vec![9; 32])]).unwrap();
    let place = [4u8; 32];
    let mut g = c.benchmark_group("seal");
    for size in [1usize << 10, 64 << 10] {
        let plain = record(size).encode_vec();
        g.throughput(Throughput::Bytes(plain.len() as u64));
        g.bench_function(format!("seal + open ({} KiB body)", size >> 10), |b| {
            b.iter(|| {
                let sealed = ring.seal(&place, black_box(&plain));
                ring.open(&place, &sealed).unwrap()
            })
        });
    }
    g.finish();

    let fp = Fingerprint([7; 32]);
    let done = Arc::new(record(512));
    c.bench_function("decide (completed, same fingerprint)", |b| {
        b.iter(
            || match decide(Begin::Completed(black_box(done.clone())), &fp) {
                Decision::Replay(r) => r,
                _ => unreachable!(),
            },
        )
    });
}

/// What a webhook route adds per request: the signature check (one HMAC
/// per secret over the body) and, for JSON-keyed providers, the pointer
/// walk; the same body sizes as above.
fn webhooks(c: &mut Criterion) {
    use hmac::{Hmac, Mac};
    use idemgate::idempotency::pointer::JsonPointer;
    use idemgate::webhook::{Preset, Verifier};

    let mut g = c.benchmark_group("webhook");
    for size in [1usize << 10, 64 << 10] {
        let body = format!(
            r#"{{"id":"evt_1QxYz","type":"charge.succeeded","pad":"{}"}}"#,
            "x".repeat(size - 60)
        );
        g.throughput(Throughput::Bytes(body.len() as u64));
        let secret = "whsec_bench_secret";
        let ts = "1764300000";
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(ts.as_bytes());
        mac.update(b".");
        mac.update(body.as_bytes());
        let sig: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut headers = HeaderMap::new();
        headers.insert(
            "stripe-signature",
            HeaderValue::from_str(&format!("t={ts},v1={sig}")).unwrap(),
        );
        for secrets in [1usize, 2] {
            // With two secrets (rotation) the matching one is last: the worst case.
            let mut list: Vec<_> = (1..secrets)
                .map(|_| Preset::Stripe.secret("whsec_old").unwrap())
                .collect();
            list.push(Preset::Stripe.secret(secret).unwrap());
            let v = Verifier {
                preset: Preset::Stripe,
                secrets: list,
                tolerance: Duration::from_secs(300),
            };
            g.bench_function(
                format!(
                    "stripe verify ({} KiB body, {secrets} secret(s))",
                    size >> 10
                ),
                |b| {
                    b.iter(|| {
                        v.verify(black_box(&headers), body.as_bytes(), 1_764_300_010)
                            .unwrap()
                    })
                },
            );
        }
        let pointer = JsonPointer::parse("/id").unwrap();
        g.bench_function(format!("json:/id ({} KiB body)", size >> 10), |b| {
            b.iter(|| pointer.find(black_box(body.as_bytes())).unwrap())
        });
    }
    g.finish();
}

fn stores(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let fp = Fingerprint([7; 32]);
    let rec = Arc::new(record(512));
    let counter = AtomicU64::new(0);
    let next_key = || {
        RecordKey::derive_dedup(
            "bench",
            &counter.fetch_add(1, Ordering::Relaxed).to_string(),
        )
    };
    let lease_ttl = Duration::from_secs(30);
    let ttl = Duration::from_secs(600);

    let memory = MemoryStore::new(50_000_000);
    let mut g = c.benchmark_group("memory store");
    g.bench_function("begin + complete (first request)", |b| {
        b.to_async(&rt).iter(|| {
            let k = next_key();
            let (memory, rec) = (&memory, rec.clone());
            async move {
                let Begin::Acquired(lease) = memory
                    .begin(&k, &fp, BeginOptions::lease(lease_ttl))
                    .await
                    .unwrap()
                else {
                    unreachable!()
                };
                memory.complete(&k, &lease, rec, ttl).await.unwrap()
            }
        })
    });
    let replay_key = next_key();
    rt.block_on(async {
        let Begin::Acquired(lease) = memory
            .begin(&replay_key, &fp, BeginOptions::lease(lease_ttl))
            .await
            .unwrap()
        else {
            unreachable!()
        };
        memory
            .complete(&replay_key, &lease, rec.clone(), ttl)
            .await
            .unwrap();
    });
    g.bench_function("begin (replay)", |b| {
        b.to_async(&rt).iter(|| async {
            memory
                .begin(&replay_key, &fp, BeginOptions::lease(lease_ttl))
                .await
                .unwrap()
        })
    });
    g.finish();

    // Redis on a free loopback port, started and stopped here.
    let Some(server) = RedisServer::start("core") else {
        println!("SKIPPED redis store benchmarks: redis-server is not installed");
        return;
    };
    // As the config's defaults have it: the replay cache on.
    let mut options = RedisOptions::new(vec![server.url()], false);
    options.replay_cache_bytes = 64 << 20;
    let redis = rt.block_on(RedisStore::connect(options)).unwrap();
    let mut g = c.benchmark_group("redis store");
    g.bench_function("begin + complete (first request, 2 round trips)", |b| {
        b.to_async(&rt).iter(|| {
            let k = next_key();
            let (redis, rec) = (&redis, rec.clone());
            async move {
                let Begin::Acquired(lease) = redis
                    .begin(&k, &fp, BeginOptions::lease(lease_ttl))
                    .await
                    .unwrap()
                else {
                    unreachable!()
                };
                redis.complete(&k, &lease, rec, ttl).await.unwrap()
            }
        })
    });
    let replay_key = next_key();
    rt.block_on(async {
        let Begin::Acquired(lease) = redis
            .begin(&replay_key, &fp, BeginOptions::lease(lease_ttl))
            .await
            .unwrap()
        else {
            unreachable!()
        };
        redis
            .complete(&replay_key, &lease, rec.clone(), ttl)
            .await
            .unwrap();
    });
    g.bench_function("begin (replay, 1 round trip)", |b| {
        b.to_async(&rt).iter(|| async {
            redis
                .begin(&replay_key, &fp, BeginOptions::lease(lease_ttl))
                .await
                .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, core, webhooks, stores);
criterion_main!(benches);
