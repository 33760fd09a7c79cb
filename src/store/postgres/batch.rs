//! Group commit in the client: the begins and the completions that arrive
//! while a batch is being committed are sent together, as one call of
//! `step_many`: one statement, one transaction, one WAL flush for all of
//! them, where one each would queue on the flush.
//!
//! A [`Batcher`] runs one batch at a time: the fewer batches, the bigger
//! each, and a batch's fixed cost (its call, each statement's start, its
//! commit) is shared by more calls. That batch runs in the dispatcher's
//! own task, so the next one starts the moment it ends. A call that has
//! waited `patience` while a batch runs (held on a row lock, or a slow
//! flush) goes out in another batch beside it, up to `parallel` at once.
//! While a batch may go a call goes out at once (no waiting to fill a
//! batch: an idle store adds no latency); otherwise calls gather, up to
//! `max` a batch. Each item keeps its own answer: a batch is its items,
//! each atomic, none together (the contract's rule for batches), and the
//! function locks rows in key order, completions then begins.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;
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
        // The lead batch runs in the dispatcher's own task, and the next
        // starts there the moment it ends: the calls that gathered meanwhile
        // wait for no other task to be scheduled first (a hand-off to a
        // spawned task per batch cost a quarter of the new keys per second
        // under load without event loops: benches/RESULTS.md). The ones
        // beside it are spawned.
        let beside = Arc::new(Semaphore::new(parallel.max(1) - 1));
        let run = Arc::new(run);
        tokio::spawn(async move {
            // The first call to wait behind the running batch, and since when.
            let mut held: Option<((I, Reply<O>), Instant)> = None;
            let mut open = true;
            loop {
                let first = match held.take() {
                    Some((item, _)) => item,
                    None => match rx.recv().await {
                        Some(item) => item,
                        None => return,
                    },
                };
                let Some((items, replies)) = gather(first, &mut rx, max) else {
                    continue;
                };
                // A panic in a batch fails its own calls (their replies are
                // dropped), as it would in a task of its own, and the
                // dispatcher carries on.
                let lead = AssertUnwindSafe(answer_all(run(items), replies)).catch_unwind();
                tokio::pin!(lead);
                loop {
                    let since = held.as_ref().map(|(_, since)| *since);
                    tokio::select! {
                        biased;
                        _ = &mut lead => break,
                        item = rx.recv(), if open && held.is_none() => match item {
                            Some(item) => held = Some((item, Instant::now())),
                            // Dropped: the calls queued are answered, then
                            // the dispatcher ends.
                            None => open = false,
                        },
                        Ok(permit) = async {
                            tokio::time::sleep_until(since.unwrap_or_else(Instant::now) + patience)
                                .await;
                            beside.clone().acquire_owned().await
                        }, if since.is_some() => {
                            let Some((first, _)) = held.take() else { continue };
                            if let Some((items, replies)) = gather(first, &mut rx, max) {
                                let run = run.clone();
                                tokio::spawn(async move {
                                    answer_all(run(items), replies).await;
                                    drop(permit);
                                });
                            }
                        }
                    }
                }
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

/// `first` and the calls queued behind it, up to `max`, without the ones
/// whose caller gave up (its timeout passed: not run late); `None` when
/// none is left.
fn gather<I, O>(
    first: (I, Reply<O>),
    rx: &mut mpsc::UnboundedReceiver<(I, Reply<O>)>,
    max: usize,
) -> Option<(Vec<I>, Vec<Reply<O>>)> {
    let mut batch = vec![first];
    while batch.len() < max {
        match rx.try_recv() {
            Ok(item) => batch.push(item),
            Err(_) => break,
        }
    }
    batch.retain(|(_, reply)| !reply.is_closed());
    (!batch.is_empty()).then(|| batch.into_iter().unzip())
}

/// Runs a batch and gives each caller its answer. A missing answer drops
/// its reply: that caller gets an error, never another's answer.
async fn answer_all<O>(
    run: impl Future<Output = Result<Vec<Result<O, StoreError>>, StoreError>>,
    replies: Vec<Reply<O>>,
) {
    match run.await {
        Ok(answers) => {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch that panics fails its own calls, and the next batch runs:
    /// the lead runs in the dispatcher's task, which must outlive it.
    #[tokio::test]
    async fn a_panicking_batch_fails_its_calls_and_the_next_runs() {
        let batcher = Batcher::start(
            1,
            Duration::from_millis(5),
            8,
            |items: Vec<u32>| async move {
                assert!(!items.contains(&13), "a bug in a batch");
                Ok(items.into_iter().map(|i| Ok(i * 2)).collect())
            },
        );
        assert!(batcher.call(13).await.is_err());
        assert_eq!(batcher.call(21).await.unwrap(), 42);
    }
}
