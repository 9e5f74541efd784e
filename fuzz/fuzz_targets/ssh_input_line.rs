#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rampart::fuzzing::run("ssh_input_line", data));
