//! Lazy volumes: chunks fetched from a [`ChunkSource`] on first access
//! (copy-on-read), and the source trait itself.
//!
//! A lazy volume is an ordinary volume whose chunks without a mapping entry
//! are *missing* rather than holes. The first reader of a missing chunk takes
//! the chunk's lock, fetches it from the source, stores it (a new physical
//! chunk, or a zero entry when the source has a hole or zeroes there) and
//! installs it; concurrent readers wait on the same lock and then find it
//! present, so one chunk is fetched once. A write covering a whole missing
//! chunk just writes it; a partial write fetches the chunk first, under the
//! same lock. Because a fetch installs only while holding the chunk lock and
//! only when the chunk is still missing, a later fetch can never overwrite a
//! local write.
//!
//! Fetched chunks are recorded in metadata at the next commit (flush, or the
//! hydrator's periodic commit). After a restart the lazy flag is read back
//! but the source is not: the caller must [`Volume::attach_source`] again
//! (reads of missing chunks fail with `SourceDetached` until then); chunks
//! already present are never fetched again.

use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::error::{Ctx, Error, ErrorKind, Result};
use crate::meta::{self, VOLUMES, ZERO};
use crate::pool::lock;
use crate::volume::{Extent, ExtentKind, LOCKS, Slot, Volume};

/// Where a lazy volume's missing chunks come from: a remote volume over NBD,
/// a backup, or another (possibly lazy) volume. Implementations must return
/// the same bytes for the same range for as long as they are attached.
pub trait ChunkSource: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Read `buf.len()` bytes at `off`.
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()>;
    /// What `[off, off+len)` holds, if the source knows: ranges reported as
    /// `Hole` or `Zero` are not fetched. `None` means "unknown, read it all".
    fn allocation(&self, _off: u64, _len: u64) -> Option<Vec<Extent>> {
        None
    }
}

/// Attempts per chunk before a fetch error reaches the caller.
const ATTEMPTS: u32 = 5;

pub(crate) struct LazyState {
    lazy: AtomicBool,
    pub source: RwLock<Option<Arc<dyn ChunkSource>>>,
    pub fetched_chunks: AtomicU64,
    pub fetched_bytes: AtomicU64,
}

impl LazyState {
    pub fn new(lazy: bool) -> LazyState {
        LazyState {
            lazy: AtomicBool::new(lazy),
            source: RwLock::new(None),
            fetched_chunks: AtomicU64::new(0),
            fetched_bytes: AtomicU64::new(0),
        }
    }

    pub fn is_lazy(&self) -> bool {
        self.lazy.load(Ordering::Acquire)
    }

    pub fn set_lazy(&self, lazy: bool) {
        self.lazy.store(lazy, Ordering::Release);
    }

    fn source(&self) -> Option<Arc<dyn ChunkSource>> {
        self.source
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Volume {
    /// True while the volume has chunks to fetch from a source.
    pub fn is_lazy(&self) -> bool {
        self.v.lazy.is_lazy()
    }

    /// Attach (or replace) the source of a lazy volume, e.g. after a restart.
    pub fn attach_source(&self, source: Arc<dyn ChunkSource>) -> Result<()> {
        if !self.is_lazy() {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "attach source to volume {}: the volume is not lazy",
                    self.v.name
                ),
            ));
        }
        if source.size() < self.size() {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "attach source to volume {}: source has {} bytes, the volume {}",
                    self.v.name,
                    source.size(),
                    self.size()
                ),
            ));
        }
        *self
            .v
            .lazy
            .source
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(source);
        Ok(())
    }

    /// True when chunk `c` is present locally (never to be fetched).
    pub fn is_present(&self, c: u64) -> bool {
        !self.is_lazy() || self.v.get(c).is_some()
    }

    /// Chunks present locally and the volume's chunk count.
    pub fn presence(&self) -> (u64, u64) {
        (self.v.present_chunks(), self.size().div_ceil(self.sh.chunk))
    }

    /// Fetch chunk `c` unless it is present (takes the chunk lock).
    pub(crate) fn fetch(&self, c: u64) -> Result<bool> {
        let epoch = self.v.read_state().epoch;
        let _g = lock(self.v.chunk_lock(c));
        if self.v.get(c).is_some() {
            return Ok(false);
        }
        self.fetch_locked(c, epoch)?;
        Ok(true)
    }

    /// Fetch missing chunk `c`; the caller holds the chunk lock.
    pub(crate) fn fetch_locked(&self, c: u64, epoch: u64) -> Result<()> {
        let cs = self.sh.chunk;
        let name = &self.v.name;
        let Some(src) = self.v.lazy.source() else {
            return Err(Error::new(
                ErrorKind::SourceDetached,
                format!(
                    "fetch chunk {c} of lazy volume {name}: no source attached (attach_source after a restart)"
                ),
            ));
        };
        let start = c * cs;
        let src_size = src.size();
        let n = cs
            .min(self.size().saturating_sub(start))
            .min(src_size.saturating_sub(start));
        let skip = n == 0
            || src.allocation(start, n).is_some_and(|ext: Vec<Extent>| {
                ext.iter().all(|e| e.kind != ExtentKind::Data)
                    && ext.iter().map(|e| e.length).sum::<u64>() >= n
            });
        if skip {
            self.install_fetched(c, ZERO, epoch)?;
            return Ok(());
        }
        let mut buf = vec![0u8; cs as usize];
        let mut attempt = 0;
        loop {
            match src.read_at(start, &mut buf[..n as usize]) {
                Ok(()) => break,
                Err(e) => {
                    attempt += 1;
                    if attempt >= ATTEMPTS {
                        return Err(Error::with_source(
                            ErrorKind::Source,
                            format!(
                                "fetch chunk {c} (bytes {start}..{}) of lazy volume {name}: source failed {ATTEMPTS} times; the chunk stays missing, the volume is unchanged",
                                start + n
                            ),
                            e,
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(2 << attempt));
                }
            }
        }
        self.v.lazy.fetched_bytes.fetch_add(n, Ordering::Relaxed);
        let phys = if buf.iter().all(|b| *b == 0) {
            ZERO
        } else {
            let p = self
                .sh
                .allocate(&|| format!("fetch chunk {c} of lazy volume {name}"))?;
            if let Err(e) = self.sh.pwrite(p, 0, &buf) {
                self.sh.unallocate(p);
                return Err(e);
            }
            p
        };
        self.install_fetched(c, phys, epoch)
    }

    /// Map fetched chunk `c` to `phys` (the caller holds the chunk lock).
    fn install_fetched(&self, c: u64, phys: u64, epoch: u64) -> Result<()> {
        self.v.set_slot(
            c,
            Some(Slot {
                phys,
                epoch,
                own: true,
            }),
        );
        self.sh.stage((self.v.id, c, epoch), Some(phys), None)?;
        self.v.lazy.fetched_chunks.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Settle, without reading them, the missing chunks among `chunks` that
    /// the source reports as holes or zeroes: each gets a zero entry, like a
    /// fetch that found zeroes. One allocation query to the source and one
    /// stage-log append per window of [`LOCKS`] chunks, whose chunk locks
    /// are all held meanwhile (so no write to those chunks can come between
    /// the entry and its log record). A 16 GiB disk holding 1 GiB of data
    /// has ~245 000 hole chunks: fetched one by one they cost seconds of
    /// CPU, here milliseconds. Returns how many chunks it settled; chunks
    /// the source does not describe are left to [`Volume::fetch`].
    pub(crate) fn settle_holes(&self, chunks: Range<u64>) -> Result<u64> {
        let Some(src) = self.v.lazy.source() else {
            return Ok(0);
        };
        let cs = self.sh.chunk;
        let end_byte = self.size().min(src.size());
        let total = end_byte.div_ceil(cs);
        let mut settled = 0;
        let mut w = chunks.start;
        while w < chunks.end.min(total) {
            let wend = (w + LOCKS).min(chunks.end).min(total);
            let (from, to) = (w * cs, (wend * cs).min(end_byte));
            w = wend;
            if (from / cs..to.div_ceil(cs)).all(|c| self.v.get(c).is_some()) {
                continue;
            }
            let Some(ext) = src.allocation(from, to - from) else {
                continue;
            };
            // Runs of consecutive non-data extents.
            let mut runs: Vec<Range<u64>> = Vec::new();
            for e in ext.iter().filter(|e| e.kind != ExtentKind::Data) {
                match runs.last_mut() {
                    Some(r) if r.end == e.offset => r.end = e.offset + e.length,
                    _ => runs.push(e.offset..e.offset + e.length),
                }
            }
            let holes: Vec<u64> = runs
                .iter()
                .flat_map(|r| r.start.div_ceil(cs)..r.end.min(to).div_ceil(cs))
                .filter(|c| {
                    let c_end = ((c + 1) * cs).min(end_byte);
                    runs.iter().any(|r| r.start <= c * cs && c_end <= r.end)
                })
                .collect();
            if holes.is_empty() {
                continue;
            }
            let epoch = self.v.read_state().epoch;
            // Every lock of the window, in lock order (a window of LOCKS
            // chunks needs each lock at most once; writers never wait for
            // a second chunk lock while holding one, so this cannot
            // deadlock with them).
            let mut stripes: Vec<u64> = holes.iter().map(|c| c % LOCKS).collect();
            stripes.sort_unstable();
            stripes.dedup();
            let _guards: Vec<_> = stripes
                .iter()
                .map(|s| lock(self.v.chunk_lock(*s)))
                .collect();
            let mut staged = Vec::new();
            for &c in &holes {
                if self.v.get(c).is_none() {
                    self.v.set_slot(
                        c,
                        Some(Slot {
                            phys: ZERO,
                            epoch,
                            own: true,
                        }),
                    );
                    staged.push(((self.v.id, c, epoch), ZERO));
                }
            }
            self.sh.stage_all(&staged)?;
            let n = staged.len() as u64;
            self.v.lazy.fetched_chunks.fetch_add(n, Ordering::Relaxed);
            settled += n;
        }
        Ok(settled)
    }

    /// Commit fetched chunks, and when every chunk is present turn the
    /// volume into an ordinary one (source detached). Returns true then.
    pub(crate) fn settle(&self) -> Result<bool> {
        let (present, total) = self.presence();
        if present < total || !self.is_lazy() {
            self.sh.commit_with(|_, _| Ok(()))?;
            return Ok(!self.is_lazy());
        }
        let mut cat = self.sh.catalog.write().unwrap_or_else(|e| e.into_inner());
        let id = self.v.id;
        let Some(rec) = cat.recs.get(&id).cloned() else {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "finish hydration of volume {}: volume was deleted",
                    self.v.name
                ),
            ));
        };
        let mut rec = rec;
        rec.lazy = false;
        let enc = meta::encode(&rec);
        self.sh.commit_with(|txn, _| {
            txn.open_table(VOLUMES)
                .ctx(|| "open volumes".into())?
                .insert(id, enc.as_slice())
                .ctx(|| format!("mark volume {} hydrated", rec.name))?;
            Ok(())
        })?;
        cat.recs.insert(id, rec);
        self.v.lazy.set_lazy(false);
        *self
            .v
            .lazy
            .source
            .write()
            .unwrap_or_else(|e| e.into_inner()) = None;
        Ok(true)
    }
}

/// A volume, lazy or not, is a valid source for another lazy volume.
impl ChunkSource for Volume {
    fn size(&self) -> u64 {
        Volume::size(self)
    }

    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        Volume::read_at(self, off, buf).map_err(io::Error::other)
    }

    fn allocation(&self, off: u64, len: u64) -> Option<Vec<Extent>> {
        Volume::allocation(self, off, len).ok()
    }
}
