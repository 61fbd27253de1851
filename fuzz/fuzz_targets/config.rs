//! The configuration loader on arbitrary text: a result, never a panic, in bounded time.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = lockstep::config::Config::parse(text, std::path::Path::new("fuzz.yaml"));
    }
});
