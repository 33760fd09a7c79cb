//! The PostgreSQL store: records that survive the loss of a server, with
//! synchronous replication. `db` makes every call (a pooled connection,
//! one statement, bounded by `store.timeout`); `batch` gathers concurrent
//! begins and completions into one statement (group commit in the
//! client); `store` holds it all ([`PostgresStore`]: the pool, the
//! statements it runs, the batchers, the sweeper); `schema` creates and
//! migrates its tables and functions (`schema.sql`: every transition of the
//! storage contract one function call, one statement); `listen` is the one
//! connection per replica that hears completions (`LISTEN`/`NOTIFY`) and
//! wakes waiting duplicates, and hears purges for the replay cache
//! (`store/replays.rs`); `records` and `dedup` implement the contract's
//! parts; [`config`] is its keys of `[store]` and how it opens; `tls` is
//! how it speaks TLS (libpq's `sslmode` spellings, the certificate checks).

mod batch;
pub mod config;
mod db;
mod dedup;
mod listen;
mod records;
mod schema;
mod store;
mod tls;

pub use store::{PostgresOptions, PostgresStore};
pub use tls::Verify;
