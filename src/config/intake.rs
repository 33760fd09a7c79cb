//! A route's intake: where its key comes from (`key_from`, or the older
//! `header`), and for webhook routes the provider (`preset`), its secrets
//! and the signature tolerance.
//!
//! ```toml
//! [[routes]]
//! path = "/webhooks/github"
//! preset = "github"
//! secrets = [{ env = "GITHUB_WEBHOOK_SECRET" }, { file = "/run/secrets/gh" }]
//! ```

use http::Method;
use toml::Value;

use super::defaults::SIGNATURE_TOLERANCE;
use super::file::PolicyFile;
use super::routes::Policy;
use super::routes::WebhookCheck;
use crate::checker::Checker;
use crate::idempotency::key_from::KeyFrom;
use crate::webhook::{Preset, Verifier};

/// What a preset never stores: 408, 429 and every registered 5xx.
const WEBHOOK_UNCACHEABLE: [u16; 14] = [
    408, 429, 500, 501, 502, 503, 504, 505, 506, 507, 508, 509, 510, 511,
];

impl Checker {
    /// A route's `preset`, with the defaults it sets: first, so the
    /// route's own keys override them.
    pub(super) fn preset(&mut self, at: &str, f: &PolicyFile, p: &mut Policy) -> Option<Preset> {
        let k = |name: &str| format!("{at}.{name}");
        let mut preset = None;
        if at == "idempotency" && f.preset.is_some() {
            self.err(&k("preset"), "only [[routes]] entries take a preset".into());
        } else {
            self.set(&mut preset, &f.preset, &k("preset"), |c, path, v| {
                Checker::one_of(Preset::ALL)(c, path, v).map(Some)
            });
        }
        if let Some(preset) = preset {
            p.key_from = preset.key_from();
            p.methods = vec![Method::POST];
            p.fingerprint_body = false;
            // A server failure is not the event's answer: the provider's
            // next retry must run it (502 and 504 stay unknown outcomes).
            p.uncacheable_statuses = WEBHOOK_UNCACHEABLE.to_vec();
        }
        preset
    }

    /// The route's own `key_from` or `header`, `fingerprint_body`, and the
    /// signature check of its `preset`: last, once the other keys are set.
    pub(super) fn intake(
        &mut self,
        at: &str,
        f: &PolicyFile,
        p: &mut Policy,
        preset: Option<Preset>,
    ) {
        let k = |name: &str| format!("{at}.{name}");
        match (&f.header, &f.key_from) {
            (Some(_), Some(_)) => {
                self.err(&k("key_from"), "give key_from or header, not both".into())
            }
            (Some(_), None) => self.set(&mut p.key_from, &f.header, &k("header"), |c, path, v| {
                Checker::header_name(c, path, v).map(KeyFrom::header_named)
            }),
            (None, _) => self.set(
                &mut p.key_from,
                &f.key_from,
                &k("key_from"),
                |c, path, v| {
                    let s = c.string(path, v)?;
                    KeyFrom::parse(s.trim()).map_err(|e| c.err(path, e)).ok()
                },
            ),
        }
        self.set(
            &mut p.fingerprint_body,
            &f.fingerprint_body,
            &k("fingerprint_body"),
            Checker::bool,
        );
        if p.key_from == KeyFrom::BodySha256 {
            if p.max_key_length < 64 {
                self.err(
                    &k("max_key_length"),
                    "must be at least 64 with key_from = \"body-sha256\" (the key is 64 hex digits)".into(),
                );
            }
            self.warn(
                &k("key_from"),
                "\"body-sha256\" makes requests with identical bodies one request: a second, \
                 genuinely new event with the same body gets the first one's response"
                    .into(),
            );
        }
        let mut tolerance = SIGNATURE_TOLERANCE;
        self.set(
            &mut tolerance,
            &f.signature_tolerance,
            &k("signature_tolerance"),
            Checker::duration,
        );
        p.webhook = match (preset, &f.secrets) {
            (Some(preset), Some(v)) => {
                self.secrets(&k("secrets"), preset, v)
                    .map(|(secrets, sources)| WebhookCheck {
                        verifier: Verifier {
                            preset,
                            secrets,
                            tolerance,
                        },
                        sources,
                    })
            }
            (Some(_), None) => {
                self.err(
                    &k("secrets"),
                    "is required with a preset: the signature is checked before any state is taken"
                        .into(),
                );
                None
            }
            (None, Some(_)) => {
                self.err(
                    &k("secrets"),
                    "needs a preset naming the signature scheme".into(),
                );
                None
            }
            (None, None) => {
                if f.signature_tolerance.is_some() {
                    self.err(&k("signature_tolerance"), "needs a preset".into());
                }
                None
            }
        };
    }

    /// `secrets = [{ env = "..." }, { file = "..." }]`: at least one; any
    /// may match a delivery (rotation).
    fn secrets(
        &mut self,
        at: &str,
        preset: Preset,
        v: &Value,
    ) -> Option<(
        Vec<crate::webhook::Secret>,
        Vec<super::encryption::KeySource>,
    )> {
        let items = self.list(at, v)?;
        if items.is_empty() {
            self.err(at, "needs at least one secret".into());
            return None;
        }
        let (mut secrets, mut sources) = (Vec::new(), Vec::new());
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let at = format!("{at}[{i}]");
            let Value::Table(t) = item else {
                self.err(
                    &at,
                    "must be { env = \"NAME\" } or { file = \"/path\" }".into(),
                );
                ok = false;
                continue;
            };
            if let Some(other) = t.keys().find(|k| *k != "env" && *k != "file") {
                self.err(
                    &format!("{at}.{other}"),
                    "is not a key of a secret (env or file)".into(),
                );
                ok = false;
                continue;
            }
            let Some((source, text)) = self.secret_source(&at, t) else {
                ok = false;
                continue;
            };
            match preset.secret(&text) {
                Ok(s) => {
                    secrets.push(s);
                    sources.push(source);
                }
                Err(why) => {
                    // Never the secret itself: only where it came from.
                    self.err(&at, format!("the secret {why}"));
                    ok = false;
                }
            }
        }
        ok.then_some((secrets, sources))
    }
}
