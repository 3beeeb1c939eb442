//! The `copy data` step of `vm.copy`: transfer and verify, per disk and
//! per partition, with the progress tree the coordinator shows.
//!
//! # Progress tree
//! Under the step's node: one node per disk, one per *leaf* — each
//! partition of the disk's GPT or MBR (logical partitions included) and
//! one for the space outside partitions (tables, gaps); a disk without a
//! table, or with a damaged one, is one leaf — and under each leaf the two
//! sub-operations `transfer` and `verify`.
//! - A leaf's weight is its allocated bytes (the snapshot's allocation map
//!   within the leaf), a disk's the sum of its leaves'.
//! - A leaf's weight is split between transfer and verify in proportion to
//!   their expected times: bytes / throughput, with throughputs measured on
//!   this pair of hosts — first those the last copy to the same peer
//!   measured ([`KnownRates`]; [`PRIOR`] before any), then the running
//!   measurement after each piece of [`PIECE`] bytes (the transfer rate,
//!   the current leaf's part included) and each leaf. Only leaves that
//!   have not started are re-split: their fraction is 0, so the overall
//!   figure does not move when they are (the split is inside a leaf whose
//!   total weight is fixed).
//! - A transfer's fraction is the leaf's bytes sent
//!   ([`transfer_fraction`]); it is done once all is flushed. Flushes come
//!   every [`RECORD_EVERY`] bytes: counting flushed bytes would move the
//!   bar in steps.
//! - Before its first node, the step weighs the operation's steps in
//!   seconds (see [`step_weights`]): the fixed steps count for the time
//!   they take. A disk weighs its expected seconds, next to an `open disks`
//!   node that weighs the time opening them took.
//!
//! # What is sent
//! The snapshot's allocated ranges only, read in [`XFER`] units on the
//! blocking pool, a disk's units in one stream, leaf after leaf; of those,
//! 1 MiB blocks that read as all zeroes are not sent (the new target
//! volume reads zero there). The target's exports are `write_out`: each
//! write starts going to its disk at once. Each block is hashed as
//! it is read (XXH3-128, see [`Algorithm`]), so verify reads only the
//! target's copy: each piece of [`PIECE`] bytes once its writes
//! answered, after which the target writes the piece out behind and lets
//! its pages go, and the next pieces reuse them (see `docs/vm-copy.md`,
//! "What is sent").
//!
//! # Resume
//! Once [`RECORD_EVERY`] bytes were sent or [`RECORD_AFTER`] passed since
//! the last flush ([`Records`]), and at the end of each disk, the step
//! flushes the target. Once a flush answered, the step records in the
//! journal how far each leaf it covers got
//! (`{"disk":D,"leaf":L,"done":BYTES}`, one journal write); a run after a
//! crash skips what was recorded, so it sends again at most that much.
//! Verify always runs in full, so it covers whatever the crash left.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferry_backup::is_zero;
use ferry_nbd::ClientConfig;
use ferry_nbd::buffers::Reserve;
use ferry_nbd::client::{Address, Pool as NbdPool};
use ferry_ops::{
    BoxFuture, NodeId, Recovery, Step, StepContext, StepError, test_pause, test_pause_armed,
};
use ferry_pool::CachedRead;
use ferry_pool::Snapshot as PoolSnapshot;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{Env, Params, Snapped, TargetDisk, result};
use crate::daemon::App;
use crate::operations::{blocking, snapshot_data_ranges, span_bytes};

/// Hash unit of verify (and the unit of zero detection).
pub const BLOCK: u64 = 1 << 20;
/// Transfer unit: one read of the snapshot, up to this many bytes written
/// per NBD request (a multiple of [`BLOCK`]). 2 MiB rather than 4: with
/// two in flight, less of the target's page cache is taken at once
/// (`copy`, session 16, every round of three runs: sparse 0.12-0.21 s
/// instead of 0.17-0.29 s with 4 MiB units; dense 1.16-1.48 s).
const XFER: u64 = 2 << 20;
/// Transfer units being written at once (each a task of its own, which
/// reads and hashes its unit first, see [`READ_AHEAD`]). Two, so that what
/// the target holds in its page cache, not yet flushed and verified, stays
/// small — every fresh page costs the target a fault on a VM host, pages
/// it let go are reused (`copy`, session 16, 4 MiB units: eight in flight
/// gave a sparse copy of 0.17-0.29 s, two 0.18-0.21 s; dense 1.24-1.34 s
/// and 1.12-1.18 s).
const IN_FLIGHT: usize = 2;
/// Units read and hashed ahead of the [`IN_FLIGHT`] writes, so that a
/// write that answers is followed at once by the next: reading and hashing
/// 2 MiB takes ~0.35 ms, which otherwise left no write in flight for ~11 ms
/// of a 63 ms sparse transfer (BENCHMARKS.md sessions 22 and 23: a sparse
/// copy 3-6 ms faster).
const READ_AHEAD: usize = 2;
/// Blocks per hash request to the target.
const HASH_BATCH: usize = 16;
/// Hash requests in flight at once, within one check.
const HASH_IN_FLIGHT: usize = 3;
/// Checks (pieces) verified at once: while the target waits for one
/// piece's writeback before it answers, the next piece's writeback has
/// started (`Volume::write_behind`).
const VERIFY_AHEAD: usize = 2;
/// A leaf's transfer is cut in pieces of this many bytes. Each piece is
/// verified once its last unit answered (all its writes did), while the
/// next units are in flight; the target then writes it out behind
/// (`Volume::write_behind`) and lets its pages go once written, so the
/// copy's next pieces reuse them: the smaller the piece, the fewer fresh
/// pages the target takes (`copy`, session 16, sparse median with
/// pieces sent one after another: 16 MiB 0.312 s, 8 MiB 0.232 s, 4 MiB
/// 0.184 s; BENCHMARKS.md). The transfer stays within
/// [`PIECES_AHEAD`] pieces of what verify finished.
const PIECE: u64 = 4 << 20;
/// A piece is flushed, and its checkpoint recorded in the journal once
/// the flush answered, when this many bytes of the run's transfer were
/// sent since the last flush (or [`RECORD_AFTER`] passed, or its disk
/// ends). Each flush is an fdatasync and a pool commit on the target,
/// each record a journal transaction with its fsync, on the same disk
/// when both hosts share one: one of each per 4 MiB piece cost a sparse
/// 80 MiB copy ~10 ms of its ~0.1 s (`copy`, sessions 19 and 20;
/// BENCHMARKS.md). A copy resumed after a crash sends again at most
/// this much per disk.
const RECORD_EVERY: u64 = 64 << 20;
/// ... or once this long passed since the last record.
const RECORD_AFTER: Duration = Duration::from_secs(1);
/// Flushes in flight before the transfer waits for the oldest. Two kept
/// the target's disk busier than one: a dense 1 GiB copy waited 0.29 s
/// for flushes instead of 0.43 s (transfer 1.68 s instead of 1.84 s, 32 MiB
/// pieces). Four did not help with 4 MiB pieces (sparse 0.17-0.24 s).
const FLUSHES_AHEAD: usize = 2;
/// Pieces sent but not verified yet before the transfer waits for
/// verify: the target's verify writes each piece out behind, so this
/// bounds what the target holds in its page cache, not yet written out,
/// and the sender's rate (and the bar) follows the target's disk instead
/// of racing ahead into its page cache.
const PIECES_AHEAD: usize = 4;
/// NBD connections to each target export.
const CONNECTIONS: usize = 4;
/// Throughputs assumed before anything was measured on a pair of hosts.
const PRIOR: Rates = Rates {
    transfer: 300e6,
    verify: 2000e6,
};

/// One leaf of the hierarchy: a partition or the space outside them.
#[derive(Debug, Clone)]
pub(crate) struct Leaf {
    pub name: String,
    /// Allocated ranges of the snapshot within the leaf, in order.
    pub ranges: Vec<(u64, u64)>,
}

impl Leaf {
    pub fn bytes(&self) -> u64 {
        span_bytes(&self.ranges)
    }
}

/// Reads partition tables from a pool snapshot.
struct SnapRead<'a>(&'a PoolSnapshot);

impl ferry_disk::ReadAt for SnapRead<'_> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0
            .read_at(offset, buf)
            .map_err(|e| std::io::Error::other(e.to_string()))
    }
}

/// Intersects sorted, disjoint `ranges` with `within`.
fn clip(ranges: &[(u64, u64)], within: &std::ops::Range<u64>) -> Vec<(u64, u64)> {
    ranges
        .iter()
        .filter_map(|&(s, e)| {
            let (s, e) = (s.max(within.start), e.min(within.end));
            (s < e).then_some((s, e))
        })
        .collect()
}

/// Splits a disk's allocated ranges into leaves by its partition table.
/// Also says what the table was, for the log.
pub(crate) fn leaves(
    layout: Result<Option<ferry_disk::Layout>, ferry_disk::Error>,
    ranges: &[(u64, u64)],
) -> (Vec<Leaf>, String) {
    match layout {
        Ok(Some(l)) => {
            let mut out: Vec<Leaf> = l
                .partitions
                .iter()
                .map(|p| Leaf {
                    name: match &p.name {
                        Some(n) => format!("partition {} ({n})", p.number),
                        None => format!("partition {}", p.number),
                    },
                    ranges: clip(ranges, &p.range()),
                })
                .collect();
            let mut outside = Vec::new();
            for r in &l.outside {
                outside.extend(clip(ranges, r));
            }
            out.push(Leaf {
                name: "outside partitions".into(),
                ranges: outside,
            });
            let what = match l.scheme {
                ferry_disk::Scheme::Gpt { backup: false } => "GPT".to_string(),
                ferry_disk::Scheme::Gpt { backup: true } => {
                    "GPT (primary damaged, backup used)".to_string()
                }
                ferry_disk::Scheme::Mbr => "MBR".to_string(),
            };
            (out, format!("{what}, {} partitions", l.partitions.len()))
        }
        Ok(None) => (
            vec![Leaf {
                name: "whole disk".into(),
                ranges: ranges.to_vec(),
            }],
            "no partition table".into(),
        ),
        Err(e) => (
            vec![Leaf {
                name: "whole disk".into(),
                ranges: ranges.to_vec(),
            }],
            format!("partition table unreadable ({e}): one piece"),
        ),
    }
}

/// Splits ranges into pieces of at most `size` bytes, each range from its
/// start (so the [`BLOCK`]s of an [`XFER`] unit are blocks of the ranges).
fn cut(ranges: &[(u64, u64)], size: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(start, end) in ranges {
        let mut off = start;
        while off < end {
            let n = (end - off).min(size);
            out.push((off, n));
            off += n;
        }
    }
    out
}

/// Splits ranges into blocks of at most [`BLOCK`] bytes.
fn blocks(ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
    cut(ranges, BLOCK)
}

/// Hash of verify. A copy asks for XXH3-128: verify guards against damage
/// and lost writes, not against an adversary, and BLAKE3 cost 3.4x more per
/// byte here (7.0 vs 23.3 GB/s on one core), paid on both hosts. BLAKE3 is
/// what copies of earlier versions ask for. XXH3 comes from `twox-hash`,
/// which picks AVX2 at run time where the CPU has it (33 GB/s on one core
/// here, against 21 GB/s for SSE2 code built for any x86-64: 1 MiB blocks
/// hot in cache); the hash is the same either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Xxh3,
    Blake3,
}

impl Algorithm {
    pub fn named(name: &str) -> Option<Algorithm> {
        match name {
            "xxh3-128" => Some(Algorithm::Xxh3),
            "blake3" => Some(Algorithm::Blake3),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Xxh3 => "xxh3-128",
            Algorithm::Blake3 => "blake3",
        }
    }

    /// The hash of `b`, in hex.
    pub fn hex(self, b: &[u8]) -> String {
        match self {
            Algorithm::Xxh3 => format!("{:032x}", twox_hash::XxHash3_128::oneshot(b)),
            Algorithm::Blake3 => blake3::hash(b).to_hex().to_string(),
        }
    }
}

/// The hash a copy verifies with.
const VERIFY_HASH: Algorithm = Algorithm::Xxh3;

/// The hash (`algorithm`, hex) of each range, read with `read`.
pub fn hash_ranges(
    algorithm: Algorithm,
    ranges: &[(u64, u64)],
    mut read: impl FnMut(u64, &mut [u8]) -> Result<(), String>,
) -> Result<Vec<String>, String> {
    let longest = ranges.iter().map(|r| r.1 as usize).max().unwrap_or(0);
    let mut buf = spare(longest);
    let hashes = ranges
        .iter()
        .map(|&(off, len)| {
            let b = &mut buf[..len as usize];
            read(off, b)?;
            Ok(algorithm.hex(b))
        })
        .collect();
    spares().give(buf);
    hashes
}

/// One transfer unit read from the snapshot: its bytes, the hash of each
/// of its [`BLOCK`]s `(offset, length, hash)`, and the byte runs (within
/// the unit) of the blocks that are not all zeroes — the only ones sent.
struct Unit {
    data: UnitBytes,
    hashes: Vec<((u64, u64), String)>,
    runs: Vec<(usize, usize)>,
}

/// Where a unit's bytes are.
enum UnitBytes {
    /// Read into a buffer, at least as long as the unit (a reused one):
    /// the unit is its start.
    Read(Vec<u8>),
    /// In place in the source pool's page cache, one piece of the data
    /// file ([`read_unit`] takes no other) whose every page is cached:
    /// hashed and sent from there, with no copy into a buffer.
    Cached(CachedRead),
}

impl UnitBytes {
    fn get(&self) -> &[u8] {
        match self {
            UnitBytes::Read(b) => b,
            UnitBytes::Cached(c) => c.pieces().next().unwrap_or_default(),
        }
    }
}

/// Buffers of units sent and of ranges hashed, for the next units and
/// the next copies: a fresh 4 MiB buffer costs a page fault and a page
/// clearing per 4 KiB (a copy of 80 MiB faulted in ~32 MB of them on the
/// sending host before they were kept beyond one disk, `perf record -e
/// page-faults`). Kept up to [`IN_FLIGHT`] + [`READ_AHEAD`] units' worth,
/// for 30 s unused.
fn spares() -> &'static Arc<Reserve> {
    static SPARES: std::sync::OnceLock<Arc<Reserve>> = std::sync::OnceLock::new();
    SPARES.get_or_init(|| {
        Reserve::new(
            (IN_FLIGHT + READ_AHEAD) * XFER as usize,
            Duration::from_secs(30),
        )
    })
}

/// A buffer of at least `n` bytes (contents of no meaning).
fn spare(n: usize) -> Vec<u8> {
    match spares().take_at_least(n) {
        Some(mut b) => {
            if b.len() < n {
                b.resize(n, 0);
            }
            b
        }
        None => vec![0u8; n.max(XFER as usize)],
    }
}

/// Reads unit `[off, off + n)` of `snap` and hashes its blocks. Where the
/// unit lies in one piece of the data file and all of it is in the page
/// cache, it is hashed and later sent in place (a sparse 80 MiB copy: 5 ms
/// less CPU, 2-4 ms less time, BENCHMARKS.md session 23); otherwise it is
/// read into a buffer (from the places the mapped read found, when it
/// found them: holes and zeroes through `Snapshot::read_at`).
fn read_unit(snap: &PoolSnapshot, off: u64, n: u64) -> Result<Unit, String> {
    let mapped = snap
        .try_read_mapped(off, n)
        .map(|m| match m.ranges().len() {
            1 => m.into_cached(),
            _ => Err(m),
        });
    let data = match mapped {
        Some(Ok(c)) => UnitBytes::Cached(c),
        declined => {
            let mut data = spare(n as usize);
            let buf = &mut data[..n as usize];
            // Its chunks already looked up (and pinned): not again.
            match declined {
                Some(Err(m)) => m.read_into(buf),
                _ => snap.read_at(off, buf),
            }
            .map_err(|e| e.to_string())?;
            UnitBytes::Read(data)
        }
    };
    let unit = &data.get()[..n as usize];
    let mut hashes = Vec::new();
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut at = 0usize;
    while at < unit.len() {
        let end = (at + BLOCK as usize).min(unit.len());
        let b = &unit[at..end];
        hashes.push(((off + at as u64, (end - at) as u64), VERIFY_HASH.hex(b)));
        if !is_zero(b) {
            match runs.last_mut() {
                Some(r) if r.1 == at => r.1 = end,
                _ => runs.push((at, end)),
            }
        }
        at = end;
    }
    Ok(Unit { data, hashes, runs })
}

/// Measured throughputs (bytes/s) of the two sub-operations.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Rates {
    transfer: f64,
    verify: f64,
}

impl Rates {
    /// Seconds expected to transfer and to verify `bytes`, with the
    /// transfer at most `limit` bytes/s.
    fn times(&self, bytes: u64, limit: Option<u64>) -> (f64, f64) {
        let t = match limit.filter(|l| *l > 0) {
            Some(l) => self.transfer.min(l as f64),
            None => self.transfer,
        };
        let b = bytes as f64;
        (b / t.max(1.0), b / self.verify.max(1.0))
    }
}

/// The throughputs last measured by a copy to each peer: the first split
/// of the next copy to that peer (before it measured anything itself).
#[derive(Default)]
pub(crate) struct KnownRates(std::sync::Mutex<HashMap<String, Rates>>);

impl KnownRates {
    fn get(&self, peer: &str) -> Option<Rates> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(peer)
            .copied()
    }

    fn set(&self, peer: &str, r: Rates) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer.to_string(), r);
    }
}

/// Running totals behind [`Rates`].
#[derive(Default, Clone, Copy)]
struct Measure {
    t_bytes: u64,
    t_secs: f64,
    v_bytes: u64,
    v_secs: f64,
}

impl Measure {
    fn rates(&self, fallback: Rates) -> Rates {
        let r = |b: u64, s: f64, f: f64| {
            if b >= BLOCK && s > 0.0 {
                b as f64 / s
            } else {
                f
            }
        };
        Rates {
            transfer: r(self.t_bytes, self.t_secs, fallback.transfer),
            verify: r(self.v_bytes, self.v_secs, fallback.verify),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Mark {
    disk: usize,
    leaf: usize,
    done: u64,
}

/// One disk being copied.
struct Disk {
    snap: PoolSnapshot,
    target: TargetDisk,
    nbd: Arc<NbdPool>,
    leaves: Vec<Leaf>,
    /// The hash ([`VERIFY_HASH`], hex) of each block `(offset, length)` as
    /// read for the transfer, so that verify reads only the target (blocks
    /// missing here, say sent before a restart, are hashed again from the
    /// snapshot).
    hashes: std::sync::Mutex<HashMap<(u64, u64), String>>,
}

/// One unit sent: its bytes, the bytes of it sent (its blocks that are
/// not all zeroes), and the hash of each of its blocks.
struct Sent {
    bytes: u64,
    sent: u64,
    hashes: Vec<((u64, u64), String)>,
}

/// A unit being read, hashed and written, as a task of its own: it goes on
/// while the transfer waits for a flush. Aborted if dropped (the step
/// ended).
struct Sending(tokio::task::JoinHandle<Result<Sent, StepError>>);

impl std::future::Future for Sending {
    type Output = Result<Sent, StepError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.map_err(StepError::failed)?)
    }
}

impl Drop for Sending {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Disk {
    /// The `units` `(offset, length)` of this disk, each read and hashed
    /// on the blocking pool and its blocks that are not all zeroes written
    /// to the target; [`IN_FLIGHT`] written at once, [`READ_AHEAD`] more
    /// read ahead of them, answered in order. A caller
    /// that stops polling (waiting for a flush) does not stop the units
    /// in flight.
    fn sending(
        &self,
        units: Vec<(u64, u64)>,
    ) -> impl futures::Stream<Item = Result<Sent, StepError>> + use<> {
        let (snap, nbd, vol) = (
            self.snap.clone(),
            self.nbd.clone(),
            self.target.volume.clone(),
        );
        let writes = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
        futures::stream::iter(units)
            .map(move |(off, n)| {
                let (snap, nbd, vol) = (snap.clone(), nbd.clone(), vol.clone());
                let writes = writes.clone();
                Sending(tokio::spawn(async move {
                    let name = snap.name().to_string();
                    let u = tokio::task::spawn_blocking(move || read_unit(&snap, off, n))
                        .await
                        .map_err(StepError::failed)?
                        .map_err(|e| {
                            StepError::failed(format!("reading snapshot {name} at {off}: {e}"))
                        })?;
                    let _writing = writes.acquire_owned().await.map_err(StepError::failed)?;
                    let mut sent = 0;
                    for &(a, b) in &u.runs {
                        let at = off + a as u64;
                        nbd.write_at(at, &u.data.get()[a..b], false)
                            .await
                            .map_err(|e| {
                                StepError::failed(format!("writing {vol} at {at}: {e}"))
                            })?;
                        sent += (b - a) as u64;
                    }
                    if let UnitBytes::Read(b) = u.data {
                        spares().give(b);
                    }
                    Ok(Sent {
                        bytes: n,
                        sent,
                        hashes: u.hashes,
                    })
                }))
            })
            .buffered(IN_FLIGHT + READ_AHEAD)
    }

    /// Takes note of a unit [`Disk::sending`] answered: keeps its hashes
    /// for verify and paces the transfer. Returns its bytes and the bytes
    /// of it sent.
    async fn answered(
        &self,
        cx: &StepContext<App>,
        pacer: &Pacer,
        r: Result<Sent, StepError>,
    ) -> Result<(u64, u64), StepError> {
        if cx.is_cancelled() {
            return Err(StepError::Cancelled);
        }
        let u = r?;
        self.hashes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(u.hashes);
        if u.sent > 0 {
            pacer.sent(u.sent).await;
        }
        Ok((u.bytes, u.sent))
    }

    /// Sends `ranges` in units of at most `unit` bytes, as
    /// [`Disk::sending`] does; returns the bytes sent.
    async fn send(
        &self,
        cx: &StepContext<App>,
        ranges: &[(u64, u64)],
        unit: u64,
        pacer: &Pacer,
    ) -> Result<u64, StepError> {
        let mut units = self.sending(cut(ranges, unit));
        let mut sent = 0;
        while let Some(r) = units.next().await {
            sent += self.answered(cx, pacer, r).await?.1;
        }
        Ok(sent)
    }
}

/// Ranges of a leaf sent (or found sent by an earlier run) and to be
/// verified; `last` (the leaf's transfer line) once the leaf is all sent.
struct Check {
    disk: usize,
    leaf: usize,
    ranges: Vec<(u64, u64)>,
    last: Option<String>,
    /// A piece's place among the [`PIECES_AHEAD`] the transfer may have
    /// unverified; given back when the check is done with.
    _ahead: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Check {
    fn piece(disk: usize, leaf: usize, ranges: Vec<(u64, u64)>) -> Check {
        Check {
            disk,
            leaf,
            ranges,
            last: None,
            _ahead: None,
        }
    }
}

/// The tree nodes of one leaf.
struct LeafNodes {
    leaf: NodeId,
    transfer: NodeId,
    verify: NodeId,
}

pub(crate) struct CopyData {
    pub env: Arc<Env>,
    pub p: Params,
}

fn nbd_address(uri: &str) -> Result<(Address, String), StepError> {
    let rest = uri
        .strip_prefix("nbd://")
        .ok_or_else(|| StepError::failed(format!("not an NBD TCP URI: {uri}")))?;
    let (addr, export) = rest
        .split_once('/')
        .ok_or_else(|| StepError::failed(format!("NBD URI without an export: {uri}")))?;
    Ok((Address::Tcp(addr.to_string()), export.to_string()))
}

/// Paces the transfer to `limit` bytes per second.
/// Shared by the transfer and the re-sends of verify.
struct Pacer {
    limit: Option<u64>,
    start: Instant,
    sent: AtomicU64,
}

impl Pacer {
    async fn sent(&self, n: u64) {
        let sent = self.sent.fetch_add(n, Ordering::Relaxed) + n;
        if let Some(l) = self.limit.filter(|l| *l > 0) {
            let due = std::time::Duration::from_secs_f64(sent as f64 / l as f64);
            let el = self.start.elapsed();
            if due > el {
                tokio::time::sleep(due - el).await;
            }
        }
    }
}

/// A flush of a target export sent while the transfer goes on, the
/// checkpoints it makes durable once it answers (how far each leaf it
/// covers got), and what is verified then: the ends of the leaves it
/// completes (a leaf is done once durable and verified), and the piece
/// that made it due.
struct Flushing {
    task: tokio::task::JoinHandle<Result<(), ferry_nbd::Error>>,
    marks: Vec<Mark>,
    volume: String,
    then: Vec<Check>,
}

impl Flushing {
    fn start(disk: &Disk, marks: Vec<Mark>, then: Vec<Check>) -> Self {
        let nbd = disk.nbd.clone();
        Flushing {
            task: tokio::spawn(async move { nbd.flush().await }),
            marks,
            volume: disk.target.volume.clone(),
            then,
        }
    }

    /// Waits for the flush, then records the checkpoints (one journal
    /// write); returns how far the leaves are now durable and what is to
    /// be verified now.
    async fn done(self, cx: &StepContext<App>) -> Result<(Vec<Mark>, Vec<Check>), StepError> {
        self.task
            .await
            .map_err(StepError::failed)?
            .map_err(|e| StepError::failed(format!("flushing {}: {e}", self.volume)))?;
        let lines: Vec<String> = self.marks.iter().map(|m| json!(m).to_string()).collect();
        cx.checkpoint_all(&lines)?;
        Ok((self.marks, self.then))
    }
}

/// Sends a flush of `disk` that covers the leaves `unflushed` and then
/// verifies `held` (both taken), once fewer than [`FLUSHES_AHEAD`] are in
/// flight: the oldest is waited for and `landed` first.
async fn start_flush(
    cx: &StepContext<App>,
    disk: &Disk,
    flushing: &mut std::collections::VecDeque<Flushing>,
    unflushed: &mut Vec<Mark>,
    held: &mut Vec<Check>,
    landed: &impl Fn((Vec<Mark>, Vec<Check>)),
) -> Result<(), StepError> {
    if flushing.len() >= FLUSHES_AHEAD
        && let Some(f) = flushing.pop_front()
    {
        landed(f.done(cx).await?);
    }
    flushing.push_back(Flushing::start(
        disk,
        std::mem::take(unflushed),
        std::mem::take(held),
    ));
    Ok(())
}

/// When a piece is flushed and its checkpoint recorded in the journal: at
/// the end of its disk's last leaf, and otherwise once [`RECORD_EVERY`]
/// bytes were sent or [`RECORD_AFTER`] passed since the last record.
struct Records {
    /// Bytes sent since the last record.
    bytes: u64,
    last: Instant,
}

impl Records {
    fn new(now: Instant) -> Self {
        Records {
            bytes: 0,
            last: now,
        }
    }

    /// Takes note of a piece of `bytes` sent; whether it is to be flushed
    /// and its checkpoint recorded (always if `must`).
    fn due(&mut self, bytes: u64, must: bool) -> bool {
        self.due_at(bytes, must, Instant::now())
    }

    /// A flush was sent for another reason (the disk's end) at `now`:
    /// the next is due [`RECORD_EVERY`] bytes or [`RECORD_AFTER`] later.
    fn flushed(&mut self, now: Instant) {
        self.bytes = 0;
        self.last = now;
    }

    /// [`Records::due`] at time `now`.
    fn due_at(&mut self, bytes: u64, must: bool, now: Instant) -> bool {
        self.bytes += bytes;
        if must || self.bytes >= RECORD_EVERY || now.duration_since(self.last) >= RECORD_AFTER {
            self.flushed(now);
            return true;
        }
        false
    }
}

impl CopyData {
    /// Opens the snapshots and the target exports; also returns a log
    /// line per disk (written with the step's next lines, in one journal
    /// write).
    async fn open_disks(
        &self,
        cx: &StepContext<App>,
    ) -> Result<(Vec<Disk>, Vec<String>), StepError> {
        let snapped: Snapped = result(cx, "snapshot")?;
        let targets: Value = result(cx, "create target volumes")?;
        let targets: Vec<TargetDisk> = serde_json::from_value(targets["disks"].clone())
            .map_err(|e| StepError::failed(format!("malformed target disks: {e}")))?;
        // Each disk's layout is read while its target's NBD connections
        // open, all disks at once.
        let opened = futures::future::try_join_all(
            snapped
                .disks
                .iter()
                .zip(targets)
                .map(|(d, t)| self.open_disk(cx, d, t)),
        )
        .await?;
        Ok(opened.into_iter().unzip())
    }

    /// One disk of [`CopyData::open_disks`], and the line that tells its
    /// layout.
    async fn open_disk(
        &self,
        cx: &StepContext<App>,
        d: &super::SourceDisk,
        t: TargetDisk,
    ) -> Result<(Disk, String), StepError> {
        let pool = cx.app.pool.clone();
        let (volume, snapshot, size) = (d.volume.clone(), d.snapshot.clone(), d.size);
        let read = blocking(move || {
            let snap = pool.open_snapshot(&snapshot)?;
            let ranges = snapshot_data_ranges(&pool, &volume, &snapshot, size)?;
            let layout = ferry_disk::read_layout(&SnapRead(&snap), size);
            Ok((snap, ranges, layout))
        });
        let (addr, export) = nbd_address(&t.uri)?;
        let cfg = ClientConfig {
            export,
            meta_contexts: Vec::new(),
            tls: None,
        };
        let connect = async {
            NbdPool::connect(addr, cfg, CONNECTIONS).await.map_err(|e| {
                StepError::failed(format!(
                    "connecting to export of {} on {}: {e}",
                    t.volume, self.p.to
                ))
            })
        };
        let (read, nbd) = tokio::join!(read, connect);
        let (snap, ranges, layout) = read?;
        let nbd = nbd?;
        let (leaves, what) = leaves(layout, &ranges);
        let line = format!(
            "disk {} ({}): {what}; {} bytes allocated in {} pieces",
            d.device,
            d.volume,
            leaves.iter().map(Leaf::bytes).sum::<u64>(),
            leaves.len()
        );
        if nbd.size() < size {
            return Err(StepError::failed(format!(
                "target volume {} is {} bytes, smaller than {size}",
                t.volume,
                nbd.size()
            )));
        }
        let disk = Disk {
            snap,
            target: t,
            nbd: Arc::new(nbd),
            leaves,
            hashes: Default::default(),
        };
        Ok((disk, line))
    }

    /// Hashes `ranges` (blocks) on both hosts; returns the blocks that
    /// differ. The source's hashes are those taken when the blocks were
    /// sent; the target reads and hashes what it stored.
    async fn compare(
        &self,
        disk: &Disk,
        peer: &crate::peers::PeerClient,
        ranges: &[(u64, u64)],
    ) -> Result<Vec<(u64, u64)>, StepError> {
        let known: Option<Vec<String>> = {
            let h = disk.hashes.lock().unwrap_or_else(|p| p.into_inner());
            ranges.iter().map(|r| h.get(r).cloned()).collect()
        };
        let local = async {
            if let Some(k) = known {
                return Ok(k);
            }
            let snap = disk.snap.clone();
            let rs = ranges.to_vec();
            tokio::task::spawn_blocking(move || {
                hash_ranges(VERIFY_HASH, &rs, |off, buf| {
                    snap.read_at(off, buf).map_err(|e| e.to_string())
                })
            })
            .await
            .map_err(StepError::failed)?
            .map_err(|e| StepError::failed(format!("hashing snapshot {}: {e}", disk.snap.name())))
        };
        let ask = ferry_api::HashRanges {
            volume: disk.target.volume.clone(),
            ranges: ranges.to_vec(),
            algorithm: VERIFY_HASH.name().into(),
        };
        let remote = peer.post::<_, ferry_api::RangeHashes>("/v1/peer/copy/hash", &ask);
        let (local, remote) = tokio::join!(local, remote);
        let local = local?;
        let remote = remote.map_err(|e| {
            StepError::failed(format!(
                "hashing {} on {}: {e}",
                disk.target.volume, self.p.to
            ))
        })?;
        if remote.algorithm != VERIFY_HASH.name() {
            return Err(StepError::failed(format!(
                "{} answered {} hashes, {} were asked for",
                self.p.to,
                remote.algorithm,
                VERIFY_HASH.name()
            )));
        }
        if remote.hashes.len() != local.len() {
            return Err(StepError::failed(format!(
                "{} answered {} hashes for {} ranges",
                self.p.to,
                remote.hashes.len(),
                local.len()
            )));
        }
        Ok(ranges
            .iter()
            .zip(local.iter().zip(&remote.hashes))
            .filter(|(_, (a, b))| a != b)
            .map(|(r, _)| *r)
            .collect())
    }

    /// Verifies `ranges` of a disk; blocks that differ are sent again and
    /// re-checked once. Returns bytes re-sent.
    async fn verify(
        &self,
        cx: &StepContext<App>,
        disk: &Disk,
        peer: &crate::peers::PeerClient,
        ranges: &[(u64, u64)],
        pacer: &Pacer,
        mut on_bytes: impl FnMut(u64),
    ) -> Result<u64, StepError> {
        let all: Vec<Vec<(u64, u64)>> = blocks(ranges)
            .chunks(HASH_BATCH)
            .map(<[_]>::to_vec)
            .collect();
        let mut resent = 0;
        let mut batches = futures::stream::iter(all)
            .map(|batch: Vec<(u64, u64)>| async move {
                let r = self.compare(disk, peer, &batch).await;
                (batch, r)
            })
            .buffered(HASH_IN_FLIGHT);
        while let Some((batch, bad)) = batches.next().await {
            if cx.is_cancelled() {
                return Err(StepError::Cancelled);
            }
            let bad = bad?;
            if !bad.is_empty() {
                cx.log(format!(
                    "verify: {} blocks of {} differ on {}; sending them again",
                    bad.len(),
                    disk.target.volume,
                    self.p.to
                ));
                // Read again from the snapshot, hashed again.
                disk.hashes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .retain(|k, _| !bad.contains(k));
                let ranges: Vec<(u64, u64)> = bad.iter().map(|&(o, n)| (o, o + n)).collect();
                resent += disk.send(cx, &ranges, BLOCK, pacer).await?;
                disk.nbd.flush().await.map_err(|e| {
                    StepError::failed(format!("flushing {}: {e}", disk.target.volume))
                })?;
                let still = self.compare(disk, peer, &bad).await?;
                if let Some((off, _)) = still.first() {
                    return Err(StepError::failed(format!(
                        "verify: {} still differs from snapshot {} at offset {off} after sending it again",
                        disk.target.volume,
                        disk.snap.name()
                    )));
                }
            }
            on_bytes(batch.iter().map(|(_, n)| n).sum());
        }
        Ok(resent)
    }
}

/// The fraction of a leaf's transfer with `sent` of its `total` bytes sent
/// and `durable` of them flushed: the bytes sent; `None` once all is
/// durable (the transfer is done). Flushes come every [`RECORD_EVERY`]
/// bytes: counting them would move the bar in steps.
fn transfer_fraction(sent: u64, durable: u64, total: u64) -> Option<f64> {
    (durable < total).then(|| sent.min(total) as f64 / total as f64)
}

/// Splits a leaf's weight (its bytes) between transfer and verify by their
/// expected times.
fn split(bytes: u64, r: Rates, limit: Option<u64>) -> (f64, f64) {
    let (t, v) = r.times(1 << 30, limit);
    let b = bytes as f64;
    (b * t / (t + v), b * v / (t + v))
}

/// Weights (seconds) of the operation's steps, set when the data step
/// starts: a step done in this run weighs the time it took, the data step
/// `data` (what it expects), a step still to come the mean of the done
/// ones' times (they are all a few requests to the peer or the pool).
/// `None` for a step whose time is unknown (done before a restart).
fn step_weights(took: &[Option<f64>], at: usize, data: f64) -> Vec<f64> {
    let done: Vec<f64> = took[..at].iter().flatten().copied().collect();
    let mean = if done.is_empty() {
        0.0
    } else {
        done.iter().sum::<f64>() / done.len() as f64
    };
    took.iter()
        .enumerate()
        .map(|(i, t)| match i.cmp(&at) {
            std::cmp::Ordering::Less => t.unwrap_or(mean),
            std::cmp::Ordering::Equal => data,
            std::cmp::Ordering::Greater => mean,
        })
        .collect()
}

impl Step<App> for CopyData {
    fn name(&self) -> &str {
        "copy data"
    }

    fn recovery(&self) -> Recovery {
        Recovery::Retry
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let opened = Instant::now();
            let peer = self.env.peer(&self.p.to)?;
            let (disks, mut lines) = self.open_disks(cx).await?;
            let mut done: HashMap<(usize, usize), u64> = HashMap::new();
            for line in cx.checkpoints()? {
                if let Ok(m) = serde_json::from_str::<Mark>(&line) {
                    let e = done.entry((m.disk, m.leaf)).or_default();
                    *e = (*e).max(m.done);
                }
            }
            let resumed: u64 = done.values().sum();
            if resumed > 0 {
                lines.push(format!(
                    "resuming: {resumed} bytes were transferred before the interruption"
                ));
            }
            let limit = self.p.bandwidth;
            let (prior, known) = match self.env.rates.get(&self.p.to) {
                Some(r) => (r, "measured by the last copy to this peer"),
                None => (PRIOR, "assumed: nothing measured yet"),
            };
            lines.push(format!(
                "expected throughputs ({known}): transfer {:.1} MB/s, verify {:.1} MB/s",
                prior.transfer / 1e6,
                prior.verify / 1e6
            ));
            cx.log_all(&lines);
            let grand: u64 = disks
                .iter()
                .flat_map(|d| d.leaves.iter().map(Leaf::bytes))
                .sum();
            let mut through = 0u64;
            let mut paused = false;
            // The tree: open → disk → leaf → transfer/verify. Weights in
            // expected seconds at this level (a leaf's bytes below a disk),
            // and the operation's steps in seconds too, so the fixed steps
            // count for the time they take.
            let mut nodes: Vec<Vec<LeafNodes>> = Vec::new();
            cx.progress.update(|t| {
                let secs = |b: u64| {
                    let (a, v) = prior.times(b, limit);
                    a + v
                };
                let open = opened.elapsed().as_secs_f64();
                let data: f64 = disks
                    .iter()
                    .map(|d| secs(d.leaves.iter().map(Leaf::bytes).sum()))
                    .sum();
                let steps = t
                    .node(ferry_ops::ProgressTree::ROOT)
                    .map_or_else(Vec::new, |r| r.children.clone());
                if let Some(at) = steps.iter().position(|n| *n == cx.node) {
                    let took: Vec<Option<f64>> = steps
                        .iter()
                        .map(|n| t.took(*n).map(|d| d.as_secs_f64()))
                        .collect();
                    for (n, w) in steps.iter().zip(step_weights(&took, at, open + data)) {
                        t.set_weight(*n, w);
                    }
                }
                // Finished once its siblings exist (alone, it would be the
                // whole step done).
                let on = t.add(cx.node, "open disks", open);
                for d in &disks {
                    let bytes: u64 = d.leaves.iter().map(Leaf::bytes).sum();
                    let dn = t.add(
                        cx.node,
                        format!("disk {} ({})", d.target.device, d.snap.name()),
                        secs(bytes),
                    );
                    let mut ln = Vec::new();
                    for l in &d.leaves {
                        let b = l.bytes();
                        let leaf = t.add(dn, l.name.clone(), b as f64);
                        let (tw, vw) = split(b, prior, limit);
                        ln.push(LeafNodes {
                            leaf,
                            transfer: t.add(leaf, "transfer", tw),
                            verify: t.add(leaf, "verify", vw),
                        });
                    }
                    nodes.push(ln);
                }
                t.finish(on);
            });
            // Re-splits the leaves not started yet by what was measured so
            // far (their fraction is 0: the overall figure does not move).
            let resplit = |m: &Measure, started: &[Vec<bool>]| {
                let r = m.rates(prior);
                cx.progress.update(|t| {
                    for (dj, d) in disks.iter().enumerate() {
                        for (lj, l) in d.leaves.iter().enumerate() {
                            if !started[dj][lj] {
                                let (tw, vw) = split(l.bytes(), r, limit);
                                t.set_weight(nodes[dj][lj].transfer, tw);
                                t.set_weight(nodes[dj][lj].verify, vw);
                            }
                        }
                    }
                });
            };
            let measure = std::sync::Mutex::new(Measure::default());
            let measured = || *measure.lock().unwrap_or_else(|p| p.into_inner());
            let pacer = Pacer {
                limit,
                start: Instant::now(),
                sent: AtomicU64::new(0),
            };
            // Transfer and verify run at once: each piece is verified once
            // its writes answered, while the next ones are sent (verify
            // reads the target's copy from its page cache, and the target
            // then writes it out behind and lets those pages go: see
            // `api::vmcopy::hash`).
            let (checks, to_check) = tokio::sync::mpsc::unbounded_channel::<Check>();
            let transfer = async {
                let mut sent = 0u64;
                let mut started: Vec<Vec<bool>> =
                    disks.iter().map(|d| vec![false; d.leaves.len()]).collect();
                // The flushes sent last: they run while the next pieces
                // (of this leaf or the next) are sent; the oldest is
                // waited for once FLUSHES_AHEAD are in flight.
                let mut flushing: std::collections::VecDeque<Flushing> = Default::default();
                let mut records = Records::new(Instant::now());
                let pieces_ahead = Arc::new(tokio::sync::Semaphore::new(PIECES_AHEAD));
                let check = |c: Check| {
                    // The verify side stops only on an error, which ends
                    // the step anyway.
                    let _ = checks.send(c);
                };
                // Per leaf: bytes sent and bytes flushed (durable). The
                // transfer's fraction is the bytes sent; it is done once
                // all is flushed. Both only grow: so does the fraction.
                let legs: std::sync::Mutex<Vec<Vec<(u64, u64)>>> = std::sync::Mutex::new(
                    disks.iter().map(|d| vec![(0, 0); d.leaves.len()]).collect(),
                );
                let leg = |di: usize, li: usize, sent: u64, durable: u64| {
                    let total = disks[di].leaves[li].bytes();
                    let (s, d) = {
                        let mut g = legs.lock().unwrap_or_else(|p| p.into_inner());
                        let e = &mut g[di][li];
                        *e = (e.0.max(sent), e.1.max(durable));
                        *e
                    };
                    let n = nodes[di][li].transfer;
                    cx.progress
                        .update(|t| match transfer_fraction(s, d, total) {
                            Some(f) => t.set_fraction(n, f),
                            None => t.finish(n),
                        });
                };
                let landed = |(marks, then): (Vec<Mark>, Vec<Check>)| {
                    for m in marks {
                        leg(m.disk, m.leaf, 0, m.done);
                    }
                    then.into_iter().for_each(check);
                };
                // Leaves of this disk sent since its last flush: how far
                // each got, and their end checks. A leaf's end does not
                // call for a flush of its own; the next flush covers it
                // (at the latest the one at the end of the disk).
                let mut unflushed: Vec<Mark> = Vec::new();
                let mut held: Vec<Check> = Vec::new();
                for (di, disk) in disks.iter().enumerate() {
                    // Transfer what is not checkpointed yet: the units of
                    // all the disk's pieces, leaf after leaf, go out in
                    // one stream. A piece is verified (or flushed) once
                    // its last unit answered (its writes all did), while
                    // the next pieces' units — of the next leaf too — are
                    // in flight. A flush runs while the next pieces are
                    // sent; its checkpoints are recorded once it answered.
                    let mut units = Vec::new();
                    let mut plans = Vec::new();
                    for (li, leaf) in disk.leaves.iter().enumerate() {
                        let skip = done.get(&(di, li)).copied().unwrap_or(0).min(leaf.bytes());
                        let (u, plan) = unit_plan(&after(&leaf.ranges, skip), PIECE, XFER);
                        let base = units.len();
                        units.extend(u);
                        // The pieces' last units, numbered in the stream.
                        let plan: Vec<PieceEnd> =
                            plan.into_iter().map(|(end, p)| (base + end, p)).collect();
                        plans.push((skip, plan, units.len() - base));
                    }
                    let mut stream = disk.sending(units).enumerate();
                    for ((li, leaf), (skip, plan, count)) in
                        disk.leaves.iter().enumerate().zip(plans)
                    {
                        started[di][li] = true;
                        let total = leaf.bytes();
                        // What a run before a restart sent is verified too.
                        if skip > 0 {
                            check(Check::piece(di, li, upto(&leaf.ranges, skip)));
                        }
                        let mut at = skip;
                        let mut flushed_to = skip;
                        leg(di, li, skip, skip);
                        let t0 = Instant::now();
                        let mut waited = std::time::Duration::ZERO;
                        let mut plan = plan.into_iter().peekable();
                        let mut got = 0u64;
                        // The leaf's units (none if all of it was sent
                        // before a restart).
                        let mut units = stream.by_ref().take(count);
                        while let Some((i, r)) = units.next().await {
                            let (n, s) = disk.answered(cx, &pacer, r).await?;
                            sent += s;
                            got += n;
                            leg(di, li, skip + got, 0);
                            // Flushes that answered: their leaves' progress
                            // and checks go on now.
                            while flushing.front().is_some_and(|f| f.task.is_finished()) {
                                let f = flushing.pop_front().expect("a front flush");
                                landed(f.done(cx).await?);
                            }
                            // Not the last unit of the next piece: go on.
                            let Some((_, piece)) = plan.next_if(|(end, _)| *end == i) else {
                                continue;
                            };
                            let pb = span_bytes(&piece);
                            at += pb;
                            through += pb;
                            // Learn the transfer rate as the leaf goes (the
                            // first leaves' split is otherwise a guess).
                            let mut m = measured();
                            m.t_bytes += at - skip;
                            m.t_secs += t0.elapsed().as_secs_f64();
                            resplit(&m, &started);
                            // Test-only: a crash point once half the data is
                            // sent (and checkpointed) in this run.
                            let pause = !paused
                                && through * 2 >= grand - resumed.min(grand)
                                && test_pause_armed("vm.copy:copying");
                            // At most PIECES_AHEAD pieces unverified. The
                            // checks the flushes hold are verify's to do.
                            let w = Instant::now();
                            let ahead = match pieces_ahead.clone().try_acquire_owned() {
                                Ok(p) => p,
                                Err(_) => {
                                    while let Some(f) = flushing.pop_front() {
                                        landed(f.done(cx).await?);
                                    }
                                    pieces_ahead
                                        .clone()
                                        .acquire_owned()
                                        .await
                                        .map_err(StepError::failed)?
                                }
                            };
                            let piece = Check {
                                _ahead: Some(ahead),
                                ..Check::piece(di, li, piece)
                            };
                            if !records.due(pb, pause) {
                                waited += w.elapsed();
                                check(piece);
                                continue;
                            }
                            unflushed.push(Mark {
                                disk: di,
                                leaf: li,
                                done: at,
                            });
                            flushed_to = at;
                            held.push(piece);
                            start_flush(
                                cx,
                                disk,
                                &mut flushing,
                                &mut unflushed,
                                &mut held,
                                &landed,
                            )
                            .await?;
                            waited += w.elapsed();
                            if pause {
                                paused = true;
                                while let Some(f) = flushing.pop_front() {
                                    landed(f.done(cx).await?);
                                }
                                test_pause("vm.copy:copying").await;
                            }
                        }
                        let t_took = t0.elapsed();
                        {
                            let mut m = measure.lock().unwrap_or_else(|p| p.into_inner());
                            m.t_bytes += total - skip;
                            m.t_secs += t_took.as_secs_f64();
                        }
                        let secs = |d: std::time::Duration| d.as_secs_f64();
                        let moved = (total - skip) as f64;
                        let tt = secs(t_took);
                        // The leaf's end is verified after its last piece.
                        let end = Check {
                            last: Some(format!(
                                "{} {}: {} MiB, transfer {tt:.3}s ({:.0} MB/s, {:.3}s of it waiting for flushes and verify)",
                                disk.target.device,
                                leaf.name,
                                moved / (1 << 20) as f64,
                                moved / tt.max(1e-9) / 1e6,
                                secs(waited),
                            )),
                            ..Check::piece(di, li, Vec::new())
                        };
                        if at > flushed_to {
                            // Not durable yet: done with the next flush.
                            unflushed.push(Mark {
                                disk: di,
                                leaf: li,
                                done: at,
                            });
                            held.push(end);
                        } else {
                            match flushing.back_mut() {
                                Some(f) => f.then.push(end),
                                None => check(end),
                            }
                        }
                        if li + 1 == disk.leaves.len() && !(unflushed.is_empty() && held.is_empty())
                        {
                            // The disk's end: all it got is made durable.
                            records.flushed(Instant::now());
                            start_flush(
                                cx,
                                disk,
                                &mut flushing,
                                &mut unflushed,
                                &mut held,
                                &landed,
                            )
                            .await?;
                        }
                    }
                }
                while let Some(f) = flushing.pop_front() {
                    landed(f.done(cx).await?);
                }
                drop(checks);
                Ok::<_, StepError>(sent)
            };
            let verify = async {
                let (mut resent, mut verified) = (0u64, 0u64);
                let mut leaf_lines: Vec<String> = Vec::new();
                let mut vdone: HashMap<(usize, usize), (u64, f64)> = HashMap::new();
                // Bytes verified per leaf so far, by the checks running
                // side by side.
                let counted: std::sync::Mutex<HashMap<(usize, usize), u64>> = Default::default();
                let counted = &counted;
                let (peer, pacer, all_disks, all_nodes) = (&peer, &pacer, &disks, &nodes);
                let runs = futures::stream::unfold(to_check, |mut rx| async move {
                    rx.recv().await.map(|c| (c, rx))
                })
                .map(|c: Check| async move {
                    let (disk, leaf) = (&all_disks[c.disk], &all_disks[c.disk].leaves[c.leaf]);
                    let n = &all_nodes[c.disk][c.leaf];
                    let total = leaf.bytes();
                    let v0 = Instant::now();
                    let r = self
                        .verify(cx, disk, peer, &c.ranges, pacer, |b| {
                            let did = {
                                let mut g = counted.lock().unwrap_or_else(|p| p.into_inner());
                                let e = g.entry((c.disk, c.leaf)).or_default();
                                *e += b;
                                *e
                            };
                            let f = did as f64 / total.max(1) as f64;
                            cx.progress.update(|t| t.set_fraction(n.verify, f));
                        })
                        .await;
                    (c, v0, r)
                })
                .buffered(VERIFY_AHEAD);
                let mut runs = std::pin::pin!(runs);
                // The time a check adds: from its start, or from the end
                // of the one before if they overlapped.
                let mut last_end = Instant::now();
                while let Some((c, v0, r)) = runs.next().await {
                    resent += r?;
                    let n = &nodes[c.disk][c.leaf];
                    let now = Instant::now();
                    let took = now.duration_since(v0.max(last_end)).as_secs_f64();
                    last_end = now;
                    let bytes = span_bytes(&c.ranges);
                    let e = vdone.entry((c.disk, c.leaf)).or_default();
                    e.0 += bytes;
                    e.1 += took;
                    verified += bytes;
                    {
                        let mut m = measure.lock().unwrap_or_else(|p| p.into_inner());
                        m.v_bytes += bytes;
                        m.v_secs += took;
                    }
                    if let Some(line) = c.last {
                        cx.progress.update(|t| t.finish(n.leaf));
                        leaf_lines.push(format!("{line}, verify {:.3}s", e.1));
                    }
                }
                Ok::<_, StepError>((resent, verified, leaf_lines))
            };
            let (sent, (resent, verified, mut leaf_lines)) = tokio::try_join!(transfer, verify)?;
            let measure = measured();
            let r = measure.rates(prior);
            if measure.t_bytes >= BLOCK && measure.v_bytes >= BLOCK && limit.is_none() {
                self.env.rates.set(&self.p.to, r);
            }
            leaf_lines.push(format!(
                "sent {sent} bytes (resumed after {resumed} bytes sent before a restart), verified {verified} bytes, re-sent {resent}; transfer {:.1} MB/s, verify {:.1} MB/s",
                r.transfer / 1e6,
                r.verify / 1e6
            ));
            leaf_lines.into_iter().for_each(|l| cx.log_when_done(l));
            Ok(json!({
                "sent": sent,
                "resumed_from": resumed,
                "verified": verified,
                "resent": resent,
                "transfer_bytes_per_sec": r.transfer,
                "verify_bytes_per_sec": r.verify,
            }))
        })
    }
}

/// The part of `ranges` after its first `skip` bytes.
fn after(ranges: &[(u64, u64)], mut skip: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(s, e) in ranges {
        let n = e - s;
        if skip >= n {
            skip -= n;
            continue;
        }
        out.push((s + skip, e));
        skip = 0;
    }
    out
}

/// The first `keep` bytes of `ranges` (what [`after`] leaves out).
fn upto(ranges: &[(u64, u64)], mut keep: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(s, e) in ranges {
        if keep == 0 {
            break;
        }
        let n = (e - s).min(keep);
        out.push((s, s + n));
        keep -= n;
    }
    out
}

/// Cuts `ranges` into pieces of about `size` bytes each.
fn pieces(ranges: &[(u64, u64)], size: u64) -> Vec<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut have = 0;
    for &(mut s, e) in ranges {
        while s < e {
            let n = (e - s).min(size - have);
            cur.push((s, s + n));
            have += n;
            s += n;
            if have == size {
                out.push(std::mem::take(&mut cur));
                have = 0;
            }
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// A piece of a leaf: the index of its last unit, and its ranges.
type PieceEnd = (usize, Vec<(u64, u64)>);

/// The units to send `ranges` in pieces of about `piece` bytes, each cut
/// in units of at most `unit` bytes (a unit never straddles two pieces),
/// and each piece with the index of its last unit: once that unit is
/// answered, so are all of the piece's.
fn unit_plan(ranges: &[(u64, u64)], piece: u64, unit: u64) -> (Vec<(u64, u64)>, Vec<PieceEnd>) {
    let mut units = Vec::new();
    let mut plan = Vec::new();
    for p in pieces(ranges, piece) {
        units.extend(cut(&p, unit));
        plan.push((units.len() - 1, p));
    }
    (units, plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hosts of different versions compare each other's hashes: the
    /// XXH3-128 of a copy is the reference one (values of XXH3_128bits,
    /// seed 0, as `xxhash-rust` gave them before `twox-hash` took over),
    /// whichever SIMD path the CPU takes, across the 1 MiB blocks a copy
    /// hashes.
    #[test]
    fn verify_hashes_are_the_reference_xxh3_128() {
        let long: Vec<u8> = (0..(1u32 << 20) + 5)
            .map(|i| (i.wrapping_mul(31).wrapping_add(7) % 251) as u8)
            .collect();
        for (b, want) in [
            (&b""[..], "99aa06d3014798d86001c324468d497f"),
            (&b"abc"[..], "06b05ab6733a618578af5f94892f3950"),
            (&long[..], "7e88cab7990d137e5ffc269df6ea4df8"),
        ] {
            assert_eq!(Algorithm::Xxh3.hex(b), want, "{} bytes", b.len());
        }
    }

    #[test]
    fn after_skips_bytes_across_ranges() {
        let r = [(0, 10), (20, 30)];
        assert_eq!(after(&r, 0), r);
        assert_eq!(after(&r, 5), [(5, 10), (20, 30)]);
        assert_eq!(after(&r, 10), [(20, 30)]);
        assert_eq!(after(&r, 15), [(25, 30)]);
        assert!(after(&r, 20).is_empty());
    }

    #[test]
    fn a_piece_ends_with_its_last_unit_and_units_stay_within_pieces() {
        let r = [(0, 10), (20, 23), (30, 45)];
        for (piece, unit) in [(4, 4), (8, 4), (8, 3), (5, 2), (100, 4), (1, 1)] {
            let (units, plan) = unit_plan(&r, piece, unit);
            // The units are the ranges, in order, none longer than `unit`.
            let spans: Vec<(u64, u64)> = units.iter().map(|&(o, n)| (o, o + n)).collect();
            assert_eq!(span_bytes(&spans), 28, "{piece}/{unit}");
            assert!(units.iter().all(|&(_, n)| n > 0 && n <= unit));
            assert!(units.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0));
            // Each piece is exactly the units since the previous piece's
            // last one.
            let mut first = 0;
            for (end, p) in &plan {
                let mine: Vec<(u64, u64)> = units[first..=*end]
                    .iter()
                    .map(|&(o, n)| (o, o + n))
                    .collect();
                assert_eq!(span_bytes(&mine), span_bytes(p), "{piece}/{unit}");
                assert!(
                    mine.iter()
                        .all(|&(s, e)| p.iter().any(|&(a, b)| a <= s && e <= b))
                );
                first = end + 1;
            }
            assert_eq!(first, units.len(), "{piece}/{unit}");
        }
        assert_eq!(unit_plan(&[], 4, 4), (Vec::new(), Vec::new()));
    }

    #[test]
    fn flushes_are_due_per_record_every_bytes_and_when_they_must() {
        let t0 = Instant::now();
        let mut r = Records::new(t0);
        let piece = PIECE;
        let per_record = RECORD_EVERY / piece;
        assert!(per_record > 1, "a record spans several pieces");
        let recorded: Vec<bool> = (0..2 * per_record)
            .map(|_| r.due_at(piece, false, t0))
            .collect();
        // One record per RECORD_EVERY bytes.
        let expect: Vec<bool> = (1..=2 * per_record).map(|i| i % per_record == 0).collect();
        assert_eq!(recorded, expect);
        // The pause is flushed whatever came before, and the count starts
        // again; so it does after a flush at a disk's end.
        assert!(!r.due_at(piece, false, t0));
        assert!(r.due_at(1, true, t0));
        assert!(!r.due_at(piece, false, t0));
        r.flushed(t0);
        let expect: Vec<bool> = (1..=per_record).map(|i| i == per_record).collect();
        let recorded: Vec<bool> = (0..per_record)
            .map(|_| r.due_at(piece, false, t0))
            .collect();
        assert_eq!(recorded, expect);
        // A piece sent RECORD_AFTER after the last flush is flushed, and
        // the clock starts again there.
        let later = t0 + RECORD_AFTER;
        assert!(r.due_at(1, false, later));
        assert!(!r.due_at(1, false, later));
    }

    #[test]
    fn upto_and_after_split_ranges_at_a_byte_count() {
        let r = [(0, 10), (20, 30), (40, 45)];
        for k in [0, 5, 10, 15, 20, 25, 30] {
            let mut both = upto(&r, k);
            both.extend(after(&r, k));
            assert_eq!(span_bytes(&upto(&r, k)), k.min(25));
            assert_eq!(span_bytes(&both), 25, "at {k}");
            assert!(both.iter().all(|(a, b)| a < b), "no empty ranges at {k}");
        }
        assert_eq!(upto(&r, 12), vec![(0, 10), (20, 22)]);
    }

    #[test]
    fn pieces_cover_ranges_in_order() {
        let r = [(0, 10), (20, 35)];
        let p = pieces(&r, 8);
        assert_eq!(
            p,
            vec![
                vec![(0, 8)],
                vec![(8, 10), (20, 26)],
                vec![(26, 34)],
                vec![(34, 35)]
            ]
        );
    }

    #[test]
    fn a_transfer_counts_bytes_sent_and_is_done_once_all_are_flushed() {
        assert_eq!(transfer_fraction(0, 0, 100), Some(0.0));
        assert_eq!(transfer_fraction(60, 0, 100), Some(0.6));
        assert_eq!(transfer_fraction(70, 64, 100), Some(0.7));
        // All sent is not done until all is flushed.
        assert_eq!(transfer_fraction(100, 64, 100), Some(1.0));
        assert_eq!(transfer_fraction(100, 100, 100), None);
        // A leaf with nothing to send is done at once.
        assert_eq!(transfer_fraction(0, 0, 0), None);
    }

    #[test]
    fn split_follows_expected_times() {
        let r = Rates {
            transfer: 100.0,
            verify: 200.0,
        };
        let (t, v) = split(300, r, None);
        assert!((t - 200.0).abs() < 1e-9 && (v - 100.0).abs() < 1e-9);
        // A bandwidth limit slows the transfer: its share grows.
        let (t, v) = split(300, r, Some(50));
        assert!((t - 240.0).abs() < 1e-9 && (v - 60.0).abs() < 1e-9);
    }

    #[test]
    fn leaves_of_a_damaged_table_are_one_piece() {
        let (l, what) = leaves(Err(ferry_disk::Error::Mbr("bad".into())), &[(0, 10)]);
        assert_eq!(l.len(), 1);
        assert!(what.contains("one piece"));
    }

    #[test]
    fn cut_blocks_of_a_unit_are_blocks_of_the_ranges() {
        let r = [(0, 10 * BLOCK + 5), (20 * BLOCK, 21 * BLOCK)];
        let units = cut(&r, XFER);
        let mut inner = Vec::new();
        for (off, n) in units {
            assert!(n <= XFER);
            inner.extend(cut(&[(off, off + n)], BLOCK));
        }
        assert_eq!(inner, blocks(&r));
    }

    #[test]
    fn zero_detection() {
        let mut b = vec![0u8; 3 * 4096 + 13];
        assert!(is_zero(&b));
        *b.last_mut().unwrap() = 1;
        assert!(!is_zero(&b));
        b.fill(0);
        b[5000] = 7;
        assert!(!is_zero(&b));
        assert!(is_zero(&[]));
    }

    #[test]
    fn fixed_steps_weigh_their_time() {
        // Two steps done (0.1 s, 0.3 s), the data step, two to come.
        let w = step_weights(&[Some(0.1), Some(0.3), None, None, None], 2, 5.0);
        assert_eq!(w, [0.1, 0.3, 5.0, 0.2, 0.2]);
        // A step done before a restart (time unknown) counts as the mean.
        let w = step_weights(&[None, Some(0.3), None, None], 2, 5.0);
        assert_eq!(w, [0.3, 0.3, 5.0, 0.3]);
    }

    #[test]
    fn clip_intersects() {
        assert_eq!(clip(&[(0, 10), (20, 30)], &(5..25)), [(5, 10), (20, 25)]);
    }
}
