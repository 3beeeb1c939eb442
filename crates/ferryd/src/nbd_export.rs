//! The glue between the pool and the NBD server: a pool volume (read-write)
//! or snapshot (read-only) seen as an `ferry_nbd::Export`.
//!
//! Metadata contexts: `base:allocation` from the volume's allocation map,
//! and `ferry:changed:<snapshot>` for each snapshot of the volume — the
//! chunks written since that snapshot, from the pool's change tracking.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use ferry_nbd::export::{BlockSize, Export, Extent, Fill, InlineWrites, Mapped};
use ferry_nbd::proto::{STATE_CHANGED, STATE_HOLE, STATE_ZERO};
use ferry_pool::{ErrorKind, ExtentKind, Pool, Snapshot, Volume};

use crate::exports::WriteOptions;

/// The prefix of the change-tracking context names.
pub const CHANGED_PREFIX: &str = "ferry:changed:";

fn io_err(e: ferry_pool::Error) -> io::Error {
    let kind = match e.kind() {
        ErrorKind::NoSpace => io::ErrorKind::StorageFull,
        ErrorKind::InvalidArgument => io::ErrorKind::InvalidInput,
        ErrorKind::NotFound => io::ErrorKind::NotFound,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e.to_string())
}

fn block_size() -> BlockSize {
    BlockSize {
        minimum: 1,
        preferred: 4096,
        maximum: ferry_nbd::proto::MAX_PAYLOAD,
    }
}

/// Process-wide NBD I/O counters (one ferryd per process), for `/metrics`.
#[derive(Default)]
pub struct IoStats {
    pub read_ops: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_ops: AtomicU64,
    pub write_bytes: AtomicU64,
    pub flush_ops: AtomicU64,
    pub trim_ops: AtomicU64,
    pub zero_ops: AtomicU64,
    pub errors: AtomicU64,
}

pub static IO: IoStats = IoStats {
    read_ops: AtomicU64::new(0),
    read_bytes: AtomicU64::new(0),
    write_ops: AtomicU64::new(0),
    write_bytes: AtomicU64::new(0),
    flush_ops: AtomicU64::new(0),
    trim_ops: AtomicU64::new(0),
    zero_ops: AtomicU64::new(0),
    errors: AtomicU64::new(0),
};

/// Counts one request and its outcome.
fn count<T>(ops: &AtomicU64, bytes: Option<(&AtomicU64, u64)>, r: io::Result<T>) -> io::Result<T> {
    ops.fetch_add(1, Ordering::Relaxed);
    match &r {
        Ok(_) => {
            if let Some((b, n)) = bytes {
                b.fetch_add(n, Ordering::Relaxed);
            }
        }
        Err(_) => {
            IO.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
    r
}

/// Writes of at least this many bytes to a [`VolumeExport::direct`]
/// export go straight to the disk.
const DIRECT_MIN: usize = 256 << 10;

/// A live volume.
pub struct VolumeExport {
    pub pool: Pool,
    pub volume: Volume,
    /// Short overwrites done on the connection's task.
    pub inline: InlineWrites,
    /// Large writes bypass the page cache ([`Volume::write_direct`]): for
    /// a volume a bulk copy fills, whose data is not read back soon. On a
    /// VM host, copying into fresh page-cache pages costs more than the
    /// disk write (a buffered 1 GiB write with its fdatasync ran at 265
    /// MB/s here, `O_DIRECT` at 1.1-1.2 GB/s), and the page cache stays
    /// with the host's other users.
    pub direct: bool,
    /// Each write starts going to the disk once it is in the page cache
    /// ([`Volume::start_writeback`]): for a volume a bulk copy fills and
    /// flushes at its end (a VM copy's target). The copy's flushes then
    /// find its data mostly written, and the disk works while the copy
    /// runs instead of after (BENCHMARKS.md, `copy`, session 21). Not for
    /// a VM's disk: a block written again and again would go to the disk
    /// each time.
    pub write_out: bool,
}

impl VolumeExport {
    pub fn new(pool: Pool, volume: Volume, writes: WriteOptions) -> Self {
        VolumeExport {
            pool,
            volume,
            inline: Default::default(),
            direct: writes.direct,
            write_out: writes.write_out,
        }
    }

    /// After a write of `len` bytes at `offset` that answered `r`: starts
    /// writing it out if the export is [`VolumeExport::write_out`].
    fn wrote<T, E>(&self, offset: u64, len: usize, r: &Result<T, E>) {
        if self.write_out && r.is_ok() {
            self.volume.start_writeback(offset, len as u64);
        }
    }

    /// Whether a write of `len` bytes goes straight to the disk.
    fn goes_direct(&self, len: usize) -> bool {
        self.direct && len >= DIRECT_MIN
    }

    /// A direct write: the payload is copied into an aligned buffer of
    /// the thread (the server's payload buffers are not aligned for
    /// direct I/O); the pool writes partial chunks the ordinary way.
    fn write_direct(&self, offset: u64, data: &[u8]) -> ferry_pool::Result<()> {
        thread_local! {
            static ALIGNED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        ALIGNED.with_borrow_mut(|mem| {
            let b = ferry_pool::aligned_slice(mem, data.len());
            b.copy_from_slice(data);
            self.volume.write_direct(offset, b)
        })
    }
}

impl Export for VolumeExport {
    fn size(&self) -> u64 {
        self.volume.size()
    }

    /// The pool's flush makes every acknowledged write of every volume
    /// durable, whichever connection wrote it.
    fn can_multi_conn(&self) -> bool {
        true
    }

    fn block_size(&self) -> BlockSize {
        block_size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let n = buf.len() as u64;
        let r = self.volume.read_at(offset, buf).map_err(io_err);
        count(&IO.read_ops, Some((&IO.read_bytes, n)), r)
    }

    /// Cached reads are answered on the connection's task, without a
    /// thread hop; misses (disk, lazy fetch) go to a blocking thread.
    fn try_read_at(&self, offset: u64, buf: &mut [u8]) -> Option<io::Result<()>> {
        let n = buf.len() as u64;
        let r = self.volume.try_read_at(offset, buf)?.map_err(io_err);
        Some(count(&IO.read_ops, Some((&IO.read_bytes, n)), r))
    }

    /// Large cached reads are sent from the pool's mapped data file; the
    /// chunks stay pinned (not reused) until the reply is sent.
    fn try_read_mapped(&self, offset: u64, len: u64) -> Option<Mapped> {
        let read = self.volume.try_read_mapped(offset, len)?;
        let ranges = read.ranges().to_vec();
        // SAFETY: the ranges lie in the pool's mapping of its data file,
        // which `read` keeps mapped; `read` also keeps their chunks from
        // being reused for other data until it is dropped.
        let m = unsafe { Mapped::new(ranges, Box::new(read)) };
        if !m.resident() {
            return None;
        }
        IO.read_ops.fetch_add(1, Ordering::Relaxed);
        IO.read_bytes.fetch_add(len, Ordering::Relaxed);
        Some(m)
    }

    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        let written = if self.goes_direct(data.len()) {
            self.write_direct(offset, data)
        } else {
            self.volume.write_at(offset, data)
        };
        self.wrote(offset, data.len(), &written);
        let r = written.map_err(io_err).and_then(|()| {
            if fua {
                self.volume.flush().map_err(io_err)
            } else {
                Ok(())
            }
        });
        count(&IO.write_ops, Some((&IO.write_bytes, data.len() as u64)), r)
    }

    /// Short writes that wait for nothing (overwrites in place, whole
    /// chunks into new space) run on the connection's task (see
    /// [`InlineWrites`]); a partial chunk that needs new space (copy on
    /// write, a fetch), a pool at its limit or a lock held elsewhere goes
    /// to a blocking thread.
    fn try_write_at(&self, offset: u64, data: &[u8], fua: bool) -> Option<io::Result<()>> {
        if fua || self.goes_direct(data.len()) {
            return None;
        }
        let r = self
            .inline
            .run(data.len(), || self.volume.try_write_at(offset, data))?
            .map_err(io_err);
        self.wrote(offset, data.len(), &r);
        Some(count(
            &IO.write_ops,
            Some((&IO.write_bytes, data.len() as u64)),
            r,
        ))
    }

    /// Not for a direct export: its large writes need the bytes in an
    /// aligned buffer.
    fn splice_writes(&self) -> bool {
        !self.direct
    }

    /// As [`Export::try_write_at`]: the bytes come from the server's pipe.
    fn try_write_spliced(
        &self,
        offset: u64,
        len: usize,
        fill: &mut Fill<'_>,
    ) -> Option<io::Result<()>> {
        let r = self
            .inline
            .run(len, || self.volume.try_write_spliced(offset, len, fill))?
            .map_err(io_err);
        self.wrote(offset, len, &r);
        Some(count(&IO.write_ops, Some((&IO.write_bytes, len as u64)), r))
    }

    fn flush(&self) -> io::Result<()> {
        count(&IO.flush_ops, None, self.volume.flush().map_err(io_err))
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        count(
            &IO.trim_ops,
            None,
            self.volume.trim(offset, len).map_err(io_err),
        )
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
        fast_only: bool,
    ) -> io::Result<()> {
        // Punching zeroes is a metadata change (plus zero-filling partial
        // chunks at the edges): fast. Allocated zeroes are not.
        if fast_only && !may_punch {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "allocated zeroes cannot be written fast",
            ));
        }
        let r = self
            .volume
            .write_zeroes(offset, len, !may_punch)
            .map_err(io_err);
        count(&IO.zero_ops, None, r)
    }

    fn can_fast_zero(&self) -> bool {
        true
    }

    fn meta_contexts(&self) -> Vec<String> {
        let name = self.volume.name();
        self.pool
            .snapshots()
            .into_iter()
            .filter(|s| s.volume == name)
            .map(|s| format!("{CHANGED_PREFIX}{}", s.name))
            .collect()
    }

    /// The allocation map is in memory; change tracking reads metadata.
    fn try_block_status(
        &self,
        context: &str,
        offset: u64,
        len: u64,
    ) -> Option<io::Result<Vec<Extent>>> {
        if context.starts_with(CHANGED_PREFIX) {
            return None;
        }
        Some(self.block_status(context, offset, len))
    }

    fn block_status(&self, context: &str, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        if let Some(snap) = context.strip_prefix(CHANGED_PREFIX) {
            let changed = self
                .pool
                .changed_between(self.volume.name(), snap, None)
                .map_err(io_err)?;
            return Ok(changed_extents(&changed, offset, len));
        }
        let extents = self.volume.allocation(offset, len).map_err(io_err)?;
        Ok(extents
            .into_iter()
            .map(|e| Extent {
                length: e.length,
                flags: match e.kind {
                    ExtentKind::Data => 0,
                    ExtentKind::Zero => STATE_ZERO,
                    ExtentKind::Hole => STATE_HOLE | STATE_ZERO,
                },
            })
            .collect())
    }
}

/// `[offset, offset+len)` cut into changed / unchanged runs.
fn changed_extents(changed: &[std::ops::Range<u64>], offset: u64, len: u64) -> Vec<Extent> {
    let end = offset + len;
    let mut out: Vec<Extent> = Vec::new();
    let mut at = offset;
    let mut push = |length: u64, flags: u32| match out.last_mut() {
        Some(last) if last.flags == flags => last.length += length,
        _ => out.push(Extent { length, flags }),
    };
    for r in changed {
        if r.end <= at || r.start >= end {
            continue;
        }
        let s = r.start.max(at);
        if s > at {
            push(s - at, 0);
        }
        let e = r.end.min(end);
        push(e - s, STATE_CHANGED);
        at = e;
    }
    if at < end {
        push(end - at, 0);
    }
    out
}

/// A snapshot, read-only.
pub struct SnapshotExport {
    pub snapshot: Snapshot,
}

impl Export for SnapshotExport {
    fn size(&self) -> u64 {
        self.snapshot.size()
    }

    fn read_only(&self) -> bool {
        true
    }

    fn can_multi_conn(&self) -> bool {
        true
    }

    fn block_size(&self) -> BlockSize {
        block_size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let n = buf.len() as u64;
        let r = self.snapshot.read_at(offset, buf).map_err(io_err);
        count(&IO.read_ops, Some((&IO.read_bytes, n)), r)
    }

    fn write_at(&self, _: u64, _: &[u8], _: bool) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EROFS))
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn trim(&self, _: u64, _: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EROFS))
    }

    fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EROFS))
    }

    /// The snapshot layer does not keep an allocation map view yet: every
    /// block is reported as data (correct, if not sparse-aware).
    fn block_status(&self, _context: &str, _offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        Ok(vec![Extent {
            length: len,
            flags: 0,
        }])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_runs_cover_the_request() {
        let ch = vec![0..65536, 131072..196608];
        let ex = changed_extents(&ch, 32768, 200000);
        let total: u64 = ex.iter().map(|e| e.length).sum();
        assert_eq!(total, 200000);
        assert_eq!(
            ex[0],
            Extent {
                length: 32768,
                flags: STATE_CHANGED
            }
        );
        assert_eq!(
            ex[1],
            Extent {
                length: 65536,
                flags: 0
            }
        );
        assert_eq!(
            ex[2],
            Extent {
                length: 65536,
                flags: STATE_CHANGED
            }
        );
        assert_eq!(
            ex[3],
            Extent {
                length: 200000 - 163840,
                flags: 0
            }
        );
        assert_eq!(
            changed_extents(&[], 0, 10),
            vec![Extent {
                length: 10,
                flags: 0
            }]
        );
    }
}
