//! Webhook intake: the providers idemgate knows (`preset`), and checking a
//! delivery's signature before any state is taken.
//!
//! Why the check comes first: a delivery's id is no secret (it travels in
//! headers and logs), so without it anyone who learns or guesses an id
//! could send a forged delivery first, and idemgate would answer the real
//! one with the forger's stored response: the real event would be lost.
//!
//! Every scheme is HMAC-SHA256 over the provider's signed content; tags
//! are compared in constant time (`hmac`'s `verify_slice`), every secret
//! is tried (rotation), and a timestamp outside the tolerance is refused
//! before any MAC is computed. Each provider's signature header is read
//! in [`parse`].

pub mod parse;

use std::time::Duration;

use hmac::{Hmac, Mac};
use http::HeaderMap;
use sha2::Sha256;

use crate::idempotency::key_from::KeyFrom;
use parse::Tag;

type HmacSha256 = Hmac<Sha256>;

/// A webhook provider whose delivery ids and signatures idemgate knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    Github,
    Stripe,
    StandardWebhooks,
    Shopify,
    Slack,
}

impl Preset {
    /// Config names, for `preset = "..."`.
    pub const ALL: &'static [(&'static str, Preset)] = &[
        ("github", Preset::Github),
        ("stripe", Preset::Stripe),
        ("standard-webhooks", Preset::StandardWebhooks),
        ("shopify", Preset::Shopify),
        ("slack", Preset::Slack),
    ];

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, p)| *p == self)
            .map_or("?", |(n, _)| n)
    }

    /// Where the provider puts the id that is the same on every retry of
    /// one event (see the README's table for the sources).
    pub fn key_from(self) -> KeyFrom {
        let parse = |s: &str| KeyFrom::parse(s).expect("preset key sources parse");
        match self {
            Preset::Github => parse("header:x-github-delivery"),
            Preset::Stripe => parse("json:/id"),
            Preset::StandardWebhooks => parse("header:webhook-id"),
            // Shopify's library accepts both spellings (`ShopifyHeader` and
            // the newer `ShopifyEventsHeader`); the event id is the same on
            // every delivery of one event.
            Preset::Shopify => parse("header:x-shopify-event-id|shopify-event-id"),
            Preset::Slack => parse("json:/event_id"),
        }
    }

    /// Whether the provider signs a timestamp (so stale deliveries can be
    /// refused).
    pub fn signs_timestamp(self) -> bool {
        matches!(
            self,
            Preset::Stripe | Preset::StandardWebhooks | Preset::Slack
        )
    }

    /// The secret's bytes as the provider's scheme uses them: Standard
    /// Webhooks secrets are `whsec_` + base64 of the key; the others are
    /// used as written.
    pub fn secret(self, text: &str) -> Result<Secret, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("is empty".into());
        }
        match self {
            Preset::StandardWebhooks => parse::standard_secret(text)
                .map(Secret)
                .ok_or_else(|| "is not a Standard Webhooks secret (whsec_ and base64)".into()),
            _ => Ok(Secret(text.as_bytes().to_vec())),
        }
    }
}

/// A signing secret's bytes: never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Why a delivery's signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the {0} header is missing")]
    Missing(&'static str),
    #[error("the {0} header is malformed or sent more than once")]
    Malformed(&'static str),
    #[error(
        "the signed timestamp is {skew_secs}s from now, outside the {tolerance_secs}s tolerance"
    )]
    Stale { skew_secs: i64, tolerance_secs: u64 },
    #[error("no signature matches a configured secret")]
    Mismatch,
}

impl SignatureError {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            SignatureError::Missing(_) => "missing",
            SignatureError::Malformed(_) => "malformed",
            SignatureError::Stale { .. } => "stale",
            SignatureError::Mismatch => "mismatch",
        }
    }
}

/// A route's signature check: the scheme, its secrets (any may match) and
/// how far a signed timestamp may be from now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verifier {
    pub preset: Preset,
    pub secrets: Vec<Secret>,
    pub tolerance: Duration,
}

const GITHUB_SIG: &str = "x-hub-signature-256";
const STRIPE_SIG: &str = "stripe-signature";
const STANDARD_ID: &str = "webhook-id";
const STANDARD_TS: &str = "webhook-timestamp";
const STANDARD_SIG: &str = "webhook-signature";
const SHOPIFY_SIG: &str = "x-shopify-hmac-sha256";
/// The same header in Shopify's newer form (without `X-`), which its own
/// library accepts as well; `Missing` and `Malformed` name both.
const SHOPIFY_SIG_NEW: &str = "shopify-hmac-sha256";
const SHOPIFY_SIGS: &str = "x-shopify-hmac-sha256 (or shopify-hmac-sha256)";
const SLACK_SIG: &str = "x-slack-signature";
const SLACK_TS: &str = "x-slack-request-timestamp";

impl Verifier {
    /// Checks a delivery: its signature header(s) against `body`, and its
    /// signed timestamp (if the scheme has one) against `now_unix` seconds.
    pub fn verify(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now_unix: i64,
    ) -> Result<(), SignatureError> {
        match self.preset {
            Preset::Github => {
                let tag = parse::github(one(headers, GITHUB_SIG)?)
                    .ok_or(SignatureError::Malformed(GITHUB_SIG))?;
                self.check(&[body], &[tag])
            }
            Preset::Shopify => {
                let value = match (
                    headers.contains_key(SHOPIFY_SIG),
                    headers.contains_key(SHOPIFY_SIG_NEW),
                ) {
                    (true, true) => return Err(SignatureError::Malformed(SHOPIFY_SIGS)),
                    (false, true) => one(headers, SHOPIFY_SIG_NEW),
                    (_, false) => one(headers, SHOPIFY_SIG),
                }
                .map_err(|e| match e {
                    SignatureError::Missing(_) => SignatureError::Missing(SHOPIFY_SIGS),
                    _ => SignatureError::Malformed(SHOPIFY_SIGS),
                })?;
                let tag = parse::shopify(value).ok_or(SignatureError::Malformed(SHOPIFY_SIGS))?;
                self.check(&[body], &[tag])
            }
            Preset::Stripe => {
                let h = parse::stripe(one(headers, STRIPE_SIG)?)
                    .ok_or(SignatureError::Malformed(STRIPE_SIG))?;
                self.fresh(h.t, now_unix)?;
                self.check(&[h.t_text.as_bytes(), b".", body], &h.tags)
            }
            Preset::StandardWebhooks => {
                let id = one(headers, STANDARD_ID)?;
                let ts_text = one(headers, STANDARD_TS)?;
                let ts = parse::timestamp(ts_text).ok_or(SignatureError::Malformed(STANDARD_TS))?;
                let tags = parse::standard(one(headers, STANDARD_SIG)?)
                    .ok_or(SignatureError::Malformed(STANDARD_SIG))?;
                self.fresh(ts, now_unix)?;
                self.check(
                    &[id.as_bytes(), b".", ts_text.as_bytes(), b".", body],
                    &tags,
                )
            }
            Preset::Slack => {
                let ts_text = one(headers, SLACK_TS)?;
                let ts = parse::timestamp(ts_text).ok_or(SignatureError::Malformed(SLACK_TS))?;
                let tag = parse::slack(one(headers, SLACK_SIG)?)
                    .ok_or(SignatureError::Malformed(SLACK_SIG))?;
                self.fresh(ts, now_unix)?;
                self.check(&[b"v0:", ts_text.as_bytes(), b":", body], &[tag])
            }
        }
    }

    fn fresh(&self, signed_at: i64, now: i64) -> Result<(), SignatureError> {
        let skew = now.saturating_sub(signed_at);
        let tolerance = self.tolerance.as_secs();
        if skew.unsigned_abs() > tolerance {
            return Err(SignatureError::Stale {
                skew_secs: skew,
                tolerance_secs: tolerance,
            });
        }
        Ok(())
    }

    /// One MAC per secret over the signed content, each tag compared in
    /// constant time.
    fn check(&self, signed: &[&[u8]], tags: &[Tag]) -> Result<(), SignatureError> {
        for secret in &self.secrets {
            // HMAC takes keys of any length: this cannot fail.
            let Ok(mut mac) = HmacSha256::new_from_slice(&secret.0) else {
                continue;
            };
            for part in signed {
                mac.update(part);
            }
            if tags.iter().any(|t| mac.clone().verify_slice(t).is_ok()) {
                return Ok(());
            }
        }
        Err(SignatureError::Mismatch)
    }
}

/// The one value of a header: missing, repeated or non-text is refused.
fn one<'h>(headers: &'h HeaderMap, name: &'static str) -> Result<&'h str, SignatureError> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (None, _) => Err(SignatureError::Missing(name)),
        (Some(v), None) => v.to_str().map_err(|_| SignatureError::Malformed(name)),
        (Some(_), Some(_)) => Err(SignatureError::Malformed(name)),
    }
}

#[cfg(test)]
mod tests;
