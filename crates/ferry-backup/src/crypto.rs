//! Keys: the user's key file, the keys derived from it, chunk ids and the
//! key check value stored in the repository.
//!
//! A key file holds 32 random bytes written as 64 hex digits (whitespace
//! around them is ignored). The key itself is never stored in the
//! repository; three keys are derived from it with BLAKE3's key derivation
//! (distinct contexts): the AES-256-GCM key, the chunk id key (chunk ids are
//! then keyed BLAKE3 hashes, so they tell nothing about the content to
//! whoever reads the repository without the key) and the check value
//! stored in the config (one-way: it proves the key, it cannot give it).

use std::fmt;
use std::path::Path;

use crate::error::{Ctx, Error, ErrorKind, Result};

const CTX_ENC: &str = "ferry-backup 2026-11 chunk encryption key";
const CTX_ID: &str = "ferry-backup 2026-11 chunk id key";
const CTX_CHECK: &str = "ferry-backup 2026-11 key check value";

/// A repository encryption key (32 bytes).
#[derive(Clone)]
pub struct Key([u8; 32]);

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    /// A new random key.
    pub fn generate() -> Key {
        Key(rand::random())
    }

    /// A key from its 32 bytes.
    pub fn from_bytes(b: [u8; 32]) -> Key {
        Key(b)
    }

    /// Parse the text of a key file: 64 hex digits.
    pub fn from_hex(s: &str) -> Result<Key> {
        let s = s.trim();
        let bad = || Error::new(ErrorKind::InvalidArgument, "key: expected 64 hex digits");
        if s.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(s.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
                .map_err(|_| bad())?;
        }
        Ok(Key(out))
    }

    /// The key as 64 hex digits (the key file's content).
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// Read a key file.
    pub fn load(path: &Path) -> Result<Key> {
        let s = std::fs::read_to_string(path).ctx(ErrorKind::InvalidArgument, || {
            format!("read key file {}", path.display())
        })?;
        Key::from_hex(&s).map_err(|_| {
            Error::new(
                ErrorKind::InvalidArgument,
                format!("key file {}: expected 64 hex digits", path.display()),
            )
        })
    }

    /// Write a new key file (mode 0600); refuses to overwrite one.
    pub fn save(&self, path: &Path) -> Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let ctx = || format!("write key file {}", path.display());
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .ctx(ErrorKind::InvalidArgument, ctx)?;
        f.write_all(format!("{}\n", self.to_hex()).as_bytes())
            .ctx(ErrorKind::InvalidArgument, ctx)?;
        f.sync_all().ctx(ErrorKind::InvalidArgument, ctx)
    }

    pub(crate) fn enc_key(&self) -> [u8; 32] {
        blake3::derive_key(CTX_ENC, &self.0)
    }

    pub(crate) fn id_key(&self) -> [u8; 32] {
        blake3::derive_key(CTX_ID, &self.0)
    }

    /// The value stored in the repository config to recognise the key.
    pub(crate) fn check_value(&self) -> String {
        hex(&blake3::derive_key(CTX_CHECK, &self.0))
    }
}

/// A chunk's id: BLAKE3 of its plain content (keyed when encrypted).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self)
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl ChunkId {
    /// The all-zero id marks a hole in an index; no real chunk has it.
    pub const HOLE: ChunkId = ChunkId([0; 32]);

    /// The storage key of the chunk: `chunks/ab/ab…`.
    pub fn key(&self) -> String {
        let h = hex(&self.0);
        format!("chunks/{}/{}", &h[..2], h)
    }

    /// Parse a chunk key or hex id.
    pub fn parse(s: &str) -> Option<ChunkId> {
        let h = s.rsplit('/').next()?;
        Key::from_hex(h).ok().map(|k| ChunkId(k.0))
    }
}

/// Hashes chunk content into ids.
#[derive(Clone)]
pub(crate) struct Hasher {
    key: Option<[u8; 32]>,
}

impl Hasher {
    pub fn new(key: Option<&Key>) -> Hasher {
        Hasher {
            key: key.map(|k| k.id_key()),
        }
    }

    pub fn id(&self, data: &[u8]) -> ChunkId {
        let h = match &self.key {
            Some(k) => blake3::keyed_hash(k, data),
            None => blake3::hash(data),
        };
        let mut id = *h.as_bytes();
        if id == [0; 32] {
            // Never the hole marker (probability 2^-256, but be exact).
            id[0] = 1;
        }
        ChunkId(id)
    }
}

pub(crate) fn hex(b: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(D[(x >> 4) as usize] as char);
        s.push(D[(x & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_hex_round_trip_and_rejects_garbage() {
        let k = Key::generate();
        assert_eq!(Key::from_hex(&k.to_hex()).unwrap().0, k.0);
        assert!(Key::from_hex("zz").is_err());
        assert!(Key::from_hex(&"g".repeat(64)).is_err());
    }

    #[test]
    fn keyed_ids_differ_from_plain_ids() {
        let k = Key::generate();
        let a = Hasher::new(None).id(b"hello");
        let b = Hasher::new(Some(&k)).id(b"hello");
        assert_ne!(a, b);
        assert_eq!(ChunkId::parse(&a.key()), Some(a));
    }
}
