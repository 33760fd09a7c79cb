//! Event loops (`event_loops`): the proxy listener served by threads that
//! each run a single-threaded tokio runtime and accept on a listening socket
//! of their own, bound to the same address with `SO_REUSEPORT`, so the
//! kernel spreads new connections over them. A connection, the requests on
//! it, their covered calls and the plaintext upstream connections they drive
//! stay on the loop that accepted it: no work stealing, no wake-up of
//! another thread on the request path (nginx's shape).
//!
//! What stays shared: the store (the memory store's shards; a PostgreSQL
//! client's connections and their tasks, which live on the main runtime;
//! the Redis store's pub/sub connection, while each loop calls Redis on a
//! connection it opens for itself), the replay cache, the routing
//! snapshot, the metrics, and the connection limit. Each loop says which
//! it is ([`crate::store::event_loop`]) so both know whose connections to
//! use. The admin listener, the consumers, reloads and every
//! background task run on the main runtime as without loops.
//!
//! On shutdown the loops stop accepting first; each keeps running what it
//! holds (connections, covered calls, tunnels) until the server's drain is
//! over, then ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// Binds `n` listening sockets to `addr` with `SO_REUSEPORT` (port 0: the
/// first one's port for the rest).
pub fn bind(addr: SocketAddr, n: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut sockets = Vec::with_capacity(n);
    let mut at = addr;
    for _ in 0..n {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(at),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        // As tokio's own bind does, so a restart finds the port free.
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&at.into())?;
        socket.listen(1024)?;
        let listener: std::net::TcpListener = socket.into();
        at = listener.local_addr()?;
        sockets.push(listener);
    }
    Ok(sockets)
}

/// What a loop does with an accepted connection: serve it on the current
/// (the loop's) runtime, watched by the drain.
pub trait Serve: Clone + Send + 'static {
    fn serve(&self, stream: TcpStream, permit: OwnedSemaphorePermit, watcher: Watcher);
}

/// The running loops.
pub struct Loops {
    stop: watch::Sender<bool>,
    /// Each loop answers (or drops its sender) once it stopped accepting.
    stopped: Vec<oneshot::Receiver<()>>,
    /// Cancelled when the drain is over: the loops then end.
    release: CancellationToken,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Loops {
    /// A loop per socket. `graceful` is shared until the loops stop
    /// accepting; `limit` bounds the connections of all of them together.
    pub fn start<S: Serve>(
        sockets: Vec<std::net::TcpListener>,
        limit: &Arc<Semaphore>,
        graceful: &Arc<GracefulShutdown>,
        serve: &S,
    ) -> Self {
        let (stop, stop_rx) = watch::channel(false);
        let release = CancellationToken::new();
        let mut stopped = Vec::new();
        let mut threads = Vec::new();
        // Logs from the loops go where the caller's go (a test's scoped
        // subscriber too).
        let dispatch = tracing::dispatcher::get_default(Clone::clone);
        for (i, socket) in sockets.into_iter().enumerate() {
            let (done, done_rx) = oneshot::channel();
            let one = Loop {
                n: i + 1,
                socket,
                limit: limit.clone(),
                graceful: graceful.clone(),
                serve: serve.clone(),
                stop: stop_rx.clone(),
                done,
                release: release.clone(),
            };
            let dispatch = dispatch.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("idemgate-loop-{}", i + 1))
                .spawn(move || {
                    let _logs = tracing::dispatcher::set_default(&dispatch);
                    one.run();
                });
            match spawned {
                Ok(t) => {
                    stopped.push(done_rx);
                    threads.push(t);
                }
                // Its socket is closed with it: the kernel sends its share
                // of connections to the other loops.
                Err(e) => tracing::error!(error = %e, "cannot start an event loop thread"),
            }
        }
        Loops {
            stop,
            stopped,
            release,
            threads,
        }
    }

    /// Stops accepting on every loop; returns once none accepts any more
    /// (and none holds the drain's handle).
    pub async fn stop_accepting(&mut self) {
        let _ = self.stop.send(true);
        for s in self.stopped.drain(..) {
            let _ = s.await;
        }
    }

    /// Ends the loops once the drain is over: what they still run is
    /// dropped with their runtimes.
    pub async fn end(self) {
        self.release.cancel();
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}

/// One loop, as its thread gets it.
struct Loop<S> {
    n: usize,
    socket: std::net::TcpListener,
    limit: Arc<Semaphore>,
    graceful: Arc<GracefulShutdown>,
    serve: S,
    stop: watch::Receiver<bool>,
    done: oneshot::Sender<()>,
    release: CancellationToken,
}

impl<S: Serve> Loop<S> {
    fn run(self) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot start an event loop's runtime");
                return;
            }
        };
        crate::store::event_loop::enter(self.n);
        runtime.block_on(self.serve_until_released());
    }

    async fn serve_until_released(self) {
        let Loop {
            socket,
            limit,
            graceful,
            serve,
            mut stop,
            done,
            release,
            ..
        } = self;
        let listener = match TcpListener::from_std(socket) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "an event loop cannot take its socket");
                return;
            }
        };
        loop {
            let accepted = tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                a = accept(Some(&listener), &limit) => a,
            };
            match accepted {
                Ok((stream, permit)) => serve.serve(stream, permit, graceful.watcher()),
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning on it.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        drop(listener);
        // The drain takes it back once every loop has let go of it.
        drop(graceful);
        let _ = done.send(());
        release.cancelled().await;
    }
}

/// The next connection, once `limit` has room for it.
pub async fn accept(
    listener: Option<&TcpListener>,
    limit: &Arc<Semaphore>,
) -> std::io::Result<(TcpStream, OwnedSemaphorePermit)> {
    let Some(listener) = listener else {
        return std::future::pending().await;
    };
    // Never closed: a closed semaphore would only end accepting.
    let Ok(permit) = limit.clone().acquire_owned().await else {
        return std::future::pending().await;
    };
    listener.accept().await.map(|(s, _)| (s, permit))
}
