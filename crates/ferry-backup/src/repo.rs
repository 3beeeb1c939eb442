//! The repository: its config, opening with a key, chunk and object I/O,
//! and the backup catalogue (list, show, forget).

use std::collections::HashSet;
use std::ops::Range;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::crypto::{ChunkId, Hasher, Key};
use crate::error::{Error, ErrorKind, Result};
use crate::format::{self, Index, MAGIC_CHUNK, MAGIC_CONFIG, MAGIC_INDEX, MAGIC_MANIFEST};
use crate::store::{DirStore, Storage};

/// Default block size: 1 MiB (16 pool chunks of 64 KiB). See the crate doc.
pub const DEFAULT_BLOCK_SIZE: u32 = 1 << 20;

/// The repository config, stored in clear in `config`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RepoConfig {
    /// Random id of the repository.
    pub id: String,
    /// Creation time, seconds since the epoch.
    pub created: u64,
    /// Size of the fixed blocks disks are cut into.
    pub block_size: u32,
    /// `none` or `aes-256-gcm`.
    pub encryption: String,
    /// Check value of the key (see [`Key`]), when encrypted.
    pub key_check: Option<String>,
}

/// Options of [`Repository::init_with`].
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Block size: a power of two from 64 KiB to 16 MiB.
    pub block_size: u32,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            block_size: DEFAULT_BLOCK_SIZE,
        }
    }
}

/// A summary of the repository.
#[derive(Debug, Clone, Serialize)]
pub struct RepoInfo {
    /// Where it is.
    pub location: String,
    /// Its config.
    pub id: String,
    /// Block size.
    pub block_size: u32,
    /// Whether chunks are encrypted.
    pub encrypted: bool,
    /// Number of backups.
    pub backups: usize,
    /// Number of chunk objects stored.
    pub chunks: usize,
    /// Bytes of chunk objects stored (compressed, encrypted).
    pub chunk_bytes: u64,
}

/// One disk of a backup, as recorded in its manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DiskEntry {
    /// Disk name (as the caller gave it, e.g. the volume name).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Key of the disk's index object.
    pub index: String,
    /// Blocks holding data.
    pub data_blocks: u64,
    /// Blocks that read as zeroes (not stored).
    pub hole_blocks: u64,
    /// Bytes read from the disk by this backup.
    pub read_bytes: u64,
    /// Chunks this backup uploaded (not already in the repository).
    pub new_chunks: u64,
    /// Stored bytes of those new chunks.
    pub new_bytes: u64,
    /// The disk's read profile (byte ranges, in the order given).
    pub read_profile: Vec<Range<u64>>,
}

/// A backup: the VM configuration and its disks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// Backup id (`YYYYMMDDTHHMMSS.mmmZ-xxxxxxxx`, UTC): ids sort in time order.
    pub id: String,
    /// What was backed up (VM name): backups are grouped by it for prune.
    pub vm: String,
    /// Time of the backup, seconds since the epoch.
    pub time: u64,
    /// The VM configuration as given by the caller.
    pub config: serde_json::Value,
    /// The backup this one was made incremental to, if any.
    pub parent: Option<String>,
    /// The disks.
    pub disks: Vec<DiskEntry>,
}

pub(crate) struct Inner {
    pub store: Box<dyn Storage>,
    pub location: String,
    pub key: Option<Key>,
    pub hasher: Hasher,
    pub config: RepoConfig,
}

/// An open repository: cheap to clone, `Send + Sync`.
///
/// Every method blocks; call them from ordinary threads (or
/// `spawn_blocking`), not from inside an async task.
#[derive(Clone)]
pub struct Repository {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository")
            .field("location", &self.inner.location)
            .finish()
    }
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn open_store(location: &str) -> Result<Box<dyn Storage>> {
    if let Some(rest) = location.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("repository location {location}: no bucket"),
            ));
        }
        return Ok(Box::new(crate::s3::S3Store::new(bucket, prefix)?));
    }
    if location.contains("://") {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("repository location {location}: expected a directory or s3://bucket/prefix"),
        ));
    }
    Ok(Box::new(DirStore::new(location)))
}

impl Repository {
    /// Create a repository at `location` (a directory, created if needed,
    /// or `s3://bucket/prefix`), encrypted when a key is given.
    pub fn init(location: &str, key: Option<Key>) -> Result<Repository> {
        Repository::init_with(location, key, InitOptions::default())
    }

    /// [`Repository::init`] with options.
    pub fn init_with(location: &str, key: Option<Key>, opts: InitOptions) -> Result<Repository> {
        let bs = opts.block_size;
        if !bs.is_power_of_two() || !(65536..=(16 << 20)).contains(&bs) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "init repository {location}: block size {bs} is not a power of two from 64 KiB to 16 MiB"
                ),
            ));
        }
        if !location.starts_with("s3://") {
            std::fs::create_dir_all(location).map_err(|e| {
                Error::with_source(
                    ErrorKind::Storage,
                    format!("init repository {location}: create directory"),
                    e,
                )
            })?;
        }
        let store = open_store(location)?;
        if store.exists("config")? {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("init repository {location}: a repository is already there"),
            ));
        }
        let config = RepoConfig {
            id: crate::crypto::hex(&rand::random::<[u8; 16]>()),
            created: now_secs(),
            block_size: bs,
            encryption: if key.is_some() { "aes-256-gcm" } else { "none" }.into(),
            key_check: key.as_ref().map(|k| k.check_value()),
        };
        let json = serde_json::to_vec_pretty(&config).expect("config serializes");
        store.put("config", &format::seal(MAGIC_CONFIG, &json, false, None))?;
        store.sync()?;
        Repository::open(location, key)
    }

    /// Open the repository at `location` with its key (if encrypted).
    pub fn open(location: &str, key: Option<Key>) -> Result<Repository> {
        let store = open_store(location)?;
        let blob = store.get("config")?.ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("open repository {location}: no repository there (no config)"),
            )
        })?;
        let what = format!("config of repository {location}");
        let json = format::open(MAGIC_CONFIG, &blob, None, &what)?;
        let config: RepoConfig = serde_json::from_slice(&json)
            .map_err(|e| Error::with_source(ErrorKind::Corrupt, what.clone(), e))?;
        match (&config.key_check, &key) {
            (Some(_), None) => {
                return Err(Error::new(
                    ErrorKind::WrongKey,
                    format!("repository {location} is encrypted: a key is needed"),
                ));
            }
            (Some(c), Some(k)) if *c != k.check_value() => {
                return Err(Error::new(
                    ErrorKind::WrongKey,
                    format!("wrong key for repository {location}"),
                ));
            }
            (None, Some(_)) => {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    format!("repository {location} is not encrypted, but a key was given"),
                ));
            }
            _ => {}
        }
        Ok(Repository {
            inner: Arc::new(Inner {
                hasher: Hasher::new(key.as_ref()),
                store,
                location: location.to_string(),
                key,
                config,
            }),
        })
    }

    /// Where the repository is.
    pub fn location(&self) -> &str {
        &self.inner.location
    }

    /// The repository's config.
    pub fn config(&self) -> &RepoConfig {
        &self.inner.config
    }

    /// A summary: counts and sizes.
    pub fn info(&self) -> Result<RepoInfo> {
        let chunks = self.inner.store.list("chunks/")?;
        Ok(RepoInfo {
            location: self.inner.location.clone(),
            id: self.inner.config.id.clone(),
            block_size: self.inner.config.block_size,
            encrypted: self.inner.key.is_some(),
            backups: self.list()?.len(),
            chunks: chunks.len(),
            chunk_bytes: chunks.iter().map(|c| c.size).sum(),
        })
    }

    pub(crate) fn store(&self) -> &dyn Storage {
        &*self.inner.store
    }

    pub(crate) fn chunk_id(&self, data: &[u8]) -> ChunkId {
        self.inner.hasher.id(data)
    }

    /// Seal and store a chunk; returns the stored size.
    pub(crate) fn put_chunk(&self, id: ChunkId, data: &[u8]) -> Result<u64> {
        let blob = format::seal(MAGIC_CHUNK, data, true, self.inner.key.as_ref());
        self.store().put(&id.key(), &blob)?;
        Ok(blob.len() as u64)
    }

    /// Touch an existing chunk (see the garbage collector); false when it
    /// is missing.
    pub(crate) fn touch_chunk(&self, id: ChunkId, data: &[u8]) -> Result<bool> {
        let key = self.inner.key.clone();
        self.store().touch(&id.key(), &|| {
            Ok(format::seal(MAGIC_CHUNK, data, true, key.as_ref()))
        })
    }

    /// Read a chunk, check it (envelope, hash against its id) and return its
    /// plain content.
    pub fn read_chunk(&self, id: ChunkId) -> Result<Vec<u8>> {
        let what = format!("chunk {id} in repository {}", self.inner.location);
        let blob = self
            .store()
            .get(&id.key())?
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("{what}: missing")))?;
        let plain = format::open(MAGIC_CHUNK, &blob, self.inner.key.as_ref(), &what)?;
        if self.chunk_id(&plain) != id {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("{what}: content does not match its id"),
            ));
        }
        Ok(plain)
    }

    /// [`Repository::read_chunk`] into `out`, which must be exactly the
    /// chunk's length: decrypted in the fetched blob and decompressed
    /// straight into `out` (no buffer per chunk).
    pub(crate) fn read_chunk_into(&self, id: ChunkId, out: &mut [u8]) -> Result<()> {
        let what = format!("chunk {id} in repository {}", self.inner.location);
        let mut blob = self
            .store()
            .get(&id.key())?
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("{what}: missing")))?;
        format::open_into(MAGIC_CHUNK, &mut blob, self.inner.key.as_ref(), &what, out)?;
        if self.chunk_id(out) != id {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("{what}: content does not match its id"),
            ));
        }
        Ok(())
    }

    pub(crate) fn put_index(&self, key: &str, ix: &Index) -> Result<()> {
        let blob = format::seal(MAGIC_INDEX, &ix.encode(), true, self.inner.key.as_ref());
        self.store().put(key, &blob)
    }

    /// Read a disk index by its key.
    pub(crate) fn read_index(&self, key: &str) -> Result<Index> {
        let what = format!("index {key} in repository {}", self.inner.location);
        let blob = self
            .store()
            .get(key)?
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("{what}: missing")))?;
        let p = format::open(MAGIC_INDEX, &blob, self.inner.key.as_ref(), &what)?;
        Index::decode(&p, &what)
    }

    pub(crate) fn put_manifest(&self, m: &Manifest) -> Result<()> {
        let json = serde_json::to_vec(m).expect("manifest serializes");
        let blob = format::seal(MAGIC_MANIFEST, &json, true, self.inner.key.as_ref());
        self.store().put(&manifest_key(&m.id), &blob)
    }

    /// The manifest of backup `id`.
    pub fn show(&self, id: &str) -> Result<Manifest> {
        check_id(id)?;
        let what = format!("backup {id} in repository {}", self.inner.location);
        let blob = self
            .store()
            .get(&manifest_key(id))?
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("{what}: no such backup")))?;
        let json = format::open(MAGIC_MANIFEST, &blob, self.inner.key.as_ref(), &what)?;
        serde_json::from_slice(&json).map_err(|e| Error::with_source(ErrorKind::Corrupt, what, e))
    }

    /// Every backup id, oldest first (ids sort by time).
    pub fn list_ids(&self) -> Result<Vec<String>> {
        let mut ids: Vec<String> = self
            .store()
            .list("backups/")?
            .into_iter()
            .filter_map(|o| {
                o.key
                    .strip_prefix("backups/")?
                    .strip_suffix("/manifest")
                    .map(str::to_string)
            })
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Every backup's manifest, oldest first.
    pub fn list(&self) -> Result<Vec<Manifest>> {
        self.list_ids()?.iter().map(|id| self.show(id)).collect()
    }

    /// Forget backup `id`: its manifest is removed (the commit point); its
    /// indexes and the chunks no other backup uses are removed by the next
    /// [`Repository::gc`].
    pub fn forget(&self, id: &str) -> Result<()> {
        check_id(id)?;
        if !self.store().exists(&manifest_key(id))? {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "forget backup {id} in repository {}: no such backup",
                    self.inner.location
                ),
            ));
        }
        self.store().delete(&manifest_key(id))?;
        self.store().sync()
    }

    /// The chunk ids a backup references.
    pub(crate) fn backup_chunks(&self, m: &Manifest) -> Result<HashSet<ChunkId>> {
        let mut set = HashSet::new();
        for d in &m.disks {
            let ix = self.read_index(&d.index)?;
            set.extend(ix.chunks.into_iter().filter(|c| *c != ChunkId::HOLE));
        }
        Ok(set)
    }
}

pub(crate) fn manifest_key(id: &str) -> String {
    format!("backups/{id}/manifest")
}

fn check_id(id: &str) -> Result<()> {
    if id.is_empty()
        || id.starts_with('.')
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("backup id {id:?}: not a backup id"),
        ));
    }
    Ok(())
}

/// Civil date (year, month, day) of a day count since 1970-01-01.
pub(crate) fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = (if mp < 10 { mp + 3 } else { mp - 9 }) as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A new backup id for time `t` (seconds) and `ms` (milliseconds in that
/// second): ids sort in time order.
pub(crate) fn new_backup_id(t: u64, ms: u32) -> String {
    let (y, mo, d) = civil((t / 86_400) as i64);
    let s = t % 86_400;
    format!(
        "{y:04}{mo:02}{d:02}T{:02}{:02}{:02}.{ms:03}Z-{}",
        s / 3600,
        s / 60 % 60,
        s % 60,
        crate::crypto::hex(&rand::random::<[u8; 4]>())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(19_723), (2024, 1, 1));
        assert_eq!(civil(19_782), (2024, 2, 29));
        assert!(new_backup_id(0, 7).starts_with("19700101T000000.007Z-"));
    }
}
