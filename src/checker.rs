//! Loose values → checked ones. The [`Checker`] collects every problem, one
//! line each naming its key path, instead of stopping at the first.

use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderName, Method, Uri};
use toml::Value;

use super::parse_size;
use crate::store::redact_url;

/// Collects problems while converting loose values.
#[derive(Default)]
pub(super) struct Checker {
    pub errors: Vec<String>,
    /// Legal but risky choices, shown by check-config and logged at start.
    pub warnings: Vec<String>,
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

impl Checker {
    pub(super) fn err(&mut self, path: &str, msg: String) {
        self.errors.push(format!("{path}: {msg}"));
    }

    pub(super) fn warn(&mut self, path: &str, msg: String) {
        self.warnings.push(format!("{path}: {msg}"));
    }

    /// Overwrites `slot` with the checked value of the key at `path`, if the
    /// file sets it and it checks out; a problem is recorded otherwise.
    pub(super) fn set<T>(
        &mut self,
        slot: &mut T,
        v: &Option<Value>,
        path: &str,
        check: impl FnOnce(&mut Self, &str, &Value) -> Option<T>,
    ) {
        if let Some(x) = v.as_ref().and_then(|v| check(self, path, v)) {
            *slot = x;
        }
    }

    /// [`Self::set`] with a flag (or its environment variable) that wins over
    /// the file: `flag` names both for messages.
    pub(super) fn set_flagged<T>(
        &mut self,
        slot: &mut T,
        flag: (&Option<String>, &str),
        v: &Option<Value>,
        path: &str,
        check: impl FnOnce(&mut Self, &str, &Value) -> Option<T>,
    ) {
        match flag {
            (Some(given), name) => {
                if let Some(x) = check(self, name, &Value::String(given.clone())) {
                    *slot = x;
                }
            }
            (None, _) => self.set(slot, v, path, check),
        }
    }

    /// A whole number in `min..=max`, as any integer type.
    pub(super) fn int<T: TryFrom<i64>>(
        min: i64,
        max: i64,
    ) -> impl FnOnce(&mut Self, &str, &Value) -> Option<T> {
        move |c, path, v| c.uint(path, v, min, max).and_then(|n| T::try_from(n).ok())
    }

    /// One of `choices` (text → value).
    pub(super) fn one_of<T: Copy>(
        choices: &'static [(&'static str, T)],
    ) -> impl FnOnce(&mut Self, &str, &Value) -> Option<T> {
        move |c, path, v| {
            let s = c.string(path, v)?;
            if let Some((_, x)) = choices.iter().find(|(name, _)| *name == s) {
                return Some(*x);
            }
            let names: Vec<String> = choices.iter().map(|(n, _)| format!("{n:?}")).collect();
            let (last, rest) = names.split_last()?;
            let listed = if rest.is_empty() {
                last.clone()
            } else {
                format!("{} or {last}", rest.join(", "))
            };
            c.err(path, format!("{s:?} is not {listed}"));
            None
        }
    }

    pub(super) fn string(&mut self, path: &str, v: &Value) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            other => {
                self.err(path, format!("{} is not a string", show(other)));
                None
            }
        }
    }

    pub(super) fn bool(&mut self, path: &str, v: &Value) -> Option<bool> {
        match v {
            Value::Boolean(b) => Some(*b),
            other => {
                self.err(path, format!("{} is not true or false", show(other)));
                None
            }
        }
    }

    pub(super) fn uint(&mut self, path: &str, v: &Value, min: i64, max: i64) -> Option<i64> {
        match v {
            Value::Integer(n) if (min..=max).contains(n) => Some(*n),
            Value::Integer(n) => {
                self.err(path, format!("{n} is out of range ({min} to {max})"));
                None
            }
            other => {
                self.err(path, format!("{} is not a whole number", show(other)));
                None
            }
        }
    }

    pub(super) fn duration(&mut self, path: &str, v: &Value) -> Option<Duration> {
        let parsed = match v {
            Value::String(s) => humantime::parse_duration(s.trim()).ok(),
            _ => None,
        };
        match parsed {
            Some(d) if !d.is_zero() => Some(d),
            Some(_) => {
                self.err(path, format!("{} must be longer than zero", show(v)));
                None
            }
            None => {
                self.err(
                    path,
                    format!(
                        "{} is not a duration (e.g. \"500ms\", \"30s\", \"24h\")",
                        show(v)
                    ),
                );
                None
            }
        }
    }

    pub(super) fn size(&mut self, path: &str, v: &Value) -> Option<u64> {
        let parsed = match v {
            Value::Integer(n) if *n >= 0 => Some(*n as u64),
            Value::String(s) => parse_size(s),
            _ => None,
        };
        if parsed.is_none() {
            self.err(
                path,
                format!(
                    "{} is not a size (e.g. \"512KiB\", \"1MiB\", or bytes)",
                    show(v)
                ),
            );
        }
        parsed
    }

    pub(super) fn list(&mut self, path: &str, v: &Value) -> Option<Vec<Value>> {
        match v {
            Value::Array(a) => Some(a.clone()),
            other => {
                self.err(path, format!("{} is not a list", show(other)));
                None
            }
        }
    }

    pub(super) fn header_name(&mut self, path: &str, v: &Value) -> Option<HeaderName> {
        let s = self.string(path, v)?;
        match HeaderName::from_bytes(s.trim().as_bytes()) {
            Ok(h) => Some(h),
            Err(_) => {
                self.err(path, format!("{s:?} is not a valid header name"));
                None
            }
        }
    }

    pub(super) fn each<T>(
        &mut self,
        path: &str,
        v: &Value,
        f: impl Fn(&mut Self, &str, &Value) -> Option<T>,
    ) -> Option<Vec<T>> {
        let items = self.list(path, v)?;
        let before = self.errors.len();
        let out: Vec<T> = items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| f(self, &format!("{path}[{i}]"), item))
            .collect();
        (self.errors.len() == before).then_some(out)
    }

    pub(super) fn method(&mut self, path: &str, v: &Value) -> Option<Method> {
        let s = self.string(path, v)?;
        match Method::from_bytes(s.trim().to_ascii_uppercase().as_bytes()) {
            Ok(m) => Some(m),
            Err(_) => {
                self.err(path, format!("{s:?} is not an HTTP method"));
                None
            }
        }
    }

    pub(super) fn addr(&mut self, path: &str, v: &Value) -> Option<SocketAddr> {
        let s = self.string(path, v)?;
        match s.trim().parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(
                    path,
                    format!("{s:?} is not an address (e.g. \"127.0.0.1:8081\")"),
                );
                None
            }
        }
    }

    pub(super) fn upstream(&mut self, path: &str, v: &Value) -> Option<Uri> {
        let s = self.string(path, v)?;
        let uri: Uri = match s.trim().parse() {
            Ok(u) => u,
            Err(_) => {
                self.err(
                    path,
                    format!("{s:?} is not a URL (e.g. \"http://127.0.0.1:8080\")"),
                );
                return None;
            }
        };
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
            self.err(
                path,
                format!(
                    "{s:?} must be an http:// or https:// URL with a host (e.g. \"http://127.0.0.1:8080\")"
                ),
            );
            return None;
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            self.err(
                path,
                format!("{s:?} must not have a path or query; requests keep their own"),
            );
            return None;
        }
        Some(uri)
    }

    pub(super) fn redis_url(&mut self, path: &str, v: &Value) -> Option<String> {
        let s = self.string(path, v)?;
        let s = s.trim().to_owned();
        if !(s.starts_with("redis://") || s.starts_with("rediss://"))
            || s.len() <= "rediss://".len()
        {
            self.err(
                path,
                format!("{:?} is not a redis:// or rediss:// URL", redact_url(&s)),
            );
            return None;
        }
        Some(s)
    }
}
