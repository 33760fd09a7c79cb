//! Stored responses encrypted at rest, against a real Redis: what Redis
//! holds shows no plaintext; records replay; keys rotate (old records open
//! while their key is configured, are misses once it is gone); a record
//! copied to another key or tampered with does not open and is a miss,
//! counted, never served. The memory store and PostgreSQL seal the same
//! way.

mod support;

use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine;
use idemgate::idempotency::key::{Fingerprint, RecordKey};
use idemgate::idempotency::record::{CompletedRecord, StoredResponse};
use idemgate::idempotency::seal::Keyring;
use idemgate::idempotency::state::{Begin, BeginOptions};
use idemgate::server::Running;
use idemgate::store::redis_store::{RedisOptions, RedisStore};
use idemgate::store::{RecordStore, Sealing};
use support::postgres_server::{
    schema as pg_schema, shared_postgres, store_toml as pg_store_toml, PostgresServer,
};
use support::redis_server::{store_toml, RedisServer};
use support::{config, TestClient, TestUpstream};

/// A key file with `n` repeated 32 times, and its `[store.encryption]`
/// entry.
struct KeyFile {
    path: PathBuf,
}

impl KeyFile {
    fn new(id: &str, n: u8) -> Self {
        let path = std::env::temp_dir().join(format!("idemgate-key-{id}-{}", std::process::id()));
        std::fs::write(
            &path,
            base64::engine::general_purpose::STANDARD.encode([n; 32]),
        )
        .unwrap();
        KeyFile { path }
    }

    fn entry(&self, id: &str) -> String {
        format!("{{ id = \"{id}\", file = \"{}\" }}", self.path.display())
    }
}

impl Drop for KeyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn encryption(entries: &[String]) -> String {
    format!("[store.encryption]\nkeys = [{}]\n", entries.join(", "))
}

const SECRET: &str = "Bearer card-4242-4242-4242-4242";

async fn charge(c: &TestClient, key: &str) -> support::Got {
    c.send(
        "POST",
        "/v1/charges",
        &[("idempotency-key", key), ("authorization", SECRET)],
        "{}",
    )
    .await
}

/// Through `r`: a charge of key "enc" answered and replayed, and a
/// consumer-dedup result stored and read back, both holding the card
/// number. Returns the proxy's client.
async fn stores_and_replays(r: &Running) -> TestClient {
    let c = TestClient::new(r.proxy_addr.unwrap());
    let first = charge(&c, "enc").await;
    assert_eq!(first.status, 201);
    assert!(String::from_utf8_lossy(&first.body).contains("card-4242"));
    let replay = charge(&c, "enc").await;
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.body, first.body);
    let admin = TestClient::new(r.admin_addr);
    let claim = admin
        .send("POST", "/v1/dedup/s/claim", &[], "{\"key\":\"job\"}")
        .await
        .json();
    let lease = claim["lease_id"].as_str().unwrap().to_owned();
    let body = format!(
        "{{\"key\":\"job\",\"lease_id\":\"{lease}\",\"result\":{{\"card\":\"card-4242\"}}}}"
    );
    let done = admin.send("POST", "/v1/dedup/s/complete", &[], &body).await;
    assert_eq!(done.status, 200);
    let again = admin
        .send("POST", "/v1/dedup/s/claim", &[], "{\"key\":\"job\"}")
        .await
        .json();
    assert_eq!(again["result"]["card"], "card-4242");
    c
}

/// Everything Redis holds under idemgate's prefix, as text.
fn dump(redis: &RedisServer) -> String {
    let keys = redis.cli(&["--raw", "KEYS", "idemgate:*"]).unwrap();
    keys.lines()
        .filter(|k| !k.is_empty())
        .map(|k| {
            // A record is a string, a fair-share bucket a hash.
            let read = match redis.cli(&["TYPE", k]).unwrap().trim() {
                "string" => "GET",
                _ => "HGETALL",
            };
            redis.cli(&["--raw", read, k]).unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_holds_no_plaintext_and_records_still_replay() {
    let up = TestUpstream::start().await;
    for sealed in [false, true] {
        let redis = RedisServer::start();
        let k1 = KeyFile::new("plain-k1", 1);
        let mut toml = store_toml(&redis.url());
        if sealed {
            toml.push_str(&encryption(&[k1.entry("k1")]));
        }
        let r = Running::start(config(Some(&up.url()), &toml))
            .await
            .unwrap();
        stores_and_replays(&r).await;
        let held = dump(&redis);
        assert!(!held.is_empty());
        // The control run shows the check can fail.
        assert_eq!(held.contains("card-4242"), !sealed, "{held}");
        r.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_without_a_flag_day() {
    let up = TestUpstream::start().await;
    let redis = RedisServer::start();
    let (k1, k2) = (KeyFile::new("rot-k1", 1), KeyFile::new("rot-k2", 2));
    let run = |entries: Vec<String>| {
        let toml = format!("{}{}", store_toml(&redis.url()), encryption(&entries));
        let up = up.url();
        async move {
            let r = Running::start(config(Some(&up), &toml)).await.unwrap();
            let c = TestClient::new(r.proxy_addr.unwrap());
            (r, c)
        }
    };
    let (r, c) = run(vec![k1.entry("k1")]).await;
    assert_eq!(charge(&c, "old").await.status, 201);
    r.stop().await;
    // k2 seals now; k1 still opens what it sealed.
    let (r, c) = run(vec![k2.entry("k2"), k1.entry("k1")]).await;
    let old = charge(&c, "old").await;
    assert_eq!(old.header("idempotent-replayed"), Some("true"));
    assert_eq!(charge(&c, "new").await.status, 201);
    r.stop().await;
    assert_eq!(up.calls(), 2);
    // k1 removed: its records are misses (counted), k2's still replay.
    let (r, c) = run(vec![k2.entry("k2")]).await;
    let new = charge(&c, "new").await;
    assert_eq!(new.header("idempotent-replayed"), Some("true"));
    let old = charge(&c, "old").await;
    assert!(old.header("idempotent-replayed").is_none());
    assert_eq!(up.calls(), 3, "a record that does not open is a miss");
    assert_eq!(r.metrics.record_decode_errors.get(), 1);
    r.stop().await;
}

fn record(body: &'static str) -> Arc<CompletedRecord> {
    Arc::new(CompletedRecord {
        origin: None,
        fingerprint: Fingerprint([3; 32]),
        created_unix_ms: 1,
        response: StoredResponse {
            status: http::StatusCode::CREATED,
            headers: Default::default(),
            body: bytes::Bytes::from_static(body.as_bytes()),
            body_omitted: false,
            trailers: http::HeaderMap::new(),
        },
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_or_tampered_record_does_not_open() {
    let redis = RedisServer::start();
    let errors = prometheus::IntCounter::new("e", "e").unwrap();
    let keyring = Keyring::new(&[("k1".into(), vec![7; 32])]).unwrap();
    let mut options = RedisOptions::new(vec![redis.url()], false);
    options.sealing = Sealing::new(Some(keyring), Some(errors.clone()));
    let store = RedisStore::connect(options).await.unwrap();
    let fp = Fingerprint([3; 32]);
    let opts = BeginOptions::lease(std::time::Duration::from_secs(30));
    let (a, b, c) = (
        RecordKey::derive_dedup("t", "a"),
        RecordKey::derive_dedup("t", "b"),
        RecordKey::derive_dedup("t", "c"),
    );
    let Begin::Acquired(lease) = store.begin(&a, &fp, opts).await.unwrap() else {
        panic!()
    };
    let ttl = std::time::Duration::from_secs(60);
    assert!(store
        .complete(&a, &lease, record("secret"), ttl)
        .await
        .unwrap());
    assert!(matches!(
        store.begin(&a, &fp, opts).await.unwrap(),
        Begin::Completed(_)
    ));
    // Copied to another key: the associated data differs, it does not open.
    let copied = redis.cli(&["COPY", &store.record_key(&a), &store.record_key(&b)]);
    assert_eq!(copied.as_deref().map(str::trim), Some("1"));
    assert!(matches!(
        store.begin(&b, &fp, opts).await.unwrap(),
        Begin::Acquired(_)
    ));
    assert_eq!(errors.get(), 1);
    // Tampered: one byte of the sealed record flipped.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    // The record is one string, the sealed bytes last.
    let sealed: Vec<u8> = redis::cmd("GET")
        .arg(store.record_key(&a))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(sealed.first(), Some(&b'c'));
    let mut bent = sealed.clone();
    *bent.last_mut().unwrap() ^= 1;
    let run = |cmd: &mut redis::Cmd| {
        let cmd = cmd.clone();
        let mut conn = conn.clone();
        async move {
            let _: redis::Value = cmd.query_async(&mut conn).await.unwrap();
        }
    };
    // c gets a's bytes, bent: neither the place nor the bytes match.
    run(redis::cmd("COPY")
        .arg(store.record_key(&a))
        .arg(store.record_key(&c)))
    .await;
    run(redis::cmd("SET")
        .arg(store.record_key(&c))
        .arg(&bent)
        .arg("KEEPTTL"))
    .await;
    assert!(matches!(
        store.begin(&c, &fp, opts).await.unwrap(),
        Begin::Acquired(_)
    ));
    // The same bent bytes back under a: still not served.
    run(redis::cmd("SET")
        .arg(store.record_key(&a))
        .arg(&bent)
        .arg("KEEPTTL"))
    .await;
    assert!(matches!(
        store.begin(&a, &fp, opts).await.unwrap(),
        Begin::Acquired(_)
    ));
    assert_eq!(errors.get(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_store_seals_too() {
    let up = TestUpstream::start().await;
    let k1 = KeyFile::new("mem-k1", 9);
    let r = Running::start(config(Some(&up.url()), &encryption(&[k1.entry("k1")])))
        .await
        .unwrap();
    // The record and the consumer-dedup result are sealed, and read back.
    stores_and_replays(&r).await;
    assert_eq!(up.calls(), 1);
    r.stop().await;
}

/// What a PostgreSQL schema holds of records and dedup results, as text.
fn pg_dump(pg: &PostgresServer, schema: &str) -> String {
    pg.psql(&format!(
        "SELECT coalesce(string_agg(encode(record, 'escape'), ' '), '') FROM {schema}.records; \
         SELECT coalesce(string_agg(encode(result, 'escape'), ' '), '') FROM {schema}.dedup"
    ))
    .unwrap()
}

/// The same on PostgreSQL: the rows show no plaintext, records replay, and
/// a record moved to another key's row does not open there (a miss: the
/// request runs again), where an unsealed one would be served. Each check
/// runs unsealed too, to show it can fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_holds_no_plaintext_and_a_moved_record_does_not_open() {
    let pg = shared_postgres();
    for sealed in [false, true] {
        let up = TestUpstream::start().await;
        let schema = pg_schema(if sealed { "sealed" } else { "plain" });
        let k1 = KeyFile::new(&format!("pg-{sealed}"), 1);
        let mut toml = pg_store_toml(&pg.url(), &schema);
        if sealed {
            toml.push_str(&encryption(&[k1.entry("k1")]));
        }
        let r = Running::start(config(Some(&up.url()), &toml))
            .await
            .unwrap();
        let c = stores_and_replays(&r).await;
        let held = pg_dump(&pg, &schema);
        assert!(held.trim().len() > 20, "nothing held: {held:?}");
        assert_eq!(held.contains("card-4242"), !sealed, "{held}");

        // Key "moved" completed, then its row (the newest: fences rise)
        // given the record of "enc". "moved" was never replayed, so no
        // replica holds a copy of it: its retry reads the row.
        assert_eq!(charge(&c, "moved").await.status, 201);
        assert_eq!(up.calls(), 2);
        let moved = pg.psql(&format!(
            "UPDATE {schema}.records AS m SET record = e.record \
             FROM (SELECT key, record FROM {schema}.records ORDER BY fence LIMIT 1) AS e \
             WHERE m.key = (SELECT key FROM {schema}.records ORDER BY fence DESC LIMIT 1) \
             AND m.key <> e.key RETURNING 1"
        ));
        assert_eq!(moved.as_deref().map(str::trim), Some("1"));
        let retried = charge(&c, "moved").await;
        assert_eq!(retried.status, 201);
        let served = retried.header("idempotent-replayed") == Some("true");
        // Sealed: the moved record is a miss, and its request ran again.
        assert_eq!(served, !sealed, "sealed {sealed}: a moved record served");
        assert_eq!(up.calls(), if sealed { 3 } else { 2 });
        r.stop().await;
    }
}
