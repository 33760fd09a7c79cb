//! The delivery mode: idemgate reads a queue itself and hands each message
//! to a worker over HTTP, its effect once. `[[consumers]]` names each
//! queue; [`start`] runs one consumer per entry until shutdown.
//!
//! The files, each using only those after it: `streams` (a Redis stream
//! read through a consumer group: new entries, entries a dead consumer
//! left pending, acknowledgements and dead letters) and `amqp` (a RabbitMQ
//! queue: prefetch, acknowledgements, dead letters, replies) → `message` (one
//! message, broker aside: claim its key in the store, deliver, settle the
//! record, then say what the broker does) → `worker` (the HTTP call to the
//! worker and what its answer means).

mod amqp;
mod message;
mod streams;
mod worker;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::consumers::Broker;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::store::Store;

pub use message::{Deliverer, Settle};
pub use worker::{Answer, Message, Worker};

/// Starts every consumer of `config` on `tasks`; they stop fetching when
/// `stop` is cancelled, and their deliveries in flight finish on `tasks`.
pub fn start(
    config: &Config,
    store: &Store,
    metrics: &Metrics,
    stop: &CancellationToken,
    tasks: &TaskTracker,
) {
    for c in &config.consumers {
        let d = Arc::new(Deliverer::new(
            c.clone(),
            &config.dedup,
            store.clone(),
            metrics.clone(),
        ));
        d.set_connected(false);
        tracing::info!(consumer = %c.name, source = %c.source, group = %c.group, deliver_to = %c.deliver_to, "consumer started");
        match &c.kind {
            Broker::Redis => tasks.spawn(streams::run(d, stop.clone(), tasks.clone())),
            Broker::Amqp(url) => {
                tasks.spawn(amqp::run(d, url.clone(), stop.clone(), tasks.clone()))
            }
        };
    }
}
