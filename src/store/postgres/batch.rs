//! Group commit in the client: the begins and the completions that arrive
//! while a batch is being committed are sent together, as one call of
//! `step_many`: one statement, one transaction, one WAL flush for all of
//! them, where one each would queue on the flush.
//!
//! A [`Batcher`] runs one batch at a time: the fewer batches, the bigger
//! each, and a batch's fixed cost (its call, each statement's start, its
//! commit) is shared by more calls. A call that has waited `patience`
//! while a batch runs (held on a row lock, or a slow flush) goes out in
//! another batch beside it, up to `parallel` at once. While a batch may go
//! a call goes out at once (no waiting to fill a batch: an idle store adds
//! no latency); otherwise calls gather, up to `max` a batch. Each item
//! keeps its own answer: a batch is its items, each atomic, none together
//! (the contract's rule for batches), and the function locks rows in key
//! order, completions then begins.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_postgres::types::ToSql;
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
    pub fn start<F, Fut>(parallel: usize, patience: Duration, max: usize, run: F) -> Self
    where
        F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<Result<O, StoreError>>, StoreError>> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<(I, Reply<O>)>();
        // The batch that runs alone, and the ones that may run beside it.
        let lead = Arc::new(Semaphore::new(1));
        let beside = Arc::new(Semaphore::new(parallel.max(1) - 1));
        let run = Arc::new(run);
        tokio::spawn(async move {
            loop {
                let Some(first) = rx.recv().await else { return };
                let permit = tokio::select! {
                    biased;
                    Ok(p) = lead.clone().acquire_owned() => p,
                    Ok(p) = async {
                        tokio::time::sleep(patience).await;
                        beside.clone().acquire_owned().await
                    } => p,
                    else => return,
                };
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

/// One completion's arguments, as `complete_many` takes them (one
/// element of each array).
pub(super) struct CompleteArgs {
    pub key: Vec<u8>,
    pub token: String,
    pub record: Vec<u8>,
    pub ttl_ms: i64,
}

/// A call a batch carries.
pub(super) enum Step {
    Begin(BeginArgs),
    Complete(CompleteArgs),
}

/// Its answer: a begin's row (the columns of `begin_lease` after the
/// position), or whether a completion stored its record.
pub(super) enum Stepped {
    Begun(Row),
    Completed(bool),
}

/// Runs begins and completions as one call of `step_many` (`sql`, the
/// schema filled in); one answer per item, in order.
pub(super) async fn steps(
    db: &Db,
    sql: &str,
    items: Vec<Step>,
) -> Result<Vec<Result<Stepped, StoreError>>, StoreError> {
    let n = items.len();
    let (mut keys, mut tokens, mut fps) = (Vec::new(), Vec::new(), Vec::new());
    let (mut leases, mut in_flight) = (Vec::new(), Vec::new());
    let (mut holds, mut reconciles) = (Vec::new(), Vec::new());
    let (mut ckeys, mut ctokens) = (Vec::new(), Vec::new());
    let (mut records, mut ttls) = (Vec::new(), Vec::new());
    // Where each item's answer comes from: its kind's 1-based position.
    let mut at = Vec::with_capacity(n);
    for it in items {
        match it {
            Step::Begin(b) => {
                keys.push(b.key);
                tokens.push(b.token);
                fps.push(b.fp);
                leases.push(b.lease_ms);
                in_flight.push(b.in_flight_ms);
                holds.push(b.hold_ms);
                reconciles.push(b.reconcile_ms);
                at.push(Place::Begin(keys.len()));
            }
            Step::Complete(c) => {
                ckeys.push(c.key);
                ctokens.push(c.token);
                records.push(c.record);
                ttls.push(c.ttl_ms);
                at.push(Place::Complete(ckeys.len()));
            }
        }
    }
    let params: [&(dyn ToSql + Sync); 11] = [
        &keys,
        &tokens,
        &fps,
        &leases,
        &in_flight,
        &holds,
        &reconciles,
        &ckeys,
        &ctokens,
        &records,
        &ttls,
    ];
    let rows = db.rows(sql, &params).await?;
    // A completion's row has minus its position.
    let (begun, completed) = rows.into_iter().partition(|r| position(r) > 0);
    let mut begun = by_position(keys.len(), begun)?;
    let mut completed = by_position(ckeys.len(), completed)?;
    Ok(at
        .into_iter()
        .map(|place| match place {
            Place::Begin(i) => answer(&mut begun, i).map(Stepped::Begun),
            Place::Complete(i) => answer(&mut completed, i).and_then(|r| {
                col::<Option<bool>>(&r, COMPLETED).map(|d| Stepped::Completed(d == Some(true)))
            }),
        })
        .collect())
}

/// The column of a completion's `done` in `step_many`'s rows.
const COMPLETED: usize = 11;

/// Where an item's answer is: the n-th begin or completion (1-based).
enum Place {
    Begin(usize),
    Complete(usize),
}

/// A row's position column: a begin's position, or minus a completion's;
/// 0 (neither) where unreadable, which leaves its item without an answer.
fn position(row: &Row) -> i32 {
    row.try_get::<_, i32>(0).unwrap_or(0)
}

/// The n-th item's row (1-based), or an error where it had none.
fn answer(rows: &mut [Option<Row>], i: usize) -> Result<Row, StoreError> {
    rows[i - 1]
        .take()
        .ok_or_else(|| malformed("a batch (missing row)"))
}

/// Rows put back in the order of their kind's items: each row's first
/// column is its item's position (1-based; minus it for a completion).
fn by_position(n: usize, rows: Vec<Row>) -> Result<Vec<Option<Row>>, StoreError> {
    let mut out: Vec<Option<Row>> = (0..n).map(|_| None).collect();
    for row in rows {
        let i = position(&row).unsigned_abs() as usize;
        let slot = i
            .checked_sub(1)
            .and_then(|i| out.get_mut(i))
            .ok_or_else(|| malformed("a batch (position)"))?;
        *slot = Some(row);
    }
    Ok(out)
}
