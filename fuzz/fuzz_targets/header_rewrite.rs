//! `switchyard::fuzzing::header_rewrite`: see that function for what must hold.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| switchyard::fuzzing::header_rewrite(data));
