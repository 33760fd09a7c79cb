//! The delivery mode on Redis Streams, against a real redis-server and a
//! real HTTP worker: idemgate reads the stream through a consumer group
//! and hands each message to the worker once; duplicate publishes are
//! acknowledged without a delivery; retries back off; permanent refusals,
//! exhausted attempts, unknown outcomes and messages without a key become
//! dead letters; two replicas on one store deliver each key once.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use idemgate::server::Running;
use support::deliveries::{metric, until, TestWorker};
use support::redis_server::{store_toml, RedisServer};
use support::{config, TestClient};

fn consumer_toml(redis: &RedisServer, worker: &TestWorker, extra: &str) -> String {
    format!(
        "[[consumers]]\nname = \"billing\"\nbroker = \"{}\"\nsource = \"orders\"\n\
         group = \"billing\"\ndeliver_to = \"{}\"\nretry_backoff = \"100ms\"\n\
         retry_backoff_max = \"1s\"\ndelivery_timeout = \"2s\"\n{extra}",
        redis.url(),
        worker.url()
    )
}

async fn start(redis: &RedisServer, worker: &TestWorker, extra: &str, store: &str) -> Running {
    let text = format!("{}{store}", consumer_toml(redis, worker, extra));
    Running::start(config(None, &text)).await.unwrap()
}

/// Adds an entry to `stream` with `fields`.
fn publish(redis: &RedisServer, stream: &str, fields: &[(&str, &str)]) {
    let mut args = vec!["XADD", stream, "*"];
    for (k, v) in fields {
        args.push(k);
        args.push(v);
    }
    redis.cli(&args).expect("XADD");
}

/// Entries delivered to the group and not yet acknowledged (`MAX` while
/// the group does not exist yet: idemgate creates it as it starts).
fn pending(redis: &RedisServer) -> usize {
    redis
        .cli(&["XPENDING", "orders", "billing"])
        .and_then(|out| out.lines().next()?.trim().parse().ok())
        .unwrap_or(usize::MAX)
}

/// Entries of the group not yet read (Redis 7's `lag`; `MAX` while the
/// group does not exist yet).
fn unread(redis: &RedisServer) -> usize {
    let Some(out) = redis.cli(&["XINFO", "GROUPS", "orders"]) else {
        return usize::MAX;
    };
    let lines: Vec<&str> = out.lines().collect();
    lines
        .iter()
        .position(|l| l.trim() == "lag")
        .and_then(|i| lines.get(i + 1)?.trim().parse().ok())
        .unwrap_or(usize::MAX)
}

/// Every entry of the group read and acknowledged.
fn settled(redis: &RedisServer) -> bool {
    unread(redis) == 0 && pending(redis) == 0
}

fn stream_len(redis: &RedisServer, stream: &str) -> usize {
    redis
        .cli(&["XLEN", stream])
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// The dead-letter stream's entries, as field maps.
fn dead_letters(redis: &RedisServer) -> Vec<HashMap<String, String>> {
    let out = redis.cli(&["XRANGE", "orders.dead", "-", "+"]).unwrap();
    // redis-cli prints an entry id, then field and value lines.
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    let mut entries = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].contains('-') && lines[i].split('-').all(|p| p.parse::<u64>().is_ok()) {
            let mut m = HashMap::new();
            let mut j = i + 1;
            while j + 1 < lines.len()
                && !(lines[j].contains('-')
                    && lines[j].split('-').all(|p| p.parse::<u64>().is_ok()))
            {
                m.insert(lines[j].to_owned(), lines[j + 1].to_owned());
                j += 2;
            }
            entries.push(m);
            i = j;
        } else {
            i += 1;
        }
    }
    entries
}

/// Publishes 1,000 JSON messages `{"n":i}` with `extra` fields, 200 of
/// them an earlier key again (800 keys, `order-0` …).
fn publish_thousand(redis: &RedisServer, extra: &[(&str, &str)]) {
    for i in 0..1000 {
        let key = if i % 5 == 4 {
            format!("order-{}", i - 4)
        } else {
            format!("order-{i}")
        };
        let body = format!("{{\"n\":{i}}}");
        let mut fields = vec![
            ("id", key.as_str()),
            ("body", body.as_str()),
            ("content-type", "application/json"),
        ];
        fields.extend_from_slice(extra);
        publish(redis, "orders", &fields);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_messages_with_duplicate_publishes_each_key_delivered_once() {
    let redis = RedisServer::start();
    let worker = TestWorker::start().await;
    // Published before idemgate starts: the group reads from the start.
    publish_thousand(&redis, &[]);
    let r = start(&redis, &worker, "concurrency = 32\n", "").await;
    until(
        "every entry read and acknowledged",
        Duration::from_secs(30),
        || settled(&redis),
    )
    .await;
    let per_key = worker.per_key();
    assert_eq!(per_key.len(), 800);
    assert!(per_key.values().all(|n| *n == 1), "a key delivered twice");
    let one = &worker.seen()[0];
    assert_eq!(one.headers["content-type"], "application/json");
    assert_eq!(one.headers["ce-specversion"], "1.0");
    assert!(one.headers["ce-source"]
        .to_str()
        .unwrap()
        .contains("orders"));
    assert!(one.body.starts_with(b"{\"n\":"));
    assert_eq!(metric(r.admin_addr, "delivered").await, 800.0);
    assert_eq!(metric(r.admin_addr, "duplicate").await, 200.0);
    let text = TestClient::new(r.admin_addr)
        .send("GET", "/metrics", &[], "")
        .await;
    let text = String::from_utf8_lossy(&text.body);
    // One observation per handling: each message once, and once more each
    // time it was left pending because its key was in flight.
    let handled = 1000.0 + metric(r.admin_addr, "in_progress").await;
    assert!(
        text.contains(&format!(
            "idemgate_delivery_duration_seconds_count{{consumer=\"billing\"}} {handled}"
        )),
        "{text}"
    );
    assert!(
        text.contains("idemgate_deliveries_in_flight{consumer=\"billing\"} 0"),
        "{text}"
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundreds_are_retried_with_backoff_until_the_worker_succeeds() {
    let redis = RedisServer::start();
    let worker = TestWorker::start().await;
    let r = start(&redis, &worker, "", "").await;
    publish(
        &redis,
        "orders",
        &[("id", "flaky"), ("answers", "500,500,500,200")],
    );
    until(
        "the fourth delivery acknowledged",
        Duration::from_secs(10),
        || worker.per_key().get("flaky") == Some(&4) && pending(&redis) == 0,
    )
    .await;
    let seen = worker.seen();
    let attempts: Vec<u32> = seen.iter().map(|s| s.attempt).collect();
    assert_eq!(attempts, [1, 2, 3, 4]);
    // 100 ms doubled per attempt: 100, 200, 400 at least.
    for (i, min) in [100u64, 200, 400].iter().enumerate() {
        let gap = seen[i + 1].at - seen[i].at;
        assert!(gap >= Duration::from_millis(*min), "gap {i}: {gap:?}");
    }
    // One effect: the record is completed; publishing the key again is
    // acknowledged without a delivery.
    publish(&redis, "orders", &[("id", "flaky")]);
    until("the duplicate acknowledged", Duration::from_secs(5), || {
        settled(&redis)
    })
    .await;
    assert_eq!(worker.per_key()["flaky"], 4);
    assert_eq!(metric(r.admin_addr, "retried").await, 3.0);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_exhausted_attempts_unknown_outcomes_and_keyless_messages_are_dead_letters() {
    let redis = RedisServer::start();
    let worker = TestWorker::start().await;
    let r = start(
        &redis,
        &worker,
        "max_attempts = 3\nkey_from = \"field:order\"\n",
        "",
    )
    .await;
    publish(
        &redis,
        "orders",
        &[("order", "bad"), ("answers", "400"), ("body", "x")],
    );
    publish(&redis, "orders", &[("order", "busy"), ("answers", "503")]);
    publish(
        &redis,
        "orders",
        &[("order", "gateway"), ("answers", "502")],
    );
    publish(&redis, "orders", &[("no-order-here", "1")]);
    publish(&redis, "orders", &[("order", "after")]);
    until("every entry settled", Duration::from_secs(15), || {
        settled(&redis) && stream_len(&redis, "orders.dead") == 4
    })
    .await;
    let per_key = worker.per_key();
    assert_eq!(per_key["bad"], 1, "a 400 is not retried");
    assert_eq!(per_key["busy"], 3, "503 until max_attempts");
    assert_eq!(
        per_key["gateway"], 1,
        "an unknown outcome is held, not run again"
    );
    assert_eq!(per_key["after"], 1, "the queue kept flowing");
    let dead = dead_letters(&redis);
    let reason = |key: &str| {
        dead.iter()
            .find(|m| m.get("key").map(String::as_str) == Some(key))
            .and_then(|m| m.get("reason").cloned())
            .unwrap_or_else(|| panic!("no dead letter for {key:?}: {dead:?}"))
    };
    assert!(reason("bad").contains("400"), "{}", reason("bad"));
    assert!(
        reason("busy").contains("max_attempts (3)"),
        "{}",
        reason("busy")
    );
    assert!(
        reason("gateway").starts_with("outcome-unknown"),
        "{}",
        reason("gateway")
    );
    assert!(reason("").starts_with("no-key"), "{}", reason(""));
    let bad = dead
        .iter()
        .find(|m| m.get("key").map(String::as_str) == Some("bad"))
        .unwrap();
    assert_eq!(bad["body"], "x", "the dead letter keeps the message");
    // The store lists them as failed, as the dedup API shows dead letters.
    let failed = TestClient::new(r.admin_addr)
        .send("GET", "/v1/dedup/billing/failed", &[], "")
        .await;
    assert_eq!(failed.status, 200);
    let listed = failed.json().to_string();
    for key in ["bad", "busy", "gateway"] {
        assert!(listed.contains(key), "{key} not listed: {listed}");
    }
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_store_deliver_each_key_once() {
    let redis = RedisServer::start();
    let worker = TestWorker::start().await;
    let store = store_toml(&redis.url());
    let a = start(&redis, &worker, "concurrency = 8\n", &store).await;
    let b = start(&redis, &worker, "concurrency = 8\n", &store).await;
    for i in 0..300 {
        // Every key published twice: the copies may go to either replica.
        let key = format!("k{}", i / 2);
        publish(&redis, "orders", &[("id", &key)]);
    }
    until(
        "every entry read and acknowledged",
        Duration::from_secs(30),
        || settled(&redis) && worker.per_key().len() == 150,
    )
    .await;
    let per_key = worker.per_key();
    assert!(per_key.values().all(|n| *n == 1), "{per_key:?}");
    let (da, db) = (
        metric(a.admin_addr, "delivered").await,
        metric(b.admin_addr, "delivered").await,
    );
    assert_eq!(da + db, 150.0);
    // Fences rise per key: every delivery had one.
    assert!(worker.seen().iter().all(|s| s.fence > 0));
    a.stop().await;
    b.stop().await;
}

#[test]
fn check_config_names_each_consumer_problem_and_hides_the_password() {
    let dir = std::env::temp_dir().join(format!("idemgate-consumers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "[[consumers]]\nname = \"billing\"\nbroker = \"redis://:s3cret@127.0.0.1:6379\"\n\
         source = \"orders\"\ngroup = \"billing\"\ndeliver_to = \"http://127.0.0.1:8080/handle\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_idemgate"))
        .args(["check-config", "--config", good.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("[[consumers]]"), "{text}");
    assert!(
        text.contains("broker = \"redis://127.0.0.1:6379\""),
        "{text}"
    );
    assert!(!text.contains("s3cret"), "{text}");
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[[consumers]]\nname = \"billing\"\nbroker = \"mqtt://127.0.0.1\"\nsource = \"orders\"\n\
         group = \"billing\"\ndeliver_to = \"http://127.0.0.1:8080/handle\"\nmax_attempts = 0\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_idemgate"))
        .args(["check-config", "--config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("consumers[0].broker"), "{err}");
    assert!(err.contains("consumers[0].max_attempts"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// idemgate killed (SIGKILL) with ten deliveries in flight, then started
/// again on the same store and group: no message is lost (every entry is
/// acknowledged in the end); under `hold` none runs twice (each becomes a
/// dead letter `outcome-unknown`); under `release` each runs once more,
/// with a higher fence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_mid_delivery_loses_no_message_and_holds_or_redelivers_as_configured() {
    for policy in ["hold", "release"] {
        let redis = RedisServer::start();
        let worker = TestWorker::start().await;
        let text = format!(
            "{}{}",
            consumer_toml(
                &redis,
                &worker,
                &format!("on_unknown_outcome = \"{policy}\"\nconcurrency = 20\n")
            )
            .replace("delivery_timeout = \"2s\"", "delivery_timeout = \"3s\"")
            .replace(
                "retry_backoff_max = \"1s\"",
                "retry_backoff_max = \"200ms\""
            ),
            store_toml(&redis.url())
        );
        let file = std::env::temp_dir().join(format!(
            "idemgate-delivery-kill-{}-{policy}.toml",
            std::process::id()
        ));
        std::fs::write(&file, text).unwrap();
        let args = ["--config", file.to_str().unwrap()];
        let p = support::proc::Proc::start("http://127.0.0.1:9", &args, &[]).await;
        for i in 0..10 {
            publish(
                &redis,
                "orders",
                &[("id", &format!("slow-{i}")), ("delay_ms", "1500")],
            );
        }
        until("ten deliveries in flight", Duration::from_secs(10), || {
            worker.seen().len() == 10
        })
        .await;
        p.signal("-KILL");
        let _ = p.finish();
        assert_eq!(
            pending(&redis),
            10,
            "nothing acknowledged before it settled"
        );
        let again = support::proc::Proc::start("http://127.0.0.1:9", &args, &[]).await;
        until(
            "every entry acknowledged after the restart",
            Duration::from_secs(40),
            || pending(&redis) == 0 && unread(&redis) == 0,
        )
        .await;
        let per_key = worker.per_key();
        assert_eq!(per_key.len(), 10);
        match policy {
            "hold" => {
                assert!(per_key.values().all(|n| *n == 1), "{policy}: {per_key:?}");
                let dead = dead_letters(&redis);
                assert_eq!(dead.len(), 10, "{dead:?}");
                assert!(dead
                    .iter()
                    .all(|m| m["reason"].starts_with("outcome-unknown")));
            }
            _ => {
                assert!(per_key.values().all(|n| *n == 2), "{policy}: {per_key:?}");
                let seen = worker.seen();
                for i in 0..10 {
                    let key = format!("slow-{i}");
                    let fences: Vec<u64> = seen
                        .iter()
                        .filter(|s| s.key == key)
                        .map(|s| s.fence)
                        .collect();
                    assert!(fences[1] > fences[0], "{key}: {fences:?}");
                }
                assert_eq!(stream_len(&redis, "orders.dead"), 0);
            }
        }
        again.signal("-TERM");
        let (code, _) = again.finish();
        assert_eq!(code, Some(0));
        let _ = std::fs::remove_file(&file);
    }
}

/// SIGTERM: the consumer stops reading, the deliveries in flight finish
/// and are acknowledged, and what was not started stays in the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_deliveries_in_flight_and_reads_no_more() {
    let redis = RedisServer::start();
    let worker = TestWorker::start().await;
    let file = std::env::temp_dir().join(format!(
        "idemgate-delivery-drain-{}.toml",
        std::process::id()
    ));
    std::fs::write(&file, consumer_toml(&redis, &worker, "concurrency = 2\n")).unwrap();
    let args = ["--config", file.to_str().unwrap()];
    let p = support::proc::Proc::start("http://127.0.0.1:9", &args, &[]).await;
    for i in 0..6 {
        publish(
            &redis,
            "orders",
            &[("id", &format!("drain-{i}")), ("delay_ms", "1000")],
        );
    }
    until("two deliveries in flight", Duration::from_secs(10), || {
        worker.seen().len() == 2
    })
    .await;
    p.signal("-TERM");
    let (code, log) = p.finish();
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(worker.seen().len(), 2, "nothing started after SIGTERM");
    assert_eq!(
        pending(&redis),
        0,
        "the two in flight were settled and acknowledged"
    );
    assert_eq!(unread(&redis), 4, "the rest stays in the stream");
    let _ = std::fs::remove_file(&file);
}

/// `/readyz` answers 503 naming a consumer whose broker does not answer,
/// and 200 once it reads its stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_reports_a_consumer_cut_off_from_its_broker() {
    let worker = TestWorker::start().await;
    let closed = support::proc::free_port();
    let text = format!(
        "[[consumers]]\nname = \"billing\"\nbroker = \"redis://127.0.0.1:{closed}\"\n\
         source = \"orders\"\ngroup = \"billing\"\ndeliver_to = \"{}\"\n",
        worker.url()
    );
    let r = Running::start(config(None, &text)).await.unwrap();
    let admin = TestClient::new(r.admin_addr);
    let got = admin.send("GET", "/readyz", &[], "").await;
    got.assert_problem(503, "not-ready");
    assert!(
        got.json()["detail"].as_str().unwrap().contains("billing"),
        "{got:?}"
    );
    r.stop().await;
    let redis = RedisServer::start();
    let r = start(&redis, &worker, "", "").await;
    let started = Instant::now();
    loop {
        if admin_ready(r.admin_addr).await {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    r.stop().await;
}

async fn admin_ready(admin: SocketAddr) -> bool {
    TestClient::new(admin)
        .send("GET", "/readyz", &[], "")
        .await
        .status
        == 200
}

/// The broker killed and restarted mid-stream (its append-only file
/// fsynced on every write, so it comes back with its stream and group):
/// the consumer reconnects by itself and in the end every key is
/// delivered exactly once and every entry acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restarted_mid_stream_loses_nothing_and_runs_nothing_twice() {
    let port = support::redis_server::free_port(false);
    let redis = RedisServer::start_with(port, &["--appendonly", "yes", "--appendfsync", "always"]);
    let worker = TestWorker::start().await;
    let r = start(&redis, &worker, "concurrency = 4\n", "").await;
    for i in 0..200 {
        publish(
            &redis,
            "orders",
            &[("id", &format!("r{i}")), ("delay_ms", "20")],
        );
    }
    until("some delivered", Duration::from_secs(10), || {
        worker.seen().len() >= 40
    })
    .await;
    let redis = tokio::task::spawn_blocking(move || {
        let mut redis = redis;
        redis.restart();
        redis
    })
    .await
    .unwrap();
    until(
        "every entry acknowledged after the restart",
        Duration::from_secs(40),
        || settled(&redis),
    )
    .await;
    let per_key = worker.per_key();
    assert_eq!(per_key.len(), 200, "a message was lost");
    assert!(per_key.values().all(|n| *n == 1), "{per_key:?}");
    r.stop().await;
}

/// `POST /v1/consumers/{name}/redrive`: a dead letter sent back to the
/// stream with its key, its record reset, is delivered once more and
/// completed; `all` sends back every one; bad requests are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_sends_dead_letters_back_to_be_delivered_once_more() {
    let redis = RedisServer::start();
    let worker = TestWorker::start().await;
    let r = start(&redis, &worker, "", "").await;
    // Refused the first time, accepted after.
    for key in ["one", "two", "three"] {
        publish(
            &redis,
            "orders",
            &[("id", key), ("answers", "400,200"), ("body", "b")],
        );
    }
    until("three dead letters", Duration::from_secs(10), || {
        stream_len(&redis, "orders.dead") == 3
    })
    .await;
    let admin = TestClient::new(r.admin_addr);
    let post = |body: &'static str| {
        let admin = admin.clone();
        async move {
            admin
                .send(
                    "POST",
                    "/v1/consumers/billing/redrive",
                    &[("content-type", "application/json")],
                    body,
                )
                .await
        }
    };
    let got = post("{\"key\":\"one\"}").await;
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(got.json()["redriven"], 1);
    until("one delivered again", Duration::from_secs(10), || {
        worker.per_key().get("one") == Some(&2)
    })
    .await;
    assert_eq!(stream_len(&redis, "orders.dead"), 2);
    let again = worker
        .seen()
        .into_iter()
        .filter(|s| s.key == "one")
        .collect::<Vec<_>>();
    assert_eq!(again[1].body, "b", "the message itself came back");
    assert!(again[1].fence > again[0].fence);
    let got = post("{\"all\":true}").await;
    assert_eq!(got.json()["redriven"], 2, "{got:?}");
    until("every one delivered again", Duration::from_secs(10), || {
        let p = worker.per_key();
        p.get("two") == Some(&2) && p.get("three") == Some(&2)
    })
    .await;
    until("all settled", Duration::from_secs(10), || {
        pending(&redis) == 0 && unread(&redis) == 0
    })
    .await;
    assert_eq!(stream_len(&redis, "orders.dead"), 0);
    // Completed now: the dedup API shows it.
    let rec = admin
        .send("GET", "/v1/dedup/billing/keys/one", &[], "")
        .await;
    assert_eq!(rec.json()["state"], "completed", "{rec:?}");
    post("{}").await.assert_problem(422, "invalid-field");
    post("{\"key\":\"one\",\"all\":true}")
        .await
        .assert_problem(422, "invalid-field");
    post("[1]").await.assert_problem(400, "invalid-json");
    admin
        .send(
            "POST",
            "/v1/consumers/nobody/redrive",
            &[],
            "{\"all\":true}",
        )
        .await
        .assert_problem(404, "not-found");
    r.stop().await;
}

/// `on_unknown_outcome = "reconcile"`: a delivery whose outcome is unknown
/// (here a 502) makes idemgate ask the worker's `reconcile_url`. It ran →
/// the record completes with the worker's answer, no second delivery; it
/// did not run → delivered again, with a higher fence; no usable answer →
/// held as a dead letter `outcome-unknown`, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_asks_the_worker_whether_an_unknown_outcome_ran() {
    let redis = RedisServer::start();
    let worker = TestWorker::start().await;
    let extra = format!(
        "on_unknown_outcome = \"reconcile\"\nreconcile_url = \"{}\"\n",
        worker.reconcile_url()
    );
    let r = start(&redis, &worker, &extra, "").await;
    publish(&redis, "orders", &[("id", "ran-1"), ("answers", "502")]);
    publish(&redis, "orders", &[("id", "not-1"), ("answers", "502,200")]);
    publish(&redis, "orders", &[("id", "err-1"), ("answers", "502")]);
    until("all three settled", Duration::from_secs(15), || {
        settled(&redis) && worker.asked().len() == 3
    })
    .await;
    let per_key = worker.per_key();
    assert_eq!(per_key["ran-1"], 1, "it ran: not delivered again");
    assert_eq!(per_key["not-1"], 2, "it did not run: delivered again");
    assert_eq!(per_key["err-1"], 1, "no answer: held");
    let seen = worker.seen();
    let fences: Vec<u64> = seen
        .iter()
        .filter(|s| s.key == "not-1")
        .map(|s| s.fence)
        .collect();
    assert!(fences[1] > fences[0], "{fences:?}");
    // The question carried the fence of the delivery that may have run.
    let asked = worker.asked();
    let ran_fence = seen.iter().find(|s| s.key == "ran-1").unwrap().fence;
    assert!(asked.contains(&("ran-1".into(), ran_fence)), "{asked:?}");
    let admin = TestClient::new(r.admin_addr);
    let rec = admin
        .send("GET", "/v1/dedup/billing/keys/ran-1", &[], "")
        .await;
    assert_eq!(rec.json()["state"], "completed", "{rec:?}");
    assert!(
        rec.json()["result"].to_string().contains("reconciled"),
        "{rec:?}"
    );
    let rec = admin
        .send("GET", "/v1/dedup/billing/keys/not-1", &[], "")
        .await;
    assert_eq!(rec.json()["state"], "completed", "{rec:?}");
    let dead = dead_letters(&redis);
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["key"], "err-1");
    assert!(
        dead[0]["reason"].starts_with("outcome-unknown")
            && dead[0]["reason"].contains("reconcile: it answered 500"),
        "{dead:?}"
    );
    assert_eq!(metric(r.admin_addr, "reconciled").await, 1.0);
    assert_eq!(metric(r.admin_addr, "unknown").await, 3.0);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_mode_hands_many_messages_per_request_and_each_key_once() {
    let redis = RedisServer::start();
    let worker = TestWorker::start().await;
    publish_thousand(&redis, &[("tenant", "acme")]);
    publish(
        &redis,
        "orders",
        &[("id", "raw"), ("body", "\x01bytes"), ("not_sent", "x")],
    );
    let r = start(&redis, &worker, "concurrency = 64\nbatch_size = 32\n", "").await;
    until(
        "every entry read and acknowledged",
        Duration::from_secs(30),
        || settled(&redis),
    )
    .await;
    let per_key = worker.per_key();
    assert_eq!(per_key.len(), 801);
    assert!(per_key.values().all(|n| *n == 1), "a key delivered twice");
    let seen = worker.seen();
    let largest = seen.iter().map(|s| s.batch).max().unwrap();
    assert!(
        (2..=32).contains(&largest),
        "batches of at most 32, some of more than one: largest {largest}"
    );
    // order-1 is published once (order-0 twice: either body may win).
    let one = seen.iter().find(|s| s.key == "order-1").unwrap();
    assert_eq!(
        one.headers["content-type"],
        "application/cloudevents-batch+json"
    );
    let e = one.event.as_ref().unwrap();
    assert_eq!(e["specversion"], "1.0");
    assert_eq!(e["datacontenttype"], "application/json");
    assert_eq!(e["data"], serde_json::json!({"n": 1}), "JSON data inline");
    assert!(e["source"].as_str().unwrap().contains("orders"));
    assert_eq!(e["idemgatefieldtenant"], "acme");
    assert_eq!(e["idemgateattempt"], 1);
    assert_eq!(e["idemgateredelivered"], false);
    assert!(one.fence > 0);
    // Bytes travel as base64; a field whose name is not letters and
    // digits cannot be a CloudEvents attribute and is not sent.
    let raw = seen.iter().find(|s| s.key == "raw").unwrap();
    assert_eq!(&raw.body[..], b"\x01bytes");
    let e = raw.event.as_ref().unwrap();
    assert_eq!(e["datacontenttype"], "application/octet-stream");
    assert!(e.get("idemgatefieldnot_sent").is_none(), "{e}");
    assert_eq!(metric(r.admin_addr, "delivered").await, 801.0);
    assert_eq!(metric(r.admin_addr, "duplicate").await, 200.0);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_mode_settles_each_message_by_its_own_result() {
    let redis = RedisServer::start();
    let worker = TestWorker::start().await;
    // Published before idemgate starts, and each batch answered after
    // 200 ms: while the batcher's two requests are out the rest queue up,
    // so five messages cannot all go in batches of one.
    for (order, answers) in [
        ("bad", "400"),
        ("busy", "503"),
        ("flaky", "500,200"),
        ("gateway", "502"),
        ("fine", "200"),
    ] {
        publish(
            &redis,
            "orders",
            &[("order", order), ("answers", answers), ("delayms", "200")],
        );
    }
    let r = start(
        &redis,
        &worker,
        "max_attempts = 3\nkey_from = \"field:order\"\nconcurrency = 8\nbatch_size = 8\n",
        "",
    )
    .await;
    until("every entry settled", Duration::from_secs(15), || {
        settled(&redis) && stream_len(&redis, "orders.dead") == 3
    })
    .await;
    let per_key = worker.per_key();
    assert_eq!(per_key["bad"], 1, "a 400 is not retried");
    assert_eq!(per_key["busy"], 3, "503 until max_attempts");
    assert_eq!(per_key["flaky"], 2, "a 500, then done");
    assert_eq!(per_key["gateway"], 1, "an unknown outcome is held");
    assert_eq!(per_key["fine"], 1);
    assert!(
        worker.seen().iter().any(|s| s.batch > 1),
        "messages published together share a request: {:?}",
        worker
            .seen()
            .iter()
            .map(|s| (s.key.clone(), s.batch))
            .collect::<Vec<_>>()
    );
    let dead = dead_letters(&redis);
    let reason = |key: &str| {
        dead.iter()
            .find(|m| m.get("key").map(String::as_str) == Some(key))
            .and_then(|m| m.get("reason").cloned())
            .unwrap_or_else(|| panic!("no dead letter for {key:?}: {dead:?}"))
    };
    assert!(reason("bad").contains("400"), "{}", reason("bad"));
    assert!(reason("busy").contains("max_attempts (3)"));
    assert!(reason("gateway").starts_with("outcome-unknown"));
    // Each key's record holds its own answer.
    let done = TestClient::new(r.admin_addr)
        .send("GET", "/v1/dedup/billing/keys/flaky", &[], "")
        .await;
    assert!(
        String::from_utf8_lossy(&done.body).contains("done"),
        "{}",
        String::from_utf8_lossy(&done.body)
    );

    // A 2xx that is not one result per message says nothing of what ran:
    // held as unknown. A 2xx with no body says every message is done.
    publish(&redis, "orders", &[("order", "garbled-1")]);
    until("the garbled batch settled", Duration::from_secs(15), || {
        pending(&redis) == 0 && stream_len(&redis, "orders.dead") == 4
    })
    .await;
    assert!(
        reason_of(&redis, "garbled-1").contains("not a list of results"),
        "{}",
        reason_of(&redis, "garbled-1")
    );
    publish(&redis, "orders", &[("order", "quiet-1")]);
    until("the quiet batch settled", Duration::from_secs(15), || {
        settled(&redis)
    })
    .await;
    assert_eq!(metric(r.admin_addr, "delivered").await, 3.0);
    assert_eq!(worker.per_key()["garbled-1"], 1);
    assert_eq!(worker.per_key()["quiet-1"], 1);
    r.stop().await;
}

/// The reason of `key`'s dead letter.
fn reason_of(redis: &RedisServer, key: &str) -> String {
    dead_letters(redis)
        .iter()
        .find(|m| m.get("key").map(String::as_str) == Some(key))
        .and_then(|m| m.get("reason").cloned())
        .unwrap_or_default()
}
