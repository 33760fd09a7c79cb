//! A consumer of a Redis stream: one consumer group, a consumer name per
//! idemgate process, new entries read with `XREADGROUP` (blocking, on a
//! connection of its own) and entries another consumer left pending taken
//! over with `XAUTOCLAIM`; each entry is handed to [`Deliverer::handle`]
//! and acknowledged (`XACK`, many entries per command) only once its
//! record is settled. A dead letter is added to the dead-letter stream
//! before the entry is acknowledged. The connections come back by themselves after Redis does.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::aio::ConnectionManager;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::Value;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::message::{Deliverer, Settle};
use super::worker::Message;
use crate::config::consumers::MessageKey;

/// How long one `XREADGROUP` blocks (the loop checks for shutdown between).
const BLOCK_MS: usize = 1000;
/// How often entries left pending by a dead consumer are looked for.
const RECLAIM_EVERY: Duration = Duration::from_secs(2);

fn text(v: &Value) -> Option<Bytes> {
    match v {
        Value::BulkString(b) => Some(Bytes::copy_from_slice(b)),
        Value::SimpleString(s) => Some(Bytes::copy_from_slice(s.as_bytes())),
        Value::Int(i) => Some(Bytes::from(i.to_string())),
        _ => None,
    }
}

/// A stream entry as a message: `body` and `content-type` fields are the
/// body and its type; the key per `key_from`; the rest become fields.
fn message(d: &Deliverer, e: &StreamId, redelivered: bool) -> Message {
    let fields: HashMap<&str, Bytes> = e
        .map
        .iter()
        .filter_map(|(k, v)| text(v).map(|t| (k.as_str(), t)))
        .collect();
    let as_string = |b: &Bytes| String::from_utf8(b.to_vec()).ok();
    let key = match &d.cfg.key_from {
        MessageKey::MessageId => Some(
            fields
                .get("id")
                .and_then(as_string)
                .unwrap_or_else(|| e.id.clone()),
        ),
        MessageKey::Field(f) => fields.get(f.as_str()).and_then(as_string),
    };
    let mut others: Vec<(String, Bytes)> = fields
        .iter()
        .filter(|(k, _)| !matches!(**k, "body" | "content-type"))
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    others.sort();
    Message {
        id: e.id.clone(),
        source: format!("idemgate/{}/redis/{}", d.cfg.name, d.cfg.source),
        key,
        body: fields.get("body").cloned().unwrap_or_default(),
        content_type: fields.get("content-type").and_then(as_string),
        fields: others,
        redelivered,
        kind: None,
        time: None,
    }
}

/// Runs the consumer until `stop`; in-flight deliveries finish on `tasks`.
pub async fn run(d: Arc<Deliverer>, stop: CancellationToken, tasks: TaskTracker) {
    let me = format!("idemgate-{}-{}", std::process::id(), rand::random::<u32>());
    // Until connected (Redis may not be up yet), then until stopped.
    let Some((mut reader, writer)) = d.connect_until(&stop, || connect(&d.cfg.broker)).await else {
        return;
    };
    d.set_connected(true);
    ensure_group(&d, &mut reader).await;
    let slots = Arc::new(Semaphore::new(d.cfg.concurrency));
    // Settled entries are acknowledged in batches by one task.
    let (acks, acked) = mpsc::unbounded_channel();
    tasks.spawn(acknowledge(d.clone(), writer.clone(), acked));
    let mut last_reclaim = tokio::time::Instant::now();
    // An entry pending longer than this was left by a consumer that died
    // (or by this one, for a key in flight elsewhere): take it over.
    let idle = d.cfg.delivery_timeout + d.cfg.retry_backoff_max + Duration::from_secs(5);
    let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
    loop {
        // Room for at least one more delivery before reading more.
        let free = tokio::select! {
            () = stop.cancelled() => break,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let room = slots.available_permits() + 1;
        drop(free);
        // One command at a time on the reader, never dropped half-way: an
        // XREADGROUP cut off after Redis answered would leave its entries
        // pending with nobody handling them until they are reclaimed.
        let mut entries: Vec<(StreamId, bool)> = Vec::new();
        if last_reclaim.elapsed() >= RECLAIM_EVERY {
            last_reclaim = tokio::time::Instant::now();
            let r: redis::RedisResult<StreamAutoClaimReply> = redis::cmd("XAUTOCLAIM")
                .arg(&d.cfg.source)
                .arg(&d.cfg.group)
                .arg(&me)
                .arg(idle_ms)
                .arg("0-0")
                .arg("COUNT")
                .arg(room)
                .query_async(&mut reader)
                .await;
            match r {
                Ok(r) => entries.extend(r.claimed.into_iter().map(|e| (e, true))),
                Err(e) => d.fetch_failed(&e),
            }
        }
        if entries.is_empty() {
            match read(&mut reader, &d, &me, room).await {
                Ok(read) => entries.extend(read.into_iter().map(|e| (e, false))),
                Err(e) => {
                    d.fetch_failed(&e);
                    // A Redis that came back empty lost the group too.
                    if e.code() == Some("NOGROUP") {
                        ensure_group(&d, &mut reader).await;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
        }
        // Stopping: what was read stays pending, for a consumer that runs.
        if stop.is_cancelled() {
            break;
        }
        d.set_connected(true);
        for (entry, redelivered) in entries {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                break;
            };
            let (d, mut w, acks) = (d.clone(), writer.clone(), acks.clone());
            tasks.spawn(async move {
                let msg = message(&d, &entry, redelivered);
                let settle = d.handle(&msg).await;
                if settle_entry(&d, &mut w, &msg, &entry, settle).await {
                    let _ = acks.send(entry.id);
                }
                drop(permit);
            });
        }
    }
    d.set_connected(false);
}

/// Acknowledges settled entries, as many as have come in since the last
/// `XACK`, in one command; ends once every sender is gone (the consumer
/// stopped and its deliveries finished), after the last of them.
async fn acknowledge(
    d: Arc<Deliverer>,
    mut conn: ConnectionManager,
    mut ids: mpsc::UnboundedReceiver<String>,
) {
    while let Some(first) = ids.recv().await {
        let mut batch = vec![first];
        while batch.len() < 512 {
            match ids.try_recv() {
                Ok(id) => batch.push(id),
                Err(_) => break,
            }
        }
        let acked: redis::RedisResult<i64> = redis::cmd("XACK")
            .arg(&d.cfg.source)
            .arg(&d.cfg.group)
            .arg(&batch)
            .query_async(&mut conn)
            .await;
        if let Err(e) = acked {
            tracing::warn!(consumer = %d.cfg.name, error = %e, entries = batch.len(), "XACK failed; the entries come back and are acknowledged as duplicates");
        }
    }
}

/// Creates the consumer group unless it exists. It reads the stream from
/// its start: entries added before idemgate first ran are delivered too.
async fn ensure_group(d: &Deliverer, conn: &mut ConnectionManager) {
    let created: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&d.cfg.source)
        .arg(&d.cfg.group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    if let Err(e) = created {
        if e.code() != Some("BUSYGROUP") {
            tracing::warn!(consumer = %d.cfg.name, error = %e, "cannot create the consumer group");
        }
    }
}

async fn connect(url: &str) -> redis::RedisResult<(ConnectionManager, ConnectionManager)> {
    let client = redis::Client::open(url)?;
    // The reader blocks in XREADGROUP: it must not time out while blocked,
    // nor hold up the writer's acknowledgements.
    let cfg = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(None);
    let reader = ConnectionManager::new_with_config(client.clone(), cfg.clone()).await?;
    let cfg = cfg.set_response_timeout(Some(Duration::from_secs(5)));
    let writer = ConnectionManager::new_with_config(client, cfg).await?;
    Ok((reader, writer))
}

async fn read(
    conn: &mut ConnectionManager,
    d: &Deliverer,
    me: &str,
    room: usize,
) -> redis::RedisResult<Vec<StreamId>> {
    let r: Option<StreamReadReply> = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(&d.cfg.group)
        .arg(me)
        .arg("COUNT")
        .arg(room)
        .arg("BLOCK")
        .arg(BLOCK_MS)
        .arg("STREAMS")
        .arg(&d.cfg.source)
        .arg(">")
        .query_async(conn)
        .await?;
    Ok(r.map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
        .unwrap_or_default())
}

/// Adds a dead letter if `settle` asks for one; whether the entry may be
/// acknowledged now (`Leave`, or a dead letter that could not be added,
/// leaves it pending).
async fn settle_entry(
    d: &Deliverer,
    conn: &mut ConnectionManager,
    msg: &Message,
    entry: &StreamId,
    settle: Settle,
) -> bool {
    if let Settle::DeadLetter { reason, attempts } = &settle {
        let mut items: Vec<(String, Bytes)> = vec![
            (
                "key".into(),
                Bytes::from(msg.key.clone().unwrap_or_default()),
            ),
            ("reason".into(), Bytes::from(reason.clone())),
            ("attempts".into(), Bytes::from(attempts.to_string())),
            ("source".into(), Bytes::from(d.cfg.source.clone())),
            ("source_id".into(), Bytes::from(entry.id.clone())),
            ("body".into(), msg.body.clone()),
        ];
        if let Some(ct) = &msg.content_type {
            items.push(("content-type".into(), Bytes::from(ct.clone())));
        }
        for (k, v) in &msg.fields {
            items.push((format!("field.{k}"), v.clone()));
        }
        let added: redis::RedisResult<Option<String>> = redis::cmd("XADD")
            .arg(&d.cfg.dead_letter)
            .arg("*")
            .arg(
                items
                    .iter()
                    .flat_map(|(k, v)| [k.as_bytes().to_vec(), v.to_vec()])
                    .collect::<Vec<Vec<u8>>>(),
            )
            .query_async(conn)
            .await;
        if let Err(e) = added {
            // Not acknowledged: the entry comes back and, its record
            // failed, is acknowledged then (the dead letter is listed by
            // the admin API either way).
            tracing::warn!(consumer = %d.cfg.name, error = %e, "cannot add the dead letter; the entry stays pending");
            return false;
        }
    }
    settle != Settle::Leave
}
