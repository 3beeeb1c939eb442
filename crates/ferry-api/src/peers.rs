//! Peers: other ferryd hosts this host talks to (migrations, copies,
//! chunk fetches). Hosts authenticate to each other with peer tokens, which
//! open only the `/v1/peer/` endpoints, never the admin API.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What a host says about itself to a peer (`GET /v1/peer/hello`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct PeerHello {
    pub name: String,
    pub version: String,
    /// The host's NBD listener reachable by peers (`nbd://host:port`).
    pub nbd: Option<String>,
    /// Which token the caller used: `peer` or `admin`. Registration
    /// refuses admin tokens: a peer must never hold another host's admin
    /// token.
    pub caller: String,
}

/// `POST /v1/peers`: register another host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct AddPeer {
    /// Local name of the peer; defaults to the name the peer reports.
    #[serde(default)]
    pub name: Option<String>,
    /// The peer's API URL (`http://host:port`).
    pub url: String,
    /// The peer's *peer* token (`ferry peer token` on that host).
    pub token: String,
}

/// A registered peer, as listed. The token is never shown.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct PeerInfo {
    pub name: String,
    pub url: String,
    /// Name the peer reported when it was last reached.
    pub host_name: String,
    pub version: String,
    pub nbd: Option<String>,
    /// Seconds since the Unix epoch when it was registered.
    pub added: u64,
    /// Filled by `show` (a live check); `None` in lists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reachable: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The peer's pool usage, filled by `show` when the peer answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<crate::PoolInfo>,
}

/// `GET /v1/host/peer-token` (admin only): this host's peer token, to be
/// given to other hosts' `ferry peer add`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct PeerToken {
    pub token: String,
}
