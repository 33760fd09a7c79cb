//! The consumer-dedup record and its transitions, pure: the caller passes
//! the store's clock (`now_ms`) and makes new leases. The memory store runs
//! these directly; the Redis store runs the same rules in Lua, and one
//! contract suite holds both to them.
//!
//! A key moves through: absent → `Leased` (a claim won) → `Completed`
//! (recorded outcome), or → `Pending` (released for retry; the attempt count
//! stays) → `Leased` again, or → `Failed` (released as permanent, or out of
//! attempts): a dead letter until reset. `Marked` is the simple "seen it"
//! record of `mark`. A lease is current until another claim supersedes it
//! after it expired; only the current `lease_id` can extend, complete or
//! release.

use super::lease::LeaseId;

/// One key's record.
#[derive(Debug, Clone, PartialEq)]
pub enum DedupRecord {
    Leased {
        lease_id: LeaseId,
        fence: u64,
        attempt: u32,
        lease_until_ms: u64,
        fingerprint: Option<String>,
        worker: Option<String>,
    },
    Pending {
        attempts: u32,
        fence: u64,
        error: Option<String>,
        fingerprint: Option<String>,
    },
    Completed {
        result: Option<String>,
        completed_at_ms: u64,
        attempts: u32,
        lease_id: LeaseId,
        fingerprint: Option<String>,
    },
    Failed {
        error: Option<String>,
        attempts: u32,
        failed_at_ms: u64,
        fence: u64,
    },
    Marked {
        marked_at_ms: u64,
    },
}

impl DedupRecord {
    pub fn state_name(&self) -> &'static str {
        match self {
            DedupRecord::Leased { .. } => "leased",
            DedupRecord::Pending { .. } => "pending",
            DedupRecord::Completed { .. } => "completed",
            DedupRecord::Failed { .. } => "failed",
            DedupRecord::Marked { .. } => "marked",
        }
    }

    fn fence(&self) -> u64 {
        match self {
            DedupRecord::Leased { fence, .. }
            | DedupRecord::Pending { fence, .. }
            | DedupRecord::Failed { fence, .. } => *fence,
            DedupRecord::Completed { .. } | DedupRecord::Marked { .. } => 0,
        }
    }
}

/// What a claim asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimParams {
    pub lease_ms: u64,
    pub fingerprint: Option<String>,
    pub max_attempts: u32,
    pub worker: Option<String>,
}

/// What a claim answers.
#[derive(Debug, Clone, PartialEq)]
pub enum ClaimOutcome {
    Acquired {
        lease_id: LeaseId,
        fence: u64,
        attempt: u32,
        lease_expires_in_ms: u64,
        /// The previous holder's lease expired and this claim took over.
        recovered: bool,
    },
    Completed {
        result: Option<String>,
        completed_at_ms: u64,
    },
    Failed {
        error: Option<String>,
        attempts: u32,
    },
    InProgress {
        retry_after_ms: u64,
    },
    /// The key was claimed with a different fingerprint.
    Mismatch,
}

/// How a claim changed the record.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    None,
    Put(DedupRecord),
    /// Put, and the key just became a dead letter.
    PutFailed(DedupRecord),
}

fn differs(stored: &Option<String>, given: &Option<String>) -> bool {
    matches!((stored, given), (Some(a), Some(b)) if a != b)
}

/// A claim at `now_ms`. `new_lease(min_fence)` makes a lease id and a fence
/// greater than `min_fence`; it is called only when the claim acquires.
pub fn claim(
    current: Option<&DedupRecord>,
    now_ms: u64,
    p: &ClaimParams,
    new_lease: impl FnOnce(u64) -> (LeaseId, u64),
) -> (ClaimOutcome, Write) {
    let (attempts, fingerprint, recovered, last_error, last_fence) = match current {
        None => (0, p.fingerprint.clone(), false, None, 0),
        Some(DedupRecord::Completed {
            result,
            completed_at_ms,
            fingerprint,
            ..
        }) => {
            if differs(fingerprint, &p.fingerprint) {
                return (ClaimOutcome::Mismatch, Write::None);
            }
            let answer = ClaimOutcome::Completed {
                result: result.clone(),
                completed_at_ms: *completed_at_ms,
            };
            return (answer, Write::None);
        }
        Some(DedupRecord::Marked { marked_at_ms }) => {
            let answer = ClaimOutcome::Completed {
                result: None,
                completed_at_ms: *marked_at_ms,
            };
            return (answer, Write::None);
        }
        Some(DedupRecord::Failed {
            error, attempts, ..
        }) => {
            let answer = ClaimOutcome::Failed {
                error: error.clone(),
                attempts: *attempts,
            };
            return (answer, Write::None);
        }
        Some(DedupRecord::Leased {
            lease_until_ms,
            fingerprint,
            attempt,
            fence,
            ..
        }) => {
            if differs(fingerprint, &p.fingerprint) {
                return (ClaimOutcome::Mismatch, Write::None);
            }
            if *lease_until_ms > now_ms {
                let answer = ClaimOutcome::InProgress {
                    retry_after_ms: lease_until_ms - now_ms,
                };
                return (answer, Write::None);
            }
            let error = Some(format!("lease expired during attempt {attempt}"));
            (
                *attempt,
                fingerprint.clone().or(p.fingerprint.clone()),
                true,
                error,
                *fence,
            )
        }
        Some(DedupRecord::Pending {
            attempts,
            fingerprint,
            error,
            fence,
        }) => {
            if differs(fingerprint, &p.fingerprint) {
                return (ClaimOutcome::Mismatch, Write::None);
            }
            (
                *attempts,
                fingerprint.clone().or(p.fingerprint.clone()),
                false,
                error.clone(),
                *fence,
            )
        }
    };
    if attempts >= p.max_attempts {
        let failed = DedupRecord::Failed {
            error: last_error.clone(),
            attempts,
            failed_at_ms: now_ms,
            fence: last_fence,
        };
        let answer = ClaimOutcome::Failed {
            error: last_error,
            attempts,
        };
        return (answer, Write::PutFailed(failed));
    }
    let (lease_id, fence) = new_lease(current.map_or(0, DedupRecord::fence));
    let attempt = attempts + 1;
    let record = DedupRecord::Leased {
        lease_id,
        fence,
        attempt,
        lease_until_ms: now_ms + p.lease_ms,
        fingerprint,
        worker: p.worker.clone(),
    };
    let answer = ClaimOutcome::Acquired {
        lease_id,
        fence,
        attempt,
        lease_expires_in_ms: p.lease_ms,
        recovered,
    };
    (answer, Write::Put(record))
}

/// Extends the current lease to `now_ms + lease_ms`.
pub fn extend(
    current: Option<&DedupRecord>,
    lease_id: LeaseId,
    now_ms: u64,
    lease_ms: u64,
) -> Option<DedupRecord> {
    match current {
        Some(DedupRecord::Leased {
            lease_id: held,
            fence,
            attempt,
            fingerprint,
            worker,
            ..
        }) if *held == lease_id => Some(DedupRecord::Leased {
            lease_id: *held,
            fence: *fence,
            attempt: *attempt,
            lease_until_ms: now_ms + lease_ms,
            fingerprint: fingerprint.clone(),
            worker: worker.clone(),
        }),
        _ => None,
    }
}

/// What completing did.
#[derive(Debug, Clone, PartialEq)]
pub enum Completion {
    /// Recorded now: write this record.
    Recorded(DedupRecord),
    /// Already completed by this same lease: nothing to do.
    Again,
    LeaseLost,
}

/// Records the outcome for the current lease (idempotent for that lease).
pub fn complete(
    current: Option<&DedupRecord>,
    lease_id: LeaseId,
    now_ms: u64,
    result: Option<String>,
) -> Completion {
    match current {
        Some(DedupRecord::Leased {
            lease_id: held,
            attempt,
            fingerprint,
            ..
        }) if *held == lease_id => Completion::Recorded(DedupRecord::Completed {
            result,
            completed_at_ms: now_ms,
            attempts: *attempt,
            lease_id: *held,
            fingerprint: fingerprint.clone(),
        }),
        Some(DedupRecord::Completed { lease_id: by, .. }) if *by == lease_id => Completion::Again,
        _ => Completion::LeaseLost,
    }
}

/// How a worker gives a message back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseOutcome {
    /// Free the key for the next delivery; the attempt count stays.
    Retry,
    /// Record the key as failed (a dead letter).
    Permanent,
}

/// Releases the current lease; `None` if it was lost.
pub fn release(
    current: Option<&DedupRecord>,
    lease_id: LeaseId,
    now_ms: u64,
    outcome: ReleaseOutcome,
    error: Option<String>,
) -> Option<DedupRecord> {
    match current {
        Some(DedupRecord::Leased {
            lease_id: held,
            fence,
            attempt,
            fingerprint,
            ..
        }) if *held == lease_id => Some(match outcome {
            ReleaseOutcome::Retry => DedupRecord::Pending {
                attempts: *attempt,
                fence: *fence,
                error,
                fingerprint: fingerprint.clone(),
            },
            ReleaseOutcome::Permanent => DedupRecord::Failed {
                error,
                attempts: *attempt,
                failed_at_ms: now_ms,
                fence: *fence,
            },
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(max_attempts: u32) -> ClaimParams {
        ClaimParams {
            lease_ms: 1000,
            fingerprint: None,
            max_attempts,
            worker: Some("w1".into()),
        }
    }

    const L1: LeaseId = LeaseId::from_u128(1);
    const L2: LeaseId = LeaseId::from_u128(2);

    fn lease(id: LeaseId, fence: u64) -> impl FnOnce(u64) -> (LeaseId, u64) {
        move |min| {
            assert!(fence > min, "fence {fence} must exceed {min}");
            (id, fence)
        }
    }

    fn no_lease(_: u64) -> (LeaseId, u64) {
        panic!("must not acquire")
    }

    fn put(w: Write) -> DedupRecord {
        match w {
            Write::Put(r) | Write::PutFailed(r) => r,
            Write::None => panic!("expected a write"),
        }
    }

    #[test]
    fn first_claim_acquires_attempt_one() {
        let (out, w) = claim(None, 100, &params(3), lease(L1, 5));
        assert_eq!(
            out,
            ClaimOutcome::Acquired {
                lease_id: L1,
                fence: 5,
                attempt: 1,
                lease_expires_in_ms: 1000,
                recovered: false
            }
        );
        assert!(matches!(
            put(w),
            DedupRecord::Leased {
                lease_until_ms: 1100,
                attempt: 1,
                ..
            }
        ));
    }

    #[test]
    fn a_live_lease_answers_in_progress_and_an_expired_one_is_taken_over() {
        let (_, w) = claim(None, 100, &params(3), lease(L1, 5));
        let rec = put(w);
        let (out, w) = claim(Some(&rec), 600, &params(3), no_lease);
        assert_eq!(
            out,
            ClaimOutcome::InProgress {
                retry_after_ms: 500
            }
        );
        assert_eq!(w, Write::None);
        let (out, w) = claim(Some(&rec), 1100, &params(3), lease(L2, 6));
        assert!(matches!(
            out,
            ClaimOutcome::Acquired {
                attempt: 2,
                recovered: true,
                fence: 6,
                ..
            }
        ));
        let taken = put(w);
        // The old holder can no longer act.
        assert_eq!(
            complete(Some(&taken), L1, 1200, None),
            Completion::LeaseLost
        );
        assert_eq!(
            release(Some(&taken), L1, 1200, ReleaseOutcome::Retry, None),
            None
        );
        assert_eq!(extend(Some(&taken), L1, 1200, 1000), None);
    }

    #[test]
    fn complete_is_idempotent_for_its_lease_and_answers_later_claims() {
        let (_, w) = claim(None, 0, &params(3), lease(L1, 1));
        let rec = put(w);
        let Completion::Recorded(done) = complete(Some(&rec), L1, 50, Some("{\"ok\":true}".into()))
        else {
            panic!()
        };
        assert_eq!(complete(Some(&done), L1, 60, None), Completion::Again);
        assert_eq!(complete(Some(&done), L2, 60, None), Completion::LeaseLost);
        let (out, w) = claim(Some(&done), 70, &params(3), no_lease);
        assert_eq!(
            out,
            ClaimOutcome::Completed {
                result: Some("{\"ok\":true}".into()),
                completed_at_ms: 50
            }
        );
        assert_eq!(w, Write::None);
    }

    #[test]
    fn retry_keeps_the_attempt_count_until_max_attempts_fails_it() {
        let mut rec = None;
        for attempt in 1..=2u32 {
            let (out, w) = claim(
                rec.as_ref(),
                0,
                &params(2),
                lease(L1, u64::from(attempt) + 10),
            );
            assert!(matches!(out, ClaimOutcome::Acquired { attempt: a, .. } if a == attempt));
            let leased = put(w);
            rec = release(
                Some(&leased),
                L1,
                0,
                ReleaseOutcome::Retry,
                Some(format!("boom {attempt}")),
            );
            assert!(
                matches!(rec, Some(DedupRecord::Pending { attempts, .. }) if attempts == attempt)
            );
        }
        let (out, w) = claim(rec.as_ref(), 5, &params(2), no_lease);
        assert_eq!(
            out,
            ClaimOutcome::Failed {
                error: Some("boom 2".into()),
                attempts: 2
            }
        );
        assert!(matches!(
            w,
            Write::PutFailed(DedupRecord::Failed {
                failed_at_ms: 5,
                ..
            })
        ));
    }

    #[test]
    fn expired_leases_count_as_attempts() {
        let (_, w) = claim(None, 0, &params(1), lease(L1, 1));
        let rec = put(w);
        let (out, w) = claim(Some(&rec), 5000, &params(1), no_lease);
        assert!(matches!(out, ClaimOutcome::Failed { attempts: 1, .. }));
        assert!(matches!(w, Write::PutFailed(_)));
    }

    #[test]
    fn permanent_release_is_a_dead_letter() {
        let (_, w) = claim(None, 0, &params(5), lease(L1, 1));
        let failed = release(
            Some(&put(w)),
            L1,
            9,
            ReleaseOutcome::Permanent,
            Some("bad input".into()),
        )
        .unwrap();
        let (out, w) = claim(Some(&failed), 10, &params(5), no_lease);
        assert_eq!(
            out,
            ClaimOutcome::Failed {
                error: Some("bad input".into()),
                attempts: 1
            }
        );
        assert_eq!(w, Write::None);
    }

    #[test]
    fn fingerprints_must_agree_when_both_are_given() {
        let mut p = params(3);
        p.fingerprint = Some("A".into());
        let (_, w) = claim(None, 0, &p, lease(L1, 1));
        let rec = put(w);
        let mut other = p.clone();
        other.fingerprint = Some("B".into());
        assert_eq!(
            claim(Some(&rec), 1, &other, no_lease).0,
            ClaimOutcome::Mismatch
        );
        let mut none = p.clone();
        none.fingerprint = None;
        assert!(matches!(
            claim(Some(&rec), 1, &none, no_lease).0,
            ClaimOutcome::InProgress { .. }
        ));
    }

    #[test]
    fn marked_keys_read_as_completed() {
        let marked = DedupRecord::Marked { marked_at_ms: 7 };
        assert_eq!(
            claim(Some(&marked), 8, &params(3), no_lease).0,
            ClaimOutcome::Completed {
                result: None,
                completed_at_ms: 7
            }
        );
    }

    #[test]
    fn extend_moves_the_lease_end() {
        let (_, w) = claim(None, 0, &params(3), lease(L1, 1));
        let rec = put(w);
        let ext = extend(Some(&rec), L1, 900, 5000).unwrap();
        assert!(matches!(
            ext,
            DedupRecord::Leased {
                lease_until_ms: 5900,
                ..
            }
        ));
    }
}
