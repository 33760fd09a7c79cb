//! Signature checks against signatures made by the providers' own code
//! (`tests/fixtures/webhook_vectors.json`, written by
//! `scripts/webhook-vectors.py`), and each way a delivery is refused.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;

use super::*;

#[derive(Deserialize)]
struct Vector {
    preset: String,
    source: String,
    secret: String,
    body: String,
    now: i64,
    headers: std::collections::BTreeMap<String, String>,
}

fn vectors() -> Vec<Vector> {
    serde_json::from_str(include_str!("../../tests/fixtures/webhook_vectors.json")).unwrap()
}

fn preset(name: &str) -> Preset {
    Preset::ALL.iter().find(|(n, _)| *n == name).unwrap().1
}

fn verifier(preset: Preset, secrets: &[&str]) -> Verifier {
    Verifier {
        preset,
        secrets: secrets.iter().map(|s| preset.secret(s).unwrap()).collect(),
        tolerance: Duration::from_secs(300),
    }
}

fn headers(v: &Vector) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, val) in &v.headers {
        h.insert(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(val).unwrap(),
        );
    }
    h
}

#[test]
fn every_provider_vector_verifies() {
    let all = vectors();
    for name in ["github", "stripe", "standard-webhooks", "shopify", "slack"] {
        assert!(all.iter().any(|v| v.preset == name), "no vector for {name}");
    }
    for v in &all {
        let p = preset(&v.preset);
        let check = verifier(p, &[&v.secret]);
        assert_eq!(
            check.verify(&headers(v), v.body.as_bytes(), v.now),
            Ok(()),
            "{} ({})",
            v.preset,
            v.source
        );
        // Rotation: any configured secret may match.
        let rotated = verifier(p, &["whsec_b2xkLXNlY3JldC1vbGQtc2VjcmV0", &v.secret]);
        assert_eq!(
            rotated.verify(&headers(v), v.body.as_bytes(), v.now),
            Ok(())
        );
    }
}

#[test]
fn a_changed_body_or_wrong_secret_is_a_mismatch() {
    for v in vectors() {
        let p = preset(&v.preset);
        let mut body = v.body.clone().into_bytes();
        body.push(b' ');
        assert_eq!(
            verifier(p, &[&v.secret]).verify(&headers(&v), &body, v.now),
            Err(SignatureError::Mismatch),
            "{}",
            v.preset
        );
        let wrong = verifier(p, &["whsec_d3JvbmctLXNlY3JldC13cm9uZw=="]);
        assert_eq!(
            wrong.verify(&headers(&v), v.body.as_bytes(), v.now),
            Err(SignatureError::Mismatch),
            "{}",
            v.preset
        );
    }
}

#[test]
fn stale_or_future_timestamps_are_refused() {
    for v in vectors() {
        let p = preset(&v.preset);
        let check = verifier(p, &[&v.secret]);
        let h = headers(&v);
        let late = check.verify(&h, v.body.as_bytes(), v.now + 3600);
        let early = check.verify(&h, v.body.as_bytes(), v.now - 3600);
        if p.signs_timestamp() {
            assert!(
                matches!(late, Err(SignatureError::Stale { .. })),
                "{}",
                v.preset
            );
            assert!(
                matches!(early, Err(SignatureError::Stale { .. })),
                "{}",
                v.preset
            );
        } else {
            // GitHub and Shopify sign no timestamp: nothing to be stale.
            assert_eq!(late, Ok(()), "{}", v.preset);
        }
    }
}

#[test]
fn missing_repeated_or_malformed_headers() {
    for v in vectors() {
        let p = preset(&v.preset);
        let check = verifier(p, &[&v.secret]);
        for name in v.headers.keys() {
            if name.ends_with("-event-id") {
                continue; // the key, not part of the signature
            }
            let mut h = headers(&v);
            h.remove(name.as_str());
            assert!(
                matches!(
                    check.verify(&h, v.body.as_bytes(), v.now),
                    Err(SignatureError::Missing(_))
                ),
                "{} without {name}",
                v.preset
            );
            let mut h = headers(&v);
            let value = h.get(name.as_str()).unwrap().clone();
            h.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), value);
            assert!(
                matches!(
                    check.verify(&h, v.body.as_bytes(), v.now),
                    Err(SignatureError::Malformed(_))
                ),
                "{} with {name} twice",
                v.preset
            );
        }
    }
    let github = verifier(Preset::Github, &["s"]);
    let mut h = HeaderMap::new();
    h.insert("x-hub-signature-256", HeaderValue::from_static("sha256=zz"));
    assert_eq!(
        github.verify(&h, b"", 0),
        Err(SignatureError::Malformed("x-hub-signature-256"))
    );
    // A Stripe header with a timestamp and no v1 signature matches nothing.
    let stripe = verifier(Preset::Stripe, &["s"]);
    let mut h = HeaderMap::new();
    h.insert("stripe-signature", HeaderValue::from_static("t=100"));
    assert_eq!(stripe.verify(&h, b"", 100), Err(SignatureError::Mismatch));
}

#[test]
fn secrets_never_print() {
    let v = verifier(Preset::Github, &["hunter2"]);
    assert!(!format!("{v:?}").contains("hunter2"));
    assert!(Preset::StandardWebhooks.secret("not-base64!").is_err());
    assert!(Preset::Github.secret("  ").is_err());
}

#[test]
fn shopify_takes_either_spelling_of_its_headers_but_not_both() {
    let all = vectors();
    let newer = all
        .iter()
        .find(|v| v.headers.contains_key("shopify-hmac-sha256"))
        .expect("a vector in Shopify's newer header form");
    let older = all
        .iter()
        .find(|v| v.headers.contains_key("x-shopify-hmac-sha256"))
        .unwrap();
    let check = verifier(Preset::Shopify, &[&newer.secret]);
    assert_eq!(
        check.verify(&headers(newer), newer.body.as_bytes(), newer.now),
        Ok(())
    );
    // Both spellings at once: which would be the signature? Refused.
    let mut both = headers(newer);
    both.extend(headers(older));
    assert!(matches!(
        check.verify(&both, newer.body.as_bytes(), newer.now),
        Err(SignatureError::Malformed(_))
    ));
    // The key is the event id, in either spelling.
    let key = Preset::Shopify.key_from();
    let names = key.headers().unwrap();
    for v in [newer, older] {
        let h = headers(v);
        let found: Vec<_> = names.iter().filter_map(|n| h.get(n)).collect();
        assert_eq!(found.len(), 1, "{:?}", v.headers);
        assert_eq!(found[0], "98880550-7158-44d4-b7cd-2c97c8a091b5");
    }
}
