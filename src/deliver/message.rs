//! One message, broker aside: claim its key in the store (scope: the
//! consumer's name), hand it to the worker, settle the record by the
//! worker's answer, and tell the broker what to do with the message. The
//! record is settled before the broker hears anything, so a crash at any
//! point leaves the message unacknowledged and its redelivery finds the
//! record.

use std::time::Duration;

use bytes::Bytes;

use crate::config::consumers::{ConsumerConfig, OnUnknown};
use crate::config::DedupConfig;
use crate::idempotency::dedup::{ClaimOutcome, ClaimParams, ReleaseOutcome};
use crate::idempotency::lease::LeaseId;
use crate::metrics::Metrics;
use crate::store::{Store, Ttls};

use super::batch::Batcher;
use super::worker::{Answer, Asked, Item, Message, Worker};

/// The `outcome` label values of `idemgate_deliveries_total`.
pub const OUTCOMES: [&str; 9] = [
    "delivered",
    "duplicate",
    "retried",
    "dead_lettered",
    "unknown",
    "reconciled",
    "no_key",
    "in_progress",
    "store_error",
];

/// What the broker does with a message once idemgate is done with it.
#[derive(Debug, PartialEq)]
pub enum Settle {
    /// Acknowledge it: its record is settled. The worker's answer as the
    /// record keeps it (for a reply), where it kept one.
    Ack(Option<Bytes>),
    /// Add it to the dead-letter stream with `reason`, then acknowledge.
    DeadLetter { reason: String, attempts: u32 },
    /// Leave it unacknowledged: the broker gives it again later (its key is
    /// in flight elsewhere, or the store did not answer).
    Leave,
}

/// What became of a delivery whose outcome is unknown.
enum Unknown {
    /// Settled (held as a dead letter, or reconciled as run).
    Settled(Settle),
    /// It did not run, or may run again (`release`): deliver again.
    Again,
}

/// One consumer's delivery rules, store and worker.
pub struct Deliverer {
    pub cfg: ConsumerConfig,
    store: Store,
    metrics: Metrics,
    worker: Worker,
    /// Batch mode's batcher (`batch_size` > 1).
    batcher: Option<Batcher>,
    ttls: Ttls,
    max_result: usize,
    /// This consumer's series, looked up once (a label lookup hashes and
    /// locks; a message counts several times).
    outcomes: Vec<prometheus::IntCounter>,
    in_flight: prometheus::IntGauge,
    duration: prometheus::Histogram,
}

impl Deliverer {
    pub fn new(cfg: ConsumerConfig, dedup: &DedupConfig, store: Store, metrics: Metrics) -> Self {
        let worker = Worker::new(cfg.deliver_to.clone(), cfg.delivery_timeout);
        // Every series from the start, at zero.
        let outcomes = OUTCOMES
            .iter()
            .map(|o| {
                metrics
                    .deliveries
                    .with_label_values(&[cfg.name.as_str(), o])
            })
            .collect();
        let name = [cfg.name.as_str()];
        let batcher = (cfg.batch_size > 1).then(|| Batcher::new(cfg.batch_size, cfg.concurrency));
        Deliverer {
            batcher,
            outcomes,
            in_flight: metrics.deliveries_in_flight.with_label_values(&name),
            duration: metrics.delivery_duration.with_label_values(&name),
            ttls: Ttls {
                retention: dedup.retention,
                failed_retention: dedup.failed_retention,
            },
            max_result: usize::try_from(dedup.max_result_bytes).unwrap_or(usize::MAX),
            cfg,
            store,
            metrics,
            worker,
        }
    }

    /// Whether the broker answers (`idemgate_consumer_connected`).
    pub fn set_connected(&self, up: bool) {
        self.metrics
            .consumer_connected
            .with_label_values(&[self.cfg.name.as_str()])
            .set(i64::from(up));
    }

    /// Runs `connect` until it works (the broker may not be up yet), with
    /// backoff from 100 ms to 5 s; `None` once `stop` is cancelled first.
    pub async fn connect_until<T, E, F, Fut>(
        &self,
        stop: &tokio_util::sync::CancellationToken,
        mut connect: F,
    ) -> Option<T>
    where
        E: std::fmt::Display,
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let mut backoff = Duration::from_millis(100);
        loop {
            let connected = tokio::select! {
                () = stop.cancelled() => return None,
                c = connect() => c,
            };
            match connected {
                Ok(c) => return Some(c),
                Err(e) => {
                    self.fetch_failed(&e);
                    tokio::select! {
                        () = stop.cancelled() => return None,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// A read from the broker failed: said once per failure, and the
    /// connection counted down until a read works again.
    pub fn fetch_failed(&self, e: &dyn std::fmt::Display) {
        tracing::warn!(consumer = %self.cfg.name, error = %e, "reading the broker failed; trying again");
        self.set_connected(false);
    }

    fn count(&self, outcome: &str) {
        if let Some(i) = OUTCOMES.iter().position(|o| *o == outcome) {
            self.outcomes[i].inc();
        }
    }

    /// The wait before attempt `attempt + 1`: `retry_backoff` doubled per
    /// attempt, at most `retry_backoff_max`.
    fn backoff(&self, attempt: u32) -> Duration {
        let doubled = self
            .cfg
            .retry_backoff
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        doubled.min(self.cfg.retry_backoff_max)
    }

    /// Runs `msg` to its end (retries included) and says what the broker
    /// does with it; timed and counted in flight.
    pub async fn handle(&self, msg: &Message) -> Settle {
        self.in_flight.inc();
        let started = std::time::Instant::now();
        let settle = self.run(msg).await;
        self.in_flight.dec();
        self.duration.observe(started.elapsed().as_secs_f64());
        settle
    }

    async fn run(&self, msg: &Message) -> Settle {
        let Some(key) = msg.key.as_deref().filter(|k| !k.is_empty()) else {
            self.count("no_key");
            return Settle::DeadLetter {
                reason: "no-key: the message names no idempotency key".into(),
                attempts: 0,
            };
        };
        let Ok(dedup) = self.store.dedup() else {
            tracing::error!(consumer = %self.cfg.name, "the store keeps no consumer records");
            return Settle::Leave;
        };
        let scope = self.cfg.name.as_str();
        // A lease outlives the worker's timeout, so it never lapses while
        // the worker may still be running. In batch mode a message may
        // first wait for a request slot, which the batches in flight free
        // within one timeout (they hold every delivery ahead of it): two.
        let waits = if self.batcher.is_some() { 2 } else { 1 };
        let lease = self.cfg.delivery_timeout.saturating_mul(waits) + Duration::from_secs(10);
        let lease_ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
        let params = ClaimParams {
            lease_ms,
            fingerprint: None,
            max_attempts: self.cfg.max_attempts,
            worker: Some(format!("idemgate/{scope}")),
        };
        loop {
            let claimed = match dedup.claim(scope, key, &params, self.ttls).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(consumer = scope, error = %e, "claim failed; the message stays pending");
                    self.count("store_error");
                    return Settle::Leave;
                }
            };
            let (lease_id, fence, attempt) = match claimed {
                // An earlier delivery's lease lapsed (idemgate stopped, or
                // lost the store, mid-delivery): it may have run. Under
                // `hold` it is not delivered again; under `reconcile` the
                // worker is asked first.
                ClaimOutcome::Acquired {
                    lease_id,
                    fence,
                    attempt,
                    recovered: true,
                    ..
                } if self.cfg.on_unknown_outcome != OnUnknown::Release => {
                    self.count("unknown");
                    let why = "an earlier delivery's lease lapsed before it was settled (it may have run)";
                    // The reconcile question carries this lease's fence;
                    // the attempt that may have run had a lower one.
                    match self
                        .unknown(key, lease_id, fence, attempt, why.into())
                        .await
                    {
                        Unknown::Settled(s) => return s,
                        // It did not run: deliver it now, under this lease.
                        Unknown::Again => (lease_id, fence, attempt),
                    }
                }
                ClaimOutcome::Acquired {
                    lease_id,
                    fence,
                    attempt,
                    ..
                } => (lease_id, fence, attempt),
                ClaimOutcome::Completed { result, .. } => {
                    self.count("duplicate");
                    return Settle::Ack(result.map(Bytes::from));
                }
                // Dead-lettered before (the dead letter was written then,
                // or its attempts ran out between two lives of idemgate).
                ClaimOutcome::Failed { .. } => {
                    self.count("duplicate");
                    return Settle::Ack(None);
                }
                ClaimOutcome::InProgress { .. } | ClaimOutcome::Mismatch => {
                    self.count("in_progress");
                    return Settle::Leave;
                }
            };
            let answer = self.send(msg, key, fence, attempt).await;
            let (why, retry) = match answer {
                Answer::Done(body) => {
                    return self.complete(key, lease_id, body, "delivered").await;
                }
                Answer::Permanent(why) => (why, false),
                Answer::Retry(why) => (why, true),
                Answer::Unknown(why) => {
                    self.count("unknown");
                    match self
                        .unknown(key, lease_id, fence, attempt, why.clone())
                        .await
                    {
                        Unknown::Settled(s) => return s,
                        Unknown::Again => (why, true),
                    }
                }
            };
            if !retry {
                return self.dead_letter(key, lease_id, why, attempt).await;
            }
            if attempt >= self.cfg.max_attempts {
                let reason = format!("max_attempts ({attempt}) reached: {why}");
                return self.dead_letter(key, lease_id, reason, attempt).await;
            }
            self.count("retried");
            let released = dedup
                .release(
                    scope,
                    key,
                    lease_id,
                    ReleaseOutcome::Retry,
                    Some(why),
                    self.ttls,
                )
                .await;
            if !matches!(released, Ok(true)) {
                return Settle::Leave;
            }
            tokio::time::sleep(self.backoff(attempt)).await;
        }
    }

    /// Hands `msg` to the worker: on its own, or in batch mode in the
    /// next batch.
    async fn send(&self, msg: &Message, key: &str, fence: u64, attempt: u32) -> Answer {
        match &self.batcher {
            None => self.worker.deliver(msg, key, fence, attempt).await,
            Some(b) => {
                let item = Item {
                    msg: msg.clone(),
                    key: key.to_owned(),
                    fence,
                    attempt,
                };
                b.deliver(&self.worker, item).await
            }
        }
    }

    /// Records `key` as completed with the worker's answer `body` (counted
    /// as `outcome`) and acknowledges it, its answer kept for a reply.
    async fn complete(&self, key: &str, lease_id: LeaseId, body: Bytes, outcome: &str) -> Settle {
        let Ok(dedup) = self.store.dedup() else {
            return Settle::Leave;
        };
        let scope = self.cfg.name.as_str();
        let result = (body.len() <= self.max_result)
            .then(|| String::from_utf8(body.to_vec()).ok())
            .flatten();
        // A store blip must not turn a finished delivery into a second one:
        // try the record a few times.
        let mut recorded = Ok(false);
        for pause in [0u64, 100, 300, 1000, 3000] {
            // Not even a zero sleep on the first try: the timer would hold
            // the delivery (and its slot) until its next tick, up to 1 ms.
            if pause > 0 {
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            recorded = dedup
                .complete(scope, key, lease_id, result.clone(), self.ttls.retention)
                .await;
            if recorded.is_ok() {
                break;
            }
        }
        match recorded {
            Ok(true) => {
                self.count(outcome);
                // The worker's answer, for a reply (a duplicate's reply is
                // the record's result).
                Settle::Ack(Some(body))
            }
            // The lease was lost (taken over after it lapsed): whoever holds
            // the key settles it.
            Ok(false) => Settle::Leave,
            Err(e) => {
                // Done, but not recorded: leave it pending; the record still
                // holds the lease, so a redelivery waits for it to lapse and
                // runs again. Say so.
                tracing::warn!(consumer = scope, key, error = %e, "the worker finished but the store did not record it; the message stays pending");
                self.count("store_error");
                Settle::Leave
            }
        }
    }

    /// A delivery (with `fence`) whose outcome is unknown, by policy:
    /// `hold` makes it a dead letter; `release` delivers it again;
    /// `reconcile` asks the worker whether it ran.
    async fn unknown(
        &self,
        key: &str,
        lease_id: LeaseId,
        fence: u64,
        attempt: u32,
        why: String,
    ) -> Unknown {
        let held = |why: String| async move {
            let reason = format!("outcome-unknown: {why}");
            Unknown::Settled(self.dead_letter(key, lease_id, reason, attempt).await)
        };
        match (&self.cfg.on_unknown_outcome, &self.cfg.reconcile_url) {
            (OnUnknown::Release, _) => Unknown::Again,
            (OnUnknown::Reconcile, Some(url)) => match self.worker.ask(url, key, fence).await {
                Asked::Ran(body) => {
                    Unknown::Settled(self.complete(key, lease_id, body, "reconciled").await)
                }
                Asked::NotRun => Unknown::Again,
                Asked::Failed(e) => held(format!("{why}; reconcile: {e}")).await,
            },
            _ => held(why).await,
        }
    }

    /// Records `key` as failed, then asks for the dead letter.
    async fn dead_letter(
        &self,
        key: &str,
        lease_id: LeaseId,
        reason: String,
        attempts: u32,
    ) -> Settle {
        let Ok(dedup) = self.store.dedup() else {
            return Settle::Leave;
        };
        let released = dedup
            .release(
                &self.cfg.name,
                key,
                lease_id,
                ReleaseOutcome::Permanent,
                Some(reason.clone()),
                self.ttls,
            )
            .await;
        match released {
            Ok(true) => {
                self.count("dead_lettered");
                Settle::DeadLetter { reason, attempts }
            }
            _ => Settle::Leave,
        }
    }
}
