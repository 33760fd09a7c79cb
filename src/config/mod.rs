//! Configuration in two steps: loose input → checked [`Config`].
//!
//! The file is read into [`FileConfig`] (`file`), whose leaves are untyped
//! TOML values, so that [`Config::from_parts`] can report *every* problem
//! with its key path (`idempotency.record_ttl: "forever" is not a duration
//! ...`) instead of stopping at the first type error. CLI flags and
//! `IDEMGATE_*` variables ([`cli`]; clap reads both, flag first) are laid
//! over the file: flag > env > file > default.
//!
//! The files, each using only those after it: `render` (the effective
//! config as TOML, through serde) → `sections` (each section over its
//! defaults; `[store]`'s backend keys checked by the backend itself) →
//! `intake` (a route's key source, webhook preset and secrets) →
//! `defaults` (every default, once) → `model` (the checked [`Config`]) →
//! [`traces`] (`[tracing]` over the `OTEL_*` environment), [`consumers`]
//! (`[[consumers]]`, the delivery mode) → [`routes`] (policies, path patterns) → [`upstream`] (where requests go,
//! TLS files read) → [`file`] (the file as written), [`encryption`] (keys
//! that seal records), [`cli`] (flags and subcommands). The value checks
//! themselves are [`crate::checker`]'s.

pub mod cli;
pub mod consumers;
mod defaults;
pub mod encryption;
pub mod file;
mod intake;
mod model;
mod render;
pub mod routes;
mod sections;
pub mod traces;
pub mod upstream;

pub use cli::{Cli, Command, RunArgs};
pub use encryption::{EncryptionKey, KeySource};
pub use file::{ConfigErrors, FileConfig};
pub use model::{AdminTokens, Config, DedupConfig, LogFormat, OnStoreError, StoreConfig};
pub use routes::{
    OnUnknownOutcome, PathPattern, Policies, Policy, ReconcileUrl, Route, WebhookCheck,
};
pub use upstream::{UpstreamConfig, UpstreamProtocol};

#[cfg(test)]
mod tests;
