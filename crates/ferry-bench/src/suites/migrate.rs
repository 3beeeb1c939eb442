//! `migrate`: live migration of a running VM between two hosts (issue 9),
//! `ondemand` against `precopy` (the way libvirt's `--copy-storage-all`
//! works: mirror the disks first, then memory).
//!
//! Two release `ferryd` on this machine (`host-a`, `host-b`, NBD over TCP
//! on 127.0.0.1), each a peer of the other. For each disk size (1 and
//! 4 GiB by default; `--big` adds 16 GiB, which needs ~40 GB free: the
//! disk exists on both hosts at some point, plus the import file), a VM
//! (TCG, 256 MiB, idle guest) whose one disk is filled with random data
//! (every chunk must move) migrates A→B `ondemand`, then back B→A
//! `precopy`. For each: the time from the request until the VM runs on
//! the destination (its QMP status polled every 10 ms), the downtime QEMU
//! reports, and the time until the operation ended (hydration and release
//! included). Then the VM is stopped and copied A→B by `vm.copy`, Ferry's
//! own NBD copy, whose transfer throughput is set against the on-demand
//! mode's hydration throughput (disk size / duration of the `hydration`
//! step).
//!
//! `--sizes 1G,2G` replaces the list of sizes.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ferry_testkit::console::Console;
use ferry_testkit::{Disk, GuestConfig, GuestImage, NbdServer, Workload};
use serde_json::{Value, json};

use crate::report::{Measurement, Report, scratch_dir};
use crate::suites::Options;
use crate::suites::daemon::{Daemon, ferryd_exe};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn parse_size(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let (n, mult) = match s.chars().last() {
        Some('G' | 'g') => (&s[..s.len() - 1], GIB),
        Some('M' | 'm') => (&s[..s.len() - 1], MIB),
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

fn random_image(path: &Path, size: u64, seed: u64) -> anyhow::Result<()> {
    let f = std::fs::File::create(path)?;
    f.set_len(size)?;
    let mut off = 0;
    while off < size {
        let n = (size - off).min(16 * MIB);
        f.write_all_at(&noise(seed.wrapping_mul(0x9e37) + off, n as usize), off)?;
        off += n;
    }
    f.sync_all()?;
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

pub fn run(opts: &Options) -> anyhow::Result<Report> {
    let mut sizes = vec![GIB, 4 * GIB];
    let mut it = opts.rest.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--big" => sizes.push(16 * GIB),
            "--sizes" => {
                let list = it.next().context("--sizes needs a value")?;
                sizes = list.split(',').map(parse_size).collect::<Result<_, _>>()?;
            }
            other => bail!("unknown argument {other} (--big, --sizes 1G,4G)"),
        }
    }
    runtime()?.block_on(bench(&sizes))
}

/// What one migration measured.
#[derive(Debug)]
struct Run {
    to_running: f64,
    downtime_ms: Option<f64>,
    total: f64,
    /// Seconds of the step that moved the data (`hydration` or `mirror`).
    data_step: Option<f64>,
}

fn step_seconds(op: &Value, name: &str) -> Option<f64> {
    let s = op["steps"].as_array()?.iter().find(|s| s["name"] == name)?;
    let (a, b) = (s["started_ms"].as_u64()?, s["finished_ms"].as_u64()?);
    Some(b.saturating_sub(a) as f64 / 1000.0)
}

fn logs(op: &Value) -> impl Iterator<Item = &str> {
    op["log"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["msg"].as_str())
}

/// The downtime QEMU reported, from the `switchover` log line.
fn downtime(op: &Value) -> Option<f64> {
    logs(op).find_map(|m| {
        let rest = m.split("downtime ").nth(1)?;
        rest.split(' ').next()?.parse::<f64>().ok()
    })
}

async fn migrate(
    from: &Daemon,
    to: &Daemon,
    vm: &str,
    mode: &str,
    peer: &str,
) -> anyhow::Result<Run> {
    let t0 = Instant::now();
    let s = from
        .post(
            &format!("/v1/vms/{vm}/migrate"),
            json!({ "to": peer, "mode": mode }),
        )
        .await?;
    let id = s["operation"].as_str().context("operation id")?.to_string();
    // Running on the destination: its QEMU says so.
    let to_running = loop {
        if let Ok(v) = to.get(&format!("/v1/vms/{vm}")).await
            && v["qmp_status"] == "running"
        {
            break t0.elapsed().as_secs_f64();
        }
        let op = from.get(&format!("/v1/operations/{id}")).await?;
        if ["failed", "cancelled"].contains(&op["state"].as_str().unwrap_or("")) {
            bail!("{mode} migration of {vm} {}: {}", op["state"], op["error"]);
        }
        if t0.elapsed() > Duration::from_secs(3600) {
            bail!("{vm} does not run on {peer} after an hour");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let op = from.wait_ok(&id).await?;
    let total = t0.elapsed().as_secs_f64();
    for m in logs(&op) {
        eprintln!("    {m}");
    }
    let step = if mode == "precopy" {
        "mirror"
    } else {
        "hydration"
    };
    Ok(Run {
        to_running,
        downtime_ms: downtime(&op),
        total,
        data_step: step_seconds(&op, step),
    })
}

async fn define_and_start(d: &Daemon, vm: &str, volume: &str) -> anyhow::Result<PathBuf> {
    let image = GuestImage::get().await?;
    let mut cfg = GuestConfig::new(vm);
    cfg.workload = Workload::Idle;
    cfg.disks.push(Disk::Nbd {
        server: NbdServer::Unix("/unused".into()),
        export: volume.into(),
    });
    d.post(
        "/v1/vms",
        json!({
            "name": vm, "vcpus": 1, "memory_mib": 256, "disks": [volume],
            "boot": {"kind": "kernel", "kernel": image.kernel(), "initrd": image.initramfs(),
                     "cmdline": cfg.kernel_cmdline()},
            "guest_agent": true, "accel": "tcg",
        }),
    )
    .await?;
    let v = d.post(&format!("/v1/vms/{vm}/start"), json!({})).await?;
    let log = PathBuf::from(v["serial_log"].as_str().context("serial log")?);
    let mut c = Console::new(&log);
    let t = Instant::now();
    loop {
        c.poll()?;
        if c.find(0, &mut |e| e.name == "ready").is_some() {
            return Ok(log);
        }
        if let Some(f) = c.fatal() {
            bail!("guest {vm} failed: {f}");
        }
        if t.elapsed() > Duration::from_secs(600) {
            bail!("guest {vm} not ready after 10 minutes: {}", c.tail(20));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `vm.copy` of the stopped VM `vm` to `peer`: the transfer throughput
/// (bytes/s) it logs.
async fn nbd_copy(from: &Daemon, to: &Daemon, vm: &str, peer: &str) -> anyhow::Result<f64> {
    from.post(&format!("/v1/vms/{vm}/stop?timeout_s=60"), json!({}))
        .await?;
    let copy = format!("{vm}-copy");
    let s = from
        .post(
            &format!("/v1/vms/{vm}/copy"),
            json!({ "to": peer, "name": copy }),
        )
        .await?;
    let op = from
        .wait_ok(s["operation"].as_str().context("operation id")?)
        .await?;
    let rate = logs(&op)
        .filter(|m| m.starts_with("sent "))
        .find_map(|m| {
            let rest = m.split("transfer ").nth(1)?;
            rest.split(' ').next()?.parse::<f64>().ok()
        })
        .context("vm.copy logged no transfer rate")?;
    // Free the space for the next size.
    let v = to.get(&format!("/v1/vms/{copy}")).await?;
    to.call(
        reqwest::Method::DELETE,
        &format!("/v1/vms/{copy}"),
        Value::Null,
    )
    .await?;
    for d in v["disks"].as_array().into_iter().flatten() {
        if let Some(vol) = d["volume"].as_str() {
            to.call(
                reqwest::Method::DELETE,
                &format!("/v1/volumes/{vol}"),
                Value::Null,
            )
            .await?;
        }
    }
    Ok(rate * 1e6)
}

async fn register(a: &Daemon, b: &Daemon, name: &str) -> anyhow::Result<()> {
    let t = b.get("/v1/host/peer-token").await?;
    a.post(
        "/v1/peers",
        json!({ "url": b.url, "token": t["token"], "name": name }),
    )
    .await?;
    Ok(())
}

async fn bench(sizes: &[u64]) -> anyhow::Result<Report> {
    let exe = ferryd_exe()?;
    let dir = scratch_dir("migrate")?;
    let nbd = ["--nbd-listen", "127.0.0.1:0"];
    let a = Daemon::start_named(&exe, &dir.path().join("a"), "host-a", &nbd)?;
    let b = Daemon::start_named(&exe, &dir.path().join("b"), "host-b", &nbd)?;
    register(&a, &b, "host-b").await?;
    register(&b, &a, "host-a").await?;
    let mut r = Report::new("migrate");
    for (i, &size) in sizes.iter().enumerate() {
        let gib = size as f64 / GIB as f64;
        let tag = if size % GIB == 0 {
            format!("{}g", size / GIB)
        } else {
            format!("{}m", size / MIB)
        };
        let (vm, vol) = (format!("vm-{tag}"), format!("disk-{tag}"));
        eprintln!("migrate: {gib} GiB disk of random data");
        let raw = dir.path().join(format!("{vol}.raw"));
        random_image(&raw, size, i as u64 + 1)?;
        a.import(&vol, &raw).await?;
        define_and_start(&a, &vm, &vol).await?;

        eprintln!("  ondemand A→B");
        let on = migrate(&a, &b, &vm, "ondemand", "host-b").await?;
        eprintln!("  {on:?}");
        eprintln!("  precopy B→A");
        let pre = migrate(&b, &a, &vm, "precopy", "host-a").await?;
        eprintln!("  {pre:?}");
        eprintln!("  vm.copy A→B (Ferry's NBD copy)");
        let copy = nbd_copy(&a, &b, &vm, "host-b").await?;

        r.push(
            Measurement::new(format!("{tag}-time-to-running"), "s", on.to_running)
                .peer("precopy", pre.to_running)
                .lower_is_better(),
        );
        if let (Some(d1), Some(d2)) = (on.downtime_ms, pre.downtime_ms) {
            r.push(
                Measurement::new(format!("{tag}-downtime"), "ms", d1)
                    .peer("precopy", d2)
                    .lower_is_better(),
            );
        }
        r.push(
            Measurement::new(format!("{tag}-total-time"), "s", on.total)
                .peer("precopy", pre.total)
                .lower_is_better(),
        );
        if let Some(h) = on.data_step {
            let hyd = size as f64 / h / 1e6;
            eprintln!(
                "  hydration {hyd:.1} MB/s vs vm.copy transfer {:.1} MB/s: {:.2}x",
                copy / 1e6,
                hyd / (copy / 1e6)
            );
            r.push(
                Measurement::new(format!("{tag}-hydration-throughput"), "MB/s", hyd)
                    .peer("nbd-copy", copy / 1e6),
            );
        }
        if let Some(m) = pre.data_step {
            r.push(Measurement::new(
                format!("{tag}-precopy-mirror-throughput"),
                "MB/s",
                size as f64 / m / 1e6,
            ));
        }
        // Free the space for the next size.
        a.call(
            reqwest::Method::DELETE,
            &format!("/v1/vms/{vm}"),
            Value::Null,
        )
        .await?;
        a.call(
            reqwest::Method::DELETE,
            &format!("/v1/volumes/{vol}"),
            Value::Null,
        )
        .await?;
    }
    Ok(r)
}
