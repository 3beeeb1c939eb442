//! Partition tables of a disk image, read to split a disk into the pieces a
//! copy reports progress for: one per partition, plus the space outside
//! them (the tables themselves, gaps, the tail of the disk).
//!
//! What is recognised:
//! - **GPT**: the primary header (LBA 1) and its entry array, both checked
//!   against their CRC-32; when either is damaged the backup header (last
//!   LBA) and its own entry array are used instead. A protective MBR (a
//!   partition of type `0xEE`) announces a GPT; a GPT header without any
//!   MBR is accepted too. 512-byte sectors are tried first, then 4096.
//! - **MBR**: four primary entries; an extended partition (types `0x05`,
//!   `0x0F`, `0x85`) is followed through its chain of extended boot records
//!   to its logical partitions.
//!
//! A disk without a table gives `Ok(None)`. A table that is present but
//! inconsistent (bad CRCs on both GPT copies, a looping EBR chain, a
//! partition beyond the end of the disk, overlapping partitions) gives a
//! clear [`Error`]; the caller then treats the disk as a single piece. The
//! parser reads at most a few MiB whatever the input claims, never panics,
//! and is fuzzed (`crates/ferry-disk/fuzz`).

mod crc32;
mod error;
mod gpt;
mod mbr;

use std::ops::Range;

pub use crc32::crc32;
pub use error::Error;

/// Which kind of table a disk carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scheme {
    /// A GUID partition table; `backup` when the primary copy was damaged
    /// and the backup at the end of the disk was used.
    Gpt { backup: bool },
    /// A DOS/MBR table, with logical partitions if it has an extended one.
    Mbr,
}

/// One partition, in bytes from the start of the disk.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Partition {
    /// The number the OS gives it: GPT entry index + 1; MBR 1-4 for
    /// primaries, 5.. for logical partitions.
    pub number: u32,
    pub start: u64,
    pub len: u64,
    /// GPT type GUID (canonical text) or MBR type byte (`0x83`).
    pub kind: String,
    /// GPT partition name, if any.
    pub name: Option<String>,
}

impl Partition {
    pub fn range(&self) -> Range<u64> {
        self.start..self.start + self.len
    }
}

/// A disk's partitions and the ranges outside them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Layout {
    pub scheme: Scheme,
    pub sector_size: u64,
    /// Sorted by start; never overlapping.
    pub partitions: Vec<Partition>,
    /// The extended partition of an MBR (a container, not a piece itself:
    /// its logical partitions are in `partitions`, its EBRs in `outside`).
    pub extended: Option<Range<u64>>,
    /// The complement of `partitions` within the disk, sorted and merged.
    pub outside: Vec<Range<u64>>,
}

/// Something partition tables are read from.
pub trait ReadAt {
    /// Fills `buf` from `offset`; bytes beyond the end read as an error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

impl ReadAt for std::fs::File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
}

impl ReadAt for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let start = usize::try_from(offset).ok().filter(|s| *s <= self.len());
        let end = start.and_then(|s| s.checked_add(buf.len()));
        match (start, end) {
            (Some(s), Some(e)) if e <= self.len() => {
                buf.copy_from_slice(&self[s..e]);
                Ok(())
            }
            _ => Err(std::io::ErrorKind::UnexpectedEof.into()),
        }
    }
}

impl<T: ReadAt + ?Sized> ReadAt for &T {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }
}

pub(crate) fn read_bytes<R: ReadAt + ?Sized>(
    dev: &R,
    offset: u64,
    len: usize,
) -> Result<Vec<u8>, Error> {
    let mut buf = vec![0u8; len];
    dev.read_exact_at(&mut buf, offset)
        .map_err(|source| Error::Io {
            offset,
            len,
            source,
        })?;
    Ok(buf)
}

/// Reads the partition table of a disk of `size` bytes.
///
/// `Ok(None)`: no table (an unpartitioned disk, or a filesystem written
/// straight onto it). `Err`: a table that is present but unusable.
pub fn read_layout<R: ReadAt + ?Sized>(dev: &R, size: u64) -> Result<Option<Layout>, Error> {
    if size < 512 {
        return Ok(None);
    }
    let lba0 = read_bytes(dev, 0, 512)?;
    let mbr = mbr::Mbr::parse(&lba0)?;
    let protective = mbr
        .as_ref()
        .is_some_and(|m| m.entries.iter().any(|e| e.kind == 0xEE));
    if protective || mbr.is_none() {
        match gpt::read(dev, size)? {
            Some((partitions, sector_size, backup)) => {
                return finish(Scheme::Gpt { backup }, sector_size, partitions, None, size)
                    .map(Some);
            }
            None if protective => {
                return Err(Error::Gpt {
                    primary: "protective MBR but no GPT header".into(),
                    backup: "no GPT header".into(),
                });
            }
            None => return Ok(None),
        }
    }
    let Some(mbr) = mbr else { return Ok(None) };
    let (partitions, extended) = mbr::read(dev, &mbr, size)?;
    finish(Scheme::Mbr, 512, partitions, extended, size).map(Some)
}

fn finish(
    scheme: Scheme,
    sector_size: u64,
    mut partitions: Vec<Partition>,
    extended: Option<Range<u64>>,
    size: u64,
) -> Result<Layout, Error> {
    partitions.sort_by_key(|p| p.start);
    let mut at = 0u64;
    let mut outside = Vec::new();
    for p in &partitions {
        let end = p
            .start
            .checked_add(p.len)
            .filter(|e| *e <= size)
            .ok_or_else(|| {
                Error::Layout(format!(
                    "partition {} ({}+{}) ends beyond the disk ({size} bytes)",
                    p.number, p.start, p.len
                ))
            })?;
        if p.start < at {
            return Err(Error::Layout(format!(
                "partition {} starts at {} inside the previous one (ends at {at})",
                p.number, p.start
            )));
        }
        if p.start > at {
            outside.push(at..p.start);
        }
        at = end;
    }
    if at < size {
        outside.push(at..size);
    }
    Ok(Layout {
        scheme,
        sector_size,
        partitions,
        extended,
        outside,
    })
}

pub(crate) fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

pub(crate) fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests;
