//! Live migration of a VM to a peer (`POST /v1/vms/{id}/migrate`, a
//! `vm.migrate` operation) and what hosts ask of each other for it
//! (`/v1/peer/migrate/...`).
//!
//! ```json
//! {"to": "host-b", "mode": "ondemand", "bandwidth": 104857600, "keep_source": false}
//! ```

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How the disks move.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MigrateMode {
    /// The destination starts on lazy volumes whose missing chunks come
    /// from the source over NBD; memory moves by post-copy; the
    /// destination hydrates in the background after switchover.
    #[default]
    Ondemand,
    /// Disks are mirrored to the destination before memory moves.
    Precopy,
}

impl std::fmt::Display for MigrateMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MigrateMode::Ondemand => "ondemand",
            MigrateMode::Precopy => "precopy",
        })
    }
}

/// What a read of a chunk the destination does not have yet does while
/// the source cannot be reached.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnMissing {
    /// The read waits until the source answers again (the guest's I/O
    /// stalls, like QEMU's `rerror=stop`).
    #[default]
    Wait,
    /// The read fails after a few attempts (the guest sees an I/O error).
    Error,
}

/// `POST /v1/vms/{id}/migrate`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateVm {
    /// A registered peer (`ferry peer add`).
    pub to: String,
    #[serde(default)]
    pub mode: MigrateMode,
    /// Bandwidth cap, bytes per second: of the memory stream, and of the
    /// destination's background hydration (reads of the VM are not capped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<u64>,
    /// Keep the source's volumes after hydration (the VM definition on
    /// the source is removed either way).
    #[serde(default)]
    pub keep_source: bool,
    /// Reads of missing chunks while the source is down: wait or error.
    #[serde(default)]
    pub on_missing: OnMissing,
    /// The batch this migration belongs to (set by `migrate.batch`): the
    /// destination keeps durable records of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<String>,
}

/// One disk of an incoming VM: a lazy volume to create on the
/// destination and where its chunks come from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct IncomingDisk {
    /// The volume name (the same as on the source).
    pub volume: String,
    pub size: u64,
    /// The source's NBD TCP address, `host:port`.
    pub nbd: String,
    /// The TCP export name, `<export>/<secret>`. Treat it as a secret.
    pub export: String,
}

/// `POST /v1/peer/migrate/incoming`: create lazy volumes, define the VM
/// and start its QEMU waiting for the migration stream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct IncomingRequest {
    /// The source's definition (uuid set); disks name the volumes below.
    pub definition: crate::VmDefinition,
    pub disks: Vec<IncomingDisk>,
    /// Enable post-copy on the destination.
    pub postcopy: bool,
    #[serde(default)]
    pub on_missing: OnMissing,
    /// The source host's name (for logs).
    pub from: String,
    /// Background hydration cap, bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<u64>,
    /// The batch this migration belongs to: the destination keeps its
    /// durable records (see `ferry_api::batch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<String>,
}

/// The answer: where the destination QEMU listens.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct IncomingReady {
    /// A QEMU migration URI (`tcp:host:port`).
    pub uri: String,
}

/// The hydration of one lazy volume of an incoming VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct DiskHydration {
    pub volume: String,
    pub present_chunks: u64,
    pub total_chunks: u64,
    /// Chunks still to fetch from the source.
    pub missing_chunks: u64,
    pub done: bool,
    /// The last error fetching from the source (e.g. it is down).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// `GET /v1/peer/migrate/{uuid}`: the state of an incoming VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct IncomingStatus {
    pub uuid: String,
    /// Hydration started (the VM switched over to this host).
    pub hydrating: bool,
    pub disks: Vec<DiskHydration>,
    /// Every disk is hydrated.
    pub done: bool,
}
