//! The one public error type of the crate.
//!
//! Every error carries a matchable [`ErrorKind`] and a context naming the
//! object and the operation (`qmp command query-status on /run/vm1/qmp.sock`),
//! so a message reaching a user says what failed, on which object.

use std::time::Duration;

/// What went wrong, matchable.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ErrorKind {
    /// An operating-system call failed.
    #[error("{0}")]
    Io(std::io::Error),
    /// The peer did not answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The socket closed (for QMP: QEMU exited or crashed).
    #[error("connection closed")]
    Closed,
    /// QEMU answered a QMP command with an error.
    #[error("QEMU error {class}: {desc}")]
    Qmp {
        /// The QMP error class (`GenericError`, `DeviceNotFound`, ...).
        class: String,
        /// QEMU's human-readable description.
        desc: String,
    },
    /// The guest agent answered with an error.
    #[error("guest agent error {class}: {desc}")]
    Agent {
        /// The error class reported by qemu-ga.
        class: String,
        /// qemu-ga's description.
        desc: String,
    },
    /// The peer sent something that does not follow the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// A VM definition or an argument is invalid.
    #[error("invalid: {0}")]
    Invalid(String),
    /// The QEMU process failed to start or exited unexpectedly.
    #[error("QEMU process: {0}")]
    Process(String),
    /// A block job or a migration ended in failure or was cancelled.
    #[error("job failed: {0}")]
    Job(String),
    /// Nothing matches what was looked up (a disk, a node, a job, a VM).
    #[error("not found: {0}")]
    NotFound(String),
}

/// The error of every fallible operation of this crate.
#[derive(Debug, thiserror::Error)]
#[error("{context}: {kind}")]
pub struct Error {
    /// What went wrong.
    pub kind: ErrorKind,
    /// Which operation on which object.
    pub context: String,
}

impl Error {
    /// Builds an error from a kind and a context.
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Self {
        Self {
            kind,
            context: context.into(),
        }
    }

    /// An I/O error with context.
    pub fn io(err: std::io::Error, context: impl Into<String>) -> Self {
        Self::new(ErrorKind::Io(err), context)
    }

    /// An invalid-input error with context.
    pub fn invalid(what: impl Into<String>, context: impl Into<String>) -> Self {
        Self::new(ErrorKind::Invalid(what.into()), context)
    }

    /// True when the error is a timeout.
    pub fn is_timeout(&self) -> bool {
        matches!(self.kind, ErrorKind::Timeout(_))
    }

    /// True when the connection closed (QEMU gone, agent socket closed).
    pub fn is_closed(&self) -> bool {
        matches!(self.kind, ErrorKind::Closed)
    }

    /// The QMP error class, when QEMU answered with an error.
    pub fn qmp_class(&self) -> Option<&str> {
        match &self.kind {
            ErrorKind::Qmp { class, .. } => Some(class),
            _ => None,
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
