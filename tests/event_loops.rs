//! `event_loops`: the proxy listener served by event loops of their own
//! (threads with a single-threaded runtime each, a socket each with
//! `SO_REUSEPORT`). Duplicates arriving on different loops still run once,
//! every connection is served, and the loops end with the server. On
//! Redis (standalone and Cluster) each loop opens a connection of its own
//! and uses it. (The drain on SIGTERM with loops is in `process.rs`, a WebSocket through
//! them in `websockets.rs`.)

mod support;

use std::time::{Duration, Instant};

use support::redis_server::{store_toml, RedisCluster, RedisServer};
use support::{duplicates_agree, start, TestClient, TestUpstream};

/// The names of this process's threads that are event loops.
fn loop_threads() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| name.starts_with("idemgate-loop-"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_run_once_across_loops_and_the_loops_end_with_the_server() {
    let up = TestUpstream::start().await;
    let (idg, client) = start(&up, "event_loops = 3\n").await;
    // A thread names itself as it starts: give them a moment.
    let mut names = Vec::new();
    for _ in 0..100 {
        names = loop_threads();
        if names.len() == 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    names.sort();
    assert_eq!(
        names,
        ["idemgate-loop-1", "idemgate-loop-2", "idemgate-loop-3"]
    );
    // Many connections, so the kernel spreads them over the loops: one key
    // sent 60 times at once runs once.
    let addr = idg.proxy_addr.unwrap();
    let clients: Vec<TestClient> = (0..12).map(|_| TestClient::new(addr)).collect();
    duplicates_agree(&clients, 60, "shared").await;
    assert_eq!(up.calls(), 1);
    // 150 new keys at once, then each again: 150 more calls, then none.
    let send = |i: usize, c: TestClient| async move {
        c.post("/v1/charges", &format!("k{i}"), &format!("{{\"n\":{i}}}"))
            .await
    };
    let first: Vec<_> = (0..150)
        .map(|i| tokio::spawn(send(i, clients[i % clients.len()].clone())))
        .collect();
    for t in first {
        let got = t.await.unwrap();
        assert_eq!(got.status, 201, "{:?}", got.body);
        assert_eq!(got.header("idempotent-replayed"), None);
    }
    assert_eq!(up.calls(), 151);
    let again: Vec<_> = (0..150)
        .map(|i| tokio::spawn(send(i, clients[(i + 1) % clients.len()].clone())))
        .collect();
    for t in again {
        let got = t.await.unwrap();
        assert_eq!(got.status, 201);
        assert_eq!(got.header("idempotent-replayed"), Some("true"));
    }
    assert_eq!(up.calls(), 151);
    // Requests without a key pass through on the loops too.
    let plain = client.send("GET", "/v1/things", &[], "").await;
    assert_eq!(plain.status, 201, "{:?}", plain.body);
    assert_eq!(up.calls(), 152);
    idg.stop().await;
    assert_eq!(loop_threads(), Vec::<String>::new(), "the loops ended");
}

/// 60 duplicates of one key spread over `clients` run once; 150 new keys
/// each run once, and their duplicates replay (sent on other connections,
/// so often through another loop than the first).
async fn once_across_loops(clients: &[TestClient], up: &TestUpstream, tag: &str) {
    let base = up.calls();
    duplicates_agree(clients, 60, &format!("{tag}-shared")).await;
    assert_eq!(up.calls(), base + 1);
    for pass in 0..2 {
        let sent: Vec<_> = (0..150)
            .map(|i| {
                let c = clients[(i + pass) % clients.len()].clone();
                let key = format!("{tag}-k{i}");
                tokio::spawn(
                    async move { c.post("/v1/charges", &key, &format!("{{\"n\":{i}}}")).await },
                )
            })
            .collect();
        for t in sent {
            let got = t.await.unwrap();
            assert_eq!(got.status, 201, "{:?}", got.body);
            let replayed = (pass == 1).then_some("true");
            assert_eq!(got.header("idempotent-replayed"), replayed);
        }
        assert_eq!(up.calls(), base + 151);
    }
}

/// The connections Redis holds from a RESP3 client (idemgate; redis-cli
/// speaks RESP2), as `(age in seconds, last command)`.
fn resp3_clients(redis: &RedisServer) -> Vec<(u64, String)> {
    let list = redis.cli(&["CLIENT", "LIST"]).unwrap();
    list.lines()
        .filter(|l| l.contains(" resp=3"))
        .map(|l| {
            let field = |name: &str| {
                l.split(' ')
                    .find_map(|f| f.strip_prefix(name))
                    .unwrap_or_default()
                    .to_owned()
            };
            (field("age=").parse().unwrap(), field("cmd="))
        })
        .collect()
}

/// On standalone Redis: the store's shared connection, then one more per
/// loop that served a covered call (not one per call), each carrying the
/// scripts; after Redis restarts, the loops' connections come back by
/// themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_each_loop_calls_the_store_on_a_connection_of_its_own() {
    let mut redis = RedisServer::start();
    let up = TestUpstream::start().await;
    let extra = format!("event_loops = 2\n{}", store_toml(&redis.url()));
    let (idg, _) = start(&up, &extra).await;
    assert_eq!(resp3_clients(&redis).len(), 1, "the shared connection");
    let addr = idg.proxy_addr.unwrap();
    let clients: Vec<TestClient> = (0..12).map(|_| TestClient::new(addr)).collect();
    once_across_loops(&clients, &up, "a").await;
    let held = resp3_clients(&redis);
    assert!((2..=3).contains(&held.len()), "{held:?}");
    // The loops' connections are the newer ones; they ran the scripts.
    let mut by_age = held.clone();
    by_age.sort();
    for (_, cmd) in &by_age[..held.len() - 1] {
        assert_eq!(cmd, "evalsha", "{held:?}");
    }

    let mut redis = tokio::task::spawn_blocking(move || {
        redis.restart();
        redis
    })
    .await
    .unwrap();
    // Until every connection is back a call may fail (503); then none does.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = clients[0].post("/v1/charges", "probe", "{}").await;
        if got.status == 201 {
            break;
        }
        assert_eq!(got.status, 503, "{:?}", got.body);
        assert!(Instant::now() < deadline, "Redis never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let calls = up.calls();
    once_across_loops(&clients, &up, "b").await;
    assert_eq!(up.calls(), calls + 151);
    let held = resp3_clients(&redis);
    assert!((2..=3).contains(&held.len()), "{held:?}");
    idg.stop().await;
    redis.kill();
}

/// On Redis Cluster the loops' connections (a cluster connection each)
/// keep the same promise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_cluster_keys_run_once_across_loops() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    let up = TestUpstream::start().await;
    let urls: Vec<String> = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect();
    let extra = format!(
        "event_loops = 2\n[store]\nbackend = \"redis-cluster\"\nurls = [{}]\n",
        urls.join(", ")
    );
    let (idg, _) = start(&up, &extra).await;
    let node = &cluster.nodes[0];
    let before = resp3_clients(node).len();
    let addr = idg.proxy_addr.unwrap();
    let clients: Vec<TestClient> = (0..12).map(|_| TestClient::new(addr)).collect();
    once_across_loops(&clients, &up, "c").await;
    let after = resp3_clients(node).len();
    assert!(
        (before + 1..=before + 2).contains(&after),
        "{before} -> {after}"
    );
    idg.stop().await;
}
