//! The delivery mode on RabbitMQ, against a real rabbitmq-server started
//! by the tests and a real HTTP worker: idemgate consumes a queue with
//! manual acknowledgements and hands each message to the worker once;
//! duplicate publishes are acknowledged without a delivery; retries back
//! off; refusals, exhausted attempts, unknown outcomes and messages
//! without a key become dead letters (to a named exchange, or the queue's
//! own); a request with `reply_to` gets its answer, a retried one the same
//! answer again; SIGKILL, SIGTERM and a broker restart lose nothing.
//! "Every message acknowledged" is read off the queue once idemgate has
//! let go of it: RabbitMQ returns what a closed connection did not
//! acknowledge, so an empty queue then means every message was.

mod support;

use std::time::{Duration, SystemTime};

use amqprs::channel::Channel;
use idemgate::server::Running;
use support::deliveries::{metric, until, until_counted, TestWorker};
use support::rabbitmq::{
    declare_exchange_to, declare_queue, drain, header, props, publish, ready, RabbitServer,
};
use support::redis_server::{store_toml, RedisServer};
use support::{config, TestClient};

fn consumer_toml(rabbit: &RabbitServer, worker: &TestWorker, extra: &str) -> String {
    format!(
        "[[consumers]]\nname = \"billing\"\nbroker = \"{}\"\nsource = \"orders\"\n\
         deliver_to = \"{}\"\nretry_backoff = \"100ms\"\n\
         retry_backoff_max = \"1s\"\ndelivery_timeout = \"2s\"\n{extra}",
        rabbit.url(),
        worker.url()
    )
}

async fn start(rabbit: &RabbitServer, worker: &TestWorker, extra: &str, store: &str) -> Running {
    let text = format!("{}{store}", consumer_toml(rabbit, worker, extra));
    Running::start(config(None, &text)).await.unwrap()
}

/// Waits until `queue` holds `n` ready messages.
async fn until_ready(ch: &Channel, queue: &str, n: u32, within: Duration) {
    let started = std::time::Instant::now();
    loop {
        let got = ready(ch, queue).await;
        if got == n {
            return;
        }
        assert!(
            started.elapsed() < within,
            "{queue}: {got} ready, not {n}, within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_messages_with_duplicate_publishes_each_key_delivered_once() {
    let rabbit = RabbitServer::start();
    let (_c, ch) = rabbit.channel().await;
    declare_queue(&ch, "orders", None).await;
    let worker = TestWorker::start().await;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for i in 0..1000 {
        // 200 of them publish an earlier key again.
        let key = if i % 5 == 4 {
            format!("order-{}", i - 4)
        } else {
            format!("order-{i}")
        };
        let mut p = props(&key, &[("tenant", "acme")]);
        p.with_content_type("application/json")
            .with_message_type("order.created")
            .with_timestamp(now);
        publish(&ch, "orders", p, format!("{{\"n\":{i}}}").as_bytes()).await;
    }
    let r = start(&rabbit, &worker, "concurrency = 32\n", "").await;
    until(
        "every message delivered or found a duplicate",
        Duration::from_secs(30),
        || worker.per_key().len() == 800,
    )
    .await;
    until_counted(
        &[r.admin_addr],
        &["delivered", "duplicate"],
        1000.0,
        Duration::from_secs(20),
    )
    .await;
    let per_key = worker.per_key();
    assert!(per_key.values().all(|n| *n == 1), "a key delivered twice");
    let one = &worker.seen()[0];
    assert_eq!(one.headers["content-type"], "application/json");
    assert_eq!(one.headers["ce-specversion"], "1.0");
    assert_eq!(one.headers["ce-type"], "order.created");
    assert!(one.headers["ce-time"].to_str().unwrap().ends_with('Z'));
    assert_eq!(one.headers["idemgate-field-tenant"], "acme");
    let source = one.headers["ce-source"].to_str().unwrap();
    assert!(
        source.contains("amqp/orders") && !source.contains("guest"),
        "{source}"
    );
    assert!(one.body.starts_with(b"{\"n\":"));
    assert_eq!(metric(r.admin_addr, "delivered").await, 800.0);
    assert_eq!(metric(r.admin_addr, "duplicate").await, 200.0);
    r.stop().await;
    assert_eq!(ready(&ch, "orders").await, 0, "every message acknowledged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundreds_are_retried_with_backoff_until_the_worker_succeeds() {
    let rabbit = RabbitServer::start();
    let (_c, ch) = rabbit.channel().await;
    declare_queue(&ch, "orders", None).await;
    let worker = TestWorker::start().await;
    let r = start(&rabbit, &worker, "", "").await;
    publish(
        &ch,
        "orders",
        props("flaky", &[("answers", "500,500,500,200")]),
        b"",
    )
    .await;
    until("the fourth delivery", Duration::from_secs(10), || {
        worker.per_key().get("flaky") == Some(&4)
    })
    .await;
    let seen = worker.seen();
    let attempts: Vec<u32> = seen.iter().map(|s| s.attempt).collect();
    assert_eq!(attempts, [1, 2, 3, 4]);
    for (i, min) in [100u64, 200, 400].iter().enumerate() {
        let gap = seen[i + 1].at - seen[i].at;
        assert!(gap >= Duration::from_millis(*min), "gap {i}: {gap:?}");
    }
    // One effect: publishing the key again is acknowledged undelivered.
    publish(&ch, "orders", props("flaky", &[]), b"").await;
    until_counted(&[r.admin_addr], &["duplicate"], 1.0, Duration::from_secs(5)).await;
    assert_eq!(worker.per_key()["flaky"], 4);
    assert_eq!(metric(r.admin_addr, "retried").await, 3.0);
    r.stop().await;
    assert_eq!(ready(&ch, "orders").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_exhausted_attempts_unknown_outcomes_and_keyless_messages_go_to_the_dead_letter_exchange(
) {
    let rabbit = RabbitServer::start();
    let (_c, ch) = rabbit.channel().await;
    declare_queue(&ch, "orders", None).await;
    declare_exchange_to(&ch, "orders.dead", "orders.dead.q").await;
    let worker = TestWorker::start().await;
    let r = start(
        &rabbit,
        &worker,
        "max_attempts = 3\nkey_from = \"field:order\"\ndead_letter = \"orders.dead\"\n",
        "",
    )
    .await;
    let send = |order: &'static str, answers: &'static str| {
        let ch = ch.clone();
        async move {
            let mut h = vec![("answers", answers)];
            if !order.is_empty() {
                h.push(("order", order));
            }
            publish(&ch, "orders", props("", &h), b"x").await;
        }
    };
    send("bad", "400").await;
    send("busy", "503").await;
    send("gateway", "502").await;
    send("", "200").await;
    send("after", "200").await;
    until_ready(&ch, "orders.dead.q", 4, Duration::from_secs(15)).await;
    until("the queue kept flowing", Duration::from_secs(5), || {
        worker.per_key().get("after") == Some(&1)
    })
    .await;
    let per_key = worker.per_key();
    assert_eq!(per_key["bad"], 1, "a 400 is not retried");
    assert_eq!(per_key["busy"], 3, "503 until max_attempts");
    assert_eq!(
        per_key["gateway"], 1,
        "an unknown outcome is held, not run again"
    );
    let dead = drain(&ch, "orders.dead.q").await;
    let reason = |key: &str| {
        dead.iter()
            .find(|(p, _)| header(p, "x-idemgate-key").as_deref() == Some(key))
            .and_then(|(p, _)| header(p, "x-idemgate-reason"))
            .unwrap_or_else(|| panic!("no dead letter for {key:?}"))
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
    assert!(
        dead.iter().all(|(_, body)| body == b"x"),
        "the dead letter keeps the message"
    );
    let (p, _) = dead
        .iter()
        .find(|(p, _)| header(p, "x-idemgate-key").as_deref() == Some("busy"))
        .unwrap();
    assert_eq!(header(p, "x-idemgate-attempts").as_deref(), Some("3"));
    assert_eq!(
        header(p, "order").as_deref(),
        Some("busy"),
        "its own headers kept"
    );
    let failed = TestClient::new(r.admin_addr)
        .send("GET", "/v1/dedup/billing/failed", &[], "")
        .await;
    let listed = failed.json().to_string();
    for key in ["bad", "busy", "gateway"] {
        assert!(listed.contains(key), "{key} not listed: {listed}");
    }
    r.stop().await;
    assert_eq!(ready(&ch, "orders").await, 0, "every message acknowledged");
}

/// With no `dead_letter` named, a dead letter is rejected into the queue's
/// own dead-letter exchange (RabbitMQ's `x-dead-letter-exchange`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_dead_letter_exchange_named_the_queues_own_takes_the_message() {
    let rabbit = RabbitServer::start();
    let (_c, ch) = rabbit.channel().await;
    declare_exchange_to(&ch, "orders.dlx", "orders.dlq").await;
    declare_queue(&ch, "orders", Some("orders.dlx")).await;
    let worker = TestWorker::start().await;
    let r = start(&rabbit, &worker, "", "").await;
    publish(
        &ch,
        "orders",
        props("refused", &[("answers", "422")]),
        b"payload",
    )
    .await;
    until_ready(&ch, "orders.dlq", 1, Duration::from_secs(10)).await;
    let dead = drain(&ch, "orders.dlq").await;
    assert_eq!(dead[0].1, b"payload");
    assert!(dead[0]
        .0
        .headers()
        .unwrap()
        .get(&"x-death".try_into().unwrap())
        .is_some());
    assert_eq!(worker.per_key()["refused"], 1);
    r.stop().await;
    assert_eq!(ready(&ch, "orders").await, 0);
}

/// A request carrying `reply_to` gets the worker's answer there with its
/// correlation id; the same request sent again (a retried RPC) runs once
/// and gets the same answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_request_runs_once_and_gets_the_same_reply_twice() {
    let rabbit = RabbitServer::start();
    let (_c, ch) = rabbit.channel().await;
    declare_queue(&ch, "orders", None).await;
    declare_queue(&ch, "replies", None).await;
    let worker = TestWorker::start().await;
    let r = start(&rabbit, &worker, "", "").await;
    for _ in 0..2 {
        let mut p = props("rpc-1", &[]);
        p.with_reply_to("replies").with_correlation_id("corr-7");
        publish(&ch, "orders", p, b"charge").await;
    }
    until_ready(&ch, "replies", 2, Duration::from_secs(10)).await;
    let replies = drain(&ch, "replies").await;
    assert_eq!(worker.per_key()["rpc-1"], 1, "one delivery");
    assert_eq!(replies[0].1, b"{\"done\":\"rpc-1\"}");
    assert_eq!(replies[0].1, replies[1].1, "the same answer twice");
    for (p, _) in &replies {
        assert_eq!(p.correlation_id().map(String::as_str), Some("corr-7"));
    }
    r.stop().await;
}

/// Batch mode: requests published together reach the worker in shared
/// batches, and each reply is its own message's answer, with its own
/// correlation id; a retried request still runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_batch_mode_each_request_gets_its_own_reply() {
    let rabbit = RabbitServer::start();
    let (_c, ch) = rabbit.channel().await;
    declare_queue(&ch, "orders", None).await;
    declare_queue(&ch, "replies", None).await;
    let worker = TestWorker::start().await;
    for key in ["rpc-a", "rpc-b", "rpc-c", "rpc-a"] {
        let mut p = props(key, &[]);
        p.with_reply_to("replies")
            .with_correlation_id(&format!("corr-{key}"));
        publish(&ch, "orders", p, b"charge").await;
    }
    let r = start(&rabbit, &worker, "concurrency = 4\nbatch_size = 4\n", "").await;
    until_ready(&ch, "replies", 4, Duration::from_secs(10)).await;
    let per_key = worker.per_key();
    assert_eq!(per_key.len(), 3);
    assert!(per_key.values().all(|n| *n == 1), "{per_key:?}");
    assert!(
        worker.seen().iter().all(|s| s.event.is_some()),
        "every delivery in a CloudEvents batch"
    );
    let replies = drain(&ch, "replies").await;
    for (p, body) in &replies {
        let corr = p.correlation_id().unwrap();
        let key = corr.strip_prefix("corr-").unwrap();
        assert_eq!(
            String::from_utf8_lossy(body),
            format!("{{\"done\":\"{key}\"}}"),
            "the reply to {corr}"
        );
    }
    r.stop().await;
}

/// idemgate killed (SIGKILL) with ten deliveries in flight, then started
/// again on the same store: RabbitMQ gives the ten again; under `hold`
/// none runs twice (each a dead letter `outcome-unknown`), under `release`
/// each runs once more with a higher fence; in the end every message is
/// acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_mid_delivery_loses_no_message_and_holds_or_redelivers_as_configured() {
    let rabbit = RabbitServer::start();
    let (_c, ch) = rabbit.channel().await;
    for policy in ["hold", "release"] {
        let redis = RedisServer::start();
        let worker = TestWorker::start().await;
        let (queue, dead_q) = (format!("orders-{policy}"), format!("dead-{policy}"));
        declare_queue(&ch, &queue, None).await;
        declare_exchange_to(&ch, &format!("x-{policy}"), &dead_q).await;
        let text = format!(
            "{}{}",
            consumer_toml(
                &rabbit,
                &worker,
                &format!(
                    "on_unknown_outcome = \"{policy}\"\nconcurrency = 20\ndead_letter = \"x-{policy}\"\n"
                )
            )
            .replace("source = \"orders\"", &format!("source = \"{queue}\""))
            .replace("delivery_timeout = \"2s\"", "delivery_timeout = \"3s\"")
            .replace("retry_backoff_max = \"1s\"", "retry_backoff_max = \"200ms\""),
            store_toml(&redis.url())
        );
        let file = std::env::temp_dir().join(format!(
            "idemgate-amqp-kill-{}-{policy}.toml",
            std::process::id()
        ));
        std::fs::write(&file, text).unwrap();
        let args = ["--config", file.to_str().unwrap()];
        let p = support::proc::Proc::start("http://127.0.0.1:9", &args, &[]).await;
        for i in 0..10 {
            let key = format!("slow-{i}");
            publish(&ch, &queue, props(&key, &[("delay_ms", "1500")]), b"").await;
        }
        until("ten deliveries in flight", Duration::from_secs(10), || {
            worker.seen().len() == 10
        })
        .await;
        p.signal("-KILL");
        let _ = p.finish();
        // Nothing was acknowledged before it settled: all ten come back.
        until_ready(&ch, &queue, 10, Duration::from_secs(10)).await;
        let again = support::proc::Proc::start("http://127.0.0.1:9", &args, &[]).await;
        let want = if policy == "hold" { 1 } else { 2 };
        until(
            "each key settled after the restart",
            Duration::from_secs(40),
            || {
                let per_key = worker.per_key();
                per_key.len() == 10 && per_key.values().all(|n| *n == want)
            },
        )
        .await;
        match policy {
            "hold" => {
                until_ready(&ch, &dead_q, 10, Duration::from_secs(40)).await;
                let dead = drain(&ch, &dead_q).await;
                assert!(dead.iter().all(|(p, _)| header(p, "x-idemgate-reason")
                    .unwrap()
                    .starts_with("outcome-unknown")));
            }
            _ => {
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
            }
        }
        // Let the last acknowledgements go out, then stop.
        tokio::time::sleep(Duration::from_millis(300)).await;
        again.signal("-TERM");
        let (code, log) = again.finish();
        assert_eq!(code, Some(0), "{log}");
        assert_eq!(
            ready(&ch, &queue).await,
            0,
            "{policy}: every message acknowledged"
        );
        assert_eq!(
            ready(&ch, &dead_q).await,
            0,
            "{policy}: no dead letter beyond the held"
        );
        let _ = std::fs::remove_file(&file);
    }
}

/// SIGTERM: no more messages are taken, the deliveries in flight finish
/// and are acknowledged, the rest stays in the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_deliveries_in_flight_and_takes_no_more() {
    let rabbit = RabbitServer::start();
    let (_c, ch) = rabbit.channel().await;
    declare_queue(&ch, "orders", None).await;
    let worker = TestWorker::start().await;
    let file =
        std::env::temp_dir().join(format!("idemgate-amqp-drain-{}.toml", std::process::id()));
    std::fs::write(&file, consumer_toml(&rabbit, &worker, "concurrency = 2\n")).unwrap();
    let args = ["--config", file.to_str().unwrap()];
    let p = support::proc::Proc::start("http://127.0.0.1:9", &args, &[]).await;
    for i in 0..6 {
        let key = format!("drain-{i}");
        publish(&ch, "orders", props(&key, &[("delay_ms", "1000")]), b"").await;
    }
    until("two deliveries in flight", Duration::from_secs(10), || {
        worker.seen().len() == 2
    })
    .await;
    p.signal("-TERM");
    let (code, log) = p.finish();
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(worker.seen().len(), 2, "nothing started after SIGTERM");
    // The two in flight were settled and acknowledged; the rest waits.
    assert_eq!(ready(&ch, "orders").await, 4);
    let _ = std::fs::remove_file(&file);
}

/// RabbitMQ killed and restarted mid-stream (durable queue, persistent
/// messages): idemgate reconnects by itself; every key is delivered once
/// and every message acknowledged in the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restarted_mid_stream_loses_nothing_and_runs_nothing_twice() {
    let rabbit = RabbitServer::start();
    let worker = TestWorker::start().await;
    {
        let (c, ch) = rabbit.channel().await;
        declare_queue(&ch, "orders", None).await;
        // In a transaction: the commit is answered once RabbitMQ has taken
        // every message (closing the connection right after publishing
        // left some untaken once).
        ch.tx_select().await.unwrap();
        for i in 0..200 {
            let key = format!("r{i}");
            publish(&ch, "orders", props(&key, &[("delay_ms", "20")]), b"").await;
        }
        ch.tx_commit().await.unwrap();
        c.close().await.unwrap();
    }
    // A node SIGKILLed within seconds of its first start can come back
    // without a durable queue declared then, messages and all (RabbitMQ
    // 3.10.8's log after the kill: "Recovering 0 queues"; about one run in
    // ten here). A clean restart first puts the queue and its messages on
    // disk, so what the kill below tests is idemgate's side.
    let rabbit = tokio::task::spawn_blocking(move || {
        let mut rabbit = rabbit;
        rabbit.restart_cleanly();
        rabbit
    })
    .await
    .unwrap();
    {
        let (_c, ch) = rabbit.channel().await;
        assert_eq!(ready(&ch, "orders").await, 200, "kept by the clean restart");
    }
    let r = start(&rabbit, &worker, "concurrency = 4\n", "").await;
    until("some delivered", Duration::from_secs(10), || {
        worker.seen().len() >= 40
    })
    .await;
    let rabbit = tokio::task::spawn_blocking(move || {
        let mut rabbit = rabbit;
        rabbit.restart();
        rabbit
    })
    .await
    .unwrap();
    let started = std::time::Instant::now();
    while worker.per_key().len() < 200 {
        if started.elapsed() > Duration::from_secs(60) {
            // Say which keys are missing and where their messages are.
            let per_key = worker.per_key();
            let missing: Vec<String> = (0..200)
                .map(|i| format!("r{i}"))
                .filter(|k| !per_key.contains_key(k))
                .collect();
            let (_c, ch) = rabbit.channel().await;
            let queue = ch
                .queue_declare(
                    amqprs::channel::QueueDeclareArguments::new("orders")
                        .passive(true)
                        .finish(),
                )
                .await;
            panic!(
                "every key delivered after the restart: not within 60s; missing {missing:?}; \
                 the queue after the restart: {queue:?}; outcomes: {:?}\n{}",
                [
                    metric(r.admin_addr, "delivered").await,
                    metric(r.admin_addr, "duplicate").await,
                    metric(r.admin_addr, "in_progress").await,
                    metric(r.admin_addr, "dead_lettered").await,
                    metric(r.admin_addr, "store_error").await,
                ],
                rabbit.log_tail(60)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let per_key = worker.per_key();
    assert!(per_key.values().all(|n| *n == 1), "{per_key:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    r.stop().await;
    let (_c, ch) = rabbit.channel().await;
    assert_eq!(ready(&ch, "orders").await, 0, "every message acknowledged");
}

/// Two idemgate replicas on one Redis store consuming the same queue:
/// each key delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_store_deliver_each_key_once() {
    let rabbit = RabbitServer::start();
    let redis = RedisServer::start();
    let (_c, ch) = rabbit.channel().await;
    declare_queue(&ch, "orders", None).await;
    let worker = TestWorker::start().await;
    let store = store_toml(&redis.url());
    let a = start(&rabbit, &worker, "concurrency = 8\n", &store).await;
    let b = start(&rabbit, &worker, "concurrency = 8\n", &store).await;
    for i in 0..300 {
        let key = format!("k{}", i / 2);
        publish(&ch, "orders", props(&key, &[]), b"").await;
    }
    until("every key delivered", Duration::from_secs(30), || {
        worker.per_key().len() == 150
    })
    .await;
    until_counted(
        &[a.admin_addr, b.admin_addr],
        &["delivered", "duplicate"],
        300.0,
        Duration::from_secs(30),
    )
    .await;
    let per_key = worker.per_key();
    assert!(per_key.values().all(|n| *n == 1), "{per_key:?}");
    a.stop().await;
    b.stop().await;
    assert_eq!(ready(&ch, "orders").await, 0);
}

/// `POST /v1/consumers/{name}/redrive` with the queue holding the dead
/// letters: each is published to the source again with its key and its
/// record reset, delivered once more and completed; another key's dead
/// letter stays where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_sends_dead_letters_back_from_their_queue() {
    let rabbit = RabbitServer::start();
    let (_c, ch) = rabbit.channel().await;
    declare_queue(&ch, "orders", None).await;
    declare_exchange_to(&ch, "orders.dead", "orders.dead.q").await;
    let worker = TestWorker::start().await;
    let r = start(&rabbit, &worker, "dead_letter = \"orders.dead\"\n", "").await;
    for key in ["one", "two"] {
        publish(&ch, "orders", props(key, &[("answers", "400,200")]), b"b").await;
    }
    until_ready(&ch, "orders.dead.q", 2, Duration::from_secs(10)).await;
    let admin = TestClient::new(r.admin_addr);
    let got = admin
        .send(
            "POST",
            "/v1/consumers/billing/redrive",
            &[],
            "{\"key\":\"one\",\"queue\":\"orders.dead.q\"}",
        )
        .await;
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(got.json()["keys"], serde_json::json!(["one"]));
    until("one delivered again", Duration::from_secs(10), || {
        worker.per_key().get("one") == Some(&2)
    })
    .await;
    let again: Vec<_> = worker
        .seen()
        .into_iter()
        .filter(|s| s.key == "one")
        .collect();
    assert_eq!(again[1].body, "b");
    assert!(again[1].fence > again[0].fence);
    assert!(
        again[1]
            .headers
            .get("idemgate-field-x-idemgate-reason")
            .is_none(),
        "the dead letter's own headers are not sent back"
    );
    // The other dead letter stayed.
    until_ready(&ch, "orders.dead.q", 1, Duration::from_secs(5)).await;
    admin
        .send(
            "POST",
            "/v1/consumers/billing/redrive",
            &[],
            "{\"all\":true}",
        )
        .await
        .assert_problem(422, "invalid-field");
    r.stop().await;
}
