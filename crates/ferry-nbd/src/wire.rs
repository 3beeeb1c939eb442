//! What a connection runs over, sending from mapped memory on it, and
//! receiving large writes through a pipe ([`Pipe`]).
//!
//! A large read whose bytes the backend has in a mapped file
//! ([`Export::try_read_mapped`](crate::export::Export::try_read_mapped)) is
//! sent with `send(2)` straight from the mapping over plain TCP and unix
//! sockets: the kernel copies the page cache into the socket once, where
//! `pread` into a buffer and a write of the buffer copy twice. It is a
//! copy, not a page reference (`sendfile` would queue references to page
//! cache pages that the backend may rewrite before the peer reads them).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
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

    /// Ready when the socket has bytes to receive (or is closed).
    fn poll_recv_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// One non-blocking `splice` of up to `len` received bytes into the
    /// pipe whose write end is `pipe` (page references, no copy); 0 when
    /// the peer closed; `WouldBlock` when nothing waits.
    fn try_splice(&self, pipe: BorrowedFd<'_>, len: usize) -> io::Result<usize>;
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

            fn poll_recv_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                self.poll_read_ready(cx)
            }

            fn try_splice(&self, pipe: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
                self.try_io(Interest::READABLE, || {
                    splice(self.as_fd(), pipe, None, len, libc::SPLICE_F_NONBLOCK)
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

/// One `splice(2)` of up to `len` bytes from `from` into `to` (at `at` in
/// `to` when it is a file); bytes moved.
fn splice(
    from: BorrowedFd<'_>,
    to: BorrowedFd<'_>,
    at: Option<&mut i64>,
    len: usize,
    flags: u32,
) -> io::Result<usize> {
    let at = at.map_or(std::ptr::null_mut(), |a| a as *mut i64);
    // SAFETY: both descriptors are open (borrowed for the call); `at` is
    // null or points to an offset the kernel reads and advances.
    let n = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            at,
            len,
            flags | libc::SPLICE_F_MOVE,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A connection's pipe for large writes: the payload is spliced from the
/// socket into it (the kernel hands over the socket's pages) and from it
/// into the backend's file, the one copy of each byte. It is emptied after
/// every piece, so a splice into it never finds it full.
pub(crate) struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    /// Bytes in the pipe.
    held: usize,
}

impl Pipe {
    /// Room asked for: a piece of a write. (A pipe's room is counted in
    /// pages; the socket's pages may be partly filled.)
    const ROOM: i32 = 1 << 20;

    pub(crate) fn new() -> io::Result<Pipe> {
        let mut fds = [0i32; 2];
        // SAFETY: pipe2 writes two descriptors into the array it is given.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 just opened both; nothing else owns them.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: F_SETPIPE_SZ on a pipe we own. Refused above the
        // system's limit: the default room then does, in smaller pieces.
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, Self::ROOM) };
        Ok(Pipe { r, w, held: 0 })
    }

    /// Bytes in the pipe.
    pub(crate) fn held(&self) -> usize {
        self.held
    }

    /// Splices up to `len` (> 0) bytes received on `sock` into the empty
    /// pipe, waiting until some arrive; 0 when the peer closed.
    pub(crate) async fn receive(&mut self, sock: &dyn RawSocket, len: usize) -> io::Result<usize> {
        debug_assert_eq!(self.held, 0);
        loop {
            std::future::poll_fn(|cx| sock.poll_recv_ready(cx)).await?;
            match sock.try_splice(self.w.as_fd(), len) {
                Ok(n) => {
                    self.held += n;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Moves the next `len` bytes of the pipe into `file` at `at`. A file
    /// that takes no splice gets them written from a buffer.
    pub(crate) fn write_to(&mut self, file: BorrowedFd<'_>, at: u64, len: usize) -> io::Result<()> {
        if len > self.held {
            return Err(io::Error::other(
                "more bytes asked of the pipe than it holds",
            ));
        }
        let mut off = i64::try_from(at).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let mut left = len;
        while left > 0 {
            match splice(self.r.as_fd(), file, Some(&mut off), left, 0) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    left -= n;
                    self.held -= n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) && left == len => {
                    let mut buf = Vec::with_capacity(left);
                    self.read_into(&mut buf, left)?;
                    let file = std::fs::File::from(file.try_clone_to_owned()?);
                    return std::os::unix::fs::FileExt::write_all_at(&file, &buf, at);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Appends the next `len` bytes of the pipe to `buf`.
    pub(crate) fn read_into(&mut self, buf: &mut Vec<u8>, len: usize) -> io::Result<()> {
        let len = len.min(self.held);
        buf.reserve(len);
        let mut left = len;
        while left > 0 {
            let spare = buf.spare_capacity_mut();
            // SAFETY: reads at most `left` bytes into the vector's spare
            // capacity, which `reserve` made at least that long.
            let n = unsafe { libc::read(self.r.as_raw_fd(), spare.as_mut_ptr().cast(), left) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            // SAFETY: `read` initialised the `n` bytes after the length.
            unsafe { buf.set_len(buf.len() + n as usize) };
            left -= n as usize;
            self.held -= n as usize;
        }
        Ok(())
    }

    /// Empties the pipe (the bytes of a write that failed).
    pub(crate) fn discard(&mut self) -> io::Result<()> {
        let mut scratch = Vec::new();
        while self.held > 0 {
            scratch.clear();
            self.read_into(&mut scratch, self.held.min(256 << 10))?;
        }
        Ok(())
    }
}
