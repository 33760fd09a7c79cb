//! The real binary as an operator runs it: graceful drain on SIGTERM, logs
//! that never carry keys or credentials, and the demo.

mod support;

use support::proc::Proc;

use std::process::Command;
use std::time::{Duration, Instant};

use support::{TestClient, TestUpstream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_an_in_flight_request_then_exits_0() {
    drains_an_in_flight_request(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_an_in_flight_request_on_event_loops_then_exits_0() {
    drains_an_in_flight_request(&[("IDEMGATE_EVENT_LOOPS", "2")]).await;
}

/// A covered request in flight when SIGTERM comes is answered; no new
/// connection is accepted meanwhile; the process then exits 0.
async fn drains_an_in_flight_request(env: &[(&str, &str)]) {
    let up = TestUpstream::start().await;
    let p = Proc::start(&up.url(), &[], env).await;
    let client = TestClient::new(p.proxy);
    let c = client.clone();
    let slow = tokio::spawn(async move {
        c.send(
            "POST",
            "/v1/charges",
            &[("idempotency-key", "drain"), ("x-delay-ms", "1500")],
            "{}",
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    p.signal("-TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Draining: no new connections are accepted.
    assert!(tokio::net::TcpStream::connect(p.proxy).await.is_err());
    let got = slow.await.unwrap();
    assert_eq!(got.status, 201);
    let (code, log) = tokio::task::spawn_blocking(move || p.finish())
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("draining"), "{log}");
    assert_eq!(up.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_subcommand_probes_the_admin_listener() {
    let up = TestUpstream::start().await;
    let p = Proc::start(&up.url(), &[], &[]).await;
    let admin = p.admin.to_string();
    let check = move |extra: &'static [&'static str]| {
        let admin = admin.clone();
        move || {
            Command::new(env!("CARGO_BIN_EXE_idemgate"))
                .args(["healthcheck", "--admin-listen", &admin])
                .args(extra)
                .output()
                .unwrap()
        }
    };
    let live = tokio::task::spawn_blocking(check(&[])).await.unwrap();
    assert_eq!(
        live.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&live.stderr)
    );
    let ready = tokio::task::spawn_blocking(check(&["--ready"]))
        .await
        .unwrap();
    assert_eq!(ready.status.code(), Some(0));
    p.signal("-TERM");
    let (code, _) = tokio::task::spawn_blocking(move || p.finish())
        .await
        .unwrap();
    assert_eq!(code, Some(0));
    let dead = tokio::task::spawn_blocking(check(&[])).await.unwrap();
    assert_eq!(dead.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&dead.stderr).contains("did not answer"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_outcomes_but_never_keys_or_credentials() {
    let up = TestUpstream::start().await;
    let p = Proc::start(
        &up.url(),
        &["--log-format", "json"],
        &[("RUST_LOG", "debug")],
    )
    .await;
    let client = TestClient::new(p.proxy);
    let headers = [
        ("idempotency-key", "secret-key-8d1f"),
        ("authorization", "Bearer tok-5ecret"),
        ("content-type", "application/json"),
    ];
    client
        .send(
            "POST",
            "/v1/charges",
            &headers,
            "{\"card\":\"4242-body-secret\"}",
        )
        .await;
    client
        .send(
            "POST",
            "/v1/charges",
            &headers,
            "{\"card\":\"4242-body-secret\"}",
        )
        .await;
    p.signal("-INT");
    let (code, log) = tokio::task::spawn_blocking(move || p.finish())
        .await
        .unwrap();
    assert_eq!(code, Some(0));
    let mut outcomes = Vec::new();
    for line in log.lines() {
        let doc: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}"));
        if let Some(o) = doc["fields"]["outcome"].as_str() {
            outcomes.push(o.to_owned());
            assert_eq!(
                doc["fields"]["record"].as_str().unwrap().len(),
                64,
                "{line}"
            );
        }
    }
    assert_eq!(outcomes, ["forwarded", "replayed"], "{log}");
    for secret in ["secret-key-8d1f", "tok-5ecret", "4242-body-secret"] {
        assert!(!log.contains(secret), "{secret} leaked into the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_and_reports_one_charge_per_key() {
    let out = tokio::task::spawn_blocking(|| {
        Command::new(env!("CARGO_BIN_EXE_idemgate"))
            .arg("demo")
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("19 requests sent for 7 orders; the API charged 7 time(s)"),
        "{text}"
    );
    assert!(text.contains("Exactly one charge per order"), "{text}");
    assert!(text.contains("(identical answers)"), "{text}");
    assert!(text.contains("422"), "{text}");
    // The queue act (redis-server is on the PATH here).
    assert!(
        text.contains("Queue: 7 messages for 5 orders; the worker shipped 5 time(s)."),
        "{text}"
    );
    assert!(
        text.contains("asked the worker, and recorded it shipped"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_only_mode_opens_no_proxy_listener() {
    // The proxy's port stays held by this test: had idemgate tried to
    // listen on it, it would have exited with "cannot listen". (Probing a
    // port for no listener afterwards could meet another test's server.)
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = held.local_addr().unwrap();
    // Its log: the start line names the admin address the OS picked.
    let log = std::env::temp_dir().join(format!("idemgate-dedup-only-{}.log", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_idemgate"))
        .args([
            "--admin-listen",
            "127.0.0.1:0",
            "--listen",
            &proxy.to_string(),
        ])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let admin = loop {
        let said = std::fs::read_to_string(&log).unwrap_or_default();
        if said.contains("dedup-only mode") {
            break support::proc::field(&said, "admin")
                .expect("the start line names the admin address");
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("idemgate exited ({status}) before it started: {said}");
        }
        assert!(Instant::now() < deadline, "idemgate did not start: {said}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(tokio::net::TcpStream::connect(admin).await.is_ok());
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    let said = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    assert_eq!(status.code(), Some(0), "{said}");
    drop(held);
}

/// The serving process turns transparent huge pages off for itself, so its
/// resident memory follows the records it holds (the README's
/// `store.max_bytes` paragraph): the kernel reports it per process, whatever
/// the system's setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_serving_process_takes_no_transparent_huge_pages() {
    let up = TestUpstream::start().await;
    let p = Proc::start(&up.url(), &[], &[]).await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", p.child.id())).unwrap();
    let thp = status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .map(str::trim);
    assert_eq!(thp, Some("0"), "{status}");
}

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// `store.max_bytes` bounds what the memory store holds: 1 MiB responses
/// fill it, then new keys get 503 while every stored key still replays, and
/// the process stays within `max_bytes` plus a stated margin: its RSS at
/// start plus 40 MiB (the allocator keeps freed pages of the 1 MiB response
/// buffers for reuse; measured 31 MiB for this run in a debug build).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_bytes_bounds_the_memory_store_and_its_rss() {
    const MAX: u64 = 48 << 20;
    const SLACK: u64 = 40 << 20;
    let up = TestUpstream::start().await;
    let file = std::env::temp_dir().join(format!("idemgate-bytes-{}.toml", std::process::id()));
    std::fs::write(&file, "[store]\nmax_bytes = \"48MiB\"\n").unwrap();
    let p = Proc::start(&up.url(), &["--config", file.to_str().unwrap()], &[]).await;
    let client = TestClient::new(p.proxy);
    let baseline = rss(p.child.id());
    let size = (1 << 20).to_string();
    let mut answered = 0;
    let mut full = None;
    for i in 0..120 {
        let key = format!("big-{i}");
        let got = client
            .send(
                "POST",
                "/v1/charges",
                &[("idempotency-key", &key), ("x-body-size", &size)],
                "{}",
            )
            .await;
        match got.status.as_u16() {
            201 => answered += 1,
            503 => {
                got.assert_problem(503, "store-unavailable");
                full = Some(i);
                break;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(full.is_some(), "never full after {answered} MiB");
    // A response streams to its client before its record is stored, so
    // this (sequential) client's next request may begin while the previous
    // record is still being written: the bound is checked when a key
    // begins, and at most the one record in flight then can take the store
    // past it. Count what the store holds, as the admin API shows it.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let admin = TestClient::new(p.admin);
    let mut stored = 0;
    for i in 0..answered {
        let got = admin
            .send(
                "GET",
                &format!("/v1/keys?key=big-{i}&path=/v1/charges"),
                &[],
                "",
            )
            .await;
        if got.status == 200 {
            stored += 1;
        }
    }
    assert_eq!(answered, stored, "every answered key was stored");
    assert!(
        (40..=49).contains(&stored),
        "stored {stored} records of 1 MiB"
    );
    // Live records are never evicted.
    let again = client
        .send(
            "POST",
            "/v1/charges",
            &[("idempotency-key", "big-0"), ("x-body-size", &size)],
            "{}",
        )
        .await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.body.len(), 1 << 20);
    let resident = rss(p.child.id());
    println!(
        "RSS {} MiB, at start {} MiB",
        resident >> 20,
        baseline >> 20
    );
    assert!(
        resident <= baseline + MAX + SLACK,
        "RSS {} MiB over start + max_bytes + slack ({} MiB)",
        resident >> 20,
        (baseline + MAX + SLACK) >> 20
    );
    let metrics = TestClient::new(p.admin)
        .send("GET", "/metrics", &[], "")
        .await;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    let bytes: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("idemgate_store_bytes "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    assert!(
        bytes >= (40 << 20) as f64 && bytes <= MAX as f64 + (2 << 20) as f64,
        "{bytes}"
    );
    println!(
        "stored {stored} MiB, RSS {} MiB (at start {} MiB), store {} MiB",
        resident >> 20,
        baseline >> 20,
        (bytes as u64) >> 20
    );
    p.signal("-TERM");
    let _ = tokio::task::spawn_blocking(move || p.finish()).await;
    let _ = std::fs::remove_file(file);
}

/// A Redis whose `maxmemory-policy` may evict records is named in a
/// warning at start (the README's "Redis" section); `noeviction` is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_may_evict_records_is_warned_of_at_start() {
    let redis = support::redis_server::RedisServer::start();
    let up = TestUpstream::start().await;
    for (policy, warned) in [("noeviction", false), ("allkeys-lru", true)] {
        let set = redis.cli(&["CONFIG", "SET", "maxmemory-policy", policy]);
        assert_eq!(set.as_deref().map(str::trim), Some("OK"));
        let p = Proc::start(&up.url(), &["--redis", &redis.url()], &[]).await;
        p.signal("-TERM");
        let (code, log) = p.finish();
        assert_eq!(code, Some(0), "{log}");
        let warning = log
            .lines()
            .find(|l| l.contains("maxmemory-policy may evict idempotency records"));
        assert_eq!(warning.is_some(), warned, "{policy}: {log}");
        if let Some(line) = warning {
            assert!(line.contains(policy), "{line}");
        }
    }
}
