//! Reading a backup back: a random-access reader over a disk of a backup
//! (with a small cache of decompressed blocks; it is also a lazy-volume
//! source for instant restore), and a full restore with parallel fetch.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use ferry_pool::{ChunkSource, Extent, ExtentKind};

use crate::backup::Progress;
use crate::crypto::ChunkId;
use crate::error::{Error, ErrorKind, Result};
use crate::format::Index;
use crate::repo::Repository;

/// Blocks kept decompressed by a [`DiskReader`].
const CACHE_BLOCKS: usize = 16;

/// Where a restore writes: a pool volume through [`crate::VolumeTarget`],
/// or anything that writes at offsets.
pub trait DiskTarget: Send + Sync {
    /// Write `data` at `off`.
    fn write_at(&self, off: u64, data: &[u8]) -> io::Result<()>;
    /// Make `[off, off+len)` read as zeroes. Default: write zeroes.
    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        let z = vec![0u8; len as usize];
        self.write_at(off, &z)
    }
    /// Make everything written durable.
    fn flush(&self) -> io::Result<()>;
}

/// A disk of a backup, read at offsets.
pub struct DiskReader {
    repo: Repository,
    index: Arc<Index>,
    what: String,
    cache: Mutex<VecDeque<(u64, Arc<Vec<u8>>)>>,
    fetched: AtomicU64,
}

impl std::fmt::Debug for DiskReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.what)
    }
}

/// What a full restore did.
#[derive(Debug, Clone, Default)]
pub struct RestoreStats {
    /// Disk size.
    pub bytes: u64,
    /// Blocks fetched from the repository.
    pub chunks_fetched: u64,
    /// Blocks that were holes (not fetched).
    pub holes: u64,
}

impl Repository {
    /// A reader over disk `disk` of backup `backup`.
    pub fn open_disk(&self, backup: &str, disk: &str) -> Result<DiskReader> {
        let m = self.show(backup)?;
        let d = m.disks.iter().find(|d| d.name == disk).ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!(
                    "backup {backup} in repository {}: no disk {disk}",
                    self.location()
                ),
            )
        })?;
        Ok(DiskReader {
            repo: self.clone(),
            index: Arc::new(self.read_index(&d.index)?),
            what: format!(
                "disk {disk} of backup {backup} in repository {}",
                self.location()
            ),
            cache: Mutex::new(VecDeque::new()),
            fetched: AtomicU64::new(0),
        })
    }

    /// Restore disk `disk` of backup `backup` into `target` with `threads`
    /// fetchers, then flush it. Holes are written as zeroes only when
    /// `write_holes` (a fresh volume already reads zeroes there).
    ///
    /// The index is cut into runs of consecutive data blocks of up to
    /// [`WRITE_BATCH`] bytes; each fetcher takes a run, fetches, checks,
    /// decrypts and decompresses its blocks into one buffer and writes it
    /// with one call. Every [`FLUSH_EVERY`] bytes written, a flusher thread
    /// flushes the target while the fetchers go on, so the disk writes the
    /// restored data back meanwhile instead of all of it at the final flush
    /// (which makes it all durable). A restore that fails or is interrupted
    /// leaves the target partly written; running it again rewrites every
    /// block (writes are idempotent).
    pub fn restore_disk(
        &self,
        backup: &str,
        disk: &str,
        target: &dyn DiskTarget,
        threads: usize,
        write_holes: bool,
        progress: Option<Progress<'_>>,
    ) -> Result<RestoreStats> {
        let r = self.open_disk(backup, disk)?;
        let ix = &r.index;
        let bs = ix.block_size as u64;
        let runs = plan_runs(ix, write_holes, (WRITE_BATCH / bs).max(1) as usize);
        let next = AtomicUsize::new(0);
        let done = AtomicU64::new(0);
        let failed: Mutex<Option<Error>> = Mutex::new(None);
        let fetched = AtomicU64::new(0);
        let flusher = Flusher::default();
        let fail = |e: Error| {
            failed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert(e);
        };
        let disk_err = |off: u64| {
            move |e: io::Error| {
                Error::with_source(
                    ErrorKind::Disk,
                    format!("write restore target at offset {off}"),
                    e,
                )
            }
        };
        std::thread::scope(|s| {
            s.spawn(|| {
                if let Err(e) = flusher.run(target) {
                    fail(Error::with_source(
                        ErrorKind::Disk,
                        format!("restore of {}: flush target", r.what),
                        e,
                    ));
                }
            });
            let workers: Vec<_> = (0..threads.max(1))
                .map(|_| {
                    s.spawn(|| {
                        // One buffer per fetcher for its whole life, aligned
                        // for direct writes ([`ferry_pool::DIRECT_ALIGN`]):
                        // blocks are decoded straight into it.
                        let cap = (WRITE_BATCH.max(bs) as usize).min(ix.size as usize);
                        let mut mem = Vec::new();
                        let buf = ferry_pool::aligned_slice(&mut mem, cap);
                        loop {
                            if failed.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
                                break;
                            }
                            let k = next.fetch_add(1, Ordering::Relaxed);
                            let Some(run) = runs.get(k) else { break };
                            let off = run.first * bs;
                            let len = (run.count as u64 * bs).min(ix.size - off);
                            let res = if run.hole {
                                target.write_zeroes(off, len).map_err(disk_err(off))
                            } else {
                                let mut res = Ok(());
                                for b in run.first..run.first + run.count as u64 {
                                    let at = ((b - run.first) * bs) as usize;
                                    let blen = bs.min(ix.size - b * bs) as usize;
                                    fetched.fetch_add(1, Ordering::Relaxed);
                                    res = self
                                        .read_chunk_into(
                                            ix.chunks[b as usize],
                                            &mut buf[at..at + blen],
                                        )
                                        .map_err(|e| {
                                            Error::with_source(
                                                e.kind(),
                                                format!("{}: block {b}", r.what),
                                                e,
                                            )
                                        });
                                    if res.is_err() {
                                        break;
                                    }
                                }
                                res.and_then(|()| {
                                    target
                                        .write_at(off, &buf[..len as usize])
                                        .map_err(disk_err(off))
                                })
                            };
                            if let Err(e) = res {
                                fail(e);
                                break;
                            }
                            if !run.hole {
                                flusher.wrote(len);
                            }
                            let n = done.fetch_add(len, Ordering::Relaxed) + len;
                            if let Some(p) = progress {
                                p(n, ix.size);
                            }
                        }
                    })
                })
                .collect();
            for w in workers {
                let _ = w.join();
            }
            flusher.finish();
        });
        if let Some(e) = failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Err(Error::with_source(
                e.kind(),
                format!("restore of {} failed; the target is incomplete", r.what),
                e,
            ));
        }
        target.flush().map_err(|e| {
            Error::with_source(
                ErrorKind::Disk,
                format!("restore of {}: flush target", r.what),
                e,
            )
        })?;
        if let Some(p) = progress {
            p(ix.size, ix.size);
        }
        Ok(RestoreStats {
            bytes: ix.size,
            chunks_fetched: fetched.into_inner(),
            holes: ix.chunks.iter().filter(|c| **c == ChunkId::HOLE).count() as u64,
        })
    }
}

/// Bytes of consecutive data blocks a restore fetcher writes at once.
pub const WRITE_BATCH: u64 = 8 << 20;

/// Bytes a restore writes between two background flushes of the target.
pub const FLUSH_EVERY: u64 = 256 << 20;

/// Consecutive blocks a restore handles as one: all data, or all holes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    first: u64,
    count: usize,
    hole: bool,
}

/// Cut an index into runs of up to `max` data blocks; holes become runs
/// (of any length) only when `write_holes`.
fn plan_runs(ix: &Index, write_holes: bool, max: usize) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    for (b, id) in ix.chunks.iter().enumerate() {
        let hole = *id == ChunkId::HOLE;
        if hole && !write_holes {
            continue;
        }
        match out.last_mut() {
            Some(r)
                if r.hole == hole
                    && r.first + r.count as u64 == b as u64
                    && (hole || r.count < max) =>
            {
                r.count += 1
            }
            _ => out.push(Run {
                first: b as u64,
                count: 1,
                hole,
            }),
        }
    }
    out
}

/// Flushes a restore target in the background every [`FLUSH_EVERY`]
/// bytes written, until told to finish.
#[derive(Default)]
struct Flusher {
    state: Mutex<(u64, bool)>,
    cv: Condvar,
}

impl Flusher {
    fn wrote(&self, n: u64) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.0 += n;
        if st.0 >= FLUSH_EVERY {
            self.cv.notify_one();
        }
    }

    fn finish(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
        self.cv.notify_one();
    }

    fn run(&self, target: &dyn DiskTarget) -> io::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if st.1 {
                return Ok(());
            }
            if st.0 >= FLUSH_EVERY {
                st.0 = 0;
                drop(st);
                target.flush()?;
                st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                continue;
            }
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl DiskReader {
    /// Disk size in bytes.
    pub fn size(&self) -> u64 {
        self.index.size
    }

    /// The disk's index.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Blocks fetched from the repository so far (cache misses).
    pub fn fetched_blocks(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }

    fn block(&self, b: u64) -> Result<Option<Arc<Vec<u8>>>> {
        let id = self.index.chunks[b as usize];
        if id == ChunkId::HOLE {
            return Ok(None);
        }
        {
            let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(pos) = c.iter().position(|(k, _)| *k == b) {
                let e = c.remove(pos).expect("position is valid");
                let data = e.1.clone();
                c.push_front(e);
                return Ok(Some(data));
            }
        }
        let data =
            Arc::new(self.repo.read_chunk(id).map_err(|e| {
                Error::with_source(e.kind(), format!("{}: block {b}", self.what), e)
            })?);
        self.fetched.fetch_add(1, Ordering::Relaxed);
        let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        c.push_front((b, data.clone()));
        c.truncate(CACHE_BLOCKS);
        Ok(Some(data))
    }

    /// Read `buf.len()` bytes at `off`.
    pub fn read_at(&self, mut off: u64, mut buf: &mut [u8]) -> Result<()> {
        if off
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.index.size)
        {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "{}: read of {} bytes at {off} is past the end",
                    self.what,
                    buf.len()
                ),
            ));
        }
        let bs = self.index.block_size as u64;
        while !buf.is_empty() {
            let b = off / bs;
            let inb = (off % bs) as usize;
            let n = buf.len().min(bs as usize - inb);
            match self.block(b)? {
                Some(d) => buf[..n].copy_from_slice(&d[inb..inb + n]),
                None => buf[..n].fill(0),
            }
            off += n as u64;
            buf = &mut buf[n..];
        }
        Ok(())
    }
}

impl ChunkSource for DiskReader {
    fn size(&self) -> u64 {
        self.index.size
    }

    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        DiskReader::read_at(self, off, buf).map_err(io::Error::other)
    }

    fn allocation(&self, off: u64, len: u64) -> Option<Vec<Extent>> {
        let bs = self.index.block_size as u64;
        let end = off.saturating_add(len).min(self.index.size);
        let mut out: Vec<Extent> = Vec::new();
        let mut o = off;
        while o < end {
            let b = o / bs;
            let e = ((b + 1) * bs).min(end);
            let kind = if self.index.chunks[b as usize] == ChunkId::HOLE {
                ExtentKind::Hole
            } else {
                ExtentKind::Data
            };
            match out.last_mut() {
                Some(x) if x.kind == kind && x.offset + x.length == o => x.length += e - o,
                _ => out.push(Extent {
                    offset: o,
                    length: e - o,
                    kind,
                }),
            }
            o = e;
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_group_consecutive_data_blocks_and_skip_holes() {
        let d = ChunkId([7; 32]);
        let h = ChunkId::HOLE;
        let ix = Index {
            size: 9 << 20,
            block_size: 1 << 20,
            chunks: vec![d, d, d, h, h, d, d, h, d],
        };
        let r = |first, count, hole| Run { first, count, hole };
        assert_eq!(
            plan_runs(&ix, false, 2),
            vec![
                r(0, 2, false),
                r(2, 1, false),
                r(5, 2, false),
                r(8, 1, false)
            ]
        );
        assert_eq!(
            plan_runs(&ix, true, 8),
            vec![
                r(0, 3, false),
                r(3, 2, true),
                r(5, 2, false),
                r(7, 1, true),
                r(8, 1, false)
            ]
        );
    }
}
