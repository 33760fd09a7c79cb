//! Waiting duplicates, woken by `LISTEN`/`NOTIFY`: one dedicated
//! connection per replica listens on the schema's channel, whose payload
//! is the settled record's key (hex); [`Waiters`] wakes whoever waits on
//! it. The connection is made again (and the channel listened to again)
//! after it drops; meanwhile, and whenever a notification is lost, waiters
//! fall back on re-checking the record every `recheck`.
//!
//! The same connection listens on the replay caches' channel: a purged or
//! discarded record's key drops this replica's copy. The cache is on only
//! while both channels are listened to; a lost connection turns it off
//! (and empties it) until they are again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio_postgres::AsyncMessage;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::store::replays::ReplayCache;

/// The channels one listener hears.
pub struct Channels {
    /// Settled records' keys: waiters wake.
    pub done: String,
    /// Purged or discarded records' keys: copies go.
    pub replays: String,
}

/// The keys waited on now, with how many wait on each.
#[derive(Default)]
pub struct Waiters {
    map: Mutex<HashMap<String, (Arc<Notify>, usize)>>,
}

impl Waiters {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, (Arc<Notify>, usize)>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers one waiter on `key` (hex).
    pub fn add(&self, key: &str) -> Arc<Notify> {
        let mut map = self.lock();
        let entry = map
            .entry(key.to_owned())
            .or_insert_with(|| (Arc::new(Notify::new()), 0));
        entry.1 += 1;
        entry.0.clone()
    }

    /// Removes one waiter on `key`.
    pub fn remove(&self, key: &str) {
        let mut map = self.lock();
        if let Some(entry) = map.get_mut(key) {
            entry.1 -= 1;
            if entry.1 == 0 {
                map.remove(key);
            }
        }
    }

    fn wake(&self, key: &str) {
        if let Some((n, _)) = self.lock().get(key) {
            n.notify_waiters();
        }
    }

    /// Wakes every waiter (the connection dropped: any message may be lost).
    fn wake_all(&self) {
        for (n, _) in self.lock().values() {
            n.notify_waiters();
        }
    }
}

/// Listens on both channels while the waiters live, connecting again
/// after every loss of the connection (backing off up to 2 s);
/// `first_listen` hears when the channels are first listened to.
pub async fn run(
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    channels: Channels,
    waiters: Weak<Waiters>,
    replays: Option<Arc<ReplayCache>>,
    first_listen: tokio::sync::oneshot::Sender<()>,
) {
    let mut first_listen = Some(first_listen);
    let mut backoff = Duration::from_millis(50);
    loop {
        if waiters.strong_count() == 0 {
            return;
        }
        match config.connect(tls.clone()).await {
            Ok((client, mut connection)) => {
                let mut messages =
                    futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                // The connection only makes progress while it is polled:
                // LISTEN is sent while the messages are read.
                let statement = format!(
                    "LISTEN \"{}\"; LISTEN \"{}\"",
                    channels.done, channels.replays
                );
                let listen = client.batch_execute(&statement);
                tokio::pin!(listen);
                let mut listening = false;
                let mut alive = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        done = &mut listen, if !listening => match done {
                            Ok(()) => {
                                listening = true;
                                backoff = Duration::from_millis(50);
                                if let Some(r) = &replays {
                                    r.set_live(true);
                                }
                                if let Some(tx) = first_listen.take() {
                                    let _ = tx.send(());
                                }
                                // Anything settled before this was missed.
                                if let Some(w) = waiters.upgrade() {
                                    w.wake_all();
                                }
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "LISTEN failed; waiters re-check on their own");
                                break;
                            }
                        },
                        msg = messages.next() => match msg {
                            Some(Ok(AsyncMessage::Notification(n))) => {
                                if n.channel() == channels.replays {
                                    if let Some(r) = &replays {
                                        r.invalidate(n.payload());
                                    }
                                } else if let Some(w) = waiters.upgrade() {
                                    w.wake(n.payload());
                                }
                            }
                            Some(Ok(_)) => {}
                            Some(Err(e)) => {
                                tracing::warn!(error = %e, "the LISTEN connection broke; connecting again");
                                break;
                            }
                            None => break,
                        },
                        _ = alive.tick() => {
                            if waiters.strong_count() == 0 {
                                return;
                            }
                        }
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "the LISTEN connection could not be made; trying again");
            }
        }
        // Purges may go unheard until the channels are listened to again.
        if let Some(r) = &replays {
            r.set_live(false);
        }
        if let Some(w) = waiters.upgrade() {
            w.wake_all();
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}
