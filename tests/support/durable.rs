//! A driver for the durability tests: sixteen clients sending new keys
//! until told to stop, recording how each request ended and when, and the
//! check that every response a client saw end cleanly replays after the
//! store came back (or failed over).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::TestClient;

/// How one request ended, as its client saw it.
#[derive(Debug, Clone, PartialEq)]
pub enum Ended {
    /// A complete 201: its body.
    Clean(Bytes),
    /// Any other status (a problem).
    Status(u16),
    /// The body broke off.
    Aborted,
}

pub async fn send(c: &TestClient, key: &str) -> Ended {
    let headers = [
        ("idempotency-key", key),
        ("content-type", "application/json"),
    ];
    match c.try_send("POST", "/v1/charges", &headers, "{}").await {
        Ok(g) if g.status == 201 => Ended::Clean(g.body),
        Ok(g) => Ended::Status(g.status.as_u16()),
        Err(_) => Ended::Aborted,
    }
}

/// One request of the load: its key, how it ended, when.
pub type Sent = (String, Ended, Instant);

/// Drives new keys from 16 clients until `stop`, recording how each ended.
pub fn load(c: &TestClient, stop: &Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<Vec<Sent>>> {
    let n = Arc::new(AtomicUsize::new(0));
    (0..16)
        .map(|w| {
            let (c, stop, n) = (c.clone(), stop.clone(), n.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("durable-{w}-{}", n.fetch_add(1, Ordering::Relaxed));
                    let ended = tokio::time::timeout(Duration::from_secs(10), send(&c, &key))
                        .await
                        .expect("a request hung");
                    out.push((key, ended, Instant::now()));
                }
                out
            })
        })
        .collect()
}

/// What sending every clean-ended key again found.
#[derive(Debug, Default)]
pub struct Replayed {
    /// Requests by how they ended: `clean`, `problem`, `aborted`.
    pub tally: HashMap<&'static str, usize>,
    /// Clean-ended keys that did not replay their response: the key, and
    /// the status and body of the retry.
    pub missing: Vec<(String, u16, Bytes)>,
}

/// Sends every clean-ended key again (same body) and compares.
pub async fn replay_clean_ends(c: &TestClient, ended: &[Sent]) -> Replayed {
    let mut out = Replayed::default();
    for (key, e, _) in ended {
        match e {
            Ended::Clean(body) => {
                *out.tally.entry("clean").or_default() += 1;
                let headers = [
                    ("idempotency-key", key.as_str()),
                    ("content-type", "application/json"),
                ];
                let again = c.send("POST", "/v1/charges", &headers, "{}").await;
                let replayed = again.header("idempotent-replayed") == Some("true");
                if again.status != 201 || !replayed || again.body != *body {
                    out.missing
                        .push((key.clone(), again.status.as_u16(), again.body));
                }
            }
            Ended::Status(_) => *out.tally.entry("problem").or_default() += 1,
            Ended::Aborted => *out.tally.entry("aborted").or_default() += 1,
        }
    }
    out
}

/// After the store is back: every key whose client saw a clean end
/// replays that very response.
pub async fn every_clean_end_replays(
    c: &TestClient,
    ended: &[Sent],
) -> HashMap<&'static str, usize> {
    let r = replay_clean_ends(c, ended).await;
    assert!(
        r.missing.is_empty(),
        "{} of {} clean-ended responses were not kept: {:?}",
        r.missing.len(),
        r.tally.get("clean").copied().unwrap_or(0),
        &r.missing[..r.missing.len().min(5)]
    );
    r.tally
}
