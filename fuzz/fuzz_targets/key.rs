//! Idempotency-Key parsing: any header bytes give a key or a KeyError, never
//! a panic; an accepted key is printable ASCII within the length limit.
#![no_main]

use idemgate::idempotency::key::{parse_key, RecordKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(key) = parse_key(data, 255) {
        assert!(!key.is_empty() && key.len() <= 255);
        assert!(key.bytes().all(|b| (0x20..=0x7e).contains(&b)));
        let rk = RecordKey::derive(&Default::default(), &[], &http::Method::POST, "/", &key);
        assert_eq!(rk.to_hex().len(), 64);
    }
});
