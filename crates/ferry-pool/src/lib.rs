//! `ferry-pool`: Ferry's primary storage, a thin block pool with O(1)
//! snapshots, group snapshots, clones, change tracking and lazy volumes.
//!
//! # On disk
//!
//! A pool is a directory:
//!
//! - `pool.hdr`: magic `FERRYPOL`, format version, chunk size (see
//!   [`format`]). A pool of another version is refused with
//!   [`ErrorKind::UnknownVersion`] and left untouched.
//! - `data`: a sparse file of fixed-size chunks (64 KiB by default, set at
//!   creation); physical chunk `p` lives at byte `p × chunk_size`. Freed
//!   chunks are punched out (`FALLOC_FL_PUNCH_HOLE`) and reused.
//! - `stage.<seq>.log`: metadata changes staged since the last commit
//!   (see `stagelog.rs`).
//! - `meta.redb`: the metadata in redb, an embedded copy-on-write B-tree
//!   store with ACID transactions (tables described in `meta.rs`). The mapping
//!   is `(lineage, chunk, epoch) → physical chunk | ZERO`.
//!
//! # Snapshots are epochs
//!
//! Each volume (a *lineage*) has a current epoch. A snapshot records
//! (lineage, current epoch) and moves the live volume to the next epoch: one
//! small transaction, whatever the volume's size. The content of a chunk at
//! epoch `e` is its newest entry with epoch ≤ `e`; a clone is a new lineage
//! whose missing chunks fall through to (parent lineage, snapshot epoch).
//! A live write to a chunk whose entry no snapshot sees is done in place; a
//! chunk a snapshot sees is copied on write into a fresh chunk with an entry
//! at the current epoch. Every physical chunk is referenced by exactly one
//! entry, so its reference count is implicit and exact. Deleting a snapshot
//! looks only at the entries of its own epoch interval (`epochs` index) and
//! frees those the next snapshot (or the live volume) has superseded.
//! Changes between two snapshots are the entries with epoch in (A, B].
//!
//! In memory each volume keeps only the newest entry per chunk (lock-striped
//! hash maps): reads never touch the metadata store nor any pool-wide lock,
//! so 1000 snapshots cost the live volume nothing. Snapshot reads go to the
//! metadata store (a read transaction per call).
//!
//! # Concurrency
//!
//! [`Pool`] and [`Volume`] are `Send + Sync` and cheap to clone. A read
//! takes no lock: it looks its chunks up in an atomic word per chunk (a
//! mirror of the volume's 64 lock-striped shard maps), preads, and looks
//! again; a word that changed meanwhile (the chunk may have been freed and
//! reused) makes it read again under the shard locks. Chunks that follow
//! each other in the data file are read (or overwritten in place) with one
//! pread/pwrite; further shard or chunk locks are only *tried*, so holding
//! several cannot deadlock. [`Volume::try_read_mapped`] hands a read out
//! as places in the data file mapped read-only, for a server to `send`
//! from; its chunks stay pinned (a pinned chunk that is freed is reused
//! only once unpinned) until the [`MappedRead`] is dropped;
//! [`Snapshot::try_read_mapped`] does the same for a snapshot, whose bytes,
//! when all cached, may also be read in place ([`CachedRead`]). Writers of one chunk
//! serialise on one of 256 striped chunk locks and hold their volume's state
//! lock shared; a snapshot holds it exclusively, which makes a group
//! snapshot atomic across its volumes. A [`Snapshot`] handle refuses reads
//! once the snapshot is deleted; a read already running when the delete
//! commits is not stopped (callers must not delete what they still read).
//!
//! # Writes, flush and group commit
//!
//! Data is written with `pwrite` to the data file. A write covering several
//! whole chunks that need new space takes a run of chunks that follow each
//! other in the data file (aligned at its end when no free run fits).
//! Buffered writes go to the data file in pieces of at most 256 KiB: the
//! page cache makes a folio of each piece, and while larger folios make
//! later reads cheaper, ext4 walks every block of a folio on each small
//! write into it; 256 KiB keeps most of both (BENCHMARKS.md "## pool").
//! [`Volume::write_direct`] (bulk fills such as a restore) writes whole
//! chunks with `O_DIRECT` instead, up to 8 MiB at once, into runs first
//! allocated in the data file with `fallocate` (so ext4 lets several
//! writers proceed at once); unaligned pieces take the buffered path.
//! Either way the bytes have reached the kernel before the write returns
//! and are durable after the next fdatasync. Changes of the mapping
//! (new chunk, copy-on-write, trim) are staged in memory; [`Pool::flush`]
//! (or [`Volume::flush`]) commits them: the first flusher fdatasyncs the
//! data file, then commits every staged change in one redb transaction;
//! flushers arriving meanwhile find their writes covered and return, or
//! share the next commit. When only in-place overwrites happened since the
//! last commit, a flush is one fdatasync and no metadata transaction; when
//! nothing was written, nothing. Control-plane operations (create, delete,
//! snapshot, group snapshot, clone) commit synchronously, staged changes
//! included.
//!
//! # What a crash can leave, and how it is recovered
//!
//! redb commits are atomic: after a crash the metadata is exactly the last
//! committed state. On open, the live maps are rebuilt from the metadata
//! and the free list is every chunk below the highest referenced one that
//! no entry references. Three rules make that state consistent with the data
//! file:
//!
//! 1. The data file is fdatasync'd before every metadata commit, so no
//!    durable entry points at a chunk whose data is not durable.
//! 2. A chunk freed by an uncommitted change (trim, delete, a superseded
//!    entry) is not reused until the commit freeing it is durable; until then
//!    durable metadata may still point at it and its bytes stay intact.
//! 3. A chunk is overwritten in place only when no snapshot sees its entry,
//!    and snapshot deletion commits before its chunks become exclusive, so
//!    in-place writes never touch data a durable snapshot references.
//!
//! Staged changes are also appended to a **stage log** (see `stagelog.rs`)
//! before the write that made them returns; a pool reopened after its
//! process was killed (same boot of the machine) replays them, so *every
//! write that returned* is there, flushed or not — which is what an NBD
//! client that reconnects and repeats its flush (QEMU) relies on.
//!
//! So a machine crash can leave: writes after the last flush lost or
//! present (each 512-byte sector old or new), chunks allocated after the
//! last commit unreferenced (they are free again on open), a lazy volume's
//! fetched but uncommitted chunks missing (fetched again). A process kill
//! loses only the write that was running. Nothing acknowledged by a flush
//! is ever lost; [`Pool::verify`] checks every invariant.
//!
//! # Damaged metadata
//!
//! Opening decodes and checks everything it reads: the header (magic,
//! checksum, version, chunk size), each volume, snapshot and profile record
//! (well-formed, its own key, valid names and epochs, a clone's parent an
//! older lineage so parent chains end), the catalog as a whole (snapshots
//! of existing volumes, clones of existing snapshots), and every mapping
//! entry points inside the data file. Anything else is refused with
//! [`ErrorKind::Metadata`] (or `BadHeader`) naming the record, nothing
//! changed. The decoders are fuzzed (`fuzz/`, targets `metadata_decode` and
//! `pool_open`) and fed corrupted bytes in the normal tests.
//!
//! # Lazy volumes
//!
//! See [`lazy`] and [`hydrator`]. A lazy volume's source is not stored:
//! after a restart the caller re-attaches it with [`Volume::attach_source`].
//! Snapshots, clones and growth of a lazy volume are refused until it is
//! hydrated.
//!
//! # Space
//!
//! [`Pool::usage`], [`Pool::volume_space`]; an optional limit
//! ([`PoolOptions::limit_bytes`], [`Pool::set_limit`]) makes writes that
//! need a new chunk fail with [`ErrorKind::NoSpace`] and change nothing.
//! Space freed by trim becomes usable after the next flush; space freed by
//! deleting a volume or snapshot at once.

mod control;
pub mod crashtest;
mod error;
mod fastmap;
pub mod format;
mod hydrator;
pub mod lazy;
mod mapped;
mod meta;
mod pool;
mod profile;
mod snapshot;
mod stagelog;
mod verify;
mod volume;
pub mod workload;

/// The decoders of what the pool reads from disk (header, volume and
/// snapshot records, read profiles, the catalog as a whole), exposed for
/// the fuzz targets in `fuzz/` and the robustness tests: on any input they
/// return `Ok` or a clean [`Error`], never panic.
#[doc(hidden)]
pub mod decode {
    use std::collections::{BTreeMap, HashMap};

    use crate::Result;
    use crate::meta;

    /// Decode a pool header (`pool.hdr`).
    pub fn header(bytes: &[u8]) -> Result<()> {
        crate::format::Header::decode(bytes, "under test").map(|_| ())
    }

    /// Decode the record of volume `key`.
    pub fn volume_record(key: u64, bytes: &[u8]) -> Result<()> {
        meta::decode_volume(key, bytes).map(|_| ())
    }

    /// Decode the record of snapshot `key`.
    pub fn snapshot_record(key: &str, bytes: &[u8]) -> Result<()> {
        meta::decode_snapshot(key, bytes).map(|_| ())
    }

    /// Decode the read profile of volume `key`.
    pub fn profile(key: u64, bytes: &[u8]) -> Result<()> {
        meta::decode_profile(key, bytes).map(|_| ())
    }

    /// Decode volume records (keys 1, 2, ...) and snapshot records (keys
    /// their own names), then check them together as a catalog.
    pub fn catalog(volumes: &[&[u8]], snapshots: &[&[u8]], next_id: u64) -> Result<()> {
        let mut recs = HashMap::new();
        for (i, b) in volumes.iter().enumerate() {
            let key = i as u64 + 1;
            recs.insert(key, meta::decode_volume(key, b)?);
        }
        let mut snaps = BTreeMap::new();
        for b in snapshots {
            // The key is the record's own name when it has one.
            let name = serde_json::from_slice::<serde_json::Value>(b)
                .ok()
                .and_then(|v| v.get("name").and_then(|n| n.as_str().map(str::to_string)))
                .unwrap_or_default();
            let rec = meta::decode_snapshot(&name, b)?;
            snaps.insert(rec.name.clone(), rec);
        }
        meta::check_catalog(&recs, &snaps, next_id)
    }

    /// Feed `data` to one decoder chosen by its first byte (the fuzz
    /// targets' entry point); the result is discarded.
    pub fn any(data: &[u8]) {
        let Some((&which, rest)) = data.split_first() else {
            return;
        };
        let key = rest
            .get(..8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .unwrap_or(0);
        let body = rest.get(8..).unwrap_or(&[]);
        let _ = match which % 5 {
            0 => header(rest),
            1 => volume_record(key, body),
            2 => snapshot_record(&String::from_utf8_lossy(&rest[..rest.len().min(16)]), rest),
            3 => profile(key, body),
            _ => {
                // Records separated by 0xff (never inside valid JSON text).
                let parts: Vec<&[u8]> = body.split(|b| *b == 0xff).collect();
                let (vols, snaps) = parts.split_at(parts.len() / 2);
                catalog(vols, snaps, key)
            }
        };
    }
}

pub use control::{Pool, SnapshotInfo, VolumeInfo};
pub use error::{Error, ErrorKind, Result};
pub use hydrator::{HydrationProgress, Hydrator, HydratorOptions};
pub use lazy::ChunkSource;
pub use mapped::{CachedRead, MappedRead};
pub use pool::{DATA_FILE, DIRECT_ALIGN, META_FILE, PoolOptions, Recovery, aligned_slice};
pub use profile::ProfileLimit;
pub use snapshot::Snapshot;
pub use verify::{PoolUsage, VolumeSpace};
pub use volume::{Extent, ExtentKind, Fill, Volume};
