//! How records are written to and read from a store: encoded
//! ([`CompletedRecord::encode`]) and, with `[store.encryption]`, sealed
//! ([`crate::idempotency::seal`]) with the record key's hash as associated
//! data. Consumer-dedup results are sealed the same way, as text.
//!
//! Reading never serves what it cannot trust: bytes that do not open (a
//! tampered record, one copied from another key, one sealed with a key no
//! longer configured, plaintext while encryption is on) are a miss, counted
//! in `idemgate_record_decode_errors_total` and logged, never a panic.

use std::borrow::Cow;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;

use crate::idempotency::dedup::DedupRecord;
use crate::idempotency::key::RecordKey;
use crate::idempotency::record::CompletedRecord;
use crate::idempotency::seal::Keyring;

/// Prefix of a sealed dedup result (base64 of the envelope follows).
const SEALED_TEXT: &str = "sealed:";

/// The store's record codec. Cheap to clone.
#[derive(Clone, Default)]
pub struct Sealing {
    keyring: Option<Arc<Keyring>>,
    decode_errors: Option<prometheus::IntCounter>,
}

/// Keys are secret: only whether sealing is on.
impl std::fmt::Debug for Sealing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealing")
            .field("encrypted", &self.is_on())
            .finish()
    }
}

impl Sealing {
    /// Seals with `keyring` when given; counts unreadable records in
    /// `decode_errors`.
    pub fn new(keyring: Option<Keyring>, decode_errors: Option<prometheus::IntCounter>) -> Self {
        Sealing {
            keyring: keyring.map(Arc::new),
            decode_errors,
        }
    }

    pub fn is_on(&self) -> bool {
        self.keyring.is_some()
    }

    /// The bytes to store for `record` under `key`.
    pub fn encode(&self, key: &RecordKey, record: &CompletedRecord) -> Vec<u8> {
        let plain = record.encode_vec();
        match &self.keyring {
            Some(k) => k.seal(&key.0, &plain),
            None => plain,
        }
    }

    /// The record stored as `bytes` under `key`, or `None` (a miss).
    pub fn decode(&self, key: &RecordKey, bytes: &[u8]) -> Option<CompletedRecord> {
        self.decode_parts(key, &[bytes])
    }

    /// The record stored in `parts` (one record's bytes, in order), or
    /// `None`: several parts are joined in the one copy decoding makes
    /// anyway.
    pub fn decode_parts(&self, key: &RecordKey, parts: &[&[u8]]) -> Option<CompletedRecord> {
        let stored: Cow<'_, [u8]> = match parts {
            [one] => Cow::Borrowed(one),
            _ => Cow::Owned(parts.concat()),
        };
        let plain = match &self.keyring {
            Some(k) => match k.open(&key.0, &stored) {
                Ok(p) => Bytes::from(p),
                Err(e) => return self.unreadable(key, &e),
            },
            None => Bytes::from(stored.into_owned()),
        };
        CompletedRecord::decode(plain)
            .map_err(|e| self.unreadable::<()>(key, &e))
            .ok()
    }

    /// A dedup `result` as stored.
    pub fn seal_text(&self, key: &RecordKey, text: String) -> String {
        match &self.keyring {
            Some(k) => {
                let sealed = k.seal(&key.0, text.as_bytes());
                format!(
                    "{SEALED_TEXT}{}",
                    base64::engine::general_purpose::STANDARD.encode(sealed)
                )
            }
            None => text,
        }
    }

    /// A stored dedup `result` as the caller gave it; `None` if it does not
    /// open (counted like a record).
    pub fn open_text(&self, key: &RecordKey, stored: String) -> Option<String> {
        let Some(k) = &self.keyring else {
            return Some(stored);
        };
        let sealed = stored
            .strip_prefix(SEALED_TEXT)
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok());
        let opened = sealed
            .ok_or("not sealed")
            .and_then(|s| k.open(&key.0, &s).map_err(|_| "does not open"))
            .and_then(|p| String::from_utf8(p).map_err(|_| "not text"));
        match opened {
            Ok(text) => Some(text),
            Err(e) => self.unreadable(key, &e),
        }
    }

    /// A dedup record with its result opened.
    pub fn open_record(&self, key: &RecordKey, record: DedupRecord) -> DedupRecord {
        match record {
            DedupRecord::Completed {
                result,
                completed_at_ms,
                attempts,
                lease_id,
                fingerprint,
            } => DedupRecord::Completed {
                result: result.and_then(|r| self.open_text(key, r)),
                completed_at_ms,
                attempts,
                lease_id,
                fingerprint,
            },
            other => other,
        }
    }

    fn unreadable<T>(&self, key: &RecordKey, why: &dyn std::fmt::Display) -> Option<T> {
        if let Some(c) = &self.decode_errors {
            c.inc();
        }
        tracing::warn!(record = %key.to_hex(), error = %why, "unreadable record treated as a miss");
        None
    }
}
