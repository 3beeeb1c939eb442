//! Backup repositories and backups of VMs.
//!
//! - `POST /v1/repos` `{"location": "/srv/backup", "create": true}` (or
//!   `s3://bucket/prefix`; `"encrypt": true, "key_file": "/root/repo.key"`)
//!   registers a repository with this host, creating it when asked.
//! - `POST /v1/repos/{repo}/backups` `{"vm": "web-1"}` starts a `vm.backup`
//!   operation; `POST /v1/repos/{repo}/backups/{id}/restore`
//!   `{"name": "web-1-restored"}` starts a `backup.restore` operation.
//! - `verify`, `prune` and `gc` of a repository are operations too.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `POST /v1/repos`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AddRepo {
    /// A directory on the daemon's host or `s3://bucket/prefix` (endpoint
    /// and credentials from ferryd's environment: `AWS_ENDPOINT_URL`,
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`).
    pub location: String,
    /// Name of the repository on this host (1-64 of `A-Z a-z 0-9 - _ .`);
    /// derived from the location when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Create the repository (`repo init`); otherwise it must exist.
    #[serde(default)]
    pub create: bool,
    /// Encrypt a new repository (AES-256-GCM) with the key in `key_file`.
    #[serde(default)]
    pub encrypt: bool,
    /// Key file on the daemon's host (absolute path). When creating an
    /// encrypted repository and the file does not exist, a new key is
    /// written there (mode 0600). The key never goes into the repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
}

/// A repository known to this host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct RepoEntry {
    pub name: String,
    pub location: String,
    /// The repository's own id.
    pub id: String,
    pub encrypted: bool,
    /// Where its key is read (never the key itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
}

/// `GET /v1/repos/{repo}`: the entry plus counts read from the repository.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct RepoSummary {
    #[serde(flatten)]
    pub entry: RepoEntry,
    pub block_size: u32,
    pub backups: usize,
    /// Chunk objects stored.
    pub chunks: usize,
    /// Bytes of chunk objects stored (compressed, encrypted).
    pub chunk_bytes: u64,
}

/// `POST /v1/repos/{repo}/prune`: a backup is kept if any rule keeps it
/// (rules apply per VM).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PruneRepo {
    #[serde(default)]
    pub keep_last: usize,
    #[serde(default)]
    pub keep_daily: usize,
    #[serde(default)]
    pub keep_weekly: usize,
    #[serde(default)]
    pub keep_monthly: usize,
    /// Only say what would be forgotten.
    #[serde(default)]
    pub dry_run: bool,
}

/// `POST /v1/repos/{repo}/backups`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBackup {
    /// A VM of this host, by name or UUID.
    pub vm: String,
    /// Freeze the guest's file systems through its agent (when it runs and
    /// has one); otherwise the backup is crash-consistent.
    #[serde(default = "yes")]
    pub quiesce: bool,
}

fn yes() -> bool {
    true
}

/// One disk of a backup.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct BackupDisk {
    /// Guest device (`vda`).
    pub name: String,
    pub size: u64,
    pub data_blocks: u64,
    pub hole_blocks: u64,
    /// Bytes this backup read from the pool snapshot.
    pub read_bytes: u64,
    /// Chunks this backup uploaded (not already in the repository).
    pub new_chunks: u64,
    /// Stored bytes of those chunks.
    pub new_bytes: u64,
    /// Byte ranges of the VM's read profile, in first-read order.
    pub read_profile: Vec<[u64; 2]>,
}

/// A backup as stored in a repository.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct BackupInfo {
    pub id: String,
    pub repo: String,
    /// The VM's name.
    pub vm: String,
    /// Seconds since the Unix epoch.
    pub time: u64,
    /// The backup this one is incremental to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// What ferryd recorded: the VM definition, consistency, whether the
    /// disks were read in full or incrementally (and why).
    pub config: serde_json::Value,
    pub disks: Vec<BackupDisk>,
}

/// `POST /v1/repos/{repo}/backups/{id}/restore`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreBackup {
    /// Name of the new VM (default: `<vm>-restored`). Its volumes are
    /// `<name>-<device>`; it gets a new UUID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The host to restore to (default: this host): this host's name,
    /// `local`, or a registered peer, which gets the new volumes (written
    /// over NBD by this host, which reads the repository) and the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Instant restore (operation `backup.instant_restore`): the VM runs at
    /// once from staging volumes sourced from the backup, then its disks are
    /// relocated to new pool volumes with no downtime.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub instant: bool,
    /// Instant restore: the host holding the staging volumes: always the
    /// host asked, which holds the repository (its name, `local`, or
    /// absent); any other host answers 400. With `to` a peer, the VM runs
    /// there from the staging volumes over NBD/TCP (the peer must have this
    /// host registered) and is relocated into the peer's pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    /// Instant restore: prefetch the backup's read profile first (default
    /// true; false is for measuring what the profile saves).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch_profile: Option<bool>,
}

/// `POST /v1/volumes/{name}/read-profile`: start recording which chunks the
/// volume reads (a VM's boot reads, for instant restore to fetch first), or
/// set the profile. Give exactly one of `reads`, `seconds`, `ranges`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetReadProfile {
    /// Record the chunks read by this many reads from now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reads: Option<u64>,
    /// Record the chunks read during this many seconds from now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<u64>,
    /// Set the profile to these byte ranges (rounded out to the pool's
    /// chunks), in this order, instead of recording.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranges: Option<Vec<[u64; 2]>>,
}

/// A volume's read profile (`GET /v1/volumes/{name}/read-profile`). A
/// backup of a VM stores its volumes' profiles; a restore gives them to the
/// new volumes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct ReadProfile {
    pub volume: String,
    /// True while it is still recording.
    pub recording: bool,
    /// Byte ranges in first-read order.
    pub ranges: Vec<[u64; 2]>,
}
