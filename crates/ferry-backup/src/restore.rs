//! Reading a backup back: a random-access reader over a disk of a backup
//! (with a small cache of decompressed blocks; it is also a lazy-volume
//! source for instant restore), and a full restore with parallel fetch.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

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
        let next = AtomicUsize::new(0);
        let done = AtomicU64::new(0);
        let failed: Mutex<Option<Error>> = Mutex::new(None);
        let fetched = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..threads.max(1) {
                s.spawn(|| {
                    loop {
                        if failed.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
                            break;
                        }
                        let b = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&id) = ix.chunks.get(b) else { break };
                        let off = b as u64 * bs;
                        let len = bs.min(ix.size - off);
                        let res = if id == ChunkId::HOLE {
                            if write_holes {
                                target.write_zeroes(off, len).map_err(|e| {
                                    Error::with_source(
                                        ErrorKind::Disk,
                                        format!("write restore target at offset {off}"),
                                        e,
                                    )
                                })
                            } else {
                                Ok(())
                            }
                        } else {
                            fetched.fetch_add(1, Ordering::Relaxed);
                            self.read_chunk(id).and_then(|data| {
                                if data.len() as u64 != len {
                                    return Err(Error::new(
                                        ErrorKind::Corrupt,
                                        format!("{}: block {b} has the wrong length", r.what),
                                    ));
                                }
                                target.write_at(off, &data).map_err(|e| {
                                    Error::with_source(
                                        ErrorKind::Disk,
                                        format!("write restore target at offset {off}"),
                                        e,
                                    )
                                })
                            })
                        };
                        if let Err(e) = res {
                            failed
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .get_or_insert(e);
                            break;
                        }
                        let n = done.fetch_add(len, Ordering::Relaxed) + len;
                        if let Some(p) = progress {
                            p(n, ix.size);
                        }
                    }
                });
            }
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
        let chunks_fetched = fetched.into_inner();
        Ok(RestoreStats {
            bytes: ix.size,
            chunks_fetched,
            holes: ix.chunks.iter().filter(|c| **c == ChunkId::HOLE).count() as u64,
        })
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
