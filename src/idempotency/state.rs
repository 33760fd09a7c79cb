//! The record state model and the decisions every backend shares.
//!
//! A record key is `Absent`, `InFlight` (a lease with a token and a fence is
//! held by the request running upstream) or `Completed` (the stored answer).
//! Stores perform [`begin`] atomically and report a [`Begin`]; [`decide`] turns
//! that into what the proxy does. Renew, complete and release only act for the
//! current lease's token ([`holds`]): a holder whose lease was lost can never
//! overwrite or delete another holder's record.

use std::sync::Arc;

use super::key::Fingerprint;
use super::lease::LeaseId;
use super::record::CompletedRecord;

/// An in-flight lease. `token` is unique per acquisition and checked on every
/// state change; `fence` increases strictly per key and is forwarded upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub token: LeaseId,
    pub fence: u64,
}

impl Lease {
    /// A lease with a fresh random token.
    pub fn new(fence: u64) -> Self {
        Lease {
            token: LeaseId::random(),
            fence,
        }
    }
}

/// The state of one record key (already expiry-checked by the store).
#[derive(Debug, Clone, PartialEq)]
pub enum State {
    Absent,
    InFlight {
        lease: Lease,
        fingerprint: Fingerprint,
    },
    Completed(Arc<CompletedRecord>),
}

/// What an atomic begin found, in one store call.
#[derive(Debug, Clone, PartialEq)]
pub enum Begin {
    /// The key was absent: this caller now holds the lease.
    Acquired(Lease),
    /// Another request holds the lease.
    InFlight {
        fingerprint: Fingerprint,
        fence: u64,
    },
    /// The key completed earlier: here is the record.
    Completed(Arc<CompletedRecord>),
}

/// What the proxy does with a request, given what begin found.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Run upstream under this lease.
    Forward(Lease),
    /// Answer with the stored response.
    Replay(Arc<CompletedRecord>),
    /// The same request is running: wait for the lease with this fence to end.
    Wait { fence: u64 },
    /// The key was used for a different request (422).
    Mismatch,
}

/// Decides what a request with fingerprint `fp` does.
pub fn decide(begin: Begin, fp: &Fingerprint) -> Decision {
    match begin {
        Begin::Acquired(lease) => Decision::Forward(lease),
        Begin::InFlight { fingerprint, fence } if fingerprint == *fp => Decision::Wait { fence },
        Begin::Completed(record) if record.fingerprint == *fp => Decision::Replay(record),
        Begin::InFlight { .. } | Begin::Completed(_) => Decision::Mismatch,
    }
}

/// The begin transition: what begin reports for `current`, and the state to
/// write, if any. `acquire` makes the new lease and is called only when the
/// key is absent.
pub fn begin(
    current: &State,
    fp: Fingerprint,
    acquire: impl FnOnce() -> Lease,
) -> (Begin, Option<State>) {
    match current {
        State::Absent => {
            let lease = acquire();
            (
                Begin::Acquired(lease),
                Some(State::InFlight {
                    lease,
                    fingerprint: fp,
                }),
            )
        }
        State::InFlight { lease, fingerprint } => (
            Begin::InFlight {
                fingerprint: *fingerprint,
                fence: lease.fence,
            },
            None,
        ),
        State::Completed(record) => (Begin::Completed(record.clone()), None),
    }
}

/// Whether `token` holds the current lease: the check before renew, complete
/// and release.
pub fn holds(current: &State, token: LeaseId) -> bool {
    matches!(current, State::InFlight { lease, .. } if lease.token == token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::idempotency::record::StoredResponse;

    fn record(fp: Fingerprint) -> Arc<CompletedRecord> {
        Arc::new(CompletedRecord {
            fingerprint: fp,
            created_unix_ms: 0,
            response: StoredResponse {
                status: http::StatusCode::OK,
                headers: Default::default(),
                body: Default::default(),
                body_omitted: false,
            },
        })
    }

    const A: Fingerprint = Fingerprint([1; 32]);
    const B: Fingerprint = Fingerprint([2; 32]);
    const LEASE: Lease = Lease {
        token: LeaseId::from_u128(42),
        fence: 7,
    };

    #[test]
    fn decide_covers_every_begin_for_same_and_other_fingerprint() {
        assert_eq!(decide(Begin::Acquired(LEASE), &A), Decision::Forward(LEASE));
        let in_flight = Begin::InFlight {
            fingerprint: A,
            fence: 7,
        };
        assert_eq!(decide(in_flight.clone(), &A), Decision::Wait { fence: 7 });
        assert_eq!(decide(in_flight, &B), Decision::Mismatch);
        let rec = record(A);
        assert_eq!(
            decide(Begin::Completed(rec.clone()), &A),
            Decision::Replay(rec.clone())
        );
        assert_eq!(decide(Begin::Completed(rec), &B), Decision::Mismatch);
    }

    #[test]
    fn begin_acquires_only_when_absent() {
        let (b, next) = begin(&State::Absent, A, || LEASE);
        assert_eq!(b, Begin::Acquired(LEASE));
        assert_eq!(
            next,
            Some(State::InFlight {
                lease: LEASE,
                fingerprint: A
            })
        );

        let held = State::InFlight {
            lease: LEASE,
            fingerprint: A,
        };
        let (b, next) = begin(&held, B, || panic!("must not acquire a held key"));
        assert_eq!(
            b,
            Begin::InFlight {
                fingerprint: A,
                fence: 7
            }
        );
        assert_eq!(next, None);

        let done = State::Completed(record(A));
        let (b, next) = begin(&done, A, || panic!("must not acquire a completed key"));
        assert_eq!(b, Begin::Completed(record(A)));
        assert_eq!(next, None);
    }

    #[test]
    fn only_the_current_token_holds() {
        let held = State::InFlight {
            lease: LEASE,
            fingerprint: A,
        };
        let id = LeaseId::from_u128;
        assert!(holds(&held, id(42)));
        assert!(!holds(&held, id(43)));
        assert!(!holds(&State::Absent, id(42)));
        assert!(!holds(&State::Completed(record(A)), id(42)));
    }

    #[test]
    fn new_leases_have_distinct_tokens() {
        assert_ne!(Lease::new(1).token, Lease::new(1).token);
    }
}
