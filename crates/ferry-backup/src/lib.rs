//! `ferry-backup`: the backup repository. Deduplicated, compressed,
//! optionally encrypted backups of VM disks, in a local directory or in
//! S3-compatible object storage.
//!
//! # What a backup is
//!
//! A backup is a *manifest* (VM name, time, the caller's VM configuration
//! JSON, parent backup, and per disk: name, size, read profile, index key)
//! and, per disk, an *index*: the id of every fixed-size block of the disk,
//! or a hole marker for blocks that read as zeroes (not stored). Blocks are
//! stored once as *chunks* named by their content hash (BLAKE3; keyed with
//! a key derived from the user's key when encrypted, so ids leak nothing),
//! deduplicated across backups and VMs, compressed with zstd (level 1,
//! stored raw when that does not shrink them) and, when the repository is
//! encrypted, sealed with AES-256-GCM.
//!
//! The block size is fixed per repository, 1 MiB by default: a multiple of
//! the pool's 64 KiB chunk, so block boundaries align with the pool's change
//! tracking. Against 64 KiB it stores 16× fewer objects (each a file with an
//! fsync, or an S3 PUT) and 16× smaller indexes, and zstd compresses larger
//! blocks better; the price is that an incremental backup reads and stores
//! the whole 1 MiB block around a changed 64 KiB chunk. Writes inside a
//! guest cluster, so this costs little; a repository for very scattered
//! writes can be created with 64 KiB blocks ([`InitOptions`]).
//!
//! # Layout (same keys in a directory and under an S3 prefix)
//!
//! - `config`: the repository config ([`RepoConfig`], JSON) in clear:
//!   id, block size, encryption, key check value.
//! - `chunks/<2 hex>/<64 hex>`: one chunk.
//! - `backups/<id>/manifest`, `backups/<id>/disk<N>.index`.
//! - `writers/<id>`: marker of a running backup (see the `gc` module).
//!
//! Every object is an envelope with a versioned magic number per kind
//! (`FERRYREP` config, `FERRYCHK` chunk, `FERRYIDX` index, `FERRYMAN`
//! manifest, `FERRYWRT` writer marker; version 1), described in
//! [`format`]. An object of an unknown version is refused with
//! [`ErrorKind::UnknownVersion`]; a damaged one with [`ErrorKind::Corrupt`]
//! (a GCM tag or a BLAKE3 checksum covers every object, and a chunk's
//! content is checked against its id).
//!
//! # Keys
//!
//! The key is never stored in the repository: the user keeps a key file
//! ([`Key::load`]). The config holds a one-way check value derived from it,
//! so a wrong key fails at open with "wrong key for repository X".
//!
//! # Writing, crashes and recovery
//!
//! In a directory, each object is written to a temporary file, fsync'd and
//! renamed into place, so an object is either absent or whole: a chunk
//! present under its name always holds its full content, and dedup can
//! trust it. A backup stores its chunks (several threads), then its
//! indexes, then fsyncs every directory it added to (or in which it found
//! and touched a chunk, which another writer may not have synced yet), so
//! all of them are durable, and only then is the manifest written (the
//! commit point) and synced. A crash before the
//! manifest leaves unreferenced chunks and indexes and a writer marker,
//! nothing else: the backup does not exist, the next `gc` removes them
//! (markers go stale after a day). On S3 a PUT is atomic and durable when
//! acknowledged.
//!
//! Forget removes the manifest only; `gc` (mark and sweep, safe against
//! running backups: protocol in the `gc` module) removes what no backup
//! references. `verify` reads every chunk and names the backups a bad one
//! affects.
//!
//! # Reading
//!
//! [`DiskReader`] reads a backup's disk at any offset, fetching and caching
//! decompressed blocks; it implements the pool's [`ferry_pool::ChunkSource`]
//! so a lazy volume can be served from a backup (instant restore).
//! [`Repository::restore_disk`] restores a whole disk with parallel fetch:
//! runs of consecutive blocks fetched, checked, decrypted in place and
//! decompressed straight into each thread's run buffer by several threads
//! and written at once (into a pool volume with direct writes, bypassing
//! the page cache), the target flushed in the background as it fills and
//! once at the end.
//!
//! # Example
//!
//! ```no_run
//! use ferry_backup::{BackupOptions, DiskInput, Repository, SnapshotSource, VolumeTarget};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = ferry_pool::Pool::open("/srv/pool")?;
//! let repo = Repository::open("/srv/backup", None)?;
//! let snap = SnapshotSource::new(pool.open_snapshot("web-1-disk0@b1")?);
//! let opts = BackupOptions::new("web-1", serde_json::json!({"memory": 2048}));
//! let disk = DiskInput { name: "disk0".into(), source: &snap, changed: None, read_profile: vec![] };
//! let m = repo.backup(&opts, &[disk], None)?;
//! let vol = pool.create_volume("web-1-restored", m.disks[0].size)?;
//! repo.restore_disk(&m.id, "disk0", &VolumeTarget(vol), 4, false, None)?;
//! # Ok(()) }
//! ```

mod backup;
mod crypto;
mod error;
pub mod format;
mod gc;
mod pool;
mod prune;
mod repo;
mod restore;
mod s3;
mod store;
mod verify;

pub use backup::{BackupOptions, DiskInput, DiskSource, Progress, is_zero};
pub use crypto::{ChunkId, Key};
pub use error::{Error, ErrorKind, Result};
pub use gc::{CLOCK_SLACK, GcStats, OBJECT_STORE_GRACE, STALE_WRITER};
pub use pool::{FileDisk, SnapshotSource, VolumeTarget};
pub use prune::{PrunePolicy, PruneResult, select as prune_select};
pub use repo::{
    DEFAULT_BLOCK_SIZE, DiskEntry, InitOptions, Manifest, RepoConfig, RepoInfo, Repository,
};
pub use restore::{DiskReader, DiskTarget, RestoreStats};
pub use s3::S3Store;
pub use store::{DirStore, ObjectMeta, Storage};
pub use verify::{BadChunk, VerifyReport};
