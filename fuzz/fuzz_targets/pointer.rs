//! JSON pointer extraction (`key_from = "json:/..."`), checked against
//! serde_json's own `Value::pointer` as an oracle: any pointer text and
//! body give a key or an error, never a panic, and a key found is the
//! string the whole-tree parse finds at the same place.
#![no_main]

use idemgate::idempotency::pointer::{JsonPointer, PointerError};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 32).min(rest.len());
    let (ptr, body) = rest.split_at(n);
    let Ok(ptr) = std::str::from_utf8(ptr) else {
        return;
    };
    let Ok(pointer) = JsonPointer::parse(ptr) else {
        return;
    };
    let found = pointer.find(body);
    // The tree parse stops at nesting 128; the walk has no such limit.
    let tree = serde_json::from_slice::<Value>(body);
    match (&found, &tree) {
        (Ok(key), Ok(v)) => match v.pointer(ptr) {
            Some(Value::String(s)) => assert_eq!(s, key),
            Some(Value::Number(_)) => assert!(key.parse::<f64>().is_ok(), "{key:?}"),
            other => panic!("found {key:?} where the tree has {other:?}"),
        },
        (Err(PointerError::NotJson), Ok(_)) => panic!("the walk refused JSON the tree parse took"),
        (Err(PointerError::Missing(_)), Ok(v)) => assert!(v.pointer(ptr).is_none()),
        (Err(PointerError::NotScalar(_)), Ok(v)) => assert!(matches!(
            v.pointer(ptr),
            Some(Value::Null | Value::Bool(_) | Value::Array(_) | Value::Object(_))
        )),
        _ => {}
    }
});
