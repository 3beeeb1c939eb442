//! `pool`: the pool's data path against the same workload with
//! pread/pwrite on a plain raw file (peer `raw-file`), on a live volume, a
//! volume with 1000 snapshots and a clone; and snapshot creation time on a
//! 1 GiB and a 1 TiB (sparse) volume, next to the latency of one raw
//! 4 KiB write + fdatasync on the same file system (peer `raw-fdatasync`,
//! the floor of any durable commit there).
//!
//! The load generator runs in-process: 2 threads issuing 4 KiB random or
//! 1 MiB sequential reads/writes through the volume API, or through
//! `FileExt::read_at/write_at` on the raw file. Both sides use the page
//! cache (buffered I/O); every timed write run ends with a flush
//! (fdatasync on the raw file), included in the time. Sequence per target:
//! prefill, (setup: snapshots or clone), sequential read, random read, one
//! untimed overwrite pass (absorbs first-write copy-on-write after the
//! snapshots), sequential write, random write. Each job runs on every
//! target in turn, `--rounds N` times (default 2), the best figure kept;
//! every dirty page is written back (`sync`, untimed) before each job.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferry_pool::workload::Rng;
use ferry_pool::{Pool, PoolOptions, Volume};

use crate::report::{Measurement, Report, scratch_dir};
use crate::suites::{Options, median, settle};

trait Target: Send + Sync {
    fn read(&self, off: u64, buf: &mut [u8]) -> anyhow::Result<()>;
    fn write(&self, off: u64, buf: &[u8]) -> anyhow::Result<()>;
    fn flush(&self) -> anyhow::Result<()>;
}

struct Raw(File);

impl Target for Raw {
    fn read(&self, off: u64, buf: &mut [u8]) -> anyhow::Result<()> {
        Ok(self.0.read_exact_at(buf, off)?)
    }
    fn write(&self, off: u64, buf: &[u8]) -> anyhow::Result<()> {
        Ok(self.0.write_all_at(buf, off)?)
    }
    fn flush(&self) -> anyhow::Result<()> {
        Ok(self.0.sync_data()?)
    }
}

impl Target for Volume {
    fn read(&self, off: u64, buf: &mut [u8]) -> anyhow::Result<()> {
        Ok(self.read_at(off, buf)?)
    }
    fn write(&self, off: u64, buf: &[u8]) -> anyhow::Result<()> {
        Ok(self.write_at(off, buf)?)
    }
    fn flush(&self) -> anyhow::Result<()> {
        Ok(Volume::flush(self)?)
    }
}

const THREADS: u64 = 2;

#[derive(Clone, Copy)]
enum Job {
    SeqRead,
    RandRead,
    SeqWrite,
    RandWrite,
}

/// Run `job` for `secs` on `t`; returns MB/s for sequential jobs, IOPS for random ones.
fn timed(t: &Arc<dyn Target>, size: u64, job: Job, secs: u64) -> anyhow::Result<f64> {
    let (bs, seq, write) = match job {
        Job::SeqRead => (1 << 20, true, false),
        Job::RandRead => (4096, false, false),
        Job::SeqWrite => (1 << 20, true, true),
        Job::RandWrite => (4096, false, true),
    };
    let ops = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let handles: Vec<_> = (0..THREADS)
        .map(|i| {
            let t = t.clone();
            let ops = ops.clone();
            std::thread::spawn(move || -> anyhow::Result<()> {
                let mut buf = vec![0xa5u8 ^ i as u8; bs as usize];
                let mut rng = Rng(0xbe7c4 + i);
                let span = size / THREADS;
                let base = i * span;
                let mut pos = 0u64;
                let mut n = 0u64;
                while !n.is_multiple_of(64) || Instant::now() < deadline {
                    let off = if seq {
                        let o = base + pos;
                        pos = (pos + bs) % (span - span % bs);
                        o
                    } else {
                        rng.below(size / bs) * bs
                    };
                    if write {
                        t.write(off, &buf)?;
                    } else {
                        t.read(off, &mut buf)?;
                    }
                    n += 1;
                }
                ops.fetch_add(n, Ordering::Relaxed);
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
    }
    if write {
        t.flush()?;
    }
    let el = start.elapsed().as_secs_f64();
    let n = ops.load(Ordering::Relaxed) as f64;
    Ok(if seq {
        n * bs as f64 / el / 1e6
    } else {
        n / el
    })
}

fn fill(t: &dyn Target, size: u64, byte: u8) -> anyhow::Result<()> {
    let buf = vec![byte; 1 << 20];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(1 << 20);
        t.write(off, &buf[..n as usize])?;
        off += n;
    }
    t.flush()
}

/// For each job, each target in turn (interleaved, so load from other
/// processes on the shared machine hits all targets alike), `rounds` times;
/// the best figure of each. Returns `[target][seq-read, rand-read, seq-write, rand-write]`.
fn measure_all(
    targets: &[(&str, Arc<dyn Target>)],
    size: u64,
    secs: u64,
    rounds: usize,
) -> anyhow::Result<Vec<[f64; 4]>> {
    let mut out = vec![[0f64; 4]; targets.len()];
    let run = |job: Job, idx: usize, out: &mut Vec<[f64; 4]>| -> anyhow::Result<()> {
        for round in 0..rounds {
            for (i, (label, t)) in targets.iter().enumerate() {
                eprintln!("pool: round {round}: {label}: job {idx}");
                settle()?;
                let v = timed(t, size, job, secs)?;
                out[i][idx] = out[i][idx].max(v);
            }
        }
        Ok(())
    };
    run(Job::SeqRead, 0, &mut out)?;
    run(Job::RandRead, 1, &mut out)?;
    // One untimed overwrite pass: copy-on-write after the snapshots and in
    // the clone happens here, the timed writes below are steady state.
    for (label, t) in targets {
        eprintln!("pool: {label}: overwrite pass");
        fill(t.as_ref(), size, 0x3c)?;
    }
    run(Job::SeqWrite, 2, &mut out)?;
    run(Job::RandWrite, 3, &mut out)?;
    Ok(out)
}

fn parse_size(s: &str) -> anyhow::Result<u64> {
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    Ok(num.parse::<u64>()? * mult)
}

/// Medians of `n` snapshot creations of `vol` and of `n` single durable
/// writes on a raw file of the same file system, interleaved (one of each
/// in turn, so load from other processes hits both alike): `(snapshot ms,
/// raw ms)`. The raw figure is a 4 KiB overwrite in an allocated file plus
/// one fdatasync, the least a durable metadata commit can cost on this
/// device: the floor of a durable snapshot.
fn snapshot_ms(pool: &Pool, vol: &str, n: usize, sync: &File) -> anyhow::Result<(f64, f64)> {
    let mut times = Vec::new();
    let mut raw = Vec::new();
    let block = [0x5au8; 4096];
    for i in 0..n {
        let t = Instant::now();
        pool.snapshot(vol, &format!("{vol}-t{i}"))?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        sync.write_all_at(&block, (i as u64 % 256) * 4096)?;
        sync.sync_data()?;
        raw.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok((median(&mut times), median(&mut raw)))
}

/// A 1 MiB file, written and synced, for [`snapshot_ms`]'s fdatasyncs.
fn sync_file(dir: &std::path::Path) -> anyhow::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.join("fsync.img"))?;
    f.write_all_at(&vec![1u8; 1 << 20], 0)?;
    f.sync_all()?;
    Ok(f)
}

pub fn run(opts: &Options) -> anyhow::Result<Report> {
    let size = parse_size(&opts.size)?;
    let secs = u64::from(opts.runtime_s.max(1));
    // `--rounds N`: each job on each target N times, the best kept (more
    // rounds tame the noise of a shared machine).
    let rounds = crate::suites::rounds("pool", opts, 2)? as usize;
    let dir = scratch_dir("pool")?;

    let raw_path = dir.path().join("raw.img");
    let raw = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&raw_path)?;
    raw.set_len(size)?;
    let raw: Arc<dyn Target> = Arc::new(Raw(raw));
    fill(raw.as_ref(), size, 0x11)?;

    let pool = Pool::create(dir.path().join("pool"), PoolOptions::default())?;
    let live = pool.create_volume("live", size)?;
    fill(&live, size, 0x11)?;

    let many = pool.create_volume("snaps", size)?;
    fill(&many, size, 0x22)?;
    eprintln!("pool: taking 1000 snapshots");
    let mut rng = Rng(7);
    let chunk = pool.chunk_size();
    for i in 0..1000 {
        // Each snapshot differs from the previous one by a few chunks.
        for _ in 0..4 {
            many.write_at(rng.below(size / chunk) * chunk, &[i as u8; 4096])?;
        }
        pool.snapshot("snaps", &format!("snaps-{i}"))?;
    }
    // The clone shares every chunk of the newest of those snapshots.
    let clone = pool.clone_snapshot("snaps-999", "clone")?;
    let targets: Vec<(&str, Arc<dyn Target>)> = vec![
        ("raw-file", raw),
        ("live volume", Arc::new(live)),
        ("1000 snapshots", Arc::new(many)),
        ("clone", Arc::new(clone)),
    ];
    let r = measure_all(&targets, size, secs, rounds)?;
    let (raw_r, live_r, snaps_r, clone_r) = (r[0], r[1], r[2], r[3]);

    eprintln!("pool: snapshot creation");
    let sync = sync_file(dir.path())?;
    let snap_1g = {
        let v = pool.create_volume("one-gib", 1 << 30)?;
        fill(&v, 1 << 30, 0x44)?;
        snapshot_ms(&pool, "one-gib", 21, &sync)?
    };
    let snap_1t = {
        let v = pool.create_volume("one-tib", 1 << 40)?;
        for i in 0..64u64 {
            v.write_at(i * (1 << 34), &[1u8; 65536])?;
        }
        v.flush()?;
        snapshot_ms(&pool, "one-tib", 21, &sync)?
    };
    eprintln!(
        "pool: snapshot create {:.3} ms (1 GiB), {:.3} ms (1 TiB); one raw 4 KiB write + fdatasync on the same file system {:.3} / {:.3} ms (interleaved medians)",
        snap_1g.0, snap_1t.0, snap_1g.1, snap_1t.1
    );

    let mut report = Report::new("pool");
    let names = [
        ("seq-read-1M", "MB/s"),
        ("rand-read-4k", "IOPS"),
        ("seq-write-1M", "MB/s"),
        ("rand-write-4k", "IOPS"),
    ];
    for (i, (metric, unit)) in names.iter().enumerate() {
        report.push(
            Measurement::new(format!("live {metric}"), *unit, live_r[i]).peer("raw-file", raw_r[i]),
        );
    }
    for (i, (metric, unit)) in names.iter().enumerate() {
        report.push(
            Measurement::new(format!("1000-snapshots {metric}"), *unit, snaps_r[i])
                .peer("raw-file", raw_r[i])
                .peer("live-volume", live_r[i]),
        );
    }
    for (i, (metric, unit)) in names.iter().enumerate() {
        report.push(
            Measurement::new(format!("clone {metric}"), *unit, clone_r[i])
                .peer("raw-file", raw_r[i])
                .peer("live-volume", live_r[i]),
        );
    }
    report.push(
        Measurement::new("snapshot-create 1GiB (median of 21)", "ms", snap_1g.0)
            .peer("raw-fdatasync", snap_1g.1)
            .lower_is_better(),
    );
    report.push(
        Measurement::new(
            "snapshot-create 1TiB sparse (median of 21)",
            "ms",
            snap_1t.0,
        )
        .peer("raw-fdatasync", snap_1t.1)
        .lower_is_better(),
    );
    Ok(report)
}
