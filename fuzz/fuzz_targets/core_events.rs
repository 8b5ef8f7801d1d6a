//! libFuzzer entry for lb-fuzz's `core_events` target.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lb_fuzz::core_events(data));
