//! The trail file parser on arbitrary bytes (plain or gzip), and every accessor of what it
//! yields: a result, never a panic, never more than the inflate limit.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(parsed) = lockstep::trail::parse_bytes_within(data, 1 << 20) {
        for record in &parsed.records {
            let _ = (record.event_time(), record.action(), record.user_name(), record.user_arn());
            let _ = record.denial("lockstep-network-perimeter");
        }
    }
});
