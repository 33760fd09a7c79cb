//! idemgate: an idempotency and deduplication sidecar.
//!
//! A map of the crate, from the pure core outwards:
//!
//! - [`idempotency`]: socket-free core. Parses `Idempotency-Key`, derives the
//!   scoped record key and the request fingerprint, encodes stored responses
//!   and decides what a request's store state means ([`idempotency::state`]).
//! - [`checker`]: loose TOML values → checked ones, every problem named by
//!   its key path (the configuration and each store backend use it).
//! - [`store`]: the storage contract ([`store::RecordStore`] for HTTP records,
//!   [`store::DedupStore`] for consumer dedup, [`store::BucketStore`] for
//!   fair share), the [`store::Store`] handle, and the backends, each in its
//!   folder and registered by name: in-memory, Redis and PostgreSQL.
//! - [`webhook`]: webhook providers' keys and signature checks.
//! - [`proxy`]: the tower service [`proxy::Idempotency`] that applies the
//!   semantics around [`proxy::Upstream`], a pooled hyper client.
//! - [`dedup`]: the consumer dedup API (claim / complete / release, mark)
//!   for queue workers, on the same stores.
//! - [`deliver`]: the delivery mode: idemgate reads a Redis stream, a
//!   RabbitMQ queue or a NATS JetStream stream and hands each message to a
//!   worker over HTTP, its effect once.
//! - [`config`]: loose file/env/CLI input validated into [`config::Config`].
//! - [`server`]: listeners, connection limits, graceful drain; [`admin`]: the
//!   admin listener; [`reload`]: the configuration read again while running.
//! - [`body`]: reading bodies up to a limit.
//! - [`error`]: typed errors and the one place they become HTTP responses.
//! - [`metrics`]: the Prometheus metrics, on a registry the caller owns.
//! - [`pages`]: transparent huge pages off for the process, so resident
//!   memory follows the records held.
//! - [`tls`]: the TLS client settings upstreams, the trace exporter and `amqps://` consumers share.
//! - [`telemetry`]: OpenTelemetry traces (OTLP export, W3C Trace Context,
//!   the link from a replay to the request that ran).
//!
//! The binary (`src/bin/idemgate/`) is the edge: `main` (errors to exit
//! codes, in one place), `demo` and `healthcheck`. ARCHITECTURE.md draws the
//! module graph and the life of a request.
#![forbid(unsafe_code)]

pub mod admin;
pub mod body;
pub mod checker;
pub mod config;
pub mod dedup;
pub mod deliver;
pub mod error;
pub mod idempotency;
pub mod loops;
pub mod metrics;
pub mod pages;
pub mod proxy;
pub mod reload;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod webhook;

/// The body type every idemgate response and forwarded request uses.
pub type Body = http_body_util::combinators::BoxBody<bytes::Bytes, BoxError>;

/// A boxed error, as bodies and hyper services carry them.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
