//! The Redis store against real redis-server processes: the shared contract
//! on standalone and Cluster, several idemgate replicas sharing one Redis,
//! lease renewal across replicas, and Redis outages.

mod support;

use std::sync::Arc;
use std::time::Duration;

use idemgate::server::Running;
use idemgate::store::redis_store::{RedisOptions, RedisStore};
use idemgate::store::RecordStore;
use support::redis_server::{shared_cluster, shared_server, RedisCluster, RedisServer};
use support::{config, duplicates_agree, TestClient, TestUpstream};

fn redis_toml(urls: &[String], cluster: bool, extra_store: &str) -> String {
    let list: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
    format!(
        "[store]\nbackend = \"{}\"\nurls = [{}]\ntimeout = \"500ms\"\n{extra_store}\n",
        if cluster { "redis-cluster" } else { "redis" },
        list.join(", ")
    )
}

/// A store whose waiters re-check only once a minute: only pub/sub can
/// wake them in time.
async fn connect(urls: &[String], cluster: bool) -> RedisStore {
    // As `redis_toml` configures it: a 500 ms bound, the replay cache on.
    let mut options = RedisOptions::new(urls.to_vec(), cluster);
    options.timeout = Duration::from_millis(500);
    options.replay_cache_bytes = 64 << 20;
    options.recheck = Duration::from_secs(60);
    RedisStore::connect(options).await.unwrap()
}

async fn replicas(up: &TestUpstream, n: usize, toml: &str) -> Vec<(Running, TestClient)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let r = Running::start(config(Some(&up.url()), toml)).await.unwrap();
        let c = TestClient::new(r.proxy_addr.unwrap());
        out.push((r, c));
    }
    out
}

/// Contract cases share one server per kind while they run (their keys
/// and scopes are unique per case), each with its own connection.
async fn standalone(_case: &str) -> (Arc<RedisServer>, RedisStore) {
    let redis = shared_server();
    let store = connect(&[redis.url()], false).await;
    (redis, store)
}

async fn cluster(_case: &str) -> (Arc<RedisCluster>, RedisStore) {
    let cluster = shared_cluster();
    let store = connect(&cluster.urls(), true).await;
    (cluster, store)
}

/// The same contract on an event loop's own connection (`driven.rs`,
/// RESP written and read by the calls themselves): the case runs on a
/// single-threaded runtime marked as loop 1, once the loop's connection is
/// open, logged in as the README's ACL user.
async fn on_a_loop(_case: &str) -> (Arc<RedisServer>, RedisStore) {
    let redis = shared_server();
    readme_acl_on(&redis);
    let url = redis.url().replace("redis://", "redis://idemgate:s3cret@");
    let store = connect(&[url], false).await;
    idemgate::store::event_loop::enter(1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while store.loop_connection().is_none() {
        store.ping().await.unwrap(); // the first call opens it
        assert!(tokio::time::Instant::now() < deadline, "no loop connection");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(store.loop_connection(), Some("driven"));
    (redis, store)
}

support::contract::record_contract!(standalone_record_contract, standalone);
support::contract::record_contract!(cluster_record_contract, cluster);
support::contract::bucket_contract!(standalone_bucket_contract, standalone);
support::contract::bucket_contract!(cluster_bucket_contract, cluster);
support::dedup_contract::dedup_contract!(standalone_dedup_contract, standalone);
support::dedup_contract::dedup_contract!(cluster_dedup_contract, cluster);
support::contract::record_contract!(
    loop_record_contract,
    on_a_loop,
    #[tokio::test(flavor = "current_thread")]
);
support::contract::bucket_contract!(
    loop_bucket_contract,
    on_a_loop,
    #[tokio::test(flavor = "current_thread")]
);
support::dedup_contract::dedup_contract!(
    loop_dedup_contract,
    on_a_loop,
    #[tokio::test(flavor = "current_thread")]
);

/// On a loop's own connection, the first call of a turn writes what the
/// turn queued even when its own command went out with an earlier write and
/// was answered before it was polled again: a call queued behind it is
/// still written, and woken with its reply (it once waited out the store's
/// timeout). The calls are polled by hand in that order (the last one only
/// when woken, as a runtime polls); a sleep lets Redis answer and the loop
/// see it.
#[tokio::test(flavor = "current_thread")]
async fn on_a_loop_a_call_queued_behind_an_answered_first_call_is_written() {
    use idemgate::idempotency::key::RecordKey;
    use std::future::Future;
    use std::task::{Context, Poll, Waker};
    let (_redis, store) = on_a_loop("flusher").await;
    let key = |n: &str| RecordKey::derive_dedup("flusher", &format!("{}-{n}", std::process::id()));
    let (k1, ka, kw, kc) = (key("1"), key("a"), key("w"), key("c"));
    // The script is loaded first, so each call below is one command.
    store.get(&k1).await.unwrap();
    let mut cx = Context::from_waker(Waker::noop());
    let settle = || tokio::time::sleep(Duration::from_millis(50));
    let mut x1 = std::pin::pin!(store.get(&k1));
    assert!(x1.as_mut().poll(&mut cx).is_pending(), "first of its turn");
    assert!(
        x1.as_mut().poll(&mut cx).is_pending(),
        "written, not answered"
    );
    let mut a = std::pin::pin!(store.get(&ka));
    assert!(
        a.as_mut().poll(&mut cx).is_pending(),
        "first of the next turn"
    );
    let mut w = std::pin::pin!(store.get(&kw));
    assert!(w.as_mut().poll(&mut cx).is_pending(), "queued behind a");
    settle().await;
    // x1, woken for its reply, writes a's and w's commands.
    let got = x1.as_mut().poll(&mut cx);
    assert!(matches!(got, Poll::Ready(Ok(_))), "{got:?}");
    settle().await;
    // w reads a's reply and its own.
    assert!(matches!(w.as_mut().poll(&mut cx), Poll::Ready(Ok(_))));
    // c is polled only when woken, as a runtime would poll it.
    let woken = Arc::new(Flag(std::sync::atomic::AtomicBool::new(false)));
    let waker = Waker::from(woken.clone());
    let mut c_cx = Context::from_waker(&waker);
    let mut c = std::pin::pin!(store.get(&kc));
    assert!(c.as_mut().poll(&mut c_cx).is_pending(), "queued behind a");
    // a, answered already, must still write c's command.
    assert!(matches!(a.as_mut().poll(&mut cx), Poll::Ready(Ok(_))));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        settle().await;
        if woken.0.swap(false, std::sync::atomic::Ordering::SeqCst) {
            if let Poll::Ready(got) = c.as_mut().poll(&mut c_cx) {
                break assert!(got.is_ok(), "{got:?}");
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "c never woken with its reply"
        );
    }
}

/// A waker that only notes it was woken.
struct Flag(std::sync::atomic::AtomicBool);

impl std::task::Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// On a loop's own connection, calls dropped before their reply came (a
/// store timeout, a client gone) leave every other call its own reply:
/// the dropped calls' replies are read and thrown away, in order.
#[tokio::test(flavor = "current_thread")]
async fn on_a_loop_dropped_calls_leave_each_reply_with_its_call() {
    use idemgate::idempotency::key::{Fingerprint, RecordKey};
    use idemgate::idempotency::state::{Begin, BeginOptions, State};
    use std::future::Future;
    use std::task::Poll;
    let (_redis, store) = on_a_loop("dropped").await;
    let tag = std::process::id();
    let keys: Vec<RecordKey> = (0..48)
        .map(|i| RecordKey::derive_dedup("dropped", &format!("{tag}-{i}")))
        .collect();
    let fp = Fingerprint([1; 32]);
    for (i, k) in keys.iter().enumerate() {
        let lease = match store
            .begin(k, &fp, BeginOptions::lease(Duration::from_secs(30)))
            .await
        {
            Ok(Begin::Acquired(l)) => l,
            other => panic!("{other:?}"),
        };
        let body: &'static str = Box::leak(format!("body {i}").into_boxed_str());
        let rec = support::contract::record(body);
        assert!(store
            .complete(k, &lease, rec, Duration::from_secs(60))
            .await
            .unwrap());
    }
    let (mut answered, mut dropped) = (0, 0);
    for round in 0..30u64 {
        let calls = keys.iter().enumerate().map(|(i, k)| {
            let store = store.clone();
            let k = *k;
            // Every third call is dropped after one, two or three polls
            // (a yield between them): queued, written, or with its reply
            // on the way. Polled by count, not by time, so some always are.
            let cut = (i as u64 + round).is_multiple_of(3);
            let polls = 1 + (i as u64 / 3 + round) % 3;
            tokio::spawn(async move {
                let mut get = std::pin::pin!(store.get(&k));
                if !cut {
                    return Some((i, get.await));
                }
                for _ in 0..polls {
                    let once = std::future::poll_fn(|cx| Poll::Ready(get.as_mut().poll(cx)));
                    if let Poll::Ready(got) = once.await {
                        return Some((i, got));
                    }
                    tokio::task::yield_now().await;
                }
                None
            })
        });
        for call in futures_util::future::join_all(calls.collect::<Vec<_>>()).await {
            let Some((i, got)) = call.unwrap() else {
                dropped += 1;
                continue;
            };
            answered += 1;
            match got.unwrap().state {
                State::Completed(rec) => {
                    assert_eq!(
                        rec.response.body,
                        format!("body {i}").as_bytes(),
                        "round {round}"
                    )
                }
                other => panic!("key {i}, round {round}: {other:?}"),
            }
        }
    }
    assert!(
        dropped > 0 && answered > dropped,
        "{dropped} dropped, {answered} answered"
    );
    assert_eq!(store.loop_connection(), Some("driven"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_redis() {
    let redis = RedisServer::start();
    let up = TestUpstream::start().await;
    let nodes = replicas(&up, 3, &redis_toml(&[redis.url()], false, "")).await;

    // 300 concurrent duplicates spread across the replicas.
    let clients: Vec<TestClient> = nodes.iter().map(|(_, c)| c.clone()).collect();
    duplicates_agree(&clients, 300, "shared").await;
    assert_eq!(up.calls(), 1);

    // 100 keys x 4 duplicates, each duplicate on a different replica.
    let mut tasks = Vec::new();
    for k in 0..100 {
        for d in 0..4 {
            let c = nodes[(k + d) % 3].1.clone();
            tasks.push(tokio::spawn(async move {
                c.send(
                    "POST",
                    "/v1/charges",
                    &[("idempotency-key", &format!("k{k}")), ("x-delay-ms", "50")],
                    "{}",
                )
                .await
            }));
        }
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().status, 201);
    }
    assert_eq!(up.calls(), 1 + 100);
    let mut per_key = std::collections::HashMap::new();
    for s in up.seen() {
        *per_key
            .entry(s.headers["idempotency-key"].clone())
            .or_insert(0) += 1;
    }
    assert!(
        per_key.values().all(|&n| n == 1),
        "a key ran twice: {per_key:?}"
    );

    // Every key idemgate wrote is prefix + hashed name, and has a TTL.
    let keys = redis.cli(&["--scan", "--pattern", "*"]).unwrap();
    let keys: Vec<&str> = keys.lines().collect();
    assert_eq!(keys.len(), 101);
    for k in keys {
        assert!(
            k.starts_with("idemgate:{") && k.ends_with('}') && k.len() == "idemgate:{}".len() + 64,
            "{k}"
        );
        let ttl: i64 = redis.cli(&["PTTL", k]).unwrap().trim().parse().unwrap();
        assert!(ttl > 0, "{k} has no TTL");
    }
    for (r, _) in nodes {
        r.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_is_renewed_across_replicas() {
    let redis = RedisServer::start();
    let up = TestUpstream::start().await;
    let toml = format!(
        "{}[idempotency]\nlease_ttl = \"1s\"\nwait_timeout = \"10s\"\n",
        redis_toml(&[redis.url()], false, "")
    );
    let nodes = replicas(&up, 2, &toml).await;
    let a = nodes[0].1.clone();
    let first = tokio::spawn(async move {
        a.send(
            "POST",
            "/v1/slow",
            &[("idempotency-key", "long"), ("x-delay-ms", "4000")],
            "{}",
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // Well past the 1 s lease: only renewal keeps it held.
    let dup = nodes[1]
        .1
        .send(
            "POST",
            "/v1/slow",
            &[("idempotency-key", "long"), ("x-delay-ms", "4000")],
            "{}",
        )
        .await;
    let first = first.await.unwrap();
    assert_eq!(dup.status, 201);
    assert_eq!(dup.header("idempotent-replayed"), Some("true"));
    assert_eq!(dup.body, first.body);
    assert_eq!(up.calls(), 1);
    for (r, _) in nodes {
        r.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_is_503_then_recovers_without_restart() {
    let mut redis = RedisServer::start();
    let up = TestUpstream::start().await;
    let (idg, client) = {
        let r = Running::start(config(
            Some(&up.url()),
            &redis_toml(&[redis.url()], false, ""),
        ))
        .await
        .unwrap();
        let c = TestClient::new(r.proxy_addr.unwrap());
        (r, c)
    };
    assert_eq!(client.post("/v1/x", "before", "{}").await.status, 201);
    redis.kill();
    let down = client.post("/v1/x", "during", "{}").await;
    down.assert_problem(503, "store-unavailable");
    assert_eq!(down.header("retry-after"), Some("1"));
    assert_eq!(
        up.calls(),
        1,
        "the upstream must not be called while the store is down"
    );
    // Keyless and uncovered requests don't need the store.
    assert_eq!(client.send("GET", "/v1/x", &[], "").await.status, 201);

    redis.restart();
    // Reconnection happens by itself; allow it a few attempts.
    let mut recovered = None;
    for _ in 0..50 {
        let got = client.post("/v1/x", "after", "{}").await;
        if got.status == 201 {
            recovered = Some(got);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered.is_some(), "idemgate did not reconnect to Redis");
    let again = client.post("/v1/x", "after", "{}").await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(up.calls(), 3);
    idg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_through_on_store_error_forwards_without_idempotency() {
    let mut redis = RedisServer::start();
    let up = TestUpstream::start().await;
    let toml = redis_toml(&[redis.url()], false, "on_store_error = \"pass-through\"");
    let r = Running::start(config(Some(&up.url()), &toml))
        .await
        .unwrap();
    let client = TestClient::new(r.proxy_addr.unwrap());
    redis.kill();
    assert_eq!(client.post("/v1/x", "k", "{}").await.status, 201);
    assert_eq!(client.post("/v1/x", "k", "{}").await.status, 201);
    assert_eq!(up.calls(), 2);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_replicas_run_each_key_once() {
    let cluster = RedisCluster::start();
    let up = TestUpstream::start().await;
    let nodes = replicas(&up, 2, &redis_toml(&cluster.urls(), true, "")).await;
    let mut tasks = Vec::new();
    for k in 0..60 {
        for d in 0..3 {
            let c = nodes[(k + d) % 2].1.clone();
            tasks.push(tokio::spawn(async move {
                c.send(
                    "POST",
                    "/v1/charges",
                    &[
                        ("idempotency-key", &format!("{{tag}}{k}")),
                        ("x-delay-ms", "100"),
                    ],
                    "{}",
                )
                .await
            }));
        }
    }
    let mut by_key: std::collections::HashMap<String, Vec<bytes::Bytes>> = Default::default();
    for (i, t) in tasks.into_iter().enumerate() {
        let got = t.await.unwrap();
        assert_eq!(got.status, 201, "{:?}", got.body);
        by_key
            .entry(format!("{}", i / 3))
            .or_default()
            .push(got.body);
    }
    assert_eq!(up.calls(), 60);
    for bodies in by_key.values() {
        assert!(
            bodies.iter().all(|b| *b == bodies[0]),
            "duplicates got different answers"
        );
    }
    // The user's `{tag}` did not pin every record to one slot.
    let mut slots = std::collections::HashSet::new();
    for n in &cluster.nodes {
        for k in n.cli(&["--scan"]).unwrap().lines() {
            slots.insert(n.cli(&["CLUSTER", "KEYSLOT", k]).unwrap());
        }
    }
    assert!(slots.len() > 10, "records share {} slots", slots.len());
    for (r, _) in nodes {
        r.stop().await;
    }
}

/// A record is one string; builds before it kept a hash of the same
/// fields. Each state written the old way is read as it was meant, and a
/// write turns it into a string: a rolling upgrade keeps every record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_an_earlier_build_kept_as_a_hash_reads_the_same() {
    use idemgate::idempotency::key::{Fingerprint, RecordKey};
    use idemgate::idempotency::record::{CompletedRecord, StoredResponse};
    use idemgate::idempotency::state::{Begin, BeginOptions, Resolution};
    let redis = RedisServer::start();
    let store = connect(&[redis.url()], false).await;
    let mut raw = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = |n: &str| RecordKey::derive_dedup("layout", n);
    // Writes `fields` as the hash an earlier build kept.
    let writer = raw.clone();
    let old = |k: &RecordKey, fields: &[(&str, &[u8])]| {
        let mut pipe = redis::pipe();
        let name = store.record_key(k);
        pipe.del(&name).ignore();
        for (f, v) in fields {
            pipe.hset(&name, *f, *v).ignore();
        }
        pipe.pexpire(&name, 60_000).ignore();
        let mut raw = writer.clone();
        async move { pipe.query_async::<()>(&mut raw).await.unwrap() }
    };
    let kind = |k: &RecordKey| redis.cli(&["TYPE", &store.record_key(k)]).unwrap();
    let fp = Fingerprint([5; 32]);
    let opts = BeginOptions::lease(Duration::from_secs(30));
    let body = |b: &'static str| {
        Arc::new(CompletedRecord {
            origin: None,
            fingerprint: fp,
            created_unix_ms: 1,
            response: StoredResponse {
                status: http::StatusCode::CREATED,
                headers: Default::default(),
                body: bytes::Bytes::from_static(b.as_bytes()),
                body_omitted: false,
                trailers: http::HeaderMap::new(),
            },
        })
    };

    // Completed: the encoded record this build wrote, moved into a hash.
    let done = key("completed");
    let Begin::Acquired(lease) = store.begin(&done, &fp, opts).await.unwrap() else {
        panic!("a new key")
    };
    assert!(store
        .complete(&done, &lease, body("stored"), Duration::from_secs(60))
        .await
        .unwrap());
    assert_eq!(kind(&done).trim(), "string");
    let held: Vec<u8> = redis::cmd("GET")
        .arg(store.record_key(&done))
        .query_async(&mut raw)
        .await
        .unwrap();
    let space = held.iter().position(|&b| b == b' ').unwrap();
    let fence = lease.fence.to_string();
    assert_eq!(&held[..space], format!("c{fence}").as_bytes());
    old(
        &done,
        &[
            ("s", b"c"),
            ("f", fence.as_bytes()),
            ("r", &held[space + 1..]),
        ],
    )
    .await;
    match store.begin(&done, &fp, opts).await.unwrap() {
        Begin::Completed(rec) => assert_eq!(rec.response.body, "stored"),
        other => panic!("{other:?}"),
    }

    // Released: the tombstone's fence still bounds the next one from below.
    let released = key("released");
    let high = 9_000_000_000_000_000u64;
    old(
        &released,
        &[("s", b"r"), ("f", high.to_string().as_bytes())],
    )
    .await;
    match store.begin(&released, &fp, opts).await.unwrap() {
        Begin::Acquired(l) => assert_eq!(l.fence, high + 1),
        other => panic!("{other:?}"),
    }
    assert_eq!(kind(&released).trim(), "string");

    // In flight under a live lease: a duplicate sees it, with its fence.
    let held_key = key("in-flight");
    let far = (std::time::SystemTime::now() + Duration::from_secs(60))
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        .to_string();
    let lease_id = [b'a'; 32];
    let in_flight: [(&str, &[u8]); 5] = [
        ("s", b"i"),
        ("t", &lease_id),
        ("f", b"43"),
        ("p", &fp.0),
        ("l", far.as_bytes()),
    ];
    old(&held_key, &in_flight).await;
    match store.begin(&held_key, &fp, opts).await.unwrap() {
        Begin::InFlight { fingerprint, fence } => {
            assert_eq!((fingerprint, fence), (fp, 43));
        }
        other => panic!("{other:?}"),
    }
    // A waiting duplicate's check sees it in flight too: it waits to its
    // deadline (nothing publishes), where a settled record returns at once.
    let started = tokio::time::Instant::now();
    let deadline = started + Duration::from_millis(300);
    store.wait(&held_key, 43, deadline).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(250));
    // Lapsed: taken over above its fence, and written as a string.
    old(
        &held_key,
        &[
            ("s", b"i"),
            ("t", &lease_id),
            ("f", b"43"),
            ("p", &fp.0),
            ("l", b"1"),
        ],
    )
    .await;
    match store.begin(&held_key, &fp, opts).await.unwrap() {
        Begin::Acquired(l) => assert!(l.fence > 43),
        other => panic!("{other:?}"),
    }
    assert_eq!(kind(&held_key).trim(), "string");

    // Unknown: seen with its cause, then settled by its fence.
    let unknown = key("unknown");
    let fields: [(&str, &[u8]); 6] = [
        ("s", b"u"),
        ("f", b"44"),
        ("p", &fp.0),
        ("c", b"status 504"),
        ("ts", b"1"),
        ("n", b"0"),
    ];
    old(&unknown, &fields).await;
    match store.begin(&unknown, &fp, opts).await.unwrap() {
        Begin::Unknown { unknown: u, .. } => {
            assert_eq!((u.fence, u.fingerprint, u.since_unix_ms), (44, fp, 1));
        }
        other => panic!("{other:?}"),
    }
    let settled = Resolution::Completed(body("reconciled"), Duration::from_secs(60));
    assert!(store.resolve(&unknown, 44, settled).await.unwrap());
    assert_eq!(kind(&unknown).trim(), "string");
    match store.begin(&unknown, &fp, opts).await.unwrap() {
        Begin::Completed(rec) => assert_eq!(rec.response.body, "reconciled"),
        other => panic!("{other:?}"),
    }

    // An earlier build's begin on a record this one wrote fails (a store
    // error there, `503` by default) and writes nothing.
    let earlier_begin = concat!(
        include_str!("../src/store/redis_store/lua/lib.lua"),
        include_str!("../benches/redis_record/begin_hash.lua")
    );
    let name = store.record_key(&unknown);
    let before = redis.cli(&["GET", &name]).unwrap();
    let ran: redis::RedisResult<redis::Value> = redis::cmd("EVAL")
        .arg(earlier_begin)
        .arg(1)
        .arg(&name)
        .arg("b".repeat(32))
        .arg(&fp.0[..])
        .arg(30_000)
        .arg(30_000)
        .arg("")
        .arg("")
        .query_async(&mut raw)
        .await;
    let err = ran.expect_err("a hash script on a string");
    assert!(err.to_string().contains("WRONGTYPE"), "{err}");
    assert_eq!(redis.cli(&["GET", &name]).unwrap(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_record_is_a_miss_not_a_panic() {
    let redis = RedisServer::start();
    let store = connect(&[redis.url()], false).await;
    let up = TestUpstream::start().await;
    // Without the replay cache: the record is rewritten behind idemgate's
    // back, which only a read from Redis sees.
    let r = Running::start(config(
        Some(&up.url()),
        &redis_toml(&[redis.url()], false, "replay_cache = 0"),
    ))
    .await
    .unwrap();
    let client = TestClient::new(r.proxy_addr.unwrap());
    assert_eq!(client.post("/v1/x", "v", "{}").await.status, 201);
    // Overwrite the record with a future encoding version.
    let key = redis.cli(&["--scan"]).unwrap().trim().to_owned();
    // A completed record is `c`, its fence, a space, the encoded record.
    let held = redis.cli(&["GET", &key]).unwrap();
    let (fence, _) = held.split_once(' ').expect("a completed record");
    assert!(fence.starts_with('c'), "{fence}");
    let future = format!("{fence} \u{9}future-format");
    redis.cli(&["SET", &key, &future, "KEEPTTL"]).unwrap();
    let again = client.post("/v1/x", "v", "{}").await;
    assert_eq!(again.status, 201);
    assert_eq!(again.header("idempotent-replayed"), None);
    assert_eq!(up.calls(), 2);
    // The new record is readable again.
    assert_eq!(
        client
            .post("/v1/x", "v", "{}")
            .await
            .header("idempotent-replayed"),
        Some("true")
    );
    store.ping().await.unwrap();
    r.stop().await;
}

/// Per-command call counts from INFO commandstats (commands run inside Lua
/// scripts count too).
fn command_calls(redis: &RedisServer) -> std::collections::HashMap<String, u64> {
    let info = redis.cli(&["INFO", "commandstats"]).unwrap();
    let mut out = std::collections::HashMap::new();
    for line in info.lines() {
        if let Some((name, rest)) = line
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        {
            let calls = rest
                .split("calls=")
                .nth(1)
                .and_then(|s| s.split(',').next())
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            out.insert(name.to_owned(), calls);
        }
    }
    out
}

/// Round trips idemgate made between two snapshots: script runs plus any
/// command our scripts never issue (so it must have come from a client). Each
/// script reads its key exactly once (a record's GET, a bucket's HMGET), so a
/// stray top-level read shows as well.
fn round_trips(
    before: &std::collections::HashMap<String, u64>,
    after: &std::collections::HashMap<String, u64>,
) -> (u64, u64) {
    const IN_SCRIPTS: [&str; 11] = [
        "get", "set", "hmget", "time", "del", "hset", "pexpire", "hdel", "publish", "info", "pttl",
    ];
    let delta =
        |name: &str| after.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0);
    let scripts = delta("evalsha") + delta("eval");
    let others: u64 = after
        .keys()
        .filter(|n| !IN_SCRIPTS.contains(&n.as_str()) && *n != "evalsha" && *n != "eval")
        .map(|n| delta(n))
        .sum();
    assert_eq!(
        delta("get") + delta("hmget"),
        scripts,
        "a top-level GET or HMGET was sent"
    );
    (scripts + others, scripts)
}

/// Round trips (all commands, scripts) of a first request and of its
/// replay, from Redis' own commandstats, under `route` config lines.
/// The third pair: a second replay.
async fn first_and_replay_round_trips(store: &str, route: &str) -> [(u64, u64); 3] {
    let redis = RedisServer::start();
    let up = TestUpstream::start().await;
    let toml = format!("{}{route}", redis_toml(&[redis.url()], false, store));
    let r = Running::start(config(Some(&up.url()), &toml))
        .await
        .unwrap();
    let client = TestClient::new(r.proxy_addr.unwrap());
    // Warm up: scripts get loaded on first use.
    client.post("/v1/x", "warm", "{}").await;
    client.post("/v1/x", "warm", "{}").await;
    let before = command_calls(&redis);
    assert_eq!(client.post("/v1/x", "first", "{}").await.status, 201);
    let after_first = command_calls(&redis);
    let replay = client.post("/v1/x", "first", "{}").await;
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    let after_replay = command_calls(&redis);
    let again = client.post("/v1/x", "first", "{}").await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.body, replay.body);
    let after_again = command_calls(&redis);
    r.stop().await;
    [
        round_trips(&before, &after_first),
        round_trips(&after_first, &after_replay),
        round_trips(&after_replay, &after_again),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_request_costs_two_round_trips_and_a_replay_one() {
    let [first, replay, again] = first_and_replay_round_trips("replay_cache = 0", "").await;
    assert_eq!(first, (2, 2), "first request: begin + complete");
    assert_eq!(replay, (1, 1), "replay: begin only");
    assert_eq!(again, (1, 1), "every replay: begin only");
}

/// With the replay cache (the default), a record replayed once from Redis
/// is replayed from the process after that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_replay_cache_a_second_replay_costs_no_round_trip() {
    let [first, replay, again] = first_and_replay_round_trips("", "").await;
    assert_eq!(first, (2, 2), "first request: begin + complete");
    assert_eq!(replay, (1, 1), "first replay: begin, which keeps a copy");
    assert_eq!(again, (0, 0), "second replay: from the process");
}

/// Fair share costs one round trip per new key on Redis, none per replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fair_share_costs_one_round_trip_per_new_key_and_none_per_replay() {
    let [first, replay, _] = first_and_replay_round_trips(
        "replay_cache = 0",
        "[idempotency]\nnew_keys_per_scope = \"1000/s\"\n",
    )
    .await;
    assert_eq!(first, (3, 3), "begin + admit + complete");
    assert_eq!(replay, (1, 1), "replay: begin only");
}

/// Sets up the user of the ACL line the README recommends, read from the
/// README itself, with `s3cret` for its password.
fn readme_acl_on(redis: &RedisServer) {
    let line = include_str!("../README.md")
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("ACL SETUSER idemgate "))
        .expect("the README's ACL line");
    let args: Vec<String> = line
        .split_whitespace()
        .map(|w| w.replace(">PASSWORD", ">s3cret"))
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_eq!(redis.cli(&args).unwrap().trim(), "OK");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_acl_is_enough_and_auth_comes_from_the_url() {
    let redis = RedisServer::start();
    readme_acl_on(&redis);
    // Without the password nothing works...
    let wrong = redis.url().replace("redis://", "redis://idemgate:wrong@");
    assert!(RedisStore::connect(RedisOptions::new(vec![wrong], false))
        .await
        .is_err());
    // ...with it, everything idemgate does is allowed.
    let url = redis.url().replace("redis://", "redis://idemgate:s3cret@");
    let up = TestUpstream::start().await;
    let toml = format!(
        "{}[idempotency]\nwait_timeout = \"5s\"\n",
        redis_toml(&[url], false, "")
    );
    let r = Running::start(config(Some(&up.url()), &toml))
        .await
        .unwrap();
    let client = TestClient::new(r.proxy_addr.unwrap());
    let c = client.clone();
    let first = tokio::spawn(async move {
        c.send(
            "POST",
            "/v1/x",
            &[("idempotency-key", "acl"), ("x-delay-ms", "300")],
            "{}",
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A waiting duplicate exercises SUBSCRIBE and the re-check.
    let dup = client
        .send(
            "POST",
            "/v1/x",
            &[("idempotency-key", "acl"), ("x-delay-ms", "300")],
            "{}",
        )
        .await;
    assert_eq!(first.await.unwrap().status, 201);
    assert_eq!(dup.header("idempotent-replayed"), Some("true"));
    // Release path (uncacheable status) too.
    assert_eq!(
        client
            .send(
                "POST",
                "/v1/x",
                &[("idempotency-key", "rel"), ("x-status", "503")],
                "{}"
            )
            .await
            .status,
        503
    );
    assert_eq!(up.calls(), 2);
    r.stop().await;
}
