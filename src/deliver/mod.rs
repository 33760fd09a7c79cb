//! The delivery mode: idemgate reads a queue itself and hands each message
//! to a worker over HTTP, its effect once. `[[consumers]]` names each
//! queue; [`start`] runs one consumer per entry until shutdown.
//!
//! The files, each using only those after it: `redrive` (dead letters sent
//! back to their source, for the admin API) → `streams` (a Redis stream
//! read through a consumer group: new entries, entries a dead consumer
//! left pending, acknowledgements and dead letters), `amqp` (a RabbitMQ
//! queue: prefetch, acknowledgements, dead letters, replies) and `nats` (a
//! JetStream stream through a durable pull consumer) → `message` (one
//! message, broker aside: claim its key in the store, deliver, settle the
//! record, then say what the broker does) → `batch` (batch mode: the
//! deliveries ready together share one request) → `worker` (the HTTP call
//! to the worker and what its answer means).

mod amqp;
mod batch;
mod message;
mod nats;
mod redrive;
mod streams;
mod worker;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::consumers::{Broker, ConsumerConfig};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::store::Store;

pub use message::{Deliverer, Settle};
pub use redrive::{RedriveError, Redriven};
pub use worker::{Answer, Message, Worker};

/// The running consumers, as the admin API reaches them.
#[derive(Clone, Default)]
pub struct Consumers {
    list: Arc<Vec<ConsumerConfig>>,
    store: Option<Store>,
}

impl Consumers {
    /// Sends consumer `name`'s dead letters back to its source (`key`'s
    /// only, when given; from the RabbitMQ queue `queue`); `None`: no such
    /// consumer.
    pub async fn redrive(
        &self,
        name: &str,
        key: Option<&str>,
        queue: Option<&str>,
    ) -> Option<Result<Redriven, RedriveError>> {
        let cfg = self.list.iter().find(|c| c.name == name)?;
        let store = self.store.as_ref()?;
        Some(redrive::redrive(cfg, store, key, queue).await)
    }
}

/// Starts every consumer of `config` on `tasks`; they stop fetching when
/// `stop` is cancelled, and their deliveries in flight finish on `tasks`.
pub fn start(
    config: &Config,
    store: &Store,
    metrics: &Metrics,
    stop: &CancellationToken,
    tasks: &TaskTracker,
) -> Consumers {
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
            Broker::Nats => tasks.spawn(nats::run(d, stop.clone(), tasks.clone())),
        };
    }
    Consumers {
        list: Arc::new(config.consumers.clone()),
        store: Some(store.clone()),
    }
}
