//! What a connection runs over, and sending from mapped memory on it.
//!
//! A large read whose bytes the backend has in a mapped file
//! ([`Export::try_read_mapped`](crate::export::Export::try_read_mapped)) is
//! sent with `send(2)` straight from the mapping over plain TCP and unix
//! sockets: the kernel copies the page cache into the socket once, where
//! `pread` into a buffer and a write of the buffer copy twice. It is a
//! copy, not a page reference (`sendfile` would queue references to page
//! cache pages that the backend may rewrite before the peer reads them).

use std::io;
use std::os::fd::AsRawFd;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, Interest};
use tokio::net::{TcpStream, UnixStream};

use crate::export::Mapped;

/// A connection's byte stream.
pub trait Wire: AsyncRead + AsyncWrite + Unpin + Send {
    /// The socket beneath, when replies may be sent from mapped memory.
    fn raw(&self) -> Option<&dyn RawSocket> {
        None
    }
}

/// A socket sent on from raw memory.
pub trait RawSocket: Sync {
    /// Ready when the socket may take more bytes.
    fn poll_send_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// One non-blocking `send` of `[addr, addr + len)`; `WouldBlock` when
    /// the socket is full.
    ///
    /// # Safety
    /// The range must be memory the kernel may read (mapped, readable)
    /// for the duration of the call.
    unsafe fn try_send(&self, addr: usize, len: usize) -> io::Result<usize>;
}

/// `send(2)` on a non-blocking socket.
///
/// # Safety
/// As [`RawSocket::try_send`].
unsafe fn send_raw(fd: i32, addr: usize, len: usize) -> io::Result<usize> {
    // SAFETY: the caller vouches for the range; the kernel copies from it
    // into the socket and turns a fault (a page that cannot be read) into
    // EFAULT, not a signal. MSG_NOSIGNAL: a closed peer is an error.
    let n = unsafe { libc::send(fd, addr as *const libc::c_void, len, libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

macro_rules! raw_socket {
    ($t:ty) => {
        impl RawSocket for $t {
            fn poll_send_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                self.poll_write_ready(cx)
            }

            unsafe fn try_send(&self, addr: usize, len: usize) -> io::Result<usize> {
                self.try_io(Interest::WRITABLE, || {
                    // SAFETY: as this function's own contract.
                    unsafe { send_raw(self.as_raw_fd(), addr, len) }
                })
            }
        }

        impl Wire for $t {
            fn raw(&self) -> Option<&dyn RawSocket> {
                Some(self)
            }
        }
    };
}

raw_socket!(TcpStream);
raw_socket!(UnixStream);

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Wire for tokio_rustls::server::TlsStream<S> {}

impl Wire for DuplexStream {}

/// Any stream, served without sends from mapped memory
/// ([`Server::handle`](crate::server::Server::handle)).
pub struct Opaque<S>(pub S);

impl<S: AsyncRead + Unpin> AsyncRead for Opaque<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Opaque<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Wire for Opaque<S> {}

pub(crate) fn page_size() -> usize {
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf only reads a constant of the system.
        let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(n).unwrap_or(4096)
    })
}

/// Sends every byte of `m` on `sock`, waiting whenever the socket is full.
pub(crate) async fn send_mapped(sock: &dyn RawSocket, m: &Mapped) -> io::Result<()> {
    for &(addr, len) in m.ranges() {
        let mut done = 0;
        while done < len {
            std::future::poll_fn(|cx| sock.poll_send_ready(cx)).await?;
            // SAFETY: the range is inside `m`'s mapping, which `m` keeps
            // mapped while we borrow it (the contract of `Mapped::new`).
            match unsafe { sock.try_send(addr + done, len - done) } {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}
