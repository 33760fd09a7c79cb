//! A consumer of a NATS JetStream stream: one durable pull consumer (the
//! `group`, created when missing, explicit acknowledgements), batches
//! fetched only as deliveries finish, each message handed to
//! [`Deliverer::handle`] and acknowledged only once its record is settled.
//! While a message is handled idemgate tells the server it is still working
//! on it (`+WPI`), so the server does not hand it to another consumer. A
//! dead letter is published to its subject through JetStream (a stream
//! must capture it) before the message is acknowledged. A message naming
//! `Idemgate-Reply-To` gets the worker's answer published there (a
//! duplicate too, from the record). The client reconnects by itself after
//! the server comes back.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::pull::Config as PullConfig;
use async_nats::jetstream::consumer::{AckPolicy, PullConsumer};
use async_nats::jetstream::{self, AckKind, Context};
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::message::{Deliverer, Settle};
use super::worker::{rfc3339, Message};
use crate::config::consumers::{ConsumerConfig, MessageKey};

/// The header a redriven message's key travels in.
pub const REDRIVEN_KEY: &str = "Idemgate-Key";
/// The header a dead letter keeps its original subject in.
pub const ORIGINAL_SUBJECT: &str = "Idemgate-Subject";
/// The header naming where the worker's answer goes (a JetStream message
/// does not keep its publisher's reply subject: a publish's reply is the
/// stream's acknowledgement).
pub const REPLY_TO: &str = "Idemgate-Reply-To";

/// How long one fetch waits for messages (the loop checks for shutdown
/// between).
const FETCH_WAIT: Duration = Duration::from_secs(1);

/// Runs the consumer until `stop`; in-flight deliveries finish on `tasks`.
pub async fn run(d: Arc<Deliverer>, stop: CancellationToken, tasks: TaskTracker) {
    let Some((js, consumer)) = d.connect_until(&stop, || connect(&d)).await else {
        return;
    };
    d.set_connected(true);
    let js = Arc::new(js);
    let slots = Arc::new(Semaphore::new(d.cfg.concurrency));
    loop {
        let free = tokio::select! {
            () = stop.cancelled() => break,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let room = slots.available_permits() + 1;
        drop(free);
        // A pull request for as many as there is room for: messages stream
        // in as the server has them (one at a time at a low rate, no
        // waiting for the batch to fill), until `room` came or it expires.
        let batch = consumer
            .batch()
            .max_messages(room)
            .expires(FETCH_WAIT)
            .messages()
            .await;
        let mut batch = match batch {
            Ok(b) => b,
            Err(e) => {
                d.fetch_failed(&e);
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let mut failed = false;
        loop {
            let m = tokio::select! {
                () = stop.cancelled() => break,
                m = batch.next() => m,
            };
            let Some(m) = m else { break };
            let m = match m {
                Ok(m) => m,
                Err(e) => {
                    d.fetch_failed(&e);
                    failed = true;
                    break;
                }
            };
            let Ok(permit) = slots.clone().acquire_owned().await else {
                break;
            };
            let (d, js) = (d.clone(), js.clone());
            tasks.spawn(async move {
                deliver(&d, &js, m).await;
                drop(permit);
            });
        }
        if stop.is_cancelled() {
            // Stopping: what arrived and was not started goes back at once
            // (what is still on its way comes back after the
            // acknowledgement wait).
            while let Some(Some(Ok(m))) = batch.next().now_or_never() {
                let _ = m.ack_with(AckKind::Nak(None)).await;
            }
            break;
        }
        if failed {
            tokio::time::sleep(Duration::from_millis(200)).await;
        } else {
            d.set_connected(true);
        }
    }
    // Acknowledgements are sent without waiting for the server's word: once
    // every delivery has ended, what is still in the client's buffer goes
    // out before the process does.
    let client = js.client();
    let all = u32::try_from(d.cfg.concurrency).unwrap_or(u32::MAX);
    tasks.spawn(async move {
        let _ = slots.acquire_many(all).await;
        let _ = client.flush().await;
    });
    d.set_connected(false);
}

/// The server's idea of "still working": how long it waits for an
/// acknowledgement before giving the message to another consumer. Renewed
/// every third of it while the message is handled.
fn ack_wait(d: &Deliverer) -> Duration {
    (d.cfg.delivery_timeout + Duration::from_secs(10)).max(Duration::from_secs(30))
}

/// A JetStream context on `cfg`'s server, the connection named
/// `idemgate/<consumer><suffix>`.
pub async fn context(
    cfg: &ConsumerConfig,
    suffix: &str,
) -> Result<Context, async_nats::ConnectError> {
    let client = async_nats::ConnectOptions::new()
        .name(format!("idemgate/{}{suffix}", cfg.name))
        .connection_timeout(Duration::from_secs(5))
        .connect(cfg.broker.as_str())
        .await?;
    Ok(jetstream::new(client))
}

async fn connect(d: &Deliverer) -> Result<(Context, PullConsumer), String> {
    let js = context(&d.cfg, "").await.map_err(|e| e.to_string())?;
    // A dead letter nobody stores would be lost, and one the source stream
    // stores would come back to this consumer: say so now, and keep the
    // consumer down until a stream of its own captures the subject.
    match js.stream_by_subject(d.cfg.dead_letter.as_str()).await {
        Ok(name) if name == d.cfg.source => {
            return Err(format!(
                "the dead-letter subject {:?} is captured by the source stream itself",
                d.cfg.dead_letter
            ))
        }
        Ok(_) => {}
        Err(e) => {
            return Err(format!(
                "no stream captures the dead-letter subject {:?}: {e}",
                d.cfg.dead_letter
            ))
        }
    }
    let stream = js
        .get_stream(&d.cfg.source)
        .await
        .map_err(|e| format!("the stream {:?}: {e}", d.cfg.source))?;
    let consumer: PullConsumer = stream
        .get_or_create_consumer(
            &d.cfg.group,
            PullConfig {
                durable_name: Some(d.cfg.group.clone()),
                ack_policy: AckPolicy::Explicit,
                ack_wait: ack_wait(d),
                max_ack_pending: i64::try_from(d.cfg.concurrency)
                    .unwrap_or(i64::MAX)
                    .saturating_mul(4),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| format!("the consumer {:?}: {e}", d.cfg.group))?;
    Ok((js, consumer))
}

fn message(d: &Deliverer, m: &jetstream::Message) -> Message {
    let mut fields: Vec<(String, Bytes)> = Vec::new();
    let mut content_type = None;
    if let Some(h) = &m.headers {
        for (name, values) in h.iter() {
            for v in values {
                let (n, v) = (name.to_string(), v.as_str().to_owned());
                if n.eq_ignore_ascii_case("content-type") {
                    content_type = Some(v);
                } else {
                    fields.push((n, Bytes::from(v)));
                }
            }
        }
    }
    fields.sort();
    let header = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| String::from_utf8(v.to_vec()).ok())
    };
    let key = match &d.cfg.key_from {
        // A redriven message carries its key in `Idemgate-Key`: the same
        // `Nats-Msg-Id` again would be dropped by the stream's duplicate
        // window.
        MessageKey::MessageId => header("Nats-Msg-Id").or_else(|| header(REDRIVEN_KEY)),
        MessageKey::Field(f) => header(f),
    };
    let info = m.info().ok();
    let time = info
        .as_ref()
        .and_then(|i| u64::try_from(i.published.unix_timestamp()).ok())
        .and_then(rfc3339);
    Message {
        id: key.clone().unwrap_or_else(|| {
            let seq = info.as_ref().map_or(0, |i| i.stream_sequence);
            format!("{}/{seq}", d.cfg.source)
        }),
        source: format!("idemgate/{}/nats/{}", d.cfg.name, d.cfg.source),
        key,
        body: m.payload.clone(),
        content_type,
        fields,
        redelivered: info.as_ref().is_some_and(|i| i.delivered > 1),
        kind: None,
        time,
    }
}

/// Handles one message to its end (telling the server it is still
/// working on it meanwhile) and tells the server.
async fn deliver(d: &Deliverer, js: &Context, m: jetstream::Message) {
    let msg = message(d, &m);
    let settle = {
        let handled = d.handle(&msg);
        tokio::pin!(handled);
        // The first signal a period from now (an interval's immediate
        // first tick still waits for the timer's next turn, up to 1 ms).
        let period = ack_wait(d) / 3;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        loop {
            tokio::select! {
                s = &mut handled => break s,
                _ = tick.tick() => { let _ = m.ack_with(AckKind::Progress).await; }
            }
        }
    };
    // A lost acknowledgement (the connection went) leaves the message to
    // the server, which gives it again; its record answers then.
    match settle {
        Settle::Ack(answer) => {
            let to = m
                .headers
                .as_ref()
                .and_then(|h| h.get(REPLY_TO))
                .map(|v| v.as_str().to_owned());
            if let (Some(to), Some(answer)) = (to, answer) {
                // Core NATS: the requester waits on its inbox.
                let client = js.client();
                if let Err(e) = client.publish(to, answer).await {
                    tracing::warn!(consumer = %d.cfg.name, error = %e, "cannot publish the reply");
                }
            }
            let _ = m.ack().await;
        }
        Settle::DeadLetter { reason, attempts } => {
            if dead_letter(d, js, &m, &msg, &reason, attempts).await {
                let _ = m.ack().await;
            } else {
                let _ = m.ack_with(AckKind::Nak(Some(d.cfg.retry_backoff))).await;
            }
        }
        // Its key is in flight elsewhere, or the store did not answer:
        // again after the backoff.
        Settle::Leave => {
            let _ = m.ack_with(AckKind::Nak(Some(d.cfg.retry_backoff))).await;
        }
    }
}

/// Publishes the dead letter to its subject (the message's body and
/// headers, and why), waiting for the capturing stream's acknowledgement;
/// whether it was stored.
async fn dead_letter(
    d: &Deliverer,
    js: &Context,
    m: &jetstream::Message,
    msg: &Message,
    reason: &str,
    attempts: u32,
) -> bool {
    let mut h = m.headers.clone().unwrap_or_default();
    // The dead letter must not be taken for a duplicate of the original
    // by the dead-letter stream's own deduplication.
    let original_id = h.get("Nats-Msg-Id").map(|v| v.as_str().to_owned());
    let mut clean = async_nats::HeaderMap::new();
    for (name, values) in h.iter() {
        if name.to_string().eq_ignore_ascii_case("Nats-Msg-Id") {
            continue;
        }
        for v in values {
            clean.append(name.clone(), v.clone());
        }
    }
    h = clean;
    if let Some(id) = original_id {
        h.insert("Idemgate-Msg-Id", id.as_str());
    }
    h.insert("Idemgate-Reason", reason);
    h.insert("Idemgate-Key", msg.key.as_deref().unwrap_or(""));
    h.insert("Idemgate-Attempts", attempts.to_string().as_str());
    h.insert("Idemgate-Source", d.cfg.source.as_str());
    h.insert(ORIGINAL_SUBJECT, m.subject.as_str());
    let sent = js
        .publish_with_headers(d.cfg.dead_letter.clone(), h, msg.body.clone())
        .await;
    let stored = match sent {
        Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match stored {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(consumer = %d.cfg.name, error = %e, subject = %d.cfg.dead_letter, "cannot store the dead letter (does a stream capture its subject?); the message comes back after the backoff");
            false
        }
    }
}
