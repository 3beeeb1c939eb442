//! A raw file (or any seekable file): `pread`/`pwrite`, `fdatasync`,
//! `fallocate` for trim and zeroes, `SEEK_DATA`/`SEEK_HOLE` for allocation.
//!
//! Reads and writes are first tried with `RWF_NOWAIT`, which succeeds only
//! when the page cache can serve them; those run on the connection's task.
//! Anything else goes to a blocking thread.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use memmap2::{MmapOptions, MmapRaw};

use super::push_extent;
use crate::export::{Export, Extent, Fill, InlineWrites, Mapped};
use crate::proto::{CONTEXT_ALLOCATION, STATE_HOLE, STATE_ZERO};

pub struct FileExport {
    file: File,
    size: u64,
    read_only: bool,
    /// Cleared the first time the file system refuses `RWF_NOWAIT` writes.
    nowait_writes: AtomicBool,
    /// Short buffered writes inline, where `RWF_NOWAIT` is refused.
    inline: InlineWrites,
    /// The file mapped read-only, for large reads sent from it (mapped at
    /// the first; `None` when it cannot be).
    map: OnceLock<Option<Arc<MmapRaw>>>,
}

impl FileExport {
    /// Opens `path`, read-write unless `read_only`.
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let size = file.metadata()?.len();
        Ok(FileExport {
            file,
            size,
            read_only,
            nowait_writes: AtomicBool::new(true),
            inline: InlineWrites::new(),
            map: OnceLock::new(),
        })
    }

    /// One `preadv2`/`pwritev2` call; returns bytes moved.
    fn rw2(
        &self,
        write: bool,
        offset: u64,
        ptr: *mut u8,
        len: usize,
        flags: i32,
    ) -> io::Result<usize> {
        let iov = libc::iovec {
            iov_base: ptr.cast(),
            iov_len: len,
        };
        let fd = self.file.as_raw_fd();
        let off = offset as libc::off_t;
        let n = if write {
            // SAFETY: `iov` describes `len` readable bytes the caller owns for
            // the duration of the call; the fd is open.
            unsafe { libc::pwritev2(fd, &iov, 1, off, flags) }
        } else {
            // SAFETY: `iov` describes `len` writable bytes the caller borrows
            // mutably for the duration of the call; the fd is open.
            unsafe { libc::preadv2(fd, &iov, 1, off, flags) }
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    fn seek(&self, offset: u64, whence: i32) -> io::Result<Option<u64>> {
        // SAFETY: lseek on an open fd has no memory effects.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), offset as libc::off_t, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(r as u64))
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate on an open fd has no memory effects.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    fn write_zero_buffers(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }
}

fn is_would_block(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAGAIN))
}

impl Export for FileExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn can_multi_conn(&self) -> bool {
        // One file descriptor shared by every connection: fdatasync covers
        // every write that has returned, whichever connection made it.
        true
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                io::Error::from_raw_os_error(libc::EIO)
            } else {
                e
            }
        })
    }

    fn try_read_at(&self, offset: u64, buf: &mut [u8]) -> Option<io::Result<()>> {
        let mut done = 0;
        while done < buf.len() {
            let rest = &mut buf[done..];
            match self.rw2(
                false,
                offset + done as u64,
                rest.as_mut_ptr(),
                rest.len(),
                libc::RWF_NOWAIT,
            ) {
                Ok(0) => return Some(Err(io::Error::from_raw_os_error(libc::EIO))),
                Ok(n) => done += n,
                Err(e) if is_would_block(&e) => return None,
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Some(Err(e)),
            }
        }
        Some(Ok(()))
    }

    fn try_read_mapped(&self, offset: u64, len: u64) -> Option<Mapped> {
        let map = self.map.get_or_init(|| {
            let len = usize::try_from(self.size).ok().filter(|n| *n > 0)?;
            MmapOptions::new()
                .len(len)
                .map_raw_read_only(&self.file)
                .ok()
                .map(Arc::new)
        });
        let map = map.as_ref()?;
        let end = offset.checked_add(len)?;
        if end > map.len() as u64 {
            return None;
        }
        let addr = map.as_ptr() as usize + offset as usize;
        // SAFETY: the range lies inside the mapping, which the clone of its
        // Arc keeps mapped; it holds this file's bytes at `offset`, which
        // only writes to this export change. (A file shrunk by another
        // program under the server makes the send fail with EFAULT, not
        // read other data.)
        let m = unsafe { Mapped::new(vec![(addr, len as usize)], Box::new(map.clone())) };
        m.resident().then_some(m)
    }

    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        if !fua {
            return self.file.write_all_at(data, offset);
        }
        let mut done = 0;
        while done < data.len() {
            let rest = &data[done..];
            match self.rw2(
                true,
                offset + done as u64,
                rest.as_ptr().cast_mut(),
                rest.len(),
                libc::RWF_DSYNC,
            ) {
                Ok(0) => return Err(io::Error::from_raw_os_error(libc::EIO)),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn try_write_at(&self, offset: u64, data: &[u8], fua: bool) -> Option<io::Result<()>> {
        if fua {
            return None;
        }
        if !self.nowait_writes.load(Ordering::Relaxed) {
            // The file system refuses RWF_NOWAIT for buffered writes (ext4
            // does): short ones run inline all the same, large ones, which
            // may meet dirty-page throttling for longer, go to a thread.
            return self
                .inline
                .run(data.len(), || Some(self.file.write_all_at(data, offset)));
        }
        let mut done = 0;
        while done < data.len() {
            let rest = &data[done..];
            match self.rw2(
                true,
                offset + done as u64,
                rest.as_ptr().cast_mut(),
                rest.len(),
                libc::RWF_NOWAIT,
            ) {
                Ok(0) => return None,
                Ok(n) => done += n,
                Err(e) if is_would_block(&e) => return None,
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    self.nowait_writes.store(false, Ordering::Relaxed);
                    return None;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Some(Err(e)),
            }
        }
        Some(Ok(()))
    }

    fn splice_writes(&self) -> bool {
        !self.read_only
    }

    fn try_write_spliced(
        &self,
        offset: u64,
        len: usize,
        fill: &mut Fill<'_>,
    ) -> Option<io::Result<()>> {
        self.inline
            .run(len, || Some(fill(self.file.as_fd(), offset, len)))
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            // Trim is advisory: a file system without holes keeps the data.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            r => r,
        }
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
        fast_only: bool,
    ) -> io::Result<()> {
        let mode = if may_punch {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match self.fallocate(mode, offset, len) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                if fast_only {
                    Err(io::ErrorKind::Unsupported.into())
                } else {
                    self.write_zero_buffers(offset, len)
                }
            }
            Err(e) => Err(e),
        }
    }

    fn can_fast_zero(&self) -> bool {
        true
    }

    fn block_status(&self, context: &str, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        if context != CONTEXT_ALLOCATION {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        let end = offset.saturating_add(len).min(self.size);
        let mut v = Vec::new();
        let mut pos = offset;
        while pos < end && v.len() < 1024 {
            let data = self.seek(pos, libc::SEEK_DATA)?.unwrap_or(end).min(end);
            if data > pos {
                push_extent(&mut v, data - pos, STATE_HOLE | STATE_ZERO);
                pos = data;
                continue;
            }
            let hole = self.seek(pos, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
            let hole = hole.max(pos + 1);
            push_extent(&mut v, hole - pos, 0);
            pos = hole;
        }
        Ok(v)
    }
}
