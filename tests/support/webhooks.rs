//! Signing webhook deliveries as each provider does, for end-to-end tests.
//! The checks themselves are tested against the providers' own signatures
//! (`src/webhook/tests.rs`); this signer lets tests make fresh ones (new
//! timestamps for redeliveries) and forged ones.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

fn mac(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).unwrap();
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().to_vec()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The headers a provider sends with `body` for delivery `id`, signed with
/// `secret` at `at` (Unix seconds). For the JSON-keyed providers (Stripe,
/// Slack) the id must also be in the body; the caller puts it there.
pub fn sign(preset: &str, secret: &str, id: &str, body: &str, at: i64) -> Vec<(String, String)> {
    let b = body.as_bytes();
    let ts = at.to_string();
    let h = |k: &str, v: String| (k.to_owned(), v);
    match preset {
        "github" => vec![
            h("x-github-delivery", id.into()),
            h("x-github-event", "push".into()),
            h(
                "x-hub-signature-256",
                format!("sha256={}", hex(&mac(secret.as_bytes(), &[b]))),
            ),
        ],
        "stripe" => {
            let sig = hex(&mac(secret.as_bytes(), &[ts.as_bytes(), b".", b]));
            vec![h("stripe-signature", format!("t={ts},v1={sig}"))]
        }
        "standard-webhooks" => {
            let key = base64::engine::general_purpose::STANDARD
                .decode(secret.strip_prefix("whsec_").unwrap())
                .unwrap();
            let sig = b64(&mac(&key, &[id.as_bytes(), b".", ts.as_bytes(), b".", b]));
            vec![
                h("webhook-id", id.into()),
                h("webhook-timestamp", ts),
                h("webhook-signature", format!("v1,{sig}")),
            ]
        }
        "shopify" => vec![
            h("x-shopify-event-id", id.into()),
            h("x-shopify-topic", "orders/create".into()),
            h("x-shopify-hmac-sha256", b64(&mac(secret.as_bytes(), &[b]))),
        ],
        "slack" => {
            let sig = hex(&mac(secret.as_bytes(), &[b"v0:", ts.as_bytes(), b":", b]));
            vec![
                h("x-slack-request-timestamp", ts),
                h("x-slack-signature", format!("v0={sig}")),
            ]
        }
        other => panic!("no preset {other}"),
    }
}

/// A body for delivery `id` of `preset`: the JSON-keyed providers carry the
/// id inside; `n` makes two bodies of one id differ in an incidental field
/// (as a provider's retry may).
pub fn body(preset: &str, id: &str, n: u32) -> String {
    match preset {
        "stripe" => format!(
            r#"{{"id":"{id}","object":"event","type":"charge.succeeded","pending_webhooks":{n}}}"#
        ),
        "slack" => format!(r#"{{"type":"event_callback","event_id":"{id}","event_time":{n}}}"#),
        _ => format!(r#"{{"action":"opened","attempt":{n}}}"#),
    }
}
