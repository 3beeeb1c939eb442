//! The pool header file `pool.hdr`: a versioned magic number and the
//! parameters fixed at creation.
//!
//! Layout (32 bytes, little endian):
//!
//! | bytes  | field                                  |
//! |--------|----------------------------------------|
//! | 0..8   | magic `FERRYPOL`                       |
//! | 8..12  | format version (currently 1)           |
//! | 12..16 | chunk size in bytes (power of two)     |
//! | 16..24 | creation time, seconds since the epoch |
//! | 24..28 | reserved, zero                         |
//! | 28..32 | CRC-32C of bytes 0..28                 |
//!
//! The header is written once, to a temporary name, synced, renamed into
//! place and the directory synced: a crash leaves either no header (the
//! directory is not a pool yet) or a complete one.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use crate::error::{Ctx, Error, ErrorKind, Result};

/// The magic number at the start of `pool.hdr`.
pub const MAGIC: &[u8; 8] = b"FERRYPOL";
/// The only format version this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Name of the header file inside the pool directory.
pub const HEADER_FILE: &str = "pool.hdr";
const HEADER_LEN: usize = 32;

/// What the header records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Format version.
    pub version: u32,
    /// Bytes per chunk.
    pub chunk_size: u32,
    /// Seconds since the Unix epoch when the pool was created.
    pub created: u64,
}

impl Header {
    /// Encode to the on-disk bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&self.chunk_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.created.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decode and validate on-disk bytes; `what` names the file in errors.
    pub fn decode(b: &[u8], what: &str) -> Result<Header> {
        if b.len() < HEADER_LEN || &b[0..8] != MAGIC {
            return Err(Error::new(
                ErrorKind::BadHeader,
                format!("pool header {what}: bad magic"),
            ));
        }
        let crc = u32::from_le_bytes(b[28..32].try_into().expect("4 bytes"));
        if crc != crc32c::crc32c(&b[0..28]) {
            return Err(Error::new(
                ErrorKind::BadHeader,
                format!("pool header {what}: checksum mismatch"),
            ));
        }
        let version = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        if version != FORMAT_VERSION {
            return Err(Error::new(
                ErrorKind::UnknownVersion,
                format!(
                    "pool header {what}: format version {version}, this build reads version {FORMAT_VERSION}; nothing was changed"
                ),
            ));
        }
        let chunk_size = u32::from_le_bytes(b[12..16].try_into().expect("4 bytes"));
        if !chunk_size.is_power_of_two() || chunk_size < 4096 {
            return Err(Error::new(
                ErrorKind::BadHeader,
                format!("pool header {what}: invalid chunk size {chunk_size}"),
            ));
        }
        let created = u64::from_le_bytes(b[16..24].try_into().expect("8 bytes"));
        Ok(Header {
            version,
            chunk_size,
            created,
        })
    }

    /// Read the header of the pool in `dir`.
    pub fn read(dir: &Path) -> Result<Header> {
        let path = dir.join(HEADER_FILE);
        let b = fs::read(&path).ctx(|| format!("read pool header {}", path.display()))?;
        Header::decode(&b, &path.display().to_string())
    }

    /// Write the header of a new pool in `dir` atomically.
    pub fn write_new(&self, dir: &Path) -> Result<()> {
        let tmp = dir.join(format!("{HEADER_FILE}.tmp"));
        let path = dir.join(HEADER_FILE);
        let mut f = File::create(&tmp).ctx(|| format!("create {}", tmp.display()))?;
        f.write_all(&self.encode())
            .ctx(|| format!("write {}", tmp.display()))?;
        f.sync_all().ctx(|| format!("sync {}", tmp.display()))?;
        fs::rename(&tmp, &path).ctx(|| format!("rename to {}", path.display()))?;
        sync_dir(dir)
    }
}

/// fsync a directory so a rename or create inside it is durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx(|| format!("sync directory {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_rejects() {
        let h = Header {
            version: FORMAT_VERSION,
            chunk_size: 65536,
            created: 7,
        };
        let b = h.encode();
        assert_eq!(Header::decode(&b, "t").unwrap(), h);
        let mut bad = b;
        bad[0] = b'X';
        assert_eq!(
            Header::decode(&bad, "t").unwrap_err().kind(),
            ErrorKind::BadHeader
        );
        let mut v2 = Header { version: 2, ..h }.encode();
        assert_eq!(
            Header::decode(&v2, "t").unwrap_err().kind(),
            ErrorKind::UnknownVersion
        );
        v2[20] ^= 1;
        assert_eq!(
            Header::decode(&v2, "t").unwrap_err().kind(),
            ErrorKind::BadHeader
        );
    }
}
