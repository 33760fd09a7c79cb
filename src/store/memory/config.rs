//! The memory backend's keys of `[store]` (`max_entries`, `max_bytes`) and
//! how it opens: nothing to connect to, so nothing can fail but the bound.

use std::sync::Arc;

use super::store::MemoryStore;
use crate::checker::Checker;
use crate::store::backend::{BackendConfig, Opening, Registration, Section};
use crate::store::error::StoreFuture;
use crate::store::handle::Store;

/// `backend = "memory"`.
pub const REGISTRATION: Registration = Registration {
    name: "memory",
    keys: &["max_entries", "max_bytes"],
    check,
};

/// The memory store's bounds.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryConfig {
    /// The most records held; new keys get 503 beyond it.
    pub max_entries: usize,
    /// The most bytes held (keys, records, in-flight entries).
    pub max_bytes: u64,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            max_entries: 1_000_000,
            max_bytes: 512 << 20,
        }
    }
}

fn check(s: &mut Section<'_>) -> Option<Arc<dyn BackendConfig>> {
    let mut c = MemoryConfig::default();
    s.set(&mut c.max_entries, "max_entries", Checker::int(1, i64::MAX));
    s.set(&mut c.max_bytes, "max_bytes", Checker::size);
    Some(Arc::new(c))
}

impl BackendConfig for MemoryConfig {
    fn name(&self) -> &'static str {
        REGISTRATION.name
    }

    fn render(&self) -> toml::Table {
        let mut t = toml::Table::new();
        let int = |n: u64| toml::Value::Integer(i64::try_from(n).unwrap_or(i64::MAX));
        t.insert("max_entries".into(), int(self.max_entries as u64));
        t.insert("max_bytes".into(), int(self.max_bytes));
        t
    }

    fn open<'a>(&'a self, opening: Opening<'a>) -> StoreFuture<'a, Store> {
        let store = MemoryStore::bounded(
            self.max_entries,
            usize::try_from(self.max_bytes).unwrap_or(usize::MAX),
            opening.sealing,
        );
        Box::pin(async move { Ok(Store::new(store)) })
    }
}
