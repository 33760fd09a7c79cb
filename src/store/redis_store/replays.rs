//! The replay cache ([`crate::store::replays`]) on standalone Redis: its
//! invalidation channel is a pub/sub channel every replica subscribes to at
//! connect, heard through the RESP3 push messages of the store's own
//! connection. A message drops the copy it names; a confirmed
//! (re)subscription turns the cache on, a dropped connection off. Cluster's
//! sharded pub/sub has no one channel every replica hears, so Cluster runs
//! without the cache.

use std::sync::Arc;

use redis::{PushInfo, PushKind, Value};

use crate::store::replays::ReplayCache;

/// The cache and the channel its invalidations come on.
pub(super) struct Replays {
    pub cache: Arc<ReplayCache>,
    channel: Vec<u8>,
}

impl Replays {
    pub fn new(
        channel: String,
        max_bytes: usize,
        lookups: Option<prometheus::IntCounterVec>,
    ) -> Self {
        Replays {
            cache: Arc::new(ReplayCache::new(max_bytes, lookups)),
            channel: channel.into_bytes(),
        }
    }

    pub fn channel(&self) -> &[u8] {
        &self.channel
    }

    /// Follows the connection: invalidations, a drop, a (re)subscription.
    pub fn on_push(&self, info: &PushInfo) {
        let on_channel =
            |i: usize| matches!(info.data.get(i), Some(Value::BulkString(c)) if *c == self.channel);
        match info.kind {
            PushKind::Message if on_channel(0) => {
                if let Some(Value::BulkString(name)) = info.data.get(1) {
                    if let Ok(name) = std::str::from_utf8(name) {
                        self.cache.invalidate(name);
                    }
                }
            }
            PushKind::Subscribe if on_channel(0) => self.cache.set_live(true),
            // Invalidations may have been lost: keep nothing until the
            // channel is heard again.
            PushKind::Disconnection => self.cache.set_live(false),
            _ => {}
        }
    }
}
