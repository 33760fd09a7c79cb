//! The delivery mode's throughput on RabbitMQ against a plain consumer of
//! the same broker, in one run: messages per second taken to their end
//! (the plain consumer acknowledges each message without work, prefetch
//! 200; idemgate claims each key in the store, POSTs the message to a
//! worker that answers 200 at once, completes the record and acknowledges,
//! `concurrency` 256 unless `CONCURRENCY` says), and the latency from
//! publishing to the worker at a low rate.
//!
//! ```sh
//! cargo bench --bench delivery_amqp                          # 20,000 messages a side
//! CONCURRENCY=64 cargo bench --bench delivery_amqp -- 50000  # another prefetch, count
//! BATCH=64 cargo bench --bench delivery_amqp   # batch mode: up to 64 messages per request
//! ```
//!
//! Starts its own rabbitmq-server (Debian's package) on free loopback
//! ports; idemgate runs in this process on the memory store. Under `cargo
//! test --all-targets` (no `--bench` flag) it does a short smoke run.

#[path = "../tests/support/rabbitmq.rs"]
mod rabbitmq;
#[path = "common/worker.rs"]
mod worker;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use amqprs::channel::{BasicAckArguments, BasicConsumeArguments, BasicQosArguments, Channel};
use idemgate::config::{Config, FileConfig, RunArgs};
use idemgate::server::Running;
use rabbitmq::{declare_queue, props, publish, ready, RabbitServer};
use worker::{batch_size, micros_now, report, run_args, worker};

async fn fill(ch: &Channel, queue: &str, n: usize, tag: &str) {
    for i in 0..n {
        let p = props(&format!("{tag}-{i}"), &[]);
        publish(ch, queue, p, b"{\"amount\":100}").await;
    }
    // Publishing is asynchronous: wait until the broker holds them all.
    while (ready(ch, queue).await as usize) < n {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A plain consumer: prefetch 200, acknowledge each message, until `n`.
async fn plain(ch: &Channel, n: usize) -> Duration {
    ch.basic_qos(BasicQosArguments::new(0, 200, false))
        .await
        .unwrap();
    let started = Instant::now();
    let (_, mut rx) = ch
        .basic_consume_rx(
            BasicConsumeArguments::new("plain", "plain")
                .manual_ack(true)
                .finish(),
        )
        .await
        .unwrap();
    for _ in 0..n {
        let m = rx.recv().await.unwrap();
        let tag = m.deliver.unwrap().delivery_tag();
        ch.basic_ack(BasicAckArguments::new(tag, false))
            .await
            .unwrap();
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
    if !std::path::Path::new("/usr/lib/rabbitmq/bin/rabbitmq-server").exists() {
        eprintln!("rabbitmq-server is needed (apt-get install rabbitmq-server)");
        return;
    }
    let server = RabbitServer::start();
    let (_pc, pch) = server.channel().await;
    declare_queue(&pch, "plain", None).await;
    fill(&pch, "plain", n, "p").await;
    let plain_took = plain(&pch, n).await;

    let (_c, ch) = server.channel().await;
    declare_queue(&ch, "orders", None).await;
    fill(&ch, "orders", n, "k").await;
    let (worker_url, w) = worker().await;
    let text = format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[store]\nmax_entries = 10000000\n\
         [[consumers]]\nname = \"bench\"\nbroker = \"{}\"\nsource = \"orders\"\n\
         deliver_to = \"{worker_url}\"\nconcurrency = {concurrency}\nbatch_size = {batch}\n",
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
        publish(
            &ch,
            "orders",
            props(&format!("lat-{i}"), &[("t", &t)]),
            b"{}",
        )
        .await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    while w.latencies.lock().unwrap().len() < slow {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    running.stop().await;
    assert_eq!(ready(&ch, "orders").await, 0, "every message acknowledged");
    let mut lat = w.latencies.lock().unwrap().clone();
    lat.sort();

    report(
        "delivery on RabbitMQ",
        n,
        ("plain (prefetch 200, basic.ack each, no work)", plain_took),
        (
            &format!(
                "idemgate (claim, POST to the worker, complete, basic.ack; prefetch {concurrency}, batch {batch})"
            ),
            idem_took,
        ),
        "publish",
        &lat,
    );
}
