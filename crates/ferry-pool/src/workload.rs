//! A deterministic random workload and the in-memory model it is checked
//! against. Used by the model-based tests, the crash test (whose child
//! process runs the workload and whose parent replays it from the same
//! seed) and the `crash` benchmark suite. Not used by the pool itself.

use std::collections::BTreeMap;

use crate::control::Pool;
use crate::error::Result;

/// SplitMix64: small, fast, deterministic.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Fill `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// One step of the workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Write `len` bytes of pattern `seed` at `off`.
    Write {
        vol: String,
        off: u64,
        len: u64,
        seed: u64,
    },
    /// Read and compare with the model.
    Read { vol: String, off: u64, len: u64 },
    /// Trim.
    Trim { vol: String, off: u64, len: u64 },
    /// Write zeroes (optionally keeping chunks allocated).
    Zero {
        vol: String,
        off: u64,
        len: u64,
        no_hole: bool,
    },
    /// Flush the pool.
    Flush,
    /// Snapshot several volumes atomically (one is a plain snapshot).
    Snapshot { pairs: Vec<(String, String)> },
    /// Read a whole snapshot and compare.
    ReadSnapshot { name: String },
    /// Delete a snapshot without clones.
    DeleteSnapshot { name: String },
    /// Clone a snapshot into a new volume.
    Clone { snap: String, vol: String },
    /// Delete a volume without snapshots.
    DeleteVolume { vol: String },
    /// Close and reopen the pool (in-process tests only).
    Reopen,
}

/// The expected content of everything in the pool.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Model {
    /// Volume name → content.
    pub vols: BTreeMap<String, Vec<u8>>,
    /// Snapshot name → (volume, content).
    pub snaps: BTreeMap<String, (String, Vec<u8>)>,
    /// Clone → the snapshot it came from.
    pub clones: BTreeMap<String, String>,
}

/// The data a write op writes.
pub fn pattern(seed: u64, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    Rng(seed).fill(&mut v);
    v
}

impl Model {
    /// Apply `op` to the model.
    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::Write {
                vol,
                off,
                len,
                seed,
            } => {
                let d = pattern(*seed, *len);
                self.vols.get_mut(vol).expect("volume")[*off as usize..(*off + *len) as usize]
                    .copy_from_slice(&d);
            }
            Op::Trim { vol, off, len } | Op::Zero { vol, off, len, .. } => {
                self.vols.get_mut(vol).expect("volume")[*off as usize..(*off + *len) as usize]
                    .fill(0);
            }
            Op::Snapshot { pairs } => {
                for (v, s) in pairs {
                    let c = self.vols[v].clone();
                    self.snaps.insert(s.clone(), (v.clone(), c));
                }
            }
            Op::DeleteSnapshot { name } => {
                self.snaps.remove(name);
            }
            Op::Clone { snap, vol } => {
                let c = self.snaps[snap].1.clone();
                self.vols.insert(vol.clone(), c);
                self.clones.insert(vol.clone(), snap.clone());
            }
            Op::DeleteVolume { vol } => {
                self.vols.remove(vol);
                self.clones.remove(vol);
            }
            Op::Read { .. } | Op::ReadSnapshot { .. } | Op::Flush | Op::Reopen => {}
        }
    }
}

/// Generates a valid op sequence for a model, deterministically from a seed.
#[derive(Debug, Clone)]
pub struct Generator {
    rng: Rng,
    chunk: u64,
    names: u64,
    /// Whether to emit [`Op::Reopen`].
    pub reopen: bool,
}

impl Generator {
    /// A generator for volumes of chunk size `chunk`.
    pub fn new(seed: u64, chunk: u64) -> Generator {
        Generator {
            rng: Rng(seed),
            chunk,
            names: 0,
            reopen: false,
        }
    }

    fn range(&mut self, size: u64) -> (u64, u64) {
        let r = &mut self.rng;
        let (off, len) = match r.below(4) {
            // chunk-aligned whole chunks
            0 => {
                let chunks = size / self.chunk;
                let c = r.below(chunks);
                let n = 1 + r.below(3.min(chunks - c));
                (c * self.chunk, n * self.chunk)
            }
            // small unaligned
            1 => {
                let off = r.below(size);
                (off, 1 + r.below(600))
            }
            // sector-aligned up to two chunks
            _ => {
                let off = r.below(size / 512) * 512;
                (off, 512 * (1 + r.below(2 * self.chunk / 512)))
            }
        };
        (off, len.min(size - off).max(1))
    }

    /// The next op, valid for `m`.
    pub fn next(&mut self, m: &Model) -> Op {
        loop {
            let vols: Vec<&String> = m.vols.keys().collect();
            let pick = self.rng.below(100);
            let vol = vols[self.rng.below(vols.len() as u64) as usize].clone();
            let size = m.vols[&vol].len() as u64;
            let op = match pick {
                0..=39 => {
                    let (off, len) = self.range(size);
                    Op::Write {
                        vol,
                        off,
                        len,
                        seed: self.rng.next_u64(),
                    }
                }
                40..=51 => {
                    let (off, len) = self.range(size);
                    Op::Read { vol, off, len }
                }
                52..=57 => {
                    let (off, len) = self.range(size);
                    Op::Trim { vol, off, len }
                }
                58..=61 => {
                    let (off, len) = self.range(size);
                    Op::Zero {
                        vol,
                        off,
                        len,
                        no_hole: self.rng.below(2) == 0,
                    }
                }
                62..=74 => Op::Flush,
                75..=81 => {
                    self.names += 1;
                    let mut pairs = vec![(vol.clone(), format!("s{}-{}", self.names, vol))];
                    if self.rng.below(3) == 0 {
                        for v in vols.iter().filter(|v| **v != &vol) {
                            if self.rng.below(2) == 0 {
                                pairs.push(((*v).clone(), format!("s{}-{}", self.names, v)));
                            }
                        }
                    }
                    Op::Snapshot { pairs }
                }
                82..=85 if !m.snaps.is_empty() => {
                    let s: Vec<&String> = m.snaps.keys().collect();
                    Op::ReadSnapshot {
                        name: s[self.rng.below(s.len() as u64) as usize].clone(),
                    }
                }
                86..=91 => {
                    let free: Vec<&String> = m
                        .snaps
                        .keys()
                        .filter(|s| !m.clones.values().any(|c| c == *s))
                        .collect();
                    if free.is_empty() {
                        continue;
                    }
                    Op::DeleteSnapshot {
                        name: free[self.rng.below(free.len() as u64) as usize].clone(),
                    }
                }
                92..=95 if !m.snaps.is_empty() && m.vols.len() < 5 => {
                    let s: Vec<&String> = m.snaps.keys().collect();
                    self.names += 1;
                    Op::Clone {
                        snap: s[self.rng.below(s.len() as u64) as usize].clone(),
                        vol: format!("c{}", self.names),
                    }
                }
                96..=97 if m.vols.len() > 1 => {
                    if m.snaps.values().any(|(v, _)| *v == vol) {
                        continue;
                    }
                    Op::DeleteVolume { vol }
                }
                98..=99 if self.reopen => Op::Reopen,
                _ => continue,
            };
            return op;
        }
    }
}

/// Apply `op` to the pool (reads compare with `m`, the model *before* the op).
/// Returns Err on a pool error, Ok(Some(msg)) on a mismatch.
pub fn run_op(pool: &Pool, m: &Model, op: &Op) -> Result<Option<String>> {
    match op {
        Op::Write {
            vol,
            off,
            len,
            seed,
        } => {
            let v = pool.volume(vol)?;
            let data = pattern(*seed, *len);
            // Odd seeds try the non-blocking in-place path first, as the
            // NBD server does; it declines what it cannot do at once.
            match (seed % 2 == 1)
                .then(|| v.try_write_at(*off, &data))
                .flatten()
            {
                Some(r) => r?,
                None => v.write_at(*off, &data)?,
            }
        }
        Op::Read { vol, off, len } => {
            let mut b = vec![0u8; *len as usize];
            pool.volume(vol)?.read_at(*off, &mut b)?;
            if b[..] != m.vols[vol][*off as usize..(*off + *len) as usize] {
                return Ok(Some(format!(
                    "read of {vol} at {off}+{len} differs from the model"
                )));
            }
        }
        Op::Trim { vol, off, len } => pool.volume(vol)?.trim(*off, *len)?,
        Op::Zero {
            vol,
            off,
            len,
            no_hole,
        } => pool.volume(vol)?.write_zeroes(*off, *len, *no_hole)?,
        Op::Flush => pool.flush()?,
        Op::Snapshot { pairs } => {
            let p: Vec<(&str, &str)> = pairs
                .iter()
                .map(|(a, b)| (a.as_str(), b.as_str()))
                .collect();
            if p.len() == 1 {
                pool.snapshot(p[0].0, p[0].1)?;
            } else {
                pool.group_snapshot(&format!("g-{}", p[0].1), &p)?;
            }
        }
        Op::ReadSnapshot { name } => {
            let s = pool.open_snapshot(name)?;
            let mut b = vec![0u8; s.size() as usize];
            s.read_at(0, &mut b)?;
            if b != m.snaps[name].1 {
                return Ok(Some(format!("snapshot {name} differs from the model")));
            }
        }
        Op::DeleteSnapshot { name } => pool.delete_snapshot(name)?,
        Op::Clone { snap, vol } => {
            pool.clone_snapshot(snap, vol)?;
        }
        Op::DeleteVolume { vol } => pool.delete_volume(vol)?,
        Op::Reopen => {}
    }
    Ok(None)
}

/// Compare every volume and snapshot of the pool with the model exactly.
pub fn compare(pool: &Pool, m: &Model) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let names: Vec<String> = pool.volumes().into_iter().map(|v| v.name).collect();
    let want: Vec<String> = m.vols.keys().cloned().collect();
    if names != want {
        out.push(format!("volumes {names:?}, model has {want:?}"));
    }
    for (name, content) in &m.vols {
        let Ok(v) = pool.volume(name) else { continue };
        let mut b = vec![0u8; content.len()];
        v.read_at(0, &mut b)?;
        if &b != content {
            out.push(format!("volume {name} differs from the model"));
        }
    }
    for (name, (_, content)) in &m.snaps {
        let Ok(s) = pool.open_snapshot(name) else {
            out.push(format!("snapshot {name} missing"));
            continue;
        };
        let mut b = vec![0u8; content.len()];
        s.read_at(0, &mut b)?;
        if &b != content {
            out.push(format!("snapshot {name} differs from the model"));
        }
    }
    Ok(out)
}

/// After a crash: `versions[0]` is the model at the last acknowledged flush,
/// the following ones the models after each op that may have run before the
/// kill. Every volume and snapshot of `versions[0]` must be present (unless
/// a later op deleted it) and every 512-byte sector must equal that sector in
/// one of the versions. Returns (sectors that match no version, problems).
pub fn check_after_crash(pool: &Pool, versions: &[Model]) -> Result<(u64, Vec<String>)> {
    let base = &versions[0];
    let mut bad = 0u64;
    let mut problems = Vec::new();
    for (name, content) in &base.vols {
        let cands: Vec<&Vec<u8>> = versions.iter().filter_map(|m| m.vols.get(name)).collect();
        let v = match pool.volume(name) {
            Ok(v) => v,
            Err(_) => {
                if cands.len() == versions.len() {
                    problems.push(format!("volume {name} is missing"));
                }
                continue;
            }
        };
        let mut b = vec![0u8; content.len()];
        v.read_at(0, &mut b)?;
        for (i, sector) in b.chunks(512).enumerate() {
            let r = i * 512..(i * 512 + sector.len());
            if !cands.iter().any(|c| &c[r.clone()] == sector) {
                bad += 1;
                if bad <= 3 {
                    problems.push(format!(
                        "volume {name} sector {i} matches no acknowledged version"
                    ));
                }
            }
        }
    }
    for (name, (_, content)) in &base.snaps {
        let deleted_later = versions.iter().any(|m| !m.snaps.contains_key(name));
        match pool.open_snapshot(name) {
            Ok(s) => {
                let mut b = vec![0u8; content.len()];
                s.read_at(0, &mut b)?;
                if &b != content {
                    bad += 1;
                    problems.push(format!("snapshot {name} differs"));
                }
            }
            Err(_) if deleted_later => {}
            Err(_) => problems.push(format!("snapshot {name} is missing")),
        }
    }
    Ok((bad, problems))
}
