//! `snapshot`: group snapshots of running VMs (issue 7), both modes.
//!
//! A release `ferryd` with N test-kit guests (QEMU, TCG; default 4,
//! `--guests N`) each writing fsync'ed records at `--rate` per second to
//! ext4 on a pool volume. For each mode, `--trials` group snapshots of all
//! guests (default 5). Per VM: the guest's I/O pause excluding its own
//! freeze and thaw (overlay switch or pool snapshot: `pause`), the window
//! from the freeze request to the thaw's answer (`frozen`), the agent's
//! freeze time (`freeze`); the longest gap between two acknowledged
//! records seen on the guests' consoles during the operation, less the
//! nominal interval (`write-stall`); and the operation's total time.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use ferry_testkit::console::Console;
use ferry_testkit::{Disk, GuestConfig, GuestImage, NbdServer, Workload, disk};
use serde_json::{Value, json};

use crate::report::{Measurement, Report};
use crate::suites::daemon::{Daemon, ferryd_exe};
use crate::suites::{Options, median};

fn arg<T: std::str::FromStr>(rest: &[String], name: &str, default: T) -> T {
    rest.iter()
        .position(|a| a == name)
        .and_then(|i| rest.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Follows the consoles and records when each new record was seen.
struct Watcher {
    seen: Arc<Mutex<Vec<Vec<Instant>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watcher {
    fn start(logs: Vec<PathBuf>) -> Watcher {
        let seen = Arc::new(Mutex::new(vec![Vec::new(); logs.len()]));
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, st2) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut consoles: Vec<Console> = logs.iter().map(|p| Console::new(p)).collect();
            let mut counts = vec![0usize; consoles.len()];
            while !st2.load(Ordering::Relaxed) {
                for (i, c) in consoles.iter_mut().enumerate() {
                    if c.poll().is_err() {
                        continue;
                    }
                    let n = c.events().iter().filter(|e| e.name == "record").count();
                    if n > counts[i] {
                        let now = Instant::now();
                        let mut s = s2.lock().unwrap_or_else(|p| p.into_inner());
                        for _ in counts[i]..n {
                            s[i].push(now);
                        }
                        counts[i] = n;
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        Watcher {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    /// Per guest: the longest gap between records seen in `[from, to]`
    /// (including the gap across `from`).
    fn longest_gap(&self, from: Instant, to: Instant) -> Vec<Duration> {
        let s = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        s.iter()
            .map(|times| {
                let mut best = Duration::ZERO;
                for w in times.windows(2) {
                    if w[1] >= from && w[0] <= to {
                        best = best.max(w[1] - w[0]);
                    }
                }
                best
            })
            .collect()
    }

    fn records(&self, i: usize) -> usize {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())[i].len()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

pub fn run(opts: &Options) -> anyhow::Result<Report> {
    let guests: usize = arg(&opts.rest, "--guests", 4);
    // `--trials` is parsed by the common options (default 1000, meant for
    // the crash suite): 5 snapshots per mode unless given.
    let trials = if opts.trials >= 1000 {
        5
    } else {
        opts.trials as usize
    };
    let rate: f64 = arg(&opts.rest, "--rate", 20.0);
    let exe = ferryd_exe()?;
    // QEMU's socket paths must stay under 107 bytes: a short directory.
    let scratch = tempfile::Builder::new().prefix("fsnap").tempdir()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(bench(&exe, scratch.path(), guests, trials, rate))
}

async fn bench(
    exe: &Path,
    scratch: &Path,
    guests: usize,
    trials: usize,
    rate: f64,
) -> anyhow::Result<Report> {
    use reqwest::Method;
    let d = Daemon::start(exe, &scratch.join("data"))?;
    let image = GuestImage::get().await?;
    let mut logs = Vec::new();
    let mut names = Vec::new();
    for i in 0..guests {
        let (name, vol) = (format!("g{i}"), format!("g{i}-data"));
        let raw = scratch.join(format!("{vol}.raw"));
        disk::make_ext4_disk(&raw, 64 << 20)?;
        let s = d
            .call(
                Method::POST,
                &format!("/v1/volumes/{vol}/import"),
                json!({ "path": raw }),
            )
            .await?;
        let op = d.wait_op(s["operation"].as_str().unwrap_or("")).await?;
        if op["state"] != "succeeded" {
            bail!("import of {vol}: {op}");
        }
        let _ = std::fs::remove_file(&raw);
        let mut cfg = GuestConfig::new(&name);
        cfg.workload = Workload::records(rate);
        cfg.disks.push(Disk::Nbd {
            server: NbdServer::Unix("/unused".into()),
            export: vol.clone(),
        });
        d.call(
            Method::POST,
            "/v1/vms",
            json!({
                "name": name, "vcpus": 1, "memory_mib": 256, "disks": [vol],
                "boot": {"kind": "kernel", "kernel": image.kernel(), "initrd": image.initramfs(),
                         "cmdline": cfg.kernel_cmdline()},
                "guest_agent": true, "accel": "tcg",
            }),
        )
        .await?;
        let v = d
            .call(Method::POST, &format!("/v1/vms/{name}/start"), json!({}))
            .await?;
        logs.push(PathBuf::from(v["serial_log"].as_str().unwrap_or("")));
        names.push(name);
    }
    let watcher = Watcher::start(logs);
    let boot = Instant::now();
    for i in 0..guests {
        while watcher.records(i) < 3 {
            if boot.elapsed() > Duration::from_secs(600) {
                bail!("guest g{i} wrote no records within 10 minutes");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    eprintln!(
        "snapshot: {guests} guests writing after {:?}",
        boot.elapsed()
    );
    let nominal = 1.0 / rate;
    let mut report = Report::new("snapshot");
    report.push(Measurement::new("guests", "count", guests as f64));
    report.push(Measurement::new("trials-per-mode", "count", trials as f64));
    for mode in ["direct", "overlay"] {
        let (mut pause, mut frozen, mut freeze, mut stall, mut total, mut storage) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        let mut not_quiesced = 0;
        for t in 0..trials {
            let name = format!("{mode}-{t}");
            tokio::time::sleep(Duration::from_millis(500)).await;
            let t0 = Instant::now();
            let s = d
                .call(
                    Method::POST,
                    "/v1/vm-snapshots",
                    json!({"vms": names, "name": name, "mode": mode}),
                )
                .await?;
            let op = d.wait_op(s["operation"].as_str().unwrap_or("")).await?;
            let t1 = Instant::now();
            if op["state"] != "succeeded" {
                bail!("{mode} snapshot {name}: {}", op["error"]);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            let g = d
                .call(
                    Method::GET,
                    &format!("/v1/vm-snapshots/{name}"),
                    Value::Null,
                )
                .await?;
            total.push((t1 - t0).as_secs_f64() * 1000.0);
            storage.push(g["storage_ms"].as_f64().unwrap_or(f64::NAN));
            for v in g["vms"].as_array().into_iter().flatten() {
                if v["consistency"] != "quiesced" {
                    not_quiesced += 1;
                }
                pause.extend(v["pause_ms"].as_f64());
                frozen.extend(v["frozen_ms"].as_f64());
                freeze.extend(v["freeze_ms"].as_f64());
            }
            for gap in watcher.longest_gap(t0, t1) {
                stall.push((gap.as_secs_f64() - nominal).max(0.0) * 1000.0);
            }
            eprintln!(
                "snapshot: {name}: total {:.0} ms, pause {:?} ms, frozen {:?} ms",
                total.last().copied().unwrap_or(0.0),
                g["vms"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|v| v["pause_ms"].as_f64().unwrap_or(f64::NAN).round())
                    .collect::<Vec<_>>(),
                g["vms"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|v| v["frozen_ms"].as_f64().unwrap_or(f64::NAN).round())
                    .collect::<Vec<_>>(),
            );
            d.call(
                Method::DELETE,
                &format!("/v1/vm-snapshots/{name}"),
                Value::Null,
            )
            .await?;
        }
        let goal = if mode == "direct" { 10.0 } else { 50.0 };
        report.push(
            Measurement::new(
                format!("{mode}-pause-median-excl-freeze-goal-{goal}ms"),
                "ms",
                median(&mut pause.clone()),
            )
            .lower_is_better(),
        );
        report.push(
            Measurement::new(format!("{mode}-pause-max-excl-freeze"), "ms", max(&pause))
                .lower_is_better(),
        );
        report.push(
            Measurement::new(
                format!("{mode}-freeze-to-thaw-median"),
                "ms",
                median(&mut frozen.clone()),
            )
            .peer("vmware-stun-published", 188.0)
            .lower_is_better(),
        );
        report.push(
            Measurement::new(format!("{mode}-freeze-to-thaw-max"), "ms", max(&frozen))
                .lower_is_better(),
        );
        report.push(
            Measurement::new(
                format!("{mode}-guest-agent-freeze-median"),
                "ms",
                median(&mut freeze),
            )
            .lower_is_better(),
        );
        report.push(
            Measurement::new(format!("{mode}-longest-write-stall-max"), "ms", max(&stall))
                .lower_is_better(),
        );
        report.push(
            Measurement::new(
                format!("{mode}-longest-write-stall-median"),
                "ms",
                median(&mut stall),
            )
            .lower_is_better(),
        );
        report.push(
            Measurement::new(
                format!("{mode}-pool-snapshot-median"),
                "ms",
                median(&mut storage),
            )
            .lower_is_better(),
        );
        report.push(
            Measurement::new(
                format!("{mode}-operation-total-median"),
                "ms",
                median(&mut total),
            )
            .lower_is_better(),
        );
        report.push(
            Measurement::new(
                format!("{mode}-vms-not-quiesced"),
                "count",
                not_quiesced as f64,
            )
            .lower_is_better(),
        );
    }
    drop(watcher);
    for n in &names {
        let _ = d
            .call(Method::POST, &format!("/v1/vms/{n}/kill"), json!({}))
            .await;
    }
    Ok(report)
}
