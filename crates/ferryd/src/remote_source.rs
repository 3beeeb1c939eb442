//! A volume of another host, read over NBD, as the [`ChunkSource`] of a
//! lazy volume (the adapter lives here because `ferry-nbd` must not depend
//! on the pool).
//!
//! The connection is made on first use, not at attach, so a restarted
//! ferryd re-attaches its lazy volumes even while their source host is
//! down. A failed request drops the connection; the next one reconnects.
//! While the source cannot be reached, [`OnMissing::Wait`] makes a read
//! retry until it answers (the guest's I/O waits, as with QEMU's
//! `rerror=stop`), [`OnMissing::Error`] lets it fail after the pool's few
//! attempts. [`RemoteSource::down`] says since when and why, for status
//! reports; [`RemoteSource::close`] ends any waiting (the volume is being
//! removed).
//!
//! Calls block: they must come from a thread that does not drive async
//! tasks (the NBD server's blocking threads, a hydrator thread).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_api::OnMissing;
use ferry_nbd::client::Address;
use ferry_nbd::proto::{STATE_HOLE, STATE_ZERO};
use ferry_nbd::{BlockingClient, ClientConfig};
use ferry_pool::{ChunkSource, Extent, ExtentKind};

/// Connections per source.
const CONNECTIONS: usize = 2;
/// Pause between attempts while waiting for a source to come back.
const WAIT_RETRY: Duration = Duration::from_millis(500);

pub struct RemoteSource {
    addr: String,
    export: String,
    size: u64,
    on_missing: OnMissing,
    client: Mutex<Option<Arc<BlockingClient>>>,
    down: Mutex<Option<(Instant, String)>>,
    closed: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RemoteSource {
    /// `addr` is `host:port`, `export` the TCP export name
    /// (`<name>/<secret>`), `size` the volume's size as the source said.
    pub fn new(addr: &str, export: &str, size: u64, on_missing: OnMissing) -> RemoteSource {
        RemoteSource {
            addr: addr.to_string(),
            export: export.to_string(),
            size,
            on_missing,
            client: Mutex::new(None),
            down: Mutex::new(None),
            closed: AtomicBool::new(false),
        }
    }

    /// Why the source cannot be reached, and for how long, if it cannot.
    pub fn down(&self) -> Option<String> {
        lock(&self.down).as_ref().map(|(t, e)| {
            format!(
                "source {} unreachable for {:.0?}: {e}",
                self.addr,
                t.elapsed()
            )
        })
    }

    /// Stops every waiting read (they fail); later reads fail at once.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    fn connect(&self) -> io::Result<Arc<BlockingClient>> {
        let mut slot = lock(&self.client);
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let cfg = ClientConfig {
            export: self.export.clone(),
            meta_contexts: Vec::new(),
            tls: None,
        };
        let c = BlockingClient::connect(Address::Tcp(self.addr.clone()), cfg, CONNECTIONS)
            .map_err(|e| io::Error::other(format!("connecting to {}: {e}", self.addr)))?;
        if c.size() < self.size {
            return Err(io::Error::other(format!(
                "the export at {} has {} bytes, the volume {}",
                self.addr,
                c.size(),
                self.size
            )));
        }
        let c = Arc::new(c);
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Runs `f` on a connection, reconnecting; waits for the source in
    /// `Wait` mode.
    fn with<T>(&self, mut f: impl FnMut(&BlockingClient) -> ferry_nbd::Result<T>) -> io::Result<T> {
        loop {
            if self.closed.load(Ordering::Acquire) {
                return Err(io::Error::other(format!(
                    "source {} was detached",
                    self.addr
                )));
            }
            let r = self
                .connect()
                .and_then(|c| f(&c).map_err(|e| io::Error::other(e.to_string())));
            match r {
                Ok(v) => {
                    if lock(&self.down).take().is_some() {
                        tracing::info!("source {} answers again", self.addr);
                    }
                    return Ok(v);
                }
                Err(e) => {
                    *lock(&self.client) = None;
                    let first = {
                        let mut d = lock(&self.down);
                        let first = d.is_none();
                        let since = d.as_ref().map_or_else(Instant::now, |(t, _)| *t);
                        *d = Some((since, e.to_string()));
                        first
                    };
                    if first {
                        tracing::warn!("source {} unreachable: {e}", self.addr);
                    }
                    if self.on_missing == OnMissing::Error {
                        return Err(e);
                    }
                    std::thread::sleep(WAIT_RETRY);
                }
            }
        }
    }
}

impl ChunkSource for RemoteSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut tmp = vec![0u8; buf.len()];
        self.with(|c| c.read_at(off, &mut tmp))?;
        buf.copy_from_slice(&tmp);
        Ok(())
    }

    fn allocation(&self, off: u64, len: u64) -> Option<Vec<Extent>> {
        if lock(&self.down).is_some() {
            // Do not wait twice (the read that follows waits).
            return None;
        }
        let c = self.connect().ok()?;
        let ext = match c.allocation(off, len) {
            Ok(e) => e,
            Err(_) => {
                *lock(&self.client) = None;
                return None;
            }
        };
        let mut at = off;
        Some(
            ext.into_iter()
                .map(|x| {
                    let kind = if x.flags & STATE_ZERO != 0 {
                        if x.flags & STATE_HOLE != 0 {
                            ExtentKind::Hole
                        } else {
                            ExtentKind::Zero
                        }
                    } else {
                        ExtentKind::Data
                    };
                    let e = Extent {
                        offset: at,
                        length: x.length,
                        kind,
                    };
                    at += x.length;
                    e
                })
                .collect(),
        )
    }
}
