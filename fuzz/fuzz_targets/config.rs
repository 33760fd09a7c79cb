//! Config parsing and validation: any file text gives a Config or a list of
//! one-line problems, never a panic.
#![no_main]

use idemgate::config::{Config, FileConfig, RunArgs};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match FileConfig::parse(text) {
        Ok(file) => {
            if let Err(e) = Config::from_parts(file, &RunArgs::default()) {
                assert!(!e.0.is_empty());
            }
        }
        Err(e) => assert!(e.0.iter().all(|line| !line.contains('\n'))),
    }
});
