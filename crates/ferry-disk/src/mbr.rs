//! DOS/MBR partition tables, with extended boot record (EBR) chains.

use std::collections::HashSet;
use std::ops::Range;

use crate::{Error, Partition, ReadAt, le32, read_bytes};

const SECTOR: u64 = 512;
/// At most this many EBRs are followed (Linux stops at a similar bound).
const MAX_LOGICAL: usize = 256;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Entry {
    pub status: u8,
    pub kind: u8,
    pub start: u32,
    pub sectors: u32,
}

impl Entry {
    fn parse(b: &[u8]) -> Entry {
        Entry {
            status: b[0],
            kind: b[4],
            start: le32(b, 8),
            sectors: le32(b, 12),
        }
    }

    fn is_empty(&self) -> bool {
        self.kind == 0 || self.sectors == 0
    }

    fn is_extended(&self) -> bool {
        matches!(self.kind, 0x05 | 0x0F | 0x85)
    }
}

pub(crate) struct Mbr {
    pub entries: [Entry; 4],
}

fn entries(sector: &[u8]) -> [Entry; 4] {
    std::array::from_fn(|i| Entry::parse(&sector[446 + 16 * i..446 + 16 * (i + 1)]))
}

fn signed(sector: &[u8]) -> bool {
    sector[510] == 0x55 && sector[511] == 0xAA
}

impl Mbr {
    /// The MBR of a first sector, `None` without the `55 AA` signature.
    pub fn parse(sector: &[u8]) -> Result<Option<Mbr>, Error> {
        if !signed(sector) {
            return Ok(None);
        }
        let entries = entries(sector);
        for (i, e) in entries.iter().enumerate() {
            if e.status != 0 && e.status != 0x80 {
                return Err(Error::Mbr(format!(
                    "entry {} has status byte {:#04x} (not 0x00/0x80)",
                    i + 1,
                    e.status
                )));
            }
        }
        Ok(Some(Mbr { entries }))
    }
}

fn bytes(lba: u64, sectors: u64) -> Range<u64> {
    lba * SECTOR..(lba + sectors) * SECTOR
}

/// The partitions of an MBR disk (primaries and logicals) and the extended
/// container, if any.
pub(crate) fn read<R: ReadAt + ?Sized>(
    dev: &R,
    mbr: &Mbr,
    size: u64,
) -> Result<(Vec<Partition>, Option<Range<u64>>), Error> {
    let mut parts = Vec::new();
    let mut extended: Option<Range<u64>> = None;
    for (i, e) in mbr.entries.iter().enumerate() {
        if e.is_empty() {
            continue;
        }
        let r = bytes(e.start as u64, e.sectors as u64);
        if e.start == 0 || r.end > size {
            return Err(Error::Mbr(format!(
                "entry {} ({}..{}) is outside the disk ({size} bytes) or covers the MBR",
                i + 1,
                r.start,
                r.end
            )));
        }
        if e.is_extended() {
            if extended.is_some() {
                return Err(Error::Mbr("more than one extended partition".into()));
            }
            extended = Some(r);
        } else {
            parts.push(Partition {
                number: i as u32 + 1,
                start: r.start,
                len: r.end - r.start,
                kind: format!("{:#04x}", e.kind),
                name: None,
            });
        }
    }
    if let Some(ext) = &extended {
        for p in &parts {
            if p.start < ext.end && ext.start < p.start + p.len {
                return Err(Error::Mbr(format!(
                    "primary partition {} overlaps the extended partition",
                    p.number
                )));
            }
        }
        logical(dev, ext, &mut parts)?;
    }
    Ok((parts, extended))
}

/// Follows the EBR chain of the extended partition `ext`.
fn logical<R: ReadAt + ?Sized>(
    dev: &R,
    ext: &Range<u64>,
    parts: &mut Vec<Partition>,
) -> Result<(), Error> {
    let ext_lba = ext.start / SECTOR;
    let mut ebr = ext_lba;
    let mut seen = HashSet::new();
    let mut number = 5;
    loop {
        if !seen.insert(ebr) {
            return Err(Error::Mbr(format!("EBR chain loops back to sector {ebr}")));
        }
        if seen.len() > MAX_LOGICAL {
            return Err(Error::Mbr(format!("more than {MAX_LOGICAL} EBRs")));
        }
        let at = ebr * SECTOR;
        if !ext.contains(&at) {
            return Err(Error::Mbr(format!(
                "EBR at sector {ebr} lies outside the extended partition"
            )));
        }
        let sector = read_bytes(dev, at, SECTOR as usize)?;
        if !signed(&sector) {
            return Err(Error::Mbr(format!(
                "EBR at sector {ebr} has no 55 AA signature"
            )));
        }
        let [this, next, ..] = entries(&sector);
        if !this.is_empty() {
            let r = bytes(ebr + this.start as u64, this.sectors as u64);
            if this.start == 0 || r.start < ext.start || r.end > ext.end {
                return Err(Error::Mbr(format!(
                    "logical partition {number} ({}..{}) is outside the extended partition",
                    r.start, r.end
                )));
            }
            parts.push(Partition {
                number,
                start: r.start,
                len: r.end - r.start,
                kind: format!("{:#04x}", this.kind),
                name: None,
            });
            number += 1;
        }
        if next.is_empty() {
            return Ok(());
        }
        if !next.is_extended() {
            return Err(Error::Mbr(format!(
                "EBR at sector {ebr} links with type {:#04x} (not an extended type)",
                next.kind
            )));
        }
        ebr = ext_lba + next.start as u64;
    }
}
