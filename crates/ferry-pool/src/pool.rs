//! The pool: its files, in-memory state, allocation and the group commit.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};

use redb::{Database, ReadableDatabase, ReadableTable, WriteTransaction};

use crate::error::{Ctx, Error, ErrorKind, Result};
use crate::format::{FORMAT_VERSION, HEADER_FILE, Header, sync_dir};
use crate::meta::{self, COUNTERS, MAP, PROFILES, SNAPSHOTS, SnapRec, VOLUMES, VolumeRec, ZERO};
use crate::stagelog::{self, BootId, StageLog};
use crate::volume::{Fill, Slot, VolInner};

/// Name of the data file inside the pool directory.
pub const DATA_FILE: &str = "data";
/// Name of the metadata database inside the pool directory.
pub const META_FILE: &str = "meta.redb";

/// Alignment of buffer address, file offset and length that direct
/// writes ([`Shared::pwrite_direct`]) need; anything else is written
/// through the page cache.
pub const DIRECT_ALIGN: usize = 4096;

/// Counter: the newest stage log whose changes are committed.
const LOG_COMMITTED: &str = "log_committed";
/// Largest piece of one buffered write of the data file. The page cache
/// sizes a folio by the write that creates it, and ext4 walks every 4 KiB
/// block of a folio on each write into it: after 2 MiB writes, a 4 KiB
/// guest write cost 512 steps (43 % of the NBD server's time in 4 KiB
/// random writes). Smaller folios make small reads dearer, though: on the
/// pool bench, pieces of 64 KiB gave 4 KiB random writes 3.8× a raw file's
/// rate but reads 0.73×; 256 KiB gives 2.6× and 0.86×, 1 MiB 0.98× and
/// 0.84× (BENCHMARKS.md "## pool").
const WRITE_PIECE: usize = 256 << 10;
/// Bytes of the data file [`Shared::write_behind`] leaves being written
/// out before it waits for the oldest and lets their pages go: one piece
/// of a copy (a sparse 80 MiB copy, 12 rounds each: 4 MiB 0.092-0.094 s,
/// 8 MiB 0.098 s, none left (each piece waited for at once) 0.109 s;
/// BENCHMARKS.md session 20).
const WRITE_BEHIND: u64 = 4 << 20;

/// Parameters of a new pool.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Bytes per chunk: a power of two, at least 4096 (64 KiB by default).
    pub chunk_size: u32,
    /// Optional limit on the bytes the data file may hold.
    pub limit_bytes: Option<u64>,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            chunk_size: 64 * 1024,
            limit_bytes: None,
        }
    }
}

/// Free physical chunks. `used` counts chunks referenced by metadata (durable
/// or pending) plus chunks freed by a change that is not yet durable and
/// freed chunks in `limbo`.
#[derive(Debug, Default)]
pub(crate) struct Alloc {
    pub free: BTreeSet<u64>,
    pub hw: u64,
    pub used: u64,
    pub limit: Option<u64>,
    /// Chunks being sent from the mapped data file, and by how many
    /// reads (see [`crate::mapped`]).
    pub pinned: HashMap<u64, u32>,
    /// Freed chunks still pinned: free once unpinned.
    pub limbo: BTreeSet<u64>,
}

/// Metadata changes not yet committed: map entries (None = delete) and the
/// chunks they free, which may be reused only once the commit is durable;
/// and the stage log holding them on disk (see [`crate::stagelog`]).
#[derive(Default)]
pub(crate) struct Pending {
    pub ops: BTreeMap<(u64, u64, u64), Option<u64>>,
    pub frees: Vec<u64>,
    /// The log changes are appended to; created at the first change after
    /// a commit.
    pub log: Option<StageLog>,
    /// Sequence number of the next log.
    pub next_log: u64,
    /// Logs whose commit failed: their changes are back in `ops`, and the
    /// files stay until a commit covers them.
    pub retired: Vec<u64>,
}

/// What opening the pool found in its stage logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Staged changes of acknowledged writes replayed from the logs of a
    /// process that ended without a flush.
    pub replayed: usize,
    /// Logs not replayed, and why (written before the machine rebooted:
    /// their writes were never flushed and are lost, as allowed).
    pub dropped: Vec<String>,
}

/// Names and records of everything in the pool.
#[derive(Default)]
pub(crate) struct Catalog {
    pub by_name: HashMap<String, Arc<VolInner>>,
    pub by_id: HashMap<u64, Arc<VolInner>>,
    pub recs: HashMap<u64, VolumeRec>,
    pub snaps: BTreeMap<String, SnapRec>,
    pub next_id: u64,
}

/// State shared by the pool and every volume handle.
pub(crate) struct Shared {
    pub dir: PathBuf,
    pub chunk: u64,
    pub data: File,
    /// The data file opened again with `O_DIRECT`, for bulk writes that
    /// bypass the page cache; opened at the first such write (`None` when
    /// the file system refuses direct I/O).
    pub direct: OnceLock<Option<File>>,
    pub db: Database,
    pub alloc: Mutex<Alloc>,
    pub pending: Mutex<Pending>,
    /// Set by every data write; cleared when a commit starts its fdatasync.
    pub data_dirty: AtomicBool,
    /// Incremented after every acknowledged write.
    pub write_gen: AtomicU64,
    /// The commit lock; holds the write generation known durable.
    pub commit: Mutex<u64>,
    pub catalog: RwLock<Catalog>,
    /// Volumes recording a read profile (persisted at each commit).
    pub profiling: Mutex<Vec<Arc<VolInner>>>,
    /// The running kernel's boot id, written in each stage log.
    pub boot: BootId,
    /// The data file mapped read-only, for reads sent from it (see
    /// [`crate::mapped`]); replaced by a larger one as the file grows.
    pub map: RwLock<Option<Arc<memmap2::MmapRaw>>>,
    /// What the stage logs held when the pool was opened.
    pub recovery: Recovery,
    /// Runs of the data file (start, end) whose writeback
    /// [`Shared::write_behind`] started, oldest first, and their bytes.
    pub behind: Mutex<(VecDeque<(u64, u64)>, u64)>,
    /// A writeback error `write_behind` saw: waiting for writeback takes
    /// the error the next fdatasync would have reported, so the next
    /// commit reports it instead.
    pub behind_error: Mutex<Option<std::io::Error>>,
}

/// The first `n` bytes of `mem` from an address aligned for direct I/O
/// ([`DIRECT_ALIGN`]); `mem` grows to fit (keep it to reuse it). For the
/// buffers given to [`crate::Volume::write_direct`].
pub fn aligned_slice(mem: &mut Vec<u8>, n: usize) -> &mut [u8] {
    if mem.len() < n + DIRECT_ALIGN {
        mem.resize(n + DIRECT_ALIGN, 0);
    }
    let pad = mem.as_ptr().align_offset(DIRECT_ALIGN);
    &mut mem[pad..pad + n]
}

/// Adds the `n` bytes of the data file at `from` to `runs` (start, end),
/// extending the last run when they follow it.
pub(crate) fn add_run(runs: &mut Vec<(u64, u64)>, from: u64, n: u64) {
    match runs.last_mut() {
        Some(r) if r.1 == from => r.1 += n,
        _ => runs.push((from, from + n)),
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Split `[off, off+len)` of a volume or snapshot into (chunk, offset
    /// within chunk, length, position in buffer).
    pub(crate) fn pieces(
        &self,
        off: u64,
        len: u64,
    ) -> impl Iterator<Item = (u64, u64, usize, usize)> + use<> {
        let cs = self.chunk;
        let end = off + len;
        let mut pos = off;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let c = pos / cs;
            let within = pos % cs;
            let n = (cs - within).min(end - pos);
            let item = (c, within, n as usize, (pos - off) as usize);
            pos += n;
            Some(item)
        })
    }

    pub fn data_at(&self, phys: u64) -> u64 {
        phys * self.chunk
    }

    pub fn pread(&self, phys: u64, within: u64, buf: &mut [u8]) -> Result<()> {
        self.data
            .read_exact_at(buf, self.data_at(phys) + within)
            .ctx(|| format!("read physical chunk {phys} of pool {}", self.dir.display()))
    }

    /// `sync_file_range(flags)` on `[from, to)` of the data file. An error
    /// (other than "not a file that writes back") is kept for the next
    /// commit, whose fdatasync might otherwise not see it.
    fn sync_range(&self, (from, to): (u64, u64), flags: libc::c_uint) {
        // SAFETY: sync_file_range on a descriptor we own, with integer
        // arguments; no memory is passed.
        let r = unsafe {
            libc::sync_file_range(
                self.data.as_raw_fd(),
                from as libc::off64_t,
                (to - from) as libc::off64_t,
                flags,
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            // EINVAL/ESPIPE: not a file that writes back; nothing was
            // taken from the next fdatasync.
            if !matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ESPIPE)) {
                self.data_dirty.store(true, Ordering::SeqCst);
                lock(&self.behind_error).get_or_insert(e);
            }
        }
    }

    /// Starts writing out `runs` (start, end) of the data file, without
    /// waiting: for a writer whose next flush should find them written.
    pub(crate) fn start_writeback(&self, runs: &[(u64, u64)]) {
        for &r in runs {
            self.sync_range(r, libc::SYNC_FILE_RANGE_WRITE);
        }
    }

    /// Starts writing out `runs` (start, end) of the data file, then
    /// waits for the oldest runs started before, beyond the newest
    /// [`WRITE_BEHIND`] bytes, and lets their pages go: for a writer
    /// that will not read them again soon and flushes later (a copy's
    /// target), so the flush finds them written, and pages are freed one
    /// piece at a time and reused by the next writes instead of the page
    /// cache growing (on a VM host every fresh page costs a fault in the
    /// hypervisor). A writeback error is reported by the next commit.
    pub(crate) fn write_behind(&self, runs: &[(u64, u64)]) {
        self.start_writeback(runs);
        let done: Vec<(u64, u64)> = {
            let mut b = lock(&self.behind);
            for &(from, to) in runs {
                b.0.push_back((from, to));
                b.1 += to - from;
            }
            let mut done = Vec::new();
            while b.1 > WRITE_BEHIND
                && let Some((from, to)) = b.0.pop_front()
            {
                b.1 -= to - from;
                done.push((from, to));
            }
            done
        };
        for r in done {
            self.sync_range(
                r,
                libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER,
            );
            self.release_cached(r.0, r.1 - r.0);
        }
    }

    /// `POSIX_FADV_DONTNEED` on `len` bytes of the data file at `at`.
    pub(crate) fn release_cached(&self, at: u64, len: u64) {
        // SAFETY: advice on a descriptor we own, with integer arguments;
        // no memory is passed. Advice only: its result does not matter.
        unsafe {
            libc::posix_fadvise(
                self.data.as_raw_fd(),
                at as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_DONTNEED,
            );
        }
    }

    /// The same read only if the page cache holds it all (`RWF_NOWAIT`):
    /// `None` means it would wait for the disk (or the file system cannot
    /// tell); `buf` may then be partly filled.
    pub fn pread_nowait(&self, phys: u64, within: u64, buf: &mut [u8]) -> Option<Result<()>> {
        let fd = self.data.as_raw_fd();
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &mut buf[done..];
            let iov = libc::iovec {
                iov_base: rest.as_mut_ptr().cast(),
                iov_len: rest.len(),
            };
            let off = (self.data_at(phys) + within + done as u64) as libc::off_t;
            // SAFETY: `iov` describes `rest`, writable bytes borrowed mutably
            // for the duration of the call; the fd is open as long as `self`.
            let n = unsafe { libc::preadv2(fd, &iov, 1, off, libc::RWF_NOWAIT) };
            if n > 0 {
                done += n as usize;
                continue;
            }
            if n == 0 {
                return None;
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EOPNOTSUPP) => return None,
                Some(libc::EINTR) => {}
                _ => {
                    return Some(Err(e).ctx(|| {
                        format!("read physical chunk {phys} of pool {}", self.dir.display())
                    }));
                }
            }
        }
        Some(Ok(()))
    }

    pub fn pwrite(&self, phys: u64, within: u64, buf: &[u8]) -> Result<()> {
        let at = self.data_at(phys) + within;
        let r = buf
            .chunks(WRITE_PIECE)
            .zip((0..).step_by(WRITE_PIECE))
            .try_for_each(|(piece, k)| self.data.write_all_at(piece, at + k as u64))
            .ctx(|| format!("write physical chunk {phys} of pool {}", self.dir.display()));
        self.written();
        r
    }

    /// The write of `len` bytes at `within` in physical chunk `phys` (and
    /// the chunks after it), made by `fill(data file, offset, len)`: a
    /// server's pipe spliced into the data file ([`crate::Volume::try_write_spliced`]).
    pub fn write_with(
        &self,
        phys: u64,
        within: u64,
        len: usize,
        fill: &mut Fill<'_>,
    ) -> Result<()> {
        let at = self.data_at(phys) + within;
        let r = fill(self.data.as_fd(), at, len)
            .ctx(|| format!("write physical chunk {phys} of pool {}", self.dir.display()));
        self.written();
        r
    }

    /// Marks the data file as written since its last sync: after the write
    /// (also a failed one, which may have written part); loaded first so
    /// the hot path does not bounce a cache line.
    fn written(&self) {
        if !self.data_dirty.load(Ordering::SeqCst) {
            self.data_dirty.store(true, Ordering::SeqCst);
        }
    }

    /// Write whole new (or exclusively owned) chunks starting at `phys`
    /// straight to the disk (`O_DIRECT`), bypassing the page cache, when
    /// the buffer, offset and length are aligned to [`DIRECT_ALIGN`];
    /// otherwise, or when the file system refuses direct I/O, an ordinary
    /// [`Shared::pwrite`]. With `allocate`, the range is first allocated
    /// in the data file (`fallocate`), so that the direct write is an
    /// overwrite of allocated blocks, which ext4 lets several threads do
    /// at once (a write into a hole or past the end takes the file's lock
    /// exclusively for the whole I/O).
    ///
    /// For bulk fills (restore) whose data is not read back soon: writing
    /// into fresh page-cache pages costs more than the disk write itself on
    /// a VM host (every new page is first touched by that copy), and a
    /// direct write also leaves the page cache to other users. The kernel
    /// keeps the page cache coherent (cached pages of the range are written
    /// back before and dropped after the write); like any write it is
    /// durable after the next commit's fdatasync.
    pub fn pwrite_direct(&self, phys: u64, buf: &[u8], allocate: bool) -> Result<()> {
        let off = self.data_at(phys);
        let aligned = |b: &[u8], o: u64| {
            (b.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
                && b.len().is_multiple_of(DIRECT_ALIGN)
                && o.is_multiple_of(DIRECT_ALIGN as u64)
        };
        let Some(f) = self.direct_file().filter(|_| aligned(buf, off)) else {
            return self.pwrite(phys, 0, buf);
        };
        if allocate {
            // SAFETY: fallocate on a file descriptor we own, with plain
            // integer arguments; it does not touch our memory. Best
            // effort: without it the write is correct, only serialised.
            unsafe {
                libc::fallocate(
                    f.as_raw_fd(),
                    0,
                    off as libc::off_t,
                    buf.len() as libc::off_t,
                );
            }
        }
        let mut done = 0usize;
        let r = loop {
            let rest = &buf[done..];
            if rest.is_empty() {
                break Ok(());
            }
            if !aligned(rest, off + done as u64) {
                // A short direct write left an unaligned remainder.
                break self.pwrite(phys, done as u64, rest);
            }
            match f.write_at(rest, off + done as u64) {
                Ok(0) => {
                    break Err(std::io::Error::from(std::io::ErrorKind::WriteZero)).ctx(|| {
                        format!("write physical chunk {phys} of pool {}", self.dir.display())
                    });
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // Direct I/O refused for this range: the ordinary write.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    break self.pwrite(phys, done as u64, rest);
                }
                Err(e) => {
                    break Err(e).ctx(|| {
                        format!("write physical chunk {phys} of pool {}", self.dir.display())
                    });
                }
            }
        };
        self.written();
        r
    }

    fn direct_file(&self) -> Option<&File> {
        self.direct
            .get_or_init(|| {
                OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(self.dir.join(DATA_FILE))
                    .ok()
            })
            .as_ref()
    }

    /// Take a free chunk, or fail with `NoSpace` (nothing changed).
    pub fn allocate(&self, what: &dyn Fn() -> String) -> Result<u64> {
        let mut a = lock(&self.alloc);
        if let Some(limit) = a.limit
            && a.used >= limit
        {
            return Err(Error::new(
                ErrorKind::NoSpace,
                format!(
                    "{}: pool limit of {} chunks reached; nothing was written (space freed by trim or delete becomes usable after the next flush)",
                    what(),
                    limit
                ),
            ));
        }
        let p = match a.free.pop_first() {
            Some(p) => p,
            None => {
                a.hw += 1;
                a.hw - 1
            }
        };
        a.used += 1;
        Ok(p)
    }

    /// Take up to `want` free chunks that follow each other in the data
    /// file, for one pwrite of several new chunks: returns the first and
    /// how many (at least 1), or fails with `NoSpace` (nothing changed).
    ///
    /// The first free chunk is used when the run starting there is long
    /// enough; otherwise the run is taken at the end of the file, aligned
    /// to its length (up to 32 chunks) so the kernel can cache it in large
    /// page-cache folios, and the chunks skipped by the alignment are free.
    pub fn allocate_run(&self, want: u64, what: &dyn Fn() -> String) -> Result<(u64, u64)> {
        if want <= 1 {
            return self.allocate(what).map(|p| (p, 1));
        }
        let mut a = lock(&self.alloc);
        let room = a.limit.map_or(u64::MAX, |l| l.saturating_sub(a.used));
        if room <= 1 {
            drop(a);
            return self.allocate(what).map(|p| (p, 1));
        }
        let want = want.min(room);
        if let Some(&first) = a.free.first()
            && (1..want).all(|k| a.free.contains(&(first + k)))
        {
            for k in 0..want {
                a.free.remove(&(first + k));
            }
            a.used += want;
            return Ok((first, want));
        }
        let align = want.next_power_of_two().min(32);
        let start = a.hw.next_multiple_of(align);
        for p in a.hw..start {
            a.free.insert(p);
        }
        a.hw = start + want;
        a.used += want;
        Ok((start, want))
    }

    /// Return a chunk that no metadata (durable or pending) ever referenced.
    pub fn unallocate(&self, phys: u64) {
        let mut a = lock(&self.alloc);
        a.used -= 1;
        a.free.insert(phys);
    }

    /// Record a metadata change to commit at the next flush, and append it
    /// to the stage log so that it survives the death of the process. The
    /// caller has written the data first and changed its in-memory map; on
    /// an error the change is still staged (memory and metadata agree) but
    /// the write that made it must not be acknowledged.
    pub fn stage(
        &self,
        key: (u64, u64, u64),
        value: Option<u64>,
        freed: Option<u64>,
    ) -> Result<()> {
        let mut p = lock(&self.pending);
        p.ops.insert(key, value);
        let freed = freed.filter(|f| *f != ZERO);
        if let Some(f) = freed {
            p.frees.push(f);
        }
        self.log_of(&mut p)?.append(&self.dir, (key, value, freed))
    }

    /// The current stage log, started when there is none.
    fn log_of<'a>(&self, p: &'a mut Pending) -> Result<&'a mut StageLog> {
        if p.log.is_none() {
            let seq = p.next_log;
            p.next_log += 1;
            p.log = Some(StageLog::create(&self.dir, seq, &self.boot)?);
        }
        Ok(p.log.as_mut().expect("created above"))
    }

    /// [`Shared::stage`] for several new mappings (nothing freed), with one
    /// append to the stage log.
    pub fn stage_all(&self, changes: &[((u64, u64, u64), u64)]) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut p = lock(&self.pending);
        for (key, value) in changes {
            p.ops.insert(*key, Some(*value));
        }
        let recs: Vec<_> = changes.iter().map(|(k, v)| (*k, Some(*v), None)).collect();
        self.log_of(&mut p)?.append_all(&self.dir, &recs)
    }

    /// Make every write acknowledged before the call durable.
    pub fn flush(&self) -> Result<()> {
        let want = self.write_gen.load(Ordering::SeqCst);
        let mut durable = lock(&self.commit);
        if *durable >= want && !self.profiles_dirty() {
            return Ok(());
        }
        self.commit_locked(&mut durable, false, |_, _| Ok(()))
    }

    /// Commit pending changes plus `extra` in one transaction.
    pub fn commit_with(
        &self,
        extra: impl FnOnce(&WriteTransaction, &mut Vec<u64>) -> Result<()>,
    ) -> Result<()> {
        let mut durable = lock(&self.commit);
        self.commit_locked(&mut durable, true, extra)
    }

    fn commit_locked(
        &self,
        durable: &mut MutexGuard<'_, u64>,
        always_txn: bool,
        extra: impl FnOnce(&WriteTransaction, &mut Vec<u64>) -> Result<()>,
    ) -> Result<()> {
        let target = self.write_gen.load(Ordering::SeqCst);
        // Changes staged from now on go to a new log; this commit covers
        // the current one and any whose commit failed.
        let (ops, mut frees, covered) = {
            let mut p = lock(&self.pending);
            let log = p.log.take();
            let covered = log.map(|l| l.seq()).or(p.retired.last().copied());
            (
                std::mem::take(&mut p.ops),
                std::mem::take(&mut p.frees),
                covered,
            )
        };
        let profiles: Vec<(u64, Vec<u8>)> = lock(&self.profiling)
            .iter()
            .filter_map(|v| v.profile_to_persist())
            .collect();
        let staged_frees = frees.len();
        let result = (|| -> Result<()> {
            // New chunks' data must be durable before metadata points at them.
            if self.data_dirty.swap(false, Ordering::SeqCst) {
                let synced = match lock(&self.behind_error).take() {
                    Some(e) => Err(e),
                    None => self.data.sync_data(),
                };
                if synced.is_err() {
                    self.data_dirty.store(true, Ordering::SeqCst);
                }
                synced.ctx(|| format!("fdatasync data file of pool {}", self.dir.display()))?;
            }
            if !always_txn && ops.is_empty() && profiles.is_empty() && covered.is_none() {
                // Only in-place overwrites since the last commit: the
                // fdatasync above made them durable.
                return Ok(());
            }
            let txn = self
                .db
                .begin_write()
                .ctx(|| "begin metadata commit".into())?;
            {
                apply_changes(&txn, &ops)?;
                let mut pt = txn.open_table(PROFILES).ctx(|| "open profiles".into())?;
                for (id, json) in &profiles {
                    pt.insert(*id, json.as_slice())
                        .ctx(|| format!("store read profile of volume {id}"))?;
                }
                if let Some(seq) = covered {
                    txn.open_table(COUNTERS)
                        .ctx(|| "open counters".into())?
                        .insert(LOG_COMMITTED, seq)
                        .ctx(|| "store committed stage log".into())?;
                }
            }
            extra(&txn, &mut frees)?;
            txn.commit().ctx(|| "commit metadata".into())
        })();
        match result {
            Ok(()) => {
                self.release(frees);
                **durable = target;
                if let Some(seq) = covered {
                    let retired = std::mem::take(&mut lock(&self.pending).retired);
                    for s in retired.into_iter().chain([seq]) {
                        let _ = std::fs::remove_file(stagelog::path(&self.dir, s));
                    }
                }
                Ok(())
            }
            Err(e) => {
                // Nothing became durable: keep the changes for the next try
                // (their log file stays until a commit covers it).
                let mut p = lock(&self.pending);
                if let Some(seq) = covered
                    && p.retired.last() != Some(&seq)
                {
                    p.retired.push(seq);
                }
                for (k, v) in ops {
                    p.ops.entry(k).or_insert(v);
                }
                // Chunks `extra` meant to free stay referenced: drop them.
                frees.truncate(staged_frees);
                p.frees.extend(frees);
                Err(e)
            }
        }
    }

    fn profiles_dirty(&self) -> bool {
        lock(&self.profiling).iter().any(|v| v.profile_dirty())
    }

    /// Chunks freed by a durable commit: punch them out and make them reusable.
    fn release(&self, frees: Vec<u64>) {
        if frees.is_empty() {
            return;
        }
        // One hole per run of consecutive chunks: deleting a 16 GiB volume
        // chunk by chunk took minutes of fallocate calls.
        let mut sorted = frees.clone();
        sorted.sort_unstable();
        sorted.dedup();
        let mut i = 0;
        while i < sorted.len() {
            let mut j = i + 1;
            while j < sorted.len() && sorted[j] == sorted[j - 1] + 1 {
                j += 1;
            }
            let n = (j - i) as u64;
            punch_hole(&self.data, self.data_at(sorted[i]), n * self.chunk);
            i = j;
        }
        let mut a = lock(&self.alloc);
        for p in frees {
            // A chunk being sent from the mapping is not reused under it.
            if a.pinned.contains_key(&p) {
                a.limbo.insert(p);
            } else if a.free.insert(p) {
                a.used -= 1;
            }
        }
    }
}

/// Give a freed chunk's space back to the file system (best effort: a file
/// system without hole punching keeps the bytes, which is only space).
fn punch_hole(f: &File, off: u64, len: u64) {
    // SAFETY: fallocate on a file descriptor we own, with plain integer
    // arguments; it does not touch our memory.
    unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        );
    }
}

/// Create a new pool in `dir` (created if absent; must not hold a pool).
pub(crate) fn create(dir: &Path, opts: &PoolOptions) -> Result<Arc<Shared>> {
    if !opts.chunk_size.is_power_of_two() || opts.chunk_size < 4096 {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "create pool {}: chunk size {} is not a power of two ≥ 4096",
                dir.display(),
                opts.chunk_size
            ),
        ));
    }
    std::fs::create_dir_all(dir).ctx(|| format!("create pool directory {}", dir.display()))?;
    if dir.join(HEADER_FILE).exists() {
        return Err(Error::new(
            ErrorKind::AlreadyExists,
            format!("create pool {}: a pool exists there", dir.display()),
        ));
    }
    File::create(dir.join(DATA_FILE)).ctx(|| format!("create data file in {}", dir.display()))?;
    let db = Database::create(dir.join(META_FILE))
        .ctx(|| format!("create metadata of pool {}", dir.display()))?;
    meta::create_tables(&db)?;
    if let Some(limit) = opts.limit_bytes {
        let txn = db.begin_write().ctx(|| "store pool limit".into())?;
        txn.open_table(COUNTERS)
            .ctx(|| "open counters".into())?
            .insert("limit_bytes", limit)
            .ctx(|| "store pool limit".into())?;
        txn.commit().ctx(|| "store pool limit".into())?;
    }
    drop(db);
    sync_dir(dir)?;
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // The header last: a directory without it is not a pool.
    Header {
        version: FORMAT_VERSION,
        chunk_size: opts.chunk_size,
        created,
    }
    .write_new(dir)?;
    open(dir)
}

/// Open the pool in `dir` and rebuild the in-memory state from metadata.
pub(crate) fn open(dir: &Path) -> Result<Arc<Shared>> {
    let header = Header::read(dir)?;
    let chunk = header.chunk_size as u64;
    let data = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join(DATA_FILE))
        .ctx(|| format!("open data file of pool {}", dir.display()))?;
    let db = Database::open(dir.join(META_FILE))
        .ctx(|| format!("open metadata of pool {}", dir.display()))?;
    let boot = stagelog::boot_id();
    let (recovery, replay_frees, next_log) = replay_stage_logs(dir, &db, &data, chunk, &boot)?;
    let mut cat = Catalog::default();
    let mut alloc = Alloc::default();
    let mut profiles: HashMap<u64, Vec<u64>> = HashMap::new();
    {
        let txn = db.begin_read().ctx(|| "read metadata".into())?;
        let counters = txn.open_table(COUNTERS).ctx(|| "open counters".into())?;
        cat.next_id = counters
            .get("next_id")
            .ctx(|| "read next id".into())?
            .map(|g| g.value())
            .unwrap_or(1);
        alloc.limit = counters
            .get("limit_bytes")
            .ctx(|| "read pool limit".into())?
            .map(|g| g.value() / chunk);
        let vols = txn.open_table(VOLUMES).ctx(|| "open volumes".into())?;
        for item in vols.iter().ctx(|| "scan volumes".into())? {
            let (k, v) = item.ctx(|| "scan volumes".into())?;
            let rec = meta::decode_volume(k.value(), v.value())?;
            cat.recs.insert(rec.id, rec);
        }
        let snaps = txn.open_table(SNAPSHOTS).ctx(|| "open snapshots".into())?;
        for item in snaps.iter().ctx(|| "scan snapshots".into())? {
            let (k, v) = item.ctx(|| "scan snapshots".into())?;
            let rec = meta::decode_snapshot(k.value(), v.value())?;
            cat.snaps.insert(rec.name.clone(), rec);
        }
        let pt = txn.open_table(PROFILES).ctx(|| "open profiles".into())?;
        for item in pt.iter().ctx(|| "scan profiles".into())? {
            let (k, v) = item.ctx(|| "scan profiles".into())?;
            let chunks = meta::decode_profile(k.value(), v.value())?;
            profiles.insert(k.value(), chunks);
        }
        meta::check_catalog(&cat.recs, &cat.snaps, cat.next_id)?;
        // Durable entries point only at chunks whose data was fdatasync'd
        // first, so inside the data file: anything else is damage (and
        // would make the free list below absurdly large).
        let data_len = data
            .metadata()
            .ctx(|| format!("stat data file of pool {}", dir.display()))?
            .len();
        let data_chunks = data_len.div_ceil(chunk);
        let map = txn.open_table(MAP).ctx(|| "open map".into())?;
        let mut used = BTreeSet::new();
        for item in map.iter().ctx(|| "scan map".into())? {
            let (k, v) = item.ctx(|| "scan map".into())?;
            let phys = v.value();
            if phys != ZERO {
                if phys >= data_chunks {
                    return Err(Error::new(
                        ErrorKind::Metadata,
                        format!(
                            "open pool {}: map entry {:?} points at chunk {phys}, past the end of the data file ({data_chunks} chunks); the metadata is damaged, nothing was changed",
                            dir.display(),
                            k.value()
                        ),
                    ));
                }
                used.insert(phys);
            }
        }
        // Chunks freed by replayed changes: give their space back.
        for p in replay_frees {
            if !used.contains(&p) {
                punch_hole(&data, p * chunk, chunk);
            }
        }
        alloc.hw = used.last().map(|m| m + 1).unwrap_or(0);
        alloc.used = used.len() as u64;
        alloc.free = (0..alloc.hw).filter(|p| !used.contains(p)).collect();
        for rec in cat.recs.values() {
            let slots = meta::view(&map, &cat.recs, rec.id, rec.epoch)?;
            let snaps: BTreeSet<u64> = cat
                .snaps
                .values()
                .filter(|s| s.volume == rec.id)
                .map(|s| s.epoch)
                .collect();
            let vol = Arc::new(VolInner::new(rec, snaps, chunk));
            for (c, (phys, epoch, own)) in slots {
                vol.set_slot(c, Some(Slot { phys, epoch, own }));
            }
            if let Some(p) = profiles.remove(&rec.id) {
                vol.load_profile(p);
            }
            cat.by_name.insert(rec.name.clone(), vol.clone());
            cat.by_id.insert(rec.id, vol);
        }
    }
    Ok(Arc::new(Shared {
        dir: dir.to_path_buf(),
        chunk,
        data,
        direct: OnceLock::new(),
        db,
        alloc: Mutex::new(alloc),
        pending: Mutex::new(Pending {
            next_log,
            ..Pending::default()
        }),
        data_dirty: AtomicBool::new(false),
        write_gen: AtomicU64::new(0),
        commit: Mutex::new(0),
        catalog: RwLock::new(cat),
        profiling: Mutex::new(Vec::new()),
        boot,
        recovery,
        map: RwLock::new(None),
        behind: Mutex::new((VecDeque::new(), 0)),
        behind_error: Mutex::new(None),
    }))
}

/// Write staged mapping changes (None: entry removed) into `txn`.
fn apply_changes(
    txn: &WriteTransaction,
    ops: &BTreeMap<(u64, u64, u64), Option<u64>>,
) -> Result<()> {
    let mut map = txn.open_table(MAP).ctx(|| "open map".into())?;
    let mut ep = txn.open_table(meta::EPOCHS).ctx(|| "open epochs".into())?;
    for (k, v) in ops {
        match v {
            Some(p) => meta::put_entry(&mut map, &mut ep, *k, *p)?,
            None => {
                meta::del_entry(&mut map, &mut ep, *k)?;
            }
        }
    }
    Ok(())
}

/// Replay the stage logs a killed process left (see [`crate::stagelog`]):
/// their changes are committed in one transaction after an fdatasync of
/// the data file, and the logs removed. Returns what was found, the chunks
/// the replayed changes free, and the sequence number of the next log.
fn replay_stage_logs(
    dir: &Path,
    db: &Database,
    data: &File,
    chunk: u64,
    boot: &BootId,
) -> Result<(Recovery, Vec<u64>, u64)> {
    let committed = {
        let txn = db.begin_read().ctx(|| "read metadata".into())?;
        let counters = txn.open_table(COUNTERS).ctx(|| "open counters".into())?;
        counters
            .get(LOG_COMMITTED)
            .ctx(|| "read committed stage log".into())?
            .map(|g| g.value())
            .unwrap_or(0)
    };
    let mut found = stagelog::scan(dir, committed, boot)?;
    let max_seq = found.max_seq().max(committed);
    let mut recovery = Recovery {
        replayed: 0,
        dropped: std::mem::take(&mut found.dropped),
    };
    let mut frees = Vec::new();
    if !found.changes.is_empty() || max_seq > committed {
        let data_chunks = data
            .metadata()
            .ctx(|| format!("stat data file of pool {}", dir.display()))?
            .len()
            .div_ceil(chunk);
        // The page cache held the logged chunks' data; make it durable
        // before metadata points at it.
        data.sync_data()
            .ctx(|| format!("fdatasync data file of pool {}", dir.display()))?;
        let txn = db.begin_write().ctx(|| "begin stage log replay".into())?;
        {
            let vols = txn.open_table(VOLUMES).ctx(|| "open volumes".into())?;
            // Only changes of existing volumes pointing inside the data
            // file; anything else is damage and ends the replay there.
            let mut valid = 0;
            for &((lineage, _, _), value, freed) in &found.changes {
                let exists = vols
                    .get(lineage)
                    .ctx(|| "read volume record".into())?
                    .is_some();
                let inside = |p: Option<u64>| p.is_none_or(|p| p == ZERO || p < data_chunks);
                if !exists || !inside(value) || !inside(freed) {
                    recovery.dropped.push(format!(
                        "a change of volume {lineage} in the stage logs of pool {} does not fit the pool; it and the changes after it were not replayed",
                        dir.display()
                    ));
                    break;
                }
                valid += 1;
            }
            found.changes.truncate(valid);
            let (ops, f) = found.merged();
            frees = f;
            apply_changes(&txn, &ops)?;
            txn.open_table(COUNTERS)
                .ctx(|| "open counters".into())?
                .insert(LOG_COMMITTED, max_seq)
                .ctx(|| "store committed stage log".into())?;
            recovery.replayed = found.changes.len();
        }
        txn.commit().ctx(|| "commit stage log replay".into())?;
    }
    for (_, p) in &found.files {
        let _ = std::fs::remove_file(p);
    }
    Ok((recovery, frees, max_seq + 1))
}

impl Drop for Shared {
    /// A clean close commits what is staged (a crash simply loses it).
    fn drop(&mut self) {
        let staged = !lock(&self.pending).ops.is_empty() || self.profiles_dirty();
        if staged {
            let _ = self.commit_with(|_, _| Ok(()));
        }
    }
}
