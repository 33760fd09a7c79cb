//! Consumer dedup on Redis: the rules of [`crate::dedup::state`] as Lua
//! scripts, one key per transition (Cluster-safe), times and fences from
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

use redis::{Script, Value};
use sha2::{Digest, Sha256};

use super::{array, malformed, millis, RedisStore};
use crate::dedup::state::{ClaimOutcome, ClaimParams, DedupRecord, ReleaseOutcome};
use crate::dedup::{ClaimItem, CompleteItem, Cursor, DedupStore, FailedItem, Inspected, Ttls};
use crate::idempotency::key::{hex, RecordKey};
use crate::store::{StoreError, StoreFuture};

const NOW: &str = "local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
";

const CLAIM: &str = r"
local h = redis.call('HMGET', KEYS[1], 's', 'fe', 'at', 'lu', 'fp', 'r', 'e', 'ts')
local s, fe, at, lu, fp, r, e, ts = h[1], h[2], h[3], h[4], h[5], h[6], h[7], h[8]
local given = ARGV[3]
local differs = fp and given ~= '' and fp ~= given
if s == 'c' then
  if differs then return {'mismatch'} end
  return {'completed', r, tonumber(ts)}
end
if s == 'm' then return {'completed', false, tonumber(ts)} end
if s == 'f' then return {'failed', e, tonumber(at), tonumber(ts)} end
local attempts, recovered, err = 0, 0, false
if s == 'l' then
  if differs then return {'mismatch'} end
  if tonumber(lu) > now then return {'in_progress', tonumber(lu) - now} end
  attempts, recovered, err = tonumber(at), 1, 'lease expired during attempt ' .. at
elseif s == 'p' then
  if differs then return {'mismatch'} end
  attempts, err = tonumber(at), e
end
if attempts >= tonumber(ARGV[4]) and (s == 'l' or s == 'p') then
  redis.call('HDEL', KEYS[1], 'lid', 'lu', 'wk', 'e')
  redis.call('HSET', KEYS[1], 's', 'f', 'ts', string.format('%d', now))
  if err then redis.call('HSET', KEYS[1], 'e', err) end
  redis.call('PEXPIRE', KEYS[1], ARGV[7])
  return {'failed_new', err, attempts, now}
end
local fence = tonumber(t[1]) * 1000000 + tonumber(t[2])
local last = tonumber(fe)
if last and last >= fence then fence = last + 1 end
local f = string.format('%d', fence)
local keepfp = fp or (given ~= '' and given)
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 's', 'l', 'k', ARGV[8], 'lid', ARGV[1], 'fe', f,
  'at', string.format('%d', attempts + 1), 'lu', string.format('%d', now + tonumber(ARGV[2])))
if keepfp then redis.call('HSET', KEYS[1], 'fp', keepfp) end
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'wk', ARGV[5]) end
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return {'acquired', f, attempts + 1, recovered}
";

const EXTEND: &str = r"
local h = redis.call('HMGET', KEYS[1], 's', 'lid')
if h[1] ~= 'l' or h[2] ~= ARGV[1] then return -1 end
redis.call('HSET', KEYS[1], 'lu', string.format('%d', now + tonumber(ARGV[2])))
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return tonumber(ARGV[2])
";

const COMPLETE: &str = r"
local h = redis.call('HMGET', KEYS[1], 's', 'lid')
if h[1] == 'c' and h[2] == ARGV[1] then return 1 end
if h[1] ~= 'l' or h[2] ~= ARGV[1] then return 0 end
redis.call('HDEL', KEYS[1], 'lu', 'wk', 'e')
redis.call('HSET', KEYS[1], 's', 'c', 'ts', string.format('%d', now))
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'r', ARGV[2]) end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
";

const RELEASE: &str = r"
local h = redis.call('HMGET', KEYS[1], 's', 'lid')
if h[1] ~= 'l' or h[2] ~= ARGV[1] then return {0} end
redis.call('HDEL', KEYS[1], 'lid', 'lu', 'wk', 'e')
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'e', ARGV[3]) end
if ARGV[2] == 'permanent' then
  redis.call('HSET', KEYS[1], 's', 'f', 'ts', string.format('%d', now))
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  return {2, now}
end
redis.call('HSET', KEYS[1], 's', 'p')
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {1}
";

const MARK: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 's', 'm', 'k', ARGV[2], 'ts', string.format('%d', now))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
";

const INSPECT: &str = r"
local h = redis.call('HMGET', KEYS[1], 's', 'lid', 'fe', 'at', 'lu', 'fp', 'wk', 'r', 'e', 'ts')
return {h[1], h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9], h[10], redis.call('PTTL', KEYS[1]), now}
";

/// Deletes the record only if it is (still) a dead letter.
const DELETE_FAILED: &str = r"
if redis.call('HGET', KEYS[1], 's') == 'f' then return redis.call('DEL', KEYS[1]) end
return 0
";

/// Dead letters after a cursor, oldest first: member/score pairs.
const LIST_FAILED: &str = r"
local limit, res, offset = tonumber(ARGV[3]), {}, 0
local from = ARGV[1]
if from == '' then from = '-inf' end
while #res < 2 * limit do
  local batch = redis.call('ZRANGE', KEYS[1], from, '+inf', 'BYSCORE', 'LIMIT', offset, 200, 'WITHSCORES')
  if #batch == 0 then break end
  for i = 1, #batch, 2 do
    if ARGV[1] == '' or not (tonumber(batch[i + 1]) == tonumber(ARGV[1]) and batch[i] <= ARGV[2]) then
      table.insert(res, batch[i])
      table.insert(res, batch[i + 1])
      if #res >= 2 * limit then break end
    end
  end
  offset = offset + 200
end
return res
";

/// A dead letter's fields as read back: state, attempts, error, failed at.
type FailedRow = (Option<String>, Option<u64>, Option<String>, Option<u64>);

pub(super) struct DedupScripts {
    claim: Script,
    extend: Script,
    complete: Script,
    release: Script,
    mark: Script,
    inspect: Script,
    delete_failed: Script,
    list_failed: Script,
}

impl DedupScripts {
    pub(super) fn new() -> Self {
        let with_now = |body: &str| Script::new(&format!("{NOW}{body}"));
        DedupScripts {
            claim: with_now(CLAIM),
            extend: with_now(EXTEND),
            complete: with_now(COMPLETE),
            release: with_now(RELEASE),
            mark: with_now(MARK),
            inspect: with_now(INSPECT),
            delete_failed: Script::new(DELETE_FAILED),
            list_failed: Script::new(LIST_FAILED),
        }
    }
}

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
        format!(
            "{}:d:{{{}}}",
            self.inner.prefix,
            RecordKey::derive_dedup(scope, key).to_hex()
        )
    }

    fn failed_index(&self, scope: &str) -> String {
        let mut h = Sha256::new();
        h.update(b"idemgate/dedup-scope/v1");
        h.update(scope.as_bytes());
        format!("{}:dlq:{{{}}}", self.inner.prefix, hex(&h.finalize()))
    }

    fn claim_args(p: &ClaimParams, lease_id: &str, key: &str, ttls: Ttls) -> Vec<Vec<u8>> {
        let keep = ttls.retention.max(Duration::from_millis(p.lease_ms));
        vec![
            lease_id.as_bytes().to_vec(),
            p.lease_ms.max(1).to_string().into_bytes(),
            p.fingerprint.clone().unwrap_or_default().into_bytes(),
            p.max_attempts.to_string().into_bytes(),
            p.worker.clone().unwrap_or_default().into_bytes(),
            millis(keep).to_string().into_bytes(),
            millis(ttls.failed_retention).to_string().into_bytes(),
            key.as_bytes().to_vec(),
        ]
    }

    /// Turns a claim script's answer into an outcome, indexing new dead
    /// letters (and re-indexing old ones, to heal a missed index write).
    async fn claim_answer(
        &self,
        scope: &str,
        key: &str,
        lease_id: String,
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
                lease_expires_in_ms: 0, // filled by the caller, who knows lease_ms
                recovered: parts.get(3).and_then(num) == Some(1),
            },
            "completed" => ClaimOutcome::Completed {
                result: opt(1),
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

    fn with_lease_ms(out: ClaimOutcome, lease_ms: u64) -> ClaimOutcome {
        match out {
            ClaimOutcome::Acquired {
                lease_id,
                fence,
                attempt,
                recovered,
                ..
            } => ClaimOutcome::Acquired {
                lease_id,
                fence,
                attempt,
                lease_expires_in_ms: lease_ms,
                recovered,
            },
            other => other,
        }
    }

    async fn eval_owned<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        key: &str,
        args: &[Vec<u8>],
    ) -> Result<T, StoreError> {
        let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
        self.eval(script, key, &refs).await
    }

    /// Runs one script for many keys without a round trip each: one
    /// pipeline on standalone; on Cluster (whose pipelines cannot span
    /// slots) concurrent calls, which the multiplexed connections pipeline
    /// per node. Items whose script was not loaded (NOSCRIPT: a restarted
    /// Redis) run again one by one, which loads it.
    async fn pipelined(
        &self,
        script: &Script,
        calls: &[(String, Vec<Vec<u8>>)],
    ) -> Result<Vec<Result<Value, StoreError>>, StoreError> {
        if calls.is_empty() {
            return Ok(Vec::new());
        }
        if matches!(self.inner.conn, super::Conn::Cluster(_)) {
            let each = calls
                .iter()
                .map(|(key, args)| self.eval_owned::<Value>(script, key, args));
            return Ok(futures_util::future::join_all(each).await);
        }
        let invocations: Vec<_> = calls
            .iter()
            .map(|(key, args)| {
                let mut inv = script.key(key.as_str());
                for a in args {
                    inv.arg(a.as_slice());
                }
                inv
            })
            .collect();
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for inv in &invocations {
            pipe.invoke_script(inv);
        }
        let results: Vec<redis::RedisResult<Value>> = self.query_pipe(pipe).await?;
        let mut out = Vec::with_capacity(results.len());
        for (r, (key, args)) in results.into_iter().zip(calls) {
            out.push(match r {
                Ok(v) => Ok(v),
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    self.eval_owned(script, key, args).await
                }
                Err(e) => Err(StoreError::Unavailable(e.to_string())),
            });
        }
        Ok(out)
    }

    /// Runs commands on many keys without a round trip each (see
    /// [`Self::pipelined`]).
    async fn query_many<T: redis::FromRedisValue>(
        &self,
        cmds: Vec<redis::Cmd>,
    ) -> Result<Vec<T>, StoreError> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        if matches!(self.inner.conn, super::Conn::Cluster(_)) {
            let each = cmds.into_iter().map(|c| self.query::<T>(c));
            return futures_util::future::join_all(each)
                .await
                .into_iter()
                .collect();
        }
        let mut pipe = redis::pipe();
        for c in &cmds {
            pipe.add_command(c.clone());
        }
        self.query_pipe(pipe).await
    }
}

impl DedupStore for RedisStore {
    fn mark<'a>(&'a self, scope: &'a str, key: &'a str, ttl: Duration) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let ms = millis(ttl).to_string();
            let n: i64 = self
                .eval(
                    &self.inner.dedup.mark,
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
            let lease_id = format!("{:032x}", rand::random::<u128>());
            let args = Self::claim_args(p, &lease_id, key, ttls);
            let v: Value = self
                .eval_owned(&self.inner.dedup.claim, &self.dedup_key(scope, key), &args)
                .await?;
            let out = self.claim_answer(scope, key, lease_id, v).await?;
            Ok(Self::with_lease_ms(out, p.lease_ms))
        })
    }

    fn extend<'a>(
        &'a self,
        scope: &'a str,
        key: &'a str,
        lease_id: &'a str,
        lease_ms: u64,
    ) -> StoreFuture<'a, Option<u64>> {
        Box::pin(async move {
            let ms = lease_ms.max(1).to_string();
            let n: i64 = self
                .eval(
                    &self.inner.dedup.extend,
                    &self.dedup_key(scope, key),
                    &[lease_id.as_bytes(), ms.as_bytes()],
                )
                .await?;
            Ok(u64::try_from(n).ok())
        })
    }

    fn complete<'a>(
        &'a self,
        scope: &'a str,
        key: &'a str,
        lease_id: &'a str,
        result: Option<String>,
        retention: Duration,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let ms = millis(retention).to_string();
            let result = result.unwrap_or_default();
            let n: i64 = self
                .eval(
                    &self.inner.dedup.complete,
                    &self.dedup_key(scope, key),
                    &[lease_id.as_bytes(), result.as_bytes(), ms.as_bytes()],
                )
                .await?;
            Ok(n == 1)
        })
    }

    fn release<'a>(
        &'a self,
        scope: &'a str,
        key: &'a str,
        lease_id: &'a str,
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
            let keep = millis(ttls.retention).to_string();
            let failed_keep = millis(ttls.failed_retention).to_string();
            let v: Value = self
                .eval(
                    &self.inner.dedup.release,
                    &self.dedup_key(scope, key),
                    &[
                        lease_id.as_bytes(),
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
                .eval(&self.inner.dedup.inspect, &self.dedup_key(scope, key), &[])
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
                    lease_id: need(s(1))?,
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
                    result: s(7),
                    completed_at_ms: need(n(9))?,
                    attempts: n(3).unwrap_or(0) as u32,
                    lease_id: s(1).unwrap_or_default(),
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
                    &self.inner.dedup.list_failed,
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
                    .pipelined(&self.inner.dedup.delete_failed, &calls)
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
            let leases: Vec<String> = items
                .iter()
                .map(|_| format!("{:032x}", rand::random::<u128>()))
                .collect();
            let calls: Vec<(String, Vec<Vec<u8>>)> = items
                .iter()
                .zip(&leases)
                .map(|(it, lid)| {
                    (
                        self.dedup_key(scope, &it.key),
                        Self::claim_args(&it.params, lid, &it.key, ttls),
                    )
                })
                .collect();
            let answers = self.pipelined(&self.inner.dedup.claim, &calls).await?;
            let mut out = Vec::with_capacity(items.len());
            for ((answer, it), lid) in answers.into_iter().zip(items).zip(leases) {
                out.push(match answer {
                    Ok(v) => self
                        .claim_answer(scope, &it.key, lid, v)
                        .await
                        .map(|o| Self::with_lease_ms(o, it.params.lease_ms)),
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
                        it.lease_id.as_bytes().to_vec(),
                        it.result.clone().unwrap_or_default().into_bytes(),
                        millis(it.retention).to_string().into_bytes(),
                    ];
                    (self.dedup_key(scope, &it.key), args)
                })
                .collect();
            let answers = self.pipelined(&self.inner.dedup.complete, &calls).await?;
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
                        vec![
                            millis(*ttl).to_string().into_bytes(),
                            key.as_bytes().to_vec(),
                        ],
                    )
                })
                .collect();
            let answers = self.pipelined(&self.inner.dedup.mark, &calls).await?;
            Ok(answers
                .into_iter()
                .map(|a| a.map(|v| matches!(v, Value::Int(1))))
                .collect())
        })
    }
}
