//! The record state model and the decisions every backend shares.
//!
//! A record key is `Absent`, `InFlight` (a lease with a token and a fence is
//! held by the request running upstream), `Completed` (the stored answer) or
//! `Unknown` (the request was forwarded and may have run, but no answer was
//! stored: a timeout, a reset, a gateway status, or a holder that died).
//! Stores perform [`begin`] atomically and report a [`Begin`]; [`decide`] turns
//! that into what the proxy does. Renew, complete, release and marking a
//! record unknown only act for the current lease's token ([`holds`]): a holder
//! whose lease was lost can never overwrite or delete another holder's record.
//! An unknown record is settled only by reconciliation or an operator, named
//! by its fence.

use std::sync::Arc;
use std::time::Duration;

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

/// Why a forwarded request's outcome is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownCause {
    /// No answer within `upstream_timeout`.
    Timeout,
    /// The connection failed after (part of) the request was written.
    Reset,
    /// The upstream answered a status of `unknown_statuses` (a gateway
    /// behind it gave up).
    Status(u16),
    /// The lease holder stopped renewing (it died) after forwarding.
    Lapsed,
    /// The upstream answered, but the store did not take the answer: the
    /// client's response was aborted rather than ended.
    Unstored,
}

impl UnknownCause {
    /// The `cause` label of `idemgate_unknown_outcomes_total`.
    pub fn label(self) -> &'static str {
        match self {
            UnknownCause::Timeout => "timeout",
            UnknownCause::Reset => "reset",
            UnknownCause::Status(_) => "status",
            UnknownCause::Lapsed => "lapsed",
            UnknownCause::Unstored => "unstored",
        }
    }

    /// Text form, as stores keep it: `timeout`, `reset`, `status 504`,
    /// `lapsed`.
    pub fn encode(self) -> String {
        match self {
            UnknownCause::Status(s) => format!("status {s}"),
            other => other.label().to_owned(),
        }
    }

    pub fn decode(s: &str) -> Option<Self> {
        Some(match s {
            "timeout" => UnknownCause::Timeout,
            "reset" => UnknownCause::Reset,
            "lapsed" => UnknownCause::Lapsed,
            "unstored" => UnknownCause::Unstored,
            other => UnknownCause::Status(other.strip_prefix("status ")?.parse().ok()?),
        })
    }
}

/// A record whose first attempt may have been processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unknown {
    /// The fence of the attempt that may have run (kept: the next lease's
    /// fence is higher).
    pub fence: u64,
    pub fingerprint: Fingerprint,
    pub cause: UnknownCause,
    /// When it became unknown (the store's wall clock).
    pub since_unix_ms: u64,
    /// Reconciliation may be tried again from this time on (0: now).
    pub next_check_unix_ms: u64,
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
    Unknown(Unknown),
}

/// What a route's policy asks of an atomic begin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BeginOptions {
    pub lease_ttl: Duration,
    /// `Some(ttl)`: a lapsed lease becomes `Unknown` (cause lapsed), kept
    /// for `ttl`, and an in-flight record lives that long so its lapse can
    /// be seen. `None`: the next request takes a lapsed lease over.
    pub hold_lapsed: Option<Duration>,
    /// `Some(interval)`: one caller per interval is told to reconcile an
    /// unknown record.
    pub reconcile_every: Option<Duration>,
}

impl BeginOptions {
    /// Plain leases: a lapsed lease is taken over, nothing is reconciled.
    pub fn lease(lease_ttl: Duration) -> Self {
        BeginOptions {
            lease_ttl,
            hold_lapsed: None,
            reconcile_every: None,
        }
    }

    /// How long a new in-flight record lives in the store.
    pub fn in_flight_ttl(&self) -> Duration {
        self.hold_lapsed
            .map_or(self.lease_ttl, |hold| hold.max(self.lease_ttl))
    }
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
    /// The key's first attempt may have run. `reconcile`: this caller is the
    /// one (per interval) to ask the upstream. `lapsed_now`: this begin found
    /// the holder's lease lapsed and held the key (counted once).
    Unknown {
        unknown: Unknown,
        reconcile: bool,
        lapsed_now: bool,
    },
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
    /// The same request may have run already: never run it blindly.
    Unknown { unknown: Unknown, reconcile: bool },
}

/// Decides what a request with fingerprint `fp` does.
pub fn decide(begin: Begin, fp: &Fingerprint) -> Decision {
    match begin {
        Begin::Acquired(lease) => Decision::Forward(lease),
        Begin::InFlight { fingerprint, fence } if fingerprint == *fp => Decision::Wait { fence },
        Begin::Completed(record) if record.fingerprint == *fp => Decision::Replay(record),
        Begin::Unknown {
            unknown, reconcile, ..
        } if unknown.fingerprint == *fp => Decision::Unknown { unknown, reconcile },
        Begin::InFlight { .. } | Begin::Completed(_) | Begin::Unknown { .. } => Decision::Mismatch,
    }
}

/// The begin transition at `now_unix_ms`: what begin reports for `current`
/// (whose lease, if any, has `lapsed` or not), and the state to write, if
/// any. `acquire` makes the new lease and is called only when the key is
/// absent or its lapsed lease is taken over.
pub fn begin(
    current: &State,
    lapsed: bool,
    fp: Fingerprint,
    opts: &BeginOptions,
    now_unix_ms: u64,
    acquire: impl FnOnce() -> Lease,
) -> (Begin, Option<State>) {
    let acquired = |lease: Lease| {
        (
            Begin::Acquired(lease),
            Some(State::InFlight {
                lease,
                fingerprint: fp,
            }),
        )
    };
    match current {
        State::Absent => acquired(acquire()),
        State::InFlight { lease, fingerprint } if lapsed => match opts.hold_lapsed {
            None => acquired(acquire()),
            Some(_) => {
                let unknown = Unknown {
                    fence: lease.fence,
                    fingerprint: *fingerprint,
                    cause: UnknownCause::Lapsed,
                    since_unix_ms: now_unix_ms,
                    next_check_unix_ms: 0,
                };
                let (found, next) = begin_unknown(&unknown, opts, now_unix_ms, true);
                (found, next.or(Some(State::Unknown(unknown))))
            }
        },
        State::InFlight { lease, fingerprint } => (
            Begin::InFlight {
                fingerprint: *fingerprint,
                fence: lease.fence,
            },
            None,
        ),
        State::Completed(record) => (Begin::Completed(record.clone()), None),
        State::Unknown(unknown) => begin_unknown(unknown, opts, now_unix_ms, false),
    }
}

/// Begin on an unknown record: this caller reconciles if the policy asks
/// for it and the interval since the last attempt has passed.
fn begin_unknown(
    unknown: &Unknown,
    opts: &BeginOptions,
    now_unix_ms: u64,
    lapsed_now: bool,
) -> (Begin, Option<State>) {
    match opts.reconcile_every {
        Some(every) if now_unix_ms >= unknown.next_check_unix_ms => {
            let next = Unknown {
                next_check_unix_ms: now_unix_ms + every.as_millis() as u64,
                ..*unknown
            };
            let found = Begin::Unknown {
                unknown: next,
                reconcile: true,
                lapsed_now,
            };
            (found, Some(State::Unknown(next)))
        }
        _ => (
            Begin::Unknown {
                unknown: *unknown,
                reconcile: false,
                lapsed_now,
            },
            None,
        ),
    }
}

/// Whether `token` holds the current lease: the check before renew,
/// complete, release and marking the record unknown.
pub fn holds(current: &State, token: LeaseId) -> bool {
    matches!(current, State::InFlight { lease, .. } if lease.token == token)
}

/// How an unknown record is settled.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolution {
    /// It ran: this is its response (from the upstream's reconcile endpoint
    /// or an operator), kept for the ttl.
    Completed(Arc<CompletedRecord>, Duration),
    /// It did not run: free the key so the next request runs it.
    Release,
}

/// Whether an unknown record with `fence` is what `current` holds: the check
/// before settling it.
pub fn is_unknown_with(current: &State, fence: u64) -> bool {
    matches!(current, State::Unknown(u) if u.fence == fence)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::idempotency::record::StoredResponse;

    fn record(fp: Fingerprint) -> Arc<CompletedRecord> {
        Arc::new(CompletedRecord {
            origin: None,
            fingerprint: fp,
            created_unix_ms: 0,
            response: StoredResponse {
                status: http::StatusCode::OK,
                headers: Default::default(),
                body: Default::default(),
                body_omitted: false,
                trailers: http::HeaderMap::new(),
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
        let opts = BeginOptions::lease(Duration::from_secs(30));
        let (b, next) = begin(&State::Absent, false, A, &opts, 0, || LEASE);
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
        let (b, next) = begin(&held, false, B, &opts, 0, || {
            panic!("must not acquire a held key")
        });
        assert_eq!(
            b,
            Begin::InFlight {
                fingerprint: A,
                fence: 7
            }
        );
        assert_eq!(next, None);

        let done = State::Completed(record(A));
        let (b, next) = begin(&done, false, A, &opts, 0, || {
            panic!("must not acquire a completed key")
        });
        assert_eq!(b, Begin::Completed(record(A)));
        assert_eq!(next, None);
    }

    const HOLD: BeginOptions = BeginOptions {
        lease_ttl: Duration::from_secs(30),
        hold_lapsed: Some(Duration::from_secs(3600)),
        reconcile_every: None,
    };

    #[test]
    fn a_lapsed_lease_is_taken_over_or_held_as_unknown() {
        let held = State::InFlight {
            lease: LEASE,
            fingerprint: A,
        };
        let next_lease = Lease {
            token: LeaseId::from_u128(9),
            fence: 8,
        };
        let plain = BeginOptions::lease(Duration::from_secs(30));
        let (b, _) = begin(&held, true, A, &plain, 5, || next_lease);
        assert_eq!(b, Begin::Acquired(next_lease));

        let (b, next) = begin(&held, true, A, &HOLD, 5, || panic!("must not run again"));
        let unknown = Unknown {
            fence: 7,
            fingerprint: A,
            cause: UnknownCause::Lapsed,
            since_unix_ms: 5,
            next_check_unix_ms: 0,
        };
        assert_eq!(
            b,
            Begin::Unknown {
                unknown,
                reconcile: false,
                lapsed_now: true
            }
        );
        assert_eq!(next, Some(State::Unknown(unknown)));
        // Later duplicates find it unknown and change nothing.
        let (b, next) = begin(&State::Unknown(unknown), false, A, &HOLD, 9, || {
            panic!("must not run again")
        });
        assert!(matches!(
            b,
            Begin::Unknown {
                reconcile: false,
                lapsed_now: false,
                ..
            }
        ));
        assert_eq!(next, None);
        assert_eq!(
            decide(b, &A),
            Decision::Unknown {
                unknown,
                reconcile: false
            }
        );
        let (b, _) = begin(&State::Unknown(unknown), false, B, &HOLD, 9, || LEASE);
        assert_eq!(decide(b, &B), Decision::Mismatch);
    }

    #[test]
    fn one_caller_per_interval_reconciles() {
        let opts = BeginOptions {
            reconcile_every: Some(Duration::from_secs(10)),
            ..HOLD
        };
        let unknown = Unknown {
            fence: 7,
            fingerprint: A,
            cause: UnknownCause::Timeout,
            since_unix_ms: 0,
            next_check_unix_ms: 0,
        };
        let state = State::Unknown(unknown);
        let (b, next) = begin(&state, false, A, &opts, 1_000, || panic!());
        assert!(matches!(
            b,
            Begin::Unknown {
                reconcile: true,
                ..
            }
        ));
        let Some(State::Unknown(after)) = next else {
            panic!("{next:?}")
        };
        assert_eq!(after.next_check_unix_ms, 11_000);
        let after = State::Unknown(after);
        let (b, next) = begin(&after, false, A, &opts, 10_999, || panic!());
        assert!(matches!(
            b,
            Begin::Unknown {
                reconcile: false,
                ..
            }
        ));
        assert_eq!(next, None);
        let (b, _) = begin(&after, false, A, &opts, 11_000, || panic!());
        assert!(matches!(
            b,
            Begin::Unknown {
                reconcile: true,
                ..
            }
        ));
    }

    #[test]
    fn causes_round_trip_as_text() {
        for c in [
            UnknownCause::Timeout,
            UnknownCause::Reset,
            UnknownCause::Status(504),
            UnknownCause::Lapsed,
        ] {
            assert_eq!(UnknownCause::decode(&c.encode()), Some(c));
        }
        assert_eq!(UnknownCause::decode("status x"), None);
        assert_eq!(UnknownCause::decode("nope"), None);
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
