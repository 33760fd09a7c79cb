//! Reading the dedup API's input: JSON bodies field by field (so every
//! refusal names its field), path segments and scope names.

use base64::Engine;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::answer::{item_error, ApiError};
use crate::idempotency::key::hex;
use crate::idempotency::lease::LeaseId;

/// Longest scope name.
pub(super) const MAX_SCOPE: usize = 128;

/// A request body's fields, taken one by one; whatever is left is unknown.
pub(super) struct Fields {
    map: Map<String, Value>,
}

impl Fields {
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(map)) => Ok(Fields { map }),
            Ok(_) => Err(ApiError::Json("the body must be a JSON object".into())),
            Err(e) => Err(ApiError::Json(e.to_string())),
        }
    }

    pub fn from_value(v: Value) -> Result<Self, ApiError> {
        match v {
            Value::Object(map) => Ok(Fields { map }),
            _ => Err(ApiError::Field(
                "items".into(),
                "each item must be a JSON object".into(),
            )),
        }
    }

    pub fn take(&mut self, name: &str) -> Option<Value> {
        self.map.remove(name).filter(|v| !v.is_null())
    }

    pub fn string(&mut self, name: &'static str, max: usize) -> Result<Option<String>, ApiError> {
        let bad = |msg: String| Err(ApiError::Field(name.into(), msg));
        match self.take(name) {
            None => Ok(None),
            Some(Value::String(s)) if s.is_empty() => bad("must not be empty".into()),
            Some(Value::String(s)) if s.len() > max => bad(format!(
                "is {} bytes long; at most {max} are allowed",
                s.len()
            )),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => bad(format!("must be a string, not {}", kind(&other))),
        }
    }

    pub fn required(&mut self, name: &'static str, max: usize) -> Result<String, ApiError> {
        self.string(name, max)?
            .ok_or_else(|| ApiError::Field(name.into(), "is required".into()))
    }

    pub fn uint(
        &mut self,
        name: &'static str,
        min: u64,
        max: u64,
    ) -> Result<Option<u64>, ApiError> {
        let bad = |msg: String| Err(ApiError::Field(name.into(), msg));
        match self.take(name) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(v) if (min..=max).contains(&v) => Ok(Some(v)),
                _ => bad(format!("{n} is out of range ({min} to {max})")),
            },
            Some(other) => bad(format!("must be a whole number, not {}", kind(&other))),
        }
    }

    /// The key: `key`, or the SHA-256 (lowercase hex) of `content_b64`.
    pub fn key(&mut self, max: usize) -> Result<String, ApiError> {
        let key = self.string("key", max)?;
        let content = match self.take("content_b64") {
            None => None,
            Some(Value::String(s)) => Some(s),
            Some(other) => {
                return Err(ApiError::Field(
                    "content_b64".into(),
                    format!("must be a base64 string, not {}", kind(&other)),
                ))
            }
        };
        match (key, content) {
            (Some(k), None) => Ok(k),
            (None, Some(c)) => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(c.trim())
                    .map_err(|e| {
                        ApiError::Field("content_b64".into(), format!("is not valid base64: {e}"))
                    })?;
                Ok(hex(&Sha256::digest(&bytes)))
            }
            (Some(_), Some(_)) => Err(ApiError::Field(
                "content_b64".into(),
                "give key or content_b64, not both".into(),
            )),
            (None, None) => Err(ApiError::Field(
                "key".into(),
                "is required (or content_b64)".into(),
            )),
        }
    }

    /// `lease_id`: required; `None` for text that is not a lease id, which
    /// names no current lease (the caller answers [`ApiError::LeaseLost`]
    /// once every other field checked out).
    pub fn lease_id(&mut self) -> Result<Option<LeaseId>, ApiError> {
        Ok(self.required("lease_id", 64)?.parse().ok())
    }

    /// Refuses any field not taken.
    pub fn done(&self) -> Result<(), ApiError> {
        match self.map.keys().next() {
            Some(unknown) => {
                // The name is the client's; keep only a printable prefix.
                let shown: String = unknown.chars().take(64).collect();
                Err(ApiError::Field(shown, "is not a field of this call".into()))
            }
            None => Ok(()),
        }
    }
}

pub(super) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Percent-decodes one path segment.
pub(super) fn decode_segment(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let h = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

pub(super) fn valid_scope(scope: &str) -> bool {
    !scope.is_empty()
        && scope.len() <= MAX_SCOPE
        && scope
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'))
}

/// Parses batch items; a bad item's error goes straight into `results`.
/// Returns the good items and their positions.
pub(super) fn parse_batch<T>(
    items: Vec<Value>,
    results: &mut [Option<Value>],
    parse: impl Fn(&mut Fields) -> Result<T, ApiError>,
) -> (Vec<usize>, Vec<T>) {
    let mut at = Vec::new();
    let mut good = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let parsed = Fields::from_value(item).and_then(|mut f| {
            let v = parse(&mut f)?;
            f.done()?;
            Ok(v)
        });
        match parsed {
            Ok(v) => {
                at.push(i);
                good.push(v);
            }
            Err(e) => results[i] = Some(item_error(e)),
        }
    }
    (at, good)
}
