//! The types of ferryd's HTTP API (`/v1`), shared by the daemon and the CLI
//! so the two cannot drift apart. Plain serde structs; no behaviour beyond
//! small helpers.

pub mod backups;
pub mod batch;
pub mod migrate;
pub mod migrate_precopy;
pub mod peers;
pub mod progress;
pub mod resources;
pub mod vmcopy;
pub mod vms;
pub mod vmsnaps;

pub use backups::*;
pub use batch::*;
pub use migrate::*;
pub use migrate_precopy::*;
pub use peers::*;
pub use progress::{Node, NodeId, ProgressView};
pub use resources::*;
pub use vmcopy::*;
pub use vms::*;
pub use vmsnaps::*;

/// The version prefix of every API path.
pub const API_PREFIX: &str = "/v1";

/// The error body of every non-2xx answer.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, schemars::JsonSchema)]
pub struct ApiError {
    /// What failed, on which object, and what state was left.
    pub error: String,
    /// The request field at fault, for 400 answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}
