//! A fault-injecting TCP proxy for tests: placed between idemgate and Redis
//! or the upstream, it passes bytes through, or delays them, stalls them,
//! resets connections, or forwards one byte at a time. The mode can change
//! while connections are open.
#![allow(dead_code)]
// SO_LINGER 0 makes a close send RST, which is the fault being injected; with
// a zero linger the close never blocks, the reason tokio deprecates it.
#![allow(deprecated)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Pass,
    /// Each chunk waits this long before it is forwarded.
    Latency(Duration),
    /// Nothing is forwarded until the mode changes.
    Stall,
    /// Connections are reset (RST) at their next chunk, new ones at once.
    Reset,
    /// Chunks are forwarded one byte per write.
    Slice,
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    mode: Arc<Mutex<Fault>>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(Mutex::new(Fault::Pass));
        let m = mode.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let m = m.clone();
                tokio::spawn(async move {
                    if *m.lock().unwrap() == Fault::Reset {
                        let _ = client.set_linger(Some(Duration::ZERO));
                        return;
                    }
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let _ = client.set_linger(Some(Duration::ZERO));
                    let _ = server.set_linger(Some(Duration::ZERO));
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let up = tokio::spawn(pump(cr, sw, m.clone()));
                    let down = tokio::spawn(pump(sr, cw, m));
                    // When either direction ends, end both (drops reset them).
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                    }
                });
            }
        });
        FaultProxy { addr, mode, task }
    }

    pub fn set(&self, fault: Fault) {
        *self.mode.lock().unwrap() = fault;
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mode: Arc<Mutex<Fault>>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        loop {
            let now = *mode.lock().unwrap();
            match now {
                Fault::Stall => tokio::time::sleep(Duration::from_millis(20)).await,
                Fault::Reset => return,
                Fault::Latency(d) => {
                    tokio::time::sleep(d).await;
                    if to.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                    break;
                }
                Fault::Slice => {
                    for b in &buf[..n] {
                        if to.write_all(std::slice::from_ref(b)).await.is_err() {
                            return;
                        }
                    }
                    break;
                }
                Fault::Pass => {
                    if to.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                    break;
                }
            }
        }
    }
}
