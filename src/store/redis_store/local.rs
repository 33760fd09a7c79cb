//! The store's connections, and one per event loop (`event_loops`).
//!
//! The redis crate's connection is multiplexed: a task of its own writes
//! the commands and reads the replies, on the runtime that opened it. The
//! store's shared connection lives on the main runtime, so on an event
//! loop every reply woke the loop from another thread (2.4 context
//! switches per new key where the default runtime pays 0.7). So each loop
//! opens a connection of its own the first time it calls the store, and
//! from then on its calls use it: the command, the reply and the request
//! waiting for it stay on one thread. On standalone Redis over plain TCP
//! that connection is [`Driven`] (written and read by the loop's calls
//! themselves, no task between); over TLS or a Unix socket, and on
//! Cluster, it is the crate's. Until it is open (or while opening it
//! fails) the loop uses the shared one; one that broke is opened again. A
//! loop's connection carries no pub/sub: waiters and the replay cache's
//! invalidations stay on the shared connection, whose push messages they
//! read.
//!
//! The connections are kept per thread, so they end with their loop.
//! Everything else (the main runtime's tasks, tests' runtimes) uses the
//! shared connection.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ConnectionAddr, RedisFuture, Value};

use super::driven::Driven;
use crate::store::event_loop;

/// A connection to Redis; clones share it.
#[derive(Clone)]
pub(super) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    /// An event loop's own, on standalone Redis over plain TCP.
    Driven(Driven),
}

/// The store's shared connection, the redis crate's: the one that
/// carries pub/sub, so never a loop's [`Driven`] one.
#[derive(Clone)]
pub(super) enum Shared {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl From<Shared> for Conn {
    fn from(shared: Shared) -> Conn {
        match shared {
            Shared::Single(c) => Conn::Single(c),
            Shared::Cluster(c) => Conn::Cluster(c),
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Driven(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Driven(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Driven(c) => c.get_db(),
        }
    }
}

/// How to open one more connection like the shared one, without pub/sub.
#[derive(Clone)]
pub(super) enum Opener {
    Single(redis::Client, ConnectionManagerConfig),
    Cluster(ClusterClient),
}

impl Opener {
    async fn open(self, bound: Duration) -> Result<Conn, String> {
        let opening = async {
            match self {
                Opener::Single(client, cfg) => {
                    let info = client.get_connection_info();
                    if let ConnectionAddr::Tcp(host, port) = info.addr() {
                        return Driven::open(host, *port, info.redis_settings(), bound)
                            .await
                            .map(Conn::Driven);
                    }
                    ConnectionManager::new_with_config(client, cfg)
                        .await
                        .map(Conn::Single)
                }
                Opener::Cluster(client) => client.get_async_connection().await.map(Conn::Cluster),
            }
        };
        match tokio::time::timeout(bound, opening).await {
            Err(_) => Err(format!("no connection within {bound:?}")),
            Ok(r) => r.map_err(|e| e.to_string()),
        }
    }
}

/// How long a loop whose connection did not open uses the shared one
/// before it tries again.
const RETRY: Duration = Duration::from_secs(1);

/// A loop's connection for one store.
enum Slot {
    Opening,
    Open(Conn),
    Failed(Instant),
}

thread_local! {
    /// This thread's connections, by store.
    static SLOTS: RefCell<Vec<(u64, Slot)>> = const { RefCell::new(Vec::new()) };
}

/// Tells stores apart in [`SLOTS`] (an address could be reused).
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The shared connection, and how each loop opens its own.
pub(super) struct Conns {
    id: u64,
    shared: Shared,
    opener: Opener,
    /// Bounds opening a loop's connection.
    bound: Duration,
}

impl Conns {
    pub(super) fn new(shared: Shared, opener: Opener, bound: Duration) -> Self {
        Conns {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            shared,
            opener,
            bound,
        }
    }

    /// The connection that carries pub/sub.
    pub(super) fn shared(&self) -> &Shared {
        &self.shared
    }

    /// The connection for a call made now: this loop's own once open, the
    /// shared one otherwise (off the loops, and until it is open). A task
    /// on a loop never moves to another thread, so a caller that needs two
    /// calls on one connection (a write, then `WAIT` for it) takes it once
    /// and uses it for both.
    pub(super) fn pick(&self) -> Conn {
        if event_loop::current() == 0 {
            return self.shared.clone().into();
        }
        let found = SLOTS.with(|slots| {
            let mut slots = slots.borrow_mut();
            let Some(at) = slots.iter().position(|(id, _)| *id == self.id) else {
                slots.push((self.id, Slot::Opening));
                return Err(());
            };
            match &slots[at].1 {
                Slot::Open(Conn::Driven(c)) if c.is_broken() => {
                    slots[at].1 = Slot::Opening;
                    Err(())
                }
                Slot::Open(c) => Ok(Some(c.clone())),
                Slot::Opening => Ok(None),
                Slot::Failed(at_time) if at_time.elapsed() < RETRY => Ok(None),
                Slot::Failed(_) => {
                    slots[at].1 = Slot::Opening;
                    Err(())
                }
            }
        });
        match found {
            Ok(Some(c)) => c,
            Ok(None) => self.shared.clone().into(),
            Err(()) => {
                self.open_here();
                self.shared.clone().into()
            }
        }
    }

    /// What this thread's own connection is, once open: `"driven"`
    /// ([`Driven`]) or `"crate"` (the redis crate's); `None` while it is
    /// not open, and off the loops.
    pub(super) fn kind_here(&self) -> Option<&'static str> {
        SLOTS.with(
            |slots| match slots.borrow().iter().find(|(id, _)| *id == self.id) {
                Some((_, Slot::Open(Conn::Driven(_)))) => Some("driven"),
                Some((_, Slot::Open(_))) => Some("crate"),
                _ => None,
            },
        )
    }

    /// Opens this loop's connection on the loop itself (a single-threaded
    /// runtime: the task, and the connection's own, run on this thread).
    fn open_here(&self) {
        let (id, opener, bound) = (self.id, self.opener.clone(), self.bound);
        tokio::spawn(async move {
            let slot = match opener.open(bound).await {
                Ok(c) => Slot::Open(c),
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        "an event loop cannot open its own Redis connection; it uses the shared one"
                    );
                    Slot::Failed(Instant::now())
                }
            };
            SLOTS.with(|slots| {
                if let Some((_, s)) = slots.borrow_mut().iter_mut().find(|(i, _)| *i == id) {
                    *s = slot;
                }
            });
        });
    }
}
