//! Fair share of new keys per caller: a token bucket per caller scope,
//! pure (the store keeps the bucket and passes its clock).
//!
//! A bucket holds up to `burst` tokens and refills at `per_second`; a new
//! key takes one. Replays and duplicates take none: only a request that
//! would create a record is counted.

use std::time::Duration;

/// `new_keys_per_scope` and `new_keys_burst`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

impl Rate {
    /// Parses `"200/s"`, `"50/m"`, `"10/h"` (with `burst`, default the
    /// per-second rate, at least 1).
    pub fn parse(text: &str, burst: Option<u32>) -> Option<Rate> {
        let (n, unit) = text.trim().split_once('/')?;
        let n: f64 = n
            .trim()
            .parse()
            .ok()
            .filter(|n: &f64| *n > 0.0 && n.is_finite())?;
        let per_second = match unit.trim() {
            "s" => n,
            "m" => n / 60.0,
            "h" => n / 3600.0,
            _ => return None,
        };
        let burst = burst.map_or(per_second.max(1.0), f64::from);
        Some(Rate { per_second, burst })
    }

    /// How long a bucket takes to refill from empty: its lifetime in a
    /// store, since a full bucket needs no state.
    pub fn refill(&self) -> Duration {
        Duration::from_secs_f64((self.burst / self.per_second).min(86_400.0))
            + Duration::from_secs(1)
    }
}

/// A caller's bucket: tokens left at `at_ms`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    pub tokens: f64,
    pub at_ms: u64,
}

/// Takes one token at `now_ms` from `bucket` (a new, full one if `None`):
/// the bucket to keep, and `Err(wait)` when there is none to take.
pub fn take(bucket: Option<Bucket>, rate: &Rate, now_ms: u64) -> (Bucket, Result<(), Duration>) {
    let mut b = bucket.unwrap_or(Bucket {
        tokens: rate.burst,
        at_ms: now_ms,
    });
    let elapsed = now_ms.saturating_sub(b.at_ms) as f64 / 1000.0;
    b.tokens = (b.tokens + elapsed * rate.per_second).min(rate.burst);
    b.at_ms = now_ms;
    if b.tokens >= 1.0 {
        b.tokens -= 1.0;
        (b, Ok(()))
    } else {
        let wait = (1.0 - b.tokens) / rate.per_second;
        (b, Err(Duration::from_secs_f64(wait)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        assert_eq!(
            Rate::parse("200/s", None),
            Some(Rate {
                per_second: 200.0,
                burst: 200.0
            })
        );
        assert_eq!(Rate::parse("60/m", Some(5)).unwrap().per_second, 1.0);
        assert_eq!(Rate::parse("60/m", None).unwrap().burst, 1.0);
        for bad in ["", "200", "0/s", "-1/s", "x/s", "5/d", "5/"] {
            assert_eq!(Rate::parse(bad, None), None, "{bad}");
        }
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let rate = Rate {
            per_second: 2.0,
            burst: 3.0,
        };
        let mut b = None;
        for _ in 0..3 {
            let (next, ok) = take(b, &rate, 1_000);
            assert!(ok.is_ok());
            b = Some(next);
        }
        let (next, refused) = take(b, &rate, 1_000);
        assert_eq!(refused, Err(Duration::from_millis(500)));
        // Half a second later one token has come back.
        let (next, ok) = take(Some(next), &rate, 1_500);
        assert!(ok.is_ok());
        assert!(take(Some(next), &rate, 1_500).1.is_err());
    }
}
