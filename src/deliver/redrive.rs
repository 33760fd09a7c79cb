//! Sending dead letters back (`POST /v1/consumers/{name}/redrive`): each
//! dead letter of a consumer (one key's, or every one) has its record
//! reset and is published to the source again with the same key, then
//! taken off the dead letters. From Redis, the dead-letter stream; from
//! RabbitMQ, the queue the operator names (bound to the dead-letter
//! exchange), where the publish and the acknowledgement commit together;
//! from NATS, the stream that captures the dead-letter subject (published
//! to the original subject with the key in `Idemgate-Key`).
//! A crash half-way leaves a dead letter both sent back and still listed:
//! sending it again is a duplicate publish, which its record absorbs.

use std::time::Duration;

use amqprs::channel::{BasicAckArguments, BasicGetArguments, BasicPublishArguments};
use amqprs::connection::Connection;
use amqprs::FieldTable;
use redis::streams::StreamRangeReply;
use redis::Value;

use super::amqp;
use super::nats::{self, ORIGINAL_SUBJECT, REDRIVEN_KEY};
use crate::config::consumers::{Broker, ConsumerConfig, MessageKey};
use crate::store::Store;

/// The most dead letters one call sends back (the answer says whether
/// more are left).
pub const MAX_PER_CALL: usize = 10_000;

/// What a redrive did.
#[derive(Debug, Default)]
pub struct Redriven {
    /// The keys sent back, in the order they were.
    pub keys: Vec<String>,
    /// The call stopped at [`MAX_PER_CALL`]: call again for the rest.
    pub more: bool,
}

/// Why a redrive could not run.
#[derive(Debug)]
pub enum RedriveError {
    /// The request is missing something (the field it names).
    Invalid(&'static str, String),
    /// The broker or the store did not answer; nothing past what was
    /// reported was changed.
    Unavailable(String),
}

fn unavailable(e: impl std::fmt::Display) -> RedriveError {
    RedriveError::Unavailable(e.to_string())
}

/// Sends `cfg`'s dead letters back: only `key`'s when given; from the
/// RabbitMQ queue `queue`.
pub async fn redrive(
    cfg: &ConsumerConfig,
    store: &Store,
    key: Option<&str>,
    queue: Option<&str>,
) -> Result<Redriven, RedriveError> {
    let bound = Duration::from_secs(30);
    let run = async {
        match &cfg.kind {
            Broker::Redis => from_stream(cfg, store, key).await,
            Broker::Amqp(url) => {
                let queue = queue.ok_or_else(|| {
                    RedriveError::Invalid(
                        "queue",
                        "name the queue that holds this consumer's dead letters".into(),
                    )
                })?;
                from_queue(cfg, url, store, key, queue).await
            }
            Broker::Nats => from_subject(cfg, store, key).await,
        }
    };
    tokio::time::timeout(bound, run)
        .await
        .unwrap_or_else(|_| Err(unavailable("the broker did not finish within 30 s")))
}

async fn reset(cfg: &ConsumerConfig, store: &Store, key: &str) -> Result<(), RedriveError> {
    let dedup = store.dedup().map_err(unavailable)?;
    dedup.delete(&cfg.name, key).await.map_err(unavailable)?;
    Ok(())
}

fn text(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.clone().into_bytes()),
        _ => None,
    }
}

async fn from_stream(
    cfg: &ConsumerConfig,
    store: &Store,
    key: Option<&str>,
) -> Result<Redriven, RedriveError> {
    let client = redis::Client::open(cfg.broker.as_str()).map_err(unavailable)?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(unavailable)?;
    let mut out = Redriven::default();
    let mut after = "-".to_owned();
    loop {
        let page: StreamRangeReply = redis::cmd("XRANGE")
            .arg(&cfg.dead_letter)
            .arg(&after)
            .arg("+")
            .arg("COUNT")
            .arg(500)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let Some(last) = page.ids.last() else { break };
        after = format!("({}", last.id);
        for e in &page.ids {
            let get = |f: &str| e.map.get(f).and_then(text);
            let k = get("key")
                .and_then(|k| String::from_utf8(k).ok())
                .unwrap_or_default();
            // A keyless message would only be a dead letter again.
            if k.is_empty() || key.is_some_and(|want| want != k) {
                continue;
            }
            if out.keys.len() == MAX_PER_CALL {
                out.more = true;
                return Ok(out);
            }
            reset(cfg, store, &k).await?;
            let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
            for (name, v) in &e.map {
                if let (Some(f), Some(v)) = (name.strip_prefix("field."), text(v)) {
                    fields.push((f.as_bytes().to_vec(), v));
                }
            }
            for f in ["body", "content-type"] {
                if let Some(v) = get(f) {
                    fields.push((f.as_bytes().to_vec(), v));
                }
            }
            // The same key again: an entry id was the key only once.
            if cfg.key_from == MessageKey::MessageId && !fields.iter().any(|(n, _)| n == b"id") {
                fields.push((b"id".to_vec(), k.clone().into_bytes()));
            }
            let mut add = redis::cmd("XADD");
            add.arg(&cfg.source).arg("*");
            for (n, v) in &fields {
                add.arg(n).arg(v);
            }
            let _: String = add.query_async(&mut conn).await.map_err(unavailable)?;
            let _: i64 = redis::cmd("XDEL")
                .arg(&cfg.dead_letter)
                .arg(&e.id)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            out.keys.push(k);
        }
    }
    Ok(out)
}

async fn from_queue(
    cfg: &ConsumerConfig,
    url: &crate::config::consumers::AmqpUrl,
    store: &Store,
    key: Option<&str>,
    queue: &str,
) -> Result<Redriven, RedriveError> {
    let args = amqp::open_args(url, &cfg.name).map_err(unavailable)?;
    let conn = Connection::open(&args).await.map_err(unavailable)?;
    let ch = conn.open_channel(None).await.map_err(unavailable)?;
    // The publish to the source and the acknowledgement of the dead letter
    // commit together.
    ch.tx_select().await.map_err(unavailable)?;
    let mut out = Redriven::default();
    // Messages taken and not acknowledged (another key's) go back to the
    // queue when the channel closes.
    while let Some((got, props, body)) = ch
        .basic_get(BasicGetArguments::new(queue))
        .await
        .map_err(unavailable)?
    {
        let k = props
            .headers()
            .and_then(|h| h.get(&"x-idemgate-key".try_into().ok()?))
            .and_then(amqp::header_text)
            .or_else(|| props.message_id().cloned())
            .unwrap_or_default();
        if k.is_empty() || key.is_some_and(|want| want != k) {
            continue;
        }
        if out.keys.len() == MAX_PER_CALL {
            out.more = true;
            break;
        }
        reset(cfg, store, &k).await?;
        let mut again = props.clone();
        if let Some(h) = props.headers() {
            let mut kept = FieldTable::new();
            for (n, v) in h.as_ref() {
                let name: &String = n.as_ref();
                if !name.starts_with("x-idemgate-") && name != "x-death" {
                    kept.insert(n.clone(), v.clone());
                }
            }
            again.with_headers(kept);
        }
        ch.basic_publish(again, body, BasicPublishArguments::new("", &cfg.source))
            .await
            .map_err(unavailable)?;
        ch.basic_ack(BasicAckArguments::new(got.delivery_tag(), false))
            .await
            .map_err(unavailable)?;
        ch.tx_commit().await.map_err(unavailable)?;
        out.keys.push(k);
    }
    let _ = ch.close().await;
    let _ = conn.close().await;
    Ok(out)
}

async fn from_subject(
    cfg: &ConsumerConfig,
    store: &Store,
    key: Option<&str>,
) -> Result<Redriven, RedriveError> {
    let js = nats::context(cfg, "/redrive").await.map_err(unavailable)?;
    let name = js
        .stream_by_subject(cfg.dead_letter.as_str())
        .await
        .map_err(|e| unavailable(format!("no stream captures {:?}: {e}", cfg.dead_letter)))?;
    let stream = js.get_stream(&name).await.map_err(unavailable)?;
    let mut out = Redriven::default();
    let mut next = 1u64;
    loop {
        let got = stream
            .raw_message_builder()
            .sequence(next)
            .next_by_subject(cfg.dead_letter.clone())
            .send()
            .await;
        let m = match got {
            Ok(m) => m,
            Err(e)
                if e.kind()
                    == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
            {
                break
            }
            Err(e) => return Err(unavailable(e)),
        };
        next = m.sequence + 1;
        let get = |n: &str| m.headers.get(n).map(|v| v.as_str().to_owned());
        let k = get("Idemgate-Key").unwrap_or_default();
        let Some(subject) = get(ORIGINAL_SUBJECT) else {
            continue;
        };
        if k.is_empty() || key.is_some_and(|want| want != k) {
            continue;
        }
        if out.keys.len() == MAX_PER_CALL {
            out.more = true;
            break;
        }
        reset(cfg, store, &k).await?;
        let mut h = async_nats::HeaderMap::new();
        for (n, values) in m.headers.iter() {
            let name = n.to_string();
            if name.starts_with("Idemgate-") || name.eq_ignore_ascii_case("Nats-Msg-Id") {
                continue;
            }
            for v in values {
                h.append(n.clone(), v.clone());
            }
        }
        h.insert(REDRIVEN_KEY, k.as_str());
        let ack = js
            .publish_with_headers(subject, h, m.payload.clone())
            .await
            .map_err(unavailable)?;
        ack.await.map_err(unavailable)?;
        stream
            .delete_message(m.sequence)
            .await
            .map_err(unavailable)?;
        out.keys.push(k);
    }
    Ok(out)
}
