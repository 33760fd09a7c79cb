//! Reloading the configuration of a running idemgate process: a change of
//! the file and SIGHUP both apply a route's new `required` and
//! `record_ttl` to new requests while a client keeps sending (none fails);
//! a broken file changes nothing and is counted.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::proc::Proc;
use support::{TestClient, TestUpstream};

fn route(required: bool, ttl: &str) -> String {
    format!("[[routes]]\npath = \"/v1/**\"\nrequired = {required}\nrecord_ttl = \"{ttl}\"\n")
}

async fn metric(admin: &TestClient, line: &str) -> f64 {
    let text = admin.send("GET", "/metrics", &[], "").await;
    let text = String::from_utf8_lossy(&text.body).to_string();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(line)
                .map(|v| v.trim().parse::<f64>().unwrap())
        })
        .unwrap_or_else(|| panic!("no {line} in metrics"))
}

/// Waits until a keyless POST gets `status` (the new policy is in force).
async fn until_keyless_gets(c: &TestClient, status: u16) -> Duration {
    let started = Instant::now();
    loop {
        let got = c.send("POST", "/v1/orders", &[], "{}").await;
        if got.status == status {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the reload never applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_file_and_sighup_reload_without_dropping_a_request() {
    let up = TestUpstream::start().await;
    let dir = std::env::temp_dir().join(format!("idemgate-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("idemgate.toml");
    std::fs::write(&file, route(false, "1h")).unwrap();
    let p = Proc::start(&up.url(), &["--config", file.to_str().unwrap()], &[]).await;
    let c = TestClient::new(p.proxy);
    let admin = TestClient::new(p.admin);

    // A client that keeps sending covered requests throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = {
        let (c, stop, sent, failed) = (c.clone(), stop.clone(), sent.clone(), failed.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let got = c.post("/v1/charges", &format!("load-{i}"), "{}").await;
                sent.fetch_add(1, Ordering::Relaxed);
                if got.status != 201 {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
        })
    };

    // Before: keyless requests pass through.
    assert_eq!(c.send("POST", "/v1/orders", &[], "{}").await.status, 201);

    // 1. The file changes: required and a short record_ttl apply.
    std::fs::write(&file, route(true, "2s")).unwrap();
    until_keyless_gets(&c, 400).await;
    assert_eq!(
        metric(&admin, "idemgate_config_reloads_total{result=\"success\"}").await,
        1.0
    );
    let stamp = metric(
        &admin,
        "idemgate_config_last_reload_success_timestamp_seconds",
    )
    .await;
    assert!(stamp > 1.7e9, "{stamp}");
    // New records live 2 s: the key runs again once it expired.
    let calls = up.calls();
    assert_eq!(c.post("/v1/charges", "ttl", "{}").await.status, 201);
    let inspected = admin
        .send("GET", "/v1/keys?key=ttl&path=/v1/charges", &[], "")
        .await
        .json();
    assert!(
        inspected["expires_in_ms"].as_u64().unwrap() <= 2000,
        "{inspected}"
    );
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let rerun = c.post("/v1/charges", "ttl", "{}").await;
    assert_eq!(rerun.header("idempotent-replayed"), None);
    assert!(up.calls() >= calls + 2);

    // 2. A broken file: nothing changes, the failure is counted.
    std::fs::write(
        &file,
        "[[routes]]\npath = \"/v1/**\"\nrequired = \"maybe\"\n",
    )
    .unwrap();
    let started = Instant::now();
    while metric(&admin, "idemgate_config_reloads_total{result=\"failure\"}").await < 1.0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the broken file was not noticed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.send("POST", "/v1/orders", &[], "{}")
        .await
        .assert_problem(400, "missing-key");

    // 3. SIGHUP: the new file applies at once.
    std::fs::write(&file, route(false, "1h")).unwrap();
    p.signal("-HUP");
    until_keyless_gets(&c, 201).await;
    // Let the watcher look at the file again: it is the one SIGHUP loaded.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        metric(&admin, "idemgate_config_reloads_total{result=\"success\"}").await,
        2.0
    );

    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert!(sent.load(Ordering::Relaxed) > 50, "the client barely ran");
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "a request failed during a reload"
    );
    p.signal("-TERM");
    let (code, log) = p.finish();
    assert_eq!(code, Some(0));
    assert!(
        log.contains("config reloaded") && log.contains("SIGHUP"),
        "{log}"
    );
    // The refused reload named its problem.
    assert!(
        log.contains("routes[0].required: \\\"maybe\\\" is not true or false")
            || log.contains("routes[0].required: \"maybe\" is not true or false"),
        "{log}"
    );
    std::fs::remove_dir_all(dir).ok();
}

/// Rotating a webhook secret: the secret file changes, SIGHUP reads it
/// again (the watcher follows the config file only), and deliveries signed
/// with the new secret pass while the old one's get 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reads_a_rotated_webhook_secret() {
    use support::webhooks::{now, sign};
    let up = TestUpstream::start().await;
    let dir = std::env::temp_dir().join(format!("idemgate-rotate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("gh-secret");
    std::fs::write(&secret, "old-secret\n").unwrap();
    let file = dir.join("idemgate.toml");
    std::fs::write(
        &file,
        format!(
            "[[routes]]\npath = \"/hooks/github\"\npreset = \"github\"\nsecrets = [{{ file = \"{}\" }}]\n",
            secret.display()
        ),
    )
    .unwrap();
    let p = Proc::start(&up.url(), &["--config", file.to_str().unwrap()], &[]).await;
    let c = TestClient::new(p.proxy);
    let deliver = |key: &'static str, id: &'static str| {
        let c = c.clone();
        async move {
            let body = "{\"action\":\"opened\"}";
            let h = sign("github", key, id, body, now());
            let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            c.send("POST", "/hooks/github", &h, body)
                .await
                .status
                .as_u16()
        }
    };
    assert_eq!(deliver("old-secret", "d-1").await, 201);
    assert_eq!(deliver("new-secret", "d-2").await, 401);
    std::fs::write(&secret, "new-secret\n").unwrap();
    p.signal("-HUP");
    let started = Instant::now();
    while deliver("new-secret", "d-3").await != 201 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the rotated secret never applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(deliver("old-secret", "d-4").await, 401);
    p.signal("-TERM");
    p.finish();
    std::fs::remove_dir_all(dir).ok();
}
