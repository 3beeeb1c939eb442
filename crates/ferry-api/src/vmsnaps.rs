//! VM snapshot groups: a group snapshot of running VMs, taken by the
//! `vm-snapshot` operation (`POST /v1/vm-snapshots`), then listed, shown,
//! deleted, reverted into stopped VMs and cloned into new VMs.
//!
//! ```json
//! {"vms": ["web-1", "db-1"], "name": "nightly", "mode": "overlay", "quiesce": true}
//! ```

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How the disks are captured.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmSnapshotMode {
    /// Per VM: freeze → QEMU overlay on every disk → thaw; then one pool
    /// group snapshot of the base volumes; then commit the overlays back.
    #[default]
    Overlay,
    /// Freeze every VM → one pool group snapshot → thaw.
    Direct,
}

impl std::fmt::Display for VmSnapshotMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmSnapshotMode::Overlay => "overlay",
            VmSnapshotMode::Direct => "direct",
        })
    }
}

fn yes() -> bool {
    true
}

/// `POST /v1/vm-snapshots`: starts a `vm-snapshot` operation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVmSnapshot {
    /// Running VMs of this host, by name or UUID.
    pub vms: Vec<String>,
    /// Group name (1-64 of `A-Z a-z 0-9 - _`); generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub mode: VmSnapshotMode,
    /// Freeze the guests' file systems through their guest agent. When
    /// false, or when a VM has no answering agent, its snapshot is
    /// crash-consistent.
    #[serde(default = "yes")]
    pub quiesce: bool,
}

/// How consistent one VM's disks are in a snapshot group.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    /// Taken while the guest agent had frozen the file systems.
    Quiesced,
    /// Taken without a freeze: like a power cut (journals replay).
    CrashConsistent,
}

impl std::fmt::Display for Consistency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Consistency::Quiesced => "quiesced",
            Consistency::CrashConsistent => "crash-consistent",
        })
    }
}

/// One disk of one VM in a snapshot group.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct VmSnapshotDisk {
    /// Guest device id (`vda`).
    pub device: String,
    /// The host whose pool holds the volume.
    pub host: String,
    /// The pool (`local`: the host's own pool).
    pub pool: String,
    pub volume: String,
    /// The pool snapshot holding this disk.
    pub snapshot: String,
    pub size: u64,
}

/// One VM in a snapshot group.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct VmSnapshotVm {
    pub name: String,
    pub uuid: String,
    pub consistency: Consistency,
    /// Why the snapshot is crash-consistent, or what the freeze did.
    pub note: String,
    /// From the freeze request to the thaw's answer (ms), when frozen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen_ms: Option<f64>,
    /// How long the guest's agent took to freeze (ms), when frozen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_ms: Option<f64>,
    /// The guest's I/O pause excluding its own freeze and thaw time (ms):
    /// the overlay switch (overlay mode) or the pool snapshot (direct).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_ms: Option<f64>,
    pub disks: Vec<VmSnapshotDisk>,
    /// The VM's definition when the snapshot was taken (for clones).
    pub definition: crate::VmDefinition,
}

/// A snapshot group.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct VmSnapshotGroup {
    pub name: String,
    pub mode: VmSnapshotMode,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// The operation that took it.
    pub operation: String,
    /// Total operation time (ms).
    pub total_ms: f64,
    /// The pool group snapshot's own time (ms).
    pub storage_ms: f64,
    pub vms: Vec<VmSnapshotVm>,
}

/// `POST /v1/vm-snapshots/{name}/revert`: rewrites the disks of stopped
/// VMs with their content in the group.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RevertVmSnapshot {
    /// VMs of the group to revert (default: all). Each must be stopped.
    #[serde(default)]
    pub vms: Vec<String>,
}

/// What a revert did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct RevertedVm {
    pub name: String,
    /// Bytes rewritten (only the ranges changed since the snapshot).
    pub bytes: u64,
}

/// `POST /v1/vm-snapshots/{name}/clone`: defines a new VM whose disks are
/// clones of one VM's snapshots.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CloneVmSnapshot {
    /// The VM of the group to clone (may be omitted when the group has one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// The new VM's name; its volumes are `<name>-<device>`.
    pub name: String,
    /// Start the new VM at once.
    #[serde(default)]
    pub start: bool,
}
