#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rampart::fuzzing::run("onramp_gue", data));
