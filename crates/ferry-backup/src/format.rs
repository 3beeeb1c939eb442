//! The envelope every repository object is stored in, and the binary
//! layout of disk indexes.
//!
//! ```text
//! envelope (every object):
//!   0..8    magic, one per object kind (see the constants below)
//!   8..10   format version of that kind, u16 little endian (now 1)
//!   10      flags: bit 0 = payload is zstd-compressed,
//!                  bit 1 = payload is AES-256-GCM encrypted
//!   11      reserved, 0
//!   12..16  length of the plain payload, u32 little endian
//!   16..    encrypted:   12-byte nonce, ciphertext, 16-byte tag
//!                        (bytes 0..16 are the associated data)
//!           unencrypted: the payload, then BLAKE3(bytes 0..end of payload)
//! ```
//!
//! A chunk's id is the BLAKE3 hash (keyed when encrypted) of its plain
//! content, so reading a chunk checks the envelope (tag or checksum), then
//! the content against the id.

use aes_gcm::aead::{Aead, AeadInPlace, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce, Tag};

use crate::crypto::{ChunkId, Key};
use crate::error::{Error, ErrorKind, Result};

/// Magic of a chunk blob.
pub const MAGIC_CHUNK: [u8; 8] = *b"FERRYCHK";
/// Magic of a disk index.
pub const MAGIC_INDEX: [u8; 8] = *b"FERRYIDX";
/// Magic of a backup manifest.
pub const MAGIC_MANIFEST: [u8; 8] = *b"FERRYMAN";
/// Magic of the repository config.
pub const MAGIC_CONFIG: [u8; 8] = *b"FERRYREP";
/// Magic of a running backup's marker (see the garbage collector).
pub const MAGIC_WRITER: [u8; 8] = *b"FERRYWRT";
/// The format version this build writes and reads, for every kind.
pub const VERSION: u16 = 1;

const HDR: usize = 16;
const FLAG_ZSTD: u8 = 1;
const FLAG_AES: u8 = 2;
const NONCE: usize = 12;
/// Bytes of the AES-GCM tag.
const TAG: usize = 16;
/// zstd level: 1 is the fastest of the strong ones (hundreds of MB/s a core).
const ZSTD_LEVEL: i32 = 1;

fn kind_name(magic: &[u8; 8]) -> &'static str {
    match magic {
        m if m == &MAGIC_CHUNK => "chunk",
        m if m == &MAGIC_INDEX => "index",
        m if m == &MAGIC_MANIFEST => "manifest",
        m if m == &MAGIC_CONFIG => "config",
        m if m == &MAGIC_WRITER => "writer marker",
        _ => "object",
    }
}

/// Seal `plain` into an envelope of kind `magic`: compressed when that
/// makes it smaller (and `compress`), encrypted when a key is given.
pub fn seal(magic: [u8; 8], plain: &[u8], compress: bool, key: Option<&Key>) -> Vec<u8> {
    let mut flags = 0u8;
    let packed;
    let body: &[u8] = if compress {
        match zstd::bulk::compress(plain, ZSTD_LEVEL) {
            Ok(c) if c.len() < plain.len() => {
                flags |= FLAG_ZSTD;
                packed = c;
                &packed
            }
            _ => plain,
        }
    } else {
        plain
    };
    if key.is_some() {
        flags |= FLAG_AES;
    }
    let mut out = Vec::with_capacity(HDR + NONCE + body.len() + 32);
    out.extend_from_slice(&magic);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.push(flags);
    out.push(0);
    out.extend_from_slice(&(plain.len() as u32).to_le_bytes());
    match key {
        Some(k) => {
            let cipher = Aes256Gcm::new(&k.enc_key().into());
            let nonce: [u8; NONCE] = rand::random();
            let ct = cipher
                .encrypt(
                    Nonce::from_slice(&nonce),
                    Payload {
                        msg: body,
                        aad: &out[..HDR],
                    },
                )
                .expect("AES-GCM encryption of an in-memory buffer cannot fail");
            out.extend_from_slice(&nonce);
            out.extend_from_slice(&ct);
        }
        None => {
            out.extend_from_slice(body);
            let sum = blake3::hash(&out);
            out.extend_from_slice(sum.as_bytes());
        }
    }
    out
}

/// Open an envelope of kind `magic` named `what` (for errors).
pub fn open(magic: [u8; 8], blob: &[u8], key: Option<&Key>, what: &str) -> Result<Vec<u8>> {
    let mut blob = blob.to_vec();
    let (body, flags, plain_len) = unseal(magic, &mut blob, key, what)?;
    if flags & FLAG_ZSTD != 0 {
        let plain = zstd::bulk::decompress(&blob[body], plain_len)
            .map_err(|_| corrupt(what, "bad zstd data"))?;
        if plain.len() != plain_len {
            return Err(corrupt(what, "length mismatch"));
        }
        Ok(plain)
    } else {
        if body.len() != plain_len {
            return Err(corrupt(what, "length mismatch"));
        }
        blob.truncate(body.end);
        blob.drain(..body.start);
        Ok(blob)
    }
}

/// [`open`] into `out`, which must be exactly as long as the payload:
/// decrypts in `blob` (which it leaves scrambled) and decompresses
/// straight into `out`, with no buffer of its own (a restore decodes each
/// block into the buffer it writes).
pub fn open_into(
    magic: [u8; 8],
    blob: &mut [u8],
    key: Option<&Key>,
    what: &str,
    out: &mut [u8],
) -> Result<()> {
    let (body, flags, plain_len) = unseal(magic, blob, key, what)?;
    if plain_len != out.len() {
        return Err(corrupt(what, "length mismatch"));
    }
    if flags & FLAG_ZSTD != 0 {
        let n = zstd::bulk::decompress_to_buffer(&blob[body], out)
            .map_err(|_| corrupt(what, "bad zstd data"))?;
        if n != plain_len {
            return Err(corrupt(what, "length mismatch"));
        }
    } else {
        if body.len() != plain_len {
            return Err(corrupt(what, "length mismatch"));
        }
        out.copy_from_slice(&blob[body]);
    }
    Ok(())
}

fn corrupt(what: &str, why: &str) -> Error {
    Error::new(ErrorKind::Corrupt, format!("{what}: {why}"))
}

/// Check an envelope's header and its tag or checksum, decrypting in
/// place: returns where the (maybe compressed) payload is in `blob`, the
/// flags and the plain payload's length.
fn unseal(
    magic: [u8; 8],
    blob: &mut [u8],
    key: Option<&Key>,
    what: &str,
) -> Result<(std::ops::Range<usize>, u8, usize)> {
    if blob.len() < HDR {
        return Err(corrupt(what, "too short"));
    }
    if blob[..8] != magic {
        return Err(corrupt(what, &format!("not a ferry {}", kind_name(&magic))));
    }
    let version = u16::from_le_bytes([blob[8], blob[9]]);
    if version != VERSION {
        return Err(Error::new(
            ErrorKind::UnknownVersion,
            format!(
                "{what}: {} format version {version}, this build reads version {VERSION}",
                kind_name(&magic)
            ),
        ));
    }
    let flags = blob[10];
    if flags & !(FLAG_ZSTD | FLAG_AES) != 0 {
        return Err(corrupt(what, "unknown flags"));
    }
    let plain_len = u32::from_le_bytes([blob[12], blob[13], blob[14], blob[15]]) as usize;
    let body = if flags & FLAG_AES != 0 {
        let Some(k) = key else {
            return Err(Error::new(
                ErrorKind::WrongKey,
                format!("{what}: encrypted, and no key was given"),
            ));
        };
        if blob.len() < HDR + NONCE + TAG {
            return Err(corrupt(what, "too short"));
        }
        let (head, rest) = blob.split_at_mut(HDR + NONCE);
        let (ct, tag) = rest.split_at_mut(rest.len() - TAG);
        Aes256Gcm::new(&k.enc_key().into())
            .decrypt_in_place_detached(
                Nonce::from_slice(&head[HDR..]),
                &head[..HDR],
                ct,
                Tag::from_slice(tag),
            )
            .map_err(|_| corrupt(what, "authentication failed (damaged or wrong key)"))?;
        HDR + NONCE..blob.len() - TAG
    } else {
        if key.is_some() && magic != MAGIC_CONFIG {
            return Err(corrupt(what, "not encrypted in an encrypted repository"));
        }
        if blob.len() < HDR + 32 {
            return Err(corrupt(what, "too short"));
        }
        let (data, sum) = blob.split_at(blob.len() - 32);
        if blake3::hash(data).as_bytes() != sum {
            return Err(corrupt(what, "checksum mismatch"));
        }
        HDR..blob.len() - 32
    };
    Ok((body, flags, plain_len))
}

/// A disk's index: the chunk id of every block (or [`ChunkId::HOLE`]).
///
/// Payload layout: disk size u64, block size u32, reserved u32, block count
/// u64, then 32 bytes per block. All little endian.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    /// Disk size in bytes.
    pub size: u64,
    /// Block size in bytes.
    pub block_size: u32,
    /// One id per block; `HOLE` for blocks that read as zeroes.
    pub chunks: Vec<ChunkId>,
}

impl Index {
    /// Serialize the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(24 + 32 * self.chunks.len());
        v.extend_from_slice(&self.size.to_le_bytes());
        v.extend_from_slice(&self.block_size.to_le_bytes());
        v.extend_from_slice(&0u32.to_le_bytes());
        v.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        for c in &self.chunks {
            v.extend_from_slice(&c.0);
        }
        v
    }

    /// Parse the payload.
    pub fn decode(p: &[u8], what: &str) -> Result<Index> {
        let corrupt = || Error::new(ErrorKind::Corrupt, format!("{what}: malformed index"));
        if p.len() < 24 {
            return Err(corrupt());
        }
        let size = u64::from_le_bytes(p[0..8].try_into().map_err(|_| corrupt())?);
        let block_size = u32::from_le_bytes(p[8..12].try_into().map_err(|_| corrupt())?);
        let n = u64::from_le_bytes(p[16..24].try_into().map_err(|_| corrupt())?);
        if block_size == 0
            || n != size.div_ceil(block_size as u64)
            || (p.len() - 24) as u64 != n * 32
        {
            return Err(corrupt());
        }
        let chunks = p[24..]
            .chunks_exact(32)
            .map(|c| {
                let mut a = [0u8; 32];
                a.copy_from_slice(c);
                ChunkId(a)
            })
            .collect();
        Ok(Index {
            size,
            block_size,
            chunks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trips_and_detects_damage() {
        let data: Vec<u8> = b"hello world ".repeat(1000);
        for key in [None, Some(Key::generate())] {
            let b = seal(MAGIC_CHUNK, &data, true, key.as_ref());
            assert_eq!(open(MAGIC_CHUNK, &b, key.as_ref(), "t").unwrap(), data);
            let mut bad = b.clone();
            let i = bad.len() / 2;
            bad[i] ^= 1;
            let e = open(MAGIC_CHUNK, &bad, key.as_ref(), "t").unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corrupt);
            let e = open(MAGIC_INDEX, &b, key.as_ref(), "t").unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corrupt);
            let mut v2 = b.clone();
            v2[8] = 2;
            let e = open(MAGIC_CHUNK, &v2, key.as_ref(), "t").unwrap_err();
            assert_eq!(e.kind(), ErrorKind::UnknownVersion);
        }
    }

    #[test]
    fn open_into_decodes_in_place_and_detects_damage() {
        let text: Vec<u8> = b"hello world ".repeat(1000);
        let random: Vec<u8> = (0..12000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        for data in [&text, &random] {
            for key in [None, Some(Key::generate())] {
                for compress in [true, false] {
                    let b = seal(MAGIC_CHUNK, data, compress, key.as_ref());
                    let mut out = vec![0u8; data.len()];
                    open_into(MAGIC_CHUNK, &mut b.clone(), key.as_ref(), "t", &mut out).unwrap();
                    assert_eq!(&out, data);
                    let mut short = vec![0u8; data.len() - 1];
                    let e = open_into(MAGIC_CHUNK, &mut b.clone(), key.as_ref(), "t", &mut short)
                        .unwrap_err();
                    assert_eq!(e.kind(), ErrorKind::Corrupt);
                    let mut bad = b.clone();
                    let i = bad.len() / 2;
                    bad[i] ^= 1;
                    let e =
                        open_into(MAGIC_CHUNK, &mut bad, key.as_ref(), "t", &mut out).unwrap_err();
                    assert_eq!(e.kind(), ErrorKind::Corrupt);
                }
            }
        }
    }

    #[test]
    fn index_round_trip() {
        let ix = Index {
            size: 3 * 4096 + 1,
            block_size: 4096,
            chunks: vec![
                ChunkId([7; 32]),
                ChunkId::HOLE,
                ChunkId([9; 32]),
                ChunkId::HOLE,
            ],
        };
        assert_eq!(Index::decode(&ix.encode(), "t").unwrap(), ix);
        assert!(Index::decode(&ix.encode()[..30], "t").is_err());
    }
}
