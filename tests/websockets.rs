//! Upgrades pass through: a real WebSocket client (tokio-tungstenite)
//! through idemgate to a real WebSocket server, many at once, closed on
//! drain (on event loops too); an upgrade the upstream refuses is relayed as it is; upgrades
//! that never finish leave no task or descriptor behind; and none takes
//! state, covered method or not.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use idemgate::server::Running;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

use support::{config, start, TestClient, TestUpstream};

/// A WebSocket server on a free port that echoes every message.
async fn echo_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_close() {
                        break;
                    }
                    if ws.send(msg).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, task)
}

async fn idemgate(upstream: SocketAddr, extra: &str) -> Running {
    Running::start(config(Some(&format!("http://{upstream}")), extra))
        .await
        .unwrap()
}

fn upgraded(r: &Running) -> u64 {
    r.metrics.requests.with_label_values(&["upgraded"]).get()
}

/// Waits up to `within` for `cond`.
async fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_echoes_through_idemgate() {
    let (up, _server) = echo_server().await;
    let r = idemgate(up, "").await;
    let url = format!("ws://{}/ws/chat", r.proxy_addr.unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(&url).await.unwrap();
    assert_eq!(resp.status(), 101);
    for text in ["hello", "second", ""] {
        ws.send(Message::text(text)).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text(text));
    }
    let blob = vec![7u8; 256 * 1024];
    ws.send(Message::binary(blob.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(blob));
    assert_eq!(upgraded(&r), 1);
    assert_eq!(r.metrics.open_tunnels.get(), 1);
    ws.close(None).await.unwrap();
    // The close handshake completes through the tunnel.
    while let Some(Ok(m)) = ws.next().await {
        assert!(m.is_close(), "{m:?}");
    }
    drop(ws);
    assert!(
        eventually(Duration::from_secs(5), || r.metrics.open_tunnels.get() == 0).await,
        "the tunnel closed with the socket"
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_echo_through_event_loops_and_close_on_drain() {
    let (up, _server) = echo_server().await;
    let r = idemgate(up, "event_loops = 2\ndrain_timeout = \"1s\"\n").await;
    let url = format!("ws://{}/ws", r.proxy_addr.unwrap());
    let mut sockets = Vec::new();
    for _ in 0..20 {
        sockets.push(tokio_tungstenite::connect_async(&url).await.unwrap().0);
    }
    for (i, ws) in sockets.iter_mut().enumerate() {
        let text = format!("hello {i}");
        ws.send(Message::text(text.clone())).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text(text));
    }
    assert_eq!(r.metrics.open_tunnels.get(), 20);
    // The drain closes them once drain_timeout is up, on whichever loop
    // runs them, and then ends.
    let stopped = tokio::spawn(r.stop());
    for ws in sockets {
        assert!(
            closed_within(ws, Duration::from_secs(10)).await,
            "a tunnel was not closed"
        );
    }
    tokio::time::timeout(Duration::from_secs(10), stopped)
        .await
        .expect("the drain finished")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_tunnels_at_once() {
    let (up, _server) = echo_server().await;
    let r = idemgate(up, "").await;
    let url = format!("ws://{}/ws", r.proxy_addr.unwrap());
    let mut sockets = Vec::new();
    for _ in 0..200 {
        sockets.push(tokio_tungstenite::connect_async(&url).await.unwrap().0);
    }
    assert_eq!(r.metrics.open_tunnels.get(), 200);
    let talks = sockets.into_iter().enumerate().map(|(i, mut ws)| {
        tokio::spawn(async move {
            for j in 0..10 {
                let text = format!("{i}:{j}");
                ws.send(Message::text(text.clone())).await.unwrap();
                assert_eq!(ws.next().await.unwrap().unwrap(), Message::text(text));
            }
            ws.close(None).await.unwrap();
        })
    });
    for t in talks.collect::<Vec<_>>() {
        t.await.unwrap();
    }
    assert_eq!(upgraded(&r), 200);
    assert!(
        eventually(Duration::from_secs(10), || r.metrics.open_tunnels.get()
            == 0)
        .await
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_closes_open_tunnels_after_drain_timeout() {
    let (up, _server) = echo_server().await;
    let r = idemgate(up, "drain_timeout = \"1s\"\n").await;
    let url = format!("ws://{}/ws", r.proxy_addr.unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    ws.send(Message::text("before")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("before"));
    let stopping = Instant::now();
    let stopped = tokio::spawn(r.stop());
    // Still open while the drain lets it run...
    tokio::time::sleep(Duration::from_millis(300)).await;
    ws.send(Message::text("during")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("during"));
    // ...then closed once drain_timeout is up.
    assert!(
        closed_within(ws, Duration::from_secs(10)).await,
        "the tunnel was not closed"
    );
    let took = stopping.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "closed before drain_timeout: {took:?}"
    );
    tokio::time::timeout(Duration::from_secs(10), stopped)
        .await
        .expect("the drain finished")
        .unwrap();
}

/// Whether `ws` is closed (a close frame, an error or its end) within
/// `within`; messages before that are skipped.
async fn closed_within<S>(mut ws: S, within: Duration) -> bool
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    tokio::time::timeout(within, async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) => break,
                Some(Ok(m)) if m.is_close() => break,
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// Sends a raw HTTP/1.1 request and reads the response head.
async fn raw_head(addr: SocketAddr, request: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await.unwrap() == 0 {
            break;
        }
        head.push(byte[0]);
    }
    (s, String::from_utf8_lossy(&head).into_owned())
}

const WS_HANDSHAKE: &str = "Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_the_upstream_refuses_is_relayed_as_it_is() {
    // A plain HTTP upstream answers an upgrade request like any other.
    let up = TestUpstream::start().await;
    let (r, client) = start(&up, "").await;
    let (_s, head) = raw_head(
        r.proxy_addr.unwrap(),
        &format!("GET /ws HTTP/1.1\r\n{WS_HANDSHAKE}\r\n"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 201"), "{head}");
    assert_eq!(up.calls(), 1);
    // The upstream was asked to upgrade: the headers went through.
    let seen = &up.seen()[0];
    assert_eq!(seen.headers["upgrade"], "websocket");
    assert_eq!(seen.headers["connection"], "upgrade");
    assert_eq!(upgraded(&r), 0);
    // The connection is still usable for ordinary requests.
    assert_eq!(client.send("GET", "/x", &[], "").await.status, 201);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_covered_method_that_asks_to_upgrade_takes_no_state() {
    let (up, _server) = echo_server().await;
    // POST is covered, with a key: still forwarded as an upgrade, no state.
    let r = idemgate(up, "").await;
    let (mut s, head) = raw_head(
        r.proxy_addr.unwrap(),
        &format!("POST /v1/charges HTTP/1.1\r\nIdempotency-Key: up-1\r\nContent-Length: 0\r\n{WS_HANDSHAKE}\r\n"),
    )
    .await;
    // tungstenite's server refuses a POST handshake (405 or 400): relayed.
    assert!(!head.starts_with("HTTP/1.1 101"), "{head}");
    s.shutdown().await.unwrap();
    let record = support::charge_record(r.admin_addr, "up-1").await;
    assert_eq!(record.status, 404, "no record was taken: {:?}", record.body);
    r.stop().await;
}

/// Open TCP connections (established, or closed by the peer and not yet
/// by us) with local port `local` or remote port `remote`, from the
/// kernel's table: what a task left behind would still hold. (The test
/// binary's other tests open descriptors of their own, so the process's
/// descriptor count would not tell.)
fn open_sockets(local: u16, remote: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let port = |c: &str| {
                c.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            };
            let open = matches!(cols.get(3), Some(&"01") | Some(&"08"));
            open && (port(cols[1]) == Some(local) || port(cols[2]) == Some(remote))
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_that_never_finish_leave_nothing_behind() {
    let (up, _server) = echo_server().await;
    let r = idemgate(up, "").await;
    let proxy = r.proxy_addr.unwrap();
    // Warm up: one full tunnel, so lazily made things exist already.
    let url = format!("ws://{proxy}/ws");
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    ws.close(None).await.unwrap();
    drop(ws);
    assert!(eventually(Duration::from_secs(5), || r.metrics.open_tunnels.get() == 0).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rt = tokio::runtime::Handle::current().metrics();
    let sockets = || open_sockets(proxy.port(), up.port());
    let (tasks_before, sockets_before) = (rt.num_alive_tasks(), sockets());

    for i in 0..100 {
        let mut s = TcpStream::connect(proxy).await.unwrap();
        let request = format!("GET /ws HTTP/1.1\r\n{WS_HANDSHAKE}\r\n");
        match i % 3 {
            // Gone half-way through its head.
            0 => s.write_all(&request.as_bytes()[..20]).await.unwrap(),
            // Sends frames before the 101, then goes.
            1 => {
                s.write_all(request.as_bytes()).await.unwrap();
                s.write_all(&[0x81, 0x85, 1, 2, 3, 4, 0, 0, 0, 0, 0])
                    .await
                    .unwrap();
            }
            // The whole head, then gone before reading the 101.
            _ => s.write_all(request.as_bytes()).await.unwrap(),
        }
        drop(s);
    }
    let settled = eventually(Duration::from_secs(10), || {
        rt.num_alive_tasks() <= tasks_before && sockets() <= sockets_before
    })
    .await;
    assert!(
        settled,
        "tasks {} (were {tasks_before}), connections {} (were {sockets_before}), open tunnels {}",
        rt.num_alive_tasks(),
        sockets(),
        r.metrics.open_tunnels.get()
    );
    assert_eq!(r.metrics.open_tunnels.get(), 0);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_count_against_max_connections() {
    let (up, _server) = echo_server().await;
    let r = idemgate(up, "max_connections = 2\n").await;
    let proxy = r.proxy_addr.unwrap();
    let url = format!("ws://{proxy}/ws");
    let (mut a, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let (mut b, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    // A third connection waits in the backlog while two tunnels are open.
    let third =
        tokio::spawn(async move { TestClient::new(proxy).send("GET", "/x", &[], "").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!third.is_finished(), "served past max_connections");
    a.send(Message::text("still here")).await.unwrap();
    assert_eq!(
        a.next().await.unwrap().unwrap(),
        Message::text("still here")
    );
    b.close(None).await.unwrap();
    drop(b);
    // One tunnel closed: the waiting connection is served (by the echo
    // server, which is no HTTP server: any answer will do).
    let served = tokio::time::timeout(Duration::from_secs(5), third).await;
    assert!(served.is_ok(), "the waiting connection was not served");
    a.close(None).await.unwrap();
    while a.next().await.is_some() {}
    drop(a);
    r.stop().await;
}
