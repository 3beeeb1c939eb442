//! A volume: its in-memory live map and the data path (read, write, trim,
//! write-zeroes, allocation map).
//!
//! The live map holds, for each chunk, only the newest entry (or the entry
//! inherited from a clone's parent), in 64 lock-striped shards, mirrored in
//! one atomic word per chunk ([`crate::fastmap`]): a read loads the words,
//! preads the data file and checks the words again (a chunk freed and
//! reused under the reader shows as a changed word, and the read is done
//! again under the shard locks). Writers to one chunk serialise on one of 256 striped chunk locks;
//! writers hold the volume's state lock shared, so a snapshot (which takes it
//! exclusively) sees every write either wholly before or wholly after it.

use std::collections::{BTreeSet, HashMap};
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use crate::error::{Error, ErrorKind, Result};
use crate::fastmap::{Fast, FastMap};
use crate::lazy::LazyState;
use crate::meta::{VolumeRec, ZERO};
use crate::pool::{Shared, add_run, lock};
use crate::profile::Profile;

/// Hasher of the chunk maps: chunk numbers are plain integers chosen by
/// the volume's user, not an attack surface worth SipHash on every read;
/// one multiply, folded so the low bits (bucket index) depend on all bits.
#[derive(Default, Clone, Copy)]
pub(crate) struct ChunkHasher(u64);

impl std::hash::Hasher for ChunkHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 29)
    }
}

type ChunkMap = HashMap<u64, Slot, std::hash::BuildHasherDefault<ChunkHasher>>;

const SHARDS: u64 = 64;
pub(crate) const LOCKS: u64 = 256;
/// Most chunks one pread/pwrite covers (well below SHARDS and LOCKS).
const MAX_RUN: u64 = 32;
/// Most new chunks one direct write covers ([`Volume::write_direct`]):
/// larger direct writes go faster, and a write holds only chunk locks
/// (still below LOCKS, so the run's locks are distinct).
const MAX_DIRECT_RUN: u64 = 128;

/// The live content of one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slot {
    /// Physical chunk, or ZERO.
    pub phys: u64,
    /// Epoch of the mapping entry.
    pub epoch: u64,
    /// False when inherited from a clone's parent snapshot.
    pub own: bool,
}

/// Snapshot bookkeeping of a volume (changed only with the lock exclusive).
#[derive(Debug)]
pub(crate) struct VolState {
    pub epoch: u64,
    pub snaps: BTreeSet<u64>,
    pub parent: Option<(u64, u64)>,
    pub deleted: bool,
}

impl VolState {
    /// True when an entry written at `epoch` is visible to no snapshot, so
    /// the live volume may overwrite or free it.
    pub fn exclusive(&self, epoch: u64) -> bool {
        self.snaps.range(epoch..self.epoch).next().is_none()
    }

    /// True when the live volume may overwrite slot `s`'s chunk in place:
    /// its own allocated chunk, which no snapshot sees.
    pub fn in_place(&self, s: Slot) -> bool {
        s.own && s.phys != ZERO && self.exclusive(s.epoch)
    }
}

pub(crate) struct VolInner {
    pub id: u64,
    pub name: String,
    pub size: AtomicU64,
    pub state: RwLock<VolState>,
    shards: Box<[RwLock<ChunkMap>]>,
    /// The shards' entries as the lock-free read path sees them.
    pub(crate) fast: FastMap,
    locks: Box<[Mutex<()>]>,
    pub deleted: AtomicBool,
    pub lazy: LazyState,
    pub profile: Profile,
}

impl VolInner {
    pub fn new(rec: &VolumeRec, snaps: BTreeSet<u64>, _chunk: u64) -> VolInner {
        VolInner {
            id: rec.id,
            name: rec.name.clone(),
            size: AtomicU64::new(rec.size),
            state: RwLock::new(VolState {
                epoch: rec.epoch,
                snaps,
                parent: rec.parent,
                deleted: false,
            }),
            shards: (0..SHARDS)
                .map(|_| RwLock::new(ChunkMap::default()))
                .collect(),
            fast: FastMap::default(),
            locks: (0..LOCKS).map(|_| Mutex::new(())).collect(),
            deleted: AtomicBool::new(false),
            lazy: LazyState::new(rec.lazy),
            profile: Profile::default(),
        }
    }

    pub fn shard(&self, c: u64) -> &RwLock<ChunkMap> {
        &self.shards[(c % SHARDS) as usize]
    }

    pub fn chunk_lock(&self, c: u64) -> &Mutex<()> {
        &self.locks[(c % LOCKS) as usize]
    }

    pub fn get(&self, c: u64) -> Option<Slot> {
        self.shard(c)
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&c)
            .copied()
    }

    pub fn set_slot(&self, c: u64, s: Option<Slot>) {
        let mut sh = self.shard(c).write().unwrap_or_else(|e| e.into_inner());
        self.fast.store(c, s);
        match s {
            Some(s) => sh.insert(c, s),
            None => sh.remove(&c),
        };
    }

    /// Every slot (for verify and accounting).
    pub fn slots(&self) -> HashMap<u64, Slot> {
        let mut out = HashMap::new();
        for s in self.shards.iter() {
            out.extend(
                s.read()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .map(|(k, v)| (*k, *v)),
            );
        }
        out
    }

    pub fn present_chunks(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|e| e.into_inner()).len() as u64)
            .sum()
    }

    pub fn clear(&self) {
        for s in self.shards.iter() {
            let mut sh = s.write().unwrap_or_else(|e| e.into_inner());
            for &c in sh.keys() {
                self.fast.store(c, None);
            }
            sh.clear();
        }
    }

    pub fn read_state(&self) -> RwLockReadGuard<'_, VolState> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// What a byte range of a volume holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Allocated data (or, on a lazy volume, not fetched yet).
    Data,
    /// Reads as zeroes and holds no space (trimmed or written as zeroes).
    Zero,
    /// Never written: reads as zeroes, holds no space.
    Hole,
}

/// A byte range and what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// What the range holds.
    pub kind: ExtentKind,
}

/// A run of a write's bytes in the data file ([`Volume::try_write_at`]):
/// request bytes `at..at + n` at `within` in physical chunk `phys` and the
/// chunks after it, for volume chunks from `first` on.
struct Run {
    phys: u64,
    within: u64,
    at: usize,
    n: usize,
    first: u64,
    /// For a run of whole chunks written into new space: each chunk's slot
    /// before (empty for an overwrite in place).
    new: Vec<Option<Slot>>,
}

/// Moves the next `n` bytes of a write into a file at an offset
/// ([`Volume::try_write_spliced`]).
pub type Fill<'a> = dyn FnMut(BorrowedFd<'_>, u64, usize) -> std::io::Result<()> + 'a;

/// A handle on a volume: cheap to clone, `Send + Sync`.
#[derive(Clone)]
pub struct Volume {
    pub(crate) sh: Arc<Shared>,
    pub(crate) v: Arc<VolInner>,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("name", &self.v.name)
            .field("id", &self.v.id)
            .finish()
    }
}

impl Volume {
    /// The volume's name.
    pub fn name(&self) -> &str {
        &self.v.name
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.v.size.load(Ordering::Acquire)
    }

    /// The pool's chunk size.
    pub fn chunk_size(&self) -> u64 {
        self.sh.chunk
    }

    pub(crate) fn check(&self, op: &str, off: u64, len: u64) -> Result<()> {
        if self.v.deleted.load(Ordering::Acquire) {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("{op} on volume {}: volume was deleted", self.v.name),
            ));
        }
        let size = self.size();
        if off.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "{op} on volume {}: range {off}+{len} beyond size {size}",
                    self.v.name
                ),
            ));
        }
        Ok(())
    }

    /// Split `[off, off+len)` into (chunk, offset within chunk, length, position in buffer).
    pub(crate) fn pieces(
        &self,
        off: u64,
        len: u64,
    ) -> impl Iterator<Item = (u64, u64, usize, usize)> + use<> {
        self.sh.pieces(off, len)
    }

    /// Read `buf.len()` bytes at `off`.
    pub fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        self.check("read", off, buf.len() as u64)?;
        let mut pieces = self.pieces(off, buf.len() as u64).peekable();
        while let Some((c, within, n, at)) = pieces.next() {
            let run = self
                .read_run(c, within, n, at, &mut pieces, buf, false)?
                .expect("a blocking read always completes");
            for k in 0..run {
                self.v.profile.record(c + k);
            }
        }
        Ok(())
    }

    /// Lets the page cache drop what it holds of `[off, off + len)` (its
    /// data chunks' pages in the data file), for a reader that is done
    /// with data nobody will read soon: a copy's target after verifying a
    /// flushed piece, so that the copy's next pieces reuse those pages
    /// instead of the cache growing by the whole copy (on a VM host every
    /// fresh page also costs a fault in the hypervisor). Advice only:
    /// pages not written out yet stay, and readers see no change.
    pub fn release_cached(&self, off: u64, len: u64) {
        for (from, to) in self.data_runs("release", off, len) {
            self.sh.release_cached(from, to - from);
        }
    }

    /// Starts writing `[off, off + len)` out to the disk, without waiting
    /// and without letting its pages go: for a bulk writer (a copy's
    /// target) whose flush at the end should find little left to write,
    /// where the kernel would otherwise start only when the dirty data
    /// pass its thresholds or age. Like a write, durable only after a
    /// flush; a writeback error is reported by the next flush. Holes and a
    /// range out of bounds have nothing to write out.
    pub fn start_writeback(&self, off: u64, len: u64) {
        self.sh
            .start_writeback(&self.data_runs("write out", off, len));
    }

    /// Starts writing `ranges` (each `(offset, length)`) out to the disk
    /// without waiting, and lets go of the pages of what earlier calls (on
    /// any volume of the pool) started writing, a few MiB behind, once
    /// written: for a writer that will not read the ranges again soon and
    /// flushes later. A copy's target calls it for the ranges of each
    /// piece it verified, so the copy can flush rarely and still find the
    /// data written out and the pages reused (see `docs/vm-copy.md`).
    /// Ranges whose data lie one after the other in the pool's data file
    /// are written out as one. Like a write, durable only after a flush; a
    /// writeback error is reported by the next flush.
    pub fn write_behind(&self, ranges: &[(u64, u64)]) {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &(off, len) in ranges {
            for (from, to) in self.data_runs("write behind", off, len) {
                add_run(&mut runs, from, to - from);
            }
        }
        self.sh.write_behind(&runs);
    }

    /// The runs (start, end) of the data file holding `[off, off + len)`'s
    /// data chunks; none for a range out of bounds.
    fn data_runs(&self, what: &str, off: u64, len: u64) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        if len == 0 || self.check(what, off, len).is_err() {
            return runs;
        }
        for (c, within, n, _) in self.pieces(off, len) {
            let Fast::Data(p) = self.v.fast.load(c).fast() else {
                continue;
            };
            add_run(&mut runs, self.sh.data_at(p) + within, n as u64);
        }
        runs
    }

    /// The same read, only if it needs neither the disk (the page cache
    /// holds the data) nor a fetch from a lazy volume's source: `None`
    /// means "call [`Volume::read_at`] where blocking is fine"; `buf` may
    /// then be partly filled. Lets an async server answer cached reads
    /// without a thread hop.
    pub fn try_read_at(&self, off: u64, buf: &mut [u8]) -> Option<Result<()>> {
        if let Err(e) = self.check("read", off, buf.len() as u64) {
            return Some(Err(e));
        }
        let mut pieces = self.pieces(off, buf.len() as u64).peekable();
        let mut read = Vec::new();
        while let Some((c, within, n, at)) = pieces.next() {
            match self.read_run(c, within, n, at, &mut pieces, buf, true) {
                Ok(Some(run)) => read.push((c, run)),
                Ok(None) => return None,
                Err(e) => return Some(Err(e)),
            }
        }
        for (c, run) in read {
            for k in 0..run {
                self.v.profile.record(c + k);
            }
        }
        Some(Ok(()))
    }

    /// Read the piece of chunk `c`; when the next chunks of the request
    /// follow it in the data file, read them with the same pread. Returns
    /// the number of chunks read. With `nowait`, `None` when the read would
    /// wait for the disk or a fetch. Tried first without a lock
    /// ([`crate::fastmap`]), then under the shard locks.
    #[allow(clippy::too_many_arguments)]
    fn read_run(
        &self,
        c: u64,
        within: u64,
        n: usize,
        at: usize,
        pieces: &mut std::iter::Peekable<impl Iterator<Item = (u64, u64, usize, usize)>>,
        buf: &mut [u8],
        nowait: bool,
    ) -> Result<Option<u64>> {
        let fast = self.v.fast.load(c);
        let phys = match fast.fast() {
            Fast::Data(p) => p,
            Fast::Zeroes => {
                buf[at..at + n].fill(0);
                return Ok(Some(1));
            }
            Fast::Hole if !self.v.lazy.is_lazy() => {
                buf[at..at + n].fill(0);
                return Ok(Some(1));
            }
            Fast::Hole if nowait => return Ok(None),
            Fast::Hole | Fast::Slow => {
                return self.read_run_locked(c, within, n, at, pieces, buf, nowait);
            }
        };
        let mut words = [fast; MAX_RUN as usize];
        let mut lens = [n; MAX_RUN as usize];
        let mut len = n;
        let mut k = 1u64;
        while k < MAX_RUN {
            let Some(&(c2, 0, n2, _)) = pieces.peek() else {
                break;
            };
            let w = self.v.fast.load(c2);
            if w.fast() != Fast::Data(phys + k) {
                break;
            }
            words[k as usize] = w;
            lens[k as usize] = n2;
            len += n2;
            k += 1;
            pieces.next();
        }
        #[cfg(test)]
        tests::pause();
        let dst = &mut buf[at..at + len];
        let read = if nowait {
            match self.sh.pread_nowait(phys, within, dst) {
                Some(r) => r,
                None => return Ok(None),
            }
        } else {
            self.sh.pread(phys, within, dst)
        };
        // The pread's loads come before the second look at the words.
        std::sync::atomic::fence(Ordering::Acquire);
        let same = |i: u64| self.v.fast.load(c + i) == words[i as usize];
        #[cfg(test)]
        if tests::skip_check() {
            return read.map(|()| Some(k));
        }
        if (0..k).all(same) {
            return read.map(|()| Some(k));
        }
        // A chunk changed during the pread (and may have been reused): read
        // the run again, chunk by chunk, under the shard locks.
        let mut at_i = at;
        for i in 0..k {
            let (w, n_i) = if i == 0 {
                (within, n)
            } else {
                (0, lens[i as usize])
            };
            let none = &mut std::iter::empty().peekable();
            if self
                .read_run_locked(c + i, w, n_i, at_i, none, buf, nowait)?
                .is_none()
            {
                return Ok(None);
            }
            at_i += n_i;
        }
        Ok(Some(k))
    }

    /// [`Volume::read_run`] under the shard locks: the first shard's read
    /// lock is held during the pread (so its chunk cannot be freed and
    /// reused under the reader); further shards are only *tried* (never
    /// waited for), so holding several read locks cannot deadlock.
    #[allow(clippy::too_many_arguments)]
    fn read_run_locked(
        &self,
        c: u64,
        within: u64,
        n: usize,
        at: usize,
        pieces: &mut std::iter::Peekable<impl Iterator<Item = (u64, u64, usize, usize)>>,
        buf: &mut [u8],
        nowait: bool,
    ) -> Result<Option<u64>> {
        loop {
            {
                let first = self.v.shard(c).read().unwrap_or_else(|e| e.into_inner());
                match first.get(&c).copied() {
                    Some(s) if s.phys != ZERO => {
                        let mut guards = Vec::new();
                        let mut len = n;
                        let mut k = 1u64;
                        while k < MAX_RUN {
                            let Some(&(c2, 0, n2, _)) = pieces.peek() else {
                                break;
                            };
                            let Ok(g) = self.v.shard(c2).try_read() else {
                                break;
                            };
                            if g.get(&c2).is_none_or(|s2| s2.phys != s.phys + k) {
                                break;
                            }
                            guards.push(g);
                            len += n2;
                            k += 1;
                            pieces.next();
                        }
                        let dst = &mut buf[at..at + len];
                        if nowait {
                            return match self.sh.pread_nowait(s.phys, within, dst) {
                                Some(r) => r.map(|()| Some(k)),
                                None => Ok(None),
                            };
                        }
                        self.sh.pread(s.phys, within, dst)?;
                        return Ok(Some(k));
                    }
                    Some(_) => {
                        buf[at..at + n].fill(0);
                        return Ok(Some(1));
                    }
                    None if !self.v.lazy.is_lazy() => {
                        buf[at..at + n].fill(0);
                        return Ok(Some(1));
                    }
                    None if nowait => return Ok(None),
                    None => {}
                }
            }
            self.fetch(c)?;
        }
    }

    /// Write `data` at `off`. Durable after the next [`Volume::flush`].
    pub fn write_at(&self, off: u64, data: &[u8]) -> Result<()> {
        self.write(off, data, false)
    }

    /// [`Volume::write_at`] for bulk fills whose data is not read back
    /// soon (a restore): whole chunks go straight to the disk (`O_DIRECT`),
    /// bypassing the page cache, when `data` is aligned in memory to
    /// [`crate::DIRECT_ALIGN`] bytes (so is `off`, a whole chunk); new
    /// chunks are allocated in the data file first so several threads can
    /// write at once. Partial chunks, unaligned buffers and file systems
    /// without direct I/O take the ordinary path. Same guarantees as
    /// `write_at`: durable after the next flush, and a process killed after
    /// the call returned loses nothing (the data is on the device).
    pub fn write_direct(&self, off: u64, data: &[u8]) -> Result<()> {
        self.write(off, data, true)
    }

    /// The same write as [`Volume::write_at`], only when it waits for
    /// nothing: every chunk it touches is this volume's own allocated chunk
    /// that no snapshot sees (an overwrite in place) or is written whole
    /// (into new space, as [`Volume::write_at`] would: allocating and
    /// staging the mapping are in memory and the page cache), and no lock
    /// it needs is held by another writer or a snapshot. `None` (nothing
    /// written) means "call `write_at` where blocking is fine": a partial
    /// chunk that needs new space (a copy on write, a fetch) or a pool at
    /// its limit. Lets an async server answer writes without a thread hop.
    pub fn try_write_at(&self, off: u64, data: &[u8]) -> Option<Result<()>> {
        self.try_write_planned(off, data.len(), |phys, within, at, n| {
            self.sh.pwrite(phys, within, &data[at..at + n])
        })
    }

    /// [`Volume::try_write_at`] of `len` bytes that `fill(data file,
    /// offset, n)` moves into the data file, run by run in order (an NBD
    /// server splices them from a pipe: the kernel copies them once, from
    /// the socket's pages into the page cache). The chunks stay locked
    /// while `fill` runs. `None`: `fill` was not called.
    pub fn try_write_spliced(
        &self,
        off: u64,
        len: usize,
        fill: &mut Fill<'_>,
    ) -> Option<Result<()>> {
        self.try_write_planned(off, len, |phys, within, _, n| {
            self.sh.write_with(phys, within, n, fill)
        })
    }

    /// The write of [`Volume::try_write_at`] (`len` bytes at `off`) if it
    /// waits for nothing: planned first — every chunk's lock taken, new
    /// space allocated — so that a decline writes nothing; then
    /// `put(phys, within, at, n)` writes bytes `at..at + n` of the request
    /// at `within` in physical chunk `phys` and the chunks after it, for
    /// each run of chunks that follow each other in the data file, and new
    /// chunks are mapped once written.
    fn try_write_planned(
        &self,
        off: u64,
        len: usize,
        mut put: impl FnMut(u64, u64, usize, usize) -> Result<()>,
    ) -> Option<Result<()>> {
        if let Err(e) = self.check("write", off, len as u64) {
            return Some(Err(e));
        }
        let st = self.v.state.try_read().ok()?;
        if st.deleted {
            return None;
        }
        let cs = self.sh.chunk;
        let mut held = Vec::new();
        let mut plan: Vec<Run> = Vec::new();
        for (c, within, n, at) in self.pieces(off, len as u64) {
            // Two chunks of one request on one lock stripe: the second try
            // fails and the write takes the blocking path.
            held.push(self.v.chunk_lock(c).try_lock().ok()?);
            let slot = self.v.get(c);
            match (slot, plan.last_mut()) {
                (Some(s), last) if st.in_place(s) => {
                    // Chunks that follow each other in the data file too are
                    // written at once (in `pwrite`'s pieces): a 1 MiB write
                    // was 16 pwrites, each taking the file's lock. Pieces are
                    // consecutive, so a run so far ends where this chunk
                    // starts: it continues when this chunk is the one after
                    // the run's last in the file.
                    match last {
                        Some(r)
                            if r.new.is_empty()
                                && s.phys == r.phys + (r.within + r.n as u64) / cs =>
                        {
                            r.n += n
                        }
                        _ => plan.push(Run {
                            phys: s.phys,
                            within,
                            at,
                            n,
                            first: c,
                            new: Vec::new(),
                        }),
                    }
                }
                (_, last) if within == 0 && n as u64 == cs => match last {
                    Some(r) if !r.new.is_empty() && (r.new.len() as u64) < MAX_RUN => {
                        r.n += n;
                        r.new.push(slot);
                    }
                    _ => plan.push(Run {
                        phys: ZERO,
                        within: 0,
                        at,
                        n,
                        first: c,
                        new: vec![slot],
                    }),
                },
                _ => return None,
            }
        }
        // New space for the whole chunks, every run in one piece of the
        // data file, or nothing written.
        let name = &self.v.name;
        for i in 0..plan.len() {
            let k = plan[i].new.len() as u64;
            if k == 0 {
                continue;
            }
            let c = plan[i].first;
            match self.sh.allocate_run(k, &|| {
                format!("write chunks {c}..{} of volume {name}", c + k)
            }) {
                Ok((p, got)) if got == k => plan[i].phys = p,
                got => {
                    if let Ok((p, got)) = got {
                        (0..got).for_each(|j| self.sh.unallocate(p + j));
                    }
                    self.unallocate_runs(&plan[..i]);
                    return None;
                }
            }
        }
        let mut result = Ok(());
        for (i, r) in plan.iter().enumerate() {
            result = put(r.phys, r.within, r.at, r.n);
            // Every new chunk of a run written is mapped even when staging
            // one fails (memory and metadata must agree); the first error
            // fails the write.
            if result.is_ok() {
                for (j, old) in (0..).zip(&r.new) {
                    let new = Slot {
                        phys: r.phys + j,
                        epoch: st.epoch,
                        own: true,
                    };
                    let staged = self.install(&st, r.first + j, *old, new);
                    if result.is_ok() {
                        result = staged;
                    }
                }
            } else {
                self.unallocate_runs(&plan[i..=i]);
            }
            if result.is_err() {
                self.unallocate_runs(&plan[i + 1..]);
                break;
            }
        }
        self.sh.write_gen.fetch_add(1, Ordering::SeqCst);
        drop(held);
        Some(result)
    }

    /// Gives back the new chunks of runs planned but not written.
    fn unallocate_runs(&self, runs: &[Run]) {
        for r in runs.iter().filter(|r| !r.new.is_empty()) {
            (0..r.new.len() as u64).for_each(|j| self.sh.unallocate(r.phys + j));
        }
    }

    fn write(&self, off: u64, data: &[u8], direct: bool) -> Result<()> {
        self.check("write", off, data.len() as u64)?;
        let st = self.v.read_state();
        if st.deleted {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("write on volume {}: volume was deleted", self.v.name),
            ));
        }
        let result = (|| {
            let mut pieces = self.pieces(off, data.len() as u64).peekable();
            while let Some((c, within, n, at)) = pieces.next() {
                let _g = lock(self.v.chunk_lock(c));
                let slot = self.v.get(c);
                match slot {
                    Some(s) if st.in_place(s) => {
                        // In place; the following chunks too while they
                        // follow in the data file (their locks only tried).
                        let mut locks = Vec::new();
                        let mut len = n;
                        let mut k = 1u64;
                        while k < MAX_RUN {
                            let Some(&(c2, 0, n2, _)) = pieces.peek() else {
                                break;
                            };
                            let Ok(g) = self.v.chunk_lock(c2).try_lock() else {
                                break;
                            };
                            if !self
                                .v
                                .get(c2)
                                .is_some_and(|s2| st.in_place(s2) && s2.phys == s.phys + k)
                            {
                                break;
                            }
                            locks.push(g);
                            len += n2;
                            k += 1;
                            pieces.next();
                        }
                        if direct && within == 0 {
                            self.sh.pwrite_direct(s.phys, &data[at..at + len], false)?;
                        } else {
                            self.sh.pwrite(s.phys, within, &data[at..at + len])?;
                        }
                    }
                    _ if within == 0
                        && n as u64 == self.sh.chunk
                        && pieces.peek().is_some_and(|&(_, w2, n2, _)| {
                            w2 == 0 && n2 as u64 == self.sh.chunk
                        }) =>
                    {
                        self.write_new_run(&st, c, slot, at, &mut pieces, data, direct)?
                    }
                    _ => self.write_chunk_locked(&st, c, within, &data[at..at + n])?,
                }
            }
            Ok(())
        })();
        self.sh.write_gen.fetch_add(1, Ordering::SeqCst);
        result
    }

    /// Write whole chunk `c` (not writable in place; its lock held by the
    /// caller) and the following whole chunks of the request that need new
    /// space too, into a run of chunks that follow each other in the data
    /// file: one pwrite, and the page cache keeps the run in large folios,
    /// which later reads walk faster. Further chunk locks are only tried.
    #[allow(clippy::too_many_arguments)]
    fn write_new_run(
        &self,
        st: &VolState,
        c: u64,
        slot: Option<Slot>,
        at: usize,
        pieces: &mut std::iter::Peekable<impl Iterator<Item = (u64, u64, usize, usize)>>,
        data: &[u8],
        direct: bool,
    ) -> Result<()> {
        let cs = self.sh.chunk;
        let mut olds = vec![slot];
        let mut locks = Vec::new();
        let max = if direct { MAX_DIRECT_RUN } else { MAX_RUN };
        while (olds.len() as u64) < max {
            let Some(&(c2, 0, n2, _)) = pieces.peek() else {
                break;
            };
            if n2 as u64 != cs {
                break;
            }
            let Ok(g) = self.v.chunk_lock(c2).try_lock() else {
                break;
            };
            let s2 = self.v.get(c2);
            if s2.is_some_and(|s2| st.in_place(s2)) {
                // Writable in place: left to the caller's loop.
                break;
            }
            locks.push(g);
            olds.push(s2);
            pieces.next();
        }
        let k = olds.len() as u64;
        let name = &self.v.name;
        let (p, got) = self.sh.allocate_run(k, &|| {
            format!("write chunks {c}..{} of volume {name}", c + k)
        })?;
        let bytes = (got * cs) as usize;
        let run = &data[at..at + bytes];
        let written = if direct {
            self.sh.pwrite_direct(p, run, true)
        } else {
            self.sh.pwrite(p, 0, run)
        };
        if let Err(e) = written {
            for i in 0..got {
                self.sh.unallocate(p + i);
            }
            return Err(e);
        }
        // Every chunk is installed even when staging one fails (memory
        // and metadata must agree); the first error fails the write.
        let mut staged = Ok(());
        for (i, old) in (0..got).zip(&olds) {
            let r = self.install(
                st,
                c + i,
                *old,
                Slot {
                    phys: p + i,
                    epoch: st.epoch,
                    own: true,
                },
            );
            if staged.is_ok() {
                staged = r;
            }
        }
        staged?;
        // Chunks the allocator could not fit in the run (pool limit): one
        // at a time, which fails cleanly with NoSpace when nothing is left.
        for i in got..k {
            let off = at + (i * cs) as usize;
            self.write_chunk_locked(st, c + i, 0, &data[off..off + cs as usize])?;
        }
        Ok(())
    }

    fn write_chunk_locked(&self, st: &VolState, c: u64, within: u64, data: &[u8]) -> Result<()> {
        let cs = self.sh.chunk;
        let full = within == 0 && data.len() as u64 == cs;
        let mut slot = self.v.get(c);
        match slot {
            Some(s) if st.in_place(s) => {
                return self.sh.pwrite(s.phys, within, data);
            }
            None if !full && self.v.lazy.is_lazy() => {
                self.fetch_locked(c, st.epoch)?;
                slot = self.v.get(c);
                if let Some(s) = slot.filter(|s| st.in_place(*s)) {
                    return self.sh.pwrite(s.phys, within, data);
                }
            }
            _ => {}
        }
        let name = &self.v.name;
        let p = self
            .sh
            .allocate(&|| format!("write chunk {c} of volume {name}"))?;
        let written = if full {
            self.sh.pwrite(p, 0, data)
        } else {
            let mut buf = vec![0u8; cs as usize];
            let copied = match slot {
                Some(s) if s.phys != ZERO => self.sh.pread(s.phys, 0, &mut buf),
                _ => Ok(()),
            };
            copied.and_then(|()| {
                buf[within as usize..within as usize + data.len()].copy_from_slice(data);
                self.sh.pwrite(p, 0, &buf)
            })
        };
        if let Err(e) = written {
            self.sh.unallocate(p);
            return Err(e);
        }
        self.install(
            st,
            c,
            slot,
            Slot {
                phys: p,
                epoch: st.epoch,
                own: true,
            },
        )
    }

    /// Replace chunk `c`'s slot by `new` and stage the metadata change;
    /// an old entry no snapshot sees is removed and its chunk freed once the
    /// change is durable.
    pub(crate) fn install(
        &self,
        st: &VolState,
        c: u64,
        old: Option<Slot>,
        new: Slot,
    ) -> Result<()> {
        self.v.set_slot(c, Some(new));
        let id = self.v.id;
        let mut freed = None;
        if let Some(o) = old
            && o.own
            && st.exclusive(o.epoch)
        {
            if o.epoch != new.epoch {
                self.sh.stage((id, c, o.epoch), None, Some(o.phys))?;
            } else {
                freed = Some(o.phys);
            }
        }
        self.sh.stage((id, c, new.epoch), Some(new.phys), freed)
    }

    /// Discard `[off, off+len)`: whole chunks are freed, partial ones zeroed.
    /// Reads of the range return zeroes.
    pub fn trim(&self, off: u64, len: u64) -> Result<()> {
        self.zero_range("trim", off, len, false)
    }

    /// Write zeroes to `[off, off+len)`. Without `no_hole` whole chunks are
    /// released (they read as zeroes); with it they stay allocated.
    pub fn write_zeroes(&self, off: u64, len: u64, no_hole: bool) -> Result<()> {
        self.zero_range("write-zeroes", off, len, no_hole)
    }

    fn zero_range(&self, op: &str, off: u64, len: u64, no_hole: bool) -> Result<()> {
        self.check(op, off, len)?;
        let st = self.v.read_state();
        let cs = self.sh.chunk;
        let zeroes = vec![0u8; cs as usize];
        let result = (|| {
            for (c, within, n, _) in self.pieces(off, len) {
                let _g = lock(self.v.chunk_lock(c));
                if no_hole || (n as u64) < cs {
                    let slot = self.v.get(c);
                    let reads_zero = match slot {
                        None => !self.v.lazy.is_lazy(),
                        Some(s) => s.phys == ZERO,
                    };
                    if reads_zero && !no_hole {
                        continue;
                    }
                    self.write_chunk_locked(&st, c, within, &zeroes[..n])?;
                } else {
                    self.trim_chunk_locked(&st, c)?;
                }
            }
            Ok(())
        })();
        self.sh.write_gen.fetch_add(1, Ordering::SeqCst);
        result
    }

    fn trim_chunk_locked(&self, st: &VolState, c: u64) -> Result<()> {
        let slot = self.v.get(c);
        let lazy = self.v.lazy.is_lazy();
        match slot {
            None if !lazy => {}
            Some(s) if s.phys == ZERO && s.own && s.epoch == st.epoch => {}
            Some(s) if s.own && st.snaps.is_empty() && st.parent.is_none() && !lazy => {
                // The chunk's only entry: drop it, the chunk is a hole again.
                self.v.set_slot(c, None);
                self.sh.stage((self.v.id, c, s.epoch), None, Some(s.phys))?;
            }
            _ => self.install(
                st,
                c,
                slot,
                Slot {
                    phys: ZERO,
                    epoch: st.epoch,
                    own: true,
                },
            )?,
        }
        Ok(())
    }

    /// What `[off, off+len)` holds, as merged extents.
    pub fn allocation(&self, off: u64, len: u64) -> Result<Vec<Extent>> {
        self.check("allocation", off, len)?;
        let lazy = self.v.lazy.is_lazy();
        let mut out: Vec<Extent> = Vec::new();
        let cs = self.sh.chunk;
        for (c, within, n, _) in self.pieces(off, len) {
            let kind = match self.v.get(c) {
                None if lazy => ExtentKind::Data,
                None => ExtentKind::Hole,
                Some(s) if s.phys == ZERO => ExtentKind::Zero,
                Some(_) => ExtentKind::Data,
            };
            let offset = c * cs + within;
            match out.last_mut() {
                Some(l) if l.kind == kind && l.offset + l.length == offset => l.length += n as u64,
                _ => out.push(Extent {
                    offset,
                    length: n as u64,
                    kind,
                }),
            }
        }
        Ok(out)
    }

    /// Make every write acknowledged before this call durable (group commit
    /// with every other volume of the pool).
    pub fn flush(&self) -> Result<()> {
        self.sh.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Pool, PoolOptions};
    use std::sync::atomic::AtomicBool;

    const CS: u64 = 4096;
    /// Reads pause 2 ms between look-up and pread (set by one test).
    static PAUSE: AtomicBool = AtomicBool::new(false);

    pub(super) fn pause() {
        if PAUSE.load(Ordering::Relaxed) {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// With FERRY_TEST_SKIP_CHECK set, reads trust the words they loaded
    /// first (to see the test below fail without the check).
    pub(super) fn skip_check() -> bool {
        std::env::var_os("FERRY_TEST_SKIP_CHECK").is_some()
    }

    fn pool(dir: &tempfile::TempDir) -> Pool {
        Pool::create(
            dir.path().join("p"),
            PoolOptions {
                chunk_size: CS as u32,
                limit_bytes: None,
            },
        )
        .unwrap()
    }

    #[test]
    fn reads_never_see_a_chunk_reused_by_another_volume() {
        PAUSE.store(true, Ordering::Relaxed);
        // Reads look chunks up without a lock (fastmap): a chunk freed and
        // reused by another volume during a read must never show through. The
        // reads pause between the look-up and the pread (in this test only, a
        // stand-in for the reader being preempted there), so the chunks change
        // under them often.
        // Volume A's bytes are 0xa0..=0xaf or zeroes (trimmed), B's 0xb0..=0xbf;
        // both are trimmed, flushed (which makes freed chunks reusable) and
        // rewritten without pause while readers read A.
        const N: u64 = 16;
        let dir = tempfile::tempdir().unwrap();
        let p = pool(&dir);
        let a = p.create_volume("a", N * CS).unwrap();
        let b = p.create_volume("b", N * CS).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let churn = |v: Volume, base: u8, stop: Arc<AtomicBool>| {
            std::thread::spawn(move || {
                let mut round = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let val = base | (round % 16) as u8;
                    v.write_at(0, &vec![val; (N * CS) as usize]).unwrap();
                    v.flush().unwrap();
                    v.trim(0, N * CS).unwrap();
                    v.flush().unwrap();
                    round += 1;
                }
                round
            })
        };
        let wa = churn(a.clone(), 0xa0, stop.clone());
        let wb = churn(b.clone(), 0xb0, stop.clone());
        let readers: Vec<_> = (0..2)
            .map(|r| {
                let a = a.clone();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; (N * CS) as usize];
                    let mut reads = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let len = if r == 0 { buf.len() } else { CS as usize };
                        let off = if r == 0 { 0 } else { (reads % N) * CS };
                        a.read_at(off, &mut buf[..len]).unwrap();
                        if let Some(bad) =
                            buf[..len].iter().position(|&x| x != 0 && x & 0xf0 != 0xa0)
                        {
                            panic!("read of a at {off} saw byte {:#x} at {bad}", buf[bad]);
                        }
                        reads += 1;
                    }
                    reads
                })
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_secs(3));
        stop.store(true, Ordering::Relaxed);
        let rounds = (wa.join().unwrap(), wb.join().unwrap());
        let reads: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
        assert!(
            rounds.0 > 10 && rounds.1 > 10 && reads > 100,
            "{rounds:?} {reads}"
        );
        assert_eq!(p.verify().unwrap(), Vec::<String>::new());
    }
}
