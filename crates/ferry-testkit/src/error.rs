//! The kit's one error type.

use std::path::Path;

/// What kind of failure an [`Error`] is.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Building the guest image (kernel, initramfs, workload tool) failed.
    Image,
    /// A file or directory operation failed.
    Io,
    /// An external program (mkfs.ext4, cargo, qemu-img) failed.
    Tool,
    /// QEMU could not be started, or QMP failed.
    Qemu,
    /// The guest agent failed or did not answer.
    Agent,
    /// The guest did not reach a state in time.
    Timeout,
    /// The guest reported a failure (kernel panic, workload error, exit).
    Guest,
}

/// An error of the test kit, naming the guest or file it concerns.
#[derive(Debug, thiserror::Error)]
#[error("{context}")]
pub struct Error {
    kind: ErrorKind,
    context: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
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

    /// A new error caused by `source`.
    pub fn with_source(
        kind: ErrorKind,
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Error {
            kind,
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// An I/O error on `path` while doing `what`.
    pub fn io(what: &str, path: &Path, source: std::io::Error) -> Self {
        Error::with_source(ErrorKind::Io, format!("{what} {}", path.display()), source)
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
}

/// The kit's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
