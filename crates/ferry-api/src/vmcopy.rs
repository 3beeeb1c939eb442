//! VM copy between hosts: the request and the peer call that verifies.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `POST /v1/vms/{id}/copy`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmCopyRequest {
    /// The target host: a registered peer's name.
    pub to: String,
    /// The copy's name on the target (default `<name>-copy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Transfer limit in bytes per second (none: as fast as it goes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<u64>,
    /// The VM's host, when it is not the host asked: a registered peer.
    /// The host asked then coordinates: it sends the copy to that host
    /// and follows it there (none: this host, or the one peer that has
    /// the VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// An idempotency key: a second request with the same key answers the
    /// operation the first one started (a coordinator retrying after a
    /// crash starts no second copy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
}

/// `POST /v1/peer/copy/hash`: hash ranges of a volume of the answering
/// host (the target of a copy, for its verify sub-operation).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HashRanges {
    pub volume: String,
    /// `[offset, length]` pairs, each at most 16 MiB.
    pub ranges: Vec<(u64, u64)>,
    /// `xxh3-128` or `blake3` (the default, which copies before
    /// `algorithm` existed asked for).
    #[serde(default = "blake3_name")]
    pub algorithm: String,
}

fn blake3_name() -> String {
    "blake3".into()
}

/// The hash (hex, of the algorithm asked) of each range, in the order asked.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct RangeHashes {
    pub hashes: Vec<String>,
    /// The algorithm of `hashes` (`blake3` when absent).
    #[serde(default = "blake3_name")]
    pub algorithm: String,
}
