//! Checking a records file: every record intact, sequence numbers contiguous
//! from 0, one seed, and nothing but a torn tail after the last valid record.

use std::path::Path;

use serde::Serialize;

use crate::error::Error;
use crate::record::{self, DecodeError, HEADER_LEN, MAGIC};

/// The result of verifying a records file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// True when no error was found (and the expected minimum, if any, is met).
    pub ok: bool,
    /// Number of valid records (they are seq 0 ..= `last_seq`).
    pub records: u64,
    /// Sequence number of the last valid record.
    pub last_seq: Option<u64>,
    /// The file's seed, from its first record.
    pub seed: Option<u64>,
    /// Bytes covered by the valid records (where the writer appends next).
    pub valid_bytes: u64,
    /// Bytes after the valid records that hold no valid record: a write
    /// that was in flight when the machine stopped, never acknowledged.
    pub torn_tail_bytes: u64,
    /// What is wrong, one sentence per problem.
    pub errors: Vec<String>,
}

impl Report {
    /// Requires at least `n` records (the writer acknowledged seq `n - 1`):
    /// fewer is data loss.
    pub fn expect_min_records(&mut self, n: u64) {
        if self.records < n {
            self.errors.push(format!(
                "only {} records survive but {} were acknowledged (last acknowledged seq {})",
                self.records,
                n,
                n - 1
            ));
            self.ok = false;
        }
    }
}

/// Verifies the records held in `data` (the whole content of a file).
pub fn verify_bytes(data: &[u8]) -> Report {
    let mut report = Report {
        ok: true,
        records: 0,
        last_seq: None,
        seed: None,
        valid_bytes: 0,
        torn_tail_bytes: 0,
        errors: Vec::new(),
    };
    let mut off = 0usize;
    while off < data.len() {
        match record::decode(&data[off..]) {
            Ok(rec) => {
                let expected = report.records;
                if rec.seq != expected {
                    report.errors.push(format!(
                        "record at offset {off} has seq {}, expected {expected}",
                        rec.seq
                    ));
                    break;
                }
                match report.seed {
                    None => report.seed = Some(rec.seed),
                    Some(s) if s != rec.seed => {
                        report.errors.push(format!(
                            "record seq {} at offset {off} has seed {:#x}, the file's is {s:#x}",
                            rec.seq, rec.seed
                        ));
                        break;
                    }
                    Some(_) => {}
                }
                report.records += 1;
                report.last_seq = Some(rec.seq);
                off += rec.len;
                report.valid_bytes = off as u64;
            }
            Err(why) => {
                // Allowed only as a torn tail: no valid record may follow.
                match find_valid_record(data, off + 1) {
                    Some((at, rec)) => report.errors.push(format!(
                        "damaged record at offset {off} (expected seq {}: {why}) \
                         is followed by valid record seq {} at offset {at}",
                        report.records, rec.seq
                    )),
                    None => {
                        if matches!(why, DecodeError::BadPayload) {
                            // A checksummed record with foreign content is
                            // never a torn write.
                            report.errors.push(format!(
                                "record at offset {off} (expected seq {}): {why}",
                                report.records
                            ));
                        } else {
                            report.torn_tail_bytes = (data.len() - off) as u64;
                        }
                    }
                }
                break;
            }
        }
    }
    report.ok = report.errors.is_empty();
    report
}

/// Finds the first valid record starting at or after `from`.
fn find_valid_record(data: &[u8], from: usize) -> Option<(usize, record::Record)> {
    let mut at = from;
    while at + HEADER_LEN <= data.len() {
        let pos = data[at..].windows(MAGIC.len()).position(|w| w == MAGIC)?;
        at += pos;
        if let Ok(rec) = record::decode(&data[at..]) {
            return Some((at, rec));
        }
        at += 1;
    }
    None
}

/// Verifies the records file at `path`.
pub fn verify_file(path: &Path) -> Result<Report, Error> {
    let data = std::fs::read(path).map_err(|e| Error::io("reading", path, e))?;
    Ok(verify_bytes(&data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::encode;

    fn file(seed: u64, n: u64, len: usize) -> Vec<u8> {
        (0..n).flat_map(|s| encode(seed, s, len).unwrap()).collect()
    }

    #[test]
    fn empty_file_is_ok() {
        let r = verify_bytes(&[]);
        assert!(r.ok);
        assert_eq!(r.records, 0);
        assert_eq!(r.last_seq, None);
    }

    #[test]
    fn intact_records() {
        let data = file(5, 100, 64);
        let r = verify_bytes(&data);
        assert!(r.ok, "{:?}", r.errors);
        assert_eq!(r.records, 100);
        assert_eq!(r.last_seq, Some(99));
        assert_eq!(r.seed, Some(5));
        assert_eq!(r.valid_bytes, data.len() as u64);
        assert_eq!(r.torn_tail_bytes, 0);
    }

    #[test]
    fn mixed_record_sizes() {
        let mut data = Vec::new();
        for (s, len) in [(0, 32), (1, 4096), (2, 33), (3, 512)] {
            data.extend(encode(8, s, len).unwrap());
        }
        let r = verify_bytes(&data);
        assert!(r.ok, "{:?}", r.errors);
        assert_eq!(r.records, 4);
    }

    #[test]
    fn torn_final_record_is_allowed() {
        let mut data = file(5, 10, 128);
        let full = data.len();
        data.extend_from_slice(&encode(5, 10, 128).unwrap()[..77]);
        let r = verify_bytes(&data);
        assert!(r.ok, "{:?}", r.errors);
        assert_eq!(r.records, 10);
        assert_eq!(r.valid_bytes, full as u64);
        assert_eq!(r.torn_tail_bytes, 77);
    }

    #[test]
    fn zeroed_tail_is_torn_not_corrupt() {
        // The size was extended but the data blocks never reached the disk.
        let mut data = file(5, 3, 128);
        data.extend(std::iter::repeat_n(0u8, 4096));
        let r = verify_bytes(&data);
        assert!(r.ok, "{:?}", r.errors);
        assert_eq!(r.records, 3);
        assert_eq!(r.torn_tail_bytes, 4096);
    }

    #[test]
    fn corrupt_middle_record_is_an_error() {
        let mut data = file(5, 10, 128);
        data[128 * 4 + 40] ^= 0xff;
        let r = verify_bytes(&data);
        assert!(!r.ok);
        assert_eq!(r.records, 4);
        assert!(r.errors[0].contains("offset 512"), "{:?}", r.errors);
        assert!(r.errors[0].contains("valid record seq 5"), "{:?}", r.errors);
    }

    #[test]
    fn corrupt_last_record_looks_torn_but_fails_expectation() {
        // A bit flip in the last record cannot be told from a torn write by
        // the bytes alone: the acknowledged count tells them apart.
        let mut data = file(5, 10, 128);
        data[128 * 9 + 40] ^= 0xff;
        let mut r = verify_bytes(&data);
        assert!(r.ok);
        assert_eq!(r.records, 9);
        r.expect_min_records(10);
        assert!(!r.ok);
        assert!(r.errors[0].contains("acknowledged"), "{:?}", r.errors);
    }

    #[test]
    fn missing_record_is_an_error() {
        let mut data = file(5, 10, 128);
        data.drain(128 * 3..128 * 4);
        let r = verify_bytes(&data);
        assert!(!r.ok);
        assert_eq!(r.records, 3);
        assert!(
            r.errors[0].contains("has seq 4, expected 3"),
            "{:?}",
            r.errors
        );
    }

    #[test]
    fn duplicated_record_is_an_error() {
        let mut data = file(5, 4, 64);
        let dup = data[64..128].to_vec();
        data.splice(128..128, dup);
        let r = verify_bytes(&data);
        assert!(!r.ok);
        assert!(
            r.errors[0].contains("has seq 1, expected 2"),
            "{:?}",
            r.errors
        );
    }

    #[test]
    fn foreign_seed_is_an_error() {
        let mut data = file(5, 3, 64);
        data.extend(encode(6, 3, 64).unwrap());
        let r = verify_bytes(&data);
        assert!(!r.ok);
        assert!(r.errors[0].contains("seed"), "{:?}", r.errors);
    }

    #[test]
    fn garbage_at_start_is_torn_only_if_nothing_valid_follows() {
        let garbage = vec![0xabu8; 100];
        let r = verify_bytes(&garbage);
        assert!(r.ok);
        assert_eq!(r.torn_tail_bytes, 100);
        let mut data = garbage.clone();
        data.extend(file(5, 2, 64));
        let r = verify_bytes(&data);
        assert!(!r.ok);
    }
}
