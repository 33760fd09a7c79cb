//! The Redis Streams worker example, end to end: messages in a stream, two
//! worker processes, one SIGKILLed mid-message. After redelivery every
//! message's side effect happened exactly once, and the killed worker's late
//! `complete` is refused.

mod support;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use idemgate::server::Running;
use serde_json::json;
use support::redis_server::RedisServer;
use support::{config, TestClient};

/// The example binary cargo built next to this test.
fn worker_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let debug = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let bin = debug.join("examples").join("redis_streams_worker");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build --examples` (scripts/test.sh does)",
        bin.display()
    );
    bin
}

fn worker(
    redis: &RedisServer,
    admin: std::net::SocketAddr,
    consumer: &str,
    extra: &[&str],
) -> std::process::Child {
    Command::new(worker_bin())
        .args([
            "--redis",
            &redis.url(),
            "--stream",
            "orders",
            "--group",
            "billing",
            "--consumer",
            consumer,
        ])
        .args([
            "--idemgate",
            &format!("http://{admin}"),
            "--scope",
            "orders.billing",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_never_doubles_a_side_effect() {
    let redis = RedisServer::start();
    let toml = support::redis_server::store_toml(&redis.url());
    let idg = Running::start(config(None, &toml)).await.unwrap();
    let admin = idg.admin_addr;

    redis
        .cli(&["XGROUP", "CREATE", "orders", "billing", "$", "MKSTREAM"])
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(
            redis
                .cli(&["XADD", "orders", "*", "order", &i.to_string()])
                .unwrap()
                .trim()
                .to_owned(),
        );
    }

    // Worker A is slow; kill it as soon as it holds a message.
    let mut a = worker(
        &redis,
        admin,
        "a",
        &["--work-ms", "3000", "--lease-ms", "1000"],
    );
    let stdout = a.stdout.take().unwrap();
    let claimed = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines();
        lines.next().unwrap().unwrap()
    })
    .await
    .unwrap();
    a.kill().unwrap();
    a.wait().unwrap();
    // "a: claimed <id> lease <lease_id> fence <n>"
    let words: Vec<&str> = claimed.split_whitespace().collect();
    assert_eq!(words[1], "claimed", "{claimed}");
    let (killed_id, killed_lease) = (words[2].to_owned(), words[4].to_owned());

    // Worker B takes everything, including A's message once its lease lapsed
    // and it sat idle for 1.5 s.
    let b = worker(
        &redis,
        admin,
        "b",
        &[
            "--work-ms",
            "5",
            "--lease-ms",
            "1000",
            "--min-idle-ms",
            "1500",
            "--exit-when-idle",
        ],
    );
    let out = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut b = b;
        loop {
            if b.try_wait().unwrap().is_some() {
                break;
            }
            assert!(Instant::now() < deadline, "worker b did not finish");
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut s = String::new();
        std::io::Read::read_to_string(&mut b.stdout.take().unwrap(), &mut s).unwrap();
        s
    })
    .await
    .unwrap();

    // Every message's side effect happened exactly once.
    for id in &ids {
        let n = redis.cli(&["HGET", "orders:effects", id]).unwrap();
        assert_eq!(n.trim(), "1", "message {id} ran {} times\n{out}", n.trim());
    }
    assert!(out.contains(&format!("claimed {killed_id}")), "{out}");
    assert_eq!(
        redis
            .cli(&["XPENDING", "orders", "billing"])
            .unwrap()
            .lines()
            .next()
            .unwrap()
            .trim(),
        "0"
    );

    // The killed worker's late complete is refused: B's lease superseded it.
    let api = TestClient::new(admin);
    let late = api
        .send(
            "POST",
            "/v1/dedup/orders.billing/complete",
            &[],
            &json!({"key": killed_id, "lease_id": killed_lease}).to_string(),
        )
        .await;
    assert_eq!(late.status, 409);
    assert_eq!(late.json()["status"], "lease_lost");
    let rec = api
        .send(
            "GET",
            &format!("/v1/dedup/orders.billing/keys/{killed_id}"),
            &[],
            "",
        )
        .await
        .json();
    assert_eq!(rec["state"], "completed");
    assert_eq!(rec["attempts"], 2);
    assert_eq!(rec["result"]["done_by"], "b");
    idg.stop().await;
}
