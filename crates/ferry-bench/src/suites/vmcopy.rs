//! `progress` and `copy`: VM copy between two hosts (issue 8).
//!
//! Two release `ferryd` on this machine (NBD over TCP on 127.0.0.1), the
//! second registered as a peer of the first.
//!
//! `progress`: a stopped VM with three disks of `--size` each (default
//! 1G) — GPT with 3 partitions (one nearly empty, one full of random
//! data, one a quarter full), MBR with a primary and an extended partition
//! holding 2 logical ones (one full, one nearly empty), and an unpartitioned
//! disk half full — is copied while the operation is sampled every 50 ms.
//! For each sample: the reported overall figure, and from the same
//! sample's tree what a naive average over the disks (each disk counts
//! alike) and a size-only weighting (disks by nominal size) would have
//! shown. Reported: the largest gap between each series and the fraction of
//! elapsed time (of the time from the request to the finish the operation
//! recorded); the suite fails if Ferry's series ever decreases.
//!
//! `copy`: time to copy a sparse disk (GPT, ~10 % data) and a dense disk
//! (all random) of `--size` to the peer, against `qemu-img convert -n`
//! between the same two NBD exports (the source volume's, the target's
//! fresh volume). Ferry's time includes its verify pass and its flushes;
//! qemu-img's does not verify, and by default (destination cache mode
//! `unsafe`) never flushes: peer `qemu-img-convert-t-writeback` is the
//! same with `-t writeback`, which flushes at the end. Peer
//! `qemu-img-convert-direct-export` writes into a target export made with
//! `direct` (its large writes bypass the page cache); Ferry's copy writes
//! into ordinary exports. Peer `target-disk-floor` is no copy: the
//! time the target's disk takes to write the image's allocated bytes with
//! `O_DIRECT` and one fdatasync ([`disk_floor`]), the least any copy that
//! makes them durable there can take. `--rounds N` (default 5): each copy
//! N times (to a new VM, to new target volumes for qemu-img), the five
//! taking turns going first; medians compared. Also the CPU time of each
//! copy (metric `*-copy-cpu`): both ferryd's (from `/proc`, clock-tick
//! resolution) plus, for qemu-img's copies, qemu-img's own. Both hosts
//! share this machine's cores, so Ferry's CPU time over the cores is a
//! floor of its copy's time here (on two real hosts each does its half).

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::report::{Measurement, Report, results_dir, scratch_dir};
use crate::suites::daemon::{Daemon, ferryd_exe};
use crate::suites::{Options, median, settle};

const MIB: u64 = 1 << 20;

fn parse_size(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let (n, mult) = match s.chars().last() {
        Some('G' | 'g') => (&s[..s.len() - 1], 1u64 << 30),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        _ => (s, 1),
    };
    Ok(n.parse::<u64>().context("size")? * mult)
}

/// Pseudo-random bytes (xorshift), never all zero.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn fill(path: &Path, at: u64, len: u64, seed: u64) -> anyhow::Result<()> {
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    let mut off = 0;
    while off < len {
        let n = (len - off).min(16 * MIB);
        f.write_all_at(&noise(seed + off, n as usize), at + off)?;
        off += n;
    }
    Ok(())
}

fn sfdisk(path: &Path, size: u64, script: &str) -> anyhow::Result<()> {
    std::fs::File::create(path)?.set_len(size)?;
    let mut child = Command::new("sfdisk")
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .context("sfdisk (util-linux)")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(script.replace('@', &path.to_string_lossy()).as_bytes())?;
    if !child.wait()?.success() {
        bail!("sfdisk failed on {}", path.display());
    }
    Ok(())
}

/// GPT: p1 1/8 nearly empty, p2 1/4 full, p3 the rest a quarter full.
fn gpt_image(path: &Path, size: u64) -> anyhow::Result<()> {
    let s = size / 512;
    sfdisk(
        path,
        size,
        &format!(
            "label: gpt\nstart=2048, size={}, name=empty\nsize={}, name=full\nname=quarter\n",
            s / 8,
            s / 4
        ),
    )?;
    let p2 = MIB + size / 8;
    let p3 = p2 + size / 4;
    fill(path, MIB, 64 << 10, 1)?;
    fill(path, p2, size / 4, 2)?;
    fill(path, p3, (size - p3 - MIB) / 4, 3)?;
    Ok(())
}

/// MBR: p1 1/8 half full; extended 3/4 with l5 (1/4, full) and l6 (the
/// rest of the extended, nearly empty).
fn mbr_image(path: &Path, size: u64) -> anyhow::Result<()> {
    let s = size / 512;
    sfdisk(
        path,
        size,
        &format!(
            "label: dos\n@1: start=2048, size={}, type=83\n@2: size={}, type=5\n@5: size={}, type=83\n@6: type=83\n",
            s / 8,
            s * 3 / 4,
            s / 4
        ),
    )?;
    fill(path, MIB, size / 16, 4)?;
    // l5 starts 1 MiB into the extended partition (sfdisk's alignment).
    let l5 = MIB + size / 8 + MIB;
    fill(path, l5, size / 4, 5)?;
    fill(path, l5 + size / 4 + 2 * MIB, 64 << 10, 6)?;
    Ok(())
}

struct Pair {
    _dir: tempfile::TempDir,
    src: Daemon,
    dst: Daemon,
    /// The target's data directory (its pool's filesystem).
    dst_dir: PathBuf,
    scratch: PathBuf,
}

async fn pair(suite: &str) -> anyhow::Result<Pair> {
    let exe = ferryd_exe()?;
    let dir = scratch_dir(suite)?;
    let src = Daemon::start_named(
        &exe,
        &dir.path().join("src"),
        "source",
        &["--nbd-listen", "127.0.0.1:0"],
    )?;
    let dst_dir = dir.path().join("dst");
    let dst = Daemon::start_named(&exe, &dst_dir, "target", &["--nbd-listen", "127.0.0.1:0"])?;
    let t = dst.get("/v1/host/peer-token").await?;
    src.post(
        "/v1/peers",
        json!({ "url": dst.url, "token": t["token"], "name": "target" }),
    )
    .await?;
    let scratch = dir.path().to_path_buf();
    Ok(Pair {
        _dir: dir,
        src,
        dst,
        dst_dir,
        scratch,
    })
}

/// Defines a (never started) VM: its kernel must be a file on the host,
/// the test kit's guest kernel.
async fn define(d: &Daemon, name: &str, volumes: &[&str]) -> anyhow::Result<()> {
    let kernel = ferry_testkit::GuestImage::get().await?.kernel();
    d.post(
        "/v1/vms",
        json!({
            "name": name,
            "disks": volumes,
            "boot": { "kind": "kernel", "kernel": kernel, "cmdline": "" },
            "accel": "tcg",
        }),
    )
    .await?;
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Prints an operation's log lines that `keep` selects, each with its
/// time since the first line (where the steps' time goes).
fn print_log(op: &Value, tag: &str, keep: impl Fn(&str) -> bool) {
    let lines = op["log"].as_array().map(Vec::as_slice).unwrap_or_default();
    let t0 = lines.first().and_then(|l| l["ts_ms"].as_u64()).unwrap_or(0);
    for l in lines {
        let m = l["msg"].as_str().unwrap_or("");
        if keep(m) {
            let t = l["ts_ms"].as_u64().unwrap_or(t0).saturating_sub(t0);
            eprintln!("  {tag} +{:.3}s {m}", t as f64 / 1e3);
        }
    }
}

pub fn progress(opts: &Options) -> anyhow::Result<Report> {
    runtime()?.block_on(progress_async(opts))
}

/// One sample: seconds since the request, Ferry's figure, naive average
/// over disks, size-only weighting.
type Sample = (f64, f64, f64, f64);

fn alternatives(op: &Value, sizes: &[(String, u64)]) -> Option<(f64, f64)> {
    let nodes = op["progress"]["nodes"].as_array()?;
    let data = nodes.iter().find(|n| n["name"] == "copy data")?;
    let disks: Vec<&Value> = data["children"]
        .as_array()?
        .iter()
        .filter_map(|c| nodes.get(c.as_u64()? as usize))
        .filter(|n| n["name"].as_str().is_some_and(|s| s.starts_with("disk ")))
        .collect();
    if disks.is_empty() {
        return Some((0.0, 0.0));
    }
    let fr: Vec<f64> = disks
        .iter()
        .map(|d| d["fraction"].as_f64().unwrap_or(0.0))
        .collect();
    let naive = fr.iter().sum::<f64>() / fr.len() as f64;
    let mut num = 0.0;
    let mut den = 0.0;
    for (d, f) in disks.iter().zip(&fr) {
        let name = d["name"].as_str().unwrap_or("");
        let size = sizes
            .iter()
            .find(|(dev, _)| name.starts_with(&format!("disk {dev}")))
            .map_or(1, |(_, s)| *s) as f64;
        num += size * f;
        den += size;
    }
    Some((naive, num / den))
}

async fn progress_async(opts: &Options) -> anyhow::Result<Report> {
    let size = parse_size(&opts.size)?;
    let p = pair("progress").await?;
    let gpt = p.scratch.join("gpt.raw");
    gpt_image(&gpt, size)?;
    p.src.import("vm-gpt", &gpt).await?;
    let mbr = p.scratch.join("mbr.raw");
    mbr_image(&mbr, size)?;
    p.src.import("vm-mbr", &mbr).await?;
    let raw = p.scratch.join("raw.raw");
    std::fs::File::create(&raw)?.set_len(size)?;
    fill(&raw, 0, size / 2, 7)?;
    p.src.import("vm-raw", &raw).await?;
    define(&p.src, "vm", &["vm-gpt", "vm-mbr", "vm-raw"]).await?;
    let sizes = vec![
        ("vda".to_string(), size),
        ("vdb".to_string(), size),
        ("vdc".to_string(), size),
    ];

    settle()?;
    let t0 = Instant::now();
    let t0_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let s = p
        .src
        .post(
            "/v1/vms/vm/copy",
            json!({ "to": "target", "name": "vm-copy" }),
        )
        .await?;
    let id = s["operation"].as_str().context("operation id")?.to_string();
    let mut samples: Vec<Sample> = Vec::new();
    let op = loop {
        let op = p.src.get(&format!("/v1/operations/{id}")).await?;
        let t = t0.elapsed().as_secs_f64();
        let overall = op["progress"]["overall"].as_f64().unwrap_or(0.0);
        let (naive, by_size) = alternatives(&op, &sizes).unwrap_or((0.0, 0.0));
        samples.push((t, overall, naive, by_size));
        let state = op["state"].as_str().unwrap_or("");
        if ["succeeded", "failed", "cancelled"].contains(&state) {
            break op;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    if op["state"] != "succeeded" {
        bail!("the copy {}: {}", op["state"], op["error"]);
    }
    // The copy's duration: from the request to the operation's finish as
    // the daemon recorded it (same clock), not to the sample that saw it
    // finished, up to a poll interval later. A sample after the finish is
    // at 100 % of the time.
    let finished = op["log"]
        .as_array()
        .and_then(|l| l.iter().rev().find(|l| l["msg"] == "succeeded"))
        .and_then(|l| l["ts_ms"].as_u64());
    let total = match finished {
        Some(f) => f.saturating_sub(t0_ms) as f64 / 1e3,
        None => t0.elapsed().as_secs_f64(),
    };
    for w in samples.windows(2) {
        if w[1].1 < w[0].1 {
            bail!(
                "progress went back from {:.4} to {:.4} at {:.2}s",
                w[0].1,
                w[1].1,
                w[1].0
            );
        }
    }
    let gap = |pick: fn(&Sample) -> f64| {
        samples
            .iter()
            .map(|s| (pick(s) - (s.0 / total).min(1.0)).abs() * 100.0)
            .fold(0.0, f64::max)
    };
    let (g_ferry, g_naive, g_size) = (gap(|s| s.1), gap(|s| s.2), gap(|s| s.3));
    print_log(&op, "", |_| true);
    std::fs::create_dir_all(results_dir())?;
    let series = results_dir().join("progress-series.json");
    std::fs::write(
        &series,
        serde_json::to_vec_pretty(&json!({
            "total_s": total,
            "samples": samples.iter().map(|s| json!({"t": s.0, "ferry": s.1, "naive": s.2, "size_only": s.3})).collect::<Vec<_>>(),
        }))?,
    )?;
    eprintln!(
        "{} samples over {total:.1}s; series in {}",
        samples.len(),
        series.display()
    );
    let mut r = Report::new("progress");
    r.push(
        Measurement::new("max-gap-vs-elapsed", "points", g_ferry)
            .peer("naive-avg-over-disks", g_naive)
            .peer("size-only", g_size)
            .lower_is_better(),
    );
    r.push(Measurement::new("copy-time", "s", total).lower_is_better());
    r.push(Measurement::new("samples", "count", samples.len() as f64));
    let _ = p.dst.get("/v1/host").await?;
    Ok(r)
}

/// Write size of [`disk_floor`] and the alignment `O_DIRECT` needs.
const FLOOR_PIECE: usize = 4 << 20;
const FLOOR_ALIGN: usize = 4096;

/// What [`disk_floor`] writes: 16 distinct pseudo-random pieces, the
/// buffer with room to start them on an `O_DIRECT` boundary.
fn floor_data() -> Vec<u8> {
    noise(0xf100, 16 * FLOOR_PIECE + FLOOR_ALIGN)
}

/// The target disk's floor for a copy of `bytes`: the time to write that
/// many bytes (`buf`, from [`floor_data`], prepared beforehand) with
/// `O_DIRECT` in 4 MiB writes into a new file in `dir` (the target's data
/// directory, on the filesystem of its pool), then one fdatasync. No copy
/// that makes the bytes durable on that disk can be faster, whatever its
/// transport.
fn disk_floor(dir: &Path, bytes: u64, buf: &[u8]) -> anyhow::Result<f64> {
    use std::os::unix::fs::OpenOptionsExt;
    let skew = buf.as_ptr().align_offset(FLOOR_ALIGN);
    let pieces: Vec<&[u8]> = buf[skew..].chunks_exact(FLOOR_PIECE).collect();
    let path = dir.join("disk-floor.bin");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .with_context(|| format!("create {}", path.display()))?;
    let total = bytes.next_multiple_of(FLOOR_ALIGN as u64);
    let t0 = Instant::now();
    let mut off = 0u64;
    for piece in pieces.iter().cycle() {
        if off >= total {
            break;
        }
        let n = (total - off).min(FLOOR_PIECE as u64) as usize;
        f.write_all_at(&piece[..n], off)
            .with_context(|| format!("write {}", path.display()))?;
        off += n as u64;
    }
    f.sync_data()?;
    let t = t0.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(t)
}

/// CPU seconds (user + system) of the children this process waited for.
fn children_cpu() -> f64 {
    // SAFETY: an all-zero rusage is a valid value for getrusage to fill.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(u.ru_utime) + secs(u.ru_stime)
}

pub fn copy(opts: &Options) -> anyhow::Result<Report> {
    runtime()?.block_on(copy_async(opts))
}

/// `nbd://host:port/name/secret` → the URI qemu-img takes.
fn qemu_uri(tcp: &str) -> String {
    // qemu's nbd:// URI takes the export name as the path; '/' inside it is
    // literal.
    tcp.to_string()
}

async fn export(d: &Daemon, volume: &str, direct: bool) -> anyhow::Result<String> {
    let e = d
        .post(
            "/v1/exports",
            json!({ "volume": volume, "name": format!("bench-{volume}"), "direct": direct }),
        )
        .await?;
    Ok(qemu_uri(e["tcp_uri"].as_str().context("no TCP NBD")?))
}

async fn copy_async(opts: &Options) -> anyhow::Result<Report> {
    let size = parse_size(&opts.size)?;
    let rounds = crate::suites::rounds("copy", opts, 5)?;
    let p = pair("copy").await?;
    let floor_buf = floor_data();
    let mut r = Report::new("copy");
    for kind in ["sparse", "dense"] {
        let raw = p.scratch.join(format!("{kind}.raw"));
        if kind == "sparse" {
            sfdisk(
                &raw,
                size,
                "label: gpt\nstart=2048, size=65536, name=a\nname=b\n",
            )?;
            fill(&raw, MIB, 16 * MIB, 11)?;
            fill(&raw, size / 2, size / 16, 12)?;
        } else {
            std::fs::File::create(&raw)?.set_len(size)?;
            fill(&raw, 0, size, 13)?;
        }
        // The bytes any copy must write: the image's allocated blocks.
        let data_bytes = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&raw)?) * 512;
        let vol = format!("{kind}-disk");
        p.src.import(&vol, &raw).await?;
        define(&p.src, kind, &[&vol]).await?;
        let from = export(&p.src, &vol, false).await?;
        // [Ferry, qemu-img convert, qemu-img convert -t writeback,
        // qemu-img convert into a direct export, the target disk's floor].
        let mut times: [Vec<f64>; 5] = Default::default();
        // CPU seconds of each copy: both ferryd, and qemu-img's own.
        let mut cpu: [Vec<f64>; 4] = Default::default();
        let daemons_cpu = || -> anyhow::Result<f64> { Ok(p.src.cpu_secs()? + p.dst.cpu_secs()?) };
        for round in 0..rounds {
            // Take turns going first: a device whose writes slow down
            // after a burst must not favour one side.
            for k in 0..5 {
                let who = (k + round as usize) % 5;
                if who == 4 {
                    settle()?;
                    times[4].push(disk_floor(&p.dst_dir, data_bytes, &floor_buf)?);
                    continue;
                }
                if who == 0 {
                    // Ferry: the whole operation, transfer and verify.
                    settle()?;
                    let c0 = daemons_cpu()?;
                    let t0 = Instant::now();
                    let s = p
                        .src
                        .post(
                            &format!("/v1/vms/{kind}/copy"),
                            json!({ "to": "target", "name": format!("{kind}-ferry-{round}") }),
                        )
                        .await?;
                    let id = s["operation"].as_str().context("operation id")?;
                    let op = p.src.wait_op(id).await?;
                    times[0].push(t0.elapsed().as_secs_f64());
                    cpu[0].push(daemons_cpu()? - c0);
                    if op["state"] != "succeeded" {
                        bail!("copy of {kind}: {} ({})", op["state"], op["error"]);
                    }
                    // The last round's log: the first pays for first use
                    // (buffers, connections' warm-up) that later ones do not.
                    if round + 1 == rounds {
                        print_log(&op, kind, |m| {
                            m.starts_with("sent ")
                                || m.starts_with("expected")
                                || m.starts_with("step ")
                                || m.contains(", transfer ")
                        });
                    }
                    continue;
                }
                // qemu-img convert between the same kind of exports: the
                // source volume's, and a fresh volume on the target. Its
                // default cache mode for the destination is `unsafe`: it
                // never flushes, so the copy is not durable when it exits;
                // `-t writeback` flushes at the end, as Ferry's copy does.
                // The fourth writes into a direct export (its large writes
                // bypass the page cache).
                let dst_vol = format!("{kind}-qemu-{round}-{who}");
                p.dst
                    .post("/v1/volumes", json!({ "name": dst_vol, "size": size }))
                    .await?;
                let to = export(&p.dst, &dst_vol, who == 3).await?;
                let mut args = vec!["convert", "-n", "-f", "raw", "-O", "raw", "-W", "-m", "8"];
                if who == 2 {
                    args.extend(["-t", "writeback"]);
                }
                settle()?;
                let c0 = daemons_cpu()? + children_cpu();
                let t0 = Instant::now();
                let st = Command::new("qemu-img")
                    .args(&args)
                    .arg(&from)
                    .arg(&to)
                    .status()
                    .context("qemu-img")?;
                if !st.success() {
                    bail!("qemu-img convert failed: {st}");
                }
                times[who].push(t0.elapsed().as_secs_f64());
                cpu[who].push(daemons_cpu()? + children_cpu() - c0);
            }
            let r = round as usize;
            eprintln!(
                "{kind} round {round}: ferry {:.3}s (with verify), qemu-img convert {:.3}s, with -t writeback {:.3}s, into a direct export {:.3}s; disk floor {:.3}s",
                times[0][r], times[1][r], times[2][r], times[3][r], times[4][r]
            );
        }
        let [ferry, qemu, durable, direct, floor] = times.map(|mut t| median(&mut t));
        eprintln!(
            "{kind}: median of {rounds}: ferry {ferry:.3}s (with verify), qemu-img convert {qemu:.3}s, with -t writeback {durable:.3}s, into a direct export {direct:.3}s"
        );
        eprintln!(
            "{kind}: the target disk writes the {:.1} MB durably in {floor:.3}s (median): no copy that makes them durable there can lead qemu-img convert by more than {:.2}x, or its -t writeback by more than {:.2}x, even with no fixed cost",
            data_bytes as f64 / 1e6,
            qemu / floor,
            durable / floor,
        );
        let [c_ferry, c_qemu, c_durable, c_direct] = cpu.map(|mut c| median(&mut c));
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        eprintln!(
            "{kind}: CPU per copy (median; both ferryd, plus qemu-img's own): ferry {c_ferry:.3}s, qemu-img convert {c_qemu:.3}s, with -t writeback {c_durable:.3}s, into a direct export {c_direct:.3}s; with both hosts on {cores} cores, Ferry's copy cannot take less than {:.3}s, nor lead qemu-img convert by more than {:.2}x",
            c_ferry / cores as f64,
            qemu / (c_ferry / cores as f64).max(1e-9)
        );
        r.push(
            Measurement::new(format!("{kind}-copy-cpu"), "s", c_ferry)
                .peer("qemu-img-convert", c_qemu)
                .peer("qemu-img-convert-t-writeback", c_durable)
                .peer("qemu-img-convert-direct-export", c_direct)
                .lower_is_better(),
        );
        r.push(
            Measurement::new(format!("{kind}-copy-time"), "s", ferry)
                .peer("qemu-img-convert", qemu)
                .peer("qemu-img-convert-t-writeback", durable)
                .peer("qemu-img-convert-direct-export", direct)
                .peer("target-disk-floor", floor)
                .lower_is_better(),
        );
    }
    Ok(r)
}
