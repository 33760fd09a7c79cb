//! Listeners, connection settings and graceful drain.
//!
//! [`run`] takes already-bound listeners and a shutdown future, so tests bind
//! port 0 and stop the server when they like. The proxy listener is served
//! here, on the shared runtime, or by event loops of its own (`loops`,
//! `event_loops`). On shutdown it stops accepting (on every loop), lets open
//! connections finish their requests, then waits for detached upstream
//! calls to store their results, all within `drain_timeout`; the loops end
//! after that.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::admin::Admin;
use crate::body::HoldBreak;
use crate::config::Config;
use crate::idempotency::seal::Keyring;
use crate::loops::{self, accept, Loops, Serve};
use crate::metrics::Metrics;
use crate::proxy::{Idempotency, Routing, Settings, SharedRouting, Tunnels};
use crate::reload::{self, ConfigSource, Targets};
use crate::store::{Opening, Sealing, Store};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("store: {0}")]
    Store(String),
    #[error("upstream: {0}")]
    Upstream(String),
}

/// The routing (policies and upstream clients) the proxy starts with;
/// `None` in dedup-only mode.
pub fn routing(config: &Config) -> Result<Option<SharedRouting>, StartError> {
    Ok(Routing::build(config, None)
        .map_err(StartError::Upstream)?
        .map(|r| Arc::new(arc_swap::ArcSwap::from_pointee(r))))
}

/// Opens the configured store, reporting into `metrics`.
pub async fn open_store(config: &Config, metrics: &Metrics) -> Result<Store, StartError> {
    let store = config
        .store
        .backend
        .open(opening(config, metrics)?)
        .await
        .map_err(|e| StartError::Store(e.to_string()))?;
    let store = store.with_metrics(metrics.clone());
    if !crate::telemetry::on() {
        return Ok(store);
    }
    // OpenTelemetry's names for the backends.
    let system = match config.store.backend.name() {
        "postgres" => "postgresql",
        "redis" => "redis",
        _ => "memory",
    };
    Ok(store.with_traces(system))
}

/// Creates or migrates the configured store's schema (`idemgate migrate`);
/// what it did.
pub async fn migrate_store(config: &Config, metrics: &Metrics) -> Result<String, StartError> {
    config
        .store
        .backend
        .migrate(opening(config, metrics)?)
        .await
        .map_err(|e| StartError::Store(e.to_string()))
}

/// What opening the configured backend takes.
fn opening<'a>(config: &Config, metrics: &'a Metrics) -> Result<Opening<'a>, StartError> {
    let keyring = match config.store.encryption.as_slice() {
        [] => None,
        keys => {
            let keys: Vec<(String, Vec<u8>)> = keys
                .iter()
                .map(|k| (k.id.clone(), k.material.clone()))
                .collect();
            Some(Keyring::new(&keys).map_err(|e| StartError::Store(e.to_string()))?)
        }
    };
    Ok(Opening {
        timeout: config.store.timeout,
        sealing: Sealing::new(keyring, Some(metrics.record_decode_errors.clone())),
        metrics: Some(metrics),
    })
}

/// The proxy listener (absent in dedup-only mode) and the admin listener.
pub struct Listeners {
    pub proxy: Option<Proxy>,
    pub admin: TcpListener,
}

/// The proxy's listening sockets: one, or one per event loop.
pub enum Proxy {
    /// Served on the main runtime.
    One(TcpListener),
    /// Each served by an event loop of its own (`event_loops`).
    Loops(Vec<std::net::TcpListener>),
}

impl Listeners {
    /// Binds the configured addresses; the proxy only with an upstream.
    pub async fn bind(config: &Config) -> Result<Self, StartError> {
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Listen { addr, source })
        };
        let proxy = match (&config.upstream, config.event_loops) {
            (None, _) => None,
            (Some(_), 0) => Some(Proxy::One(bind(config.listen).await?)),
            (Some(_), n) => Some(Proxy::Loops(loops::bind(config.listen, n).map_err(
                |source| StartError::Listen {
                    addr: config.listen,
                    source,
                },
            )?)),
        };
        Ok(Listeners {
            proxy,
            admin: bind(config.admin_listen).await?,
        })
    }

    /// The address the proxy listens on.
    pub fn proxy_addr(&self) -> Option<SocketAddr> {
        match self.proxy.as_ref()? {
            Proxy::One(l) => l.local_addr().ok(),
            Proxy::Loops(sockets) => sockets.first()?.local_addr().ok(),
        }
    }
}

/// Serves until `shutdown` resolves, then drains.
/// `routing` is [`routing`]'s; `reloads`, if given, is where a reload
/// (SIGHUP, a change of the file) reads the configuration again.
pub async fn run(
    config: Config,
    store: Store,
    metrics: Metrics,
    listeners: Listeners,
    routing: Option<SharedRouting>,
    reloads: Option<ConfigSource>,
    shutdown: impl Future<Output = ()>,
) {
    let tasks = TaskTracker::new();
    let graceful = Arc::new(GracefulShutdown::new());
    // Consumers stop fetching when this is cancelled; their deliveries in
    // flight finish on `tasks`, within the drain.
    let consumers = tokio_util::sync::CancellationToken::new();
    let running_consumers = crate::deliver::start(&config, &store, &metrics, &consumers, &tasks);

    let tunnels = Tunnels::new(metrics.open_tunnels.clone());
    let proxy = routing.clone().map(|routing| {
        let settings = Settings {
            on_store_error: config.store.on_store_error,
            body_read_timeout: config.body_read_timeout,
            store_timeout: config.store.timeout,
            tasks: tasks.clone(),
            tunnels: tunnels.clone(),
            metrics: metrics.clone(),
        };
        Idempotency::new(store.clone(), settings, routing)
    });
    let admin_policies = Arc::new(arc_swap::ArcSwap::from_pointee(config.policies.clone()));
    let admin = Admin::new(
        store.clone(),
        metrics.clone(),
        admin_policies.clone(),
        config.dedup.clone(),
        &config.admin_tokens,
        running_consumers,
    );
    metrics.config_last_reload_success.set(reload::unix_now());
    for u in config.default_upstream.iter().chain(
        config
            .policies
            .routes
            .iter()
            .filter_map(|r| r.upstream.as_ref()),
    ) {
        if u.danger_accept_invalid_certs {
            tracing::warn!(upstream = %u.uri, "danger_accept_invalid_certs: the upstream's certificate is NOT verified; anyone on the path can read and change this traffic");
        }
    }
    let watcher = reloads.map(|source| {
        tokio::spawn(reload::watch(
            source,
            config.clone(),
            Targets {
                routing: routing.clone(),
                admin_policies,
                metrics: metrics.clone(),
            },
        ))
    });
    for w in &config.warnings {
        tracing::warn!("config: {w}");
    }
    for route in &config.policies.routes {
        if let Some(check) = &route.policy.webhook {
            metrics.webhook_preset(check.verifier.preset.name());
        }
    }
    if config.admin_tokens.write.is_none() && !config.admin_listen.ip().is_loopback() {
        tracing::warn!(
            admin = %config.admin_listen,
            "the admin API listens beyond loopback without admin_token: anyone who reaches it can read records, purge keys and drive the dedup API"
        );
    }

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        // Header floods end in 431 long before they cost memory.
        .max_headers(100)
        .max_buf_size(64 * 1024)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(1024)
        .max_header_list_size(64 * 1024)
        .keep_alive_interval(Some(Duration::from_secs(30)));

    // Each listener serves at most `max_connections` at once: a permit is
    // taken before accepting, so the next connection waits in the kernel's
    // listen backlog (not refused, not lost) until one closes.
    let proxy_limit = Arc::new(Semaphore::new(config.max_connections));
    let admin_limit = Arc::new(Semaphore::new(config.max_connections));
    let serve = proxy.map(|idempotency| ServeProxy {
        idempotency,
        builder: builder.clone(),
    });
    let (proxy_listener, mut loops) = match (listeners.proxy, &serve) {
        (Some(Proxy::One(listener)), Some(_)) => (Some(listener), None),
        (Some(Proxy::Loops(sockets)), Some(serve)) => {
            let loops = Loops::start(sockets, &proxy_limit, &graceful, serve);
            (None, Some(loops))
        }
        _ => (None, None),
    };
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            a = accept(proxy_listener.as_ref(), &proxy_limit) => a.map(|s| (s, true)),
            a = accept(Some(&listeners.admin), &admin_limit) => a.map(|s| (s, false)),
        };
        let ((stream, permit), is_proxy) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Usually EMFILE: back off instead of spinning on the error.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if is_proxy {
            if let Some(serve) = &serve {
                serve.serve(stream, permit, graceful.watcher());
            }
        } else {
            let _ = stream.set_nodelay(true);
            let io = TokioIo::new(stream);
            let conn = builder.serve_connection(io, admin.service());
            let conn = graceful.watch(conn.into_owned());
            tokio::spawn(async move {
                let _ = conn.await;
                drop(permit);
            });
        }
    }

    drop(proxy_listener);
    drop(listeners.admin);
    // The loops stop accepting before the drain starts, and keep running
    // what they hold until it ends.
    if let Some(l) = &mut loops {
        l.stop_accepting().await;
    }
    consumers.cancel();
    if let Some(w) = watcher {
        w.abort();
    }
    let deadline = Instant::now() + config.drain_timeout;
    tracing::info!(drain_timeout = ?config.drain_timeout, "shutting down: draining connections");
    // The loops have let go of it: they no longer accept.
    match Arc::try_unwrap(graceful) {
        Ok(graceful) => {
            if tokio::time::timeout_at(deadline, graceful.shutdown())
                .await
                .is_err()
            {
                tracing::warn!("drain timeout reached with connections still open");
            }
        }
        Err(_) => tracing::warn!("an event loop still accepts; its connections are not drained"),
    }
    tasks.close();
    if tokio::time::timeout_at(deadline, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            pending = tasks.len(),
            "drain timeout reached with upstream calls still running"
        );
    }
    // Tunnels (WebSockets) run until they close or the drain time is up.
    tunnels.drain(deadline).await;
    if let Some(l) = loops {
        l.end().await;
    }
}

/// Serves accepted proxy connections on the current runtime.
#[derive(Clone)]
struct ServeProxy {
    idempotency: Idempotency,
    builder: auto::Builder<TokioExecutor>,
}

impl Serve for ServeProxy {
    fn serve(&self, stream: TcpStream, permit: OwnedSemaphorePermit, watcher: Watcher) {
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(stream);
        // The connection's permit stays taken while the connection, or a
        // tunnel it became, is open.
        let svc = self.idempotency.holding(Arc::new(permit));
        // Breaks reach the client after the bytes before them (body.rs).
        let svc = tower::ServiceExt::<http::Request<hyper::body::Incoming>>::map_response(
            svc,
            hold_breaks,
        );
        let conn = self
            .builder
            .serve_connection_with_upgrades(io, TowerToHyperService::new(svc));
        let conn = watcher.watch(conn.into_owned());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "proxy connection ended with an error");
            }
        });
    }
}

/// A server started in the background, as tests and `demo` use it.
pub struct Running {
    pub proxy_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    pub store: Store,
    /// This instance's metrics, on its own registry.
    pub metrics: Metrics,
    stop: Option<oneshot::Sender<()>>,
    join: JoinHandle<()>,
}

impl Running {
    /// Binds the configured addresses (use port 0 for free ones) and serves.
    pub async fn start(config: Config) -> Result<Self, StartError> {
        let metrics = Metrics::standalone();
        let store = open_store(&config, &metrics).await?;
        Self::start_with(config, store, metrics).await
    }

    /// Like [`Running::start`] with a store the caller opened (and may share).
    pub async fn start_with(
        config: Config,
        store: Store,
        metrics: Metrics,
    ) -> Result<Self, StartError> {
        let listeners = Listeners::bind(&config).await?;
        let proxy_addr = listeners.proxy_addr();
        let admin_addr = listeners
            .admin
            .local_addr()
            .map_err(|source| StartError::Listen {
                addr: config.admin_listen,
                source,
            })?;
        let routing = routing(&config)?;
        let (tx, rx) = oneshot::channel::<()>();
        let join = tokio::spawn(run(
            config,
            store.clone(),
            metrics.clone(),
            listeners,
            routing,
            None,
            async move {
                let _ = rx.await;
            },
        ));
        Ok(Running {
            proxy_addr,
            admin_addr,
            store,
            metrics,
            stop: Some(tx),
            join,
        })
    }

    /// Shuts down gracefully and waits for the drain to finish.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.join).await;
    }
}

fn hold_breaks(resp: http::Response<crate::Body>) -> http::Response<HoldBreak> {
    resp.map(HoldBreak::new)
}
