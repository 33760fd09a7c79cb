//! Sealed-record opening: any bytes (a damaged, foreign or forged record in
//! a shared store) open or fail cleanly, never panic; what a keyring seals
//! opens back to the same bytes only in its own place.
#![no_main]

use idemgate::idempotency::seal::Keyring;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let ring = Keyring::new(&[("k1".into(), vec![7; 32]), ("k0".into(), vec![3; 32])])
        .expect("valid keys");
    let _ = ring.open(b"place", data);
    let sealed = ring.seal(b"place", data);
    assert_eq!(ring.open(b"place", &sealed).expect("own seal opens"), data);
    assert!(ring.open(b"elsewhere", &sealed).is_err());
});
