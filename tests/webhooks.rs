//! Webhook intake end to end, on real sockets: each provider preset runs a
//! delivery once, replays its redelivery (new timestamp and signature, same
//! id), refuses forged, stale and unsigned deliveries with 401 before any
//! state (the real delivery still runs afterwards), and does not store a
//! failure. Keys from a JSON pointer and from the body's SHA-256, with
//! malformed, deep and large bodies, on memory and Redis.

mod support;

use std::path::PathBuf;

use idemgate::server::Running;
use support::redis_server::{shared_server, store_toml};
use support::webhooks::{body, now, sign};
use support::{unique, Got, TestClient, TestUpstream};

const PRESETS: [(&str, &str); 5] = [
    ("github", "gh-secret-It's a Secret"),
    ("stripe", "whsec_stripe_5a1c9e"),
    (
        "standard-webhooks",
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    ),
    ("shopify", "shpss_0b1c2d3e"),
    ("slack", "8f742231b10e8888abcd99yyyzzz85a5"),
];
const FORGER: &str = "whsec_Zm9yZ2VkLWJ5LXNvbWVvbmUtZWxzZQ==";

/// Each preset's secret in a file, and one route per preset.
fn preset_routes() -> (PathBuf, String) {
    let dir = std::env::temp_dir().join(unique("idemgate-hooks"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut toml = String::new();
    for (preset, secret) in PRESETS {
        let file = dir.join(preset);
        std::fs::write(&file, format!("{secret}\n")).unwrap();
        toml.push_str(&format!(
            "[[routes]]\npath = \"/hooks/{preset}\"\npreset = \"{preset}\"\nsecrets = [{{ file = \"{}\" }}]\n",
            file.display()
        ));
    }
    (dir, toml)
}

use support::start as idemgate;

/// Delivers event `id` (body variant `n`) to `preset`'s route, signed with
/// `secret` at `at`, plus `extra` headers.
async fn deliver(
    c: &TestClient,
    preset: &str,
    secret: &str,
    id: &str,
    n: u32,
    at: i64,
    extra: &[(&str, &str)],
) -> Got {
    let b = body(preset, id, n);
    let signed = sign(preset, secret, id, &b, at);
    let mut headers: Vec<(&str, &str)> = signed
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    headers.push(("content-type", "application/json"));
    headers.extend_from_slice(extra);
    c.send("POST", &format!("/hooks/{preset}"), &headers, &b)
        .await
}

fn signatures(r: &Running, preset: &str, result: &str) -> u64 {
    r.metrics
        .webhook_signatures
        .with_label_values(&[preset, result])
        .get()
}

/// The whole life of deliveries to every preset on one store.
async fn every_preset(store: &str) {
    let up = TestUpstream::start().await;
    let (dir, routes) = preset_routes();
    let (r, c) = idemgate(&up, &format!("{store}\n{routes}")).await;
    for (preset, secret) in PRESETS {
        let calls = up.calls();
        let t = now();
        let real = unique("evt");

        // A valid delivery runs once.
        let first = deliver(&c, preset, secret, &real, 1, t, &[]).await;
        assert_eq!(first.status, 201, "{preset}: {:?}", first.body);
        assert_eq!(first.header("idempotent-replayed"), None, "{preset}");
        assert_eq!(up.calls(), calls + 1, "{preset}");

        // Its redelivery: new timestamp and signature, an incidental field
        // changed, the same id: replayed, not run.
        let again = deliver(&c, preset, secret, &real, 2, t + 2, &[]).await;
        assert_eq!(again.status, 201, "{preset}: {:?}", again.body);
        assert_eq!(
            again.header("idempotent-replayed"),
            Some("true"),
            "{preset}"
        );
        assert_eq!(again.body, first.body, "{preset}");
        assert_eq!(up.calls(), calls + 1, "{preset}");

        // A forgery with a real, not yet seen id is refused before any
        // state: the real delivery of that id still runs afterwards.
        let next = unique("evt");
        let forged = deliver(&c, preset, FORGER, &next, 1, t, &[]).await;
        forged.assert_problem(401, "invalid-signature");
        assert_eq!(up.calls(), calls + 1, "{preset}: a forgery was forwarded");
        let genuine = deliver(&c, preset, secret, &next, 1, t, &[]).await;
        assert_eq!(genuine.status, 201, "{preset}");
        assert_eq!(
            genuine.header("idempotent-replayed"),
            None,
            "{preset}: got the forger's answer"
        );
        assert_eq!(up.calls(), calls + 2, "{preset}");

        // Stale timestamps are refused where the provider signs one; the
        // same delivery signed now runs.
        let late = unique("evt");
        let stale = deliver(&c, preset, secret, &late, 1, t - 3600, &[]).await;
        if matches!(preset, "stripe" | "standard-webhooks" | "slack") {
            stale.assert_problem(401, "invalid-signature");
            assert_eq!(signatures(&r, preset, "stale"), 1, "{preset}");
            let fresh = deliver(&c, preset, secret, &late, 1, t, &[]).await;
            assert_eq!(fresh.status, 201);
            assert_eq!(fresh.header("idempotent-replayed"), None);
        } else {
            // GitHub and Shopify sign no timestamp: nothing can be stale.
            assert_eq!(stale.status, 201, "{preset}");
        }
        assert_eq!(up.calls(), calls + 3, "{preset}");

        // No signature at all.
        let b = body(preset, &unique("evt"), 1);
        let unsigned = c
            .send(
                "POST",
                &format!("/hooks/{preset}"),
                &[
                    ("x-github-delivery", "x"),
                    ("webhook-id", "x"),
                    ("x-shopify-event-id", "x"),
                ],
                &b,
            )
            .await;
        unsigned.assert_problem(401, "invalid-signature");
        assert_eq!(up.calls(), calls + 3, "{preset}");
        assert_eq!(signatures(&r, preset, "mismatch"), 1, "{preset}");
        assert_eq!(signatures(&r, preset, "missing"), 1, "{preset}");
        assert!(signatures(&r, preset, "ok") >= 4, "{preset}");
    }
    let refused = r
        .metrics
        .requests
        .with_label_values(&["invalid_signature"])
        .get();
    assert_eq!(refused, 5 + 5 + 3);
    // The upstream saw only the real deliveries, each with its own body.
    assert!(up.seen().iter().all(|s| s.path.starts_with("/hooks/")));
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test]
async fn every_preset_on_memory() {
    every_preset("").await;
}

#[tokio::test]
async fn every_preset_on_redis() {
    let redis = shared_server();
    every_preset(&store_toml(&redis.url())).await;
}

/// Shopify's newer header form (no `X-`, as `@shopify/shopify-api` also
/// accepts): verified the same way, keyed by `shopify-event-id`; an event
/// delivered in one spelling and redelivered in the other is one event.
#[tokio::test]
async fn shopify_deliveries_in_either_header_form() {
    let up = TestUpstream::start().await;
    let (dir, routes) = preset_routes();
    let (_r, c) = idemgate(&up, &routes).await;
    let (_, secret) = PRESETS[3];
    let id = unique("shopify-evt");
    let newer = |signed: Vec<(String, String)>| -> Vec<(String, String)> {
        signed
            .into_iter()
            .map(|(k, v)| (k.trim_start_matches("x-").to_owned(), v))
            .collect()
    };
    let send = |headers: Vec<(String, String)>, b: String| {
        let c = c.clone();
        async move {
            let mut h: Vec<(&str, &str)> = headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            h.push(("content-type", "application/json"));
            c.send("POST", "/hooks/shopify", &h, &b).await
        }
    };
    let b = body("shopify", &id, 1);
    let signed = newer(sign("shopify", secret, &id, &b, now()));
    assert!(signed.iter().any(|(k, _)| k == "shopify-hmac-sha256"));
    let first = send(signed, b).await;
    assert_eq!(first.status, 201, "{:?}", first.body);
    assert_eq!(up.calls(), 1);
    // Redelivered in the older spelling: the same event, replayed.
    let b = body("shopify", &id, 2);
    let again = send(sign("shopify", secret, &id, &b, now()), b).await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(up.calls(), 1);
    // Forged in the newer spelling: refused before any state.
    let other = unique("shopify-evt");
    let b = body("shopify", &other, 1);
    let forged = send(newer(sign("shopify", FORGER, &other, &b, now())), b).await;
    forged.assert_problem(401, "invalid-signature");
    // Without a signature in either spelling: the problem names both.
    let b = body("shopify", &other, 1);
    let unsigned = send(vec![("shopify-event-id".into(), other.clone())], b).await;
    unsigned.assert_problem(401, "invalid-signature");
    let detail = unsigned.json()["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("shopify-hmac-sha256"), "{detail}");
    assert_eq!(up.calls(), 1);
    std::fs::remove_dir_all(dir).ok();
}

/// A failure is not the event's answer: the provider's retry runs it.
#[tokio::test]
async fn a_failed_delivery_is_not_stored() {
    let up = TestUpstream::start().await;
    let (dir, routes) = preset_routes();
    let (_r, c) = idemgate(&up, &routes).await;
    let (preset, secret) = PRESETS[0];
    let id = unique("evt");
    let failed = deliver(&c, preset, secret, &id, 1, now(), &[("x-status", "500")]).await;
    assert_eq!(failed.status, 500);
    let retried = deliver(&c, preset, secret, &id, 1, now(), &[]).await;
    assert_eq!(retried.status, 201);
    assert_eq!(retried.header("idempotent-replayed"), None);
    let again = deliver(&c, preset, secret, &id, 1, now(), &[]).await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(up.calls(), 2);
    std::fs::remove_dir_all(dir).ok();
}

/// Keys from a JSON pointer and from the body's hash: the happy path, and
/// every kind of body that yields no key or a bad one.
async fn body_keys(store: &str) {
    let up = TestUpstream::start().await;
    let routes = r#"
[[routes]]
path = "/orders"
key_from = "json:/order/id"
required = true
[[routes]]
path = "/events"
key_from = "json:/id"
[[routes]]
path = "/blobs"
key_from = "body-sha256"
"#;
    let (_r, c) = idemgate(&up, &format!("{store}\n{routes}")).await;
    let post = |path: &'static str, body: String| {
        let c = c.clone();
        async move {
            c.send("POST", path, &[("content-type", "application/json")], &body)
                .await
        }
    };
    let id = unique("o");
    let first = post("/orders", format!(r#"{{"order":{{"id":"{id}"}},"n":1}}"#)).await;
    assert_eq!(first.status, 201, "{:?}", first.body);
    let dup = post("/orders", format!(r#"{{"order":{{"id":"{id}"}},"n":1}}"#)).await;
    assert_eq!(dup.header("idempotent-replayed"), Some("true"));
    assert_eq!(dup.body, first.body);
    // The fingerprint still covers the body off webhook presets.
    post("/orders", format!(r#"{{"order":{{"id":"{id}"}},"n":2}}"#))
        .await
        .assert_problem(422, "key-reused");
    assert_eq!(up.calls(), 1);
    // A number is a key as written.
    let n = 900_000 + u64::from(std::process::id());
    assert_eq!(
        post("/orders", format!(r#"{{"order":{{"id":{n}}}}}"#))
            .await
            .status,
        201
    );
    assert_eq!(up.calls(), 2);

    // No key, on a required route: 400, nothing forwarded or stored.
    for body in [
        "not json",
        r#"{"order":{}}"#,
        r#"{"order":[1]}"#,
        "",
        "{\"order\":",
    ] {
        post("/orders", body.into())
            .await
            .assert_problem(400, "missing-key");
    }
    // A bad key: 400 invalid-key.
    let long = "k".repeat(256);
    for body in [
        r#"{"order":{"id":{"x":1}}}"#.to_owned(),
        r#"{"order":{"id":null}}"#.to_owned(),
        r#"{"order":{"id":""}}"#.to_owned(),
        r#"{"order":{"id":"caf\u00e9"}}"#.to_owned(),
        format!(r#"{{"order":{{"id":"{long}"}}}}"#),
        r#"{"order":{"id":"a","id":"b"}}"#.to_owned(),
    ] {
        post("/orders", body)
            .await
            .assert_problem(400, "invalid-key");
    }
    assert_eq!(up.calls(), 2);

    // Not required: a body without a key passes through, each time.
    post("/events", "not json".into()).await;
    post("/events", "not json".into()).await;
    assert_eq!(up.calls(), 4);

    // Deep and large bodies within max_request_body.
    let deep_id = unique("deep");
    let deep = format!(
        r#"{{"pad":{}{},"order":{{"id":"{deep_id}"}}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    assert_eq!(post("/orders", deep.clone()).await.status, 201);
    assert_eq!(
        post("/orders", deep).await.header("idempotent-replayed"),
        Some("true")
    );
    let big_id = unique("big");
    let big = format!(
        r#"{{"order":{{"id":"{big_id}"}},"pad":"{}"}}"#,
        "x".repeat(900 << 10)
    );
    assert_eq!(post("/orders", big.clone()).await.status, 201);
    assert_eq!(
        post("/orders", big).await.header("idempotent-replayed"),
        Some("true")
    );
    assert_eq!(up.calls(), 6);
    // Past max_request_body: 413, as for any covered request.
    let huge = format!(
        r#"{{"order":{{"id":"h"}},"pad":"{}"}}"#,
        "x".repeat(1 << 20)
    );
    post("/orders", huge)
        .await
        .assert_problem(413, "body-too-large");

    // body-sha256: identical bodies are one request, others are not.
    let blob = unique("blob");
    assert_eq!(post("/blobs", blob.clone()).await.status, 201);
    assert_eq!(
        post("/blobs", blob.clone())
            .await
            .header("idempotent-replayed"),
        Some("true")
    );
    assert_eq!(
        post("/blobs", format!("{blob}!"))
            .await
            .header("idempotent-replayed"),
        None
    );
    assert_eq!(up.calls(), 8);
}

#[tokio::test]
async fn body_keys_on_memory() {
    body_keys("").await;
}

#[tokio::test]
async fn body_keys_on_redis() {
    let redis = shared_server();
    body_keys(&store_toml(&redis.url())).await;
}
