//! Fuzzes the handshake, option and request parsers through a whole server
//! connection. Run from `crates/ferry-nbd`:
//!
//! ```text
//! cargo +nightly fuzz run nbd_server -- -max_total_time=600
//! ```
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry_nbd::fuzzing::run_one(data);
});
