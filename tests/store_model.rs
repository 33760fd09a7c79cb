//! Property test: random interleavings of begin / renew / complete / release
//! and expiry, run against a simple reference model, on the memory store
//! (tokio's paused clock), on Redis (expiry forced with PEXPIRE) and on
//! PostgreSQL (expiry forced by moving the rows' `expires_ms` back).

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use idemgate::idempotency::key::{Fingerprint, RecordKey};
use idemgate::idempotency::lease::LeaseId;
use idemgate::idempotency::record::{CompletedRecord, StoredResponse};
use idemgate::idempotency::state::{Begin, BeginOptions, Lease, Resolution, UnknownCause};
use idemgate::store::memory::MemoryStore;
use idemgate::store::postgres::{PostgresOptions, PostgresStore};
use idemgate::store::redis_store::{RedisOptions, RedisStore};
use idemgate::store::RecordStore;
use proptest::prelude::*;
use support::postgres_server::PostgresServer;
use support::redis_server::RedisServer;

const KEYS: usize = 3;
const TTL: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
enum Op {
    Begin {
        key: usize,
        fp: u8,
    },
    Renew {
        handle: usize,
    },
    Complete {
        handle: usize,
    },
    Release {
        handle: usize,
    },
    /// The holder's request may have run: hold the key as unknown.
    MarkUnknown {
        handle: usize,
    },
    /// Settle the key's unknown record (named by the model's fence, or a
    /// stale one): as completed, or released.
    Resolve {
        key: usize,
        complete: bool,
    },
    /// Time passes beyond every lease and record.
    Expire,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..KEYS, 0..2u8).prop_map(|(key, fp)| Op::Begin { key, fp }),
        2 => (0..8usize).prop_map(|handle| Op::Renew { handle }),
        3 => (0..8usize).prop_map(|handle| Op::Complete { handle }),
        2 => (0..8usize).prop_map(|handle| Op::Release { handle }),
        2 => (0..8usize).prop_map(|handle| Op::MarkUnknown { handle }),
        2 => (0..KEYS, any::<bool>()).prop_map(|(key, complete)| Op::Resolve { key, complete }),
        1 => Just(Op::Expire),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Model {
    Absent,
    InFlight { token: LeaseId, fence: u64, fp: u8 },
    Completed { fp: u8 },
    Unknown { fence: u64, fp: u8 },
}

fn fp(n: u8) -> Fingerprint {
    Fingerprint([n + 1; 32])
}

fn record(n: u8) -> Arc<CompletedRecord> {
    Arc::new(CompletedRecord {
        origin: None,
        fingerprint: fp(n),
        created_unix_ms: 1,
        response: StoredResponse {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from_static(b"r"),
            body_omitted: false,
            trailers: http::HeaderMap::new(),
        },
    })
}

fn rk(scope: &str, key: usize) -> RecordKey {
    RecordKey::derive_dedup(scope, &key.to_string())
}

/// Runs `ops` on `store`, checking every answer against the model.
/// Makes time pass beyond every lease and record.
type Expire = std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>;

async fn check<S: RecordStore>(store: &S, scope: &str, ops: &[Op], expire: impl Fn() -> Expire) {
    let mut model = [Model::Absent; KEYS];
    let mut last_fence = [0u64; KEYS];
    let mut handles: Vec<(usize, Lease)> = Vec::new();
    for op in ops {
        match *op {
            Op::Begin { key, fp: f } => {
                let got = store
                    .begin(&rk(scope, key), &fp(f), BeginOptions::lease(TTL))
                    .await
                    .unwrap();
                match (model[key], got) {
                    (Model::Absent, Begin::Acquired(lease)) => {
                        assert!(
                            lease.fence > last_fence[key],
                            "fence must rise: {} after {}",
                            lease.fence,
                            last_fence[key]
                        );
                        last_fence[key] = lease.fence;
                        model[key] = Model::InFlight {
                            token: lease.token,
                            fence: lease.fence,
                            fp: f,
                        };
                        handles.push((key, lease));
                    }
                    (
                        Model::InFlight {
                            fence, fp: held, ..
                        },
                        Begin::InFlight {
                            fingerprint,
                            fence: got_fence,
                        },
                    ) => {
                        assert_eq!((fingerprint, got_fence), (fp(held), fence));
                    }
                    (Model::Completed { fp: held }, Begin::Completed(rec)) => {
                        assert_eq!(rec.fingerprint, fp(held))
                    }
                    (Model::Unknown { fence, fp: held }, Begin::Unknown { unknown, .. }) => {
                        assert_eq!((unknown.fence, unknown.fingerprint), (fence, fp(held)));
                    }
                    (m, g) => panic!("begin on {m:?} answered {g:?}"),
                }
            }
            Op::Resolve { key, complete } => {
                let (fence, held) = match model[key] {
                    Model::Unknown { fence, fp } => (fence, Some(fp)),
                    // Nothing unknown there: any fence must be refused.
                    _ => (last_fence[key], None),
                };
                let resolution = match (complete, held) {
                    (true, f) => Resolution::Completed(record(f.unwrap_or(0)), TTL),
                    (false, _) => Resolution::Release,
                };
                let ok = store
                    .resolve(&rk(scope, key), fence, resolution)
                    .await
                    .unwrap();
                assert_eq!(ok, held.is_some(), "resolve on {:?}", model[key]);
                if let Some(f) = held {
                    model[key] = if complete {
                        Model::Completed { fp: f }
                    } else {
                        Model::Absent
                    };
                }
            }
            Op::Renew { handle }
            | Op::Complete { handle }
            | Op::Release { handle }
            | Op::MarkUnknown { handle } => {
                if handles.is_empty() {
                    continue;
                }
                let (key, lease) = handles[handle % handles.len()];
                let current =
                    matches!(model[key], Model::InFlight { token, .. } if token == lease.token);
                let k = rk(scope, key);
                let ok = match op {
                    Op::Renew { .. } => store.renew(&k, &lease, TTL).await.unwrap(),
                    Op::Complete { .. } => {
                        let f = match model[key] {
                            Model::InFlight { fp, .. } => fp,
                            _ => 0,
                        };
                        let ok = store.complete(&k, &lease, record(f), TTL).await.unwrap();
                        if ok {
                            model[key] = Model::Completed { fp: f };
                        }
                        ok
                    }
                    Op::MarkUnknown { .. } => {
                        let ok = store
                            .mark_unknown(&k, &lease, UnknownCause::Timeout, TTL)
                            .await
                            .unwrap();
                        if let (true, Model::InFlight { fence, fp, .. }) = (ok, model[key]) {
                            model[key] = Model::Unknown { fence, fp };
                        }
                        ok
                    }
                    _ => {
                        let ok = store.release(&k, &lease).await.unwrap();
                        if ok {
                            model[key] = Model::Absent;
                        }
                        ok
                    }
                };
                assert_eq!(
                    ok,
                    current,
                    "{op:?} by a {} lease",
                    if current { "current" } else { "stale" }
                );
            }
            Op::Expire => {
                expire().await;
                model = [Model::Absent; KEYS];
            }
        }
    }
}

fn scope() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "model-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn memory_store_matches_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
        rt.block_on(async {
            let store = MemoryStore::new(1000);
            let expire = || -> Expire { Box::pin(tokio::time::advance(TTL + Duration::from_secs(1))) };
            check(&store, &scope(), &ops, expire).await;
        });
    }
}

/// Not `proptest!`: the Redis server must belong to this test so that it is
/// stopped when the test ends (a static fixture is never dropped).
#[test]
fn redis_store_matches_the_model() {
    use proptest::test_runner::{Config, TestRunner};

    let server = RedisServer::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    // The model expires records by shortening their TTL in Redis behind
    // idemgate's back, which the replay cache by design does not see (the
    // README says so); the cache has its own tests (tests/replay_cache.rs)
    // and the contract suite runs with it on.
    let options = RedisOptions::new(vec![server.url()], false);
    let store = rt.block_on(RedisStore::connect(options)).unwrap();
    let mut runner = TestRunner::new(Config {
        cases: 48,
        ..Config::default()
    });
    let result = runner.run(&proptest::collection::vec(op(), 1..40), |ops| {
        let scope = scope();
        let keys: Vec<String> = (0..KEYS)
            .map(|k| store.record_key(&rk(&scope, k)))
            .collect();
        let url = server.url();
        let expire = move || -> Expire {
            let (keys, url) = (keys.clone(), url.clone());
            Box::pin(async move {
                // Expire every record of this case now; Redis drops them on
                // access, exactly as when their TTL runs out.
                let client = redis::Client::open(url.as_str()).unwrap();
                let mut con = client.get_multiplexed_async_connection().await.unwrap();
                for key in &keys {
                    let _: i64 = redis::cmd("PEXPIRE")
                        .arg(key)
                        .arg(1)
                        .query_async(&mut con)
                        .await
                        .unwrap();
                }
                tokio::time::sleep(Duration::from_millis(3)).await;
            })
        };
        rt.block_on(check(&store, &scope, &ops, expire));
        Ok(())
    });
    result.unwrap();
    drop(server);
}

/// As [`redis_store_matches_the_model`], on PostgreSQL.
#[test]
fn postgres_store_matches_the_model() {
    use proptest::test_runner::{Config, TestRunner};

    let server = Arc::new(PostgresServer::start());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let options = PostgresOptions::new(&server.url(), "model").unwrap();
    let store = rt.block_on(PostgresStore::connect(options)).unwrap();
    let mut runner = TestRunner::new(Config {
        cases: 48,
        ..Config::default()
    });
    let result = runner.run(&proptest::collection::vec(op(), 1..40), |ops| {
        let scope = scope();
        let keys: Vec<String> = (0..KEYS)
            .map(|k| format!("'\\x{}'", rk(&scope, k).to_hex()))
            .collect();
        let sql = format!(
            "UPDATE model.records SET expires_ms = 0 WHERE key IN ({})",
            keys.join(", ")
        );
        let server = server.clone();
        let expire = move || -> Expire {
            // Every record of this case expired now, as when its TTL runs
            // out: every function takes such a row for absent.
            let (server, sql) = (server.clone(), sql.clone());
            Box::pin(async move {
                tokio::task::spawn_blocking(move || server.psql(&sql).unwrap())
                    .await
                    .unwrap();
            })
        };
        rt.block_on(check(&store, &scope, &ops, expire));
        Ok(())
    });
    result.unwrap();
    drop(store);
    drop(server);
}
