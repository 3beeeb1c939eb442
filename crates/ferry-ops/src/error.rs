//! The crate's one error type.

use thiserror::Error;

/// What failed in the operations layer, and on which operation.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum OpsError {
    #[error("journal {path}: {source}")]
    Journal {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("journal {path} has format version {found}; this ferry reads version {expected}")]
    JournalVersion {
        path: String,
        found: i64,
        expected: i64,
    },
    #[error("no operation {0}")]
    NotFound(String),
    #[error("operation {id}: no plan is registered for kind {kind}")]
    UnknownKind { id: String, kind: String },
    #[error("operation {id}: cannot build its plan: {message}")]
    Plan { id: String, message: String },
    #[error("operation {id} is already finished ({state})")]
    Finished { id: String, state: String },
    #[error("operation {id}: journal entry is malformed: {message}")]
    Corrupt { id: String, message: String },
}

pub type Result<T> = std::result::Result<T, OpsError>;

/// Why a step failed; the step names the object in `message`.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StepError {
    /// The operation was cancelled while the step ran; it left nothing the
    /// step's undo does not remove.
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    Failed(String),
}

impl StepError {
    pub fn failed(msg: impl std::fmt::Display) -> Self {
        StepError::Failed(msg.to_string())
    }
}
