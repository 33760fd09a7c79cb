//! A settlement: the JSON that says what an earlier request answered, from
//! an upstream's reconcile endpoint or an operator (`PUT /v1/keys`):
//!
//! ```json
//! {"status": 201, "headers": {"content-type": "application/json"}, "body": "..."}
//! ```
//!
//! `body_b64` (standard base64) may stand instead of `body` for bytes that
//! are not text. Both are optional (an empty body); `headers` too.

use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde_json::Value;

use super::record::StoredResponse;

/// Why a settlement was refused, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct BadSettlement {
    pub field: String,
    pub reason: String,
}

fn bad(field: &str, reason: impl Into<String>) -> BadSettlement {
    BadSettlement {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

/// Reads a settlement document into the response it names.
pub fn parse(body: &[u8]) -> Result<StoredResponse, BadSettlement> {
    let doc: Value = serde_json::from_slice(body).map_err(|e| bad("body", e.to_string()))?;
    let Value::Object(mut doc) = doc else {
        return Err(bad("body", "must be a JSON object"));
    };
    let status = doc
        .remove("status")
        .and_then(|v| v.as_u64())
        .and_then(|n| u16::try_from(n).ok())
        .and_then(|n| StatusCode::from_u16(n).ok())
        .filter(|s| (100..=599).contains(&s.as_u16()))
        .ok_or_else(|| bad("status", "is required: an HTTP status from 100 to 599"))?;
    let mut headers = HeaderMap::new();
    match doc.remove("headers") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (name, value) in map {
                let field = format!("headers.{name}");
                let name = HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| bad(&field, "is not a header name"))?;
                let value = value
                    .as_str()
                    .and_then(|v| HeaderValue::from_str(v).ok())
                    .ok_or_else(|| bad(&field, "must be a string of visible ASCII"))?;
                headers.append(name, value);
            }
        }
        Some(_) => return Err(bad("headers", "must be an object of strings")),
    }
    let body = match (doc.remove("body"), doc.remove("body_b64")) {
        (Some(_), Some(_)) => return Err(bad("body_b64", "give body or body_b64, not both")),
        (Some(Value::String(s)), None) => Bytes::from(s),
        (Some(_), None) => return Err(bad("body", "must be a string")),
        (None, Some(Value::String(s))) => base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .map(Bytes::from)
            .map_err(|e| bad("body_b64", format!("is not base64: {e}")))?,
        (None, Some(_)) => return Err(bad("body_b64", "must be a base64 string")),
        (None, None) => Bytes::new(),
    };
    if let Some(unknown) = doc.keys().next() {
        let shown: String = unknown.chars().take(64).collect();
        return Err(bad(&shown, "is not a field of a settlement"));
    }
    Ok(StoredResponse {
        status,
        headers,
        body,
        body_omitted: false,
        trailers: http::HeaderMap::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_base64_bodies_and_headers() {
        let r = parse(br#"{"status": 201, "headers": {"content-type": "application/json"}, "body": "{\"id\":1}"}"#)
            .unwrap();
        assert_eq!(r.status, 201);
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(&r.body[..], b"{\"id\":1}");
        let r = parse(br#"{"status": 200, "body_b64": "AAEC"}"#).unwrap();
        assert_eq!(&r.body[..], &[0, 1, 2]);
        assert!(parse(br#"{"status": 204}"#).unwrap().body.is_empty());
    }

    #[test]
    fn each_bad_field_is_named() {
        for (doc, field) in [
            (&b"nope"[..], "body"),
            (br#"[1]"#, "body"),
            (br#"{}"#, "status"),
            (br#"{"status": 99}"#, "status"),
            (br#"{"status": "201"}"#, "status"),
            (
                br#"{"status": 201, "headers": {"bad name": "x"}}"#,
                "headers.bad name",
            ),
            (br#"{"status": 201, "headers": {"x": 1}}"#, "headers.x"),
            (br#"{"status": 201, "headers": []}"#, "headers"),
            (br#"{"status": 201, "body": 5}"#, "body"),
            (br#"{"status": 201, "body_b64": "***"}"#, "body_b64"),
            (
                br#"{"status": 201, "body": "", "body_b64": ""}"#,
                "body_b64",
            ),
            (br#"{"status": 201, "colour": "blue"}"#, "colour"),
        ] {
            assert_eq!(
                parse(doc).unwrap_err().field,
                field,
                "{}",
                String::from_utf8_lossy(doc)
            );
        }
    }
}
