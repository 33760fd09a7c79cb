//! The pure idempotency core: no sockets, no async.
//!
//! [`key`] turns request parts into a [`key::RecordKey`] and a
//! [`key::Fingerprint`]; [`record`] is what a completed request leaves behind
//! and its versioned byte encoding; [`state`] is the record state model and
//! the decisions and transitions every store backend shares; [`dedup`] is
//! the same for consumer-dedup records; [`lease`] names who holds a lease;
//! [`settlement`] reads what an upstream or operator says an earlier request
//! answered; [`key_from`] is where a route takes its key from (a header, a
//! JSON [`pointer`] into the body, the body's hash); [`rate`] is the
//! fair-share token bucket; [`seal`] seals stored bytes with AES-256-GCM.

pub mod dedup;
pub mod key;
pub mod key_from;
pub mod lease;
pub mod pointer;
pub mod rate;
pub mod record;
pub mod seal;
pub mod settlement;
pub mod state;
