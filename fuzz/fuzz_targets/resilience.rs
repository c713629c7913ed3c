#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| opsgate_fuzz::check_resilience(data));
