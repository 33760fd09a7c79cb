//! Loose values → checked ones. The [`Checker`] collects every problem, one
//! line each naming its key path, instead of stopping at the first. The
//! configuration uses it for its sections, and each store backend for its
//! own keys of `[store]`.

use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use toml::Value;

/// Collects problems while converting loose values.
#[derive(Default)]
pub struct Checker {
    pub errors: Vec<String>,
    /// Legal but risky choices, shown by check-config and logged at start.
    pub warnings: Vec<String>,
}

/// A value as a problem quotes it.
pub fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

impl Checker {
    pub fn err(&mut self, path: &str, msg: String) {
        self.errors.push(format!("{path}: {msg}"));
    }

    pub fn warn(&mut self, path: &str, msg: String) {
        self.warnings.push(format!("{path}: {msg}"));
    }

    /// Overwrites `slot` with the checked value of the key at `path`, if the
    /// file sets it and it checks out; a problem is recorded otherwise.
    pub fn set<T>(
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
    pub fn set_flagged<T>(
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
    pub fn int<T: TryFrom<i64>>(
        min: i64,
        max: i64,
    ) -> impl FnOnce(&mut Self, &str, &Value) -> Option<T> {
        move |c, path, v| c.uint(path, v, min, max).and_then(|n| T::try_from(n).ok())
    }

    /// One of `choices` (text → value).
    pub fn one_of<T: Copy>(
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

    pub fn string(&mut self, path: &str, v: &Value) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            other => {
                self.err(path, format!("{} is not a string", show(other)));
                None
            }
        }
    }

    pub fn bool(&mut self, path: &str, v: &Value) -> Option<bool> {
        match v {
            Value::Boolean(b) => Some(*b),
            other => {
                self.err(path, format!("{} is not true or false", show(other)));
                None
            }
        }
    }

    pub fn uint(&mut self, path: &str, v: &Value, min: i64, max: i64) -> Option<i64> {
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

    pub fn duration(&mut self, path: &str, v: &Value) -> Option<Duration> {
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

    /// A duration that may be zero (`"0s"`).
    pub fn duration_or_zero(&mut self, path: &str, v: &Value) -> Option<Duration> {
        match v {
            Value::String(s) if humantime::parse_duration(s.trim()).is_ok_and(|d| d.is_zero()) => {
                Some(Duration::ZERO)
            }
            _ => self.duration(path, v),
        }
    }

    /// A table of header names to values (`{ "Stripe-Should-Retry" =
    /// "false" }`).
    pub fn header_table(
        &mut self,
        path: &str,
        v: &Value,
    ) -> Option<Vec<(HeaderName, HeaderValue)>> {
        let Value::Table(t) = v else {
            self.err(
                path,
                format!("{} is not a table of header names to values", show(v)),
            );
            return None;
        };
        let before = self.errors.len();
        let mut out = Vec::with_capacity(t.len());
        for (name, value) in t {
            let at = format!("{path}.{name}");
            let name = self.header_name(&at, &Value::String(name.clone()));
            let value = self
                .string(&at, value)
                .and_then(|s| match HeaderValue::from_str(&s) {
                    Ok(v) => Some(v),
                    Err(_) => {
                        self.err(&at, format!("{s:?} is not a valid header value"));
                        None
                    }
                });
            if let (Some(n), Some(v)) = (name, value) {
                out.push((n, v));
            }
        }
        (self.errors.len() == before).then_some(out)
    }

    pub fn size(&mut self, path: &str, v: &Value) -> Option<u64> {
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

    pub fn list(&mut self, path: &str, v: &Value) -> Option<Vec<Value>> {
        match v {
            Value::Array(a) => Some(a.clone()),
            other => {
                self.err(path, format!("{} is not a list", show(other)));
                None
            }
        }
    }

    pub fn header_name(&mut self, path: &str, v: &Value) -> Option<HeaderName> {
        let s = self.string(path, v)?;
        match HeaderName::from_bytes(s.trim().as_bytes()) {
            Ok(h) => Some(h),
            Err(_) => {
                self.err(path, format!("{s:?} is not a valid header name"));
                None
            }
        }
    }

    pub fn each<T>(
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

    pub fn method(&mut self, path: &str, v: &Value) -> Option<Method> {
        let s = self.string(path, v)?;
        match Method::from_bytes(s.trim().to_ascii_uppercase().as_bytes()) {
            Ok(m) => Some(m),
            Err(_) => {
                self.err(path, format!("{s:?} is not an HTTP method"));
                None
            }
        }
    }

    pub fn addr(&mut self, path: &str, v: &Value) -> Option<SocketAddr> {
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
}

/// Parses `"1MiB"`, `"512KiB"`, `"2MB"`, `"100B"` or `"4096"`.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1MiB"), Some(1 << 20));
        assert_eq!(parse_size("512KiB"), Some(512 << 10));
        assert_eq!(parse_size("2MB"), Some(2_000_000));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("1 MiB"), Some(1 << 20));
        assert_eq!(parse_size("MiB"), None);
        assert_eq!(parse_size("1XB"), None);
        assert_eq!(parse_size("99999999999999999999GiB"), None);
    }
}
