//! The storage contract and its backends, at the bottom of the program: this
//! module depends only on the pure core ([`crate::idempotency`]), the
//! metrics it reports into and the value checker its backends read their
//! keys with. `CONTRACT.md` beside this file states the invariants every
//! backend keeps.
//!
//! The contract, one file a part: [`records`] (HTTP idempotency records:
//! atomic begin / renew / complete / release / mark unknown / resolve /
//! wait), [`dedup`] (consumer-dedup records: claim / extend / complete /
//! release / mark and the dead-letter index) and [`buckets`] (the
//! fair-share token buckets), each failing with an [`error`]. The rest of
//! the program holds a [`handle`] ([`Store`]): a backend's parts, each
//! behind its own trait object, and the one metrics wrapper.
//!
//! A backend is a folder: [`memory`] (one process), [`redis_store`]
//! (standalone and Cluster) and [`postgres`] (records that survive the
//! loss of a server), each writing records through [`sealing`]
//! (encoded, and sealed when encryption is on); those that can tell every
//! replica of a purge keep copies of replayed records in [`replays`]. Each
//! registers in
//! [`registry`] what [`backend`] asks of it: its name, its own keys of
//! `[store]`, their check, and how it opens. Nothing outside `store/` names
//! a backend's types. [`event_loop`] tells a backend (and the proxy) which
//! event loop, if any, the calling thread is.

pub mod backend;
pub mod buckets;
pub mod dedup;
pub mod error;
pub mod event_loop;
pub mod handle;
pub mod memory;
pub mod postgres;
pub mod records;
pub mod redis_store;
pub mod registry;
pub mod replays;
pub mod sealing;

pub use backend::{BackendConfig, Opening};
pub use buckets::BucketStore;
pub use dedup::{ClaimItem, CompleteItem, Cursor, DedupStore, FailedItem, Inspected, Ttls};
pub use error::{StoreError, StoreFuture};
pub use handle::{Parts, Store};
pub use records::{Inspection, RecordStore};
pub use sealing::Sealing;
