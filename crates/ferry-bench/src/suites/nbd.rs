//! `nbd`: the same 1 GiB of random data served by Ferry as deployed (a
//! release `ferryd`: a pool volume imported from the data, exported over
//! its unix socket and over TCP with the export's secret), by Ferry's NBD
//! server on the raw file in this process (`ferry-file`: the server without
//! the pool), by `nbdkit file` and by `qemu-nbd -f raw -t -e 4`, over a
//! unix socket and over TCP; fio's nbd engine, numjobs=1, iodepth=16.
//! `ferry-bench nbd [--rounds N]`.

use std::io::Write;
use std::net::TcpListener as StdTcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ferry_nbd::{ExportOptions, FileExport, Server};

use crate::fio::{self, FioJob};
use crate::report::{Measurement, Report, scratch_dir};
use crate::suites::Options;
use crate::suites::daemon::{Daemon, ferryd_exe};

const JOBS: [(&str, &str, &str, &str); 4] = [
    ("rand-read-4k", "randread", "4k", "IOPS"),
    ("rand-write-4k", "randwrite", "4k", "IOPS"),
    ("seq-read-1M", "read", "1M", "MB/s"),
    ("seq-write-1M", "write", "1M", "MB/s"),
];

#[derive(Clone, Copy, PartialEq)]
enum Transport {
    Unix,
    Tcp,
}

/// A running server and how to reach it.
struct Served {
    uri: String,
    child: Option<Child>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(StdTcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn uri(t: Transport, sock: &Path, port: u16) -> String {
    match t {
        Transport::Unix => format!("nbd+unix:///?socket={}", sock.display()),
        Transport::Tcp => format!("nbd://127.0.0.1:{port}/"),
    }
}

/// Waits until `nbdinfo` can open the export.
fn wait_ready(uri: &str, child: &mut Option<Child>) -> anyhow::Result<()> {
    let t0 = Instant::now();
    loop {
        let ok = Command::new("nbdinfo")
            .args(["--size", uri])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return Ok(());
        }
        if let Some(c) = child
            && let Some(st) = c.try_wait()?
        {
            bail!("server for {uri} exited: {st}");
        }
        if t0.elapsed() > Duration::from_secs(20) {
            bail!("server for {uri} did not come up");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The pool volume's export on the release ferryd: (unix URI, TCP URI).
struct Deployed {
    unix: String,
    tcp: String,
}

/// Starts a release ferryd on `dir`, imports `file` into volume `bench`
/// and exports it.
fn deploy(file: &Path, dir: &Path) -> anyhow::Result<(Daemon, Deployed)> {
    let exe = ferryd_exe()?;
    let d = Daemon::start_with(&exe, &dir.join("ferryd"), &["--nbd-listen", "127.0.0.1:0"])?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let e = rt.block_on(async {
        use reqwest::Method;
        let started = d
            .call(
                Method::POST,
                "/v1/volumes/bench/import",
                serde_json::json!({ "path": file }),
            )
            .await?;
        let id = started["operation"].as_str().context("no operation id")?;
        let op = d.wait_op(id).await?;
        if op["state"] != "succeeded" {
            bail!("import into the pool failed: {op}");
        }
        d.call(
            Method::POST,
            "/v1/exports",
            serde_json::json!({ "volume": "bench" }),
        )
        .await
    })?;
    let unix = e["unix_uri"].as_str().context("no unix_uri")?.to_string();
    let tcp = e["tcp_uri"].as_str().context("no tcp_uri")?.to_string();
    Ok((d, Deployed { unix, tcp }))
}

fn serve(
    peer: &str,
    t: Transport,
    file: &Path,
    dir: &Path,
    deployed: &Deployed,
) -> anyhow::Result<Served> {
    let sock = dir.join(format!("{peer}.sock"));
    let _ = std::fs::remove_file(&sock);
    let port = free_port()?;
    let u = uri(t, &sock, port);
    let mut served = Served {
        uri: u,
        child: None,
        runtime: None,
    };
    match peer {
        "ferry" => {
            served.uri = match t {
                Transport::Unix => deployed.unix.clone(),
                Transport::Tcp => deployed.tcp.clone(),
            };
        }
        "ferry-file" => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let server = Server::new();
            server.add_export(
                "",
                Arc::new(FileExport::open(file, false)?),
                ExportOptions::default(),
            )?;
            match t {
                Transport::Unix => {
                    let l = {
                        let _g = rt.enter();
                        tokio::net::UnixListener::bind(&sock)?
                    };
                    rt.spawn(async move { server.serve_unix(l).await });
                }
                Transport::Tcp => {
                    let l = rt.block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))?;
                    rt.spawn(async move { server.serve_tcp(l).await });
                }
            }
            served.runtime = Some(rt);
        }
        "nbdkit" => {
            let mut c = Command::new("nbdkit");
            c.args(["-f", "--exit-with-parent"]);
            match t {
                Transport::Unix => c.arg("-U").arg(&sock),
                Transport::Tcp => c.args(["-i", "127.0.0.1", "-p", &port.to_string()]),
            };
            c.arg("file").arg(format!("file={}", file.display()));
            served.child = Some(c.stderr(Stdio::null()).spawn().context("starting nbdkit")?);
        }
        "qemu-nbd" => {
            let mut c = Command::new("qemu-nbd");
            c.args(["-f", "raw", "-t", "-e", "4"]);
            match t {
                Transport::Unix => c.arg("-k").arg(&sock),
                Transport::Tcp => c.args(["-b", "127.0.0.1", "-p", &port.to_string()]),
            };
            c.arg(file);
            served.child = Some(
                c.stderr(Stdio::null())
                    .spawn()
                    .context("starting qemu-nbd")?,
            );
        }
        _ => bail!("unknown peer {peer}"),
    }
    wait_ready(&served.uri, &mut served.child)?;
    Ok(served)
}

/// 1 GiB (or `--size`) of random data, written once.
fn make_data(path: &Path, size: &str) -> anyhow::Result<u64> {
    let bytes = parse_size(size)?;
    let mut f = std::io::BufWriter::with_capacity(4 << 20, std::fs::File::create(path)?);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..bytes / block.len() as u64 {
        for w in block.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&block)?;
    }
    f.flush()?;
    f.get_ref().sync_all()?;
    Ok(bytes)
}

fn parse_size(s: &str) -> anyhow::Result<u64> {
    let (n, mul) = match s.chars().last() {
        Some('G' | 'g') => (&s[..s.len() - 1], 1u64 << 30),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        _ => (s, 1),
    };
    Ok(n.parse::<u64>().with_context(|| format!("size {s}"))? * mul)
}

/// The system's load averages, as `/proc/loadavg` gives them.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

const PEERS: [&str; 4] = ["ferry", "ferry-file", "nbdkit", "qemu-nbd"];

/// All three servers run at once on the same file; every job runs on each
/// of them in turn, `--rounds` times with the order rotated, and the best
/// figure of each server counts. So load from other processes on a shared
/// machine hits all three alike instead of whichever ran during a burst.
pub fn run(opts: &Options) -> anyhow::Result<Report> {
    let rounds = crate::suites::rounds("nbd", opts, 2)?;
    let dir = scratch_dir("nbd")?;
    let file: PathBuf = dir.path().join("data.img");
    eprintln!("nbd: writing {} of random data", opts.size);
    make_data(&file, &opts.size)?;
    eprintln!("nbd: importing it into a pool volume of a release ferryd");
    let (_daemon, deployed) = deploy(&file, dir.path())?;
    let load_before = load_average();
    let mut report = Report::new("nbd");
    for (t, tname) in [(Transport::Unix, "unix"), (Transport::Tcp, "tcp")] {
        let served: Vec<Served> = PEERS
            .iter()
            .map(|p| serve(p, t, &file, dir.path(), &deployed))
            .collect::<anyhow::Result<_>>()?;
        for (metric, rw, bs, unit) in JOBS {
            let mut best = [0.0f64; PEERS.len()];
            for round in 0..rounds as usize {
                for k in 0..PEERS.len() {
                    let i = (k + round) % PEERS.len();
                    let job = FioJob {
                        runtime_s: opts.runtime_s,
                        size: opts.size.clone(),
                        ioengine: "nbd".into(),
                        direct: false,
                        ..FioJob::new(metric, rw, bs)
                    }
                    .arg(format!("--uri={}", served[i].uri));
                    let r = fio::run(&job).with_context(|| format!("{} over {tname}", PEERS[i]))?;
                    let v = if unit == "IOPS" { r.iops } else { r.mb_per_s() };
                    eprintln!(
                        "nbd: round {} {tname} {metric} {:<8} {v:>10.0} {unit} (load {})",
                        round + 1,
                        PEERS[i],
                        load_average()
                    );
                    best[i] = best[i].max(v);
                }
            }
            let mut m = Measurement::new(format!("{tname} {metric}"), unit, best[0]);
            for (p, v) in PEERS.iter().zip(best).skip(1) {
                m = m.peer(*p, v);
            }
            report.push(m);
        }
        drop(served);
    }
    println!(
        "nbd: best of {rounds} interleaved rounds of {} s per job; load average before {load_before}, after {}",
        opts.runtime_s,
        load_average()
    );
    Ok(report)
}
