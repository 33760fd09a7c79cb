//! The real binary as an operator runs it: graceful drain on SIGTERM, logs
//! that never carry keys or credentials, and the demo.

mod support;

use support::proc::{free_port, Proc};

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{TestClient, TestUpstream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_an_in_flight_request_then_exits_0() {
    let up = TestUpstream::start().await;
    let p = Proc::start(&up.url(), &[], &[]).await;
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_only_mode_opens_no_proxy_listener() {
    let admin = free_port();
    let proxy = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_idemgate"))
        .args([
            "--admin-listen",
            &format!("127.0.0.1:{admin}"),
            "--listen",
            &format!("127.0.0.1:{proxy}"),
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", admin))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "admin listener did not open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", proxy))
        .await
        .is_err());
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}
