//! Consumer dedup on Redis: the rules of [`crate::idempotency::dedup`] as
//! Lua scripts (`lua/dedup_*.lua`), one key per transition (Cluster-safe), times and fences from
//! Redis `TIME`.
//!
//! A record is a hash at `{prefix}:d:{<sha256(scope, key)>}` with fields
//! `s` (state: `l` leased, `p` pending, `c` completed, `f` failed, `m`
//! marked), `k` (the key), `lid`, `fe`, `at`, `lu` (lease until, ms), `fp`,
//! `wk`, `r` (result JSON), `e` (error), `ts` (completed/failed/marked at).
//! Dead letters are also indexed per scope in a sorted set
//! `{prefix}:dlq:{<sha256(scope)>}` (score: failed-at ms). The index lives in
//! another slot, so it is updated by a second command; listings drop entries
//! whose record is no longer failed, and claims of a dead letter re-add it,
//! so the index heals itself.

use std::time::Duration;

use redis::Value;
use sha2::{Digest, Sha256};

use super::{array, malformed, millis, RedisStore};
use crate::idempotency::dedup::{ClaimOutcome, ClaimParams, DedupRecord, ReleaseOutcome};
use crate::idempotency::key::RecordKey;
use crate::idempotency::lease::LeaseId;
use crate::store::dedup::{
    ClaimItem, CompleteItem, Cursor, DedupStore, FailedItem, Inspected, Ttls,
};
use crate::store::error::{StoreError, StoreFuture};

/// A dead letter's fields as read back: state, attempts, error, failed at.
type FailedRow = (Option<String>, Option<u64>, Option<String>, Option<u64>);

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

fn num(v: &Value) -> Option<u64> {
    match v {
        Value::Int(n) => u64::try_from(*n).ok(),
        Value::Double(d) if *d >= 0.0 => Some(*d as u64),
        other => text(other)
            .and_then(|s| s.parse::<f64>().ok())
            .map(|f| f as u64),
    }
}

fn need<T>(v: Option<T>) -> Result<T, StoreError> {
    v.ok_or_else(|| malformed("dedup"))
}

impl RedisStore {
    fn dedup_key(&self, scope: &str, key: &str) -> String {
        self.name(":d:", &RecordKey::derive_dedup(scope, key).0)
    }

    fn failed_index(&self, scope: &str) -> String {
        let mut h = Sha256::new();
        h.update(b"idemgate/dedup-scope/v1");
        h.update(scope.as_bytes());
        self.name(":dlq:", &h.finalize())
    }

    /// ARGV of `lua/dedup_claim.lua`, in its header's order.
    fn claim_args(p: &ClaimParams, lease_id: LeaseId, key: &str, ttls: Ttls) -> Vec<Vec<u8>> {
        let keep = ttls.retention.max(Duration::from_millis(p.lease_ms));
        [
            lease_id.to_string(),
            p.lease_ms.max(1).to_string(),
            p.fingerprint.clone().unwrap_or_default(),
            p.max_attempts.to_string(),
            p.worker.clone().unwrap_or_default(),
            millis(keep),
            millis(ttls.failed_retention),
            key.to_owned(),
        ]
        .map(String::into_bytes)
        .to_vec()
    }

    /// Turns a claim script's answer into an outcome, indexing new dead
    /// letters (and re-indexing old ones, to heal a missed index write).
    async fn claim_answer(
        &self,
        scope: &str,
        key: &str,
        lease_id: LeaseId,
        lease_ms: u64,
        v: Value,
    ) -> Result<ClaimOutcome, StoreError> {
        let parts = array(v)?;
        let tag = need(parts.first().and_then(text))?;
        let opt = |i: usize| parts.get(i).and_then(text);
        Ok(match tag.as_str() {
            "acquired" => ClaimOutcome::Acquired {
                lease_id,
                fence: need(parts.get(1).and_then(num))?,
                attempt: need(parts.get(2).and_then(num))? as u32,
                lease_expires_in_ms: lease_ms,
                recovered: parts.get(3).and_then(num) == Some(1),
            },
            "completed" => ClaimOutcome::Completed {
                result: opt(1).and_then(|r| {
                    let rk = RecordKey::derive_dedup(scope, key);
                    self.inner.sealing.open_text(&rk, r)
                }),
                completed_at_ms: need(parts.get(2).and_then(num))?,
            },
            "failed" | "failed_new" => {
                let attempts = need(parts.get(2).and_then(num))? as u32;
                let at = need(parts.get(3).and_then(num))?;
                let mut cmd = redis::cmd("ZADD");
                cmd.arg(self.failed_index(scope));
                if tag == "failed" {
                    cmd.arg("NX");
                }
                cmd.arg(at).arg(key);
                if let Err(e) = self.query::<i64>(cmd).await {
                    tracing::warn!(error = %e, "indexing a dead letter failed; it heals on the next claim");
                }
                ClaimOutcome::Failed {
                    error: opt(1),
                    attempts,
                }
            }
            "in_progress" => ClaimOutcome::InProgress {
                retry_after_ms: need(parts.get(1).and_then(num))?,
            },
            "mismatch" => ClaimOutcome::Mismatch,
            _ => return Err(malformed("claim")),
        })
    }
}

impl DedupStore for RedisStore {
    fn mark<'a>(&'a self, scope: &'a str, key: &'a str, ttl: Duration) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let ms = millis(ttl);
            let n: i64 = self
                .eval(
                    &self.inner.scripts.dedup_mark,
                    &self.dedup_key(scope, key),
                    &[ms.as_bytes(), key.as_bytes()],
                )
                .await?;
            Ok(n == 1)
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
            let lease_id = LeaseId::random();
            let args = Self::claim_args(p, lease_id, key, ttls);
            let v: Value = self
                .eval_args(
                    &self.inner.scripts.dedup_claim,
                    &self.dedup_key(scope, key),
                    &args,
                )
                .await?;
            self.claim_answer(scope, key, lease_id, p.lease_ms, v).await
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
            let ms = lease_ms.max(1).to_string();
            let n: i64 = self
                .eval(
                    &self.inner.scripts.dedup_extend,
                    &self.dedup_key(scope, key),
                    &[lease_id.to_string().as_bytes(), ms.as_bytes()],
                )
                .await?;
            Ok(u64::try_from(n).ok())
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
            let ms = millis(retention);
            let rk = RecordKey::derive_dedup(scope, key);
            let result = result
                .map(|r| self.inner.sealing.seal_text(&rk, r))
                .unwrap_or_default();
            let n: i64 = self
                .eval(
                    &self.inner.scripts.dedup_complete,
                    &self.dedup_key(scope, key),
                    &[
                        lease_id.to_string().as_bytes(),
                        result.as_bytes(),
                        ms.as_bytes(),
                    ],
                )
                .await?;
            Ok(n == 1)
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
            let how = match outcome {
                ReleaseOutcome::Retry => "retry",
                ReleaseOutcome::Permanent => "permanent",
            };
            let error = error.unwrap_or_default();
            let keep = millis(ttls.retention);
            let failed_keep = millis(ttls.failed_retention);
            let v: Value = self
                .eval(
                    &self.inner.scripts.dedup_release,
                    &self.dedup_key(scope, key),
                    &[
                        lease_id.to_string().as_bytes(),
                        how.as_bytes(),
                        error.as_bytes(),
                        keep.as_bytes(),
                        failed_keep.as_bytes(),
                    ],
                )
                .await?;
            let parts = array(v)?;
            match parts.first().and_then(num) {
                Some(0) => Ok(false),
                Some(1) => Ok(true),
                Some(2) => {
                    let at = need(parts.get(1).and_then(num))?;
                    let mut cmd = redis::cmd("ZADD");
                    cmd.arg(self.failed_index(scope)).arg(at).arg(key);
                    if let Err(e) = self.query::<i64>(cmd).await {
                        tracing::warn!(error = %e, "indexing a dead letter failed; it heals on the next claim");
                    }
                    Ok(true)
                }
                _ => Err(malformed("release")),
            }
        })
    }

    fn inspect<'a>(&'a self, scope: &'a str, key: &'a str) -> StoreFuture<'a, Option<Inspected>> {
        Box::pin(async move {
            let v: Value = self
                .eval(
                    &self.inner.scripts.dedup_inspect,
                    &self.dedup_key(scope, key),
                    &[],
                )
                .await?;
            let f = array(v)?;
            let s = |i: usize| f.get(i).and_then(text);
            let n = |i: usize| f.get(i).and_then(num);
            let now_ms = need(n(11))?;
            let expires_in = match f.get(10) {
                Some(Value::Int(ms)) if *ms >= 0 => Some(Duration::from_millis(*ms as u64)),
                _ => None,
            };
            let record = match s(0).as_deref() {
                None => return Ok(None),
                Some("l") => DedupRecord::Leased {
                    lease_id: need(s(1).and_then(|l| l.parse().ok()))?,
                    fence: need(n(2))?,
                    attempt: need(n(3))? as u32,
                    lease_until_ms: need(n(4))?,
                    fingerprint: s(5),
                    worker: s(6),
                },
                Some("p") => DedupRecord::Pending {
                    attempts: need(n(3))? as u32,
                    fence: n(2).unwrap_or(0),
                    error: s(8),
                    fingerprint: s(5),
                },
                Some("c") => DedupRecord::Completed {
                    result: s(7).and_then(|r| {
                        let rk = RecordKey::derive_dedup(scope, key);
                        self.inner.sealing.open_text(&rk, r)
                    }),
                    completed_at_ms: need(n(9))?,
                    attempts: n(3).unwrap_or(0) as u32,
                    lease_id: need(s(1).and_then(|l| l.parse().ok()))?,
                    fingerprint: s(5),
                },
                Some("f") => DedupRecord::Failed {
                    error: s(8),
                    attempts: n(3).unwrap_or(0) as u32,
                    failed_at_ms: need(n(9))?,
                    fence: n(2).unwrap_or(0),
                },
                Some("m") => DedupRecord::Marked {
                    marked_at_ms: need(n(9))?,
                },
                Some(_) => return Err(malformed("inspect")),
            };
            Ok(Some(Inspected {
                record,
                expires_in,
                now_ms,
            }))
        })
    }

    fn delete<'a>(&'a self, scope: &'a str, key: &'a str) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let mut del = redis::cmd("DEL");
            del.arg(self.dedup_key(scope, key));
            let n: i64 = self.query(del).await?;
            let mut zrem = redis::cmd("ZREM");
            zrem.arg(self.failed_index(scope)).arg(key);
            let _: i64 = self.query(zrem).await?;
            Ok(n > 0)
        })
    }

    fn list_failed<'a>(
        &'a self,
        scope: &'a str,
        limit: usize,
        after: Option<Cursor>,
    ) -> StoreFuture<'a, (Vec<FailedItem>, Option<Cursor>)> {
        Box::pin(async move {
            let index = self.failed_index(scope);
            let (from, from_key) = match &after {
                Some(c) => (c.failed_at_ms.to_string(), c.key.clone()),
                None => (String::new(), String::new()),
            };
            let want = (limit + 1).to_string();
            let pairs: Vec<Value> = self
                .eval(
                    &self.inner.scripts.dedup_list_failed,
                    &index,
                    &[from.as_bytes(), from_key.as_bytes(), want.as_bytes()],
                )
                .await?;
            let candidates: Vec<(String, u64)> = pairs
                .chunks(2)
                .filter_map(|c| Some((text(c.first()?)?, num(c.get(1)?)?)))
                .collect();
            let more = candidates.len() > limit;
            let candidates = &candidates[..candidates.len().min(limit)];
            // Read every candidate's record without a round trip each.
            let reads = candidates
                .iter()
                .map(|(key, _)| {
                    let mut c = redis::cmd("HMGET");
                    c.arg(self.dedup_key(scope, key))
                        .arg("s")
                        .arg("at")
                        .arg("e")
                        .arg("ts");
                    c
                })
                .collect();
            let rows: Vec<FailedRow> = if candidates.is_empty() {
                Vec::new()
            } else {
                self.query_many(reads).await?
            };
            let mut items = Vec::new();
            let mut stale = Vec::new();
            for ((key, _), (s, at, e, ts)) in candidates.iter().zip(rows) {
                match (s.as_deref(), ts) {
                    (Some("f"), Some(ts)) => items.push(FailedItem {
                        key: key.clone(),
                        attempts: at.unwrap_or(0) as u32,
                        error: e,
                        failed_at_ms: ts,
                    }),
                    _ => stale.push(key.clone()),
                }
            }
            if !stale.is_empty() {
                let mut zrem = redis::cmd("ZREM");
                zrem.arg(&index).arg(&stale);
                // Best effort: a later listing drops them again.
                if let Err(e) = self.query::<i64>(zrem).await {
                    tracing::debug!(error = %e, "dropping stale dead-letter entries failed");
                }
            }
            let next = if more {
                candidates.last().map(|(key, at)| Cursor {
                    failed_at_ms: *at,
                    key: key.clone(),
                })
            } else {
                None
            };
            Ok((items, next))
        })
    }

    fn purge_failed<'a>(&'a self, scope: &'a str) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            let index = self.failed_index(scope);
            let mut purged = 0u64;
            loop {
                let mut range = redis::cmd("ZRANGE");
                range.arg(&index).arg(0).arg(499);
                let keys: Vec<String> = self.query(range).await?;
                if keys.is_empty() {
                    break;
                }
                let calls: Vec<(String, Vec<Vec<u8>>)> = keys
                    .iter()
                    .map(|k| (self.dedup_key(scope, k), Vec::new()))
                    .collect();
                for r in self
                    .pipelined(&self.inner.scripts.dedup_delete_failed, &calls)
                    .await?
                {
                    if matches!(r?, Value::Int(1)) {
                        purged += 1;
                    }
                }
                let mut zrem = redis::cmd("ZREM");
                zrem.arg(&index).arg(&keys);
                let _: i64 = self.query(zrem).await?;
            }
            Ok(purged)
        })
    }

    fn claim_batch<'a>(
        &'a self,
        scope: &'a str,
        items: &'a [ClaimItem],
        ttls: Ttls,
    ) -> StoreFuture<'a, Vec<Result<ClaimOutcome, StoreError>>> {
        Box::pin(async move {
            let leases: Vec<LeaseId> = items.iter().map(|_| LeaseId::random()).collect();
            let calls: Vec<(String, Vec<Vec<u8>>)> = items
                .iter()
                .zip(&leases)
                .map(|(it, lid)| {
                    (
                        self.dedup_key(scope, &it.key),
                        Self::claim_args(&it.params, *lid, &it.key, ttls),
                    )
                })
                .collect();
            let answers = self
                .pipelined(&self.inner.scripts.dedup_claim, &calls)
                .await?;
            let mut out = Vec::with_capacity(items.len());
            for ((answer, it), lid) in answers.into_iter().zip(items).zip(leases) {
                out.push(match answer {
                    Ok(v) => {
                        self.claim_answer(scope, &it.key, lid, it.params.lease_ms, v)
                            .await
                    }
                    Err(e) => Err(e),
                });
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
            let calls: Vec<(String, Vec<Vec<u8>>)> = items
                .iter()
                .map(|it| {
                    let args = vec![
                        it.lease_id.to_string().into_bytes(),
                        it.result
                            .clone()
                            .map(|r| {
                                let rk = RecordKey::derive_dedup(scope, &it.key);
                                self.inner.sealing.seal_text(&rk, r)
                            })
                            .unwrap_or_default()
                            .into_bytes(),
                        millis(it.retention).into_bytes(),
                    ];
                    (self.dedup_key(scope, &it.key), args)
                })
                .collect();
            let answers = self
                .pipelined(&self.inner.scripts.dedup_complete, &calls)
                .await?;
            Ok(answers
                .into_iter()
                .map(|a| a.map(|v| matches!(v, Value::Int(1))))
                .collect())
        })
    }

    fn mark_batch<'a>(
        &'a self,
        scope: &'a str,
        items: &'a [(String, Duration)],
    ) -> StoreFuture<'a, Vec<Result<bool, StoreError>>> {
        Box::pin(async move {
            let calls: Vec<(String, Vec<Vec<u8>>)> = items
                .iter()
                .map(|(key, ttl)| {
                    (
                        self.dedup_key(scope, key),
                        vec![millis(*ttl).into_bytes(), key.as_bytes().to_vec()],
                    )
                })
                .collect();
            let answers = self
                .pipelined(&self.inner.scripts.dedup_mark, &calls)
                .await?;
            Ok(answers
                .into_iter()
                .map(|a| a.map(|v| matches!(v, Value::Int(1))))
                .collect())
        })
    }
}
