//! Helpers shared by the integration tests: a pool with volumes of mixed
//! content (text, binary, zeroes, never-written holes) and digests.
#![allow(dead_code)]

use std::path::Path;

use ferry_pool::{Pool, PoolOptions, Volume};

pub const MIB: u64 = 1 << 20;

/// A tiny deterministic generator (xorshift64*).
pub struct Gen(u64);

impl Gen {
    pub fn new(seed: u64) -> Gen {
        Gen(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

const WORDS: &[&str] = &[
    "ferry", "volume", "snapshot", "kernel", "page", "block", "the", "of", "and", "journal",
    "inode", "guest", "backup", "chunk", "write", "read", "flush", "\n",
];

/// Text-like data: random words (compressible).
pub fn text(g: &mut Gen, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 16);
    while v.len() < len {
        v.extend_from_slice(WORDS[(g.next() % WORDS.len() as u64) as usize].as_bytes());
        v.push(b' ');
    }
    v.truncate(len);
    v
}

/// Fill `vol` with mixed content, 1 MiB regions in turn: text, random
/// binary, explicit zeroes, never written (hole); `marker` is embedded in
/// every text region.
pub fn fill_mixed(vol: &Volume, seed: u64, marker: &[u8]) {
    let mut g = Gen::new(seed);
    let regions = vol.size() / MIB;
    for r in 0..regions {
        let off = r * MIB;
        match r % 4 {
            0 => {
                let mut t = text(&mut g, MIB as usize);
                for p in (0..t.len() - marker.len()).step_by(4096) {
                    t[p..p + marker.len()].copy_from_slice(marker);
                }
                vol.write_at(off, &t).unwrap();
            }
            1 => {
                let mut b = vec![0u8; MIB as usize];
                g.fill(&mut b);
                vol.write_at(off, &b).unwrap();
            }
            2 => vol.write_at(off, &vec![0u8; MIB as usize]).unwrap(),
            _ => {}
        }
    }
    vol.flush().unwrap();
}

pub fn new_pool(dir: &Path) -> Pool {
    Pool::create(dir, PoolOptions::default()).unwrap()
}

/// BLAKE3 of a whole volume or snapshot, read through `read`.
pub fn digest(size: u64, read: impl Fn(u64, &mut [u8])) -> String {
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; MIB as usize];
    let mut off = 0;
    while off < size {
        let n = MIB.min(size - off) as usize;
        read(off, &mut buf[..n]);
        h.update(&buf[..n]);
        off += n as u64;
    }
    h.finalize().to_hex().to_string()
}

pub fn vol_digest(v: &Volume) -> String {
    digest(v.size(), |o, b| v.read_at(o, b).unwrap())
}

/// Every file under `dir`, recursively.
pub fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}
