//! libFuzzer entry for lb-fuzz's `http1_head` target.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lb_fuzz::http1_head(data));
