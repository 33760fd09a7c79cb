//! The replay cache in front of Redis (standalone), against a real
//! redis-server and two store instances standing for two replicas: a
//! replay from Redis keeps a copy and the next replay needs no round trip;
//! a purge through one replica is seen by the other within a stated bound;
//! a Redis restart or a lost connection empties the cache rather than
//! letting it serve what Redis no longer holds; copies end with their
//! record's TTL; a new record is not copied.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use idemgate::idempotency::key::{Fingerprint, RecordKey};
use idemgate::idempotency::record::{CompletedRecord, StoredResponse};
use idemgate::idempotency::state::{Begin, BeginOptions};
use idemgate::store::redis_store::{RedisOptions, RedisStore};
use idemgate::store::RecordStore;
use support::redis_server::RedisServer;

/// How soon a purge through one replica reaches another's cache (one
/// pub/sub message on loopback; generous for a loaded machine).
const INVALIDATION_BOUND: Duration = Duration::from_secs(1);

async fn replica(redis: &RedisServer) -> RedisStore {
    let mut o = RedisOptions::new(vec![redis.url()], false);
    o.replay_cache_bytes = 8 << 20;
    o.key_prefix = "rc".into();
    RedisStore::connect(o).await.unwrap()
}

fn key(name: &str) -> RecordKey {
    RecordKey::derive(&HeaderMap::new(), &[], &http::Method::POST, "/v1/x", name)
}

const FP: Fingerprint = Fingerprint([3; 32]);

fn opts() -> BeginOptions {
    BeginOptions {
        lease_ttl: Duration::from_secs(30),
        hold_lapsed: None,
        reconcile_every: None,
    }
}

/// Completes `k` through `store` with a record that lives `ttl`.
async fn complete(store: &RedisStore, k: &RecordKey, ttl: Duration) {
    let Begin::Acquired(lease) = store.begin(k, &FP, opts()).await.unwrap() else {
        panic!("not acquired")
    };
    let record = CompletedRecord {
        origin: None,
        fingerprint: FP,
        created_unix_ms: 1,
        response: StoredResponse {
            status: StatusCode::CREATED,
            headers: HeaderMap::new(),
            body: Bytes::from_static(b"{\"ok\":true}"),
            body_omitted: false,
            trailers: http::HeaderMap::new(),
        },
    };
    assert!(store
        .complete(k, &lease, Arc::new(record), ttl)
        .await
        .unwrap());
}

fn evalsha_calls(redis: &RedisServer) -> u64 {
    redis
        .cli(&["INFO", "commandstats"])
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|s| s.split(',').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Begins `k` once the store has reconnected; it must be acquired (the
/// record is gone from Redis), never `Completed` (`stale` says why not).
async fn begin_once_reconnected(b: &RedisStore, k: &RecordKey, stale: &str) {
    let started = Instant::now();
    loop {
        match b.begin(k, &FP, opts()).await {
            Ok(Begin::Acquired(_)) => return,
            Ok(Begin::Completed(_)) => panic!("{stale}"),
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "never reconnected"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn is_completed(store: &RedisStore, k: &RecordKey) -> bool {
    matches!(store.begin(k, &FP, opts()).await, Ok(Begin::Completed(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_through_one_replica_reaches_the_others_cache() {
    let redis = RedisServer::start();
    let (a, b) = (replica(&redis).await, replica(&redis).await);
    let k = key("purged");
    complete(&a, &k, Duration::from_secs(600)).await;
    // B reads it from Redis once, then from its cache.
    assert!(is_completed(&b, &k).await);
    let calls = evalsha_calls(&redis);
    for _ in 0..10 {
        assert!(is_completed(&b, &k).await);
    }
    assert_eq!(evalsha_calls(&redis), calls, "replays went to Redis");
    assert!(b.replay_cache_bytes() > 0);
    // Purged through A: B stops replaying it within the bound.
    assert!(a.purge(&k).await.unwrap());
    let purged = Instant::now();
    let mut seen = false;
    while purged.elapsed() < INVALIDATION_BOUND {
        let cached = b.replay_cache_bytes();
        if cached == 0 {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        seen,
        "B's copy outlived the purge by {INVALIDATION_BOUND:?}"
    );
    assert!(matches!(
        b.begin(&k, &FP, opts()).await.unwrap(),
        Begin::Acquired(_)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_empties_the_cache() {
    let mut redis = RedisServer::start();
    let b = replica(&redis).await;
    let k = key("restart");
    complete(&b, &k, Duration::from_secs(600)).await;
    // Completing a record keeps no copy; replaying it from Redis does.
    assert_eq!(b.replay_cache_bytes(), 0);
    assert!(is_completed(&b, &k).await);
    assert!(b.replay_cache_bytes() > 0);
    // Redis comes back empty (no persistence): the record is gone, and so
    // must be the copy.
    redis.restart();
    begin_once_reconnected(&b, &k, "replayed a record Redis lost in its restart").await;
    assert_eq!(b.replay_cache_bytes(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_empties_the_cache_and_copies_resume_after() {
    let redis = RedisServer::start();
    let b = replica(&redis).await;
    let k = key("lost");
    complete(&b, &k, Duration::from_secs(600)).await;
    // A replay from Redis keeps a copy.
    assert!(is_completed(&b, &k).await);
    assert!(b.replay_cache_bytes() > 0);
    // The connection (and its subscription) is cut; then the record goes
    // behind idemgate's back, so only a fresh read can know.
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]).unwrap();
    redis.cli(&["CLIENT", "KILL", "TYPE", "normal"]).unwrap();
    let started = Instant::now();
    while b.replay_cache_bytes() > 0 {
        assert!(
            started.elapsed() < INVALIDATION_BOUND,
            "the cache outlived its connection"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let name = redis.cli(&["--scan", "--pattern", "rc:*"]).unwrap();
    redis.cli(&["DEL", name.trim()]).unwrap();
    begin_once_reconnected(&b, &k, "served a copy across a lost connection").await;
    // Resubscribed: copies are kept again.
    let k2 = key("after");
    let started = Instant::now();
    loop {
        complete(&b, &k2, Duration::from_secs(600)).await;
        assert!(is_completed(&b, &k2).await);
        if b.replay_cache_bytes() > 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the cache never came back"
        );
        b.purge(&k2).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_ends_with_its_record() {
    let redis = RedisServer::start();
    let b = replica(&redis).await;
    let k = key("ttl");
    complete(&b, &k, Duration::from_millis(1000)).await;
    assert!(is_completed(&b, &k).await);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(matches!(
        b.begin(&k, &FP, opts()).await.unwrap(),
        Begin::Acquired(_)
    ));
}
