//! The crate's one error type.

use std::path::Path;

/// What kind of failure an [`Error`] is.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A command-line argument or parameter is invalid.
    InvalidArgument,
    /// A file could not be read, written, synced or truncated.
    Io,
    /// The records file holds damaged records: the writer refuses to append.
    Corrupt,
    /// An external program (debugfs, e2fsck) failed.
    Tool,
}

/// An error of the workload tool, naming the object it concerns.
#[derive(Debug, thiserror::Error)]
#[error("{context}")]
pub struct Error {
    kind: ErrorKind,
    context: String,
    #[source]
    source: Option<std::io::Error>,
}

impl Error {
    /// A new error without an underlying cause.
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Self {
        Error {
            kind,
            context: context.into(),
            source: None,
        }
    }

    /// An I/O error on `path` while doing `what`.
    pub fn io(what: &str, path: &Path, source: std::io::Error) -> Self {
        Error {
            kind: ErrorKind::Io,
            context: format!("{what} {}", path.display()),
            source: Some(source),
        }
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
}
