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
//!   this pair of hosts — first by a short calibration (a few MiB sent and
//!   hashed on both hosts), then by the running measurement after each
//!   leaf. Only leaves that have not started are re-split: their fraction
//!   is 0, so the overall figure does not move when they are (the split
//!   is inside a leaf whose total weight is fixed).
//!
//! # What is sent
//! The snapshot's allocated ranges only; of those, 1 MiB blocks that read
//! as all zeroes are not sent (the new target volume reads zero there).
//!
//! # Resume
//! After every [`CHECKPOINT_EVERY`] bytes of a leaf and at its end, the
//! step records in the journal how far the leaf's transfer got
//! (`{"disk":D,"leaf":L,"done":BYTES}`); a run after a crash skips that.
//! Verify always runs in full, so it covers whatever the crash left.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use ferry_nbd::ClientConfig;
use ferry_nbd::client::{Address, Pool as NbdPool};
use ferry_ops::{BoxFuture, NodeId, Recovery, Step, StepContext, StepError, test_pause};
use ferry_pool::Snapshot as PoolSnapshot;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{Env, Params, Snapped, TargetDisk, result};
use crate::daemon::App;
use crate::operations::{blocking, snapshot_data_ranges};

/// Copy and hash unit.
pub const BLOCK: u64 = 1 << 20;
/// Blocks in flight at once.
const IN_FLIGHT: usize = 8;
/// Blocks per hash request to the target.
const HASH_BATCH: usize = 16;
/// A leaf's transfer is checkpointed after this many bytes.
const CHECKPOINT_EVERY: u64 = 64 << 20;
/// Bytes sent and hashed by the calibration.
const CALIBRATION: u64 = 8 << 20;
/// NBD connections to each target export.
const CONNECTIONS: usize = 2;

/// One leaf of the hierarchy: a partition or the space outside them.
#[derive(Debug, Clone)]
pub(crate) struct Leaf {
    pub name: String,
    /// Allocated ranges of the snapshot within the leaf, in order.
    pub ranges: Vec<(u64, u64)>,
}

impl Leaf {
    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s).sum()
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

/// Splits ranges into blocks of at most [`BLOCK`] bytes.
fn blocks(ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(start, end) in ranges {
        let mut off = start;
        while off < end {
            let n = (end - off).min(BLOCK);
            out.push((off, n));
            off += n;
        }
    }
    out
}

/// BLAKE3 of each range, read with `read`.
pub fn hash_ranges(
    ranges: &[(u64, u64)],
    mut read: impl FnMut(u64, &mut [u8]) -> Result<(), String>,
) -> Result<Vec<String>, String> {
    let mut buf = Vec::new();
    ranges
        .iter()
        .map(|&(off, len)| {
            buf.resize(len as usize, 0);
            read(off, &mut buf)?;
            Ok(blake3::hash(&buf).to_hex().to_string())
        })
        .collect()
}

/// Measured throughputs (bytes/s) of the two sub-operations.
#[derive(Debug, Clone, Copy)]
struct Rates {
    transfer: f64,
    verify: f64,
}

/// Running totals behind [`Rates`].
#[derive(Default)]
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
struct Pacer {
    limit: Option<u64>,
    start: Instant,
    sent: u64,
}

impl Pacer {
    async fn sent(&mut self, n: u64) {
        self.sent += n;
        if let Some(l) = self.limit.filter(|l| *l > 0) {
            let due = std::time::Duration::from_secs_f64(self.sent as f64 / l as f64);
            let el = self.start.elapsed();
            if due > el {
                tokio::time::sleep(due - el).await;
            }
        }
    }
}

impl CopyData {
    async fn open_disks(&self, cx: &StepContext<App>) -> Result<Vec<Disk>, StepError> {
        let snapped: Snapped = result(cx, "snapshot")?;
        let targets: Value = result(cx, "create target volumes")?;
        let targets: Vec<TargetDisk> = serde_json::from_value(targets["disks"].clone())
            .map_err(|e| StepError::failed(format!("malformed target disks: {e}")))?;
        let mut disks = Vec::new();
        for (d, t) in snapped.disks.iter().zip(targets) {
            let pool = cx.app.pool.clone();
            let (volume, snapshot, size) = (d.volume.clone(), d.snapshot.clone(), d.size);
            let (snap, ranges, layout) = blocking(move || {
                let snap = pool.open_snapshot(&snapshot)?;
                let ranges = snapshot_data_ranges(&pool, &volume, &snapshot, size)?;
                let layout = ferry_disk::read_layout(&SnapRead(&snap), size);
                Ok((snap, ranges, layout))
            })
            .await?;
            let (leaves, what) = leaves(layout, &ranges);
            cx.log(format!(
                "disk {} ({}): {what}; {} bytes allocated in {} pieces",
                d.device,
                d.volume,
                leaves.iter().map(Leaf::bytes).sum::<u64>(),
                leaves.len()
            ));
            let (addr, export) = nbd_address(&t.uri)?;
            let cfg = ClientConfig {
                export,
                meta_contexts: Vec::new(),
                tls: None,
            };
            let nbd = NbdPool::connect(addr, cfg, CONNECTIONS)
                .await
                .map_err(|e| {
                    StepError::failed(format!(
                        "connecting to export of {} on {}: {e}",
                        t.volume, self.p.to
                    ))
                })?;
            if nbd.size() < size {
                return Err(StepError::failed(format!(
                    "target volume {} is {} bytes, smaller than {size}",
                    t.volume,
                    nbd.size()
                )));
            }
            disks.push(Disk {
                snap,
                target: t,
                nbd: Arc::new(nbd),
                leaves,
            });
        }
        Ok(disks)
    }

    /// Sends `ranges` of a disk; returns (bytes processed, bytes sent).
    async fn send(
        &self,
        cx: &StepContext<App>,
        disk: &Disk,
        ranges: &[(u64, u64)],
        pacer: &mut Pacer,
        mut on_block: impl FnMut(u64),
    ) -> Result<u64, StepError> {
        let (snap, nbd, vol) = (&disk.snap, &disk.nbd, &disk.target.volume);
        let mut writes = futures::stream::iter(blocks(ranges))
            .map(|(off, n)| async move {
                let mut buf = vec![0u8; n as usize];
                tokio::task::block_in_place(|| snap.read_at(off, &mut buf)).map_err(|e| {
                    StepError::failed(format!("reading snapshot {} at {off}: {e}", snap.name()))
                })?;
                if buf.iter().all(|b| *b == 0) {
                    return Ok((n, 0));
                }
                nbd.write_at(off, &buf, false)
                    .await
                    .map_err(|e| StepError::failed(format!("writing {vol} at {off}: {e}")))?;
                Ok::<_, StepError>((n, n))
            })
            .buffered(IN_FLIGHT);
        let mut sent = 0;
        while let Some(r) = writes.next().await {
            if cx.is_cancelled() {
                return Err(StepError::Cancelled);
            }
            let (n, s) = r?;
            sent += s;
            if s > 0 {
                pacer.sent(s).await;
            }
            on_block(n);
        }
        Ok(sent)
    }

    /// Hashes `ranges` (blocks) on both hosts; returns the blocks that differ.
    async fn compare(
        &self,
        disk: &Disk,
        peer: &crate::peers::PeerClient,
        ranges: &[(u64, u64)],
    ) -> Result<Vec<(u64, u64)>, StepError> {
        let snap = disk.snap.clone();
        let rs = ranges.to_vec();
        let local = tokio::task::spawn_blocking(move || {
            hash_ranges(&rs, |off, buf| {
                snap.read_at(off, buf).map_err(|e| e.to_string())
            })
        });
        let ask = ferry_api::HashRanges {
            volume: disk.target.volume.clone(),
            ranges: ranges.to_vec(),
        };
        let remote = peer.post::<_, ferry_api::RangeHashes>("/v1/peer/copy/hash", &ask);
        let (local, remote) = tokio::join!(local, remote);
        let local = local.map_err(StepError::failed)?.map_err(|e| {
            StepError::failed(format!("hashing snapshot {}: {e}", disk.snap.name()))
        })?;
        let remote = remote.map_err(|e| {
            StepError::failed(format!(
                "hashing {} on {}: {e}",
                disk.target.volume, self.p.to
            ))
        })?;
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

    /// Verifies a leaf; blocks that differ are sent again and re-checked
    /// once. Returns bytes re-sent.
    async fn verify(
        &self,
        cx: &StepContext<App>,
        disk: &Disk,
        peer: &crate::peers::PeerClient,
        leaf: &Leaf,
        pacer: &mut Pacer,
        mut on_bytes: impl FnMut(u64),
    ) -> Result<u64, StepError> {
        let all: Vec<Vec<(u64, u64)>> = blocks(&leaf.ranges)
            .chunks(HASH_BATCH)
            .map(<[_]>::to_vec)
            .collect();
        let mut resent = 0;
        let mut batches = futures::stream::iter(all)
            .map(|batch: Vec<(u64, u64)>| async move {
                let r = self.compare(disk, peer, &batch).await;
                (batch, r)
            })
            .buffered(2);
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
                resent += self.send(cx, disk, &bad, pacer, |_| {}).await?;
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

    /// Sends and hashes a few MiB of the first data to measure both
    /// sub-operations' throughput on this pair of hosts. The bytes sent
    /// are the disk's own (sent again later: idempotent).
    async fn calibrate(
        &self,
        cx: &StepContext<App>,
        disks: &[Disk],
        peer: &crate::peers::PeerClient,
    ) -> Result<(Rates, u64), StepError> {
        let fallback = Rates {
            transfer: 100e6,
            verify: 200e6,
        };
        let Some((disk, sample)) = disks.iter().find_map(|d| {
            let all: Vec<(u64, u64)> = d.leaves.iter().flat_map(|l| l.ranges.clone()).collect();
            let mut left = CALIBRATION;
            let mut s = Vec::new();
            for (a, b) in all {
                if left == 0 {
                    break;
                }
                let n = (b - a).min(left);
                s.push((a, a + n));
                left -= n;
            }
            (!s.is_empty()).then_some((d, s))
        }) else {
            return Ok((fallback, 0));
        };
        let bytes: u64 = sample.iter().map(|(a, b)| b - a).sum();
        let mut pacer = Pacer {
            limit: self.p.bandwidth,
            start: Instant::now(),
            sent: 0,
        };
        let t0 = Instant::now();
        let sent = self.send(cx, disk, &sample, &mut pacer, |_| {}).await?;
        disk.nbd
            .flush()
            .await
            .map_err(|e| StepError::failed(format!("flushing {}: {e}", disk.target.volume)))?;
        let t = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let leaf = Leaf {
            name: "calibration".into(),
            ranges: sample,
        };
        self.verify(cx, disk, peer, &leaf, &mut pacer, |_| {})
            .await?;
        let v = t1.elapsed().as_secs_f64();
        let r = Rates {
            transfer: bytes as f64 / t.max(1e-6),
            verify: bytes as f64 / v.max(1e-6),
        };
        cx.log(format!(
            "calibration on {} bytes: transfer {:.1} MB/s, verify {:.1} MB/s",
            bytes,
            r.transfer / 1e6,
            r.verify / 1e6
        ));
        Ok((r, sent))
    }
}

/// Splits a leaf's weight (its bytes) between transfer and verify by their
/// expected times.
fn split(bytes: u64, r: Rates) -> (f64, f64) {
    let (t, v) = (1.0 / r.transfer, 1.0 / r.verify);
    let b = bytes as f64;
    (b * t / (t + v), b * v / (t + v))
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
            let peer = self.env.peer(&self.p.to)?;
            let disks = self.open_disks(cx).await?;
            let mut done: HashMap<(usize, usize), u64> = HashMap::new();
            for line in cx.checkpoints()? {
                if let Ok(m) = serde_json::from_str::<Mark>(&line) {
                    let e = done.entry((m.disk, m.leaf)).or_default();
                    *e = (*e).max(m.done);
                }
            }
            let resumed: u64 = done.values().sum();
            if resumed > 0 {
                cx.log(format!(
                    "resuming: {resumed} bytes were transferred before the interruption"
                ));
            }
            let (calibrated, calibration_sent) = self.calibrate(cx, &disks, &peer).await?;
            let grand: u64 = disks
                .iter()
                .flat_map(|d| d.leaves.iter().map(Leaf::bytes))
                .sum();
            let mut through = 0u64;
            let mut paused = false;
            // The tree: disk → leaf → transfer/verify.
            let mut nodes: Vec<Vec<LeafNodes>> = Vec::new();
            cx.progress.update(|t| {
                for d in &disks {
                    let dn = t.add(
                        cx.node,
                        format!("disk {} ({})", d.target.device, d.snap.name()),
                        d.leaves.iter().map(Leaf::bytes).sum::<u64>() as f64,
                    );
                    let mut ln = Vec::new();
                    for l in &d.leaves {
                        let b = l.bytes();
                        let leaf = t.add(dn, l.name.clone(), b as f64);
                        let (tw, vw) = split(b, calibrated);
                        ln.push(LeafNodes {
                            leaf,
                            transfer: t.add(leaf, "transfer", tw),
                            verify: t.add(leaf, "verify", vw),
                        });
                    }
                    nodes.push(ln);
                }
            });
            let mut measure = Measure::default();
            let mut pacer = Pacer {
                limit: self.p.bandwidth,
                start: Instant::now(),
                sent: 0,
            };
            let (mut sent, mut resent, mut verified) = (0u64, 0u64, 0u64);
            let mut started = vec![vec![false; 0]; disks.len()];
            for (di, d) in disks.iter().enumerate() {
                started[di] = vec![false; d.leaves.len()];
            }
            for (di, disk) in disks.iter().enumerate() {
                for (li, leaf) in disk.leaves.iter().enumerate() {
                    started[di][li] = true;
                    let n = &nodes[di][li];
                    let total = leaf.bytes();
                    let skip = done.get(&(di, li)).copied().unwrap_or(0).min(total);
                    // Transfer what is not checkpointed yet.
                    let todo = after(&leaf.ranges, skip);
                    let mut at = skip;
                    cx.progress
                        .update(|t| t.set_fraction(n.transfer, at as f64 / total.max(1) as f64));
                    let t0 = Instant::now();
                    for piece in pieces(&todo, CHECKPOINT_EVERY) {
                        let pb: u64 = piece.iter().map(|(a, b)| b - a).sum();
                        let base = at;
                        let mut got = 0u64;
                        sent += self
                            .send(cx, disk, &piece, &mut pacer, |b| {
                                got += b;
                                let f = (base + got) as f64 / total.max(1) as f64;
                                cx.progress.update(|t| t.set_fraction(n.transfer, f));
                            })
                            .await?;
                        disk.nbd.flush().await.map_err(|e| {
                            StepError::failed(format!("flushing {}: {e}", disk.target.volume))
                        })?;
                        at += pb;
                        through += pb;
                        cx.checkpoint(
                            json!(Mark {
                                disk: di,
                                leaf: li,
                                done: at
                            })
                            .to_string(),
                        )?;
                        // Test-only: a crash point once half the data is
                        // sent (and checkpointed) in this run.
                        if !paused && through * 2 >= grand - resumed.min(grand) {
                            paused = true;
                            test_pause("vm.copy:copying").await;
                        }
                    }
                    cx.progress.update(|t| t.finish(n.transfer));
                    measure.t_bytes += total - skip;
                    measure.t_secs += t0.elapsed().as_secs_f64();
                    // Verify the whole leaf.
                    let v0 = Instant::now();
                    let mut vdone = 0u64;
                    resent += self
                        .verify(cx, disk, &peer, leaf, &mut pacer, |b| {
                            vdone += b;
                            let f = vdone as f64 / total.max(1) as f64;
                            cx.progress.update(|t| t.set_fraction(n.verify, f));
                        })
                        .await?;
                    verified += total;
                    measure.v_bytes += total;
                    measure.v_secs += v0.elapsed().as_secs_f64();
                    cx.progress.update(|t| t.finish(n.leaf));
                    // Re-split the leaves not started yet by what was
                    // measured so far (their fraction is 0: the overall
                    // figure does not move).
                    let r = measure.rates(calibrated);
                    cx.progress.update(|t| {
                        for (dj, d) in disks.iter().enumerate() {
                            for (lj, l) in d.leaves.iter().enumerate() {
                                if !started[dj][lj] {
                                    let (tw, vw) = split(l.bytes(), r);
                                    t.set_weight(nodes[dj][lj].transfer, tw);
                                    t.set_weight(nodes[dj][lj].verify, vw);
                                }
                            }
                        }
                    });
                }
            }
            let r = measure.rates(calibrated);
            cx.log(format!(
                "sent {sent} bytes (resumed after {resumed} bytes sent before a restart; calibration sent {calibration_sent}), verified {verified} bytes, re-sent {resent}; transfer {:.1} MB/s, verify {:.1} MB/s",
                r.transfer / 1e6,
                r.verify / 1e6
            ));
            Ok(json!({
                "sent": sent,
                "resumed_from": resumed,
                "verified": verified,
                "resent": resent,
                "calibration_sent": calibration_sent,
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn split_follows_expected_times() {
        let (t, v) = split(
            300,
            Rates {
                transfer: 100.0,
                verify: 200.0,
            },
        );
        assert!((t - 200.0).abs() < 1e-9 && (v - 100.0).abs() < 1e-9);
    }

    #[test]
    fn leaves_of_a_damaged_table_are_one_piece() {
        let (l, what) = leaves(Err(ferry_disk::Error::Mbr("bad".into())), &[(0, 10)]);
        assert_eq!(l.len(), 1);
        assert!(what.contains("one piece"));
    }

    #[test]
    fn clip_intersects() {
        assert_eq!(clip(&[(0, 10), (20, 30)], &(5..25)), [(5, 10), (20, 25)]);
    }
}
