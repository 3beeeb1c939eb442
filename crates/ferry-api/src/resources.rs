//! Hosts, pools, volumes, snapshots, operations: what the API lists and
//! what it accepts.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::progress::ProgressView;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct HostInfo {
    pub name: String,
    pub version: String,
    pub data_dir: String,
    /// NBD listeners: `nbd://host:port` and/or `nbd+unix:///?socket=...`.
    pub nbd: Vec<String>,
    /// QEMU accelerator used for VMs started here (`kvm:tcg`, `tcg`).
    pub accel: String,
    pub uptime_s: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct PoolInfo {
    pub chunk_size: u64,
    pub used_bytes: u64,
    pub limit_bytes: Option<u64>,
    pub volumes: usize,
    pub snapshots: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct VolumeInfo {
    pub name: String,
    pub size: u64,
    /// The snapshot this volume was cloned from.
    pub parent_snapshot: Option<String>,
    /// Chunks are still fetched from a source.
    pub lazy: bool,
    /// Live chunks no snapshot or clone shares.
    pub exclusive_bytes: u64,
    /// Live chunks shared with snapshots or a clone's parent.
    pub shared_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct SnapshotInfo {
    pub name: String,
    pub volume: String,
    pub size: u64,
    pub group: Option<String>,
    /// Seconds since the Unix epoch.
    pub created: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct CreateVolume {
    pub name: String,
    /// Bytes; the CLI accepts suffixes (`10G`) and sends bytes.
    pub size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct GrowVolume {
    pub size: u64,
}

/// One snapshot of one volume, or (with several volumes) one atomic group
/// snapshot named `name`, whose members are `name@volume`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct CreateSnapshot {
    pub name: String,
    pub volumes: Vec<String>,
    /// The snapshots' names, one per volume, for a group snapshot named
    /// `name` (default: `name` for one volume, `name@volume` for several).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_names: Option<Vec<String>>,
}

/// `POST /v1/volumes/{name}/revert`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct RevertVolume {
    /// A snapshot of that volume.
    pub snapshot: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct RevertedVolume {
    pub snapshot: String,
    /// Bytes copied back from the snapshot.
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct CreateClone {
    pub snapshot: String,
    pub name: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OpState {
    Running,
    Cancelling,
    Compensating,
    Succeeded,
    Failed,
    Cancelled,
}

impl OpState {
    pub fn as_str(self) -> &'static str {
        match self {
            OpState::Running => "running",
            OpState::Cancelling => "cancelling",
            OpState::Compensating => "compensating",
            OpState::Succeeded => "succeeded",
            OpState::Failed => "failed",
            OpState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "running" => OpState::Running,
            "cancelling" => OpState::Cancelling,
            "compensating" => OpState::Compensating,
            "succeeded" => OpState::Succeeded,
            "failed" => OpState::Failed,
            "cancelled" => OpState::Cancelled,
            _ => return None,
        })
    }

    pub fn is_finished(self) -> bool {
        matches!(
            self,
            OpState::Succeeded | OpState::Failed | OpState::Cancelled
        )
    }
}

impl std::fmt::Display for OpState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct StepInfo {
    pub name: String,
    pub state: String,
    pub error: Option<String>,
    pub started_ms: u64,
    pub finished_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct LogLine {
    pub ts_ms: u64,
    pub level: String,
    pub msg: String,
}

/// An operation as listed (`steps` and `log` only in `show`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct Operation {
    pub id: String,
    pub kind: String,
    pub state: OpState,
    pub error: Option<String>,
    pub params: Value,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub progress: Option<ProgressView>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepInfo>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log: Vec<LogLine>,
}

/// The answer to a request that started an operation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct Started {
    pub operation: String,
}

/// An NBD export of a volume (read-write) or a snapshot (read-only).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct ExportInfo {
    pub name: String,
    pub volume: Option<String>,
    pub snapshot: Option<String>,
    pub read_only: bool,
    /// Large writes go straight to the disk, bypassing the page cache.
    #[serde(default)]
    pub direct: bool,
    /// Each write starts going to the disk at once.
    #[serde(default)]
    pub write_out: bool,
    /// For QEMU and tools on this host (no secret; the socket is root's).
    pub unix_uri: String,
    /// For other hosts: carries the export's secret. Treat it as one.
    pub tcp_uri: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct CreateExport {
    /// Export name (default: the volume's or snapshot's name).
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub volume: Option<String>,
    #[serde(default)]
    pub snapshot: Option<String>,
    /// Writes of 256 KiB or more bypass the page cache (`O_DIRECT`): for a
    /// volume a bulk copy fills, whose data is not read back soon. A
    /// volume's export only.
    #[serde(default)]
    pub direct: bool,
    /// Each write starts going to the disk as soon as it is in the page
    /// cache (`sync_file_range`), instead of when the kernel's dirty
    /// thresholds or age call for it: for a volume a bulk copy fills and
    /// flushes at its end, so the flush finds little left to write. A
    /// volume's export only.
    #[serde(default)]
    pub write_out: bool,
}
