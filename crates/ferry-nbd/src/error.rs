//! The crate's one public error type: a matchable kind and the object it
//! concerns (an export, a peer address, an option).

use std::fmt;
use std::io;

/// What went wrong, for callers that match on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The socket or the backend failed.
    Io,
    /// The peer broke the protocol (bad magic, bad length, unexpected reply).
    Protocol,
    /// The server does not have (or does not show us) this export.
    NotFound,
    /// The server refused an option or requires TLS.
    Refused,
    /// TLS setup or handshake failed.
    Tls,
    /// The server answered a command with an NBD error number.
    Remote(u32),
    /// The connection is closed.
    Closed,
    /// The caller asked for something invalid (range, configuration).
    Invalid,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorKind::Io => write!(f, "i/o error"),
            ErrorKind::Protocol => write!(f, "protocol violation"),
            ErrorKind::NotFound => write!(f, "export not found"),
            ErrorKind::Refused => write!(f, "refused by server"),
            ErrorKind::Tls => write!(f, "tls failure"),
            ErrorKind::Remote(e) => write!(f, "server error {} ({})", e, errno_name(*e)),
            ErrorKind::Closed => write!(f, "connection closed"),
            ErrorKind::Invalid => write!(f, "invalid request"),
        }
    }
}

/// An error of this crate: its kind, what it was doing and on which object.
#[derive(Debug, thiserror::Error)]
#[error("{context}: {kind}")]
pub struct Error {
    kind: ErrorKind,
    context: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl Error {
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Self {
        Error {
            kind,
            context: context.into(),
            source: None,
        }
    }

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

    pub fn io(context: impl Into<String>, e: io::Error) -> Self {
        let kind = match e.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe => ErrorKind::Closed,
            _ => ErrorKind::Io,
        };
        Error::with_source(kind, context, e)
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn context(&self) -> &str {
        &self.context
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The name of an NBD error number, for messages.
pub fn errno_name(e: u32) -> &'static str {
    use crate::proto::*;
    match e {
        EPERM => "EPERM",
        EIO => "EIO",
        ENOMEM => "ENOMEM",
        EINVAL => "EINVAL",
        ENOSPC => "ENOSPC",
        EOVERFLOW => "EOVERFLOW",
        ENOTSUP => "ENOTSUP",
        ESHUTDOWN => "ESHUTDOWN",
        _ => "unknown",
    }
}
