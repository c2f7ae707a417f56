//! `switchyard::fuzzing::client_request`: see that function for what must hold.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| switchyard::fuzzing::client_request(data));
