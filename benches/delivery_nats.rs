//! The delivery mode's throughput on NATS JetStream against a plain
//! consumer of the same server, in one run: messages per second taken to
//! their end (the plain consumer reads a durable pull consumer in batches
//! of 200 and acknowledges each message without work; idemgate claims each
//! key in the store, POSTs the message to a worker that answers 200 at
//! once, completes the record and acknowledges, `concurrency` 256 unless
//! `CONCURRENCY` says), and the latency from publishing to the worker at a
//! low rate.
//!
//! ```sh
//! cargo bench --bench delivery_nats                          # 20,000 messages a side
//! CONCURRENCY=64 cargo bench --bench delivery_nats -- 50000  # another window, count
//! BATCH=64 cargo bench --bench delivery_nats   # batch mode: up to 64 messages per request
//! ```
//!
//! Starts its own nats-server (from target/venv, as scripts/test.sh
//! installs it) on a free loopback port; idemgate runs in this process on
//! the memory store. Under `cargo test --all-targets` (no `--bench` flag)
//! it does a short smoke run.

#[path = "../tests/support/nats_server.rs"]
mod nats_server;
#[path = "common/worker.rs"]
mod worker;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::pull::Config as PullConfig;
use async_nats::jetstream::consumer::{AckPolicy, PullConsumer};
use async_nats::jetstream::Context;
use futures_util::StreamExt;
use idemgate::config::{Config, FileConfig, RunArgs};
use idemgate::server::Running;
use nats_server::{create_stream, publish, NatsServer};
use worker::{batch_size, micros_now, report, run_args, worker};

async fn fill(js: &Context, subject: &str, n: usize, tag: &str) {
    // Published 1,000 at a time without waiting for each acknowledgement
    // (the context bounds the acknowledgements outstanding).
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let mut acks = Vec::with_capacity(chunk.len());
        for i in chunk {
            let mut h = async_nats::HeaderMap::new();
            h.insert("Nats-Msg-Id", format!("{tag}-{i}").as_str());
            let ack = js
                .publish_with_headers(subject.to_owned(), h, "{\"amount\":100}".into())
                .await
                .unwrap();
            acks.push(ack);
        }
        for a in acks {
            a.await.unwrap();
        }
    }
}

/// A plain consumer: a durable pull consumer read 200 at a time, each
/// message acknowledged, until `n`.
async fn plain(js: &Context, n: usize) -> Duration {
    let stream = js.get_stream("PLAIN").await.unwrap();
    let consumer: PullConsumer = stream
        .get_or_create_consumer(
            "plain",
            PullConfig {
                durable_name: Some("plain".into()),
                ack_policy: AckPolicy::Explicit,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let started = Instant::now();
    let mut done = 0;
    while done < n {
        let mut batch = consumer
            .fetch()
            .max_messages(200)
            .expires(Duration::from_millis(200))
            .messages()
            .await
            .unwrap();
        while let Some(m) = batch.next().await {
            m.unwrap().ack().await.unwrap();
            done += 1;
        }
    }
    started.elapsed()
}

// The allocator the idemgate binary runs with: idemgate runs in this
// process, and the system allocator's arena locks would be measured instead.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let (full, n, concurrency) = run_args(256);
    let batch = batch_size();
    let server = NatsServer::start();
    let js = server.js().await;
    create_stream(&js, "PLAIN", &["plain.>"]).await;
    create_stream(&js, "ORDERS", &["orders.>"]).await;
    create_stream(&js, "DEAD", &["dead.>"]).await;
    fill(&js, "plain.new", n, "p").await;
    let plain_took = plain(&js, n).await;

    fill(&js, "orders.new", n, "k").await;
    let (worker_url, w) = worker().await;
    let text = format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[store]\nmax_entries = 10000000\n\
         [[consumers]]\nname = \"bench\"\nbroker = \"{}\"\nsource = \"ORDERS\"\ngroup = \"bench\"\n\
         deliver_to = \"{worker_url}\"\nconcurrency = {concurrency}\nbatch_size = {batch}\ndead_letter = \"dead.orders\"\n",
        server.url()
    );
    let config =
        Config::from_parts(FileConfig::parse(&text).unwrap(), &RunArgs::default()).unwrap();
    let started = Instant::now();
    let running = Running::start(config).await.unwrap();
    while w.count.load(Ordering::Relaxed) < n as u64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let idem_took = started.elapsed();

    // Latency at a low rate: one message every 5 ms.
    let slow = if full { 400 } else { 20 };
    for i in 0..slow {
        let t = micros_now().to_string();
        publish(&js, "orders.new", &format!("lat-{i}"), &[("t", &t)], b"{}").await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    while w.latencies.lock().unwrap().len() < slow {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    running.stop().await;
    let mut lat = w.latencies.lock().unwrap().clone();
    lat.sort();

    report(
        "delivery on NATS JetStream",
        n,
        ("plain (pull 200 at a time, ack each, no work)", plain_took),
        (
            &format!(
                "idemgate (claim, POST to the worker, complete, ack; concurrency {concurrency}, batch {batch})"
            ),
            idem_took,
        ),
        "publish",
        &lat,
    );
}
