//! Tests of the config checks.

use std::time::Duration;

use http::Method;

use super::*;

fn parse(text: &str) -> Result<Config, ConfigErrors> {
    Config::from_parts(FileConfig::parse(text)?, &RunArgs::default())
}

#[test]
fn defaults_match_the_spec() {
    let c = parse("").unwrap();
    assert_eq!(c.listen.to_string(), "127.0.0.1:8081");
    assert_eq!(c.admin_listen.to_string(), "127.0.0.1:9901");
    assert!(c.upstream.is_none());
    assert_eq!(c.upstream_timeout, Duration::from_secs(60));
    assert_eq!(c.store.backend.name(), "memory");
    assert_eq!(
        c.store.backend.render()["max_entries"].as_integer(),
        Some(1_000_000)
    );
    assert_eq!(c.store.on_store_error, OnStoreError::Reject);
    assert_eq!(*c.policies.default, Policy::default());
    let p = Policy::default();
    assert_eq!(p.max_request_body, 1024 * 1024);
    assert_eq!(p.max_response_body, 4 * 1024 * 1024);
    assert_eq!(p.uncacheable_statuses, [408, 429, 502, 503, 504]);
}

#[test]
fn the_example_file_is_valid() {
    let text = include_str!("../../config/idemgate.example.toml");
    let c = parse(text).unwrap();
    assert_eq!(*c.policies.default, Policy::default());
    assert_eq!(c.dedup, DedupConfig::default());
    assert!(!c.policies.routes.is_empty());
}

#[test]
fn every_problem_is_listed_with_its_path() {
    let err = parse(
        r#"
        listen = "nowhere"
        upstream = "ftp://x"
        [store]
        backend = "etcd"
        [idempotency]
        record_ttl = "forever"
        methods = ["POST", "B@D"]
        max_key_length = 0
        max_request_body = "lots"
        [[routes]]
        required = "yes"
        "#,
    )
    .unwrap_err();
    let lines = err.0.join("\n");
    for want in [
        "listen: \"nowhere\" is not an address",
        "upstream: \"ftp://x\" must be an http:// or https:// URL",
        "store.backend: \"etcd\" is not",
        "idempotency.record_ttl: \"forever\" is not a duration",
        "idempotency.methods[1]: \"B@D\" is not an HTTP method",
        "idempotency.max_key_length: 0 is out of range",
        "idempotency.max_request_body: \"lots\" is not a size",
        "routes[0].path: is required",
        "routes[0].required: \"yes\" is not true or false",
    ] {
        assert!(lines.contains(want), "missing {want:?} in:\n{lines}");
    }
    assert_eq!(err.0.len(), 9, "{lines}");
}

#[test]
fn unknown_keys_and_syntax_errors_are_one_line_with_a_place() {
    let err = parse("[idempotency]\nrecord_tl = \"1h\"\n").unwrap_err();
    assert_eq!(err.0.len(), 1);
    assert!(
        err.0[0].contains("record_tl") && err.0[0].contains("line 2"),
        "{err}"
    );
    let err = parse("listen = \n").unwrap_err();
    assert!(!err.0[0].contains('\n'));
}

#[test]
fn routes_inherit_the_defaults_and_override_keys() {
    let c = parse(
        r#"
        [idempotency]
        wait_timeout = "3s"
        [[routes]]
        path = "/v1/payments/**"
        required = true
        record_ttl = "48h"
        [[routes]]
        path = "/v1/*/refunds"
        methods = ["post", "put"]
        "#,
    )
    .unwrap();
    let pay = c.policies.for_path("/v1/payments/abc");
    assert!(pay.required);
    assert_eq!(pay.record_ttl, Duration::from_secs(48 * 3600));
    assert_eq!(pay.wait_timeout, Duration::from_secs(3));
    let refunds = c.policies.for_path("/v1/orders/refunds");
    assert_eq!(refunds.methods, [Method::POST, Method::PUT]);
    let other = c.policies.for_path("/v2/x");
    assert!(!other.required);
    assert_eq!(other.wait_timeout, Duration::from_secs(3));
}

#[test]
fn flags_override_the_file() {
    let file =
        FileConfig::parse("listen = \"127.0.0.1:1\"\nupstream = \"http://127.0.0.1:2\"").unwrap();
    let args = RunArgs {
        listen: Some("127.0.0.1:3".into()),
        ..Default::default()
    };
    let c = Config::from_parts(file, &args).unwrap();
    assert_eq!(c.listen.to_string(), "127.0.0.1:3");
    assert_eq!(c.upstream.unwrap().to_string(), "http://127.0.0.1:2/");
    let bad = RunArgs {
        upstream: Some("nope".into()),
        ..Default::default()
    };
    let err = Config::from_parts(FileConfig::default(), &bad).unwrap_err();
    assert!(
        err.0[0].starts_with("--upstream (or IDEMGATE_UPSTREAM): \"nope\""),
        "{err}"
    );
}

#[test]
fn redis_flags_choose_the_backend() {
    let args = RunArgs {
        redis: Some("redis://127.0.0.1:6379".into()),
        ..Default::default()
    };
    let c = Config::from_parts(FileConfig::default(), &args).unwrap();
    assert_eq!(c.store.backend.name(), "redis");
    assert_eq!(
        c.store.backend.render()["key_prefix"].as_str(),
        Some("idemgate")
    );
    let args = RunArgs {
        redis_cluster: vec!["redis://a:1".into(), "redis://b:2".into()],
        ..Default::default()
    };
    let c = Config::from_parts(FileConfig::default(), &args).unwrap();
    assert_eq!(c.store.backend.name(), "redis-cluster");
    let urls = c.store.backend.render()["urls"].as_array().unwrap().len();
    assert_eq!(urls, 2);
    let both = RunArgs {
        redis: Some("redis://a:1".into()),
        redis_cluster: vec!["redis://b:2".into()],
        ..Default::default()
    };
    assert!(Config::from_parts(FileConfig::default(), &both).is_err());
    assert!(parse("[store]\nbackend = \"redis\"").is_err());
}

#[test]
fn path_patterns() {
    let m = |p: &str, path: &str| PathPattern::parse(p).unwrap().matches(path);
    assert!(m("/v1/payments/**", "/v1/payments"));
    assert!(m("/v1/payments/**", "/v1/payments/a/b/c"));
    assert!(!m("/v1/payments/**", "/v1/paymentsx"));
    assert!(m("/v1/*/refunds", "/v1/abc/refunds"));
    assert!(!m("/v1/*/refunds", "/v1/a/b/refunds"));
    assert!(m("/v1/**/refunds", "/v1/a/b/refunds"));
    assert!(m("/v1/**/refunds", "/v1/refunds"));
    assert!(m("/v1/pay*", "/v1/payments"));
    assert!(!m("/v1/pay*", "/v1/payments/x"));
    assert!(m("/**", "/anything/at/all"));
    assert!(m("/exact", "/exact"));
    assert!(!m("/exact", "/exact/"));
    assert!(m("/a/*x*y", "/a/1x2y"));
    assert!(!m("/a/*x*y", "/a/1x2z"));
    assert!(PathPattern::parse("v1").is_err());
    // A long hostile path stays cheap with several wildcards.
    let long = format!("/{}", "a/".repeat(2000));
    assert!(!m("/**/b/**/c/**/d", &long));
}

#[test]
fn the_rendered_config_reads_back_the_same() {
    let c = parse(include_str!("../../config/idemgate.example.toml")).unwrap();
    let text = c.to_toml();
    let again = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(again.to_toml(), text);
    assert_eq!(*again.policies.default, *c.policies.default);
    assert_eq!(again.dedup, c.dedup);
}

#[test]
fn unknown_outcome_keys_are_checked_and_named() {
    let c = parse(
        r#"
        [idempotency]
        on_unknown_outcome = "reconcile"
        reconcile_url = "http://127.0.0.1:8080/idempotency/{key}"
        unknown_statuses = [504]
        unknown_ttl = "1h"
        [[routes]]
        path = "/v1/exports/**"
        on_unknown_outcome = "release"
        "#,
    )
    .unwrap();
    let p = &c.policies.default;
    assert_eq!(p.on_unknown_outcome, OnUnknownOutcome::Reconcile);
    assert_eq!(p.unknown_ttl(), Duration::from_secs(3600));
    assert_eq!(
        p.reconcile_url.as_ref().unwrap().for_key("a b/c"),
        "http://127.0.0.1:8080/idempotency/a%20b%2Fc"
    );
    let b = p.begin_options();
    assert_eq!(b.hold_lapsed, Some(Duration::from_secs(3600)));
    assert_eq!(b.reconcile_every, Some(Duration::from_secs(10)));
    let exports = c.policies.for_path("/v1/exports/1");
    assert_eq!(exports.begin_options().hold_lapsed, None);
    // The default holds, and an unknown outcome lives as long as a record.
    let d = Policy::default();
    assert_eq!(d.on_unknown_outcome, OnUnknownOutcome::Hold);
    assert_eq!(d.unknown_ttl(), d.record_ttl);
    assert_eq!(d.unknown_statuses, [502, 504]);

    let err = parse(
        r#"
        [idempotency]
        on_unknown_outcome = "maybe"
        unknown_statuses = [999]
        reconcile_timeout = "soon"
        [[routes]]
        path = "/x"
        on_unknown_outcome = "reconcile"
        [[routes]]
        path = "/y"
        reconcile_url = "ftp://nope/{key}"
        "#,
    )
    .unwrap_err();
    let lines = err.0.join("\n");
    for want in [
        "idempotency.on_unknown_outcome: \"maybe\" is not \"hold\", \"release\" or \"reconcile\"",
        "idempotency.unknown_statuses[0]: 999 is out of range",
        "idempotency.reconcile_timeout: \"soon\" is not a duration",
        "routes[0].reconcile_url: is required when on_unknown_outcome = \"reconcile\"",
        "routes[1].reconcile_url: \"ftp://nope/{key}\" is not an http:// URL template",
    ] {
        assert!(lines.contains(want), "missing {want:?} in:\n{lines}");
    }
}

#[test]
fn admin_tokens_come_from_the_file_or_a_file_and_are_checked() {
    let dir = std::env::temp_dir().join(format!("idemgate-tokens-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("token");
    std::fs::write(&file, "s3cret\n").unwrap();
    let c = parse(&format!(
        "admin_token_file = \"{}\"\nadmin_read_token = \"reader\"\nmetrics_public = false\n",
        file.display()
    ))
    .unwrap();
    assert_eq!(c.admin_tokens.write.as_deref(), Some("s3cret"));
    assert_eq!(c.admin_tokens.read.as_deref(), Some("reader"));
    assert!(!c.admin_tokens.metrics_public);
    assert!(!format!("{c:?}").contains("s3cret"), "tokens never printed");
    assert!(c.to_toml().contains("admin_token = \"***\""));
    assert!(!c.to_toml().contains("s3cret"));

    let err =
        parse("admin_token_file = \"/nonexistent/token\"\nadmin_read_token = \"r\"\n").unwrap_err();
    let lines = err.0.join("\n");
    assert!(
        lines.contains("admin_token_file: cannot read \"/nonexistent/token\""),
        "{lines}"
    );
    assert!(
        lines.contains("admin_read_token: needs admin_token too"),
        "{lines}"
    );
    let err = parse("admin_token = \"a b\"\n").unwrap_err();
    assert!(
        err.0[0].starts_with("admin_token: must be non-empty"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn encryption_keys_are_read_and_every_bad_one_is_named() {
    use base64::Engine;
    let dir = std::env::temp_dir().join(format!("idemgate-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good");
    std::fs::write(
        &good,
        base64::engine::general_purpose::STANDARD.encode([5u8; 32]),
    )
    .unwrap();
    let short = dir.join("short");
    std::fs::write(
        &short,
        base64::engine::general_purpose::STANDARD.encode([5u8; 16]),
    )
    .unwrap();
    let junk = dir.join("junk");
    std::fs::write(&junk, "not base64 at all!").unwrap();
    let c = parse(&format!(
        "[store.encryption]\nkeys = [{{ id = \"k2\", file = \"{}\" }}]\n",
        good.display()
    ))
    .unwrap();
    assert_eq!(c.store.encryption[0].material, vec![5u8; 32]);
    assert!(
        !format!("{c:?}").contains("material"),
        "key material is never printed"
    );
    let text = c.to_toml();
    assert!(
        text.contains("[[store.encryption.keys]]") || text.contains("encryption"),
        "{text}"
    );
    assert_eq!(parse(&text).unwrap().store.encryption, c.store.encryption);

    let err = parse(&format!(
        r#"
        [store.encryption]
        keys = [
          {{ id = "a", file = "{}" }},
          {{ id = "b", file = "{}" }},
          {{ id = "c", env = "IDEMGATE_TEST_KEY_THAT_IS_NOT_SET" }},
          {{ id = "d", file = "/nonexistent/key" }},
          {{ id = "e" }},
        ]
        "#,
        short.display(),
        junk.display()
    ))
    .unwrap_err();
    let lines = err.0.join("\n");
    for want in [
        "store.encryption.keys[0]: key \"a\" is 16 bytes; AES-256 needs 32",
        "store.encryption.keys[1]: key \"b\" is not standard base64",
        "store.encryption.keys[2].env: the environment variable IDEMGATE_TEST_KEY_THAT_IS_NOT_SET is not set",
        "store.encryption.keys[3].file: cannot read \"/nonexistent/key\"",
        "store.encryption.keys[4]: give exactly one of env or file",
    ] {
        assert!(lines.contains(want), "missing {want:?} in:\n{lines}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn fair_share_rates_are_checked_and_inherited() {
    let c = parse(
        r#"
        [idempotency]
        new_keys_per_scope = "120/m"
        [[routes]]
        path = "/v1/bulk/**"
        new_keys_burst = 50
        "#,
    )
    .unwrap();
    let d = c.policies.default.new_keys.unwrap();
    assert_eq!((d.per_second, d.burst), (2.0, 2.0));
    let bulk = c.policies.for_path("/v1/bulk/x").new_keys.unwrap();
    assert_eq!((bulk.per_second, bulk.burst), (2.0, 50.0));
    let text = c.to_toml();
    assert_eq!(parse(&text).unwrap().to_toml(), text);

    let err = parse(
        "[idempotency]\nnew_keys_per_scope = \"lots\"\n[[routes]]\npath = \"/x\"\nnew_keys_burst = 0\n",
    )
    .unwrap_err();
    let lines = err.0.join("\n");
    assert!(
        lines.contains("idempotency.new_keys_per_scope: \"lots\" is not a rate"),
        "{lines}"
    );
    assert!(
        lines.contains("routes[0].new_keys_burst: 0 is out of range"),
        "{lines}"
    );
    let err = parse("[idempotency]\nnew_keys_burst = 5\n").unwrap_err();
    assert!(
        err.0[0].contains("new_keys_burst: needs new_keys_per_scope"),
        "{err}"
    );
}

#[test]
fn presets_set_the_key_the_check_and_the_fingerprint() {
    std::env::set_var("IDEMGATE_TEST_GH_SECRET", "It's a Secret to Everybody");
    let dir = std::env::temp_dir().join(format!("idemgate-wh-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("sw");
    std::fs::write(&file, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n").unwrap();
    let text = format!(
        r#"
        [[routes]]
        path = "/hooks/github"
        preset = "github"
        secrets = [{{ env = "IDEMGATE_TEST_GH_SECRET" }}]
        [[routes]]
        path = "/hooks/sw"
        preset = "standard-webhooks"
        secrets = [{{ file = "{}" }}, {{ env = "IDEMGATE_TEST_GH_SECRET" }}]
        signature_tolerance = "1m"
        required = true
        [[routes]]
        path = "/orders"
        key_from = "json:/order/id"
        "#,
        file.display()
    );
    // The GitHub secret is not whsec_ base64: refused on the Standard
    // Webhooks route, named by its place, never shown.
    let err = parse(&text).unwrap_err().0.join("\n");
    assert!(
        err.contains("routes[1].secrets[1]: the secret is not a Standard Webhooks secret"),
        "{err}"
    );
    assert!(!err.contains("Everybody"), "{err}");

    let text = text.replace(r#", { env = "IDEMGATE_TEST_GH_SECRET" }]"#, "]");
    let c = parse(&text).unwrap();
    let gh = &c.policies.routes[0].policy;
    assert_eq!(gh.key_from.render(), "header:x-github-delivery");
    assert_eq!(gh.methods, [Method::POST]);
    assert!(!gh.fingerprint_body);
    let check = gh.webhook.as_ref().unwrap();
    assert_eq!(check.verifier.preset, crate::webhook::Preset::Github);
    assert_eq!(check.verifier.tolerance, Duration::from_secs(300));
    assert_eq!(
        check.sources,
        [KeySource::Env("IDEMGATE_TEST_GH_SECRET".into())]
    );
    let sw = &c.policies.routes[1].policy;
    assert_eq!(sw.key_from.render(), "header:webhook-id");
    assert_eq!(
        sw.webhook.as_ref().unwrap().verifier.tolerance,
        Duration::from_secs(60)
    );
    assert!(sw.required);
    let orders = &c.policies.routes[2].policy;
    assert_eq!(orders.key_from.render(), "json:/order/id");
    assert!(orders.fingerprint_body && orders.webhook.is_none());
    // Secrets are rendered by their source, never their value, and the
    // rendered file reads back the same.
    let rendered = c.to_toml();
    assert!(
        !rendered.contains("Everybody") && !rendered.contains("MfKQ9r8"),
        "{rendered}"
    );
    let again = parse(&rendered).unwrap();
    for (a, b) in c.policies.routes.iter().zip(&again.policies.routes) {
        assert_eq!(a.policy, b.policy);
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn intake_problems_are_named() {
    let err = parse(
        r#"
        [idempotency]
        preset = "github"
        [[routes]]
        path = "/a"
        preset = "gitlab"
        [[routes]]
        path = "/b"
        preset = "stripe"
        [[routes]]
        path = "/c"
        preset = "slack"
        secrets = [{ env = "IDEMGATE_TEST_UNSET_SECRET_VAR" }]
        [[routes]]
        path = "/d"
        secrets = [{ env = "X" }]
        [[routes]]
        path = "/e"
        key_from = "json:id"
        [[routes]]
        path = "/f"
        key_from = "header:a"
        header = "b"
        [[routes]]
        path = "/g"
        key_from = "body-sha256"
        max_key_length = 32
        [[routes]]
        path = "/h"
        signature_tolerance = "1m"
        "#,
    )
    .unwrap_err()
    .0
    .join("\n");
    for want in [
        "idempotency.preset: only [[routes]] entries take a preset",
        "routes[0].preset: \"gitlab\" is not \"github\", \"stripe\"",
        "routes[1].secrets: is required with a preset",
        "routes[2].secrets[0].env: the environment variable IDEMGATE_TEST_UNSET_SECRET_VAR is not set",
        "routes[3].secrets: needs a preset",
        "routes[4].key_from: \"id\" is not a JSON pointer",
        "routes[5].key_from: give key_from or header, not both",
        "routes[6].max_key_length: must be at least 64",
        "routes[7].signature_tolerance: needs a preset",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
}

#[test]
fn body_sha256_is_legal_with_a_warning() {
    let c = parse(
        r#"
        [[routes]]
        path = "/events"
        key_from = "body-sha256"
        "#,
    )
    .unwrap();
    assert_eq!(c.policies.routes[0].policy.key_from.render(), "body-sha256");
    assert_eq!(c.warnings.len(), 1);
    assert!(c.warnings[0].starts_with(
        "routes[0].key_from: \"body-sha256\" makes requests with identical bodies one request"
    ));
    assert!(parse("").unwrap().warnings.is_empty());
}

#[test]
fn event_loops_default_to_none_and_are_bounded() {
    assert_eq!(parse("").unwrap().event_loops, 0);
    assert_eq!(parse("event_loops = 4").unwrap().event_loops, 4);
    let err = parse("event_loops = 257").unwrap_err().0.join("\n");
    assert!(
        err.contains("event_loops: 257 is out of range (0 to 256)"),
        "{err}"
    );
    let err = parse("event_loops = \"many\"").unwrap_err().0.join("\n");
    assert!(
        err.contains("event_loops: \"many\" is not a whole number"),
        "{err}"
    );
    // The flag (or IDEMGATE_EVENT_LOOPS) wins over the file.
    let args = RunArgs {
        event_loops: Some("2".into()),
        ..RunArgs::default()
    };
    let file = FileConfig::parse("event_loops = 8").unwrap();
    assert_eq!(Config::from_parts(file, &args).unwrap().event_loops, 2);
}
