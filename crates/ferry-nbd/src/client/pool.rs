//! Several connections to one export, reconnecting with back-off, and a
//! blocking facade for synchronous callers (a lazy volume's source).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::{Address, Client, ClientConfig};
use crate::error::{Error, ErrorKind, Result};
use crate::export::Extent;
use crate::proto::CONTEXT_ALLOCATION;

/// Back-off between reconnection attempts: 50 ms doubling to 2 s.
const BACKOFF_START: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// `n` connections to one export, used round-robin. A request that fails
/// because its connection died is retried once on a fresh connection
/// (reads, block status and writes of the same data are idempotent).
pub struct Pool {
    addr: Address,
    cfg: ClientConfig,
    conns: Vec<tokio::sync::Mutex<Option<Arc<Client>>>>,
    next: AtomicUsize,
    attempts: u32,
    size: u64,
}

impl Pool {
    /// Opens `n` connections (at least one). Several connections need the
    /// server to advertise CAN_MULTI_CONN for writes to be safe.
    pub async fn connect(addr: Address, cfg: ClientConfig, n: usize) -> Result<Pool> {
        let first = Client::connect(&addr, &cfg).await?;
        let size = first.size();
        let n = if first.can_multi_conn() || first.read_only() {
            n.max(1)
        } else {
            1
        };
        // The others at once: each handshake is a few round trips.
        let rest =
            futures::future::try_join_all((1..n).map(|_| Client::connect(&addr, &cfg))).await?;
        let conns = std::iter::once(first)
            .chain(rest)
            .map(|c| tokio::sync::Mutex::new(Some(Arc::new(c))))
            .collect();
        Ok(Pool {
            addr,
            cfg,
            conns,
            next: AtomicUsize::new(0),
            attempts: 8,
            size,
        })
    }

    /// How many reconnection attempts a request makes before failing.
    pub fn set_attempts(&mut self, n: u32) {
        self.attempts = n.max(1);
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// A live connection from slot `i`, reconnecting with back-off.
    async fn conn(&self, i: usize) -> Result<Arc<Client>> {
        let mut slot = self.conns[i].lock().await;
        if let Some(c) = slot.as_ref()
            && !c.is_dead()
        {
            return Ok(c.clone());
        }
        *slot = None;
        let mut delay = BACKOFF_START;
        let mut last = None;
        for attempt in 0..self.attempts {
            if attempt > 0 {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(BACKOFF_MAX);
            }
            match Client::connect(&self.addr, &self.cfg).await {
                Ok(c) => {
                    if c.size() != self.size {
                        return Err(Error::new(
                            ErrorKind::Protocol,
                            format!("export {} changed size on reconnect", self.cfg.export),
                        ));
                    }
                    let c = Arc::new(c);
                    *slot = Some(c.clone());
                    return Ok(c);
                }
                Err(e) => {
                    tracing::debug!(error = %e, attempt, "nbd reconnect failed");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::new(ErrorKind::Closed, "no connection")))
    }

    async fn with_retry<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: Fn(Arc<Client>) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        let c = self.conn(i).await?;
        match f(c.clone()).await {
            Err(e) if matches!(e.kind(), ErrorKind::Closed | ErrorKind::Io) => {
                // The connection failed a request: never hand it out again,
                // even if its reader has not noticed the close yet.
                self.forget(i, &c).await;
                let c = self.conn(i).await?;
                f(c).await
            }
            r => r,
        }
    }

    /// Drops slot `i`'s connection if it is still `c`.
    async fn forget(&self, i: usize, c: &Arc<Client>) {
        let mut slot = self.conns[i].lock().await;
        if slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, c)) {
            *slot = None;
        }
    }

    pub async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u32;
        let data = self
            .with_retry(|c| async move { c.read(offset, len).await })
            .await?;
        buf.copy_from_slice(&data);
        Ok(())
    }

    pub async fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.with_retry(|c| async move { c.write_at(offset, data, fua).await })
            .await
    }

    /// Flushes on one connection (covers all with CAN_MULTI_CONN, which
    /// `connect` requires for more than one connection).
    pub async fn flush(&self) -> Result<()> {
        self.with_retry(|c| async move { c.flush().await }).await
    }

    pub async fn block_status(&self, context: &str, offset: u64, len: u32) -> Result<Vec<Extent>> {
        self.with_retry(|c| async move { c.block_status(context, offset, len).await })
            .await
    }
}

/// A blocking facade over a [`Pool`] with its own small runtime, for
/// synchronous callers (never call it from inside an async task).
pub struct BlockingClient {
    rt: tokio::runtime::Runtime,
    pool: Pool,
}

impl BlockingClient {
    /// Connects `connections` connections selecting `base:allocation` and
    /// whatever `cfg.meta_contexts` lists.
    pub fn connect(addr: Address, mut cfg: ClientConfig, connections: usize) -> Result<Self> {
        if !cfg.meta_contexts.iter().any(|c| c == CONTEXT_ALLOCATION) {
            cfg.meta_contexts.push(CONTEXT_ALLOCATION.to_string());
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| Error::io("starting the client runtime", e))?;
        let pool = rt.block_on(Pool::connect(addr, cfg, connections))?;
        Ok(BlockingClient { rt, pool })
    }

    pub fn size(&self) -> u64 {
        self.pool.size()
    }

    /// Reads `buf.len()` bytes at `offset`, in pieces of at most 32 MiB.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let max = crate::proto::MAX_PAYLOAD as usize;
        self.rt.block_on(async {
            for (i, piece) in buf.chunks_mut(max).enumerate() {
                self.pool.read_at(offset + (i * max) as u64, piece).await?;
            }
            Ok(())
        })
    }

    pub fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.rt.block_on(self.pool.write_at(offset, data, fua))
    }

    pub fn flush(&self) -> Result<()> {
        self.rt.block_on(self.pool.flush())
    }

    /// The allocation map over `[offset, offset + len)`: asks again until
    /// the whole range is covered.
    pub fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.extents(CONTEXT_ALLOCATION, offset, len)
    }

    /// Extents of any negotiated context (e.g. `ferry:changed:<snapshot>`).
    pub fn extents(&self, context: &str, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= self.size())
            .ok_or_else(|| Error::new(ErrorKind::Invalid, format!("range {offset}+{len}")))?;
        self.rt.block_on(async {
            let mut out: Vec<Extent> = Vec::new();
            let mut pos = offset;
            while pos < end {
                let n = (end - pos).min(1 << 30) as u32;
                let v = self.pool.block_status(context, pos, n).await?;
                let mut got = 0u64;
                for x in v {
                    let l = x.length.min(end - pos - got);
                    crate::backend::push_extent(&mut out, l, x.flags);
                    got += l;
                }
                if got == 0 {
                    return Err(Error::new(ErrorKind::Protocol, "empty block status reply"));
                }
                pos += got;
            }
            Ok(out)
        })
    }
}
