//! Fuzzes the decoders of the pool's on-disk records: the header, volume
//! and snapshot records, read profiles and the catalog check. The first
//! input byte picks the decoder (see `ferry_pool::decode::any`). Run from
//! `crates/ferry-pool`:
//!
//! ```text
//! cargo +nightly fuzz run metadata_decode -- -max_total_time=600
//! ```
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry_pool::decode::any(data);
});
