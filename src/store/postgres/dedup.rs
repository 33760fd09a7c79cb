//! Consumer dedup on PostgreSQL: the rules of [`crate::idempotency::dedup`]
//! as the `dedup_*` functions of `schema.sql`, one call per transition, on
//! the server's clock, fences from one sequence.
//!
//! Keys, fingerprints, workers, results and errors are stored as `bytea`:
//! they are whatever text the caller sent, and PostgreSQL's `text` refuses
//! a NUL that JSON allows. Batches are pipelined on one connection.

use std::time::Duration;

use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::db::{col, malformed, ms};
use super::store::PostgresStore;
use crate::idempotency::dedup::{ClaimOutcome, ClaimParams, DedupRecord, ReleaseOutcome};
use crate::idempotency::key::RecordKey;
use crate::idempotency::lease::LeaseId;
use crate::store::dedup::{
    ClaimItem, CompleteItem, Cursor, DedupStore, FailedItem, Inspected, Ttls,
};
use crate::store::error::{StoreError, StoreFuture};

/// Text stored as bytes, read back (it went in as a `String`).
fn text(b: Option<Vec<u8>>) -> Option<String> {
    b.map(|b| String::from_utf8_lossy(&b).into_owned())
}

fn unsigned(v: Option<i64>) -> Result<u64, StoreError> {
    v.and_then(|n| u64::try_from(n).ok())
        .ok_or_else(|| malformed("the store (dedup)"))
}

fn count(v: Option<i32>) -> u32 {
    v.and_then(|n| u32::try_from(n).ok()).unwrap_or(0)
}

fn bytes(s: &Option<String>) -> Option<&[u8]> {
    s.as_deref().map(str::as_bytes)
}

/// A claim's statement arguments, owned so a batch can borrow them all.
struct ClaimArgs {
    key: Vec<u8>,
    lease_id: LeaseId,
    lid: String,
    lease_ms: i64,
    fp: Option<Vec<u8>>,
    max_attempts: i32,
    worker: Option<Vec<u8>>,
    keep_ms: i64,
    failed_ms: i64,
}

impl ClaimArgs {
    fn new(key: &str, p: &ClaimParams, ttls: Ttls) -> Self {
        let lease_id = LeaseId::random();
        let lease = Duration::from_millis(p.lease_ms);
        ClaimArgs {
            key: key.as_bytes().to_vec(),
            lease_id,
            lid: lease_id.to_string(),
            lease_ms: ms(lease),
            fp: bytes(&p.fingerprint).map(<[u8]>::to_vec),
            max_attempts: i32::try_from(p.max_attempts).unwrap_or(i32::MAX),
            worker: bytes(&p.worker).map(<[u8]>::to_vec),
            keep_ms: ms(ttls.retention.max(lease)),
            failed_ms: ms(ttls.failed_retention),
        }
    }

    fn params<'a>(&'a self, scope: &'a &'a str) -> Vec<&'a (dyn ToSql + Sync)> {
        vec![
            scope as &(dyn ToSql + Sync),
            &self.key,
            &self.lid,
            &self.lease_ms,
            &self.fp,
            &self.max_attempts,
            &self.worker,
            &self.keep_ms,
            &self.failed_ms,
        ]
    }
}

impl PostgresStore {
    /// A claim's answer row as an outcome.
    fn claim_outcome(
        &self,
        scope: &str,
        key: &str,
        args: &ClaimArgs,
        row: Option<Row>,
    ) -> Result<ClaimOutcome, StoreError> {
        let row = row.ok_or_else(|| malformed("claim"))?;
        let kind: String = col(&row, 0)?;
        Ok(match kind.as_str() {
            "acquired" => ClaimOutcome::Acquired {
                lease_id: args.lease_id,
                fence: unsigned(col(&row, 1)?)?,
                attempt: count(col(&row, 2)?),
                lease_expires_in_ms: u64::try_from(args.lease_ms).unwrap_or(0),
                recovered: col::<Option<bool>>(&row, 3)?.unwrap_or(false),
            },
            "completed" => ClaimOutcome::Completed {
                result: text(col(&row, 4)?).and_then(|r| {
                    let rk = RecordKey::derive_dedup(scope, key);
                    self.inner.sealing.open_text(&rk, r)
                }),
                completed_at_ms: unsigned(col(&row, 6)?)?,
            },
            "failed" | "failed_new" => ClaimOutcome::Failed {
                error: text(col(&row, 5)?),
                attempts: count(col(&row, 2)?),
            },
            "in_progress" => ClaimOutcome::InProgress {
                retry_after_ms: unsigned(col(&row, 7)?)?,
            },
            "mismatch" => ClaimOutcome::Mismatch,
            _ => return Err(malformed("claim")),
        })
    }

    /// A row of `dedup_inspect` as a record.
    fn inspected(&self, scope: &str, key: &str, row: &Row) -> Result<Inspected, StoreError> {
        let state: i8 = col(row, 0)?;
        let lease_id = || {
            col::<Option<String>>(row, 1)
                .ok()
                .flatten()
                .and_then(|l| l.parse::<LeaseId>().ok())
                .ok_or_else(|| malformed("inspect (lease id)"))
        };
        let fence = col::<Option<i64>>(row, 2)?
            .and_then(|f| u64::try_from(f).ok())
            .unwrap_or(0);
        let attempts = count(col(row, 3)?);
        let record = match state as u8 {
            b'l' => DedupRecord::Leased {
                lease_id: lease_id()?,
                fence,
                attempt: attempts,
                lease_until_ms: unsigned(col(row, 4)?)?,
                fingerprint: text(col(row, 5)?),
                worker: text(col(row, 6)?),
            },
            b'p' => DedupRecord::Pending {
                attempts,
                fence,
                error: text(col(row, 8)?),
                fingerprint: text(col(row, 5)?),
            },
            b'c' => DedupRecord::Completed {
                result: text(col(row, 7)?).and_then(|r| {
                    let rk = RecordKey::derive_dedup(scope, key);
                    self.inner.sealing.open_text(&rk, r)
                }),
                completed_at_ms: unsigned(col(row, 9)?)?,
                attempts,
                lease_id: lease_id()?,
                fingerprint: text(col(row, 5)?),
            },
            b'f' => DedupRecord::Failed {
                error: text(col(row, 8)?),
                attempts,
                failed_at_ms: unsigned(col(row, 9)?)?,
                fence,
            },
            b'm' => DedupRecord::Marked {
                marked_at_ms: unsigned(col(row, 9)?)?,
            },
            _ => return Err(malformed("inspect")),
        };
        let left: i64 = col(row, 10)?;
        Ok(Inspected {
            record,
            expires_in: Some(Duration::from_millis(u64::try_from(left).unwrap_or(0))),
            now_ms: unsigned(col(row, 11)?)?,
        })
    }

    /// A result as stored: sealed when encryption is on.
    fn sealed_result(&self, scope: &str, key: &str, result: Option<String>) -> Option<Vec<u8>> {
        result.map(|r| {
            let rk = RecordKey::derive_dedup(scope, key);
            self.inner.sealing.seal_text(&rk, r).into_bytes()
        })
    }
}

impl DedupStore for PostgresStore {
    fn mark<'a>(&'a self, scope: &'a str, key: &'a str, ttl: Duration) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            self.flag(
                &self.inner.sql.dedup_mark,
                &[&scope, &key.as_bytes(), &ms(ttl)],
            )
            .await
        })
    }

    fn claim<'a>(
        &'a self,
        scope: &'a str,
        key: &'a str,
        p: &'a ClaimParams,
        ttls: Ttls,
    ) -> StoreFuture<'a, ClaimOutcome> {
        Box::pin(async move {
            let args = ClaimArgs::new(key, p, ttls);
            let row = self
                .row(&self.inner.sql.dedup_claim, &args.params(&scope))
                .await?;
            self.claim_outcome(scope, key, &args, row)
        })
    }

    fn extend<'a>(
        &'a self,
        scope: &'a str,
        key: &'a str,
        lease_id: LeaseId,
        lease_ms: u64,
    ) -> StoreFuture<'a, Option<u64>> {
        Box::pin(async move {
            let lid = lease_id.to_string();
            let ms = ms(Duration::from_millis(lease_ms));
            let kept = self
                .flag(
                    &self.inner.sql.dedup_extend,
                    &[&scope, &key.as_bytes(), &lid, &ms],
                )
                .await?;
            Ok(kept.then_some(lease_ms))
        })
    }

    fn complete<'a>(
        &'a self,
        scope: &'a str,
        key: &'a str,
        lease_id: LeaseId,
        result: Option<String>,
        retention: Duration,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let lid = lease_id.to_string();
            let res = self.sealed_result(scope, key, result);
            self.flag(
                &self.inner.sql.dedup_complete,
                &[&scope, &key.as_bytes(), &lid, &res, &ms(retention)],
            )
            .await
        })
    }

    fn release<'a>(
        &'a self,
        scope: &'a str,
        key: &'a str,
        lease_id: LeaseId,
        outcome: ReleaseOutcome,
        error: Option<String>,
        ttls: Ttls,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let lid = lease_id.to_string();
            let permanent = outcome == ReleaseOutcome::Permanent;
            let err = bytes(&error);
            let row = self
                .row(
                    &self.inner.sql.dedup_release,
                    &[
                        &scope,
                        &key.as_bytes(),
                        &lid,
                        &permanent,
                        &err,
                        &ms(ttls.retention),
                        &ms(ttls.failed_retention),
                    ],
                )
                .await?
                .ok_or_else(|| malformed("release"))?;
            Ok(col::<Option<i32>>(&row, 0)?.unwrap_or(0) != 0)
        })
    }

    fn inspect<'a>(&'a self, scope: &'a str, key: &'a str) -> StoreFuture<'a, Option<Inspected>> {
        Box::pin(async move {
            let row = self
                .row(&self.inner.sql.dedup_inspect, &[&scope, &key.as_bytes()])
                .await?;
            row.map(|r| self.inspected(scope, key, &r)).transpose()
        })
    }

    fn delete<'a>(&'a self, scope: &'a str, key: &'a str) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let row = self
                .row(&self.inner.sql.dedup_delete, &[&scope, &key.as_bytes()])
                .await?;
            // An expired row was already gone as far as anyone could see.
            Ok(match row {
                Some(r) => col::<Option<bool>>(&r, 0)?.unwrap_or(false),
                None => false,
            })
        })
    }

    fn list_failed<'a>(
        &'a self,
        scope: &'a str,
        limit: usize,
        after: Option<Cursor>,
    ) -> StoreFuture<'a, (Vec<FailedItem>, Option<Cursor>)> {
        Box::pin(async move {
            let (at, key) = match &after {
                Some(c) => (
                    i64::try_from(c.failed_at_ms).unwrap_or(i64::MAX),
                    c.key.as_bytes().to_vec(),
                ),
                // Before every row: at -1 no key sorts lower than empty.
                None => (-1, Vec::new()),
            };
            let fetch = i64::try_from(limit).unwrap_or(i64::MAX - 1) + 1;
            let rows = self
                .rows(
                    &self.inner.sql.dedup_list_failed,
                    &[&scope, &at, &key, &fetch],
                )
                .await?;
            let mut items = Vec::with_capacity(rows.len().min(limit));
            for row in &rows {
                items.push(FailedItem {
                    key: text(col(row, 0)?).unwrap_or_default(),
                    attempts: count(col(row, 1)?),
                    error: text(col(row, 2)?),
                    failed_at_ms: unsigned(col(row, 3)?)?,
                });
            }
            let more = items.len() > limit;
            items.truncate(limit);
            let next = more.then(|| items.last()).flatten().map(|i| Cursor {
                failed_at_ms: i.failed_at_ms,
                key: i.key.clone(),
            });
            Ok((items, next))
        })
    }

    fn purge_failed<'a>(&'a self, scope: &'a str) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            let row = self
                .row(&self.inner.sql.dedup_purge_failed, &[&scope])
                .await?
                .ok_or_else(|| malformed("purge"))?;
            Ok(u64::try_from(col::<i64>(&row, 0)?).unwrap_or(0))
        })
    }

    fn claim_batch<'a>(
        &'a self,
        scope: &'a str,
        items: &'a [ClaimItem],
        ttls: Ttls,
    ) -> StoreFuture<'a, Vec<Result<ClaimOutcome, StoreError>>> {
        Box::pin(async move {
            let args: Vec<ClaimArgs> = items
                .iter()
                .map(|it| ClaimArgs::new(&it.key, &it.params, ttls))
                .collect();
            let params: Vec<_> = args.iter().map(|a| a.params(&scope)).collect();
            let rows = self.pipelined(&self.inner.sql.dedup_claim, &params).await?;
            Ok(rows
                .into_iter()
                .zip(items.iter().zip(&args))
                .map(|(row, (it, a))| self.claim_outcome(scope, &it.key, a, row?))
                .collect())
        })
    }

    fn complete_batch<'a>(
        &'a self,
        scope: &'a str,
        items: &'a [CompleteItem],
    ) -> StoreFuture<'a, Vec<Result<bool, StoreError>>> {
        Box::pin(async move {
            let args: Vec<_> = items
                .iter()
                .map(|it| {
                    (
                        it.key.as_bytes(),
                        it.lease_id.to_string(),
                        self.sealed_result(scope, &it.key, it.result.clone()),
                        ms(it.retention),
                    )
                })
                .collect();
            let params: Vec<Vec<&(dyn ToSql + Sync)>> = args
                .iter()
                .map(|(key, lid, res, keep)| {
                    vec![&scope as &(dyn ToSql + Sync), key, lid, res, keep]
                })
                .collect();
            let rows = self
                .pipelined(&self.inner.sql.dedup_complete, &params)
                .await?;
            Ok(rows.into_iter().map(flag).collect())
        })
    }

    fn mark_batch<'a>(
        &'a self,
        scope: &'a str,
        items: &'a [(String, Duration)],
    ) -> StoreFuture<'a, Vec<Result<bool, StoreError>>> {
        Box::pin(async move {
            let args: Vec<(&[u8], i64)> = items
                .iter()
                .map(|(key, ttl)| (key.as_bytes(), ms(*ttl)))
                .collect();
            let params: Vec<Vec<&(dyn ToSql + Sync)>> = args
                .iter()
                .map(|(key, ttl)| vec![&scope as &(dyn ToSql + Sync), key, ttl])
                .collect();
            let rows = self.pipelined(&self.inner.sql.dedup_mark, &params).await?;
            Ok(rows.into_iter().map(flag).collect())
        })
    }
}

/// A pipelined function call's boolean.
fn flag(row: Result<Option<Row>, StoreError>) -> Result<bool, StoreError> {
    Ok(row?
        .map(|r| col::<Option<bool>>(&r, 0))
        .transpose()?
        .flatten()
        .unwrap_or(false))
}
