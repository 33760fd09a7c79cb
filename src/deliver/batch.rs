//! Batch mode (`batch_size` > 1): deliveries that are ready at the same
//! time reach the worker in one request. Each delivery still claims,
//! settles and acknowledges its own message; only the HTTP call is shared.
//! A delivery hands its message to the batcher and waits for its own
//! answer; the batcher sends what has queued up (at most `batch_size`)
//! whenever one of its few requests in flight is free, so batches grow
//! with the load and a lone message goes out at once.

use std::sync::{Arc, OnceLock};

use tokio::sync::{mpsc, oneshot, Semaphore};

use super::worker::{Answer, Item, Worker};

/// A delivery waiting for its batch's answer.
struct Waiting {
    item: Item,
    answer: oneshot::Sender<Answer>,
}

/// One consumer's batcher: its queue, and the task that empties it
/// (started by the first delivery, as it needs the runtime; it ends once
/// the consumer and its deliveries are gone).
pub struct Batcher {
    size: usize,
    requests: usize,
    queue: OnceLock<mpsc::UnboundedSender<Waiting>>,
}

impl Batcher {
    /// Batches of at most `size` out of `concurrency` deliveries in flight.
    pub fn new(size: usize, concurrency: usize) -> Self {
        Batcher {
            size: size.max(1),
            // Enough requests for every delivery in flight, and at least
            // two: a batch filling while another is out.
            requests: concurrency.div_ceil(size.max(1)).max(2),
            queue: OnceLock::new(),
        }
    }

    /// Delivers `item` in the next batch to `worker`; its own answer.
    pub async fn deliver(&self, worker: &Worker, item: Item) -> Answer {
        let queue = self.queue.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(send(worker.clone(), rx, self.size, self.requests));
            tx
        });
        let (tx, rx) = oneshot::channel();
        if queue.send(Waiting { item, answer: tx }).is_err() {
            // The batcher is gone (it cannot be while a delivery holds
            // this consumer); nothing was sent.
            return Answer::Retry("the batcher stopped".into());
        }
        rx.await
            .unwrap_or_else(|_| Answer::Unknown("its batch ended without an answer".into()))
    }
}

/// Sends batches from `queue` until every delivery is gone.
async fn send(
    worker: Worker,
    mut queue: mpsc::UnboundedReceiver<Waiting>,
    size: usize,
    requests: usize,
) {
    let free = Arc::new(Semaphore::new(requests));
    loop {
        // A request slot first: while every slot is out, deliveries queue
        // up and the next batch is fuller.
        let Ok(slot) = free.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = queue.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < size {
            match queue.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        let worker = worker.clone();
        tokio::spawn(async move {
            let (items, answers): (Vec<Item>, Vec<oneshot::Sender<Answer>>) =
                batch.into_iter().map(|w| (w.item, w.answer)).unzip();
            let got = worker.deliver_batch(&items).await;
            for (tx, a) in answers.into_iter().zip(got) {
                let _ = tx.send(a);
            }
            drop(slot);
        });
    }
}
