//! The backend trait the server serves, and what it answers.
//!
//! The calls are synchronous and take byte ranges, as a thin-provisioned
//! pool volume naturally offers them. The server runs them on tokio's
//! blocking pool, except the `try_*` calls, which a backend answers only
//! when it can do so without blocking (page cache hit, memory) and which
//! the server then runs inline, saving two thread hops per request.

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One run of blocks with the same state in a metadata context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    /// For `base:allocation`: [`STATE_HOLE`](crate::proto::STATE_HOLE) |
    /// [`STATE_ZERO`](crate::proto::STATE_ZERO); for `ferry:changed:<snap>`:
    /// [`STATE_CHANGED`](crate::proto::STATE_CHANGED).
    pub flags: u32,
}

/// Block size constraints advertised by `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

impl Default for BlockSize {
    fn default() -> Self {
        BlockSize {
            minimum: 1,
            preferred: 4096,
            maximum: crate::proto::MAX_PAYLOAD,
        }
    }
}

/// A read's bytes where they already lie in memory: places in a file the
/// backend mapped read-only. Over plain TCP and unix sockets the server
/// sends them from there (see [`crate::wire`]), a copy fewer than reading
/// them into a buffer first.
pub struct Mapped {
    ranges: Vec<(usize, usize)>,
    _keep: Box<dyn Send + Sync>,
}

impl Mapped {
    /// `ranges`: (address, length) of each piece of the read, in order;
    /// `keep` holds what keeps them valid, until the reply is sent.
    ///
    /// # Safety
    /// While `keep` lives, every range must stay mapped and readable, and
    /// the backend must keep other data (another disk's) from being
    /// written there: the server passes the addresses to `send(2)` and
    /// only the kernel reads them. Writes of the read's own disk may
    /// happen meanwhile; a read running beside a write may show them.
    pub unsafe fn new(ranges: Vec<(usize, usize)>, keep: Box<dyn Send + Sync>) -> Mapped {
        Mapped {
            ranges,
            _keep: keep,
        }
    }

    pub(crate) fn ranges(&self) -> &[(usize, usize)] {
        &self.ranges
    }

    /// Whether every page is in the page cache now (`mincore`), so that
    /// sending will not wait for the disk.
    pub fn resident(&self) -> bool {
        let page = crate::wire::page_size();
        let mut vec = Vec::new();
        self.ranges.iter().all(|&(addr, len)| {
            let start = addr - addr % page;
            let span = addr + len - start;
            vec.clear();
            vec.resize(span.div_ceil(page), 0u8);
            // SAFETY: `[start, start + span)` is the range rounded out to
            // whole pages, inside the mapping (mappings start and end on
            // pages) that `keep` holds; `vec` has one byte per page.
            // mincore reports residency; it reads no mapped memory.
            let r = unsafe { libc::mincore(start as *mut libc::c_void, span, vec.as_mut_ptr()) };
            r == 0 && vec.iter().all(|v| v & 1 == 1)
        })
    }

    /// Bytes in all.
    pub fn len(&self) -> usize {
        self.ranges.iter().map(|r| r.1).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Moves the next `n` bytes of a spliced write into a file at an offset
/// ([`Export::try_write_spliced`]).
pub type Fill<'a> = dyn FnMut(BorrowedFd<'_>, u64, usize) -> io::Result<()> + 'a;

/// A disk the server exports. Ranges passed in are always within `size()`:
/// the server checks them first.
pub trait Export: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// A read-only export answers writes with EPERM.
    fn read_only(&self) -> bool {
        false
    }

    /// True when a flush on any connection makes durable every write
    /// completed on any connection (one shared file or volume).
    fn can_multi_conn(&self) -> bool;

    fn block_size(&self) -> BlockSize {
        BlockSize::default()
    }

    /// Reads exactly `buf.len()` bytes at `offset`; may block.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// The same read, only if it can be done without blocking; `None` means
    /// "would block, call `read_at` on a blocking thread".
    fn try_read_at(&self, _offset: u64, _buf: &mut [u8]) -> Option<io::Result<()>> {
        None
    }

    /// The read of `[offset, offset + len)` as mapped memory the server
    /// may send from (see [`Mapped`]), only when every page of it is in
    /// memory ([`Mapped::resident`]); `None`: read it with `try_read_at` or
    /// `read_at`. Must not block.
    fn try_read_mapped(&self, _offset: u64, _len: u64) -> Option<Mapped> {
        None
    }
    /// Writes all of `data` at `offset`; with `fua`, durable on return.
    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()>;

    /// The same write, only if it can be done without blocking.
    fn try_write_at(&self, _offset: u64, _data: &[u8], _fua: bool) -> Option<io::Result<()>> {
        None
    }

    /// Whether the backend takes writes through [`Export::try_write_spliced`].
    fn splice_writes(&self) -> bool {
        false
    }

    /// A write of `len` bytes at `offset` (not FUA) whose bytes wait in the
    /// server's pipe, on the terms of [`Export::try_write_at`]: the backend
    /// calls `fill(fd, at, n)` for each run of its file the range maps to,
    /// in order, and `fill` moves the next `n` bytes of the write into `fd`
    /// at `at` (the kernel copies them from the pipe into the page cache:
    /// one copy, where receiving into a buffer and writing it makes two).
    /// `None`, returned only before `fill` was called, means "not without
    /// blocking": the server then reads the bytes out of the pipe.
    fn try_write_spliced(
        &self,
        _offset: u64,
        _len: usize,
        _fill: &mut Fill<'_>,
    ) -> Option<io::Result<()>> {
        None
    }

    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;

    /// Discards a range (reads may then return anything; ours return zeroes).
    fn trim(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Writes zeroes. `may_punch`: a hole is allowed. `fast_only`: fail with
    /// `io::ErrorKind::Unsupported` rather than write zeroes slowly.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
        fast_only: bool,
    ) -> io::Result<()>;

    /// Whether `write_zeroes(.., fast_only = true)` can ever succeed.
    fn can_fast_zero(&self) -> bool {
        false
    }

    /// Names of the metadata contexts beyond `base:allocation`, such as
    /// `ferry:changed:<snapshot>`.
    fn meta_contexts(&self) -> Vec<String> {
        Vec::new()
    }

    /// The same block status, only if it can be answered without blocking
    /// (an in-memory map); `None` means "call `block_status` on a blocking thread".
    fn try_block_status(
        &self,
        _context: &str,
        _offset: u64,
        _len: u64,
    ) -> Option<io::Result<Vec<Extent>>> {
        None
    }

    /// Extents covering `[offset, offset + len)` (the last may end early;
    /// the server asks again or returns what it has) in `context`.
    fn block_status(&self, context: &str, offset: u64, len: u64) -> io::Result<Vec<Extent>>;
}

/// Wraps an export so that it is read-only whatever the backend says.
pub struct ReadOnly<E>(pub E);

impl<E: Export> Export for ReadOnly<E> {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_only(&self) -> bool {
        true
    }
    fn can_multi_conn(&self) -> bool {
        true
    }
    fn block_size(&self) -> BlockSize {
        self.0.block_size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.read_at(offset, buf)
    }
    fn try_read_at(&self, offset: u64, buf: &mut [u8]) -> Option<io::Result<()>> {
        self.0.try_read_at(offset, buf)
    }
    fn try_read_mapped(&self, offset: u64, len: u64) -> Option<Mapped> {
        self.0.try_read_mapped(offset, len)
    }
    fn write_at(&self, _: u64, _: &[u8], _: bool) -> io::Result<()> {
        Err(io::ErrorKind::PermissionDenied.into())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn trim(&self, _: u64, _: u64) -> io::Result<()> {
        Err(io::ErrorKind::PermissionDenied.into())
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool) -> io::Result<()> {
        Err(io::ErrorKind::PermissionDenied.into())
    }
    fn meta_contexts(&self) -> Vec<String> {
        self.0.meta_contexts()
    }
    fn try_block_status(
        &self,
        context: &str,
        offset: u64,
        len: u64,
    ) -> Option<io::Result<Vec<Extent>>> {
        self.0.try_block_status(context, offset, len)
    }
    fn block_status(&self, context: &str, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.0.block_status(context, offset, len)
    }
}

/// The NBD error number for a backend error.
pub fn nbd_errno(e: &io::Error) -> u32 {
    use crate::proto::*;
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => return EPERM,
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => return ENOSPC,
        Some(libc::EINVAL) => return EINVAL,
        Some(libc::ENOMEM) => return ENOMEM,
        Some(libc::EOPNOTSUPP) => return ENOTSUP,
        Some(_) => return EIO,
        None => {}
    }
    match e.kind() {
        io::ErrorKind::PermissionDenied => EPERM,
        io::ErrorKind::InvalidInput => EINVAL,
        io::ErrorKind::Unsupported => ENOTSUP,
        io::ErrorKind::OutOfMemory => ENOMEM,
        io::ErrorKind::StorageFull | io::ErrorKind::FileTooLarge => ENOSPC,
        _ => EIO,
    }
}

/// When a backend runs a write that may block — a buffered write into the
/// page cache, which the kernel throttles when too much is dirty — on the
/// connection's task: a short write takes microseconds there and saves two
/// thread hops. Writes up to [`InlineWrites::MAX`] (2 MiB) qualify: a
/// payload just received is in this core's cache, while another thread
/// would fetch it from this core's (its copy into the page cache then took
/// 56 % of the server's time instead of 11–28 %) after a cross-core
/// wake-up. 1 MiB writes over TCP ran at 0.70× nbdkit's rate with 64 KiB
/// as the limit, 0.93× with 2 MiB (BENCHMARKS.md, nbd, session 10). One
/// that took long *and slept* (the thread gave the CPU up
/// itself: throttling, waiting on write-back or a lock) stops inline
/// writes for a while, so that writes sleep in parallel on blocking
/// threads instead of one after the other. A write that was only preempted
/// (a busy machine) does not.
pub struct InlineWrites {
    /// Time base of `from`.
    opened: Instant,
    /// Nanoseconds after `opened` before which no write runs inline.
    from: AtomicU64,
}

impl InlineWrites {
    /// Longest write run inline.
    pub const MAX: usize = 2 << 20;
    /// An inline write slower than this pauses inline writes...
    const SLOW: Duration = Duration::from_micros(500);
    /// ...for this long (plus its own duration).
    const PAUSE: Duration = Duration::from_secs(1);

    pub fn new() -> Self {
        InlineWrites {
            opened: Instant::now(),
            from: AtomicU64::new(0),
        }
    }

    /// Runs `write` (of `len` bytes) here when it is short and no inline
    /// write was slow lately; `None` without running it otherwise, or when
    /// `write` itself declines.
    pub fn run<T>(&self, len: usize, write: impl FnOnce() -> Option<T>) -> Option<T> {
        if len > Self::MAX {
            return None;
        }
        let t0 = Instant::now();
        let now = t0.duration_since(self.opened).as_nanos() as u64;
        if now < self.from.load(Ordering::Relaxed) {
            return None;
        }
        let slept = voluntary_switches();
        let r = write();
        let took = t0.elapsed();
        if took > Self::SLOW && (slept.is_none() || voluntary_switches() != slept) {
            let until = now + (took + Self::PAUSE).as_nanos() as u64;
            self.from.store(until, Ordering::Relaxed);
        }
        r
    }
}

/// How often the calling thread gave up the CPU itself (slept), or `None`.
fn voluntary_switches() -> Option<i64> {
    // SAFETY: `rusage` is plain integers, for which all zeroes is valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the `rusage` it is given, borrowed mutably
    // for the call; RUSAGE_THREAD is valid on Linux.
    let r = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    (r == 0).then_some(ru.ru_nvcsw)
}

impl Default for InlineWrites {
    fn default() -> Self {
        Self::new()
    }
}
