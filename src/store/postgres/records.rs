//! HTTP idempotency records and the fair-share buckets on PostgreSQL:
//! [`RecordStore`] and [`BucketStore`] over the functions of `schema.sql`,
//! one call each. A replay found in the replay cache makes none.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_postgres::Row;

use super::batch::{BeginArgs, CompleteArgs, Step, Stepped};
use super::db::{col, malformed, ms};
use super::store::PostgresStore;
use crate::idempotency::key::{Fingerprint, RecordKey};
use crate::idempotency::lease::LeaseId;
use crate::idempotency::rate::Rate;
use crate::idempotency::record::CompletedRecord;
use crate::idempotency::state::{
    Begin, BeginOptions, Lease, Resolution, State, Unknown, UnknownCause,
};
use crate::store::buckets::BucketStore;
use crate::store::error::{StoreError, StoreFuture};
use crate::store::records::{Inspection, RecordStore};

fn fingerprint(b: Option<Vec<u8>>) -> Result<Fingerprint, StoreError> {
    b.and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
        .map(Fingerprint)
        .ok_or_else(|| malformed("the store (fingerprint)"))
}

fn fence(v: Option<i64>) -> Result<u64, StoreError> {
    v.and_then(|f| u64::try_from(f).ok())
        .ok_or_else(|| malformed("the store (fence)"))
}

impl PostgresStore {
    async fn begin_inner(
        &self,
        key: &RecordKey,
        fp: &Fingerprint,
        opts: BeginOptions,
    ) -> Result<Begin, StoreError> {
        let k = key.0.as_slice();
        let replays = self.inner.replays.as_deref();
        let hex = replays.map(|_| key.to_hex());
        if let (Some(c), Some(h)) = (replays, &hex) {
            if let Some(rec) = c.get(h) {
                return Ok(Begin::Completed(rec));
            }
        }
        // Taken before the round trip: a purge heard meanwhile keeps the
        // answer out of the cache.
        let epoch = replays.map_or(0, |c| c.epoch());
        loop {
            let token = LeaseId::random();
            let args = BeginArgs {
                key: k.to_vec(),
                token: token.to_string(),
                fp: fp.0.to_vec(),
                lease_ms: ms(opts.lease_ttl),
                in_flight_ms: ms(opts.in_flight_ttl()),
                hold_ms: opts.hold_lapsed.map(ms),
                reconcile_ms: opts.reconcile_every.map(ms),
            };
            let Stepped::Begun(row) = self
                .batched(self.inner.steps.call(Step::Begin(args)))
                .await?
            else {
                return Err(malformed("a batch (a begin answered as a completion)"));
            };
            // Column 0 is the batch position; begin_lease's columns follow:
            // kind, fence, fp, record, ttl, cause, since, next, reconcile,
            // held now.
            let kind = col::<i8>(&row, 1)? as u8;
            match kind {
                b'a' => {
                    return Ok(Begin::Acquired(Lease {
                        token,
                        fence: fence(col(&row, 2)?)?,
                    }))
                }
                b'i' => {
                    return Ok(Begin::InFlight {
                        fingerprint: fingerprint(col(&row, 3)?)?,
                        fence: fence(col(&row, 2)?)?,
                    })
                }
                b'u' => {
                    return Ok(Begin::Unknown {
                        unknown: unknown(&row, 2, 3, 6, 7, 8)?,
                        reconcile: col(&row, 9)?,
                        lapsed_now: col(&row, 10)?,
                    })
                }
                b'c' => {
                    let raw: Vec<u8> =
                        col::<Option<Vec<u8>>>(&row, 4)?.ok_or_else(|| malformed("begin"))?;
                    match self.inner.sealing.decode(key, &raw) {
                        Some(rec) => {
                            let rec = Arc::new(rec);
                            if let (Some(c), Some(h)) = (replays, &hex) {
                                let left = col::<Option<i64>>(&row, 5)?.unwrap_or(0);
                                let left = u64::try_from(left).unwrap_or(0);
                                c.put(h, rec.clone(), Duration::from_millis(left), epoch);
                            }
                            return Ok(Begin::Completed(rec));
                        }
                        // A record this build cannot read is a miss: drop
                        // it (unless rewritten meanwhile) and begin again.
                        None => {
                            self.rows(&self.inner.sql.discard, &[&k, &raw]).await?;
                            self.forget(key);
                        }
                    }
                }
                _ => return Err(malformed("begin")),
            }
        }
    }

    /// Drops this replica's copy of `key` (purged or discarded here).
    fn forget(&self, key: &RecordKey) {
        if let Some(c) = &self.inner.replays {
            c.invalidate(&key.to_hex());
        }
    }

    async fn wait_inner(
        &self,
        key: &RecordKey,
        fence: u64,
        deadline: Instant,
    ) -> Result<(), StoreError> {
        let hex = key.to_hex();
        let notify = self.inner.waiters.add(&hex);
        let _registered = Unregister {
            store: self,
            key: &hex,
        };
        let f = i64::try_from(fence).unwrap_or(i64::MAX);
        let k = key.0.as_slice();
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Listening before this check, which also flags the record as
            // waited for (so its settlement notifies): a settlement after it
            // is heard, one before it is seen here. A wake-up is only a
            // hint (the listener wakes everyone after it reconnects): the
            // record decides.
            if !self.flag(&self.inner.sql.wait_for, &[&k, &f]).await? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Ok(());
            }
            let until = deadline.min(Instant::now() + self.inner.recheck);
            let _ = tokio::time::timeout_at(until, notified).await;
        }
    }

    async fn get_inner(&self, key: &RecordKey) -> Result<Inspection, StoreError> {
        let k = key.0.as_slice();
        let Some(row) = self.row(&self.inner.sql.get, &[&k]).await? else {
            return Ok(Inspection {
                state: State::Absent,
                expires_in: None,
            });
        };
        let left: i64 = col(&row, 8)?;
        let expires_in = Some(Duration::from_millis(u64::try_from(left).unwrap_or(0)));
        let state = match col::<i8>(&row, 0)? as u8 {
            b'i' => State::InFlight {
                lease: Lease {
                    token: col::<Option<String>>(&row, 1)?
                        .and_then(|t| t.parse().ok())
                        .ok_or_else(|| malformed("get"))?,
                    fence: fence(col(&row, 2)?)?,
                },
                fingerprint: fingerprint(col(&row, 3)?)?,
            },
            b'c' => col::<Option<Vec<u8>>>(&row, 4)?
                .and_then(|raw| self.inner.sealing.decode(key, &raw))
                .map_or(State::Absent, |r| State::Completed(Arc::new(r))),
            b'u' => State::Unknown(unknown(&row, 2, 3, 5, 6, 7)?),
            _ => State::Absent,
        };
        Ok(Inspection { state, expires_in })
    }
}

/// An unknown record from a row's columns: fence, fingerprint, cause,
/// since, next check.
fn unknown(
    row: &Row,
    f: usize,
    fp: usize,
    cause: usize,
    since: usize,
    next: usize,
) -> Result<Unknown, StoreError> {
    Ok(Unknown {
        fence: fence(col(row, f)?)?,
        fingerprint: fingerprint(col(row, fp)?)?,
        cause: col::<Option<String>>(row, cause)?
            .as_deref()
            .and_then(UnknownCause::decode)
            .ok_or_else(|| malformed("the store (unknown cause)"))?,
        since_unix_ms: col::<Option<i64>>(row, since)?
            .and_then(|v| u64::try_from(v).ok())
            .unwrap_or(0),
        next_check_unix_ms: col::<Option<i64>>(row, next)?
            .and_then(|v| u64::try_from(v).ok())
            .unwrap_or(0),
    })
}

/// Drops a waiter's registration.
struct Unregister<'a> {
    store: &'a PostgresStore,
    key: &'a str,
}

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        self.store.inner.waiters.remove(self.key);
    }
}

impl RecordStore for PostgresStore {
    fn begin<'a>(
        &'a self,
        key: &'a RecordKey,
        fp: &'a Fingerprint,
        opts: BeginOptions,
    ) -> StoreFuture<'a, Begin> {
        Box::pin(self.begin_inner(key, fp, opts))
    }

    fn renew<'a>(
        &'a self,
        key: &'a RecordKey,
        lease: &'a Lease,
        lease_ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let tok = lease.token.to_string();
            self.flag(
                &self.inner.sql.renew,
                &[&key.0.as_slice(), &tok, &ms(lease_ttl)],
            )
            .await
        })
    }

    fn complete<'a>(
        &'a self,
        key: &'a RecordKey,
        lease: &'a Lease,
        record: Arc<CompletedRecord>,
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let args = CompleteArgs {
                key: key.0.to_vec(),
                token: lease.token.to_string(),
                record: self.inner.sealing.encode(key, &record),
                ttl_ms: ms(ttl),
            };
            match self
                .batched(self.inner.steps.call(Step::Complete(args)))
                .await?
            {
                Stepped::Completed(done) => Ok(done),
                Stepped::Begun(_) => Err(malformed("a batch (a completion answered as a begin)")),
            }
        })
    }

    fn release<'a>(&'a self, key: &'a RecordKey, lease: &'a Lease) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let tok = lease.token.to_string();
            self.flag(&self.inner.sql.release, &[&key.0.as_slice(), &tok])
                .await
        })
    }

    fn mark_unknown<'a>(
        &'a self,
        key: &'a RecordKey,
        lease: &'a Lease,
        cause: UnknownCause,
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let tok = lease.token.to_string();
            let why = cause.encode();
            self.flag(
                &self.inner.sql.mark_unknown,
                &[&key.0.as_slice(), &tok, &why, &ms(ttl)],
            )
            .await
        })
    }

    fn resolve<'a>(
        &'a self,
        key: &'a RecordKey,
        fence: u64,
        resolution: Resolution,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let f = i64::try_from(fence).unwrap_or(i64::MAX);
            let (rec, ttl): (Option<Vec<u8>>, i64) = match &resolution {
                Resolution::Completed(record, ttl) => {
                    (Some(self.inner.sealing.encode(key, record)), ms(*ttl))
                }
                Resolution::Release => (None, 0),
            };
            self.flag(
                &self.inner.sql.resolve,
                &[&key.0.as_slice(), &f, &rec, &ttl],
            )
            .await
        })
    }

    fn wait<'a>(
        &'a self,
        key: &'a RecordKey,
        fence: u64,
        deadline: Instant,
    ) -> StoreFuture<'a, ()> {
        Box::pin(self.wait_inner(key, fence, deadline))
    }

    fn get<'a>(&'a self, key: &'a RecordKey) -> StoreFuture<'a, Inspection> {
        Box::pin(self.get_inner(key))
    }

    fn purge<'a>(&'a self, key: &'a RecordKey) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let live = self.flag(&self.inner.sql.purge, &[&key.0.as_slice()]).await;
            // The other replicas hear it; this one forgets its copy now, so
            // its next begin sees the purge.
            self.forget(key);
            live
        })
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(self.ping_inner())
    }
}

impl BucketStore for PostgresStore {
    fn admit<'a>(
        &'a self,
        scope: &'a RecordKey,
        rate: Rate,
    ) -> StoreFuture<'a, Result<(), Duration>> {
        Box::pin(async move {
            let row = self
                .row(
                    &self.inner.sql.admit,
                    &[
                        &scope.0.as_slice(),
                        &rate.per_second,
                        &rate.burst,
                        &ms(rate.refill()),
                    ],
                )
                .await?
                .ok_or_else(|| malformed("admit"))?;
            let wait: i64 = col(&row, 0)?;
            Ok(match u64::try_from(wait) {
                Ok(0) | Err(_) => Ok(()),
                Ok(ms) => Err(Duration::from_millis(ms)),
            })
        })
    }
}
