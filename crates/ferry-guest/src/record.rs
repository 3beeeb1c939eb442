//! The on-disk record format (version 1).
//!
//! ```text
//! offset  size  field
//!      0     6  magic   b"FRYREC"
//!      6     2  version u16 LE (1)
//!      8     8  seq     u64 LE, 0, 1, 2, ... within one file
//!     16     8  seed    u64 LE, chosen when the file is created, the same in every record
//!     24     4  len     u32 LE, length of the whole record (header + payload)
//!     28     4  crc     crc32c of bytes 0..28 followed by the payload
//!     32   len-32 payload: a pseudo-random stream derived from (seed, seq)
//! ```
//!
//! The payload is not stored for its own sake: because it is a function of
//! `(seed, seq)`, the verifier recomputes it and so detects a block that
//! carries a valid checksum but belongs elsewhere (another file, a stale copy,
//! a record moved by a bug in a storage layer).

use crate::error::{Error, ErrorKind};

/// The first six bytes of every record.
pub const MAGIC: [u8; 6] = *b"FRYREC";
/// The format version this code writes and reads.
pub const VERSION: u16 = 1;
/// Size of the fixed header in bytes.
pub const HEADER_LEN: usize = 32;
/// Largest record accepted (header + payload).
pub const MAX_RECORD_LEN: usize = 1 << 20;
/// Default record length used by the writer.
pub const DEFAULT_RECORD_LEN: usize = 512;

/// One decoded record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// Sequence number.
    pub seq: u64,
    /// File seed (the same for every record of a file).
    pub seed: u64,
    /// Length of the whole record in bytes.
    pub len: usize,
}

/// Why bytes at some offset are not a valid record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes remain than the header or the announced length needs.
    Short {
        /// Bytes available.
        have: usize,
        /// Bytes needed.
        need: usize,
    },
    /// The magic number is wrong.
    BadMagic,
    /// The version is not one this code reads.
    BadVersion(u16),
    /// The length field is out of range.
    BadLength(u64),
    /// The checksum does not match.
    BadChecksum {
        /// Checksum stored in the record.
        stored: u32,
        /// Checksum computed over the bytes.
        computed: u32,
    },
    /// The checksum matches but the payload is not the one `(seed, seq)` gives.
    BadPayload,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Short { have, need } => write!(f, "short: {have} of {need} bytes"),
            DecodeError::BadMagic => write!(f, "bad magic"),
            DecodeError::BadVersion(v) => write!(f, "unknown version {v}"),
            DecodeError::BadLength(l) => write!(f, "bad length {l}"),
            DecodeError::BadChecksum { stored, computed } => {
                write!(
                    f,
                    "checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
                )
            }
            DecodeError::BadPayload => write!(f, "payload does not match its seed and sequence"),
        }
    }
}

/// Fills `out` with the payload of record `seq` of a file with `seed`
/// (splitmix64 stream).
pub fn fill_payload(seed: u64, seq: u64, out: &mut [u8]) {
    let mut state = seed ^ seq.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for chunk in out.chunks_mut(8) {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
    }
}

/// Encodes record `seq` of a file with `seed` as `len` bytes.
pub fn encode(seed: u64, seq: u64, len: usize) -> Result<Vec<u8>, Error> {
    if !(HEADER_LEN..=MAX_RECORD_LEN).contains(&len) {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("record size {len} is outside {HEADER_LEN}..={MAX_RECORD_LEN} bytes"),
        ));
    }
    let mut buf = vec![0u8; len];
    buf[0..6].copy_from_slice(&MAGIC);
    buf[6..8].copy_from_slice(&VERSION.to_le_bytes());
    buf[8..16].copy_from_slice(&seq.to_le_bytes());
    buf[16..24].copy_from_slice(&seed.to_le_bytes());
    buf[24..28].copy_from_slice(&(len as u32).to_le_bytes());
    fill_payload(seed, seq, &mut buf[HEADER_LEN..]);
    let crc = checksum(&buf);
    buf[28..32].copy_from_slice(&crc.to_le_bytes());
    Ok(buf)
}

fn checksum(record: &[u8]) -> u32 {
    let c = crc32c::crc32c(&record[..28]);
    crc32c::crc32c_append(c, &record[HEADER_LEN..])
}

/// Decodes the record that starts at the beginning of `bytes`.
pub fn decode(bytes: &[u8]) -> Result<Record, DecodeError> {
    if bytes.len() < HEADER_LEN {
        return Err(DecodeError::Short {
            have: bytes.len(),
            need: HEADER_LEN,
        });
    }
    if bytes[0..6] != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let version = u16::from_le_bytes([bytes[6], bytes[7]]);
    if version != VERSION {
        return Err(DecodeError::BadVersion(version));
    }
    let le64 = |r: std::ops::Range<usize>| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&bytes[r]);
        u64::from_le_bytes(a)
    };
    let seq = le64(8..16);
    let seed = le64(16..24);
    let len = u32::from_le_bytes([bytes[24], bytes[25], bytes[26], bytes[27]]) as usize;
    if !(HEADER_LEN..=MAX_RECORD_LEN).contains(&len) {
        return Err(DecodeError::BadLength(len as u64));
    }
    if bytes.len() < len {
        return Err(DecodeError::Short {
            have: bytes.len(),
            need: len,
        });
    }
    let record = &bytes[..len];
    let stored = u32::from_le_bytes([bytes[28], bytes[29], bytes[30], bytes[31]]);
    let computed = checksum(record);
    if stored != computed {
        return Err(DecodeError::BadChecksum { stored, computed });
    }
    let mut expected = vec![0u8; len - HEADER_LEN];
    fill_payload(seed, seq, &mut expected);
    if expected != record[HEADER_LEN..] {
        return Err(DecodeError::BadPayload);
    }
    Ok(Record { seq, seed, len })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for len in [HEADER_LEN, HEADER_LEN + 1, 100, 512, 4096] {
            let buf = encode(42, 7, len).unwrap();
            assert_eq!(buf.len(), len);
            let r = decode(&buf).unwrap();
            assert_eq!(
                r,
                Record {
                    seq: 7,
                    seed: 42,
                    len
                }
            );
        }
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(encode(1, 1, HEADER_LEN - 1).is_err());
        assert!(encode(1, 1, MAX_RECORD_LEN + 1).is_err());
    }

    #[test]
    fn detects_every_flipped_byte() {
        let buf = encode(9, 3, 200).unwrap();
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x40;
            assert!(decode(&bad).is_err(), "flip at byte {i} went unnoticed");
        }
    }

    #[test]
    fn valid_checksum_wrong_payload_is_caught() {
        // A record whose checksum was recomputed over a foreign payload.
        let mut buf = encode(9, 3, 200).unwrap();
        buf[HEADER_LEN] ^= 1;
        let crc = checksum(&buf);
        buf[28..32].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode(&buf), Err(DecodeError::BadPayload));
    }

    #[test]
    fn short_input() {
        let buf = encode(9, 3, 200).unwrap();
        assert!(matches!(
            decode(&buf[..10]),
            Err(DecodeError::Short { have: 10, need: 32 })
        ));
        assert!(matches!(
            decode(&buf[..100]),
            Err(DecodeError::Short {
                have: 100,
                need: 200
            })
        ));
    }

    #[test]
    fn payload_depends_on_seed_and_seq() {
        let mut a = [0u8; 64];
        let mut b = [0u8; 64];
        fill_payload(1, 1, &mut a);
        fill_payload(1, 2, &mut b);
        assert_ne!(a, b);
        fill_payload(2, 1, &mut b);
        assert_ne!(a, b);
    }
}
