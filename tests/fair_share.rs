//! Fair share per caller: `new_keys_per_scope` limits how fast one caller
//! (its scope headers) creates new keys, on memory and on Redis. Over its
//! rate a caller gets 429 `too-many-keys` with `Retry-After`, nothing is
//! stored and the upstream is not called; another caller at the same moment
//! is unaffected, and replays of existing keys are never limited.

mod support;

use idemgate::server::Running;
use support::redis_server::{store_toml, RedisServer};
use support::{config, TestClient, TestUpstream};

const LIMIT: &str = "[idempotency]\nnew_keys_per_scope = \"1/m\"\nnew_keys_burst = 3\n";

async fn charge(c: &TestClient, caller: &str, key: &str) -> support::Got {
    c.send(
        "POST",
        "/v1/charges",
        &[("idempotency-key", key), ("authorization", caller)],
        "{}",
    )
    .await
}

async fn one_caller_cannot_starve_another(store: &str) {
    let up = TestUpstream::start().await;
    let r = Running::start(config(Some(&up.url()), &format!("{store}{LIMIT}")))
        .await
        .unwrap();
    let c = TestClient::new(r.proxy_addr.unwrap());
    for i in 0..3 {
        assert_eq!(charge(&c, "tenant-a", &format!("a-{i}")).await.status, 201);
    }
    let over = charge(&c, "tenant-a", "a-3").await;
    over.assert_problem(429, "too-many-keys");
    let retry_after: u64 = over.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=61).contains(&retry_after), "{retry_after}");
    // Another caller, at the same moment.
    assert_eq!(charge(&c, "tenant-b", "b-0").await.status, 201);
    // Replays are never limited.
    for i in 0..3 {
        let replay = charge(&c, "tenant-a", &format!("a-{i}")).await;
        assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    }
    assert_eq!(up.calls(), 4, "the refused key never reached the upstream");
    // Nothing stored for it.
    let admin = TestClient::new(r.admin_addr);
    let got = admin
        .send(
            "GET",
            "/v1/keys?key=a-3&path=/v1/charges&scope=tenant-a",
            &[],
            "",
        )
        .await;
    assert_eq!(got.status, 404);
    assert_eq!(
        r.metrics
            .requests
            .with_label_values(&["too_many_keys"])
            .get(),
        1
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_memory() {
    one_caller_cannot_starve_another("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis() {
    let redis = RedisServer::start();
    one_caller_cannot_starve_another(&store_toml(&redis.url())).await;
}
