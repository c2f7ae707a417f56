//! `switchyard::fuzzing::config_parse`: see that function for what must hold.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| switchyard::fuzzing::config_parse(data));
