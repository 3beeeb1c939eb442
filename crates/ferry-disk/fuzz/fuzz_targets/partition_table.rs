//! Fuzzes partition table parsing. The input's first 32 KiB become the
//! start of a 1 MiB disk (MBR, primary GPT, EBRs) and the rest, up to 33
//! sectors, its end (where the backup GPT is), so both copies of a GPT are
//! reachable. Parsing must give a consistent
//! layout or an error, never a panic. Run from `crates/ferry-disk`:
//!
//! ```text
//! cargo +nightly fuzz run partition_table -- -max_total_time=600
//! ```
#![no_main]

const DISK: usize = 1 << 20;
const HEAD: usize = 32 << 10;
const TAIL: usize = 33 * 512;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut disk = vec![0u8; DISK];
    let head = data.len().min(HEAD);
    disk[..head].copy_from_slice(&data[..head]);
    if data.len() > head {
        let tail = &data[head..];
        let n = tail.len().min(TAIL);
        disk[DISK - n..].copy_from_slice(&tail[..n]);
    }
    if let Ok(Some(l)) = ferry_disk::read_layout(&disk[..], DISK as u64) {
        let mut edges: Vec<_> = l.partitions.iter().map(|p| p.range()).collect();
        edges.extend(l.outside.iter().cloned());
        edges.sort_by_key(|r| r.start);
        let mut at = 0;
        for r in edges {
            assert_eq!(r.start, at);
            assert!(r.end > r.start);
            at = r.end;
        }
        assert_eq!(at, DISK as u64);
    }
});
