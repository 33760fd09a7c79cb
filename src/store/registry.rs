//! The store backends by name: what `[store] backend = "..."` may say, and
//! for each, its registration ([`Registration`]: its keys, its check, and
//! through that how it renders and opens). Adding a backend is a folder
//! under `store/` and one line here.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::backend::{BackendConfig, Registration, Section};
use super::memory;
use super::postgres::config as postgres;
use super::redis_store::config as redis;
use crate::checker::Checker;

/// Every backend, the default first.
const BACKENDS: &[Registration] = &[
    memory::REGISTRATION,
    redis::STANDALONE,
    redis::CLUSTER,
    postgres::REGISTRATION,
];

/// The backend that `[store] backend` chooses when it says nothing.
pub fn default_backend() -> Arc<dyn BackendConfig> {
    Arc::new(memory::MemoryConfig::default())
}

/// Every backend's name, in order.
pub fn names() -> impl Iterator<Item = &'static str> {
    BACKENDS.iter().map(|b| b.name)
}

/// Whether some backend reads `key` of `[store]`.
pub fn known_key(key: &str) -> bool {
    BACKENDS.iter().any(|b| b.keys.contains(&key))
}

/// Checks the keys of `[store]` for the backend `name`: its checked
/// configuration, or `None` (an unknown name, or problems recorded).
pub fn check(
    name: &str,
    table: &toml::Table,
    flags: &BTreeMap<String, String>,
    checker: &mut Checker,
) -> Option<Arc<dyn BackendConfig>> {
    let registered = BACKENDS.iter().find(|b| b.name == name)?;
    (registered.check)(&mut Section::new(table, flags, checker))
}
