//! What the memory store keeps per HTTP record ([`Slot`]): small, because
//! most records are completed ones, and the state each stands for.

use std::sync::Arc;

use tokio::sync::Notify;

use super::ttl_map::OnRemove;
use crate::idempotency::key::{Fingerprint, RecordKey};
use crate::idempotency::rate::Bucket;
use crate::idempotency::state::{Lease, State, Unknown};
use crate::store::sealing::Sealing;

/// What a record holds, kept small because most are completed records: the
/// rare in-flight data is boxed (see benches/RESULTS.md for the bytes per
/// record). A completed response is kept encoded in one
/// exact-size allocation. Holding the upstream's `Bytes` instead would pin
/// whole hyper read buffers (body and header values are slices of them) for
/// the record's lifetime; decoding on replay costs a few hundred ns.
pub(super) enum Slot {
    InFlight(Box<InFlight>),
    Completed(Box<[u8]>),
    Unknown(Box<Unknown>),
}

/// The in-flight part of a record; waiters only ever wait on these.
pub(super) struct InFlight {
    pub(super) lease: Lease,
    pub(super) fingerprint: Fingerprint,
    /// When the lease lapses unless renewed (ms on the store's clock); the
    /// record itself may live longer, so that a lapse can be seen.
    pub(super) lease_until: u64,
    pub(super) notify: Option<Arc<Notify>>,
}

impl OnRemove for Slot {
    /// Wakes whoever waits on this record's lease.
    fn removed(&mut self) {
        if let Slot::InFlight(f) = self {
            if let Some(n) = f.notify.take() {
                n.notify_waiters();
            }
        }
    }

    fn heap_bytes(&self) -> usize {
        match self {
            Slot::InFlight(_) => std::mem::size_of::<InFlight>(),
            Slot::Completed(bytes) => bytes.len(),
            Slot::Unknown(_) => std::mem::size_of::<Unknown>(),
        }
    }
}

/// Fair-share buckets hold nothing on the heap and wake no one.
impl OnRemove for Bucket {
    fn heap_bytes(&self) -> usize {
        0
    }
}

impl Slot {
    /// The slot for a state; an in-flight one with its lease until
    /// `lease_until`.
    pub(super) fn of(
        state: State,
        lease_until: u64,
        key: &RecordKey,
        sealing: &Sealing,
    ) -> Option<Slot> {
        match state {
            State::Absent => None,
            State::InFlight { lease, fingerprint } => Some(Slot::InFlight(Box::new(InFlight {
                lease,
                fingerprint,
                lease_until,
                notify: None,
            }))),
            State::Completed(rec) => Some(Slot::Completed(
                sealing.encode(key, &rec).into_boxed_slice(),
            )),
            State::Unknown(u) => Some(Slot::Unknown(Box::new(u))),
        }
    }

    /// The state this slot stands for. A record that does not decode (or,
    /// sealed, does not open) reads as absent rather than being served.
    pub(super) fn state(&self, key: &RecordKey, sealing: &Sealing) -> State {
        match self {
            Slot::InFlight(f) => State::InFlight {
                lease: f.lease,
                fingerprint: f.fingerprint,
            },
            Slot::Completed(bytes) => sealing
                .decode(key, bytes)
                .map_or(State::Absent, |r| State::Completed(Arc::new(r))),
            Slot::Unknown(u) => State::Unknown(**u),
        }
    }

    pub(super) fn lease(&self) -> Option<&Lease> {
        match self {
            Slot::InFlight(f) => Some(&f.lease),
            Slot::Completed(_) | Slot::Unknown(_) => None,
        }
    }

    /// Whether an in-flight lease lapsed at `now`.
    pub(super) fn lapsed(&self, now: u64) -> bool {
        matches!(self, Slot::InFlight(f) if f.lease_until <= now)
    }

    pub(super) fn holds(&self, lease: &Lease) -> bool {
        self.lease().is_some_and(|l| l.token == lease.token)
    }
}
