//! The webhook signature headers: any header text gives candidates or
//! `None`, never a panic and never more than MAX_SIGNATURES candidates; a
//! whole check on arbitrary headers and body refuses without panicking.
#![no_main]

use std::time::Duration;

use http::{HeaderMap, HeaderValue};
use idemgate::webhook::parse::{self, MAX_SIGNATURES};
use idemgate::webhook::{Preset, Verifier};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let _ = parse::github(&text);
    let _ = parse::slack(&text);
    let _ = parse::shopify(&text);
    let _ = parse::timestamp(&text);
    let _ = parse::standard_secret(&text);
    if let Some(h) = parse::stripe(&text) {
        assert!(h.tags.len() <= MAX_SIGNATURES);
    }
    if let Some(tags) = parse::standard(&text) {
        assert!(tags.len() <= MAX_SIGNATURES);
    }

    let (preset, _) = Preset::ALL[usize::from(which) % Preset::ALL.len()];
    let preset = Preset::ALL.iter().find(|(n, _)| *n == preset).unwrap().1;
    let Ok(value) = HeaderValue::from_bytes(rest) else {
        return;
    };
    let mut headers = HeaderMap::new();
    for name in [
        "x-hub-signature-256",
        "stripe-signature",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "x-shopify-hmac-sha256",
        "x-slack-signature",
        "x-slack-request-timestamp",
    ] {
        headers.insert(name, value.clone());
    }
    let verifier = Verifier {
        preset,
        secrets: vec![preset.secret("whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQ=").unwrap()],
        tolerance: Duration::from_secs(300),
    };
    let _ = verifier.verify(&headers, rest, 1_764_300_000);
});
