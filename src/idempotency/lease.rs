//! Lease ids: the token that proves who holds a lease.
//!
//! One type for the HTTP record's lease and the consumer-dedup claim's
//! lease. It is random per acquisition, compared on every state change, and
//! travels as 32 lowercase hex digits (in Redis hashes and in the dedup
//! API's `lease_id`).

use std::fmt;
use std::str::FromStr;

/// A lease's identity: 128 random bits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseId(u128);

impl LeaseId {
    /// A fresh random id.
    pub fn random() -> Self {
        LeaseId(rand::random())
    }

    pub const fn from_u128(v: u128) -> Self {
        LeaseId(v)
    }

    pub const fn as_u128(self) -> u128 {
        self.0
    }
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Its 32 digits straight into a buffer: `{:032x}` went through the
        // formatter's padding, 620 instructions a call, twice a request.
        let mut digits = [0; 32];
        super::key::hex_into(&self.0.to_be_bytes(), &mut digits);
        f.write_str(std::str::from_utf8(&digits).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LeaseId({self})")
    }
}

/// Text that is not 32 hex digits names no lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not a lease id (32 hex digits)")]
pub struct NotALeaseId;

impl FromStr for LeaseId {
    type Err = NotALeaseId;

    fn from_str(s: &str) -> Result<Self, NotALeaseId> {
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(NotALeaseId);
        }
        u128::from_str_radix(s, 16)
            .map(LeaseId)
            .map_err(|_| NotALeaseId)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips_and_rejects_other_text() {
        let id = LeaseId::from_u128(0xabc);
        assert_eq!(id.to_string(), "00000000000000000000000000000abc");
        assert_eq!(id.to_string().parse::<LeaseId>(), Ok(id));
        for bad in ["", "abc", "+0000000000000000000000000000abc", "L1"] {
            assert_eq!(bad.parse::<LeaseId>(), Err(NotALeaseId), "{bad}");
        }
        assert_ne!(LeaseId::random(), LeaseId::random());
        for v in [0, 1, 0xabc, u128::MAX, u128::MAX / 3, 1 << 127] {
            assert_eq!(LeaseId::from_u128(v).to_string(), format!("{v:032x}"));
        }
    }
}
