//! Ferry's benchmark harness: each suite measures Ferry and its named peers
//! in one run, prints a table with ratios and writes
//! `target/bench-results/<suite>.json`.

pub mod faults;
pub mod fio;
pub mod report;
pub mod suites;
