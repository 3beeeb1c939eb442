//! The stage log: every metadata change staged since the last commit, in a
//! file, written before the write that made it is acknowledged.
//!
//! Mapping changes (a new chunk, a copy-on-write, a trim, a fetched chunk
//! of a lazy volume) are committed to redb only at the next flush. Without
//! this log a `kill -9` of the process between a write's acknowledgement
//! and the next flush would forget the new chunk while its data sits in the
//! page cache, and an NBD client that reconnects and sends its flush again
//! (QEMU does) would be told that a lost write is durable. With it:
//!
//! - Each staged change is appended here with one `pwrite` (no fsync) after
//!   its data was written: both are in the page cache (or, for a direct
//!   write, the data is already on the device), so both survive the death
//!   of the process.
//! - A commit takes the staged changes and starts a new log file; the
//!   commit transaction records the sequence number of the log it covers
//!   (`log_committed` in the counters table); afterwards logs up to that
//!   number are deleted.
//! - On open, logs newer than `log_committed` are replayed **only if they
//!   were written since the machine last booted** (the kernel's boot id is
//!   in each log's header): the page cache then held their data, so it is
//!   in the data file. After a machine crash neither the log nor the data
//!   of unflushed writes can be trusted, and the logs are dropped: exactly
//!   the writes after the last flush are lost, as the NBD protocol allows.
//!
//! # Format
//!
//! A file `stage.<seq>.log` (seq: 20 decimal digits): a 56-byte header —
//! magic `FERRYSTG`, format version (u32 LE), the boot id (36 bytes of
//! `/proc/sys/kernel/random/boot_id`), 4 reserved bytes, CRC-32C of the
//! preceding 52 bytes — then 48-byte records: lineage, chunk, epoch, value,
//! freed chunk (u64 LE each), flags (u32 LE: bit 0 value present, bit 1
//! freed present), CRC-32C of the preceding 44 bytes. Replay stops at the
//! first record that is short or fails its check (a write torn by the kill).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Ctx, Error, ErrorKind, Result};

const MAGIC: &[u8; 8] = b"FERRYSTG";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 56;
const RECORD_LEN: usize = 48;
const HAS_VALUE: u32 = 1;
const HAS_FREED: u32 = 2;

/// The boot id of the running kernel; all zeroes when it cannot be read
/// (then no log is ever replayed: the old, flush-only guarantee).
pub(crate) type BootId = [u8; 36];

pub(crate) fn boot_id() -> BootId {
    let mut id = [0u8; 36];
    if let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
        let b = s.trim().as_bytes();
        if b.len() == id.len() {
            id.copy_from_slice(b);
        }
    }
    id
}

fn known(id: &BootId) -> bool {
    id.iter().any(|b| *b != 0)
}

/// Path of log `seq` in pool directory `dir`.
pub(crate) fn path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("stage.{seq:020}.log"))
}

/// The sequence number in a log file's name, if it is one.
fn seq_of(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("stage.")?.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// One staged change: map key, new value (None = entry deleted), and the
/// chunk it frees once durable.
pub(crate) type Change = ((u64, u64, u64), Option<u64>, Option<u64>);

/// Staged changes merged as a commit takes them: the last value per key,
/// and every chunk freed.
pub(crate) type Merged = (BTreeMap<(u64, u64, u64), Option<u64>>, Vec<u64>);

/// The log being appended to.
pub(crate) struct StageLog {
    seq: u64,
    file: File,
    off: u64,
    /// Set when an append failed part-way: the file's tail is unusable
    /// until the next commit starts a new log, so appends fail until then.
    broken: Option<String>,
}

impl StageLog {
    /// Create log `seq` (replacing a leftover file of that name).
    pub(crate) fn create(dir: &Path, seq: u64, boot: &BootId) -> Result<StageLog> {
        let p = path(dir, seq);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .ctx(|| format!("create stage log {}", p.display()))?;
        let mut h = [0u8; HEADER_LEN];
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..48].copy_from_slice(boot);
        let crc = crc32c::crc32c(&h[..52]);
        h[52..].copy_from_slice(&crc.to_le_bytes());
        file.write_all_at(&h, 0)
            .ctx(|| format!("write stage log {}", p.display()))?;
        Ok(StageLog {
            seq,
            file,
            off: HEADER_LEN as u64,
            broken: None,
        })
    }

    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    /// Append one change. On failure the change must not be acknowledged.
    pub(crate) fn append(&mut self, dir: &Path, change: Change) -> Result<()> {
        self.append_all(dir, &[change])
    }

    /// Append changes with one write (in their order). On failure none of
    /// them may be acknowledged.
    pub(crate) fn append_all(&mut self, dir: &Path, changes: &[Change]) -> Result<()> {
        if let Some(why) = &self.broken {
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "stage log of pool {} failed earlier ({why}); writes that need new chunks fail until the next flush",
                    dir.display()
                ),
            ));
        }
        let mut rec = Vec::with_capacity(changes.len() * RECORD_LEN);
        for c in changes {
            rec.extend_from_slice(&encode(*c));
        }
        match self.file.write_all_at(&rec, self.off) {
            Ok(()) => {
                self.off += rec.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Cut a partial record so later appends stay readable; if
                // even that fails, refuse appends until the next log.
                if self.file.set_len(self.off).is_err() {
                    self.broken = Some(e.to_string());
                }
                Err(e).ctx(|| format!("append to stage log {}", path(dir, self.seq).display()))
            }
        }
    }
}

fn encode(((lineage, chunk, epoch), value, freed): Change) -> [u8; RECORD_LEN] {
    let mut r = [0u8; RECORD_LEN];
    let flags =
        if value.is_some() { HAS_VALUE } else { 0 } | if freed.is_some() { HAS_FREED } else { 0 };
    for (i, v) in [
        lineage,
        chunk,
        epoch,
        value.unwrap_or(0),
        freed.unwrap_or(0),
    ]
    .into_iter()
    .enumerate()
    {
        r[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    r[40..44].copy_from_slice(&flags.to_le_bytes());
    let crc = crc32c::crc32c(&r[..44]);
    r[44..].copy_from_slice(&crc.to_le_bytes());
    r
}

fn decode(r: &[u8]) -> Option<Change> {
    if r.len() < RECORD_LEN {
        return None;
    }
    let crc = u32::from_le_bytes(r[44..48].try_into().ok()?);
    if crc32c::crc32c(&r[..44]) != crc {
        return None;
    }
    let u = |i: usize| u64::from_le_bytes(r[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    let flags = u32::from_le_bytes(r[40..44].try_into().ok()?);
    if flags & !(HAS_VALUE | HAS_FREED) != 0 {
        return None;
    }
    let value = (flags & HAS_VALUE != 0).then(|| u(3));
    let freed = (flags & HAS_FREED != 0).then(|| u(4));
    Some(((u(0), u(1), u(2)), value, freed))
}

/// What the log files of a pool directory hold.
#[derive(Debug, Default)]
pub(crate) struct Found {
    /// Changes to replay, in order (later ones win), from logs of this boot.
    pub changes: Vec<Change>,
    /// Every log file found, with its sequence number.
    pub files: Vec<(u64, PathBuf)>,
    /// Logs newer than the last commit that were dropped, and why.
    pub dropped: Vec<String>,
}

impl Found {
    /// The highest sequence number among the files (0 when none).
    pub(crate) fn max_seq(&self) -> u64 {
        self.files.iter().map(|(s, _)| *s).max().unwrap_or(0)
    }

    /// The changes merged as a commit would take them: last value per key,
    /// every freed chunk.
    pub(crate) fn merged(&self) -> Merged {
        let mut ops = BTreeMap::new();
        let mut frees = Vec::new();
        for &(k, v, f) in &self.changes {
            ops.insert(k, v);
            frees.extend(f);
        }
        (ops, frees)
    }
}

/// Read the logs in `dir` newer than `committed` that this boot wrote.
pub(crate) fn scan(dir: &Path, committed: u64, boot: &BootId) -> Result<Found> {
    let mut found = Found::default();
    let rd = std::fs::read_dir(dir).ctx(|| format!("list pool directory {}", dir.display()))?;
    for ent in rd {
        let ent = ent.ctx(|| format!("list pool directory {}", dir.display()))?;
        if let Some(seq) = ent.file_name().to_str().and_then(seq_of) {
            found.files.push((seq, ent.path()));
        }
    }
    found.files.sort();
    for (seq, p) in &found.files {
        if *seq <= committed {
            continue;
        }
        let bytes = std::fs::read(p).ctx(|| format!("read stage log {}", p.display()))?;
        let head_ok = bytes.len() >= HEADER_LEN
            && &bytes[..8] == MAGIC
            && crc32c::crc32c(&bytes[..52])
                == u32::from_le_bytes(bytes[52..56].try_into().expect("4 bytes"))
            && u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) == VERSION;
        if !head_ok {
            found
                .dropped
                .push(format!("{}: no valid header", p.display()));
            continue;
        }
        if !known(boot) || bytes[12..48] != boot[..] {
            found.dropped.push(format!(
                "{}: written before the machine last booted",
                p.display()
            ));
            continue;
        }
        let mut at = HEADER_LEN;
        while let Some(c) = decode(&bytes[at..]) {
            found.changes.push(c);
            at += RECORD_LEN;
        }
    }
    Ok(found)
}

/// Stamp every stage log in `dir` with a boot id that is not this boot's,
/// as if the machine had crashed and rebooted since they were written (the
/// crash harness's machine-crash trials).
pub(crate) fn restamp_for_test(dir: &Path) -> Result<()> {
    let mut other = boot_id();
    other[0] = if other[0] == b'x' { b'y' } else { b'x' };
    for (_, p) in scan(dir, u64::MAX, &other)?.files {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .ctx(|| format!("open stage log {}", p.display()))?;
        let mut h = [0u8; HEADER_LEN];
        if f.read_exact_at(&mut h, 0).is_err() {
            continue;
        }
        h[12..48].copy_from_slice(&other);
        let crc = crc32c::crc32c(&h[..52]);
        h[52..].copy_from_slice(&crc.to_le_bytes());
        f.write_all_at(&h, 0)
            .ctx(|| format!("write stage log {}", p.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_roundtrip_and_torn_ones_end_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let boot = boot_id();
        let mut log = StageLog::create(dir.path(), 7, &boot).unwrap();
        let a: Change = ((1, 2, 3), Some(9), None);
        let b: Change = ((1, 2, 4), None, Some(9));
        let c: Change = ((5, 6, 7), Some(u64::MAX), Some(11));
        for ch in [a, b, c] {
            log.append(dir.path(), ch).unwrap();
        }
        // A torn fourth record.
        let p = path(dir.path(), 7);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes.extend_from_slice(&encode(a)[..30]);
        std::fs::write(&p, &bytes).unwrap();
        let f = scan(dir.path(), 0, &boot).unwrap();
        if known(&boot) {
            assert_eq!(f.changes, vec![a, b, c]);
        } else {
            assert!(f.changes.is_empty());
        }
        assert_eq!(f.max_seq(), 7);
        // Committed logs are not read.
        assert!(scan(dir.path(), 7, &boot).unwrap().changes.is_empty());
        // A damaged record ends the replay there.
        bytes[HEADER_LEN + RECORD_LEN + 3] ^= 1;
        std::fs::write(&p, &bytes).unwrap();
        let f = scan(dir.path(), 0, &boot).unwrap();
        if known(&boot) {
            assert_eq!(f.changes, vec![a]);
        }
    }

    #[test]
    fn logs_of_another_boot_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut other = boot_id();
        other[0] ^= 0x55;
        let mut log = StageLog::create(dir.path(), 1, &other).unwrap();
        log.append(dir.path(), ((1, 0, 0), Some(0), None)).unwrap();
        let f = scan(dir.path(), 0, &boot_id()).unwrap();
        assert!(f.changes.is_empty());
        assert_eq!(f.dropped.len(), 1);
        assert!(f.dropped[0].contains("before the machine last booted"));
    }

    #[test]
    fn only_well_formed_names_are_logs() {
        assert_eq!(seq_of("stage.00000000000000000042.log"), Some(42));
        assert_eq!(seq_of("stage.42.log"), None);
        assert_eq!(seq_of("stage.0000000000000000004x.log"), None);
        assert_eq!(seq_of("data"), None);
    }
}
