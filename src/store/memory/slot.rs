//! What the memory store keeps per HTTP record ([`Slot`]): small, because
//! most records are completed ones, held in blocks the allocator does not
//! round far up, and the state each stands for.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::Notify;

use super::packer::Packer;
use super::ttl_map::OnRemove;
use crate::idempotency::key::{Fingerprint, RecordKey};
use crate::idempotency::rate::Bucket;
use crate::idempotency::state::{Lease, State, Unknown};
use crate::store::sealing::Sealing;

/// What a record holds, kept small because most are completed records: the
/// rare in-flight data is boxed (see benches/RESULTS.md for the bytes per
/// record). A completed response is kept encoded: under 16 KiB packed
/// with the records of its TTL (`packer.rs`), otherwise in blocks of its
/// own. Holding the upstream's `Bytes` instead would pin
/// whole hyper read buffers (body and header values are slices of them) for
/// the record's lifetime; decoding on replay costs a few hundred ns.
pub(super) enum Slot {
    InFlight(Box<InFlight>),
    /// An encoded record in a chunk shared with others of its TTL.
    Packed(Bytes),
    Completed(Box<[u8]>),
    /// An encoded record of 16 to 128 KiB that no size class fits, in two
    /// allocations (see [`Slot::unpacked`]).
    CompletedInTwo(Box<[Box<[u8]>; 2]>),
    Unknown(Box<Unknown>),
}

/// The allocator's size class at or below `len`, for 16 KiB to 128 KiB:
/// mimalloc (the binary's allocator) serves those sizes in four classes per
/// power of two (64, 80, 96 and 112 KiB, …), so a block a little over a
/// class takes the next one, up to 25 % more than asked (a 64 KiB response
/// encoded is 65,636 bytes: an 81,920-byte block). `None` outside the range
/// or when `len` is a class already.
fn class_below(len: usize) -> Option<usize> {
    if !(16 << 10..=128 << 10).contains(&len) {
        return None;
    }
    let power = 1 << (usize::BITS - 1 - len.leading_zeros());
    let step = power / 4;
    let class = power + (len - power) / step * step;
    (class < len).then_some(class)
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
            Slot::Packed(bytes) => bytes.len(),
            Slot::Completed(bytes) => bytes.len(),
            Slot::CompletedInTwo(parts) => {
                std::mem::size_of::<[Box<[u8]>; 2]>() + parts[0].len() + parts[1].len()
            }
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
    /// The slot for an encoded record kept `ttl_ms` from `now`: packed with
    /// the records of its TTL when short enough, else in blocks of its own
    /// ([`Slot::unpacked`]).
    pub(super) fn completed(encoded: Vec<u8>, packer: &Packer, ttl_ms: u64, now: u64) -> Slot {
        match packer.pack(&encoded, ttl_ms, now) {
            Some(packed) => Slot::Packed(packed),
            None => Slot::unpacked(encoded),
        }
    }

    /// The slot for an encoded record in blocks of its own: one exact-size
    /// allocation, or, where that would take a size class well above the
    /// record's length, a first part the size of the class below and the
    /// rest (RSS then follows the bytes held: benches/RESULTS.md, "Design
    /// 5").
    pub(super) fn unpacked(encoded: Vec<u8>) -> Slot {
        match class_below(encoded.len()) {
            Some(class) => {
                let (head, tail) = encoded.split_at(class);
                Slot::CompletedInTwo(Box::new([head.into(), tail.into()]))
            }
            None => Slot::Completed(encoded.into_boxed_slice()),
        }
    }

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
            // A begin never writes a completed record; no TTL to pack by.
            State::Completed(rec) => Some(Slot::unpacked(sealing.encode(key, &rec))),
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
            Slot::Packed(bytes) => sealing
                .decode(key, bytes)
                .map_or(State::Absent, |r| State::Completed(Arc::new(r))),
            Slot::Completed(bytes) => sealing
                .decode(key, bytes)
                .map_or(State::Absent, |r| State::Completed(Arc::new(r))),
            Slot::CompletedInTwo(parts) => sealing
                .decode_parts(key, &[&parts[0], &parts[1]])
                .map_or(State::Absent, |r| State::Completed(Arc::new(r))),
            Slot::Unknown(u) => State::Unknown(**u),
        }
    }

    pub(super) fn lease(&self) -> Option<&Lease> {
        match self {
            Slot::InFlight(f) => Some(&f.lease),
            Slot::Packed(_) | Slot::Completed(_) | Slot::CompletedInTwo(_) | Slot::Unknown(_) => {
                None
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_between_classes_is_held_in_two() {
        assert_eq!(class_below(1000), None);
        assert_eq!(class_below(64 << 10), None, "a class already");
        assert_eq!(class_below(65_636), Some(64 << 10));
        assert_eq!(class_below(100_000), Some(96 << 10));
        assert_eq!(class_below(20_000), Some(16 << 10));
        assert_eq!(class_below(20 << 10), None);
        assert_eq!(class_below(200 << 10), None, "large blocks are page-sized");
        let encoded: Vec<u8> = (0..65_636u32).map(|i| i as u8).collect();
        let Slot::CompletedInTwo(parts) = Slot::unpacked(encoded.clone()) else {
            panic!("held in one")
        };
        assert_eq!([&parts[0][..], &parts[1][..]].concat(), encoded);
        assert_eq!(parts[0].len(), 64 << 10);
    }
}
