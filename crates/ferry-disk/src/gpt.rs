//! GUID partition tables: primary header at LBA 1, backup at the last LBA,
//! each with its own entry array, all checked by CRC-32.

use crate::Error;
use crate::{Partition, ReadAt, crc32, le16, le32, le64, read_bytes};

const SIGNATURE: &[u8; 8] = b"EFI PART";
/// The entry array read is bounded whatever the header claims.
const MAX_ENTRIES_BYTES: u64 = 4 << 20;

enum Copy {
    /// No GPT signature at this LBA.
    Absent,
    Bad(String),
    Good(Vec<Partition>),
}

/// The GPT partitions, sector size and whether the backup was used;
/// `None` when there is no GPT signature at either copy.
pub(crate) fn read<R: ReadAt + ?Sized>(
    dev: &R,
    size: u64,
) -> Result<Option<(Vec<Partition>, u64, bool)>, Error> {
    let mut damage = None;
    for ss in [512u64, 4096] {
        if size < 3 * ss {
            continue;
        }
        let last = size / ss - 1;
        let primary = copy_at(dev, ss, 1, size)?;
        if let Copy::Good(p) = primary {
            return Ok(Some((p, ss, false)));
        }
        let backup = copy_at(dev, ss, last, size)?;
        match (primary, backup) {
            (_, Copy::Good(p)) => return Ok(Some((p, ss, true))),
            (Copy::Absent, Copy::Absent) => continue,
            (p, b) => {
                let say = |c: Copy| match c {
                    Copy::Absent => "no GPT signature".to_string(),
                    Copy::Bad(why) => why,
                    Copy::Good(_) => unreachable!("handled above"),
                };
                damage = Some(Error::Gpt {
                    primary: say(p),
                    backup: say(b),
                });
                break;
            }
        }
    }
    match damage {
        Some(e) => Err(e),
        None => Ok(None),
    }
}

/// Reads and checks the header at `lba` and its entry array.
fn copy_at<R: ReadAt + ?Sized>(dev: &R, ss: u64, lba: u64, size: u64) -> Result<Copy, Error> {
    let h = read_bytes(dev, lba * ss, ss as usize)?;
    if &h[..8] != SIGNATURE {
        return Ok(Copy::Absent);
    }
    let bad = |why: String| Ok(Copy::Bad(format!("header at LBA {lba}: {why}")));
    let header_size = le32(&h, 12) as usize;
    if header_size < 92 || header_size > ss as usize {
        return bad(format!("header size {header_size}"));
    }
    let mut zeroed = h[..header_size].to_vec();
    zeroed[16..20].fill(0);
    if crc32(&zeroed) != le32(&h, 16) {
        return bad("header CRC mismatch".into());
    }
    if le64(&h, 24) != lba {
        return bad(format!("claims to be at LBA {}", le64(&h, 24)));
    }
    let sectors = size / ss;
    let first_usable = le64(&h, 40);
    let last_usable = le64(&h, 48);
    if last_usable >= sectors || first_usable > last_usable.saturating_add(1) {
        return bad(format!(
            "usable LBAs {first_usable}..={last_usable} do not fit {sectors} sectors"
        ));
    }
    let entries_lba = le64(&h, 72);
    let count = le32(&h, 80) as u64;
    let entry_size = le32(&h, 84) as u64;
    if entry_size < 128 || !entry_size.is_multiple_of(8) {
        return bad(format!("entry size {entry_size}"));
    }
    let len = count * entry_size;
    if len > MAX_ENTRIES_BYTES {
        return bad(format!(
            "{count} entries of {entry_size} bytes is too large"
        ));
    }
    let end = entries_lba
        .checked_mul(ss)
        .and_then(|s| s.checked_add(len))
        .filter(|e| *e <= size);
    if end.is_none() || entries_lba == 0 {
        return bad(format!(
            "entry array at LBA {entries_lba} is outside the disk"
        ));
    }
    let array = read_bytes(dev, entries_lba * ss, len as usize)?;
    if crc32(&array) != le32(&h, 88) {
        return bad("entry array CRC mismatch".into());
    }
    let mut parts = Vec::new();
    for (i, e) in array.chunks_exact(entry_size as usize).enumerate() {
        if e[..16].iter().all(|b| *b == 0) {
            continue;
        }
        let first = le64(e, 32);
        let last = le64(e, 40);
        if first > last || first < first_usable || last > last_usable {
            return bad(format!(
                "entry {} spans LBAs {first}..={last}, outside {first_usable}..={last_usable}",
                i + 1
            ));
        }
        parts.push(Partition {
            number: i as u32 + 1,
            start: first * ss,
            len: (last - first + 1) * ss,
            kind: guid(&e[..16]),
            name: name(&e[56..128]),
        });
    }
    Ok(Copy::Good(parts))
}

/// A GUID in its canonical text (the first three fields little-endian).
fn guid(b: &[u8]) -> String {
    format!(
        "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}",
        le32(b, 0),
        le16(b, 4),
        le16(b, 6),
        b[8],
        b[9],
        b[10],
        b[11],
        b[12],
        b[13],
        b[14],
        b[15]
    )
}

fn name(b: &[u8]) -> Option<String> {
    let units: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|u| *u != 0)
        .collect();
    (!units.is_empty()).then(|| String::from_utf16_lossy(&units))
}
