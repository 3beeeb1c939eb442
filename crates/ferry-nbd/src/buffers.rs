//! Byte buffers kept for reuse.
//!
//! A fresh buffer costs the kernel a page fault and a page clearing per
//! 4 KiB the first time it is written: a quarter of the server's CPU time
//! in large sequential transfers when every request had its own. So each
//! connection keeps the buffers of its replies and payloads ([`Spares`]),
//! and a server keeps those of connections that ended or went idle in a
//! [`Reserve`] for its next connections. A VM copy opens fresh connections
//! for every copy, and before the reserve nearly every byte it sent
//! landed in a freshly faulted buffer on the receiving host (~100 MB of
//! page faults for an 80 MiB copy, measured with `perf record -e
//! page-faults`).

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

/// Buffers smaller than this are not kept for reuse...
pub(crate) const SPARE_MIN: usize = 64 << 10;
/// ...nor larger than this.
pub(crate) const SPARE_MAX: usize = (4 << 20) + 4096;
/// Bytes of spare buffers a busy connection keeps at most: enough for the
/// replies of 32 reads of 1 MiB in flight (with 8 MiB, a client with 16 in
/// flight got a fresh buffer for every other read, and faulting in and
/// zeroing it took a tenth of the server's time).
pub(crate) const SPARE_BYTES: usize = 40 << 20;
/// What a connection keeps once it has had nothing to do for
/// [`SPARE_IDLE`]: an idle connection does not sit on a busy one's buffers
/// (the rest goes to the server's reserve).
pub(crate) const SPARE_IDLE_BYTES: usize = 4 << 20;
pub(crate) const SPARE_IDLE: Duration = Duration::from_secs(1);

/// Buffers kept for whoever needs one next, up to a number of bytes, and
/// let go of once none was taken or given for a while (a task of the
/// tokio runtime the first buffer was given on checks; without a runtime
/// they are kept until the reserve is dropped).
pub struct Reserve {
    cap: usize,
    idle: Duration,
    inner: Mutex<Held>,
}

struct Held {
    shelf: Shelf,
    used: Instant,
    watched: bool,
}

/// Buffers and the bytes of their capacities.
#[derive(Default)]
struct Shelf {
    bufs: Vec<Vec<u8>>,
    bytes: usize,
}

impl Shelf {
    /// The most recently put buffer of at least `min` bytes of capacity
    /// (its pages the likeliest in cache).
    fn take_at_least(&mut self, min: usize) -> Option<Vec<u8>> {
        let i = self.bufs.iter().rposition(|b| b.capacity() >= min)?;
        let v = self.bufs.swap_remove(i);
        self.bytes -= v.capacity();
        Some(v)
    }

    /// The most recently put buffer.
    fn pop(&mut self) -> Option<Vec<u8>> {
        let v = self.bufs.pop()?;
        self.bytes -= v.capacity();
        Some(v)
    }

    /// Keeps `v` if that stays within `cap` bytes; gives it back if not.
    fn put(&mut self, v: Vec<u8>, cap: usize) -> Result<(), Vec<u8>> {
        if self.bytes + v.capacity() > cap {
            return Err(v);
        }
        self.bytes += v.capacity();
        self.bufs.push(v);
        Ok(())
    }
}

impl Reserve {
    /// A reserve keeping up to `cap` bytes until `idle` passes unused.
    pub fn new(cap: usize, idle: Duration) -> Arc<Self> {
        Arc::new(Reserve {
            cap,
            idle,
            inner: Mutex::new(Held {
                shelf: Shelf::default(),
                used: Instant::now(),
                watched: false,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A kept buffer of at least `len` bytes of capacity (its length and
    /// contents as given back), if any: the most recently given of those,
    /// whose pages are the likeliest in cache.
    pub fn take_at_least(&self, len: usize) -> Option<Vec<u8>> {
        let mut g = self.lock();
        g.used = Instant::now();
        g.shelf.take_at_least(len)
    }

    /// Keeps `v` if there is room (it is dropped otherwise).
    pub fn give(self: &Arc<Self>, v: Vec<u8>) {
        if v.capacity() == 0 {
            return;
        }
        let mut g = self.lock();
        g.used = Instant::now();
        if g.shelf.put(v, self.cap).is_err() {
            return;
        }
        if !g.watched
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            g.watched = true;
            rt.spawn(watch(Arc::downgrade(self)));
        }
    }

    /// Bytes of the buffers kept.
    pub fn held(&self) -> usize {
        self.lock().shelf.bytes
    }

    /// Lets go of every buffer if the reserve was not used for its idle
    /// time; whether it did (and so stops being watched).
    fn release_if_idle(&self) -> bool {
        let mut g = self.lock();
        if g.used.elapsed() < self.idle {
            return false;
        }
        g.shelf = Shelf::default();
        g.watched = false;
        true
    }
}

/// Lets a reserve's buffers go once it has been idle; ends with that, or
/// with the reserve.
async fn watch(r: Weak<Reserve>) {
    loop {
        let Some(idle) = r.upgrade().map(|r| r.idle) else {
            return;
        };
        tokio::time::sleep(idle / 2).await;
        match r.upgrade() {
            Some(r) if !r.release_if_idle() => {}
            _ => return,
        }
    }
}

/// Reply and payload buffers of one connection, kept for its next
/// requests once their reply is written; what it cannot keep, and all it
/// has when it ends, go to the server's [`Reserve`], which it draws on when
/// it has none.
pub(crate) struct Spares {
    held: Mutex<Shelf>,
    reserve: Arc<Reserve>,
}

impl Spares {
    pub(crate) fn new(reserve: Arc<Reserve>) -> Self {
        Spares {
            held: Mutex::new(Shelf::default()),
            reserve,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shelf> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A kept buffer of at least `min` bytes of capacity as it was given
    /// back: its length counts bytes written earlier (contents of no
    /// meaning), which a reply sized in place overwrites without zeroing
    /// them first. A new one when none is kept here or in the reserve (a
    /// smaller one grown would be copied and faulted in all the same).
    pub(crate) fn take_used(&self, min: usize) -> Vec<u8> {
        let mine = self.lock().take_at_least(min);
        mine.or_else(|| self.reserve.take_at_least(min))
            .unwrap_or_else(|| Vec::with_capacity(min))
    }

    /// An empty buffer of at least `min` bytes of capacity.
    pub(crate) fn take(&self, min: usize) -> Vec<u8> {
        let mut v = self.take_used(min);
        v.clear();
        v
    }

    /// A buffer holding a copy of `data`.
    pub(crate) fn copy_of(&self, data: &[u8]) -> Vec<u8> {
        let mut v = self.take(data.len());
        v.extend_from_slice(data);
        v
    }

    /// Bytes of the buffers kept.
    pub(crate) fn held(&self) -> usize {
        self.lock().bytes
    }

    /// Hands kept buffers beyond `keep` bytes to the reserve.
    pub(crate) fn trim(&self, keep: usize) {
        let mut extra = Vec::new();
        {
            let mut g = self.lock();
            while g.bytes > keep
                && let Some(v) = g.pop()
            {
                extra.push(v);
            }
        }
        for v in extra {
            self.reserve.give(v);
        }
    }

    /// Keeps `v` for reuse, unless it is too small to matter (the
    /// allocator serves those from memory it has) or too large; beyond
    /// what a connection keeps it goes to the reserve.
    pub(crate) fn give(&self, v: Vec<u8>) {
        if !(SPARE_MIN..=SPARE_MAX).contains(&v.capacity()) {
            return;
        }
        let kept = self.lock().put(v, SPARE_BYTES);
        if let Err(v) = kept {
            self.reserve.give(v);
        }
    }
}

impl Drop for Spares {
    fn drop(&mut self) {
        self.trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn spares_keep_a_busy_connections_buffers_and_trim_to_what_idle_keeps() {
        let reserve = Reserve::new(0, Duration::from_secs(60));
        let s = Spares::new(reserve.clone());
        // Sixteen 1 MiB replies in flight come back: all are kept.
        for _ in 0..16 {
            s.give(Vec::with_capacity(MIB));
        }
        assert_eq!(s.held(), 16 * MIB);
        // Beyond the cap, buffers are let go (a reserve without room).
        for _ in 0..40 {
            s.give(Vec::with_capacity(MIB));
        }
        assert_eq!(s.held(), SPARE_BYTES);
        // Oversized and small ones are never kept.
        s.trim(0);
        s.give(Vec::with_capacity(SPARE_MAX + 1));
        s.give(Vec::with_capacity(SPARE_MIN - 1));
        assert_eq!(s.held(), 0);
        for _ in 0..16 {
            s.give(Vec::with_capacity(MIB));
        }
        s.trim(SPARE_IDLE_BYTES);
        assert_eq!(s.held(), SPARE_IDLE_BYTES);
        assert!(s.take(MIB).capacity() >= MIB);
        assert_eq!(s.held(), SPARE_IDLE_BYTES - MIB);
        // None of 2 MiB is kept: a new one, not a kept one grown.
        assert!(s.take(2 * MIB).capacity() >= 2 * MIB);
        assert_eq!(s.held(), SPARE_IDLE_BYTES - MIB);
        assert_eq!(reserve.held(), 0);
    }

    #[test]
    fn a_new_connection_reuses_the_buffers_of_one_that_ended() {
        let reserve = Reserve::new(8 * MIB, Duration::from_secs(60));
        let first = Spares::new(reserve.clone());
        let bufs: Vec<Vec<u8>> = (0..12).map(|_| vec![7u8; MIB]).collect();
        let addrs: Vec<*const u8> = bufs.iter().map(|b| b.as_ptr()).collect();
        for b in bufs {
            first.give(b);
        }
        // Trimmed while idle: the excess goes to the reserve.
        first.trim(2 * MIB);
        assert_eq!(reserve.held(), 8 * MIB);
        // Ended: the rest would, but the reserve is full; dropped.
        drop(first);
        assert_eq!(reserve.held(), 8 * MIB);
        let second = Spares::new(reserve.clone());
        let b = second.take(MIB);
        assert!(b.is_empty() && b.capacity() >= MIB);
        assert!(addrs.contains(&b.as_ptr()), "a kept buffer, not a new one");
        assert_eq!(reserve.held(), 7 * MIB);
        // A buffer of a given size, if one is kept.
        assert!(reserve.take_at_least(2 * MIB).is_none());
        assert_eq!(reserve.take_at_least(MIB).map(|b| b.capacity()), Some(MIB));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reserve_lets_its_buffers_go_once_idle() {
        let reserve = Reserve::new(8 * MIB, Duration::from_secs(10));
        reserve.give(vec![0u8; MIB]);
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(reserve.held(), MIB);
        // A use keeps them another idle time.
        reserve.give(vec![0u8; MIB]);
        tokio::time::sleep(Duration::from_secs(8)).await;
        assert_eq!(reserve.held(), 2 * MIB);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(reserve.held(), 0);
        // Watched again after the next give.
        reserve.give(vec![0u8; MIB]);
        tokio::time::sleep(Duration::from_secs(16)).await;
        assert_eq!(reserve.held(), 0);
    }
}
