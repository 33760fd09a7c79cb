//! `[store.encryption]`: the keys stored responses are sealed with.
//!
//! ```toml
//! [store.encryption]
//! keys = [{ id = "k2", env = "IDEMGATE_KEY_K2" }, { id = "k1", file = "/run/secrets/k1" }]
//! ```
//!
//! Each key is 32 bytes, written in standard base64, read from an
//! environment variable or a file at start-up; the first seals, all open.
//! A key that cannot be read is a config problem naming it.

use base64::Engine;
use serde::Serialize;
use toml::Value;

use crate::checker::Checker;

/// Where a key's material comes from (not secret; shown by check-config).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeySource {
    Env(String),
    File(String),
}

/// One key: its id, where it came from, and its 32 bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct EncryptionKey {
    pub id: String,
    pub source: KeySource,
    pub material: Vec<u8>,
}

/// Key material is secret: never printed.
impl std::fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptionKey")
            .field("id", &self.id)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Checker {
    /// Reads a secret named by `{ env = "NAME" }` or `{ file = "/path" }`
    /// (other keys of `t` are the caller's): where it came from, and its
    /// text. An unset variable or unreadable file is a problem naming it.
    pub(super) fn secret_source(
        &mut self,
        at: &str,
        t: &toml::map::Map<String, Value>,
    ) -> Option<(KeySource, String)> {
        match (t.get("env"), t.get("file")) {
            (Some(v), None) => {
                let path = format!("{at}.env");
                let name = self.string(&path, v)?;
                match std::env::var(&name) {
                    Ok(s) => Some((KeySource::Env(name), s)),
                    Err(_) => {
                        self.err(&path, format!("the environment variable {name} is not set"));
                        None
                    }
                }
            }
            (None, Some(v)) => {
                let path = format!("{at}.file");
                let file = self.string(&path, v)?;
                match std::fs::read_to_string(&file) {
                    Ok(s) => Some((KeySource::File(file), s)),
                    Err(e) => {
                        self.err(&path, format!("cannot read {file:?}: {e}"));
                        None
                    }
                }
            }
            _ => {
                self.err(at, "give exactly one of env or file".into());
                None
            }
        }
    }

    /// `store.encryption`, if set: its keys, sealing key first.
    pub(super) fn encryption(&mut self, v: &Value) -> Vec<EncryptionKey> {
        let at = "store.encryption";
        let Value::Table(t) = v else {
            self.err(at, "must be a table with keys = [...]".into());
            return Vec::new();
        };
        if let Some(other) = t.keys().find(|k| *k != "keys") {
            self.err(
                &format!("{at}.{other}"),
                "is not a key of [store.encryption]".into(),
            );
        }
        let Some(items) = t
            .get("keys")
            .and_then(|k| self.list(&format!("{at}.keys"), k))
        else {
            self.err(
                &format!("{at}.keys"),
                "is required: at least one key".into(),
            );
            return Vec::new();
        };
        if items.is_empty() {
            self.err(&format!("{at}.keys"), "needs at least one key".into());
        }
        let mut out: Vec<EncryptionKey> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let at = format!("{at}.keys[{i}]");
            if let Some(k) = self.encryption_key(&at, item) {
                if out.iter().any(|o| o.id == k.id) {
                    self.err(&format!("{at}.id"), format!("{:?} is given twice", k.id));
                }
                out.push(k);
            }
        }
        out
    }

    fn encryption_key(&mut self, at: &str, item: &Value) -> Option<EncryptionKey> {
        let Value::Table(t) = item else {
            self.err(
                at,
                "must be { id = \"...\", env = \"...\" } or { id, file }".into(),
            );
            return None;
        };
        let id = match t.get("id") {
            Some(v) => self.string(&format!("{at}.id"), v)?,
            None => {
                self.err(&format!("{at}.id"), "is required".into());
                return None;
            }
        };
        if id.is_empty() || id.len() > 255 || !id.is_ascii() {
            self.err(
                &format!("{at}.id"),
                "must be 1 to 255 ASCII characters".into(),
            );
            return None;
        }
        let (source, text) = self.secret_source(at, t)?;
        let material = match base64::engine::general_purpose::STANDARD.decode(text.trim()) {
            Ok(m) => m,
            Err(_) => {
                self.err(at, format!("key {id:?} is not standard base64"));
                return None;
            }
        };
        if material.len() != 32 {
            self.err(
                at,
                format!("key {id:?} is {} bytes; AES-256 needs 32", material.len()),
            );
            return None;
        }
        Some(EncryptionKey {
            id,
            source,
            material,
        })
    }
}
