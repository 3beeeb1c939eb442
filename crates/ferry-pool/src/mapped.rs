//! Reads handed out as places in the data file mapped into memory, for a
//! server that sends them to a socket from there: one copy (page cache to
//! socket) instead of two (`pread` into a buffer, then send the buffer).
//!
//! The bytes must stay the volume's while they are sent. A chunk being
//! sent is *pinned*: a pinned chunk that gets freed (trim, delete, a
//! snapshot deleted) waits in limbo instead of becoming reusable, and is
//! free once its last pin is gone, so no other volume's data can be
//! written there under the send. The volume itself may still change the
//! chunk meanwhile (an overwrite in place, a trim punching it), which a
//! read running at the same time as a write may show anyway.
//!
//! A pin is taken after the chunk's word is read and before it is read
//! again; a chunk is freed only after its word changed (see
//! [`crate::fastmap`]), and pins and frees meet under the allocator's
//! lock, so either the free sees the pin or the reader sees the changed
//! word and gives up.
//!
//! The addresses are for system calls (`send`), in which the kernel
//! copies from the page cache and turns a fault into an error instead of
//! a signal. One exception reads the memory itself: a snapshot's read
//! whose pages are all cached ([`MappedRead::into_cached`]), which a VM
//! copy hashes and sends in place. Nothing writes a snapshot's chunks, so
//! its bytes cannot change under the reader while the snapshot exists,
//! and no fault needs the disk.

use std::sync::{Arc, PoisonError};

use memmap2::{MmapOptions, MmapRaw};

use crate::error::Ctx;
use crate::fastmap::Fast;
use crate::pool::{Shared, add_run, lock};
use crate::volume::Volume;

/// Mappings of the data file grow in steps of at least this much.
const MAP_STEP: u64 = 1 << 30;

/// A read whose bytes lie in the mapped data file; the chunks stay pinned
/// (and the mapping mapped) until it is dropped.
pub struct MappedRead {
    ranges: Vec<(usize, usize)>,
    pins: Pins,
    map: Arc<MmapRaw>,
    /// A snapshot's bytes: nothing writes its chunks while they are pinned.
    frozen: bool,
}

impl MappedRead {
    /// (address, length) of each piece of the read, in order. The memory
    /// is a shared read-only mapping of the data file: pass it to system
    /// calls only (another thread may write the file meanwhile), and only
    /// while `self` lives.
    pub fn ranges(&self) -> &[(usize, usize)] {
        &self.ranges
    }

    /// Reads the bytes into `buf` (as long as the read) with `pread`: for
    /// a read [`MappedRead::into_cached`] declined, without looking its
    /// chunks up again.
    pub fn read_into(&self, buf: &mut [u8]) -> crate::Result<()> {
        use std::os::unix::fs::FileExt;
        let (sh, base) = (&self.pins.0, self.map.as_ptr() as usize);
        let mut at = 0;
        for &(addr, n) in &self.ranges {
            let from = (addr - base) as u64;
            sh.data
                .read_exact_at(&mut buf[at..at + n], from)
                .ctx(|| format!("read data file of pool {} at {from}", sh.dir.display()))?;
            at += n;
        }
        Ok(())
    }

    /// The read as bytes to be read in place, for a snapshot's read whose
    /// pages are all in the page cache; `Err(self)` for a volume's read
    /// (its chunks may change under the reader) or when some page is not
    /// cached (a fault would then read the disk, and a disk error would
    /// raise `SIGBUS` instead of returning one: send the ranges, or read
    /// them with [`MappedRead::read_into`]).
    ///
    /// A page the kernel evicts between this check and the read is read
    /// again from the disk on the fault: only an I/O error in that moment
    /// can still end in `SIGBUS`.
    pub fn into_cached(self) -> Result<CachedRead, MappedRead> {
        if self.frozen && self.ranges.iter().all(|&(a, n)| resident(a, n)) {
            Ok(CachedRead(self))
        } else {
            Err(self)
        }
    }
}

/// A snapshot's read whose bytes are read in place (see
/// [`MappedRead::into_cached`]).
#[derive(Debug)]
pub struct CachedRead(MappedRead);

impl CachedRead {
    /// The bytes of each piece of the read, in order.
    pub fn pieces(&self) -> impl Iterator<Item = &[u8]> {
        self.0.ranges.iter().map(|&(a, n)| {
            // SAFETY: `[a, a + n)` lies in the read-only mapping kept alive
            // by `self`, inside the data file (which never shrinks), so it
            // stays readable while borrowed. It covers a snapshot's chunks
            // pinned by `self`: no write of the pool touches them while the
            // snapshot exists (its volume copies on write), and the pin
            // keeps them from being reused for other data. Only deleting
            // the snapshot meanwhile, which callers must not do while they
            // read it (as for `Snapshot::read_at`), would change them, and
            // then only to zeroes (freed chunks are punched out): any byte
            // is a valid `u8`, the reader sees wrong values, never another
            // volume's data.
            unsafe { std::slice::from_raw_parts(a as *const u8, n) }
        })
    }
}

/// Whether every page of `[addr, addr + len)` (mapped) is in the page cache.
fn resident(addr: usize, len: usize) -> bool {
    // SAFETY: sysconf has no memory arguments.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    let start = addr - addr % page;
    let end = (addr + len).next_multiple_of(page);
    let mut vec = vec![0u8; (end - start) / page];
    // SAFETY: `[start, end)` is page-aligned and mapped (inside the
    // caller's mapping); `vec` has one byte per page of it.
    let r = unsafe { libc::mincore(start as *mut libc::c_void, end - start, vec.as_mut_ptr()) };
    r == 0 && vec.iter().all(|b| b & 1 == 1)
}

impl std::fmt::Debug for MappedRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedRead")
            .field("ranges", &self.ranges.len())
            .field("pinned", &self.pins.1.len())
            .finish()
    }
}

/// Chunks pinned by one read: unpinned when dropped.
struct Pins(Arc<Shared>, Vec<u64>);

impl Drop for Pins {
    fn drop(&mut self) {
        self.0.unpin(&self.1);
    }
}

impl Shared {
    fn pin(&self, phys: &[u64]) {
        let mut a = lock(&self.alloc);
        for &p in phys {
            *a.pinned.entry(p).or_default() += 1;
        }
    }

    fn unpin(&self, phys: &[u64]) {
        let mut a = lock(&self.alloc);
        for &p in phys {
            let Some(n) = a.pinned.get_mut(&p) else {
                debug_assert!(false, "chunk {p} unpinned but not pinned");
                continue;
            };
            *n -= 1;
            if *n > 0 {
                continue;
            }
            a.pinned.remove(&p);
            if a.limbo.remove(&p) && a.free.insert(p) {
                a.used -= 1;
            }
        }
    }

    /// A mapping of the data file covering `[0, end)`.
    fn mapping(&self, end: u64) -> Option<Arc<MmapRaw>> {
        if let Some(m) = &*self.map.read().unwrap_or_else(PoisonError::into_inner)
            && m.len() as u64 >= end
        {
            return Some(m.clone());
        }
        let mut slot = self.map.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(m) = &*slot
            && m.len() as u64 >= end
        {
            return Some(m.clone());
        }
        // Beyond the file's end is mapped too (only data chunks, all
        // inside it, are ever sent from it): fewer mappings as it grows.
        let len = end.max(slot.as_ref().map_or(0, |m| m.len() as u64 * 2));
        let len = len.next_multiple_of(MAP_STEP);
        let m = MmapOptions::new()
            .len(usize::try_from(len).ok()?)
            .map_raw_read_only(&self.data)
            .ok()?;
        let m = Arc::new(m);
        // Readers still sending from the old mapping keep it alive.
        *slot = Some(m.clone());
        Some(m)
    }
}

impl Volume {
    /// The read of `[off, off + len)` as places in the mapped data file,
    /// when every chunk of it holds data; `None` otherwise (holes, zeroes,
    /// chunks not fetched yet, a deleted volume, a range out of bounds,
    /// no mapping), and the caller reads with [`Volume::read_at`]. The
    /// bytes may not be in the page cache: sending them may then wait for
    /// the disk.
    pub fn try_read_mapped(&self, off: u64, len: u64) -> Option<MappedRead> {
        if len == 0 || self.check("read", off, len).is_err() {
            return None;
        }
        let mut words = Vec::new();
        let mut pinned = Vec::new();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (c, within, n, _) in self.pieces(off, len) {
            let w = self.v.fast.load(c);
            let Fast::Data(p) = w.fast() else {
                return None;
            };
            words.push((c, w));
            pinned.push(p);
            add_run(&mut runs, self.sh.data_at(p) + within, n as u64);
        }
        let read = self.sh.mapped_read(pinned, &runs, false, || {
            words.iter().all(|&(c, w)| self.v.fast.load(c) == w)
        })?;
        for &(c, _) in &words {
            self.v.profile.record(c);
        }
        Some(read)
    }
}

impl Shared {
    /// The read of the data file's byte `runs` `[from, to)`, over chunks
    /// `pinned`: they are pinned, then `still` tells whether they are still
    /// the reader's (a chunk freed before its pin may have been reused).
    pub(crate) fn mapped_read(
        self: &Arc<Self>,
        pinned: Vec<u64>,
        runs: &[(u64, u64)],
        frozen: bool,
        still: impl FnOnce() -> bool,
    ) -> Option<MappedRead> {
        self.pin(&pinned);
        let pins = Pins(self.clone(), pinned);
        if !still() {
            return None;
        }
        let end = runs.iter().map(|r| r.1).max()?;
        let map = self.mapping(end)?;
        let base = map.as_ptr() as usize;
        Some(MappedRead {
            ranges: runs
                .iter()
                .map(|&(from, to)| (base + from as usize, (to - from) as usize))
                .collect(),
            pins,
            map,
            frozen,
        })
    }
}
