//! Stored-record decoding: any bytes (a damaged or foreign record in Redis)
//! decode or fail cleanly; what decodes re-encodes to a record that decodes
//! to the same thing.
#![no_main]

use bytes::Bytes;
use idemgate::idempotency::record::CompletedRecord;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(rec) = CompletedRecord::decode(Bytes::copy_from_slice(data)) {
        let again = CompletedRecord::decode(rec.encode()).expect("re-encoded record must decode");
        assert_eq!(again, rec);
    }
});
