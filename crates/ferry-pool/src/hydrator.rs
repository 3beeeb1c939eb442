//! The hydrator: a background thread that fetches every missing chunk of a
//! lazy volume, explicit priority ranges first, then settles in bulk the
//! chunks the source reports as holes (no read, a zero entry each), then
//! the rest sequentially, with a rate limit, pause/resume, progress, and
//! periodic commits so a restart resumes where it stopped. When every chunk is present the volume becomes
//! an ordinary one and its source is detached.
//!
//! Source errors are retried with back-off (after the per-fetch retries):
//! failed chunks are retried on later passes until they succeed or the
//! hydrator is stopped; they never poison the volume.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::Result;
use crate::pool::lock;
use crate::volume::Volume;

/// How to hydrate.
#[derive(Debug, Clone)]
pub struct HydratorOptions {
    /// Chunk ranges to fetch first, in this order (e.g. a read profile).
    pub priority: Vec<Range<u64>>,
    /// Bytes per second from the source; None for no limit.
    pub rate_limit: Option<u64>,
    /// Commit fetched chunks every this many chunks. Fetched chunks
    /// survive a process kill without a commit (the stage log), so commits
    /// only bound the log and what a machine crash makes fetch again; each
    /// is an fdatasync of the data file, so they are kept rare.
    pub commit_every: u64,
}

impl Default for HydratorOptions {
    fn default() -> Self {
        HydratorOptions {
            priority: Vec::new(),
            rate_limit: None,
            commit_every: 1024,
        }
    }
}

/// A snapshot of a hydrator's progress.
#[derive(Debug, Clone, PartialEq)]
pub struct HydrationProgress {
    /// Chunks present locally.
    pub present_chunks: u64,
    /// Chunks of the volume.
    pub total_chunks: u64,
    /// Bytes this hydrator fetched.
    pub bytes_fetched: u64,
    /// Average fetch rate since start.
    pub bytes_per_sec: f64,
    /// The volume is hydrated and ordinary.
    pub done: bool,
    /// The last source error seen, if any.
    pub last_error: Option<String>,
}

struct Shared {
    paused: Mutex<bool>,
    cv: Condvar,
    stop: AtomicBool,
    done: AtomicBool,
    bytes: AtomicU64,
    started: Instant,
    last_error: Mutex<Option<String>>,
}

/// A running hydrator. Dropping it stops the thread (fetched chunks are
/// committed first).
pub struct Hydrator {
    vol: Volume,
    sh: Arc<Shared>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl std::fmt::Debug for Hydrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hydrator")
            .field("volume", &self.vol.name())
            .finish()
    }
}

impl Hydrator {
    /// Start hydrating `vol` (which must be lazy with a source attached, or
    /// the thread reports `SourceDetached` in `last_error` and keeps trying).
    pub fn start(vol: &Volume, opts: HydratorOptions) -> Hydrator {
        let sh = Arc::new(Shared {
            paused: Mutex::new(false),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
            done: AtomicBool::new(!vol.is_lazy()),
            bytes: AtomicU64::new(0),
            started: Instant::now(),
            last_error: Mutex::new(None),
        });
        let v = vol.clone();
        let s = sh.clone();
        let thread = std::thread::Builder::new()
            .name(format!("hydrate-{}", vol.name()))
            .spawn(move || run(&v, &s, &opts))
            .expect("spawn hydrator thread");
        Hydrator {
            vol: vol.clone(),
            sh,
            thread: Some(thread),
        }
    }

    /// Current progress.
    pub fn progress(&self) -> HydrationProgress {
        let (present, total) = self.vol.presence();
        let bytes = self.sh.bytes.load(Ordering::Relaxed);
        let secs = self.sh.started.elapsed().as_secs_f64().max(1e-9);
        HydrationProgress {
            present_chunks: present,
            total_chunks: total,
            bytes_fetched: bytes,
            bytes_per_sec: bytes as f64 / secs,
            done: self.sh.done.load(Ordering::Acquire),
            last_error: lock(&self.sh.last_error).clone(),
        }
    }

    /// Pause fetching (reads still fetch on demand).
    pub fn pause(&self) {
        *lock(&self.sh.paused) = true;
    }

    /// Resume after [`Hydrator::pause`].
    pub fn resume(&self) {
        *lock(&self.sh.paused) = false;
        self.sh.cv.notify_all();
    }

    /// Wait until the volume is hydrated (or the thread fails to commit).
    pub fn wait(mut self) -> Result<()> {
        self.thread
            .take()
            .map(|t| t.join().expect("hydrator thread panicked"))
            .unwrap_or(Ok(()))
    }

    /// Stop, commit what was fetched, and return.
    pub fn stop(mut self) -> Result<()> {
        self.halt()
    }

    fn halt(&mut self) -> Result<()> {
        self.sh.stop.store(true, Ordering::Release);
        self.resume();
        self.thread
            .take()
            .map(|t| t.join().expect("hydrator thread panicked"))
            .unwrap_or(Ok(()))
    }
}

impl Drop for Hydrator {
    fn drop(&mut self) {
        let _ = self.halt();
    }
}

/// Fetches in flight. A fetch is a round trip or two to the source (an
/// allocation query, then the read): one at a time leaves the link idle
/// most of the time, so several workers take the next chunks of the order.
const WORKERS: usize = 8;

/// Chunks per call settling holes in bulk (each call: one allocation
/// query per 256 chunks and one stage-log append per window).
const HOLE_WINDOW: u64 = 4096;

fn run(vol: &Volume, sh: &Shared, opts: &HydratorOptions) -> Result<()> {
    let total = vol.size().div_ceil(vol.chunk_size());
    let mut order: Vec<u64> = Vec::with_capacity(total as usize);
    let mut queued = vec![false; total as usize];
    for r in &opts.priority {
        for c in r.start..r.end.min(total) {
            if !std::mem::replace(&mut queued[c as usize], true) {
                order.push(c);
            }
        }
    }
    // The priority chunks go one at a time, strictly in their order; the
    // rest with several in flight.
    let mut head = order.len();
    order.extend((0..total).filter(|c| !queued[*c as usize]));
    drop(queued);
    let mut backoff = Duration::from_millis(20);
    let since_commit = AtomicU64::new(0);
    let base = vol.v.lazy.fetched_bytes.load(Ordering::Relaxed);
    let mut holes_settled = false;
    loop {
        let (first, rest) = order.split_at(head);
        let mut failed = pass(vol, sh, opts, first, 1, &since_commit, base)?;
        head = failed.len();
        if !holes_settled && !sh.stop.load(Ordering::Acquire) {
            // Holes in bulk before the walk (which then skips them), a
            // window at a time so a stop is seen soon.
            let mut w = 0;
            while w < total && !sh.stop.load(Ordering::Acquire) {
                vol.settle_holes(w..w + HOLE_WINDOW)?;
                w += HOLE_WINDOW;
            }
            holes_settled = !sh.stop.load(Ordering::Acquire);
        }
        if !sh.stop.load(Ordering::Acquire) {
            failed.extend(pass(vol, sh, opts, rest, WORKERS, &since_commit, base)?);
        }
        if sh.stop.load(Ordering::Acquire) {
            return vol.settle().map(|_| ());
        }
        if failed.is_empty() {
            if vol.settle()? {
                sh.done.store(true, Ordering::Release);
                return Ok(());
            }
            // Chunks became missing again cannot happen; re-scan to be sure.
            continue;
        }
        order = failed;
        let deadline = Instant::now() + backoff;
        while Instant::now() < deadline {
            if sh.stop.load(Ordering::Acquire) {
                return vol.settle().map(|_| ());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// One pass over `order` by `workers` threads (each takes the next chunk
/// of the order, so the order holds up to the chunks in flight); returns
/// the chunks that failed, in order. Stops early when asked to.
fn pass(
    vol: &Volume,
    sh: &Shared,
    opts: &HydratorOptions,
    order: &[u64],
    workers: usize,
    since_commit: &AtomicU64,
    base: u64,
) -> Result<Vec<u64>> {
    let next = AtomicUsize::new(0);
    let failed = Mutex::new(Vec::new());
    let commit_err = Mutex::new(None);
    let quit = AtomicBool::new(false);
    let worker = || {
        loop {
            if sh.stop.load(Ordering::Acquire) || quit.load(Ordering::Acquire) {
                return;
            }
            {
                let mut p = lock(&sh.paused);
                while *p && !sh.stop.load(Ordering::Acquire) {
                    p = sh.cv.wait(p).unwrap_or_else(|e| e.into_inner());
                }
            }
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(&c) = order.get(i) else {
                return;
            };
            if vol.v.get(c).is_some() {
                continue;
            }
            match vol.fetch(c) {
                Ok(_) => {
                    // Bytes from the source since the start (the VM's own
                    // reads of missing chunks included).
                    let bytes = vol
                        .v
                        .lazy
                        .fetched_bytes
                        .load(Ordering::Relaxed)
                        .saturating_sub(base);
                    sh.bytes.store(bytes, Ordering::Relaxed);
                    if since_commit.fetch_add(1, Ordering::Relaxed) + 1 >= opts.commit_every {
                        since_commit.store(0, Ordering::Relaxed);
                        if let Err(e) = vol.settle() {
                            *lock(&commit_err) = Some(e);
                            quit.store(true, Ordering::Release);
                            return;
                        }
                    }
                    if let Some(rate) = opts.rate_limit.filter(|r| *r > 0) {
                        let due = Duration::from_secs_f64(bytes as f64 / rate as f64);
                        let el = sh.started.elapsed();
                        if due > el {
                            std::thread::sleep(due - el);
                        }
                    }
                }
                Err(e) => {
                    *lock(&sh.last_error) = Some(e.to_string());
                    lock(&failed).push((i, c));
                }
            }
        }
    };
    std::thread::scope(|s| {
        for _ in 1..workers {
            s.spawn(worker);
        }
        worker();
    });
    if let Some(e) = commit_err.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    let mut failed = failed.into_inner().unwrap_or_else(|e| e.into_inner());
    failed.sort_unstable();
    Ok(failed.into_iter().map(|(_, c)| c).collect())
}
