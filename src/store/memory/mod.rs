//! The embedded in-memory store: one process, no dependencies. `store`
//! holds it ([`MemoryStore`]: one bound, one clock, its sweeper) on
//! `ttl_map` (a sharded map whose entries expire); `slot` is what an HTTP
//! record keeps, its small completed records packed by TTL into shared
//! chunks (`packer`); `records` and `dedup` apply the contract's transitions
//! under the shard locks; `config` is its keys of `[store]` and how it
//! opens.

mod config;
mod dedup;
mod packer;
mod records;
mod slot;
mod store;
mod ttl_map;

pub use config::{MemoryConfig, REGISTRATION};
pub use store::MemoryStore;
