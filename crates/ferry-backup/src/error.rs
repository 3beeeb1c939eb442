//! The crate's one public error type: a matchable kind plus the object and
//! operation it concerns.

use std::fmt;

/// What went wrong, for callers that branch on it.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The storage (directory or object store) refused an operation.
    Storage,
    /// An object of the repository (config, manifest, index, chunk) is not
    /// what it should be: wrong magic, bad checksum, wrong hash.
    Corrupt,
    /// An object names a format version this build does not know.
    UnknownVersion,
    /// The key given does not open the repository (or one is missing).
    WrongKey,
    /// No repository, backup or object of that name.
    NotFound,
    /// A repository already exists at that location.
    AlreadyExists,
    /// An invalid argument (location, offset, policy, key file).
    InvalidArgument,
    /// The disk being backed up or the restore target failed.
    Disk,
    /// A concurrent operation made this one unsafe (e.g. the previous
    /// backup was forgotten during an incremental backup).
    Conflict,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ErrorKind::Storage => "storage error",
            ErrorKind::Corrupt => "corrupt object",
            ErrorKind::UnknownVersion => "unknown format version",
            ErrorKind::WrongKey => "wrong key",
            ErrorKind::NotFound => "not found",
            ErrorKind::AlreadyExists => "already exists",
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::Disk => "disk I/O error",
            ErrorKind::Conflict => "conflict with a concurrent operation",
        };
        f.write_str(s)
    }
}

/// An error of the backup repository: `kind` to match on, `context` naming
/// the repository, backup or chunk and the operation.
#[derive(Debug, thiserror::Error)]
#[error("{context}: {kind}")]
pub struct Error {
    kind: ErrorKind,
    context: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Error {
    /// An error without an underlying cause.
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Self {
        Error {
            kind,
            context: context.into(),
            source: None,
        }
    }

    /// An error caused by `source`.
    pub fn with_source(
        kind: ErrorKind,
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error {
            kind,
            context: context.into(),
            source: Some(Box::new(source)),
        }
    }

    /// The kind, to branch on.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// What failed, on which object.
    pub fn context(&self) -> &str {
        &self.context
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attach context to I/O errors.
pub(crate) trait Ctx<T> {
    fn ctx(self, kind: ErrorKind, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> Ctx<T> for std::result::Result<T, E> {
    fn ctx(self, kind: ErrorKind, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::with_source(kind, context(), e))
    }
}
