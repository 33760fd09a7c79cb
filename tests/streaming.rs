//! Streaming covered responses, on real sockets: the first client gets
//! each server-sent event as the upstream sends it; a duplicate joins the
//! live stream (what was sent so far at once, then the rest as it comes,
//! byte for byte the same); a replay after the end is identical; the
//! first client may leave; a stream that breaks is aborted for everyone
//! and its outcome is unknown; a stream past `max_response_body` flows
//! whole with memory bounded. On memory and Redis, HTTP/1.1 and h2c.

mod support;

use std::time::Duration;

use idemgate::server::Running;
use sha2::{Digest, Sha256};
use support::proc::Proc;
use support::redis_server::{shared_server, store_toml};
use support::streams::{events, read, stream_byte, StreamClient, StreamUpstream};
use support::{config, unique, TestClient};

/// Generous against the 200 ms between events and the 2 s a buffered
/// response would take: the bound the issue states for "streamed".
const PROMPT: Duration = Duration::from_millis(300);

async fn idemgate(up: &StreamUpstream, extra: &str) -> Running {
    Running::start(config(Some(&up.url()), extra))
        .await
        .unwrap()
}

/// Ten events 200 ms apart: the first client streams, a duplicate at 1 s
/// joins, a duplicate after the end replays; the upstream ran once.
async fn sse(store: &str, h2: bool) {
    let up = StreamUpstream::start().await;
    let r = idemgate(&up, store).await;
    let c = StreamClient::new(r.proxy_addr.unwrap(), h2);
    let key = unique("chat");

    let first = {
        let (c, key) = (c.clone(), key.clone());
        tokio::spawn(async move { c.stream(&key, &[]).await })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let joined = c.stream(&key, &[]).await;
    let first = first.await.unwrap();

    let want = events(10);
    assert_eq!(first.status, 200);
    assert!(first.error.is_none(), "{:?}", first.error);
    assert_eq!(first.body(), want);
    // Event 0 reached the client promptly after the upstream wrote it, and
    // long before the upstream finished.
    let sent = up.sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 10);
    let lag = first.frames[0].0 - sent[0];
    assert!(
        lag < PROMPT,
        "first event {lag:?} after the upstream sent it"
    );
    assert!(
        first.frames[0].0 < sent[9],
        "the first client got nothing before the end"
    );
    assert!(
        first.frames.len() >= 5,
        "{} frames: not streamed",
        first.frames.len()
    );

    // The duplicate got the events so far at once, then the rest live.
    assert_eq!(joined.status, 200);
    assert_eq!(joined.header("idempotent-replayed"), Some("true"));
    assert_eq!(joined.header("content-type"), Some("text/event-stream"));
    assert!(joined.error.is_none(), "{:?}", joined.error);
    assert_eq!(joined.body(), want);
    assert!(
        joined.first_byte_after_sending() < PROMPT,
        "joiner's first bytes after {:?}",
        joined.first_byte_after_sending()
    );
    assert!(
        joined.frames[0].0 < sent[9],
        "the joiner waited for the end"
    );

    // After the end: the same bytes, replayed.
    let mut after = c.stream(&key, &[]).await;
    for _ in 0..50 {
        if after.header("idempotent-replayed").is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        after = c.stream(&key, &[]).await;
    }
    assert_eq!(after.header("idempotent-replayed"), Some("true"));
    assert_eq!(after.body(), want);
    assert_eq!(up.calls(), 1);
    r.stop().await;
}

#[tokio::test]
async fn sse_on_memory_http1() {
    sse("", false).await;
}

#[tokio::test]
async fn sse_on_memory_h2c() {
    sse("", true).await;
}

#[tokio::test]
async fn sse_on_redis_http1() {
    let redis = shared_server();
    sse(&store_toml(&redis.url()), false).await;
}

#[tokio::test]
async fn sse_on_redis_h2c() {
    let redis = shared_server();
    sse(&store_toml(&redis.url()), true).await;
}

/// The first client leaves at 0.5 s: the call and the recording go on, and
/// a later duplicate replays every event.
#[tokio::test]
async fn the_first_client_may_leave() {
    let up = StreamUpstream::start().await;
    let r = idemgate(&up, "").await;
    let c = StreamClient::new(r.proxy_addr.unwrap(), false);
    let key = unique("leave");
    let (_, resp) = c.open(&key, &[]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(resp);
    // The upstream sends its last event at about 1.8 s.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    let later = c.stream(&key, &[]).await;
    assert!(later.error.is_none());
    assert_eq!(later.header("idempotent-replayed"), Some("true"));
    assert_eq!(later.body(), events(10));
    assert_eq!(up.calls(), 1);
    r.stop().await;
}

/// The upstream breaks off after five events: the first client and a
/// joiner see an aborted stream (never a clean end), and the outcome is
/// unknown, so a later duplicate gets 409 outcome-unknown (the default
/// `hold`) and the upstream is not called again.
async fn a_break(h2: bool) {
    let up = StreamUpstream::start().await;
    let r = idemgate(&up, "").await;
    let c = StreamClient::new(r.proxy_addr.unwrap(), h2);
    let key = unique("break");
    let steer = [("x-reset-after", "5")];
    let first = {
        let (c, key) = (c.clone(), key.clone());
        tokio::spawn(async move { c.stream(&key, &steer).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let joined = c.stream(&key, &steer).await;
    let first = first.await.unwrap();
    for (who, s) in [("first", &first), ("joiner", &joined)] {
        assert_eq!(s.status, 200, "{who}");
        assert!(s.error.is_some(), "{who}: the broken stream ended cleanly");
        assert_eq!(s.body(), events(5), "{who}");
    }
    assert_eq!(joined.header("idempotent-replayed"), Some("true"));
    let later = TestClient::new(r.proxy_addr.unwrap())
        .send(
            "POST",
            "/v1/completions",
            &[
                ("idempotency-key", &key),
                ("content-type", "application/json"),
            ],
            "{\"stream\":true}",
        )
        .await;
    later.assert_problem(409, "outcome-unknown");
    assert_eq!(up.calls(), 1);
    r.stop().await;
}

#[tokio::test]
async fn a_break_aborts_every_reader_http1() {
    a_break(false).await;
}

#[tokio::test]
async fn a_break_aborts_every_reader_h2c() {
    a_break(true).await;
}

fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

/// Four 16 MiB streams with `max_response_body = 1MiB`, each client
/// holding back for half a second before it reads: every client gets all
/// 16 MiB intact, the records omit the body, and idemgate's memory stays
/// far below what buffering the streams would take (64 MiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_stream_flows_whole_with_memory_bounded() {
    const SIZE: u64 = 16 << 20;
    const HOLD: u64 = 2000;
    let up = StreamUpstream::start().await;
    let dir = std::env::temp_dir().join(unique("idemgate-stream"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("idemgate.toml");
    std::fs::write(&file, "[idempotency]\nmax_response_body = \"1MiB\"\n").unwrap();
    let p = Proc::start(&up.url(), &["--config", file.to_str().unwrap()], &[]).await;
    let c = StreamClient::new(p.proxy, false);
    let before = rss(p.child.id());
    let size = SIZE.to_string();
    let mut streams = Vec::new();
    for i in 0..4 {
        let (c, size) = (c.clone(), size.clone());
        streams.push(tokio::spawn(async move {
            let key = format!("big-{i}");
            let (sent_at, resp) = c.open(&key, &[("x-stream-bytes", &size)]).await;
            // Hold back: the upstream is far faster than this reader.
            tokio::time::sleep(Duration::from_millis(HOLD)).await;
            read(sent_at, resp).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(HOLD - 100)).await;
    let held_back = rss(p.child.id());
    let mut want = Sha256::new();
    for i in 0..SIZE {
        want.update([stream_byte(i)]);
    }
    let want = want.finalize();
    for s in streams {
        let s = s.await.unwrap();
        assert!(s.error.is_none(), "{:?}", s.error);
        assert_eq!(s.body().len() as u64, SIZE);
        assert_eq!(Sha256::digest(s.body()), want, "corrupted stream");
    }
    let after = rss(p.child.id());
    let mib = |b: u64| b >> 20;
    eprintln!(
        "RSS: {} MiB at start, {} MiB with four streams held back, {} MiB after",
        mib(before),
        mib(held_back),
        mib(after)
    );
    // Buffering would hold 4 × 16 MiB; the window holds about 1 MiB each.
    // Buffering would hold the 4 × 16 MiB (less what the kernel's socket
    // buffers take, about 4 MiB a stream); the window holds 1 MiB each. The
    // rest of the growth is the allocator's churn, which pass-through shows
    // as well (measured here: +22 MiB pass-through, +33 MiB covered, for
    // these four held-back streams in the debug build).
    assert!(
        held_back.saturating_sub(before) < 48 << 20,
        "RSS grew {} MiB while the streams were held back",
        mib(held_back - before)
    );
    // The record omits the body; a duplicate says so.
    let dup = TestClient::new(p.proxy)
        .send(
            "POST",
            "/v1/completions",
            &[
                ("idempotency-key", "big-0"),
                ("content-type", "application/json"),
                ("x-stream-bytes", &size),
            ],
            "{\"stream\":true}",
        )
        .await;
    assert_eq!(dup.header("idempotent-replayed"), Some("true"));
    assert_eq!(dup.header("idempotent-body-omitted"), Some("true"));
    assert_eq!(up.calls(), 4);
    p.signal("-TERM");
    p.finish();
    std::fs::remove_dir_all(dir).ok();
}
