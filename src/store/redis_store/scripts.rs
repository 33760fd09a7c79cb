//! The Lua scripts, one `.lua` file each under `lua/`, every one headed by
//! its KEYS, ARGV and return value. `lua/lib.lua` (the store's clock, fence
//! and wake-up helpers) is put in front of each at compile time: Redis
//! scripts cannot include one another, and this keeps one copy of each
//! helper in the source.

use redis::Script;

/// A script from `lua/<name>.lua`, with the shared helpers in front.
macro_rules! script {
    ($name:literal) => {
        Script::new(concat!(
            include_str!("lua/lib.lua"),
            include_str!(concat!("lua/", $name, ".lua"))
        ))
    };
}

/// Every script, hashed once (invoked with EVALSHA, loaded on NOSCRIPT).
pub(super) struct Scripts {
    pub begin: Script,
    pub renew: Script,
    pub complete: Script,
    pub release: Script,
    pub get: Script,
    pub in_flight: Script,
    pub purge: Script,
    pub discard: Script,
    pub mark_unknown: Script,
    pub resolve: Script,
    pub admit: Script,
    pub dedup_claim: Script,
    pub dedup_extend: Script,
    pub dedup_complete: Script,
    pub dedup_release: Script,
    pub dedup_mark: Script,
    pub dedup_inspect: Script,
    pub dedup_delete_failed: Script,
    pub dedup_list_failed: Script,
}

impl Scripts {
    pub(super) fn load() -> Self {
        Scripts {
            begin: script!("begin"),
            renew: script!("renew"),
            complete: script!("complete"),
            release: script!("release"),
            get: script!("get"),
            in_flight: script!("in_flight"),
            purge: script!("purge"),
            discard: script!("discard"),
            mark_unknown: script!("mark_unknown"),
            resolve: script!("resolve"),
            admit: script!("admit"),
            dedup_claim: script!("dedup_claim"),
            dedup_extend: script!("dedup_extend"),
            dedup_complete: script!("dedup_complete"),
            dedup_release: script!("dedup_release"),
            dedup_mark: script!("dedup_mark"),
            dedup_inspect: script!("dedup_inspect"),
            dedup_delete_failed: script!("dedup_delete_failed"),
            dedup_list_failed: script!("dedup_list_failed"),
        }
    }
}
