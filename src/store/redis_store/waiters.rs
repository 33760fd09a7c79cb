//! Waiting duplicates on Redis: one registration per waiter and channel,
//! woken by the RESP3 push messages of the store's own connection.
//!
//! A channel is subscribed when its first waiter arrives and unsubscribed
//! after its last leaves. A dropped connection wakes everyone: messages may
//! have been lost, so each waiter re-checks the record.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use redis::{PushInfo, PushKind, Value};
use tokio::sync::Notify;

/// Waiting duplicates by channel; the push handler wakes them.
#[derive(Default)]
pub(super) struct Waiters {
    channels: Mutex<Channels>,
}

/// Channel name → its waiters' notifier and how many wait on it.
type Channels = HashMap<Vec<u8>, (Arc<Notify>, usize)>;

impl Waiters {
    fn lock(&self) -> MutexGuard<'_, Channels> {
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn on_push(&self, info: PushInfo) {
        match info.kind {
            PushKind::Message | PushKind::SMessage => {
                if let Some(Value::BulkString(channel)) = info.data.first() {
                    if let Some((n, _)) = self.lock().get(channel) {
                        n.notify_waiters();
                    }
                }
            }
            // The connection dropped: messages may be lost, re-check now.
            PushKind::Disconnection => {
                for (n, _) in self.lock().values() {
                    n.notify_waiters();
                }
            }
            _ => {}
        }
    }

    /// Registers a waiter; `true` if it is the channel's first.
    pub(super) fn add(&self, channel: &[u8]) -> (Arc<Notify>, bool) {
        let mut map = self.lock();
        let slot = map
            .entry(channel.to_vec())
            .or_insert_with(|| (Arc::new(Notify::new()), 0));
        slot.1 += 1;
        (slot.0.clone(), slot.1 == 1)
    }

    /// Unregisters a waiter; `true` if it was the channel's last.
    pub(super) fn remove(&self, channel: &[u8]) -> bool {
        let mut map = self.lock();
        match map.get_mut(channel) {
            Some(slot) if slot.1 > 1 => {
                slot.1 -= 1;
                false
            }
            Some(_) => {
                map.remove(channel);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiters_count_per_channel() {
        let w = Waiters::default();
        assert!(w.add(b"c").1);
        assert!(!w.add(b"c").1);
        assert!(!w.remove(b"c"));
        assert!(w.remove(b"c"));
        assert!(!w.remove(b"c"));
    }
}
