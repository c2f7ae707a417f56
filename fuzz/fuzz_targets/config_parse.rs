//! Any bytes as a config file: parsing and validation must return Ok or errors
//! with positions, never panic or run away (alias bombs, deep nesting).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(errors) = switchyard::config::parse(text, "fuzz.yaml") {
            assert!(!errors.0.is_empty());
            for error in &errors.0 {
                assert!(error.line >= 1 && error.column >= 1);
            }
        }
    }
});
