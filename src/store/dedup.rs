//! The consumer-dedup half of the storage contract: [`DedupStore`] and the
//! types its calls take and answer with. The rules themselves are pure
//! ([`crate::idempotency::dedup`]); a backend applies them atomically per
//! key on its own clock.

use std::time::Duration;

use super::error::{StoreError, StoreFuture};
use crate::idempotency::dedup::{ClaimOutcome, ClaimParams, DedupRecord, ReleaseOutcome};
use crate::idempotency::key::hex;
use crate::idempotency::lease::LeaseId;

/// How long records live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ttls {
    /// Leased, pending and completed records (a complete call may override).
    pub retention: Duration,
    /// Dead letters.
    pub failed_retention: Duration,
}

/// A record as `GET keys/{key}` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Inspected {
    pub record: DedupRecord,
    pub expires_in: Option<Duration>,
    /// The store's clock when read, to turn lease ends into "expires in".
    pub now_ms: u64,
}

/// One dead letter.
#[derive(Debug, Clone, PartialEq)]
pub struct FailedItem {
    pub key: String,
    pub attempts: u32,
    pub error: Option<String>,
    pub failed_at_ms: u64,
}

/// Where a dead-letter listing resumes: after this (failed_at_ms, key).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor {
    pub failed_at_ms: u64,
    pub key: String,
}

impl Cursor {
    /// Opaque text form: `<ms>.<hex of key>`.
    pub fn encode(&self) -> String {
        format!("{}.{}", self.failed_at_ms, hex(self.key.as_bytes()))
    }

    pub fn decode(s: &str) -> Option<Self> {
        let (ms, hexed) = s.split_once('.')?;
        let bytes = (0..hexed.len())
            .step_by(2)
            .map(|i| {
                hexed
                    .get(i..i + 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
            })
            .collect::<Option<Vec<u8>>>()?;
        Some(Cursor {
            failed_at_ms: ms.parse().ok()?,
            key: String::from_utf8(bytes).ok()?,
        })
    }
}

/// One item of `claim:batch`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimItem {
    pub key: String,
    pub params: ClaimParams,
}

/// One item of `complete:batch`.
#[derive(Debug, Clone, PartialEq)]
pub struct CompleteItem {
    pub key: String,
    pub lease_id: LeaseId,
    pub result: Option<String>,
    pub retention: Duration,
}

/// Storage for consumer dedup, one scope at a time. Scopes never see each
/// other's keys. Every transition is atomic per key and uses the store's
/// clock.
pub trait DedupStore: Send + Sync + 'static {
    /// `true` if the key was new (now marked for `ttl`), `false` if seen.
    fn mark<'a>(&'a self, scope: &'a str, key: &'a str, ttl: Duration) -> StoreFuture<'a, bool>;

    fn claim<'a>(
        &'a self,
        scope: &'a str,
        key: &'a str,
        p: &'a ClaimParams,
        ttls: Ttls,
    ) -> StoreFuture<'a, ClaimOutcome>;

    /// The lease's new "expires in", or `None` if the lease was lost.
    fn extend<'a>(
        &'a self,
        scope: &'a str,
        key: &'a str,
        lease_id: LeaseId,
        lease_ms: u64,
    ) -> StoreFuture<'a, Option<u64>>;

    /// `true` if recorded (or already recorded by this lease), `false` if the
    /// lease was lost.
    fn complete<'a>(
        &'a self,
        scope: &'a str,
        key: &'a str,
        lease_id: LeaseId,
        result: Option<String>,
        retention: Duration,
    ) -> StoreFuture<'a, bool>;

    /// `true` if released, `false` if the lease was lost.
    fn release<'a>(
        &'a self,
        scope: &'a str,
        key: &'a str,
        lease_id: LeaseId,
        outcome: ReleaseOutcome,
        error: Option<String>,
        ttls: Ttls,
    ) -> StoreFuture<'a, bool>;

    fn inspect<'a>(&'a self, scope: &'a str, key: &'a str) -> StoreFuture<'a, Option<Inspected>>;

    /// Deletes the record whatever its state; `false` if there was none.
    fn delete<'a>(&'a self, scope: &'a str, key: &'a str) -> StoreFuture<'a, bool>;

    /// Dead letters, oldest first, after `after`; and where the next page
    /// starts, if there is one.
    fn list_failed<'a>(
        &'a self,
        scope: &'a str,
        limit: usize,
        after: Option<Cursor>,
    ) -> StoreFuture<'a, (Vec<FailedItem>, Option<Cursor>)>;

    /// Deletes every dead letter of the scope; how many.
    fn purge_failed<'a>(&'a self, scope: &'a str) -> StoreFuture<'a, u64>;

    /// Claims many keys; one answer per item, in order. Backends with round
    /// trips pipeline them.
    fn claim_batch<'a>(
        &'a self,
        scope: &'a str,
        items: &'a [ClaimItem],
        ttls: Ttls,
    ) -> StoreFuture<'a, Vec<Result<ClaimOutcome, StoreError>>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(items.len());
            for it in items {
                out.push(self.claim(scope, &it.key, &it.params, ttls).await);
            }
            Ok(out)
        })
    }

    fn complete_batch<'a>(
        &'a self,
        scope: &'a str,
        items: &'a [CompleteItem],
    ) -> StoreFuture<'a, Vec<Result<bool, StoreError>>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(items.len());
            for it in items {
                out.push(
                    self.complete(scope, &it.key, it.lease_id, it.result.clone(), it.retention)
                        .await,
                );
            }
            Ok(out)
        })
    }

    fn mark_batch<'a>(
        &'a self,
        scope: &'a str,
        items: &'a [(String, Duration)],
    ) -> StoreFuture<'a, Vec<Result<bool, StoreError>>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(items.len());
            for (key, ttl) in items {
                out.push(self.mark(scope, key, *ttl).await);
            }
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_any_key() {
        for key in ["a", "with.dots.and/slashes", "ünïcödé", ""] {
            let c = Cursor {
                failed_at_ms: 1_700_000_000_123,
                key: key.into(),
            };
            assert_eq!(Cursor::decode(&c.encode()), Some(c));
        }
        assert_eq!(Cursor::decode("nope"), None);
        assert_eq!(Cursor::decode("12.zz"), None);
        assert_eq!(Cursor::decode("x.61"), None);
    }
}
