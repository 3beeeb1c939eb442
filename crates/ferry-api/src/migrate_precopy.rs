//! What a source asks of the destination for a `precopy` migration
//! (`/v1/peer/migrate-precopy...`): plain volumes to mirror the disks
//! into, and the VM waiting for its memory.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One disk of a VM arriving by pre-copy: a plain volume to create.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct PrecopyDisk {
    /// The volume name (the same as on the source).
    pub volume: String,
    pub size: u64,
}

/// `POST /v1/peer/migrate-precopy`: create empty volumes, define the VM
/// on them (same UUID) and start its QEMU waiting for the migration
/// stream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct PrecopyRequest {
    /// The source's definition (uuid set); its disks name the volumes.
    pub definition: crate::VmDefinition,
    pub disks: Vec<PrecopyDisk>,
    /// Enable post-copy of memory on the destination.
    pub postcopy: bool,
    /// The source host's name (for logs).
    pub from: String,
}

/// Where the source mirrors one disk: the destination's NBD export of
/// the new volume.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct PrecopyTarget {
    pub volume: String,
    /// The destination's NBD TCP address, `host:port`.
    pub nbd: String,
    /// The TCP export name, `<export>/<secret>`. Treat it as a secret.
    pub export: String,
}

/// The answer: where the destination QEMU listens and where each disk
/// is mirrored to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct PrecopyReady {
    /// A QEMU migration URI (`tcp:host:port`).
    pub uri: String,
    /// In disk order.
    pub disks: Vec<PrecopyTarget>,
}
