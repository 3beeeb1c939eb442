//! The server: the table of exports, their access rules, and the accept
//! loops for TCP and unix sockets. Each connection runs on its own task;
//! a failing or hostile connection ends only itself.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio_rustls::TlsAcceptor;

use crate::buffers::Reserve;
use crate::error::{Error, ErrorKind, Result};
use crate::export::Export;
use crate::handshake::{self, Outcome};
use crate::transmission;
use crate::wire::{Opaque, Wire};

/// Bytes of buffers a server keeps for its next connections once theirs
/// ended or went idle: the payload buffers of a VM copy's connections
/// (4 connections with 8 writes of 4 MiB in flight) and then some.
const RESERVE_BYTES: usize = 64 << 20;
/// ...until none was used for this long.
const RESERVE_IDLE: std::time::Duration = std::time::Duration::from_secs(30);

/// How a server treats TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS; STARTTLS is answered ERR_UNSUP.
    Off,
    /// Clients may upgrade with STARTTLS.
    Optional,
    /// Every option but STARTTLS and ABORT is answered ERR_TLS_REQD.
    Required,
}

/// Access rules and description of one export.
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    pub description: String,
    /// When set, the export is reachable only as `<name>/<secret>`, or as
    /// `<name>` by a TLS client whose certificate the server verified (if
    /// `allow_tls_clients`). It is then also left out of `NBD_OPT_LIST`.
    pub secret: Option<String>,
    /// Let TLS clients with a verified certificate reach a secret export
    /// by its bare name.
    pub allow_tls_clients: bool,
}

pub(crate) struct ExportEntry {
    pub name: String,
    pub export: Arc<dyn Export>,
    pub options: ExportOptions,
}

pub(crate) struct Shared {
    exports: RwLock<BTreeMap<String, Arc<ExportEntry>>>,
    pub tls: Option<TlsAcceptor>,
    pub tls_mode: TlsMode,
    /// Buffers of connections that ended or went idle, for the next ones.
    pub reserve: Arc<Reserve>,
    /// Connections open now.
    connections: AtomicUsize,
}

/// What a connection knows of its own security, for access decisions.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Peer {
    pub tls: bool,
    pub verified_client: bool,
}

impl Shared {
    /// Finds the export a client asked for by `requested`, applying the
    /// access rules. Unknown and forbidden look the same to the client.
    pub fn lookup(&self, requested: &str, peer: Peer) -> Option<Arc<ExportEntry>> {
        let map = self.exports.read().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = map.get(requested) {
            match &e.options.secret {
                None => return Some(e.clone()),
                Some(_) if e.options.allow_tls_clients && peer.verified_client => {
                    return Some(e.clone());
                }
                Some(_) => {}
            }
        }
        let (name, secret) = requested.rsplit_once('/')?;
        let e = map.get(name)?;
        let want = e.options.secret.as_deref()?;
        constant_time_eq(want.as_bytes(), secret.as_bytes()).then(|| e.clone())
    }

    /// Exports `NBD_OPT_LIST` shows: those without a secret.
    pub fn listed(&self) -> Vec<(String, String)> {
        let map = self.exports.read().unwrap_or_else(|e| e.into_inner());
        map.values()
            .filter(|e| e.options.secret.is_none())
            .map(|e| (e.name.clone(), e.options.description.clone()))
            .collect()
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Send buffer asked for on unix connections.
const UNIX_SNDBUF: libc::c_int = 4 << 20;

/// Raises a unix socket's send buffer towards [`UNIX_SNDBUF`] (the kernel
/// caps it at `net.core.wmem_max`). Unix sockets start with
/// `net.core.wmem_default` (208 KiB) and, unlike TCP, never grow: a 1 MiB
/// read reply then takes five `sendto` calls, each after the client drained
/// the last and the runtime polled the socket writable again. Failure is
/// harmless (the default buffer stays), so it is only logged.
fn enlarge_send_buffer(stream: &tokio::net::UnixStream) {
    use std::os::fd::AsRawFd;
    let v = UNIX_SNDBUF;
    // SAFETY: setsockopt on a socket fd we own, with a pointer to a c_int
    // that lives across the call and its exact size.
    let r = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "SO_SNDBUF on a unix connection");
    }
}

/// An NBD server. Cheap to clone; clones share the export table.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
}

impl Default for Server {
    fn default() -> Self {
        Self::new()
    }
}

impl Server {
    pub fn new() -> Self {
        Self::with(None, TlsMode::Off)
    }

    fn with(tls: Option<TlsAcceptor>, tls_mode: TlsMode) -> Self {
        Server {
            shared: Arc::new(Shared {
                exports: RwLock::new(BTreeMap::new()),
                tls,
                tls_mode,
                reserve: Reserve::new(RESERVE_BYTES, RESERVE_IDLE),
                connections: AtomicUsize::new(0),
            }),
        }
    }

    /// A server with TLS; `mode` must not be `Off`.
    pub fn with_tls(config: Arc<rustls::ServerConfig>, mode: TlsMode) -> Self {
        Self::with(Some(TlsAcceptor::from(config)), mode)
    }

    /// Adds (or replaces) an export. Names may not contain `/`, which
    /// separates the secret.
    pub fn add_export(
        &self,
        name: &str,
        export: Arc<dyn Export>,
        options: ExportOptions,
    ) -> Result<()> {
        if name.contains('/') || name.len() > 4096 {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!("export name {name:?} (no '/', at most 4096 bytes)"),
            ));
        }
        let mut map = self
            .shared
            .exports
            .write()
            .unwrap_or_else(|e| e.into_inner());
        map.insert(
            name.to_string(),
            Arc::new(ExportEntry {
                name: name.to_string(),
                export,
                options,
            }),
        );
        Ok(())
    }

    /// Removes an export; connections already open keep it until they close.
    pub fn remove_export(&self, name: &str) -> bool {
        let mut map = self
            .shared
            .exports
            .write()
            .unwrap_or_else(|e| e.into_inner());
        map.remove(name).is_some()
    }

    /// Connections open now (handshake or transmission).
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Accepts TCP connections until the listener fails.
    pub async fn serve_tcp(&self, listener: TcpListener) -> Result<()> {
        loop {
            let (stream, addr) = listener
                .accept()
                .await
                .map_err(|e| Error::io("accepting a TCP connection", e))?;
            let _ = stream.set_nodelay(true);
            self.spawn(stream, addr.to_string(), false);
        }
    }

    /// Accepts unix socket connections until the listener fails.
    pub async fn serve_unix(&self, listener: UnixListener) -> Result<()> {
        loop {
            let (stream, _) = listener
                .accept()
                .await
                .map_err(|e| Error::io("accepting a unix connection", e))?;
            enlarge_send_buffer(&stream);
            self.spawn(stream, "unix".into(), true);
        }
    }

    /// Runs a connection on its own task; `unix`: its client can queue
    /// little (see [`Server::run`]).
    fn spawn<S>(&self, stream: S, peer: String, unix: bool)
    where
        S: Wire + 'static,
    {
        let server = self.clone();
        tokio::spawn(async move {
            if let Err(e) = server.run(stream, unix).await {
                tracing::debug!(peer, error = %e, "nbd connection ended");
            }
        });
    }

    /// Runs one connection to its end: handshake, optional STARTTLS, then
    /// the transmission phase.
    pub async fn handle<S>(&self, stream: S) -> Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.run(Opaque(stream), false).await
    }

    /// [`Server::handle`]; `unix`: the client can queue only a unix
    /// socket's send buffer, so large writes are applied in pieces as
    /// their payload arrives.
    pub(crate) async fn run<S>(&self, mut stream: S, unix: bool) -> Result<()>
    where
        S: Wire + 'static,
    {
        let shared = &self.shared;
        shared.connections.fetch_add(1, Ordering::Relaxed);
        let _open = Open(shared);
        let no_zeroes = handshake::greet(&mut stream).await?;
        let mut peer = Peer::default();
        match handshake::negotiate(&mut stream, shared, peer, no_zeroes).await? {
            Outcome::Abort => Ok(()),
            Outcome::Go(session) => {
                transmission::serve(stream, session, shared.reserve.clone(), unix).await
            }
            Outcome::StartTls => {
                let acceptor = shared
                    .tls
                    .clone()
                    .ok_or_else(|| Error::new(ErrorKind::Tls, "starttls without tls"))?;
                let mut tls = acceptor
                    .accept(stream)
                    .await
                    .map_err(|e| Error::with_source(ErrorKind::Tls, "tls handshake", e))?;
                peer.tls = true;
                peer.verified_client = tls.get_ref().1.peer_certificates().is_some();
                match handshake::negotiate(&mut tls, shared, peer, no_zeroes).await? {
                    Outcome::Go(session) => {
                        transmission::serve(tls, session, shared.reserve.clone(), unix).await
                    }
                    Outcome::Abort => Ok(()),
                    Outcome::StartTls => Err(Error::new(ErrorKind::Protocol, "second starttls")),
                }
            }
        }
    }
}

/// Counts a connection open for as long as it lives.
struct Open<'a>(&'a Shared);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}
