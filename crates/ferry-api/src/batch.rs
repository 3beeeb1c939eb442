//! Batch migration (flow 4 of DESIGN.md): many VMs to one destination,
//! with durable records at the destination that decide, after any fault,
//! whether each VM was migrated.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `POST /v1/migrations/batches`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// The VMs (names or UUIDs), each on this host or on one of its peers.
    pub vms: Vec<String>,
    /// The destination host (a peer of this host and of every source, or
    /// this host itself).
    pub to: String,
    /// The batch's id (default: generated). Re-running a batch under the
    /// same id skips the VMs it already migrated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// VMs migrated at a time (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel: Option<u32>,
    /// Memory and hydration bandwidth cap per VM, bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<u64>,
}

/// One VM of a batch as the destination stores it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct BatchMember {
    /// The VM's UUID.
    pub vm: String,
    pub name: String,
    /// The host the VM runs on when the batch starts.
    pub from: String,
}

/// `POST /v1/peer/migrations/batches`: the coordinator registers a batch
/// at its destination before any VM moves.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct BatchManifest {
    pub batch: String,
    /// The destination host's name.
    pub to: String,
    /// The host that coordinates the batch.
    pub coordinator: String,
    pub members: Vec<BatchMember>,
    /// Unix seconds.
    pub created: u64,
}

/// A durable mark: when (unix milliseconds) and a note.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct Mark {
    pub at_ms: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// The destination's durable record of one VM of a batch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct MigrationRecord {
    pub batch: String,
    /// The VM's UUID.
    pub vm: String,
    pub name: String,
    /// The source host.
    pub from: String,
    /// The VM's volumes (the same names on both hosts).
    #[serde(default)]
    pub volumes: Vec<String>,
    /// *Migration started*: written before anything of the VM moves.
    pub started: Mark,
    /// *Placeholder*: the VM is defined here with its UUID, not running,
    /// before memory moves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placeholder: Option<Mark>,
    /// The placeholder was removed (the migration was rolled back before
    /// switchover).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back: Option<Mark>,
    /// *Migration completed*: the VM runs here after switchover, the
    /// source's QEMU finished the memory migration, and its disks are
    /// attached here with hydration started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed: Option<Mark>,
}

/// `GET /v1/peer/migrations/records?batch=`: what the destination holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct BatchRecords {
    /// `None` when the destination knows no manifest of the batch.
    pub manifest: Option<BatchManifest>,
    /// By VM UUID.
    pub records: BTreeMap<String, MigrationRecord>,
}

/// Where one VM of a batch stands.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BatchVmState {
    NotStarted,
    InProgress,
    Migrated,
    Failed,
}

impl std::fmt::Display for BatchVmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BatchVmState::NotStarted => "not started",
            BatchVmState::InProgress => "in progress",
            BatchVmState::Migrated => "migrated",
            BatchVmState::Failed => "failed",
        })
    }
}

/// One side's live view of a VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct SideState {
    pub host: String,
    /// `absent` (not defined), `stopped` (defined, no QEMU), QEMU's run
    /// state (`running`, `paused`, `inmigrate`, `postmigrate`, ...), or
    /// `unreachable`.
    pub state: String,
    /// QEMU's pid while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
}

/// The status of one VM of a batch, with the evidence used.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct BatchVmStatus {
    pub vm: String,
    pub name: String,
    pub state: BatchVmState,
    /// Which side holds the VM: `source` (not migrated) or `destination`
    /// (switched over).
    pub side: String,
    /// The evidence: `record`, `placeholder`, `rolled_back`, `completed`.
    pub evidence: Vec<String>,
    /// How the decision was reached.
    pub reason: String,
    pub source: SideState,
    pub destination: SideState,
    /// The `vm.migrate` operation on the source, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
    /// What `recover` does: `none`, `finish`, `roll back`, `restart on
    /// source`.
    pub action: String,
}

/// `GET /v1/migrations/batches/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct BatchStatus {
    pub batch: String,
    pub to: String,
    /// The `migrate.batch` operation on the answering host, if it holds one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
    /// That operation's state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation_state: Option<String>,
    /// Where the member list came from: `journal` (this host coordinates)
    /// or `destination` (the destination's records).
    pub from: String,
    pub vms: Vec<BatchVmStatus>,
}

/// An entry of `GET /v1/migrations/batches`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct BatchSummary {
    pub batch: String,
    pub to: String,
    pub vms: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation_state: Option<String>,
    /// `coordinator` (a batch this host runs) or `destination` (records
    /// this host holds as the destination).
    pub role: String,
}

/// `POST /v1/migrations/batches` answers the batch id and its operation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct BatchStarted {
    pub batch: String,
    pub operation: String,
}
