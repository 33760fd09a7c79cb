//! A queue worker that gets effectively-once processing from idemgate's
//! consumer dedup API, on a Redis Streams consumer group.
//!
//! For each delivered message: `claim` its key (here the stream entry ID,
//! which stays the same on redelivery), do the side effect, `complete`, then
//! XACK. A message whose claim answers `completed` was already done: ack it
//! and move on. `in_progress` means another worker holds it: leave it
//! unacknowledged, so it is redelivered later (XAUTOCLAIM after
//! `--min-idle-ms`) rather than requeued at once. A failed side effect is
//! released for a retry; `failed` (out of attempts) is acked and left in
//! idemgate's dead letters.
//!
//! The side effect is an increment of `<stream>:effects` for the message, so a
//! test can count how often each message's effect happened.
//!
//! ```sh
//! idemgate --admin-listen 127.0.0.1:9901 --redis redis://127.0.0.1:6379 &
//! redis-cli XGROUP CREATE orders billing '$' MKSTREAM
//! cargo run --example redis_streams_worker -- --redis redis://127.0.0.1:6379 \
//!     --stream orders --group billing --consumer worker-1 --idemgate http://127.0.0.1:9901
//! ```

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use redis::streams::{StreamAutoClaimReply, StreamReadOptions, StreamReadReply};
use redis::AsyncCommands;
use serde_json::{json, Value};

struct Args {
    redis: String,
    stream: String,
    group: String,
    consumer: String,
    idemgate: String,
    scope: String,
    lease_ms: u64,
    work_ms: u64,
    min_idle_ms: u64,
    exit_when_idle: bool,
}

fn args() -> Result<Args, String> {
    let mut m: HashMap<String, String> = HashMap::new();
    let mut flags = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let name = a
            .strip_prefix("--")
            .ok_or(format!("unexpected argument {a:?}"))?
            .to_owned();
        if name == "exit-when-idle" {
            flags.push(name);
        } else {
            m.insert(
                name.clone(),
                it.next().ok_or(format!("--{name} needs a value"))?,
            );
        }
    }
    let get = |k: &str, d: &str| m.get(k).cloned().unwrap_or_else(|| d.to_owned());
    let num = |k: &str, d: u64| -> Result<u64, String> {
        m.get(k).map_or(Ok(d), |v| {
            v.parse()
                .map_err(|_| format!("--{k}: {v:?} is not a number"))
        })
    };
    Ok(Args {
        redis: get("redis", "redis://127.0.0.1:6379"),
        stream: get("stream", "orders"),
        group: get("group", "billing"),
        consumer: get("consumer", "worker-1"),
        idemgate: get("idemgate", "http://127.0.0.1:9901"),
        scope: get("scope", "orders.billing"),
        lease_ms: num("lease-ms", 30_000)?,
        work_ms: num("work-ms", 50)?,
        min_idle_ms: num("min-idle-ms", 60_000)?,
        exit_when_idle: flags.iter().any(|f| f == "exit-when-idle"),
    })
}

/// Prints one line at once (a test may be reading, and may kill us next).
fn say(line: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

struct Dedup {
    http: Client<HttpConnector, Full<Bytes>>,
    base: String,
}

impl Dedup {
    async fn call(
        &self,
        op: &str,
        body: Value,
    ) -> Result<(u16, Value), Box<dyn std::error::Error>> {
        let req = http::Request::post(format!("{}/{op}", self.base))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))?;
        let resp = self.http.request(req).await?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("redis_streams_worker: {e}");
            std::process::exit(2);
        }
    };
    let mut redis = redis::Client::open(a.redis.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let dedup = Dedup {
        http: Client::builder(TokioExecutor::new()).build_http(),
        base: format!("{}/v1/dedup/{}", a.idemgate.trim_end_matches('/'), a.scope),
    };
    let effects = format!("{}:effects", a.stream);
    let mut idle_rounds = 0;
    loop {
        // Messages another consumer took and never acked (it may have died):
        // take them over once they have been idle long enough.
        let reclaimed: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(&a.stream)
            .arg(&a.group)
            .arg(&a.consumer)
            .arg(a.min_idle_ms)
            .arg("0-0")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut redis)
            .await?;
        let mut batch: Vec<(String, HashMap<String, redis::Value>)> = reclaimed
            .claimed
            .into_iter()
            .map(|m| (m.id, m.map))
            .collect();
        if batch.is_empty() {
            let opts = StreamReadOptions::default()
                .group(&a.group, &a.consumer)
                .count(1)
                .block(200);
            let read: Option<StreamReadReply> =
                redis.xread_options(&[&a.stream], &[">"], &opts).await?;
            for key in read.map(|r| r.keys).unwrap_or_default() {
                batch.extend(key.ids.into_iter().map(|m| (m.id, m.map)));
            }
        }
        if batch.is_empty() {
            let pending: redis::streams::StreamPendingReply =
                redis.xpending(&a.stream, &a.group).await?;
            if a.exit_when_idle && pending.count() == 0 {
                idle_rounds += 1;
                if idle_rounds >= 3 {
                    say(format!("{}: idle, exiting", a.consumer));
                    return Ok(());
                }
            }
            continue;
        }
        idle_rounds = 0;
        for (id, _fields) in batch {
            let claim = json!({"key": id, "lease_ms": a.lease_ms, "worker": a.consumer});
            let (status, doc) = dedup.call("claim", claim).await?;
            match (status, doc["status"].as_str()) {
                (201, Some("acquired")) => {
                    let lease_id = doc["lease_id"].as_str().unwrap_or_default().to_owned();
                    say(format!(
                        "{}: claimed {id} lease {lease_id} fence {}",
                        a.consumer, doc["fence"]
                    ));
                    // The work. A crash here leaves the lease to expire; the
                    // message is redelivered and claimed again (recovered).
                    tokio::time::sleep(Duration::from_millis(a.work_ms)).await;
                    let _: i64 = redis.hincr(&effects, &id, 1).await?;
                    let (status, _) = dedup
                        .call("complete", json!({"key": id, "lease_id": lease_id, "result": {"done_by": a.consumer}}))
                        .await?;
                    if status == 409 {
                        // Someone took over: our outcome is not recorded.
                        say(format!("{}: lease lost on {id}", a.consumer));
                        continue;
                    }
                    let _: i64 = redis.xack(&a.stream, &a.group, &[&id]).await?;
                    say(format!("{}: done {id}", a.consumer));
                }
                (200, Some("completed")) => {
                    // Already processed (e.g. the ack was lost): just ack.
                    let _: i64 = redis.xack(&a.stream, &a.group, &[&id]).await?;
                    say(format!("{}: duplicate {id}", a.consumer));
                }
                (200, Some("failed")) => {
                    let _: i64 = redis.xack(&a.stream, &a.group, &[&id]).await?;
                    say(format!("{}: dead letter {id}", a.consumer));
                }
                (409, _) => {
                    // In progress elsewhere: no ack, so it comes back after
                    // min-idle-ms instead of spinning on it now.
                    say(format!("{}: in progress elsewhere {id}", a.consumer));
                }
                (503, _) => {
                    say(format!(
                        "{}: idemgate store unavailable, backing off",
                        a.consumer
                    ));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                other => say(format!(
                    "{}: unexpected answer for {id}: {other:?} {doc}",
                    a.consumer
                )),
            }
        }
    }
}
