//! The delivery mode on NATS JetStream, against a real nats-server started
//! by the tests and a real HTTP worker: idemgate reads a stream through a
//! durable pull consumer and hands each message to the worker once;
//! duplicate publishes are acknowledged without a delivery; retries back
//! off; refusals, exhausted attempts, unknown outcomes and keyless messages
//! become dead letters on a subject another stream stores; redrive sends
//! them back; SIGKILL, SIGTERM and a server restart lose nothing.
//! "Every message acknowledged" is read off the durable consumer: nothing
//! pending and nothing waiting for an acknowledgement.

mod support;

use std::time::Duration;

use async_nats::jetstream::Context;
use idemgate::server::Running;
use support::deliveries::{metric, until, TestWorker};
use support::nats_server::{create_stream, header, publish, read_all, stored, unacked, NatsServer};
use support::redis_server::{store_toml, RedisServer};
use support::{config, TestClient};

fn consumer_toml(nats: &NatsServer, worker: &TestWorker, extra: &str) -> String {
    format!(
        "[[consumers]]\nname = \"billing\"\nbroker = \"{}\"\nsource = \"ORDERS\"\n\
         group = \"billing\"\ndeliver_to = \"{}\"\nretry_backoff = \"100ms\"\n\
         retry_backoff_max = \"1s\"\ndelivery_timeout = \"2s\"\ndead_letter = \"dead.orders\"\n{extra}",
        nats.url(),
        worker.url()
    )
}

/// The source stream (`orders.>`) and the dead letters' (`dead.>`).
async fn streams(js: &Context) {
    create_stream(js, "ORDERS", &["orders.>"]).await;
    create_stream(js, "DEAD", &["dead.>"]).await;
}

async fn start(nats: &NatsServer, worker: &TestWorker, extra: &str, store: &str) -> Running {
    let text = format!("{}{store}", consumer_toml(nats, worker, extra));
    Running::start(config(None, &text)).await.unwrap()
}

/// Waits until the consumer has nothing pending or unacknowledged.
async fn until_all_acked(js: &Context, within: Duration) {
    let started = std::time::Instant::now();
    loop {
        let n = unacked(js, "ORDERS", "billing").await;
        if n == 0 {
            return;
        }
        assert!(
            started.elapsed() < within,
            "{n} not acknowledged within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn until_stored(js: &Context, stream: &str, n: u64, within: Duration) {
    let started = std::time::Instant::now();
    loop {
        let got = stored(js, stream).await;
        if got == n {
            return;
        }
        assert!(
            started.elapsed() < within,
            "{stream}: {got} stored, not {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_messages_with_duplicate_publishes_each_key_delivered_once() {
    let nats = NatsServer::start();
    let js = nats.js().await;
    streams(&js).await;
    let worker = TestWorker::start().await;
    for i in 0..1000 {
        // 200 of them publish an earlier key again (published after the
        // stream's two-minute duplicate window would have dropped them, so
        // the window is sidestepped by an application id header instead).
        let key = if i % 5 == 4 {
            format!("order-{}", i - 4)
        } else {
            format!("order-{i}")
        };
        let body = format!("{{\"n\":{i}}}");
        publish(
            &js,
            "orders.new",
            "",
            &[("order", &key), ("content-type", "application/json")],
            body.as_bytes(),
        )
        .await;
    }
    let r = start(
        &nats,
        &worker,
        "concurrency = 32\nkey_from = \"header:order\"\n",
        "",
    )
    .await;
    until("every key delivered", Duration::from_secs(30), || {
        worker.per_key().len() == 800
    })
    .await;
    until_all_acked(&js, Duration::from_secs(30)).await;
    let per_key = worker.per_key();
    assert!(per_key.values().all(|n| *n == 1), "a key delivered twice");
    let one = &worker.seen()[0];
    assert_eq!(one.headers["content-type"], "application/json");
    assert!(one.headers["ce-time"].to_str().unwrap().ends_with('Z'));
    assert!(one.headers["ce-source"]
        .to_str()
        .unwrap()
        .contains("nats/ORDERS"));
    assert!(one.body.starts_with(b"{\"n\":"));
    assert_eq!(metric(r.admin_addr, "delivered").await, 800.0);
    assert_eq!(metric(r.admin_addr, "duplicate").await, 200.0);
    r.stop().await;
}

/// `Nats-Msg-Id` is the key by default; the stream's own duplicate window
/// drops a second publish with the same id before idemgate sees it, and
/// idemgate's record catches one published after the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_message_id_is_the_key_and_retries_back_off() {
    let nats = NatsServer::start();
    let js = nats.js().await;
    streams(&js).await;
    let worker = TestWorker::start().await;
    let r = start(&nats, &worker, "", "").await;
    publish(
        &js,
        "orders.new",
        "flaky",
        &[("answers", "500,500,500,200")],
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
    until_all_acked(&js, Duration::from_secs(5)).await;
    assert_eq!(metric(r.admin_addr, "retried").await, 3.0);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_exhausted_attempts_unknown_outcomes_and_keyless_messages_are_dead_letters() {
    let nats = NatsServer::start();
    let js = nats.js().await;
    streams(&js).await;
    let worker = TestWorker::start().await;
    let r = start(&nats, &worker, "max_attempts = 3\n", "").await;
    publish(&js, "orders.new", "bad", &[("answers", "400")], b"x").await;
    publish(&js, "orders.new", "busy", &[("answers", "503")], b"x").await;
    publish(&js, "orders.new", "gateway", &[("answers", "502")], b"x").await;
    publish(&js, "orders.new", "", &[], b"x").await;
    publish(&js, "orders.new", "after", &[], b"x").await;
    until_stored(&js, "DEAD", 4, Duration::from_secs(15)).await;
    until_all_acked(&js, Duration::from_secs(10)).await;
    let per_key = worker.per_key();
    assert_eq!(per_key["bad"], 1);
    assert_eq!(per_key["busy"], 3);
    assert_eq!(per_key["gateway"], 1);
    assert_eq!(per_key["after"], 1, "the stream kept flowing");
    let dead = read_all(&js, "DEAD").await;
    let reason = |key: &str| {
        dead.iter()
            .find(|(h, _)| header(h, "Idemgate-Key").as_deref() == Some(key))
            .and_then(|(h, _)| header(h, "Idemgate-Reason"))
            .unwrap_or_else(|| panic!("no dead letter for {key:?}"))
    };
    assert!(reason("bad").contains("400"));
    assert!(reason("busy").contains("max_attempts (3)"));
    assert!(reason("gateway").starts_with("outcome-unknown"));
    assert!(reason("").starts_with("no-key"));
    assert!(
        dead.iter().all(|(_, b)| b == b"x"),
        "the dead letter keeps the message"
    );
    r.stop().await;
}

/// A dead-letter subject no stream stores keeps the consumer down (and
/// `/readyz` says why) instead of losing dead letters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_subject_nobody_stores_keeps_the_consumer_down() {
    let nats = NatsServer::start();
    let js = nats.js().await;
    create_stream(&js, "ORDERS", &["orders.>"]).await;
    let worker = TestWorker::start().await;
    let r = start(&nats, &worker, "", "").await;
    publish(&js, "orders.new", "k1", &[], b"").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = TestClient::new(r.admin_addr)
        .send("GET", "/readyz", &[], "")
        .await;
    got.assert_problem(503, "not-ready");
    assert!(
        worker.seen().is_empty(),
        "nothing delivered without a dead-letter stream"
    );
    create_stream(&js, "DEAD", &["dead.>"]).await;
    until(
        "delivered once the stream exists",
        Duration::from_secs(15),
        || worker.per_key().get("k1") == Some(&1),
    )
    .await;
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_sends_dead_letters_back_to_be_delivered_once_more() {
    let nats = NatsServer::start();
    let js = nats.js().await;
    streams(&js).await;
    let worker = TestWorker::start().await;
    let r = start(&nats, &worker, "", "").await;
    for key in ["one", "two"] {
        publish(&js, "orders.new", key, &[("answers", "400,200")], b"b").await;
    }
    until_stored(&js, "DEAD", 2, Duration::from_secs(10)).await;
    let admin = TestClient::new(r.admin_addr);
    let got = admin
        .send(
            "POST",
            "/v1/consumers/billing/redrive",
            &[],
            "{\"key\":\"one\"}",
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
    assert_eq!(stored(&js, "DEAD").await, 1, "the other stays");
    let got = admin
        .send(
            "POST",
            "/v1/consumers/billing/redrive",
            &[],
            "{\"all\":true}",
        )
        .await;
    assert_eq!(got.json()["keys"], serde_json::json!(["two"]), "{got:?}");
    until("two delivered again", Duration::from_secs(10), || {
        worker.per_key().get("two") == Some(&2)
    })
    .await;
    until_all_acked(&js, Duration::from_secs(10)).await;
    assert_eq!(stored(&js, "DEAD").await, 0);
    r.stop().await;
}

/// idemgate killed (SIGKILL) with ten deliveries in flight, then started
/// again on the same store: the server gives the ten again (once their
/// acknowledgement wait runs out); under `hold` none runs twice, under
/// `release` each runs once more with a higher fence; in the end every
/// message is acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_mid_delivery_loses_no_message_and_holds_or_redelivers_as_configured() {
    for policy in ["hold", "release"] {
        let nats = NatsServer::start();
        let js = nats.js().await;
        streams(&js).await;
        let redis = RedisServer::start();
        let worker = TestWorker::start().await;
        let text = format!(
            "{}{}",
            consumer_toml(
                &nats,
                &worker,
                &format!("on_unknown_outcome = \"{policy}\"\nconcurrency = 20\n")
            )
            .replace(
                "retry_backoff_max = \"1s\"",
                "retry_backoff_max = \"200ms\""
            ),
            store_toml(&redis.url())
        );
        let file = std::env::temp_dir().join(format!(
            "idemgate-nats-kill-{}-{policy}.toml",
            std::process::id()
        ));
        std::fs::write(&file, text).unwrap();
        let args = ["--config", file.to_str().unwrap()];
        let p = support::proc::Proc::start("http://127.0.0.1:9", &args, &[]).await;
        for i in 0..10 {
            let key = format!("slow-{i}");
            publish(&js, "orders.new", &key, &[("delay_ms", "1500")], b"").await;
        }
        until("ten deliveries in flight", Duration::from_secs(10), || {
            worker.seen().len() == 10
        })
        .await;
        p.signal("-KILL");
        let _ = p.finish();
        assert_eq!(
            unacked(&js, "ORDERS", "billing").await,
            10,
            "nothing acknowledged early"
        );
        let again = support::proc::Proc::start("http://127.0.0.1:9", &args, &[]).await;
        // The server gives them again once their acknowledgement wait
        // (30 s) runs out.
        if policy == "hold" {
            until_stored(&js, "DEAD", 10, Duration::from_secs(60)).await;
            until_all_acked(&js, Duration::from_secs(20)).await;
            let per_key = worker.per_key();
            assert!(
                per_key.len() == 10 && per_key.values().all(|n| *n == 1),
                "{per_key:?}"
            );
        } else {
            until("each key delivered again", Duration::from_secs(60), || {
                let per_key = worker.per_key();
                per_key.len() == 10 && per_key.values().all(|n| *n == 2)
            })
            .await;
            until_all_acked(&js, Duration::from_secs(20)).await;
            assert_eq!(stored(&js, "DEAD").await, 0);
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
        again.signal("-TERM");
        let (code, log) = again.finish();
        assert_eq!(code, Some(0), "{log}");
        let _ = std::fs::remove_file(&file);
    }
}

/// SIGTERM: no more fetched, the deliveries in flight finish and are
/// acknowledged, the rest waits in the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_deliveries_in_flight_and_takes_no_more() {
    let nats = NatsServer::start();
    let js = nats.js().await;
    streams(&js).await;
    let worker = TestWorker::start().await;
    let file =
        std::env::temp_dir().join(format!("idemgate-nats-drain-{}.toml", std::process::id()));
    std::fs::write(&file, consumer_toml(&nats, &worker, "concurrency = 2\n")).unwrap();
    let args = ["--config", file.to_str().unwrap()];
    let p = support::proc::Proc::start("http://127.0.0.1:9", &args, &[]).await;
    for i in 0..6 {
        let key = format!("drain-{i}");
        publish(&js, "orders.new", &key, &[("delay_ms", "1000")], b"").await;
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
        unacked(&js, "ORDERS", "billing").await,
        4,
        "the two were acknowledged"
    );
    let _ = std::fs::remove_file(&file);
}

/// nats-server killed and restarted mid-stream (file storage): idemgate
/// reconnects by itself; every key is delivered once and every message
/// acknowledged in the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restarted_mid_stream_loses_nothing_and_runs_nothing_twice() {
    let nats = NatsServer::start();
    let worker = TestWorker::start().await;
    {
        let js = nats.js().await;
        streams(&js).await;
        for i in 0..200 {
            let key = format!("r{i}");
            publish(&js, "orders.new", &key, &[("delay_ms", "20")], b"").await;
        }
    }
    let r = start(&nats, &worker, "concurrency = 4\n", "").await;
    until("some delivered", Duration::from_secs(10), || {
        worker.seen().len() >= 40
    })
    .await;
    let nats = tokio::task::spawn_blocking(move || {
        let mut nats = nats;
        nats.restart();
        nats
    })
    .await
    .unwrap();
    until(
        "every key delivered after the restart",
        Duration::from_secs(60),
        || worker.per_key().len() == 200,
    )
    .await;
    let js = nats.js().await;
    until_all_acked(&js, Duration::from_secs(60)).await;
    let per_key = worker.per_key();
    assert!(per_key.values().all(|n| *n == 1), "{per_key:?}");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_store_deliver_each_key_once() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let js = nats.js().await;
    streams(&js).await;
    let worker = TestWorker::start().await;
    let store = store_toml(&redis.url());
    let a = start(
        &nats,
        &worker,
        "concurrency = 8\nkey_from = \"header:order\"\n",
        &store,
    )
    .await;
    let b = start(
        &nats,
        &worker,
        "concurrency = 8\nkey_from = \"header:order\"\n",
        &store,
    )
    .await;
    for i in 0..300 {
        let key = format!("k{}", i / 2);
        publish(&js, "orders.new", "", &[("order", &key)], b"").await;
    }
    until("every key delivered", Duration::from_secs(30), || {
        worker.per_key().len() == 150
    })
    .await;
    until_all_acked(&js, Duration::from_secs(30)).await;
    let per_key = worker.per_key();
    assert!(per_key.values().all(|n| *n == 1), "{per_key:?}");
    a.stop().await;
    b.stop().await;
}

/// A request naming `Idemgate-Reply-To` gets the worker's answer there;
/// the same request sent again (a retried request, keyed by a header) runs
/// once and gets the same answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_request_runs_once_and_gets_the_same_reply_twice() {
    use futures_util::StreamExt;
    let nats = NatsServer::start();
    let js = nats.js().await;
    streams(&js).await;
    let mut replies = js.client().subscribe("replies.r1").await.unwrap();
    js.client().flush().await.unwrap();
    let worker = TestWorker::start().await;
    let r = start(&nats, &worker, "key_from = \"header:order\"\n", "").await;
    for _ in 0..2 {
        publish(
            &js,
            "orders.new",
            "",
            &[("order", "rpc-1"), ("Idemgate-Reply-To", "replies.r1")],
            b"charge",
        )
        .await;
    }
    let mut got = Vec::new();
    for _ in 0..2 {
        let m = tokio::time::timeout(Duration::from_secs(10), replies.next())
            .await
            .expect("a reply")
            .unwrap();
        got.push(m.payload);
    }
    assert_eq!(worker.per_key()["rpc-1"], 1, "one delivery");
    assert_eq!(got[0].as_ref(), b"{\"done\":\"rpc-1\"}");
    assert_eq!(got[0], got[1], "the same answer twice");
    r.stop().await;
}
