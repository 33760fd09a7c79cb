//! The fair-share buckets of the storage contract: [`BucketStore`], one
//! token bucket per caller scope ([`crate::idempotency::rate`]), kept in
//! the store so every replica draws from the same bucket.

use std::time::Duration;

use super::error::StoreFuture;
use crate::idempotency::key::RecordKey;
use crate::idempotency::rate::Rate;

/// Where the fair-share buckets live.
pub trait BucketStore: Send + Sync + 'static {
    /// Takes one token from the fair-share bucket of the caller `scope`
    /// (see [`crate::idempotency::rate`]): `Err(wait)` when it is empty.
    fn admit<'a>(
        &'a self,
        scope: &'a RecordKey,
        rate: Rate,
    ) -> StoreFuture<'a, Result<(), Duration>>;
}
