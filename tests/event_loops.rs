//! `event_loops`: the proxy listener served by event loops of their own
//! (threads with a single-threaded runtime each, a socket each with
//! `SO_REUSEPORT`). Duplicates arriving on different loops still run once,
//! every connection is served, and the loops end with the server.
//! (The drain on SIGTERM with loops is in `process.rs`, a WebSocket through
//! them in `websockets.rs`.)

mod support;

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
