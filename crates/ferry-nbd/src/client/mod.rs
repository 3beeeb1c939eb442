//! The async NBD client: one connection with many requests in flight.
//!
//! Requests are written under a lock; one reader task takes replies off the
//! socket and completes the request with the same cookie, assembling read
//! data from data and hole chunks. When the connection dies every pending
//! request fails with [`ErrorKind::Closed`]; [`Pool`] reconnects.

mod handshake;
mod pool;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::oneshot;

pub use pool::{BlockingClient, Pool};

use crate::error::{Error, ErrorKind, Result};
use crate::export::Extent;
use crate::proto::*;

pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
pub(crate) type BoxIo = Box<dyn Io>;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Unix(PathBuf),
    /// `host:port`.
    Tcp(String),
}

/// What to ask the server for.
#[derive(Clone, Default)]
pub struct ClientConfig {
    pub export: String,
    /// Metadata contexts to select (`base:allocation`, `ferry:changed:<s>`).
    pub meta_contexts: Vec<String>,
    /// TLS configuration and the server name to verify.
    pub tls: Option<(Arc<rustls::ClientConfig>, String)>,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("export", &self.export)
            .field("meta_contexts", &self.meta_contexts)
            .field("tls", &self.tls.as_ref().map(|t| &t.1))
            .finish()
    }
}

async fn open(addr: &Address) -> Result<BoxIo> {
    Ok(match addr {
        Address::Unix(p) => Box::new(
            tokio::net::UnixStream::connect(p)
                .await
                .map_err(|e| Error::io(format!("connecting to {}", p.display()), e))?,
        ),
        Address::Tcp(a) => {
            let s = tokio::net::TcpStream::connect(a)
                .await
                .map_err(|e| Error::io(format!("connecting to {a}"), e))?;
            let _ = s.set_nodelay(true);
            Box::new(s)
        }
    })
}

/// Lists the exports of a server.
pub async fn list_exports(addr: &Address, cfg: &ClientConfig) -> Result<Vec<String>> {
    let io = handshake::greet(open(addr).await?).await?;
    let mut io = handshake::starttls(io, cfg).await?;
    let names = handshake::list(&mut io).await?;
    let _ = handshake::send_option(&mut io, OPT_ABORT, &[]).await;
    Ok(names)
}

struct Pending {
    kind: u16,
    offset: u64,
    buf: Vec<u8>,
    extents: Vec<(u32, Vec<Extent>)>,
    error: Option<u32>,
    tx: oneshot::Sender<Result<Completed>>,
}

struct Completed {
    buf: Vec<u8>,
    extents: Vec<(u32, Vec<Extent>)>,
}

struct Shared {
    pending: Mutex<HashMap<u64, Pending>>,
    dead: AtomicBool,
}

/// One NBD connection.
pub struct Client {
    writer: tokio::sync::Mutex<WriteHalf<BoxIo>>,
    shared: Arc<Shared>,
    cookie: AtomicU64,
    size: u64,
    flags: u16,
    structured: bool,
    contexts: Vec<(u32, String)>,
    export: String,
    /// The task reading replies. It holds the socket's read half, so the
    /// connection stays open until it ends: dropping the client ends it.
    reader: tokio::task::AbortHandle,
}

impl Drop for Client {
    /// Closes the connection (the server sees the client go, as after a
    /// disconnect; requests not answered yet were abandoned with their
    /// futures).
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Client {
    /// Connects, negotiates (STARTTLS if configured, structured replies,
    /// meta contexts, GO) and starts the reply reader.
    pub async fn connect(addr: &Address, cfg: &ClientConfig) -> Result<Client> {
        let io = handshake::greet(open(addr).await?).await?;
        let io = handshake::starttls(io, cfg).await?;
        let n = handshake::go(io, cfg).await?;
        let (r, w) = tokio::io::split(n.io);
        let shared = Arc::new(Shared {
            pending: Mutex::new(HashMap::new()),
            dead: AtomicBool::new(false),
        });
        let s2 = shared.clone();
        let structured = n.structured;
        let reader = tokio::spawn(async move {
            let e = read_replies(r, &s2, structured).await;
            s2.dead.store(true, Ordering::SeqCst);
            let mut p = s2.pending.lock().unwrap_or_else(|e| e.into_inner());
            for (_, req) in p.drain() {
                let _ = req.tx.send(Err(Error::new(
                    ErrorKind::Closed,
                    format!("connection lost: {e}"),
                )));
            }
        })
        .abort_handle();
        Ok(Client {
            writer: tokio::sync::Mutex::new(w),
            shared,
            cookie: AtomicU64::new(1),
            size: n.size,
            flags: n.flags,
            structured: n.structured,
            contexts: n.contexts,
            export: cfg.export.clone(),
            reader,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }
    pub fn transmission_flags(&self) -> u16 {
        self.flags
    }
    pub fn read_only(&self) -> bool {
        self.flags & TF_READ_ONLY != 0
    }
    pub fn can_multi_conn(&self) -> bool {
        self.flags & TF_CAN_MULTI_CONN != 0
    }
    pub fn structured(&self) -> bool {
        self.structured
    }
    /// Metadata contexts the server agreed to: (id, name).
    pub fn contexts(&self) -> &[(u32, String)] {
        &self.contexts
    }
    pub fn is_dead(&self) -> bool {
        self.shared.dead.load(Ordering::SeqCst)
    }

    async fn request(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<Completed> {
        if self.is_dead() {
            return Err(Error::new(
                ErrorKind::Closed,
                format!("export {}", self.export),
            ));
        }
        let cookie = self.cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let buf = if kind == CMD_READ {
            vec![0u8; len as usize]
        } else {
            Vec::new()
        };
        self.shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                cookie,
                Pending {
                    kind,
                    offset,
                    buf,
                    extents: Vec::new(),
                    error: None,
                    tx,
                },
            );
        let req = Request {
            flags,
            kind,
            cookie,
            offset,
            length: len,
        };
        let mut h = Vec::with_capacity(REQUEST_LEN);
        req.encode(&mut h);
        let sent = async {
            let mut w = self.writer.lock().await;
            w.write_all(&h).await?;
            if !payload.is_empty() {
                w.write_all(payload).await?;
            }
            w.flush().await
        }
        .await;
        if let Err(e) = sent {
            self.shared
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&cookie);
            return Err(Error::io(
                format!("export {}: sending request", self.export),
                e,
            ));
        }
        rx.await
            .map_err(|_| Error::new(ErrorKind::Closed, format!("export {}", self.export)))?
    }

    fn check(&self, offset: u64, len: u64, what: &str) -> Result<u32> {
        if len > u64::from(MAX_PAYLOAD) || offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!("export {}: {what} of {len} bytes at {offset}", self.export),
            ));
        }
        Ok(len as u32)
    }

    /// Reads `buf.len()` bytes (at most 32 MiB) at `offset`.
    pub async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = self.check(offset, buf.len() as u64, "read")?;
        let c = self.request(CMD_READ, 0, offset, len, &[]).await?;
        buf.copy_from_slice(&c.buf);
        Ok(())
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>> {
        self.check(offset, len.into(), "read")?;
        Ok(self.request(CMD_READ, 0, offset, len, &[]).await?.buf)
    }

    pub async fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let len = self.check(offset, data.len() as u64, "write")?;
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.request(CMD_WRITE, flags, offset, len, data)
            .await
            .map(|_| ())
    }

    pub async fn flush(&self) -> Result<()> {
        self.request(CMD_FLUSH, 0, 0, 0, &[]).await.map(|_| ())
    }

    pub async fn trim(&self, offset: u64, len: u32) -> Result<()> {
        self.request(CMD_TRIM, 0, offset, len, &[])
            .await
            .map(|_| ())
    }

    pub async fn write_zeroes(&self, offset: u64, len: u32, no_hole: bool) -> Result<()> {
        let flags = if no_hole { CMD_FLAG_NO_HOLE } else { 0 };
        self.request(CMD_WRITE_ZEROES, flags, offset, len, &[])
            .await
            .map(|_| ())
    }

    /// Extents of `context` (as selected at connect) over the range.
    pub async fn block_status(&self, context: &str, offset: u64, len: u32) -> Result<Vec<Extent>> {
        let Some(&(id, _)) = self.contexts.iter().find(|(_, n)| n == context) else {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!("export {}: context {context} not negotiated", self.export),
            ));
        };
        let c = self.request(CMD_BLOCK_STATUS, 0, offset, len, &[]).await?;
        c.extents
            .into_iter()
            .find(|(i, _)| *i == id)
            .map(|(_, v)| v)
            .ok_or_else(|| Error::new(ErrorKind::Protocol, format!("no extents for {context}")))
    }

    /// Sends NBD_CMD_DISC; the server closes after answering what is in flight.
    pub async fn disconnect(&self) -> Result<()> {
        let mut h = Vec::with_capacity(REQUEST_LEN);
        Request {
            flags: 0,
            kind: CMD_DISC,
            cookie: 0,
            offset: 0,
            length: 0,
        }
        .encode(&mut h);
        let mut w = self.writer.lock().await;
        w.write_all(&h)
            .await
            .map_err(|e| Error::io("sending disconnect", e))?;
        w.flush()
            .await
            .map_err(|e| Error::io("sending disconnect", e))?;
        let _ = w.shutdown().await;
        Ok(())
    }
}

fn take(shared: &Shared, cookie: u64) -> Result<Pending> {
    shared
        .pending
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&cookie)
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Protocol,
                format!("reply to unknown cookie {cookie}"),
            )
        })
}

fn finish(p: Pending) {
    let r = match p.error {
        Some(e) => Err(Error::new(
            ErrorKind::Remote(e),
            format!("command {}", p.kind),
        )),
        None => Ok(Completed {
            buf: p.buf,
            extents: p.extents,
        }),
    };
    let _ = p.tx.send(r);
}

async fn read_replies(mut r: ReadHalf<BoxIo>, shared: &Shared, structured: bool) -> Error {
    let mut chunk = Vec::new();
    loop {
        let res: Result<()> = async {
            let magic = r
                .read_u32()
                .await
                .map_err(|e| Error::io("reading reply", e))?;
            match magic {
                SIMPLE_REPLY_MAGIC => {
                    let mut h = [0u8; 12];
                    r.read_exact(&mut h)
                        .await
                        .map_err(|e| Error::io("reading reply", e))?;
                    let (error, cookie) = (be32(&h[0..4]), be64(&h[4..12]));
                    let mut p = take(shared, cookie)?;
                    if error != 0 {
                        p.error = Some(error);
                    } else if p.kind == CMD_READ {
                        if structured {
                            return Err(Error::new(
                                ErrorKind::Protocol,
                                "simple reply to a structured read",
                            ));
                        }
                        r.read_exact(&mut p.buf)
                            .await
                            .map_err(|e| Error::io("reading data", e))?;
                    }
                    finish(p);
                    Ok(())
                }
                STRUCTURED_REPLY_MAGIC => {
                    let mut h = [0u8; 16];
                    r.read_exact(&mut h)
                        .await
                        .map_err(|e| Error::io("reading reply", e))?;
                    let (flags, kind, cookie, len) = (
                        be16(&h[0..2]),
                        be16(&h[2..4]),
                        be64(&h[4..12]),
                        be32(&h[12..16]),
                    );
                    if len > MAX_PAYLOAD + 4096 {
                        return Err(Error::new(
                            ErrorKind::Protocol,
                            format!("chunk of {len} bytes"),
                        ));
                    }
                    let mut p = take(shared, cookie)?;
                    let bad = || {
                        Error::new(
                            ErrorKind::Protocol,
                            format!("chunk type {kind} for cookie {cookie}"),
                        )
                    };
                    if kind == REPLY_TYPE_OFFSET_DATA && p.kind == CMD_READ && len >= 8 {
                        let off = r
                            .read_u64()
                            .await
                            .map_err(|e| Error::io("reading data", e))?;
                        let n = (len - 8) as usize;
                        let at = off.checked_sub(p.offset).ok_or_else(bad)? as usize;
                        if at.checked_add(n).is_none_or(|e| e > p.buf.len()) {
                            return Err(bad());
                        }
                        r.read_exact(&mut p.buf[at..at + n])
                            .await
                            .map_err(|e| Error::io("reading data", e))?;
                    } else {
                        chunk.resize(len as usize, 0);
                        r.read_exact(&mut chunk)
                            .await
                            .map_err(|e| Error::io("reading chunk", e))?;
                        match kind {
                            REPLY_TYPE_NONE => {}
                            REPLY_TYPE_OFFSET_HOLE if p.kind == CMD_READ && len == 12 => {
                                let at = be64(&chunk[0..8]).checked_sub(p.offset).ok_or_else(bad)?
                                    as usize;
                                let n = be32(&chunk[8..12]) as usize;
                                if at.checked_add(n).is_none_or(|e| e > p.buf.len()) {
                                    return Err(bad());
                                }
                                p.buf[at..at + n].fill(0);
                            }
                            REPLY_TYPE_BLOCK_STATUS
                                if p.kind == CMD_BLOCK_STATUS && len >= 4 && len % 8 == 4 =>
                            {
                                let id = be32(&chunk[0..4]);
                                let v = chunk[4..]
                                    .chunks_exact(8)
                                    .map(|d| Extent {
                                        length: be32(&d[0..4]).into(),
                                        flags: be32(&d[4..8]),
                                    })
                                    .collect();
                                p.extents.push((id, v));
                            }
                            REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET if len >= 6 => {
                                p.error = Some(be32(&chunk[0..4]));
                            }
                            _ => return Err(bad()),
                        }
                    }
                    if flags & REPLY_FLAG_DONE != 0 {
                        finish(p);
                    } else {
                        shared
                            .pending
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(cookie, p);
                    }
                    Ok(())
                }
                m => Err(Error::new(
                    ErrorKind::Protocol,
                    format!("reply magic {m:#x}"),
                )),
            }
        }
        .await;
        if let Err(e) = res {
            return e;
        }
    }
}
