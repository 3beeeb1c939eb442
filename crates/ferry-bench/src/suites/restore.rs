//! `restore`: instant restore (issue 12) against a release `ferryd`.
//!
//! For each disk size (1, 4 and 16 GiB by default; `--sizes 1,4`): a
//! test-kit guest (TCG) on a fresh ext4 disk of that size writing records
//! boots from a local pool volume, is backed up (the backup holds its boot
//! profile), then stopped. The disk is large but holds little data (ext4
//! with one file of `--data-mib` random MiB, default 768 — more than the
//! prefetch moves while the guest boots, so that the order matters — plus the records
//! file): what is measured is how restore time depends on disk *size*. Then, each time from the request to the
//! guest's first acknowledged record (its workload runs: it booted and
//! its disk answers):
//! - `local`: booting the original VM from its local pool volume again;
//! - `instant`: an instant restore with profile prefetch;
//! - `instant-noprofile`: the same without the profile (stall baseline);
//! - `full`: a full restore (`backup.restore`) followed by a boot.
//!
//! The guest boots as a real VM does (`--boot firmware`, the default):
//! SeaBIOS and syslinux load its kernel and initramfs from a boot
//! partition at the end of the disk (see [`make_boot_disk`]), so the boot
//! reads ~19 MB the relocation order reaches last; `--boot kernel` boots
//! the kernel from a host file instead (the disk then only holds the data
//! and the records, and boot reads little of it).
//!
//! Stalls are the instant restore's on-demand fetches until the guest
//! agent answered (the operation's `boot_stalls`). Goals: instant boot
//! ≤ 1.5× local boot and flat in disk size; ≥ 5× fewer stalls with the
//! profile than without.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ferry_testkit::console::Console;
use ferry_testkit::{Disk, GuestConfig, GuestImage, NbdServer, Workload};
use serde_json::{Value, json};

use crate::report::{Measurement, Report};
use crate::suites::Options;
use crate::suites::daemon::{Daemon, ferryd_exe};

const GIB: u64 = 1 << 30;

fn sizes(rest: &[String]) -> Vec<u64> {
    rest.iter()
        .position(|a| a == "--sizes")
        .and_then(|i| rest.get(i + 1))
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 4, 16])
}

pub fn run(opts: &Options) -> anyhow::Result<Report> {
    let sizes = sizes(&opts.rest);
    let exe = ferryd_exe()?;
    // QEMU's socket paths must stay under 107 bytes: a short directory.
    let scratch = tempfile::Builder::new().prefix("frest").tempdir()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let fill: u64 = opts
        .rest
        .iter()
        .position(|a| a == "--data-mib")
        .and_then(|i| opts.rest.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(768);
    let firmware = match opts
        .rest
        .iter()
        .position(|a| a == "--boot")
        .and_then(|i| opts.rest.get(i + 1))
        .map(String::as_str)
    {
        None | Some("firmware") => true,
        Some("kernel") => false,
        Some(x) => bail!("--boot {x}: firmware or kernel"),
    };
    rt.block_on(bench(&exe, scratch.path(), &sizes, fill, firmware))
}

/// Seconds since `t0` until the console at `log` shows a record.
async fn first_record(log: &Path, t0: Instant) -> anyhow::Result<f64> {
    let mut c = Console::new(log);
    loop {
        c.poll()?;
        if c.events().iter().any(|e| e.name == "record") {
            return Ok(t0.elapsed().as_secs_f64());
        }
        if let Some(f) = c.fatal() {
            bail!("guest failed: {f}\n{}", c.tail(20));
        }
        if t0.elapsed() > Duration::from_secs(1200) {
            bail!("no record within 20 minutes: {}", c.tail(20));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until VM `name` runs and returns its serial log path.
async fn serial_of(d: &Daemon, name: &str, t0: Instant) -> anyhow::Result<String> {
    loop {
        if let Ok(v) = d.get(&format!("/v1/vms/{name}")).await
            && v["state"] == "running"
        {
            return Ok(v["serial_log"].as_str().unwrap_or("").to_string());
        }
        if t0.elapsed() > Duration::from_secs(600) {
            bail!("VM {name} never ran");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn stop(d: &Daemon, name: &str) -> anyhow::Result<()> {
    d.post(&format!("/v1/vms/{name}/kill"), json!({})).await?;
    Ok(())
}

struct InstantRun {
    boot_s: f64,
    stalls: f64,
    prefetched: f64,
    relocation_mb_s: f64,
    total_s: f64,
}

async fn instant_restore(
    d: &Daemon,
    backup: &str,
    name: &str,
    profile: bool,
) -> anyhow::Result<InstantRun> {
    let t0 = Instant::now();
    let s = d
        .post(
            &format!("/v1/repos/r/backups/{backup}/restore"),
            json!({ "name": name, "instant": true, "prefetch_profile": profile }),
        )
        .await?;
    let log = serial_of(d, name, t0).await?;
    let boot_s = first_record(Path::new(&log), t0).await?;
    let op = d
        .wait_ok(s["operation"].as_str().context("operation")?)
        .await?;
    let total_s = t0.elapsed().as_secs_f64();
    let report: Value = op["log"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|l| l["msg"].as_str().and_then(|m| m.strip_prefix("report: ")))
        .and_then(|r| serde_json::from_str(r).ok())
        .unwrap_or(Value::Null);
    eprintln!("restore: {name}: {report}");
    stop(d, name).await?;
    Ok(InstantRun {
        boot_s,
        stalls: report["boot_stalls"].as_f64().unwrap_or(f64::NAN),
        prefetched: report["prefetched_chunks"].as_f64().unwrap_or(f64::NAN),
        relocation_mb_s: report["relocation_mb_per_s"].as_f64().unwrap_or(f64::NAN),
        total_s,
    })
}

/// Runs a program, failing with what it said.
fn run_tool(prog: &str, args: &[&str], stdin: Option<&str>) -> anyhow::Result<()> {
    use std::io::Write;
    let mut cmd = std::process::Command::new(prog);
    cmd.args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("{prog} (scripts/install-deps.sh installs it)"))?;
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(input.as_bytes())?;
    }
    drop(child.stdin.take());
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{prog} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Where a program is (sbin directories are not always on PATH).
fn tool(name: &str) -> String {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| format!("{d}/{name}"))
        .find(|p| Path::new(p).exists())
        .unwrap_or_else(|| name.to_string())
}

/// The boot partition's size at the end of a firmware-boot disk.
const BOOT_PART: u64 = 64 << 20;

/// A sparse raw disk of `size` bytes that firmware boots like a real VM's:
/// an MBR (syslinux's boot code) with partition 1 an ext4 filesystem
/// holding the files of `fill` (the guest mounts it, `/dev/vda1`) and
/// partition 2, active, at the *end* of the disk, a FAT filesystem with
/// syslinux, the guest kernel and initramfs. SeaBIOS and syslinux read the
/// kernel and initramfs (~19 MB) from the disk, so booting is dominated by
/// disk reads, and those reads are the last thing the relocation order
/// (ascending data) reaches: only the boot profile brings them early.
fn make_boot_disk(
    path: &Path,
    size: u64,
    fill: &Path,
    image: &GuestImage,
    cmdline: &str,
) -> anyhow::Result<()> {
    const MIB: u64 = 1 << 20;
    let f = std::fs::File::create(path)?;
    f.set_len(size)?;
    drop(f);
    let p = path.to_str().context("disk path")?;
    let part1 = size - MIB - BOOT_PART;
    let boot_off = MIB + part1;
    run_tool(
        &tool("sfdisk"),
        &["-q", p],
        Some(&format!(
            "label: dos\nstart=2048, size={}, type=83\nstart={}, size={}, type=6, bootable\n",
            part1 / 512,
            boot_off / 512,
            BOOT_PART / 512
        )),
    )?;
    let fill = fill.to_str().context("fill path")?;
    run_tool(
        &tool("mkfs.ext4"),
        &[
            "-F",
            "-q",
            "-E",
            &format!("offset={MIB}"),
            "-d",
            fill,
            p,
            &format!("{}k", part1 / 1024),
        ],
        None,
    )?;
    // The boot partition is built in a file of its own, then copied in:
    // syslinux's --offset fails beyond 4 GiB ("invalid media signature").
    let part = path.with_extension("boot.img");
    std::fs::File::create(&part)?.set_len(BOOT_PART)?;
    let pp = part.to_str().context("boot partition path")?;
    run_tool(
        &tool("mkfs.fat"),
        &["-F", "16", pp, &(BOOT_PART / 1024).to_string()],
        None,
    )?;
    run_tool(&tool("syslinux"), &["--install", pp], None)?;
    let cfg = path.with_extension("syslinux.cfg");
    std::fs::write(
        &cfg,
        format!(
            "SERIAL 0 115200\nDEFAULT linux\nLABEL linux\n  KERNEL /vmlinuz\n  APPEND initrd=/initrd {cmdline}\n"
        ),
    )?;
    for (from, to) in [
        (image.kernel(), "::/vmlinuz"),
        (image.initramfs(), "::/initrd"),
        (cfg.clone(), "::/syslinux.cfg"),
    ] {
        run_tool(
            &tool("mcopy"),
            &["-i", pp, from.to_str().context("path")?, to],
            None,
        )?;
    }
    std::fs::remove_file(&cfg)?;
    let bytes = std::fs::read(&part)?;
    std::fs::remove_file(&part)?;
    use std::os::unix::fs::FileExt;
    let disk = std::fs::OpenOptions::new().write(true).open(path)?;
    disk.write_all_at(&bytes, boot_off)?;
    // syslinux's MBR boot code (the first 440 bytes; the partition table
    // after it stays).
    let mbr = std::fs::read("/usr/lib/syslinux/mbr/mbr.bin")
        .context("/usr/lib/syslinux/mbr/mbr.bin (package syslinux-common)")?;
    disk.write_all_at(&mbr[..mbr.len().min(440)], 0)?;
    Ok(())
}

/// A sparse raw disk of `size` bytes with an ext4 filesystem holding the
/// files of `fill` (`mkfs.ext4 -d`).
fn make_disk(path: &Path, size: u64, fill: &Path) -> anyhow::Result<()> {
    let f = std::fs::File::create(path)?;
    f.set_len(size)?;
    drop(f);
    run_tool(
        &tool("mkfs.ext4"),
        &[
            "-F",
            "-q",
            "-d",
            fill.to_str().context("fill path")?,
            path.to_str().context("disk path")?,
        ],
        None,
    )
}

async fn bench(
    exe: &Path,
    scratch: &Path,
    sizes: &[u64],
    fill_mib: u64,
    firmware: bool,
) -> anyhow::Result<Report> {
    let d = Daemon::start(exe, &scratch.join("data"))?;
    let image = GuestImage::get().await?;
    d.post(
        "/v1/repos",
        json!({ "location": scratch.join("repo"), "name": "r", "create": true }),
    )
    .await?;
    // The same data in every disk (the repository deduplicates it).
    let fill_dir = scratch.join("fill");
    std::fs::create_dir_all(&fill_dir)?;
    {
        use std::io::{Read, Write};
        let mut r = std::fs::File::open("/dev/urandom")?;
        let mut f = std::fs::File::create(fill_dir.join("data.bin"))?;
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..fill_mib {
            r.read_exact(&mut buf)?;
            f.write_all(&buf)?;
        }
    }
    let mut report = Report::new("restore");
    report.push(Measurement::new("data-per-disk", "MiB", fill_mib as f64));
    for &gib in sizes {
        let (name, vol) = (format!("g{gib}"), format!("g{gib}-disk"));
        let raw = scratch.join(format!("{vol}.raw"));
        let mut cfg = GuestConfig::new(&name);
        cfg.workload = Workload::records(10.0);
        cfg.disks.push(Disk::Nbd {
            server: NbdServer::Unix("/unused".into()),
            export: vol.clone(),
        });
        let boot = if firmware {
            cfg.mount = Some("/dev/vda1".into());
            make_boot_disk(&raw, gib * GIB, &fill_dir, &image, &cfg.kernel_cmdline())?;
            json!({"kind": "firmware"})
        } else {
            make_disk(&raw, gib * GIB, &fill_dir)?;
            json!({"kind": "kernel", "kernel": image.kernel(), "initrd": image.initramfs(),
                   "cmdline": cfg.kernel_cmdline()})
        };
        d.import(&vol, &raw).await?;
        let _ = std::fs::remove_file(&raw);
        d.post(
            "/v1/vms",
            json!({
                "name": name, "vcpus": 1, "memory_mib": 256, "disks": [vol],
                "boot": boot, "guest_agent": true, "accel": "tcg",
            }),
        )
        .await?;
        // First boot: makes the records file; its profile is recorded.
        let t0 = Instant::now();
        let v = d.post(&format!("/v1/vms/{name}/start"), json!({})).await?;
        let log = v["serial_log"].as_str().unwrap_or("").to_string();
        first_record(Path::new(&log), t0).await?;
        tokio::time::sleep(Duration::from_secs(5)).await;
        stop(&d, &name).await?;
        // Local boot, measured (this boot's profile is what is backed up).
        // QEMU starts the serial log anew: the first boot's goes aside, or
        // the count of records would restart below it.
        let _ = std::fs::rename(&log, format!("{log}.first"));
        let t0 = Instant::now();
        d.post(&format!("/v1/vms/{name}/start"), json!({})).await?;
        let local = first_record(Path::new(&log), t0).await?;
        eprintln!("restore: {gib} GiB: local boot {local:.1} s");
        let s = d.post("/v1/repos/r/backups", json!({ "vm": name })).await?;
        let op = d
            .wait_ok(s["operation"].as_str().context("operation")?)
            .await?;
        let list = d.get("/v1/repos/r/backups").await?;
        let backup = list
            .as_array()
            .and_then(|l| l.iter().rfind(|b| b["config"]["operation"] == op["id"]))
            .and_then(|b| b["id"].as_str())
            .context("backup id")?
            .to_string();
        stop(&d, &name).await?;

        let with = instant_restore(&d, &backup, &format!("{name}-i"), true).await?;
        eprintln!("restore: {gib} GiB: instant boot {:.1} s", with.boot_s);
        let without = instant_restore(&d, &backup, &format!("{name}-n"), false).await?;
        eprintln!(
            "restore: {gib} GiB: stalls {} with the profile, {} without",
            with.stalls, without.stalls
        );

        // Full restore, then boot.
        let t0 = Instant::now();
        let full_name = format!("{name}-f");
        let s = d
            .post(
                &format!("/v1/repos/r/backups/{backup}/restore"),
                json!({ "name": full_name }),
            )
            .await?;
        d.wait_ok(s["operation"].as_str().context("operation")?)
            .await?;
        let v = d
            .post(&format!("/v1/vms/{full_name}/start"), json!({}))
            .await?;
        let full = first_record(Path::new(v["serial_log"].as_str().unwrap_or("")), t0).await?;
        stop(&d, &full_name).await?;
        eprintln!("restore: {gib} GiB: full restore + boot {full:.1} s");

        report.push(
            Measurement::new(format!("boot-{gib}GiB"), "s", with.boot_s)
                .peer("local-boot", local)
                .peer("full-restore+boot", full)
                .peer("instant-noprofile", without.boot_s)
                .lower_is_better(),
        );
        report.push(
            Measurement::new(format!("boot-stalls-{gib}GiB"), "fetches", with.stalls)
                .peer("no-profile", without.stalls)
                .lower_is_better(),
        );
        report.push(Measurement::new(
            format!("prefetched-chunks-{gib}GiB"),
            "chunks",
            with.prefetched,
        ));
        report.push(Measurement::new(
            format!("relocation-{gib}GiB"),
            "MB/s",
            with.relocation_mb_s,
        ));
        report.push(
            Measurement::new(format!("instant-restore-total-{gib}GiB"), "s", with.total_s)
                .lower_is_better(),
        );
        // Free the space before the next size.
        for v in [
            format!("{name}-i"),
            format!("{name}-n"),
            full_name.clone(),
            name.clone(),
        ] {
            let _ = d
                .call(
                    reqwest::Method::DELETE,
                    &format!("/v1/vms/{v}"),
                    Value::Null,
                )
                .await;
        }
        for v in [
            format!("{name}-i-vda"),
            format!("{name}-n-vda"),
            format!("{full_name}-vda"),
        ] {
            let _ = d
                .call(
                    reqwest::Method::DELETE,
                    &format!("/v1/volumes/{v}"),
                    Value::Null,
                )
                .await;
        }
    }
    Ok(report)
}
