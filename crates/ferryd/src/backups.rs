//! Backups of VMs into backup repositories (`ferry-backup`): the
//! repositories this host knows, and the operations `vm.backup`,
//! `backup.restore`, `repo.verify`, `repo.prune`, `repo.gc`.
//!
//! # What is on disk
//! - `<data>/repos.json` (mode 0600): the registered repositories — name,
//!   location, repository id and the *path* of the key file. The key itself
//!   stays in its file; it is never copied here nor into the repository.
//! - `<data>/backup-bases.json`: per (repository id, VM uuid), the latest
//!   backup and the pool snapshots it was read from (its *base*). The next
//!   backup of the VM reads only the chunks the pool's change tracking
//!   reports between the base and the new snapshot. The pool's change
//!   tracking is its metadata, so this survives `kill -9` and restarts.
//!   Written atomically after the backup is committed; the older base is
//!   deleted after that.
//!
//! # `vm.backup` (each step journaled)
//! 1. `snapshot` — a running VM: a `vm-snapshot` operation (direct mode,
//!    the code of [`crate::groupsnap`]) of the VM alone, quiesced through
//!    its agent when it answers, crash-consistent otherwise; a stopped VM: a
//!    plain pool group snapshot of its volumes. Retried after a crash (it
//!    waits for or reuses what the interrupted run started); undo deletes
//!    the snapshots.
//! 2. `back up disks` — each disk from its pool snapshot (never through the
//!    VM, so guest writes are not held up), with the VM definition, the
//!    consistency and the VM's read profile when the pool recorded one.
//!    Incremental when the base of the previous backup is still in the
//!    pool and that backup is still in the repository; otherwise a full
//!    read, and the backup's record and the log say why. Retried after a
//!    crash: a backup the interrupted run committed is found by its
//!    operation id; otherwise the backup starts again (what the interrupted
//!    run uploaded is deduplicated, or collected by `gc`).
//! 3. `keep base` — record the new base, then delete the older base's
//!    snapshots. Retried after a crash.
//!
//! # `backup.instant_restore`
//! The VM runs at once from staging volumes sourced from the backup and
//! is then relocated with no downtime: see [`instant`].
//!
//! # `backup.restore`
//! 1. `create volumes` — `<name>-<device>` per disk (undo deletes them);
//! 2. `restore data` — parallel fetch into the volumes (retried: the
//!    volumes are fresh and the writes idempotent);
//! 3. `define vm` — the backed-up definition with a new name and UUID on
//!    the new volumes (retried: an existing VM of that name on exactly
//!    those volumes is taken as done; undo deletes it).

pub mod instant;
mod ops;
pub mod restore;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use ferry_api::{AddRepo, BackupDisk, BackupInfo, RepoEntry, RepoSummary};
use ferry_backup::{Key, Manifest, Repository};
use ferry_ops::Manager;
use serde::{Deserialize, Serialize};

use crate::config::write_atomic;
use crate::daemon::App;
use crate::groupsnap;
use crate::vms::Vms;

pub use ops::{BackupParams, RepoOpParams};
pub use restore::RestoreParams;

/// Operation kinds.
pub const BACKUP: &str = "vm.backup";
pub const RESTORE: &str = "backup.restore";
pub const VERIFY: &str = "repo.verify";
pub const PRUNE: &str = "repo.prune";
pub const GC: &str = "repo.gc";

/// Threads that read, compress and upload (backup) or fetch (restore).
pub const THREADS: usize = 4;

/// Errors of the backup layer, mapped to HTTP statuses by the API.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Other(String),
}

/// An error with its causes: `a: b: c`.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

impl From<ferry_backup::Error> for BackupError {
    fn from(e: ferry_backup::Error) -> Self {
        use ferry_backup::ErrorKind as K;
        let msg = chain(&e);
        match e.kind() {
            K::NotFound => BackupError::NotFound(msg),
            K::InvalidArgument | K::WrongKey => BackupError::Invalid(msg),
            K::AlreadyExists | K::Conflict => BackupError::Conflict(msg),
            _ => BackupError::Other(msg),
        }
    }
}

/// The latest backup of one VM in one repository and the pool snapshots
/// it was read from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Base {
    pub backup: String,
    /// The snapshot group (a `vm-snapshot` group, or the plain group of a
    /// stopped VM).
    pub group: String,
    /// Device → (volume, pool snapshot).
    pub disks: BTreeMap<String, (String, String)>,
}

/// The backup layer of one daemon.
pub struct Backups {
    pub root: PathBuf,
    pub host: String,
    pub vms: Arc<Vms>,
    pub snaps: Arc<groupsnap::Env>,
    lock: Mutex<()>,
    manager: OnceLock<Weak<Manager<App>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Registers the operation kinds (and re-attaches the staging volumes of
/// instant restores); returns the layer for the API.
pub fn register(m: &Arc<Manager<App>>, snaps: Arc<groupsnap::Env>) -> anyhow::Result<Arc<Backups>> {
    let b = Arc::new(Backups {
        root: snaps.root.clone(),
        host: snaps.host.clone(),
        vms: snaps.vms.clone(),
        snaps,
        lock: Mutex::new(()),
        manager: OnceLock::new(),
    });
    let _ = b.manager.set(Arc::downgrade(m));
    ops::register(m, &b);
    restore::register(m, &b);
    instant::register(m, &b)?;
    Ok(b)
}

/// 1-64 of `A-Z a-z 0-9 - _ .`, not starting with `.`.
pub fn check_repo_name(name: &str) -> Result<(), BackupError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(BackupError::Invalid(format!(
            "repository name {name:?}: use 1-64 of A-Z a-z 0-9 - _ . (not starting with .)"
        )))
    }
}

/// A name for a repository at `location`: the directory's last component,
/// or `bucket-prefix` for S3.
fn derived_name(location: &str) -> String {
    let base = match location.strip_prefix("s3://") {
        Some(rest) => rest.trim_matches('/').replace('/', "-"),
        None => Path::new(location)
            .file_name()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| "repo".into()),
    };
    let s: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect::<String>()
        .trim_start_matches('.')
        .chars()
        .take(64)
        .collect();
    if s.is_empty() { "repo".into() } else { s }
}

impl Backups {
    fn repos_path(&self) -> PathBuf {
        self.root.join("repos.json")
    }

    fn bases_path(&self) -> PathBuf {
        self.root.join("backup-bases.json")
    }

    pub(crate) fn manager(&self) -> Option<Arc<Manager<App>>> {
        self.manager.get().and_then(Weak::upgrade)
    }

    /// The registered repositories.
    pub fn repos(&self) -> Result<Vec<RepoEntry>, BackupError> {
        match std::fs::read(self.repos_path()) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| BackupError::Other(format!("{}: {e}", self.repos_path().display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(BackupError::Other(format!(
                "cannot read {}: {e}",
                self.repos_path().display()
            ))),
        }
    }

    fn save_repos(&self, list: &[RepoEntry]) -> Result<(), BackupError> {
        let data =
            serde_json::to_vec_pretty(list).map_err(|e| BackupError::Other(e.to_string()))?;
        write_atomic(&self.repos_path(), &data, 0o600)
            .map_err(|e| BackupError::Other(format!("{e:#}")))
    }

    /// A repository by name or location.
    pub fn entry(&self, repo: &str) -> Result<RepoEntry, BackupError> {
        self.repos()?
            .into_iter()
            .find(|r| r.name == repo || r.location == repo)
            .ok_or_else(|| {
                BackupError::NotFound(format!("no backup repository {repo} on this host"))
            })
    }

    /// Opens a registered repository with its key. Blocking.
    pub fn open(&self, repo: &str) -> Result<(RepoEntry, Repository), BackupError> {
        let e = self.entry(repo)?;
        let key = match &e.key_file {
            Some(f) => Some(
                Key::load(Path::new(f))
                    .map_err(|err| BackupError::Invalid(format!("repository {}: {err}", e.name)))?,
            ),
            None => None,
        };
        let r = Repository::open(&e.location, key)?;
        if r.config().id != e.id {
            return Err(BackupError::Conflict(format!(
                "repository {} at {} now has id {}, not {} as registered; another repository was put there",
                e.name,
                e.location,
                r.config().id,
                e.id
            )));
        }
        Ok((e, r))
    }

    /// `POST /v1/repos`: init or add a repository. Blocking.
    pub fn add(&self, req: &AddRepo) -> Result<RepoEntry, BackupError> {
        let _g = lock(&self.lock);
        let location = req.location.trim().to_string();
        if location.is_empty() {
            return Err(BackupError::Invalid("location is empty".into()));
        }
        if !location.starts_with("s3://") && !Path::new(&location).is_absolute() {
            return Err(BackupError::Invalid(format!(
                "location {location}: give an absolute directory or s3://bucket/prefix"
            )));
        }
        let name = req.name.clone().unwrap_or_else(|| derived_name(&location));
        check_repo_name(&name)?;
        let mut list = self.repos()?;
        if let Some(r) = list
            .iter()
            .find(|r| r.name == name || r.location == location)
        {
            return Err(BackupError::Conflict(format!(
                "repository {} ({}) is registered already",
                r.name, r.location
            )));
        }
        if req.encrypt && req.key_file.is_none() {
            return Err(BackupError::Invalid(
                "an encrypted repository needs --key-file (the key is never stored in the repository)"
                    .into(),
            ));
        }
        if let Some(f) = &req.key_file
            && !Path::new(f).is_absolute()
        {
            return Err(BackupError::Invalid(format!(
                "key file {f}: give an absolute path on the ferryd host"
            )));
        }
        let key = match (&req.key_file, req.create && req.encrypt) {
            (Some(f), true) if !Path::new(f).exists() => {
                let k = Key::generate();
                k.save(Path::new(f))?;
                Some(k)
            }
            (Some(f), _) => Some(Key::load(Path::new(f))?),
            (None, _) => None,
        };
        let repo = if req.create {
            Repository::init(&location, key)?
        } else {
            Repository::open(&location, key)?
        };
        let e = RepoEntry {
            name,
            location,
            id: repo.config().id.clone(),
            encrypted: repo.config().key_check.is_some(),
            key_file: req.key_file.clone(),
        };
        list.push(e.clone());
        self.save_repos(&list)?;
        Ok(e)
    }

    /// `GET /v1/repos/{repo}`. Blocking.
    pub fn summary(&self, repo: &str) -> Result<RepoSummary, BackupError> {
        let (entry, r) = self.open(repo)?;
        let i = r.info()?;
        Ok(RepoSummary {
            entry,
            block_size: i.block_size,
            backups: i.backups,
            chunks: i.chunks,
            chunk_bytes: i.chunk_bytes,
        })
    }

    /// Backups of a repository, oldest first. Blocking.
    pub fn list(&self, repo: &str) -> Result<Vec<BackupInfo>, BackupError> {
        let (e, r) = self.open(repo)?;
        Ok(r.list()?.iter().map(|m| info(&e.name, m)).collect())
    }

    /// One backup. Blocking.
    pub fn show(&self, repo: &str, id: &str) -> Result<BackupInfo, BackupError> {
        let (e, r) = self.open(repo)?;
        Ok(info(&e.name, &r.show(id)?))
    }

    /// Forget a backup (its chunks go at the next gc). Blocking.
    pub fn forget(&self, repo: &str, id: &str) -> Result<(), BackupError> {
        let (_, r) = self.open(repo)?;
        r.forget(id)?;
        Ok(())
    }

    /// The bases of every (repository, VM).
    pub fn bases(&self) -> Result<BTreeMap<String, Base>, BackupError> {
        match std::fs::read(self.bases_path()) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| BackupError::Other(format!("{}: {e}", self.bases_path().display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(BackupError::Other(format!(
                "cannot read {}: {e}",
                self.bases_path().display()
            ))),
        }
    }

    /// Records `base` as the base of (repo id, vm uuid); returns the base
    /// it replaces.
    pub fn set_base(&self, key: &str, base: Base) -> Result<Option<Base>, BackupError> {
        let _g = lock(&self.lock);
        let mut all = self.bases()?;
        let old = all.insert(key.to_string(), base);
        let data =
            serde_json::to_vec_pretty(&all).map_err(|e| BackupError::Other(e.to_string()))?;
        write_atomic(&self.bases_path(), &data, 0o644)
            .map_err(|e| BackupError::Other(format!("{e:#}")))?;
        Ok(old)
    }

    /// True when some base still names snapshot group `group`.
    pub fn group_is_base(&self, group: &str) -> bool {
        self.bases()
            .map(|b| b.values().any(|x| x.group == group))
            .unwrap_or(true)
    }
}

/// The key of a VM's base in `backup-bases.json`.
pub fn base_key(repo_id: &str, vm_uuid: &str) -> String {
    format!("{repo_id}/{vm_uuid}")
}

/// The API view of a manifest.
pub fn info(repo: &str, m: &Manifest) -> BackupInfo {
    BackupInfo {
        id: m.id.clone(),
        repo: repo.to_string(),
        vm: m.vm.clone(),
        time: m.time,
        parent: m.parent.clone(),
        config: m.config.clone(),
        disks: m
            .disks
            .iter()
            .map(|d| BackupDisk {
                name: d.name.clone(),
                size: d.size,
                data_blocks: d.data_blocks,
                hole_blocks: d.hole_blocks,
                read_bytes: d.read_bytes,
                new_chunks: d.new_chunks,
                new_bytes: d.new_bytes,
                read_profile: d.read_profile.iter().map(|r| [r.start, r.end]).collect(),
            })
            .collect(),
    }
}

/// Deletes the pool snapshots of a group (and its record when it has one);
/// snapshots already gone are skipped.
pub async fn delete_snapshots(
    b: &Backups,
    pool: &ferry_pool::Pool,
    group: &str,
    snapshots: &[String],
) -> Result<(), String> {
    if groupsnap::read_group(&b.snaps, group).is_ok() {
        return groupsnap::delete_group(b.snaps.clone(), pool.clone(), group.to_string())
            .await
            .map_err(|e| e.to_string());
    }
    let (pool, snapshots) = (pool.clone(), snapshots.to_vec());
    tokio::task::spawn_blocking(move || {
        for s in &snapshots {
            match pool.delete_snapshot(s) {
                Ok(()) => {}
                Err(e) if e.kind() == ferry_pool::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("cannot delete snapshot {s}: {e}")),
            }
        }
        Ok(())
    })
    .await
    .map_err(|e| e.to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_names() {
        assert_eq!(derived_name("/srv/backup"), "backup");
        assert_eq!(derived_name("s3://bucket/a/b"), "bucket-a-b");
        assert_eq!(derived_name("/srv/.hidden dir"), "hidden-dir");
        assert!(check_repo_name("nightly.1").is_ok());
        assert!(check_repo_name(".x").is_err());
        assert!(check_repo_name("a/b").is_err());
    }
}
