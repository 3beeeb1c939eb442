//! `backup`: full backup, 1 % incremental and full restore of a disk with
//! realistic content (text, binary, zero and never-written regions), Ferry's
//! repository against restic on the same data.
//!
//! Ferry reads the disk from a pool snapshot (as a VM backup does) into an
//! encrypted directory repository; restic (always encrypted) backs up the
//! same bytes as a raw image file into a local repository. The incremental
//! step writes 1 % of the disk as 64 KiB writes in 1 MiB clusters (guest
//! writes cluster), to both the volume and the image; Ferry reads only what
//! the pool's change tracking reports, restic rescans the changed file.
//! Restore: Ferry into a new pool volume (parallel fetch, direct writes,
//! flushed), restic `restore` into a directory (page cache not dropped for
//! either). Ferry's restore ends with its data durable; restic's does not
//! (it never fsyncs), so restic is timed up to the fsync of the restored
//! file as well, and the ratio against restic without that fsync is
//! reported too.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use ferry_backup::{BackupOptions, DiskInput, Key, Repository, SnapshotSource, VolumeTarget};
use ferry_pool::{Pool, PoolOptions};

use crate::report::{Measurement, Report, scratch_dir};
use crate::suites::Options;

const MIB: u64 = 1 << 20;

fn parse_size(s: &str) -> anyhow::Result<u64> {
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    Ok(num.parse::<u64>()? * mult)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

const WORDS: &[&str] = &[
    "the",
    "kernel",
    "page",
    "cache",
    "inode",
    "journal",
    "ferry",
    "volume",
    "config",
    "error",
    "warning",
    "info",
    "GET",
    "/api/v1/items",
    "200",
    "user",
    "session",
    "2026-11-23T08:00:00Z",
    "\n",
    "{\"id\":",
    "\"value\":",
    "}",
];

/// One 1 MiB region of the image: text 40 %, binary 30 %, zeroes 15 %,
/// never written 15 %. `None` = leave unwritten.
fn region(rng: &mut Rng, buf: &mut [u8]) -> bool {
    match rng.next() % 20 {
        0..8 => {
            let mut i = 0;
            while i < buf.len() {
                let w = WORDS[(rng.next() % WORDS.len() as u64) as usize].as_bytes();
                let n = w.len().min(buf.len() - i);
                buf[i..i + n].copy_from_slice(&w[..n]);
                i += n;
                if i < buf.len() {
                    buf[i] = b' ';
                    i += 1;
                }
            }
            true
        }
        8..14 => {
            rng.fill(buf);
            true
        }
        14..17 => {
            buf.fill(0);
            true
        }
        _ => false,
    }
}

fn restic(repo: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("restic")
        .arg("-r")
        .arg(repo)
        .args(["--no-cache", "-q"])
        .args(args)
        .env("RESTIC_PASSWORD", "ferry-bench")
        .output()
        .context("run restic (install it: scripts/install-deps.sh)")?;
    if !out.status.success() {
        bail!(
            "restic {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Fsync every file under `p` (what restic restored); returns the seconds
/// it took.
fn sync_files(p: &Path) -> anyhow::Result<f64> {
    fn walk(p: &Path, files: &mut Vec<std::path::PathBuf>) -> anyhow::Result<()> {
        for e in std::fs::read_dir(p)? {
            let e = e?;
            if e.file_type()?.is_dir() {
                walk(&e.path(), files)?;
            } else {
                files.push(e.path());
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(p, &mut files)?;
    let t = Instant::now();
    for f in files {
        std::fs::File::open(&f)
            .and_then(|h| h.sync_all())
            .with_context(|| format!("fsync {}", f.display()))?;
    }
    Ok(t.elapsed().as_secs_f64())
}

fn dir_size(p: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            total += if m.is_dir() {
                dir_size(&e.path())
            } else {
                m.len()
            };
        }
    }
    total
}

pub fn run(opts: &Options) -> anyhow::Result<Report> {
    let size = parse_size(&opts.size)? / MIB * MIB;
    if size < 16 * MIB {
        bail!("--size must be at least 16M");
    }
    let scratch = scratch_dir("backup")?;
    let dir = scratch.path();
    let pool = Pool::create(dir.join("pool"), PoolOptions::default())?;
    let vol = pool.create_volume("disk", size)?;
    let img_path = dir.join("disk.img");
    let img = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&img_path)?;
    img.set_len(size)?;
    eprintln!("backup: writing a {} MiB disk of mixed content", size / MIB);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut buf = vec![0u8; MIB as usize];
    for r in 0..size / MIB {
        if region(&mut rng, &mut buf) {
            vol.write_at(r * MIB, &buf)?;
            std::os::unix::fs::FileExt::write_all_at(&img, &buf, r * MIB)?;
        }
    }
    vol.flush()?;
    img.sync_all()?;
    pool.snapshot("disk", "s1")?;

    let key = Key::generate();
    let repo_dir = dir.join("ferry-repo");
    let repo = Repository::init(repo_dir.to_str().context("utf-8 path")?, Some(key))?;
    let restic_repo = dir.join("restic-repo");
    restic(&restic_repo, &["init"])?;
    let cfg = serde_json::json!({"name": "bench-vm"});

    // Full backup.
    eprintln!("backup: full backup (ferry)");
    let s1 = SnapshotSource::new(pool.open_snapshot("s1")?);
    let t = Instant::now();
    let m1 = repo.backup(
        &BackupOptions::new("bench-vm", cfg.clone()),
        &[DiskInput {
            name: "disk".into(),
            source: &s1,
            changed: None,
            read_profile: vec![],
        }],
        None,
    )?;
    let ferry_full = t.elapsed().as_secs_f64();
    let ferry_repo_full = dir_size(&repo_dir);
    eprintln!("backup: full backup (restic)");
    let t = Instant::now();
    restic(
        &restic_repo,
        &["backup", img_path.to_str().context("utf-8 path")?],
    )?;
    let restic_full = t.elapsed().as_secs_f64();
    let restic_repo_full = dir_size(&restic_repo);

    // 1 % incremental: 64 KiB writes in clusters of 16.
    let changed_target = size / 100;
    let mut written = 0;
    let mut w = vec![0u8; 65536];
    while written < changed_target {
        let base = rng.next() % (size / MIB) * MIB;
        for k in 0..16 {
            rng.fill(&mut w);
            vol.write_at(base + k * 65536, &w)?;
            std::os::unix::fs::FileExt::write_all_at(&img, &w, base + k * 65536)?;
        }
        written += MIB;
    }
    vol.flush()?;
    img.sync_all()?;
    pool.snapshot("disk", "s2")?;
    eprintln!("backup: 1 % incremental (ferry)");
    let s2 = SnapshotSource::new(pool.open_snapshot("s2")?);
    let t = Instant::now();
    let changed = pool.changed_between("disk", "s1", Some("s2"))?;
    let m2 = repo.backup(
        &BackupOptions::new("bench-vm", cfg).parent(m1.id.clone()),
        &[DiskInput {
            name: "disk".into(),
            source: &s2,
            changed: Some(changed),
            read_profile: vec![],
        }],
        None,
    )?;
    let ferry_incr = t.elapsed().as_secs_f64();
    eprintln!("backup: 1 % incremental (restic)");
    let t = Instant::now();
    restic(
        &restic_repo,
        &["backup", img_path.to_str().context("utf-8 path")?],
    )?;
    let restic_incr = t.elapsed().as_secs_f64();

    // Full restore of the incremental backup.
    eprintln!("backup: full restore (ferry)");
    let dst = pool.create_volume("restored", size)?;
    let t = Instant::now();
    repo.restore_disk(&m2.id, "disk", &VolumeTarget(dst.clone()), 8, false, None)?;
    let ferry_restore = t.elapsed().as_secs_f64();
    // Check it, outside the timing.
    let mut a = vec![0u8; MIB as usize];
    let mut b = vec![0u8; MIB as usize];
    for r in 0..size / MIB {
        dst.read_at(r * MIB, &mut a)?;
        std::os::unix::fs::FileExt::read_exact_at(&img, &mut b, r * MIB)?;
        if a != b {
            bail!("ferry restore differs from the image at MiB {r}");
        }
    }
    eprintln!("backup: full restore (restic)");
    let rdir = dir.join("restic-restore");
    let t = Instant::now();
    restic(
        &restic_repo,
        &[
            "restore",
            "latest",
            "--target",
            rdir.to_str().context("utf-8 path")?,
        ],
    )?;
    let restic_restore = t.elapsed().as_secs_f64();
    let restic_synced = restic_restore + sync_files(&rdir)?;

    let mbps = |secs: f64| size as f64 / MIB as f64 / secs;
    let mut rep = Report::new("backup");
    rep.push(
        Measurement::new(
            format!("full backup {} MiB", size / MIB),
            "MB/s",
            mbps(ferry_full),
        )
        .peer("restic", mbps(restic_full)),
    );
    rep.push(
        Measurement::new("1% incremental backup", "s", ferry_incr)
            .peer("restic", restic_incr)
            .lower_is_better(),
    );
    rep.push(
        Measurement::new(
            "incremental / full time",
            "%",
            100.0 * ferry_incr / ferry_full,
        )
        .peer("restic", 100.0 * restic_incr / restic_full)
        .lower_is_better(),
    );
    rep.push(
        Measurement::new("full restore (durable)", "MB/s", mbps(ferry_restore))
            .peer("restic", mbps(restic_synced)),
    );
    rep.push(
        Measurement::new("vs restic not fsynced", "MB/s", mbps(ferry_restore))
            .peer("restic", mbps(restic_restore)),
    );
    rep.push(
        Measurement::new(
            "repository size after full",
            "MiB",
            ferry_repo_full as f64 / MIB as f64,
        )
        .peer("restic", restic_repo_full as f64 / MIB as f64)
        .lower_is_better(),
    );
    rep.push(
        Measurement::new(
            "incremental bytes read",
            "MiB",
            m2.disks[0].read_bytes as f64 / MIB as f64,
        )
        .lower_is_better(),
    );
    Ok(rep)
}
