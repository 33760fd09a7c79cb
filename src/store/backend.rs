//! What a backend provides to be registered (`registry.rs`): its name, its
//! own keys of `[store]`, a check that turns them into its checked
//! configuration ([`BackendConfig`]), and, from that, how it renders for
//! `check-config` and how it opens into a [`Store`].
//!
//! The keys every backend shares (`backend`, `on_store_error`, `timeout`,
//! `[store.encryption]`) are the configuration's; a backend receives what
//! it needs of them in [`Opening`].

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use toml::Value;

use super::error::StoreFuture;
use super::handle::Store;
use super::sealing::Sealing;
use crate::checker::Checker;
use crate::metrics::Metrics;

/// One backend, as the registry lists it.
pub struct Registration {
    /// What `[store] backend` says to choose it.
    pub name: &'static str,
    /// Its own keys of `[store]`.
    pub keys: &'static [&'static str],
    /// Checks its keys; `None` when a problem was recorded.
    pub check: fn(&mut Section<'_>) -> Option<Arc<dyn BackendConfig>>,
}

/// A backend's checked configuration.
pub trait BackendConfig: fmt::Debug + Send + Sync + 'static {
    /// The `[store] backend` name it was chosen by.
    fn name(&self) -> &'static str;

    /// Its keys as in force, for `check-config` (and to tell whether a
    /// reload changed them): secrets redacted.
    fn render(&self) -> toml::Table;

    /// Connects (or builds), checks that it answers, starts what it runs.
    fn open<'a>(&'a self, opening: Opening<'a>) -> StoreFuture<'a, Store>;

    /// Creates or migrates what the backend keeps its records in
    /// (`idemgate migrate`); what it did, in a sentence.
    fn migrate<'a>(&'a self, opening: Opening<'a>) -> StoreFuture<'a, String> {
        let _ = opening;
        let name = self.name();
        Box::pin(async move { Ok(format!("the {name} store has no schema to migrate")) })
    }
}

/// What opening a backend takes from the rest of the configuration.
pub struct Opening<'a> {
    /// `store.timeout`: the bound on any one call.
    pub timeout: Duration,
    /// How records are written and read (encryption, decode errors).
    pub sealing: Sealing,
    /// Where a backend reports what only it can count.
    pub metrics: Option<&'a Metrics>,
}

/// `[store]` as written (with the command-line flags laid over it), for
/// the backend it chose to check its own keys in.
pub struct Section<'a> {
    table: &'a toml::Table,
    /// Keys a flag set, and how problems name that flag.
    flags: &'a BTreeMap<String, String>,
    pub checker: &'a mut Checker,
}

impl<'a> Section<'a> {
    pub fn new(
        table: &'a toml::Table,
        flags: &'a BTreeMap<String, String>,
        checker: &'a mut Checker,
    ) -> Self {
        Section {
            table,
            flags,
            checker,
        }
    }

    /// How problems name `key`: the flag that set it, or `store.<key>`.
    pub fn path(&self, key: &str) -> String {
        self.flags
            .get(key)
            .cloned()
            .unwrap_or_else(|| format!("store.{key}"))
    }

    /// Whether the file or a flag sets `key`.
    pub fn has(&self, key: &str) -> bool {
        self.table.contains_key(key)
    }

    /// Overwrites `slot` with the checked value of `key`, if it is set and
    /// checks out; a problem is recorded otherwise.
    pub fn set<T>(
        &mut self,
        slot: &mut T,
        key: &str,
        check: impl FnOnce(&mut Checker, &str, &Value) -> Option<T>,
    ) {
        let path = self.path(key);
        self.checker
            .set(slot, &self.table.get(key).cloned(), &path, check);
    }

    /// Records a problem with `key`.
    pub fn err(&mut self, key: &str, msg: String) {
        let path = self.path(key);
        self.checker.err(&path, msg);
    }
}
