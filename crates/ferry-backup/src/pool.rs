//! Adapters between the pool and the repository: a snapshot as a backup
//! source (with read counters) and a volume as a restore target.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use ferry_pool::{Snapshot, Volume};

use crate::backup::DiskSource;
use crate::restore::DiskTarget;

/// A pool snapshot as a [`DiskSource`]: backups read frozen content, so
/// the guest keeps writing to the live volume meanwhile.
#[derive(Debug)]
pub struct SnapshotSource {
    snap: Snapshot,
    reads: AtomicU64,
    bytes: AtomicU64,
}

impl SnapshotSource {
    /// Wrap a snapshot.
    pub fn new(snap: Snapshot) -> SnapshotSource {
        SnapshotSource {
            snap,
            reads: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        }
    }

    /// Read calls so far.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// Bytes read so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl DiskSource for SnapshotSource {
    fn size(&self) -> u64 {
        self.snap.size()
    }

    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.snap.read_at(off, buf).map_err(io::Error::other)
    }
}

/// A pool volume as a restore [`DiskTarget`]. Writes go to the disk
/// directly ([`Volume::write_direct`]): a restored disk is not read back
/// soon, and writing it through the page cache costs more than the disk
/// write itself.
#[derive(Debug, Clone)]
pub struct VolumeTarget(pub Volume);

impl DiskTarget for VolumeTarget {
    fn write_at(&self, off: u64, data: &[u8]) -> io::Result<()> {
        self.0.write_direct(off, data).map_err(io::Error::other)
    }

    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        self.0
            .write_zeroes(off, len, false)
            .map_err(io::Error::other)
    }

    fn flush(&self) -> io::Result<()> {
        self.0.flush().map_err(io::Error::other)
    }
}

/// A plain file as a source or target (benchmarks, raw images).
#[derive(Debug)]
pub struct FileDisk {
    file: std::fs::File,
    size: u64,
}

impl FileDisk {
    /// Wrap an open file of `size` bytes.
    pub fn new(file: std::fs::File, size: u64) -> FileDisk {
        FileDisk { file, size }
    }
}

impl DiskSource for FileDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.file, buf, off)
    }
}

impl DiskTarget for FileDisk {
    fn write_at(&self, off: u64, data: &[u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.file, data, off)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}
