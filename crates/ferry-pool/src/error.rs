//! The crate's one public error type: a matchable kind plus the object and
//! operation it concerns.

use std::fmt;

/// What went wrong, for callers that branch on it.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The operating system refused an I/O on the pool's files.
    Io,
    /// The metadata store failed or holds something this version cannot read.
    Metadata,
    /// The pool header names a format version this build does not know.
    UnknownVersion,
    /// The pool header is not a Ferry pool header (wrong magic or checksum).
    BadHeader,
    /// No volume or snapshot of that name.
    NotFound,
    /// A volume or snapshot of that name already exists.
    AlreadyExists,
    /// An offset or length outside the volume, or an invalid argument.
    InvalidArgument,
    /// The pool's size limit is reached: nothing was written.
    NoSpace,
    /// The object is still needed by another one (snapshots, clones).
    InUse,
    /// The operation is not available while the volume is lazy.
    Lazy,
    /// A lazy volume's source failed (after retries) for a chunk.
    Source,
    /// A lazy volume has missing chunks and no source attached.
    SourceDetached,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ErrorKind::Io => "I/O error",
            ErrorKind::Metadata => "metadata store error",
            ErrorKind::UnknownVersion => "unknown pool format version",
            ErrorKind::BadHeader => "not a ferry pool header",
            ErrorKind::NotFound => "not found",
            ErrorKind::AlreadyExists => "already exists",
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::NoSpace => "no space left in pool",
            ErrorKind::InUse => "in use",
            ErrorKind::Lazy => "not available on a lazy volume",
            ErrorKind::Source => "lazy source failed",
            ErrorKind::SourceDetached => "lazy source not attached",
        };
        f.write_str(s)
    }
}

/// An error of the pool: `kind` to match on, `context` naming the object,
/// the operation and the state left behind.
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

/// Attach context to I/O and metadata errors.
pub(crate) trait Ctx<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Ctx<T> for std::result::Result<T, std::io::Error> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::with_source(ErrorKind::Io, context(), e))
    }
}

macro_rules! redb_ctx {
    ($($t:ty),*) => {$(
        impl<T> Ctx<T> for std::result::Result<T, $t> {
            fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
                self.map_err(|e| Error::with_source(ErrorKind::Metadata, context(), redb::Error::from(e)))
            }
        }
    )*};
}
redb_ctx!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

impl<T> Ctx<T> for std::result::Result<T, serde_json::Error> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::with_source(ErrorKind::Metadata, context(), e))
    }
}

/// Run `f`, which reads the metadata store, turning a panic raised inside
/// it into a `Metadata` error. The store checks its pages as it reads them
/// and, for some damage, panics rather than returning an error (an
/// `unreachable!` in its B-tree cursor, in release builds too); a damaged
/// pool must give a clean error instead of taking its process down.
pub(crate) fn store_guard<T>(
    what: impl FnOnce() -> String,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            Err(Error::new(
                ErrorKind::Metadata,
                format!(
                    "{}: the metadata store is damaged (its check failed: {msg})",
                    what()
                ),
            ))
        }
    }
}
