//! The consumer dedup HTTP/JSON API (SPEC §4) on the admin listener, on the
//! memory store and on Redis: lifecycle, dead letters, batches, every bad
//! input, and store outages.

mod support;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use idemgate::server::Running;
use serde_json::{json, Value};
use support::redis_server::{shared_server, RedisServer};
use support::{config, Got, TestClient};

/// idemgate in dedup-only mode (no upstream).
async fn dedup_only(extra: &str) -> (Running, Api) {
    let r = Running::start(config(None, extra)).await.unwrap();
    assert!(
        r.proxy_addr.is_none(),
        "dedup-only mode opens no proxy listener"
    );
    let api = Api(TestClient::new(r.admin_addr));
    (r, api)
}

struct Api(TestClient);

impl Api {
    async fn post(&self, scope: &str, op: &str, body: Value) -> Got {
        self.raw(
            "POST",
            &format!("/v1/dedup/{scope}/{op}"),
            &body.to_string(),
        )
        .await
    }
    async fn raw(&self, method: &str, path: &str, body: &str) -> Got {
        self.0
            .send(method, path, &[("content-type", "application/json")], body)
            .await
    }
}

fn redis_toml(redis: &RedisServer) -> String {
    support::redis_server::store_toml(&redis.url())
}

async fn lifecycle(r: &Running, api: &Api) {
    let s = "orders.billing";
    let got = api
        .post(
            s,
            "claim",
            json!({"key": "m1", "worker": "w1", "lease_ms": 10_000}),
        )
        .await;
    assert_eq!(got.status, 201, "{:?}", got.body);
    let doc = got.json();
    assert_eq!(doc["status"], "acquired");
    assert_eq!(doc["attempt"], 1);
    assert_eq!(doc["lease_expires_in_ms"], 10_000);
    assert_eq!(doc["recovered"], false);
    let lease = doc["lease_id"].as_str().unwrap().to_owned();
    let busy = api.post(s, "claim", json!({"key": "m1"})).await;
    assert_eq!(busy.status, 409);
    assert_eq!(busy.json()["status"], "in_progress");
    assert!(busy.json()["retry_after_ms"].as_u64().unwrap() <= 10_000);
    assert_eq!(busy.header("retry-after"), Some("10"));
    let ext = api
        .post(
            s,
            "extend",
            json!({"key": "m1", "lease_id": lease, "lease_ms": 20_000}),
        )
        .await;
    assert_eq!(
        (
            ext.status.as_u16(),
            ext.json()["lease_expires_in_ms"].as_u64()
        ),
        (200, Some(20_000))
    );
    let result = json!({"charge": "ch_1", "amount": 100});
    let done = api
        .post(
            s,
            "complete",
            json!({"key": "m1", "lease_id": lease, "result": result}),
        )
        .await;
    assert_eq!(done.status, 200);
    // Idempotent for the same lease.
    assert_eq!(
        api.post(s, "complete", json!({"key": "m1", "lease_id": lease}))
            .await
            .status,
        200
    );
    let lost = api
        .post(s, "complete", json!({"key": "m1", "lease_id": "0123"}))
        .await;
    assert_eq!(
        (lost.status.as_u16(), lost.json()["status"].clone()),
        (409, json!("lease_lost"))
    );
    let again = api.post(s, "claim", json!({"key": "m1"})).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.json()["status"], "completed");
    assert_eq!(again.json()["result"], result);
    assert!(again.json()["completed_at_ms"].as_u64().unwrap() > 1_700_000_000_000);
    let rec = api.raw("GET", &format!("/v1/dedup/{s}/keys/m1"), "").await;
    assert_eq!(rec.status, 200);
    assert_eq!(rec.json()["state"], "completed");
    assert_eq!(rec.json()["result"], result);
    assert!(
        rec.json().get("lease_id").is_none(),
        "lease ids are not shown"
    );
    let rel = api
        .post(
            s,
            "release",
            json!({"key": "m1", "lease_id": lease, "outcome": "retry"}),
        )
        .await;
    assert_eq!(rel.status, 409);
    assert_eq!(
        api.raw("DELETE", &format!("/v1/dedup/{s}/keys/m1"), "")
            .await
            .status,
        204
    );
    api.raw("DELETE", &format!("/v1/dedup/{s}/keys/m1"), "")
        .await
        .assert_problem(404, "not-found");
    api.raw("GET", &format!("/v1/dedup/{s}/keys/m1"), "")
        .await
        .assert_problem(404, "not-found");

    // mark
    let first = api.post(s, "mark", json!({"key": "evt-1"})).await;
    assert_eq!(
        (first.status.as_u16(), first.json()),
        (201, json!({"status": "new"}))
    );
    let second = api
        .post(s, "mark", json!({"key": "evt-1", "ttl_ms": 60_000}))
        .await;
    assert_eq!(
        (second.status.as_u16(), second.json()),
        (200, json!({"status": "duplicate"}))
    );

    // Keys with slashes and spaces travel percent-encoded in paths.
    api.post(s, "mark", json!({"key": "a/b c"})).await;
    let odd = api
        .raw("GET", &format!("/v1/dedup/{s}/keys/a%2Fb%20c"), "")
        .await;
    assert_eq!(odd.json()["state"], "marked");

    // content_b64: the key is the SHA-256 of the content.
    let content = base64::engine::general_purpose::STANDARD.encode(b"hello");
    let c = api.post(s, "claim", json!({"content_b64": content})).await;
    assert_eq!(c.status, 201);
    assert_eq!(
        c.json()["key"],
        "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    );
    let same = api
        .post(
            s,
            "mark",
            json!({"key": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}),
        )
        .await;
    assert_eq!(same.json()["status"], "duplicate");
    let m = &r.metrics.dedup_operations;
    assert!(m.with_label_values(&["claim", "acquired"]).get() > 0);
    assert_eq!(m.with_label_values(&["mark", "new"]).get(), 2);
}

async fn dead_letters(_r: &Running, api: &Api) {
    let s = "dlq.scope";
    // Out of attempts.
    for attempt in 1..=2 {
        let c = api
            .post(s, "claim", json!({"key": "poison", "max_attempts": 2}))
            .await;
        assert_eq!(c.json()["attempt"], attempt);
        let lease = c.json()["lease_id"].clone();
        let r = api
            .post(s, "release", json!({"key": "poison", "lease_id": lease, "outcome": "retry", "error": format!("boom {attempt}")}))
            .await;
        assert_eq!(r.status, 200);
    }
    let failed = api
        .post(s, "claim", json!({"key": "poison", "max_attempts": 2}))
        .await;
    assert_eq!(failed.status, 200);
    assert_eq!(failed.json()["status"], "failed");
    assert_eq!(failed.json()["attempts"], 2);
    assert_eq!(failed.json()["error"], "boom 2");
    // Failures are listed by failure time in milliseconds: the next one
    // must not share poison's millisecond.
    tokio::time::sleep(Duration::from_millis(2)).await;
    // Permanent.
    for k in ["bad-1", "bad-2"] {
        let c = api.post(s, "claim", json!({"key": k})).await;
        let lease = c.json()["lease_id"].clone();
        api.post(
            s,
            "release",
            json!({"key": k, "lease_id": lease, "outcome": "permanent", "error": "invalid order"}),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let page = api
        .raw("GET", &format!("/v1/dedup/{s}/failed?limit=2"), "")
        .await;
    assert_eq!(page.status, 200);
    let doc = page.json();
    let keys: Vec<&str> = doc["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["poison", "bad-1"]);
    assert_eq!(doc["items"][1]["error"], "invalid order");
    let next = doc["next"].as_str().unwrap().to_owned();
    let page2 = api
        .raw(
            "GET",
            &format!("/v1/dedup/{s}/failed?limit=2&after={next}"),
            "",
        )
        .await
        .json();
    assert_eq!(page2["items"][0]["key"], "bad-2");
    assert_eq!(page2["next"], Value::Null);
    // Reset: the next delivery runs again, attempt 1.
    let reset = api
        .raw("POST", &format!("/v1/dedup/{s}/keys/poison/reset"), "")
        .await;
    assert_eq!(reset.status, 200);
    assert_eq!(reset.json()["previous"], "failed");
    let again = api
        .post(s, "claim", json!({"key": "poison", "max_attempts": 2}))
        .await;
    assert_eq!(
        (again.status.as_u16(), again.json()["attempt"].clone()),
        (201, json!(1))
    );
    let purged = api
        .raw("DELETE", &format!("/v1/dedup/{s}/failed"), "")
        .await;
    assert_eq!(purged.json(), json!({"purged": 2}));
    let empty = api
        .raw("GET", &format!("/v1/dedup/{s}/failed"), "")
        .await
        .json();
    assert_eq!(empty["items"], json!([]));
}

async fn batches(r: &Running, api: &Api) {
    let s = "batch.scope";
    let got = api
        .post(
            s,
            "claim:batch",
            json!({"items": [{"key": "a"}, {"key": 5}, {"key": "b"}, {"key": "a"}]}),
        )
        .await;
    assert_eq!(got.status, 200);
    let results = got.json()["results"].as_array().unwrap().clone();
    let codes: Vec<u64> = results
        .iter()
        .map(|r| r["code"].as_u64().unwrap())
        .collect();
    assert_eq!(codes, [201, 422, 201, 409]);
    assert_eq!(results[1]["field"], "key");
    let (la, lb) = (
        results[0]["lease_id"].clone(),
        results[2]["lease_id"].clone(),
    );
    let done = api
        .post(s, "complete:batch", json!({"items": [{"key": "a", "lease_id": la}, {"key": "b", "lease_id": "stale"}, {"key": "b", "lease_id": lb}]}))
        .await;
    let codes: Vec<u64> = done.json()["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["code"].as_u64().unwrap())
        .collect();
    assert_eq!(codes, [200, 409, 200]);
    let marks = api
        .post(
            s,
            "mark:batch",
            json!({"items": [{"key": "n"}, {"key": "n"}, {"key": "a"}]}),
        )
        .await;
    let statuses: Vec<String> = marks.json()["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(statuses, ["new", "duplicate", "duplicate"]);
    api.post(s, "claim:batch", json!({"items": "nope"}))
        .await
        .assert_problem(422, "invalid-field");
    let empty = api.post(s, "claim:batch", json!({"items": []})).await;
    assert_eq!(empty.json(), json!({"results": []}));
    let m = &r.metrics.dedup_operations;
    assert_eq!(m.with_label_values(&["mark_batch", "ok"]).get(), 1);
}

async fn bad_input(r: &Running, api: &Api) {
    let s = "bad.scope";
    let field = |got: Got, name: &str| {
        got.assert_problem(422, "invalid-field");
        assert_eq!(got.json()["field"], name, "{:?}", got.json());
    };
    api.raw("POST", &format!("/v1/dedup/{s}/claim"), "{not json")
        .await
        .assert_problem(400, "invalid-json");
    api.raw("POST", &format!("/v1/dedup/{s}/claim"), "[1,2]")
        .await
        .assert_problem(400, "invalid-json");
    api.raw("POST", &format!("/v1/dedup/{s}/claim"), "")
        .await
        .assert_problem(400, "invalid-json");
    // Each refused body, and the field its problem must name.
    let cases = [
        ("claim", json!({}), "key"),
        ("claim", json!({"key": ""}), "key"),
        ("claim", json!({"key": "k".repeat(513)}), "key"),
        (
            "claim",
            json!({"key": "k", "content_b64": "aGk="}),
            "content_b64",
        ),
        (
            "claim",
            json!({"content_b64": "!!!not base64"}),
            "content_b64",
        ),
        ("claim", json!({"key": "k", "lease_ms": 0}), "lease_ms"),
        ("claim", json!({"key": "k", "lease_ms": "10"}), "lease_ms"),
        (
            "claim",
            json!({"key": "k", "max_attempts": 0}),
            "max_attempts",
        ),
        ("claim", json!({"key": "k", "colour": "blue"}), "colour"),
        (
            "release",
            json!({"key": "k", "lease_id": "x", "outcome": "maybe"}),
            "outcome",
        ),
        (
            "release",
            json!({"key": "k", "outcome": "retry"}),
            "lease_id",
        ),
        (
            "complete",
            json!({"key": "k", "lease_id": "x", "result": "r".repeat(200)}),
            "result",
        ),
        ("mark", json!({"key": "k", "ttl_ms": -5}), "ttl_ms"),
    ];
    for (op, body, name) in cases {
        field(api.post(s, op, body).await, name);
    }
    api.post("bad%20scope", "claim", json!({"key": "k"}))
        .await
        .assert_problem(404, "invalid-scope");
    api.post(&"s".repeat(129), "claim", json!({"key": "k"}))
        .await
        .assert_problem(404, "invalid-scope");
    api.post(s, "frobnicate", json!({}))
        .await
        .assert_problem(404, "not-found");
    api.raw("GET", &format!("/v1/dedup/{s}/claim"), "")
        .await
        .assert_problem(405, "method-not-allowed");
    api.raw("GET", &format!("/v1/dedup/{s}/failed?limit=0"), "")
        .await
        .assert_problem(422, "invalid-field");
    api.raw("GET", &format!("/v1/dedup/{s}/failed?after=garbage"), "")
        .await
        .assert_problem(422, "invalid-field");
    let big = format!("{{\"key\":\"{}\"}}", "x".repeat(5000));
    api.raw("POST", &format!("/v1/dedup/{s}/claim"), &big)
        .await
        .assert_problem(413, "body-too-large");
    // Nothing above created a record.
    let none = api.raw("GET", &format!("/v1/dedup/{s}/keys/k"), "").await;
    none.assert_problem(404, "not-found");
    let m = &r.metrics.dedup_operations;
    assert!(m.with_label_values(&["claim", "bad_request"]).get() >= 8);
}

async fn racing(_r: &Running, api: &Api) {
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let c = api.0.clone();
            tokio::spawn(async move {
                c.send(
                    "POST",
                    "/v1/dedup/race/claim",
                    &[],
                    &json!({"key": "hot"}).to_string(),
                )
                .await
                .status
                .as_u16()
            })
        })
        .collect();
    let mut codes = Vec::new();
    for t in tasks {
        codes.push(t.await.unwrap());
    }
    assert_eq!(codes.iter().filter(|&&c| c == 201).count(), 1);
    assert_eq!(codes.iter().filter(|&&c| c == 409).count(), 49);
}

async fn takeover(_r: &Running, api: &Api) {
    let s = "takeover";
    let first = api
        .post(s, "claim", json!({"key": "t", "lease_ms": 150}))
        .await
        .json();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = api
        .post(s, "claim", json!({"key": "t", "lease_ms": 10_000}))
        .await;
    assert_eq!(second.status, 201);
    let doc = second.json();
    assert_eq!(doc["recovered"], true);
    assert_eq!(doc["attempt"], 2);
    assert!(doc["fence"].as_u64() > first["fence"].as_u64());
    let stale = api
        .post(
            s,
            "complete",
            json!({"key": "t", "lease_id": first["lease_id"]}),
        )
        .await;
    assert_eq!(stale.status, 409);
}

const SMALL_LIMITS: &str = "[dedup]\nmax_result_bytes = 100\nmax_request_body = \"4KiB\"\n";

/// A dedup-only idemgate on the memory store.
async fn memory() -> ((), Running, Api) {
    let (r, api) = dedup_only(SMALL_LIMITS).await;
    ((), r, api)
}

/// A dedup-only idemgate on a Redis shared by the cases running at the same
/// time (each case uses its own scopes).
async fn redis() -> (Arc<RedisServer>, Running, Api) {
    let redis = shared_server();
    let (r, api) = dedup_only(&format!("{}{SMALL_LIMITS}", redis_toml(&redis))).await;
    (redis, r, api)
}

/// One `#[test]` per case, each on its own idemgate from `$setup`.
macro_rules! api_cases {
    ($name:ident, $setup:ident; $($case:ident),*) => {
        mod $name {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let (_guard, r, api) = super::$setup().await;
                    super::$case(&r, &api).await;
                    r.stop().await;
                }
            )*
        }
    };
}

api_cases!(on_memory, memory; lifecycle, dead_letters, batches, bad_input, racing, takeover);
api_cases!(on_redis, redis; lifecycle, dead_letters, batches, bad_input, racing, takeover);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_outage_is_503_never_new() {
    let mut redis = RedisServer::start();
    let (r, api) = dedup_only(&redis_toml(&redis)).await;
    redis.kill();
    for (op, body) in [
        ("claim", json!({"key": "k"})),
        ("mark", json!({"key": "k"})),
        ("claim:batch", json!({"items": [{"key": "k"}]})),
    ] {
        let got = api.post("s", op, body).await;
        got.assert_problem(503, "store-unavailable");
        assert_eq!(got.header("retry-after"), Some("1"));
    }
    assert_eq!(
        r.metrics
            .dedup_operations
            .with_label_values(&["claim", "unavailable"])
            .get(),
        1
    );
    r.stop().await;
}
