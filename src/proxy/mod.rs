//! The HTTP side: the [`Idempotency`] service in front of pooled
//! [`Upstream`] clients. The files form one chain, each using only those
//! after it:
//!
//! `service` (the tower service) → `intake` (route, key, body, signature:
//! no state) → `flow` (the settling loop over begin / decide / run / wait)
//! → `job` (a request that holds the lease, with its guard) → `timed` (the
//! upstream call, observed) → `context` (what they all share: settings,
//! the covered request, how a request ended) → [`tunnel`] (upgrades joined
//! to their upstream) → `reconcile` (asking the upstream about an unknown
//! outcome), `records` (what a record is made from and gives back), `live`
//! (a response while it streams), `grpc` (what a gRPC call is), [`routing`]
//! (policies and upstreams, swapped by a reload) → [`upstream`] (the
//! clients, plaintext, h2c or TLS) → `driven` (plaintext HTTP/1.1
//! connections polled by the request's own task) → `headers` (the header
//! names idemgate adds and the hop-by-hop rule).
//!
//! The stack, outside in: hyper connection (framing, header limits) →
//! [`Idempotency`] (decides per request: pass through, refuse, replay, wait or
//! run) → [`Upstream`] (rewrite the URI, strip hop-by-hop headers, pooled
//! client with a timeout). Idempotency sits outside the client so that a
//! covered call can be moved onto a detached task with its own clone of the
//! client, and outlive the caller's connection.

mod context;
mod driven;
mod flow;
mod grpc;
pub mod headers;
mod intake;
mod job;
mod live;
mod reconcile;
mod records;
pub mod routing;
mod service;
mod timed;
pub mod tunnel;
pub mod upstream;

pub use context::{Covered, FoundKey, Handled, Reply, Settings};
pub use headers::{
    strip_hop_by_hop, IDEMPOTENCY_FENCE, IDEMPOTENT_BODY_OMITTED, IDEMPOTENT_RECONCILED,
    IDEMPOTENT_REPLAYED,
};
pub use routing::{Routing, SharedRouting};
pub use service::Idempotency;
pub use tunnel::{Hold, Tunnels};
pub use upstream::Upstream;
