//! The plaintext HTTP/1.1 upstream pool (connections driven by the request's
//! own task): connections are reused, an upstream that closes idle
//! connections never costs a request or runs one twice, a response read
//! only in part never leaves its connection in the pool, and idle
//! connections the upstream closed are closed here too.
//!
//! The upstream is a raw socket server so that each test controls exactly
//! when connections close, and counts connections and requests.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::{start_at, unique};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How the raw upstream treats a connection after answering.
#[derive(Clone, Copy)]
enum After {
    /// Keep it open for the next request.
    KeepAlive,
    /// Close it right after the response, without saying so
    /// (no `Connection: close`): what a server's idle timeout does.
    Close,
    /// Keep it open for `ms` of idleness, then close it, and report when
    /// the other side (idemgate) closed it too.
    IdleClose(u64),
}

struct Raw {
    addr: std::net::SocketAddr,
    conns: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    /// Connections idemgate closed after the upstream closed them.
    closed_back: Arc<AtomicUsize>,
}

impl Raw {
    async fn start(after: After) -> Raw {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let raw = Raw {
            addr: listener.local_addr().unwrap(),
            conns: Arc::default(),
            requests: Arc::default(),
            closed_back: Arc::default(),
        };
        let (conns, requests, closed_back) = (
            raw.conns.clone(),
            raw.requests.clone(),
            raw.closed_back.clone(),
        );
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                conns.fetch_add(1, Ordering::SeqCst);
                let (requests, closed_back) = (requests.clone(), closed_back.clone());
                tokio::spawn(serve(s, after, requests, closed_back));
            }
        });
        raw
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

async fn serve(
    mut s: TcpStream,
    after: After,
    requests: Arc<AtomicUsize>,
    closed_back: Arc<AtomicUsize>,
) {
    let mut buf = Vec::new();
    loop {
        let idle = match after {
            After::IdleClose(ms) => Duration::from_millis(ms),
            _ => Duration::from_secs(30),
        };
        let Some((method, path, len)) =
            (match tokio::time::timeout(idle, read_head(&mut s, &mut buf)).await {
                Ok(head) => head,
                Err(_) => {
                    // Idle too long: close our side, then see whether idemgate
                    // closes its side (it reads our FIN) rather than keeping a
                    // half-closed socket.
                    let _ = s.shutdown().await;
                    let mut rest = [0u8; 64];
                    if let Ok(Ok(0)) =
                        tokio::time::timeout(Duration::from_secs(5), s.read(&mut rest)).await
                    {
                        closed_back.fetch_add(1, Ordering::SeqCst);
                    }
                    return;
                }
            })
        else {
            return;
        };
        while buf.len() < len {
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..len);
        let n = requests.fetch_add(1, Ordering::SeqCst) + 1;
        let answer = match (method.as_str(), path.as_str()) {
            ("HEAD", _) => "HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n".to_string(),
            (_, "/empty") => "HTTP/1.1 204 No Content\r\n\r\n".to_string(),
            (_, "/split") => {
                // Head and body in two writes, Nagle on (the socket's
                // default): the body waits for the head's ACK.
                let body = format!("call {n}");
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
                if s.write_all(head.as_bytes()).await.is_err()
                    || s.write_all(body.as_bytes()).await.is_err()
                {
                    return;
                }
                continue;
            }
            (_, "/size") => {
                let body = len.to_string();
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                )
            }
            (_, "/big") => {
                // 10 MB in 64 KiB writes, then the connection stays usable.
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10485760\r\n\r\n")
                    .await;
                let chunk = vec![b'y'; 65536];
                for _ in 0..160 {
                    if s.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
                continue;
            }
            (_, "/long") => {
                // A long body the client will not read to the end.
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10000000\r\n\r\n")
                    .await;
                let chunk = vec![b'x'; 65536];
                while s.write_all(&chunk).await.is_ok() {}
                return;
            }
            _ => {
                let body = format!("call {n}");
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                )
            }
        };
        if s.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
        if let After::Close = after {
            return;
        }
    }
}

/// Reads one request head from `s` (leaving any body bytes in `buf`):
/// method, path and content length. `None` when the connection ends.
async fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, String, usize)> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            buf.drain(..end + 4);
            let mut words = head.split_whitespace();
            let method = words.next()?.to_ascii_uppercase();
            let path = words.next()?.to_string();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            return Some((method, path, len));
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[tokio::test]
async fn sequential_requests_reuse_one_connection() {
    let up = Raw::start(After::KeepAlive).await;
    let (idg, client) = start_at(&up.url(), "").await;
    for i in 1..=20 {
        // Covered (a key), pass-through, HEAD and an empty 204 alike.
        let key = unique("reuse");
        let got = client.post("/v1/x", &key, "{}").await;
        assert_eq!(got.status, 200);
        let got = client.send("GET", "/v1/x", &[], "").await;
        assert_eq!(got.status, 200);
        let got = client.send("HEAD", "/v1/x", &[], "").await;
        assert_eq!(got.status, 200);
        let got = client.send("GET", "/empty", &[], "").await;
        assert_eq!(got.status, 204);
        assert_eq!(up.requests.load(Ordering::SeqCst), 4 * i);
    }
    assert_eq!(up.conns.load(Ordering::SeqCst), 1, "one connection, reused");
    idg.stop().await;
}

#[tokio::test]
async fn an_upstream_closing_after_each_response_costs_no_request_and_runs_none_twice() {
    let up = Raw::start(After::Close).await;
    let (idg, client) = start_at(&up.url(), "").await;
    for i in 1..=30 {
        let key = unique("closing");
        let got = client.post("/v1/x", &key, "{}").await;
        assert_eq!(got.status, 200, "request {i}: {got:?}");
        assert_eq!(&got.body[..], format!("call {i}").as_bytes());
        // A short pause lets the upstream's FIN arrive before the next
        // checkout sometimes, and sometimes not.
        if i % 2 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    assert_eq!(up.requests.load(Ordering::SeqCst), 30, "each ran once");
    idg.stop().await;
}

#[tokio::test]
async fn idle_connections_the_upstream_closes_are_closed_here_and_not_used() {
    let up = Raw::start(After::IdleClose(200)).await;
    let (idg, client) = start_at(&up.url(), "").await;
    for i in 1..=3 {
        let got = client.post("/v1/x", &unique("idle"), "{}").await;
        assert_eq!(got.status, 200);
        assert_eq!(&got.body[..], format!("call {i}").as_bytes());
        // Past the upstream's idle timeout: its FIN is in before the next.
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert_eq!(up.requests.load(Ordering::SeqCst), 3);
    assert_eq!(up.conns.load(Ordering::SeqCst), 3);
    // Each closed connection was closed on idemgate's side as well (the
    // upstream waits up to 5 s for that; idle connections are checked every
    // second), not left half-closed in the pool.
    for _ in 0..100 {
        if up.closed_back.load(Ordering::SeqCst) == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(up.closed_back.load(Ordering::SeqCst), 3);
    idg.stop().await;
}

#[tokio::test]
async fn a_response_read_in_part_closes_its_connection() {
    let up = Raw::start(After::KeepAlive).await;
    let (idg, client) = start_at(&up.url(), "").await;
    // A pass-through client that reads the head and leaves.
    let mut s = TcpStream::connect(idg.proxy_addr.unwrap()).await.unwrap();
    s.write_all(b"GET /long HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 1024];
    let n = s.read(&mut head).await.unwrap();
    assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"));
    drop(s);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The next request needs (and gets) a connection of its own: the first
    // one is mid-body and must not serve it.
    let got = client.send("GET", "/v1/x", &[], "").await;
    assert_eq!(got.status, 200);
    assert_eq!(&got.body[..], b"call 2");
    assert_eq!(up.conns.load(Ordering::SeqCst), 2);
    idg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_both_ways_go_through_and_keep_the_connection() {
    // Megabytes each way through one driven connection, read to the end
    // and reused.
    let up = Raw::start(After::KeepAlive).await;
    let (idg, client) = start_at(&up.url(), "").await;
    let upload = "u".repeat(8 << 20);
    for _ in 0..3 {
        let got = client.send("POST", "/size", &[], &upload).await;
        assert_eq!(got.status, 200);
        assert_eq!(&got.body[..], (8 << 20).to_string().as_bytes());
        let got = client.send("GET", "/big", &[], "").await;
        assert_eq!(got.status, 200);
        assert_eq!(got.body.len(), 10 << 20);
        assert!(got.body.iter().all(|&b| b == b'y'));
    }
    assert_eq!(up.requests.load(Ordering::SeqCst), 6);
    assert_eq!(up.conns.load(Ordering::SeqCst), 1);
    idg.stop().await;
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_body_written_after_its_head_is_not_held_by_a_delayed_ack() {
    // An upstream without TCP_NODELAY that writes head and body apart
    // sends the body only once its head is acknowledged; delaying that ACK
    // (Linux delays it 40 ms on a request/response connection) held every
    // such response 40 ms. Ten responses on one reused connection: the
    // slowest would take 40 ms or more each if any ACK were delayed.
    let up = Raw::start(After::KeepAlive).await;
    let (idg, client) = start_at(&up.url(), "").await;
    let mut took = Vec::new();
    for i in 0..12 {
        let started = std::time::Instant::now();
        let got = if i % 2 == 0 {
            client.send("GET", "/split", &[], "").await
        } else {
            client
                .send(
                    "POST",
                    "/split",
                    &[("idempotency-key", &unique("split"))],
                    "{}",
                )
                .await
        };
        assert_eq!(got.status, 200);
        took.push(started.elapsed());
    }
    assert_eq!(up.conns.load(Ordering::SeqCst), 1);
    took.sort();
    // The median of twelve, past the first two (connection set-up).
    assert!(
        took[6] < Duration::from_millis(30),
        "responses took {took:?}"
    );
    idg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_each_get_a_connection_and_all_return_to_the_pool() {
    let up = Raw::start(After::KeepAlive).await;
    let (idg, client) = start_at(&up.url(), "").await;
    for _round in 0..3 {
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let c = client.clone();
                tokio::spawn(async move { c.post("/v1/x", &unique("conc"), "{}").await })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().status, 200);
        }
    }
    assert_eq!(up.requests.load(Ordering::SeqCst), 150);
    // At most one connection per request in flight; rounds two and three
    // found the first round's connections idle.
    let conns = up.conns.load(Ordering::SeqCst);
    assert!(conns <= 50, "{conns} connections for 50 at a time");
    idg.stop().await;
}
