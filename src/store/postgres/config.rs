//! The PostgreSQL backend's keys of `[store]` (`url`, or `url_env` /
//! `url_file` to keep a password out of the file; `schema`, `pool_size`,
//! `ca_file`, `replay_cache`), their checks and defaults, and how it opens (and migrates,
//! for `idemgate migrate`). Checking never touches the database.

use std::path::PathBuf;
use std::sync::Arc;

use toml::Value;

use super::store::{PostgresOptions, PostgresStore};
use super::tls;
use crate::checker::Checker;
use crate::store::backend::{BackendConfig, Opening, Registration, Section};
use crate::store::error::{StoreError, StoreFuture};
use crate::store::handle::Store;

/// `backend = "postgres"`.
pub const REGISTRATION: Registration = Registration {
    name: "postgres",
    keys: &[
        "url",
        "url_env",
        "url_file",
        "schema",
        "pool_size",
        "ca_file",
        "replay_cache",
    ],
    check,
};

/// Where the URL was read from (shown by `check-config`; the URL itself
/// only with its password hidden).
#[derive(Debug, Clone, PartialEq)]
pub enum UrlSource {
    Inline,
    Env(String),
    File(PathBuf),
}

/// The PostgreSQL backend's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct PostgresConfig {
    /// A libpq-style URL or key=value string; several hosts for failover.
    /// May carry a password.
    pub url: String,
    pub source: UrlSource,
    /// The schema idemgate's tables and functions live in.
    pub schema: String,
    /// Connections per replica (the listener's one not counted).
    pub pool_size: usize,
    /// A PEM file of CA certificates trusted besides the webpki roots.
    pub ca_file: Option<PathBuf>,
    /// Bytes of completed records kept in the process so replays need no
    /// round trip (0: off).
    pub replay_cache: u64,
}

fn check(s: &mut Section<'_>) -> Option<Arc<dyn BackendConfig>> {
    let before = s.checker.errors.len();
    let mut c = PostgresConfig {
        url: String::new(),
        source: UrlSource::Inline,
        schema: "idemgate".into(),
        pool_size: 16,
        ca_file: None,
        replay_cache: 64 << 20,
    };
    let given = ["url", "url_env", "url_file"].map(|k| s.has(k));
    if given.iter().filter(|g| **g).count() > 1 {
        s.err("url", "give one of url, url_env and url_file".into());
    }
    s.set(&mut c.url, "url", url);
    let mut env = None;
    s.set(&mut env, "url_env", |c, p, v| {
        let name = c.string(p, v)?;
        match std::env::var(&name) {
            Ok(text) => Some(Some((name, text))),
            Err(_) => {
                c.err(p, format!("the environment variable {name} is not set"));
                None
            }
        }
    });
    let mut file = None;
    s.set(&mut file, "url_file", |c, p, v| {
        let path = PathBuf::from(c.string(p, v)?);
        match std::fs::read_to_string(&path) {
            Ok(text) => Some(Some((path, text))),
            Err(e) => {
                c.err(p, format!("cannot read {}: {e}", path.display()));
                None
            }
        }
    });
    let read = match (env, file) {
        (Some((name, text)), _) => Some(("url_env", UrlSource::Env(name), text)),
        (None, Some((path, text))) => Some(("url_file", UrlSource::File(path), text)),
        (None, None) => None,
    };
    if let Some((key, source, text)) = read {
        let path = s.path(key);
        if let Some(u) = url(s.checker, &path, &Value::String(text)) {
            c.url = u;
            c.source = source;
        }
    }
    s.set(&mut c.schema, "schema", schema_name);
    s.set(&mut c.pool_size, "pool_size", Checker::int(1, 1024));
    s.set(&mut c.replay_cache, "replay_cache", Checker::size);
    s.set(&mut c.ca_file, "ca_file", |c, p, v| {
        let path = PathBuf::from(c.string(p, v)?);
        if let Err(e) = tls::client_config(Some(&path), tls::Verify::Full) {
            c.err(p, e);
            return None;
        }
        Some(Some(path))
    });
    if c.url.is_empty() && s.checker.errors.len() == before {
        s.err(
            "url",
            "the \"postgres\" backend needs a URL (url, url_env or url_file)".into(),
        );
    }
    (s.checker.errors.len() == before).then(|| Arc::new(c) as Arc<dyn BackendConfig>)
}

fn url(c: &mut Checker, path: &str, v: &Value) -> Option<String> {
    let s = c.string(path, v)?.trim().to_owned();
    match tls::parse(&s) {
        Ok((cfg, _)) if !cfg.get_hosts().is_empty() => Some(s),
        Ok(_) => {
            c.err(path, format!("{:?} names no host", redact(&s)));
            None
        }
        // The parser's message never repeats the password.
        Err(e) => {
            c.err(
                path,
                format!("{:?} is not a PostgreSQL URL: {e}", redact(&s)),
            );
            None
        }
    }
}

/// A schema name: letters, digits and `_`, not starting with a digit,
/// at most 50 bytes (its channel name must fit PostgreSQL's 63).
fn schema_name(c: &mut Checker, path: &str, v: &Value) -> Option<String> {
    let s = c.string(path, v)?;
    let ok = !s.is_empty()
        && s.len() <= 50
        && !s.starts_with(|ch: char| ch.is_ascii_digit())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !ok {
        c.err(
            path,
            format!("{s:?} must be 1-50 letters, digits or _, not starting with a digit"),
        );
        return None;
    }
    Some(s)
}

/// The URL with its password hidden: `postgres://user:***@host/db`, and
/// `password=***` in a key=value string or a URL's query.
pub fn redact(url: &str) -> String {
    let mut out = url.to_owned();
    if let Some(scheme_end) = out.find("://") {
        let rest = scheme_end + 3;
        if let Some(at) = out[rest..].find('@').map(|i| i + rest) {
            if let Some(colon) = out[rest..at].find(':').map(|i| i + rest) {
                out.replace_range(colon + 1..at, "***");
            }
        }
    }
    let mut from = 0;
    while let Some(i) = out[from..].find("password=").map(|i| i + from) {
        let start = i + "password=".len();
        let end = out[start..]
            .find(['&', ' '])
            .map_or(out.len(), |e| e + start);
        out.replace_range(start..end, "***");
        from = start + 3;
    }
    out
}

impl PostgresConfig {
    fn options(&self, opening: &Opening<'_>) -> Result<PostgresOptions, StoreError> {
        let mut options = PostgresOptions::new(&self.url, &self.schema)?;
        options.pool_size = self.pool_size;
        options.timeout = opening.timeout;
        options.sealing = opening.sealing.clone();
        options.replay_cache_bytes = usize::try_from(self.replay_cache).unwrap_or(usize::MAX);
        options.replay_cache_lookups = opening.metrics.map(|m| m.replay_cache_lookups.clone());
        if let Some(ca) = &self.ca_file {
            options.tls =
                tls::client_config(Some(ca), options.verify).map_err(StoreError::Unavailable)?;
        }
        Ok(options)
    }
}

impl BackendConfig for PostgresConfig {
    fn name(&self) -> &'static str {
        REGISTRATION.name
    }

    fn render(&self) -> toml::Table {
        let mut t = toml::Table::new();
        match &self.source {
            UrlSource::Inline => t.insert("url".into(), redact(&self.url).into()),
            UrlSource::Env(name) => t.insert("url_env".into(), name.clone().into()),
            UrlSource::File(path) => t.insert("url_file".into(), path.display().to_string().into()),
        };
        t.insert("schema".into(), self.schema.clone().into());
        let pool = i64::try_from(self.pool_size).unwrap_or(i64::MAX);
        t.insert("pool_size".into(), pool.into());
        if let Some(ca) = &self.ca_file {
            t.insert("ca_file".into(), ca.display().to_string().into());
        }
        let cache = i64::try_from(self.replay_cache).unwrap_or(i64::MAX);
        t.insert("replay_cache".into(), cache.into());
        t
    }

    fn open<'a>(&'a self, opening: Opening<'a>) -> StoreFuture<'a, Store> {
        Box::pin(async move {
            let options = self.options(&opening)?;
            Ok(Store::new(PostgresStore::connect(options).await?))
        })
    }

    fn migrate<'a>(&'a self, opening: Opening<'a>) -> StoreFuture<'a, String> {
        Box::pin(async move { PostgresStore::migrate_only(self.options(&opening)?).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        for (url, shown) in [
            (
                "postgres://app:s3cret@db:5432/x",
                "postgres://app:***@db:5432/x",
            ),
            ("postgres://app@db/x", "postgres://app@db/x"),
            (
                "postgresql://db/x?user=app&password=s3cret&sslmode=require",
                "postgresql://db/x?user=app&password=***&sslmode=require",
            ),
            (
                "host=db user=app password=s3cret dbname=x",
                "host=db user=app password=*** dbname=x",
            ),
        ] {
            assert_eq!(redact(url), shown);
            assert!(!redact(url).contains("s3cret"));
        }
    }
}
