//! A consumer of a RabbitMQ queue (AMQP 0-9-1): one connection per
//! consumer, a channel with a prefetch of `concurrency` and manual
//! acknowledgements, each message handed to [`Deliverer::handle`] and
//! acknowledged only once its record is settled. A dead letter is
//! published to the named exchange in a transaction (committed before the
//! message is acknowledged), or, with no exchange named, the message is
//! rejected into the queue's own dead-letter exchange. A message carrying
//! `reply_to` gets the worker's answer published there, with its
//! `correlation_id` — a duplicate too, from the record. A lost connection
//! is opened again with backoff; what it had not acknowledged the broker
//! gives again, and those redeliveries find their records.

use std::sync::Arc;
use std::time::Duration;

use amqprs::channel::{
    BasicAckArguments, BasicCancelArguments, BasicConsumeArguments, BasicNackArguments,
    BasicPublishArguments, BasicQosArguments, BasicRejectArguments, Channel, ConsumerMessage,
    ExchangeDeclareArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::tls::TlsAdaptor;
use amqprs::{BasicProperties, FieldValue};
use bytes::Bytes;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::message::{Deliverer, Settle};
use super::worker::{rfc3339, Message};
use crate::config::consumers::{AmqpUrl, MessageKey};

/// One open connection and what runs on it; kept alive by the deliveries
/// in flight, so they can still acknowledge after the consumer stops.
struct Link {
    _conn: Connection,
    /// Consumes, acknowledges and publishes replies.
    channel: Channel,
    /// Publishes dead letters, in transaction mode (one at a time).
    dead: Option<Mutex<Channel>>,
}

/// Runs the consumer until `stop`; in-flight deliveries finish on `tasks`.
pub async fn run(d: Arc<Deliverer>, url: AmqpUrl, stop: CancellationToken, tasks: TaskTracker) {
    let mut backoff = Duration::from_millis(100);
    while !stop.is_cancelled() {
        match session(&d, &url, &stop, &tasks).await {
            Ok(()) => break,
            Err((was_up, e)) => {
                d.fetch_failed(&e);
                if was_up {
                    backoff = Duration::from_millis(100);
                }
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    d.set_connected(false);
}

/// How to open a connection to `url` (TLS by the shared client settings).
pub fn open_args(url: &AmqpUrl, name: &str) -> Result<OpenConnectionArguments, String> {
    let mut args = OpenConnectionArguments::new(&url.host, url.port, &url.user, &url.password);
    args.virtual_host(&url.vhost)
        .connection_name(&format!("idemgate/{name}"));
    if let Some(h) = url.heartbeat {
        args.heartbeat(h);
    }
    if url.tls {
        let cfg = crate::tls::client(None)?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        args.tls_adaptor(TlsAdaptor::new(connector, url.host.clone()));
    }
    Ok(args)
}

/// One connection's life: `Ok` once stopped, `Err((was it consuming,
/// why))` when the broker went away or refused.
async fn session(
    d: &Arc<Deliverer>,
    url: &AmqpUrl,
    stop: &CancellationToken,
    tasks: &TaskTracker,
) -> Result<(), (bool, String)> {
    let fail = |e: amqprs::error::Error| (false, e.to_string());
    let args = open_args(url, &d.cfg.name).map_err(|e| (false, e))?;
    let conn = tokio::select! {
        () = stop.cancelled() => return Ok(()),
        c = Connection::open(&args) => c.map_err(fail)?,
    };
    let channel = conn.open_channel(None).await.map_err(fail)?;
    let prefetch = u16::try_from(d.cfg.concurrency).unwrap_or(u16::MAX);
    channel
        .basic_qos(BasicQosArguments::new(0, prefetch, false))
        .await
        .map_err(fail)?;
    let dead = if d.cfg.dead_letter.is_empty() {
        None
    } else {
        let c = conn.open_channel(None).await.map_err(fail)?;
        // A missing exchange would close the channel at the first dead
        // letter: say so now, and keep the consumer down until it exists.
        c.exchange_declare(
            ExchangeDeclareArguments::new(&d.cfg.dead_letter, "fanout")
                .passive(true)
                .finish(),
        )
        .await
        .map_err(|e| {
            (
                false,
                format!(
                    "the dead-letter exchange {:?} is not there: {e}",
                    d.cfg.dead_letter
                ),
            )
        })?;
        c.tx_select().await.map_err(fail)?;
        Some(Mutex::new(c))
    };
    let tag = format!(
        "idemgate-{}-{}-{}",
        d.cfg.name,
        std::process::id(),
        rand::random::<u32>()
    );
    let (tag, mut rx) = channel
        .basic_consume_rx(
            BasicConsumeArguments::new(&d.cfg.source, &tag)
                .manual_ack(true)
                .finish(),
        )
        .await
        .map_err(fail)?;
    let lost = conn.clone();
    let lost = lost.listen_network_io_failure();
    tokio::pin!(lost);
    let link = Arc::new(Link {
        _conn: conn,
        channel,
        dead,
    });
    d.set_connected(true);
    loop {
        let m = tokio::select! {
            () = stop.cancelled() => break,
            _ = &mut lost => return Err((true, "the connection to the broker was lost".into())),
            m = rx.recv() => m,
        };
        let Some(m) = m else {
            return Err((true, "the broker closed the channel".into()));
        };
        let (d, link) = (d.clone(), link.clone());
        tasks.spawn(async move { deliver(&d, &link, m).await });
    }
    // Stopping: no more messages; those already prefetched go back to the
    // queue unacknowledged, for a consumer that runs.
    let _ = link
        .channel
        .basic_cancel(BasicCancelArguments::new(&tag))
        .await;
    while let Ok(m) = rx.try_recv() {
        if let Some(deliver) = &m.deliver {
            let _ = link
                .channel
                .basic_nack(BasicNackArguments::new(deliver.delivery_tag(), false, true))
                .await;
        }
    }
    Ok(())
}

/// A header value as text, where it is text or a number.
pub fn header_text(v: &FieldValue) -> Option<String> {
    Some(match v {
        FieldValue::S(s) => AsRef::<String>::as_ref(s).clone(),
        FieldValue::t(b) => b.to_string(),
        FieldValue::b(n) => n.to_string(),
        FieldValue::B(n) => n.to_string(),
        FieldValue::s(n) => n.to_string(),
        FieldValue::u(n) => n.to_string(),
        FieldValue::I(n) => n.to_string(),
        FieldValue::i(n) => n.to_string(),
        FieldValue::l(n) => n.to_string(),
        FieldValue::T(n) => n.to_string(),
        _ => return None,
    })
}

fn message(
    d: &Deliverer,
    tag: u64,
    redelivered: bool,
    p: &BasicProperties,
    body: Vec<u8>,
) -> Message {
    let mut fields: Vec<(String, Bytes)> = p
        .headers()
        .map(|h| {
            h.as_ref()
                .iter()
                .filter_map(|(k, v)| {
                    header_text(v).map(|t| (AsRef::<String>::as_ref(k).clone(), Bytes::from(t)))
                })
                .collect()
        })
        .unwrap_or_default();
    fields.sort();
    let key = match &d.cfg.key_from {
        MessageKey::MessageId => p.message_id().cloned(),
        MessageKey::Field(f) => fields
            .iter()
            .find(|(k, _)| k == f)
            .and_then(|(_, v)| String::from_utf8(v.to_vec()).ok()),
    };
    let time = p.timestamp().and_then(rfc3339);
    Message {
        id: p
            .message_id()
            .cloned()
            .unwrap_or_else(|| format!("{}/{tag}", d.cfg.source)),
        source: format!("idemgate/{}/amqp/{}", d.cfg.name, d.cfg.source),
        key,
        body: Bytes::from(body),
        content_type: p.content_type().cloned(),
        fields,
        redelivered,
        kind: p.message_type().cloned(),
        time,
    }
}

/// Handles one message to its end and tells the broker.
async fn deliver(d: &Deliverer, link: &Link, m: ConsumerMessage) {
    let (Some(deliver), Some(props), Some(body)) = (m.deliver, m.basic_properties, m.content)
    else {
        return;
    };
    let tag = deliver.delivery_tag();
    let msg = message(d, tag, deliver.redelivered(), &props, body);
    let ch = &link.channel;
    // A failed acknowledgement (the connection went) leaves the message to
    // the broker, which gives it again; its record answers then.
    match d.handle(&msg).await {
        Settle::Ack(answer) => {
            if let (Some(to), Some(answer)) = (props.reply_to(), answer) {
                reply(d, ch, to, props.correlation_id(), answer).await;
            }
            let _ = ch.basic_ack(BasicAckArguments::new(tag, false)).await;
        }
        Settle::DeadLetter { reason, attempts } => match &link.dead {
            Some(dead) => {
                if dead_letter(d, dead, &msg, &props, &reason, attempts).await {
                    let _ = ch.basic_ack(BasicAckArguments::new(tag, false)).await;
                } else {
                    let _ = ch
                        .basic_nack(BasicNackArguments::new(tag, false, true))
                        .await;
                }
            }
            // The queue's own dead-letter exchange takes it (RabbitMQ adds
            // an `x-death` header); the record keeps the reason.
            None => {
                let _ = ch.basic_reject(BasicRejectArguments::new(tag, false)).await;
            }
        },
        // Its key is in flight elsewhere, or the store did not answer:
        // back to the queue after the backoff.
        Settle::Leave => {
            tokio::time::sleep(d.cfg.retry_backoff).await;
            let _ = ch
                .basic_nack(BasicNackArguments::new(tag, false, true))
                .await;
        }
    }
}

/// Publishes the worker's answer to `to` (the default exchange routes it
/// to that queue), with the request's `correlation_id`.
async fn reply(d: &Deliverer, ch: &Channel, to: &str, correlation: Option<&String>, answer: Bytes) {
    let mut props = BasicProperties::default();
    if let Some(c) = correlation {
        props.with_correlation_id(c);
    }
    let published = ch
        .basic_publish(
            props.finish(),
            answer.to_vec(),
            BasicPublishArguments::new("", to),
        )
        .await;
    if let Err(e) = published {
        tracing::warn!(consumer = %d.cfg.name, error = %e, reply_to = to, "cannot publish the reply");
    }
}

/// Publishes `msg` to the dead-letter exchange (routing key: the source
/// queue) with why, and commits; whether the broker took it.
async fn dead_letter(
    d: &Deliverer,
    dead: &Mutex<Channel>,
    msg: &Message,
    props: &BasicProperties,
    reason: &str,
    attempts: u32,
) -> bool {
    let mut headers = props.headers().cloned().unwrap_or_default();
    let mut put = |k: &str, v: FieldValue| {
        if let Ok(k) = k.try_into() {
            headers.insert(k, v);
        }
    };
    if let Ok(r) = reason.try_into() {
        put("x-idemgate-reason", FieldValue::S(r));
    }
    if let Ok(k) = msg.key.as_deref().unwrap_or("").try_into() {
        put("x-idemgate-key", FieldValue::S(k));
    }
    put("x-idemgate-attempts", FieldValue::l(i64::from(attempts)));
    if let Ok(s) = d.cfg.source.as_str().try_into() {
        put("x-idemgate-source", FieldValue::S(s));
    }
    let mut out = props.clone();
    out.with_headers(headers).with_persistence(true);
    let ch = dead.lock().await;
    let published = ch
        .basic_publish(
            out.finish(),
            msg.body.to_vec(),
            BasicPublishArguments::new(&d.cfg.dead_letter, &d.cfg.source),
        )
        .await;
    let committed = match published {
        Ok(()) => ch.tx_commit().await,
        Err(e) => Err(e),
    };
    match committed {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(consumer = %d.cfg.name, error = %e, exchange = %d.cfg.dead_letter, "cannot publish the dead letter; the message goes back to the queue");
            false
        }
    }
}
