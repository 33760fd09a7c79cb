//! Group commit in the client: the begins (and the completions) that
//! arrive while others are being committed are sent together, as one call
//! of `begin_many` (`complete_many`): one statement, one transaction, one
//! WAL flush for all of them, where one each would queue on the flush.
//!
//! A [`Batcher`] runs at most `parallel` batches at once. While one is
//! free a call goes out alone at once (no waiting to fill a batch: an idle
//! store adds no latency); while all are busy calls gather, up to `max` a
//! batch. Each item keeps its own answer: a batch is its items, each
//! atomic, none together (the contract's rule for batches), and the
//! functions lock rows in key order, so two batches never deadlock.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_postgres::Row;

use super::db::{col, malformed, Db};
use crate::store::error::StoreError;

type Reply<O> = oneshot::Sender<Result<O, StoreError>>;

/// Gathers calls of one kind into batches.
pub(super) struct Batcher<I, O> {
    tx: mpsc::UnboundedSender<(I, Reply<O>)>,
}

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// Starts the dispatcher; it ends when the batcher is dropped.
    pub fn start<F, Fut>(parallel: usize, max: usize, run: F) -> Self
    where
        F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<Result<O, StoreError>>, StoreError>> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<(I, Reply<O>)>();
        let free = Arc::new(Semaphore::new(parallel.max(1)));
        let run = Arc::new(run);
        tokio::spawn(async move {
            loop {
                let Ok(permit) = free.clone().acquire_owned().await else {
                    return;
                };
                let Some(first) = rx.recv().await else { return };
                let mut batch = vec![first];
                while batch.len() < max {
                    match rx.try_recv() {
                        Ok(item) => batch.push(item),
                        Err(_) => break,
                    }
                }
                // A caller that gave up (its timeout passed) is not run late.
                batch.retain(|(_, reply)| !reply.is_closed());
                if batch.is_empty() {
                    continue;
                }
                let run = run.clone();
                tokio::spawn(async move {
                    let (items, replies): (Vec<I>, Vec<Reply<O>>) = batch.into_iter().unzip();
                    match run(items).await {
                        Ok(answers) => {
                            // A missing answer drops its reply: that caller
                            // gets an error, never another's answer.
                            for (reply, answer) in replies.into_iter().zip(answers) {
                                let _ = reply.send(answer);
                            }
                        }
                        Err(e) => {
                            for reply in replies {
                                let _ = reply.send(Err(e.clone()));
                            }
                        }
                    }
                    drop(permit);
                });
            }
        });
        Batcher { tx }
    }

    /// Runs `item` in the next batch; its answer.
    pub async fn call(&self, item: I) -> Result<O, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((item, reply))
            .map_err(|_| StoreError::Unavailable("the store is closing".into()))?;
        answer
            .await
            .map_err(|_| malformed("a batch (no answer for a call)"))?
    }
}

/// One begin's arguments, as `begin_lease` takes them.
pub(super) struct BeginArgs {
    pub key: Vec<u8>,
    pub token: String,
    pub fp: Vec<u8>,
    pub lease_ms: i64,
    pub in_flight_ms: i64,
    pub hold_ms: Option<i64>,
    pub reconcile_ms: Option<i64>,
}

/// Runs begins as one `begin_many` call; each answer is its row (the
/// columns of `begin_lease` after the position).
pub(super) async fn begins(
    db: &Db,
    sql: &str,
    items: Vec<BeginArgs>,
) -> Result<Vec<Result<Row, StoreError>>, StoreError> {
    let n = items.len();
    let mut keys = Vec::with_capacity(n);
    let mut tokens = Vec::with_capacity(n);
    let mut fps = Vec::with_capacity(n);
    let mut leases = Vec::with_capacity(n);
    let mut in_flight = Vec::with_capacity(n);
    let mut holds = Vec::with_capacity(n);
    let mut reconciles = Vec::with_capacity(n);
    for it in items {
        keys.push(it.key);
        tokens.push(it.token);
        fps.push(it.fp);
        leases.push(it.lease_ms);
        in_flight.push(it.in_flight_ms);
        holds.push(it.hold_ms);
        reconciles.push(it.reconcile_ms);
    }
    let rows = db
        .rows(
            sql,
            &[
                &keys,
                &tokens,
                &fps,
                &leases,
                &in_flight,
                &holds,
                &reconciles,
            ],
        )
        .await?;
    by_position(n, rows)
}

/// One completion's arguments, as `complete_many` takes them (one
/// element of each array).
pub(super) struct CompleteArgs {
    pub key: Vec<u8>,
    pub token: String,
    pub record: Vec<u8>,
    pub ttl_ms: i64,
}

/// Runs completions as one `complete_many` call.
pub(super) async fn completes(
    db: &Db,
    sql: &str,
    items: Vec<CompleteArgs>,
) -> Result<Vec<Result<bool, StoreError>>, StoreError> {
    let n = items.len();
    let mut keys = Vec::with_capacity(n);
    let mut tokens = Vec::with_capacity(n);
    let mut records = Vec::with_capacity(n);
    let mut ttls = Vec::with_capacity(n);
    for it in items {
        keys.push(it.key);
        tokens.push(it.token);
        records.push(it.record);
        ttls.push(it.ttl_ms);
    }
    let rows = db.rows(sql, &[&keys, &tokens, &records, &ttls]).await?;
    Ok(by_position(n, rows)?
        .into_iter()
        .map(|row| {
            row.and_then(|r| col::<Option<bool>>(&r, 1))
                .map(|d| d == Some(true))
        })
        .collect())
}

/// Rows put back in the order of the items: each row's first column is
/// its item's position (1-based); an item without a row gets an error.
fn by_position(n: usize, rows: Vec<Row>) -> Result<Vec<Result<Row, StoreError>>, StoreError> {
    let mut out: Vec<Option<Row>> = (0..n).map(|_| None).collect();
    for row in rows {
        let i: i32 = col(&row, 0)?;
        let slot = usize::try_from(i - 1)
            .ok()
            .and_then(|i| out.get_mut(i))
            .ok_or_else(|| malformed("a batch (position)"))?;
        *slot = Some(row);
    }
    Ok(out
        .into_iter()
        .map(|r| r.ok_or_else(|| malformed("a batch (missing row)")))
        .collect())
}
