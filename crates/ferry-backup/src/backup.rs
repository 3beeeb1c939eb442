//! Writing a backup: disks are cut into fixed blocks, zero blocks become
//! holes, the others are hashed, deduplicated against the repository and
//! uploaded by several threads; then the indexes and, last, the manifest
//! (the commit point) are written.

use std::collections::HashSet;
use std::io;
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::crypto::ChunkId;
use crate::error::{Error, ErrorKind, Result};
use crate::format::Index;
use crate::gc::WriterMarker;
use crate::repo::{DiskEntry, Manifest, Repository, manifest_key, new_backup_id};

/// A disk to read from: anything that reads at offsets. A pool snapshot
/// implements it through [`crate::SnapshotSource`].
pub trait DiskSource: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Read `buf.len()` bytes at `off`.
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// One disk of a backup.
pub struct DiskInput<'a> {
    /// Name of the disk (restores find it by this name).
    pub name: String,
    /// Where its content is read.
    pub source: &'a dyn DiskSource,
    /// For an incremental backup: the byte ranges changed since the parent
    /// backup's snapshot (from the pool's change tracking). Only the blocks
    /// they touch are read; the others are taken from the parent's index.
    /// `None` reads the whole disk.
    pub changed: Option<Vec<Range<u64>>>,
    /// The disk's read profile, stored with the backup for instant restore.
    pub read_profile: Vec<Range<u64>>,
}

/// What to back up besides the disks.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// VM name: backups are grouped by it (prune).
    pub vm: String,
    /// The VM configuration (opaque to the repository).
    pub config: serde_json::Value,
    /// The previous backup, for an incremental backup.
    pub parent: Option<String>,
    /// Threads reading, hashing, compressing and uploading.
    pub threads: usize,
}

impl BackupOptions {
    /// A full backup of `vm` with `config`.
    pub fn new(vm: impl Into<String>, config: serde_json::Value) -> Self {
        BackupOptions {
            vm: vm.into(),
            config,
            parent: None,
            // Twice the cores: each chunk's write waits for an fsync, so
            // extra threads keep the cores busy meanwhile.
            threads: std::thread::available_parallelism()
                .map(|n| n.get() * 2)
                .unwrap_or(4)
                .clamp(4, 16),
        }
    }

    /// Make it incremental to backup `parent`.
    pub fn parent(mut self, parent: impl Into<String>) -> Self {
        self.parent = Some(parent.into());
        self
    }
}

/// Progress callback: bytes processed so far, bytes to process.
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

struct DiskPlan {
    /// Blocks to read (indexes); the others come from the parent.
    read: Vec<u64>,
    /// Starting index: parent's entries or holes.
    chunks: Vec<ChunkId>,
}

impl Repository {
    /// Back up `disks` and return the committed manifest.
    pub fn backup(
        &self,
        opts: &BackupOptions,
        disks: &[DiskInput<'_>],
        progress: Option<Progress<'_>>,
    ) -> Result<Manifest> {
        let loc = self.location().to_string();
        let bs = self.config().block_size as u64;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let time = now.as_secs();
        let id = new_backup_id(time, now.subsec_millis());
        let what = format!("backup of {} to repository {loc}", opts.vm);
        let parent = match &opts.parent {
            Some(p) => Some(self.show(p).map_err(|e| {
                Error::with_source(e.kind(), format!("{what}: previous backup {p}"), e)
            })?),
            None => None,
        };
        // Announce the writer before touching any chunk (see gc.rs).
        let marker = WriterMarker::write(self, &id, opts.parent.clone())?;
        let result = (|| {
            // Chunks already known present: the parent's (protected by the
            // parent check at commit) and those this backup stored/touched.
            let mut known: HashSet<ChunkId> = HashSet::new();
            let mut plans = Vec::new();
            for d in disks {
                let size = d.source.size();
                let n = size.div_ceil(bs);
                let prev = parent
                    .as_ref()
                    .and_then(|p| p.disks.iter().find(|x| x.name == d.name));
                let plan = match (prev, &d.changed) {
                    (Some(prev), Some(changed)) => {
                        let pix = self.read_index(&prev.index)?;
                        if pix.block_size as u64 != bs {
                            return Err(Error::new(
                                ErrorKind::Corrupt,
                                format!(
                                    "{what}: parent index of disk {} has another block size",
                                    d.name
                                ),
                            ));
                        }
                        known.extend(pix.chunks.iter().copied());
                        let mut chunks = vec![ChunkId::HOLE; n as usize];
                        let mut dirty = vec![false; n as usize];
                        for (i, c) in chunks.iter_mut().enumerate() {
                            match pix.chunks.get(i) {
                                // A block that was partial in the parent
                                // (the disk grew) is read again.
                                Some(c0) if (i as u64 + 1) * bs <= pix.size => *c = *c0,
                                _ => dirty[i] = true,
                            }
                        }
                        for r in changed {
                            let end = r.end.min(size);
                            if r.start >= end {
                                continue;
                            }
                            for b in r.start / bs..end.div_ceil(bs) {
                                dirty[b as usize] = true;
                            }
                        }
                        let read = (0..n).filter(|&b| dirty[b as usize]).collect();
                        DiskPlan { read, chunks }
                    }
                    _ => DiskPlan {
                        read: (0..n).collect(),
                        chunks: vec![ChunkId::HOLE; n as usize],
                    },
                };
                plans.push(plan);
            }
            let total: u64 = plans.iter().map(|p| p.read.len() as u64 * bs).sum();
            let done = AtomicU64::new(0);
            let known = Mutex::new(known);
            let mut entries = Vec::new();
            for (d, plan) in disks.iter().zip(plans) {
                let ix_key = format!("backups/{id}/disk{}.index", entries.len());
                let (ix, stats) =
                    self.back_up_disk(d, plan, opts.threads, &known, &done, total, progress)?;
                self.put_index(&ix_key, &ix)?;
                entries.push(DiskEntry {
                    name: d.name.clone(),
                    size: ix.size,
                    index: ix_key,
                    data_blocks: ix.chunks.iter().filter(|c| **c != ChunkId::HOLE).count() as u64,
                    hole_blocks: ix.chunks.iter().filter(|c| **c == ChunkId::HOLE).count() as u64,
                    read_bytes: stats.read_bytes,
                    new_chunks: stats.new_chunks,
                    new_bytes: stats.new_bytes,
                    read_profile: d.read_profile.clone(),
                });
            }
            // The parent must still exist: its chunks were reused without
            // being touched, protected only while its manifest is there.
            if let Some(p) = &opts.parent
                && !self.store().exists(&manifest_key(p))?
            {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!(
                        "{what}: previous backup {p} was forgotten during the backup; nothing was committed, run a full backup"
                    ),
                ));
            }
            let m = Manifest {
                id: id.clone(),
                vm: opts.vm.clone(),
                time,
                config: opts.config.clone(),
                parent: opts.parent.clone(),
                disks: entries,
            };
            // Every chunk and index durable before the commit point.
            self.store().sync()?;
            self.put_manifest(&m)?;
            self.store().sync()?;
            Ok(m)
        })();
        marker.remove(self);
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn back_up_disk(
        &self,
        d: &DiskInput<'_>,
        plan: DiskPlan,
        threads: usize,
        known: &Mutex<HashSet<ChunkId>>,
        done: &AtomicU64,
        total: u64,
        progress: Option<Progress<'_>>,
    ) -> Result<(Index, DiskStats)> {
        let bs = self.config().block_size as u64;
        let size = d.source.size();
        let what = format!(
            "backup of disk {} to repository {}",
            d.name,
            self.location()
        );
        let next = AtomicUsize::new(0);
        let out = Mutex::new(plan.chunks);
        let stats = Mutex::new(DiskStats::default());
        let failed: Mutex<Option<Error>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..threads.max(1) {
                s.spawn(|| {
                    let mut buf = vec![0u8; bs as usize];
                    let mut local = DiskStats::default();
                    loop {
                        if failed.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
                            break;
                        }
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&b) = plan.read.get(k) else { break };
                        let off = b * bs;
                        let len = bs.min(size - off) as usize;
                        let r = self.back_up_block(d, off, &mut buf[..len], known, &mut local);
                        match r {
                            Ok(id) => {
                                out.lock().unwrap_or_else(|e| e.into_inner())[b as usize] = id
                            }
                            Err(e) => {
                                failed
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .get_or_insert(e);
                                break;
                            }
                        }
                        let n = done.fetch_add(len as u64, Ordering::Relaxed) + len as u64;
                        if let Some(p) = progress {
                            p(n, total);
                        }
                    }
                    stats.lock().unwrap_or_else(|e| e.into_inner()).add(&local);
                });
            }
        });
        if let Some(e) = failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Err(Error::with_source(
                e.kind(),
                format!("{what}; nothing was committed"),
                e,
            ));
        }
        let ix = Index {
            size,
            block_size: bs as u32,
            chunks: out.into_inner().unwrap_or_else(|e| e.into_inner()),
        };
        Ok((ix, stats.into_inner().unwrap_or_else(|e| e.into_inner())))
    }

    fn back_up_block(
        &self,
        d: &DiskInput<'_>,
        off: u64,
        buf: &mut [u8],
        known: &Mutex<HashSet<ChunkId>>,
        st: &mut DiskStats,
    ) -> Result<ChunkId> {
        d.source.read_at(off, buf).map_err(|e| {
            Error::with_source(
                ErrorKind::Disk,
                format!("read disk {} at offset {off}", d.name),
                e,
            )
        })?;
        st.read_bytes += buf.len() as u64;
        if is_zero(buf) {
            return Ok(ChunkId::HOLE);
        }
        let id = self.chunk_id(buf);
        if known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&id)
        {
            return Ok(id);
        }
        // Present already (another backup, another VM): refresh its time so
        // a concurrent gc keeps it; upload it when it is not there.
        if !self.touch_chunk(id, buf)? {
            st.new_bytes += self.put_chunk(id, buf)?;
            st.new_chunks += 1;
        }
        known.lock().unwrap_or_else(|e| e.into_inner()).insert(id);
        Ok(id)
    }
}

#[derive(Default)]
struct DiskStats {
    read_bytes: u64,
    new_chunks: u64,
    new_bytes: u64,
}

impl DiskStats {
    fn add(&mut self, o: &DiskStats) {
        self.read_bytes += o.read_bytes;
        self.new_chunks += o.new_chunks;
        self.new_bytes += o.new_bytes;
    }
}

/// Whether a buffer is all zeroes (word at a time).
pub fn is_zero(b: &[u8]) -> bool {
    // SAFETY: every bit pattern is a valid u64, and align_to only
    // reinterprets the aligned middle part of the slice.
    let (pre, mid, post) = unsafe { b.align_to::<u64>() };
    pre.iter().all(|&x| x == 0) && post.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0)
}
