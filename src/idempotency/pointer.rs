//! RFC 6901 JSON pointers, and finding the key they name in a request body
//! (`key_from = "json:/id"`).
//!
//! The body is walked, not built into a tree: each level is scanned once
//! with serde_json, keeping only the borrowed text of the member the next
//! token names (`&RawValue`) and skipping the rest. Skipping does not
//! recurse, so a deeply nested body costs time linear in its size and no
//! stack, and each step parses one level only, so no nesting limit applies
//! along the pointer's own path either.

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// A parsed RFC 6901 pointer: `/a/b~1c/0` is `["a", "b/c", "0"]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPointer {
    text: String,
    tokens: Vec<String>,
}

/// Why a body yields no key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PointerError {
    #[error("the body is not JSON")]
    NotJson,
    #[error("the JSON body has nothing at {0}")]
    Missing(String),
    #[error("the value at {0} is not a string or a number")]
    NotScalar(String),
    #[error("the JSON body names the member at {0} more than once")]
    Duplicate(String),
}

impl JsonPointer {
    /// Parses pointer text: empty (the whole document) or `/`-separated
    /// tokens where `~0` is `~` and `~1` is `/` (any other `~` is an error).
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Ok(JsonPointer {
                text: String::new(),
                tokens: Vec::new(),
            });
        }
        let Some(rest) = text.strip_prefix('/') else {
            return Err(format!(
                "{text:?} is not a JSON pointer: it must start with '/' (e.g. \"/id\")"
            ));
        };
        let mut tokens = Vec::new();
        for raw in rest.split('/') {
            let mut token = String::with_capacity(raw.len());
            let mut chars = raw.chars();
            while let Some(c) = chars.next() {
                match c {
                    '~' => match chars.next() {
                        Some('0') => token.push('~'),
                        Some('1') => token.push('/'),
                        _ => {
                            return Err(format!(
                                "{text:?} is not a JSON pointer: '~' must be followed by 0 or 1"
                            ))
                        }
                    },
                    c => token.push(c),
                }
            }
            tokens.push(token);
        }
        Ok(JsonPointer {
            text: text.to_owned(),
            tokens,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The key the pointer names in `body`: a string's contents, or a
    /// number's text as written (`12345`).
    pub fn find(&self, body: &[u8]) -> Result<String, PointerError> {
        let mut de = serde_json::Deserializer::from_slice(body);
        let mut here: &RawValue = <&RawValue as serde::Deserialize>::deserialize(&mut de)
            .map_err(|_| PointerError::NotJson)?;
        de.end().map_err(|_| PointerError::NotJson)?;
        for token in &self.tokens {
            let mut de = serde_json::Deserializer::from_str(here.get());
            let step = Step { token };
            here = match de.deserialize_any(step) {
                Ok(Some(next)) => next,
                Ok(None) => return Err(PointerError::Missing(self.text.clone())),
                Err(e) if e.to_string().starts_with(DUPLICATE) => {
                    return Err(PointerError::Duplicate(self.text.clone()))
                }
                Err(_) => return Err(PointerError::NotJson),
            };
        }
        let text = here.get();
        match text.as_bytes().first() {
            Some(b'"') => serde_json::from_str::<String>(text).map_err(|_| PointerError::NotJson),
            Some(b'-' | b'0'..=b'9') => Ok(text.to_owned()),
            _ => Err(PointerError::NotScalar(self.text.clone())),
        }
    }
}

impl fmt::Display for JsonPointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// The error text a repeated member is reported with (serde errors carry
/// only text).
const DUPLICATE: &str = "idemgate: duplicate member";

/// One pointer step: the member or element `token` names, if any.
struct Step<'t> {
    token: &'t str,
}

impl<'de> DeserializeSeed<'de> for Step<'_> {
    type Value = Option<&'de RawValue>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Step<'_> {
    type Value = Option<&'de RawValue>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(is_it) = map.next_key_seed(KeyIs(self.token))? {
            if is_it {
                if found.is_some() {
                    return Err(serde::de::Error::custom(DUPLICATE));
                }
                found = Some(map.next_value::<&'de RawValue>()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        // RFC 6901: an index is "0" or digits without a leading zero.
        let index = match self.token.as_bytes() {
            [b'0'] => Some(0usize),
            [b'1'..=b'9', rest @ ..] if rest.iter().all(u8::is_ascii_digit) => {
                self.token.parse().ok()
            }
            _ => None,
        };
        let mut found = None;
        let mut i = 0usize;
        loop {
            if Some(i) == index {
                match seq.next_element::<&'de RawValue>()? {
                    Some(v) => found = Some(v),
                    None => break,
                }
            } else if seq.next_element::<IgnoredAny>()?.is_none() {
                break;
            }
            i += 1;
        }
        Ok(found)
    }

    // Scalars have no members.
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

/// Deserializes an object key as "is it the token?", without allocating
/// unless the key has escapes.
struct KeyIs<'t>(&'t str);

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIs<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E>(self, v: &str) -> Result<bool, E> {
        Ok(v == self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find(pointer: &str, body: &str) -> Result<String, PointerError> {
        JsonPointer::parse(pointer).unwrap().find(body.as_bytes())
    }

    #[test]
    fn parses_rfc6901_escapes() {
        let p = JsonPointer::parse("/a~1b/m~0n/0").unwrap();
        assert_eq!(p.tokens, ["a/b", "m~n", "0"]);
        assert!(JsonPointer::parse("id").is_err());
        assert!(JsonPointer::parse("/a~2").is_err());
        assert!(JsonPointer::parse("/a~").is_err());
        assert_eq!(JsonPointer::parse("").unwrap().tokens.len(), 0);
    }

    /// The examples of RFC 6901 §5 that name scalars.
    #[test]
    fn rfc6901_examples() {
        let doc = r#"{"foo": ["bar", "baz"], "": 0, "a/b": 1, "c%d": 2, "e^f": 3,
            "g|h": 4, "i\\j": 5, "k\"l": 6, " ": 7, "m~n": 8}"#;
        for (p, want) in [
            ("/foo/0", "bar"),
            ("/foo/1", "baz"),
            ("/", "0"),
            ("/a~1b", "1"),
            ("/c%d", "2"),
            ("/e^f", "3"),
            ("/g|h", "4"),
            ("/i\\j", "5"),
            ("/k\"l", "6"),
            ("/ ", "7"),
            ("/m~0n", "8"),
        ] {
            assert_eq!(find(p, doc).as_deref(), Ok(want), "{p}");
        }
        assert_eq!(
            find("/foo", doc),
            Err(PointerError::NotScalar("/foo".into()))
        );
        assert_eq!(find("", doc), Err(PointerError::NotScalar("".into())));
    }

    #[test]
    fn nested_members_and_escaped_keys() {
        let doc = r#"{"data": {"object": {"id": "evt_1"}}, "x": [1, {"y": "z"}]}"#;
        assert_eq!(find("/data/object/id", doc).unwrap(), "evt_1");
        assert_eq!(find("/x/1/y", doc).unwrap(), "z");
        assert_eq!(find("/x/0", doc).unwrap(), "1");
        // A key written with escapes still matches.
        assert_eq!(find("/id", r#"{"\u0069d": "a\"b"}"#).unwrap(), "a\"b");
    }

    #[test]
    fn names_nothing() {
        let doc = r#"{"a": {"b": 1}, "arr": [1, 2]}"#;
        for p in [
            "/missing", "/a/c", "/a/b/c", "/arr/2", "/arr/01", "/arr/-", "/arr/x",
        ] {
            assert_eq!(find(p, doc), Err(PointerError::Missing(p.into())), "{p}");
        }
        assert_eq!(find("/a", doc), Err(PointerError::NotScalar("/a".into())));
        assert_eq!(
            find("/n", r#"{"n": null}"#),
            Err(PointerError::NotScalar("/n".into()))
        );
        assert_eq!(
            find("/t", r#"{"t": true}"#),
            Err(PointerError::NotScalar("/t".into()))
        );
    }

    #[test]
    fn not_json() {
        for body in [
            "",
            "{",
            "id=1",
            r#"{"id": "a"} trailing"#,
            "{\"id\": \"\u{0}\"}",
            "[1,]",
        ] {
            assert_eq!(find("/id", body), Err(PointerError::NotJson), "{body:?}");
        }
        assert_eq!(
            JsonPointer::parse("/id")
                .unwrap()
                .find(b"{\"id\": \"\xff\"}"),
            Err(PointerError::NotJson)
        );
    }

    #[test]
    fn a_repeated_member_is_refused() {
        let doc = r#"{"id": "a", "id": "b"}"#;
        assert_eq!(find("/id", doc), Err(PointerError::Duplicate("/id".into())));
        // Repeats off the pointer's path do not matter.
        assert_eq!(find("/id", r#"{"id": "a", "x": 1, "x": 2}"#).unwrap(), "a");
    }

    #[test]
    fn deep_bodies_cost_no_stack() {
        let depth = 200_000;
        let body = format!(
            r#"{{"id": "k", "deep": {}{}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        assert_eq!(find("/id", &body).unwrap(), "k");
        // Each step scans one level, so even a path deeper than
        // serde_json's nesting limit of 128 is followed.
        let path = "/a".repeat(200);
        let body = format!("{}1{}", r#"{"a":"#.repeat(200), "}".repeat(200));
        assert_eq!(find(&path, &body).unwrap(), "1");
    }
}
