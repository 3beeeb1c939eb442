//! One module per suite. Each issue with a performance goal adds its suite
//! here: a module and one line in [`SUITES`].

use crate::report::Report;

mod backup;
mod crash;
mod daemon;
mod disk;
mod faults;
mod migrate;
mod nbd;
mod pool;
mod restore;
mod snapshot;
mod vmcopy;

/// Writes every dirty page of the machine back (`sync`, untimed) before a
/// timed job, so that the job does not pay for the write-back of what came
/// before it (a fill, a set-up, another target's writes): the kernel's
/// throttling otherwise strikes whichever job runs next.
pub(crate) fn settle() -> anyhow::Result<()> {
    let st = std::process::Command::new("sync").status()?;
    anyhow::ensure!(st.success(), "sync failed: {st}");
    Ok(())
}

/// `cargo build --release -p <package> --bin <bin>` into the bench's
/// target directory; returns the binary's path.
///
/// The environment `cargo run` gave this program (`CARGO_PKG_NAME`,
/// `CARGO_MANIFEST_DIR`, ...) is not passed on: build scripts that watch
/// those variables (ring's does) would otherwise see them change between
/// this build and the next plain `cargo build`, and each would rebuild
/// them and everything above them (ferryd: about 2.5 minutes per suite).
pub(crate) fn build_release(package: &str, bin: &str) -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context;
    let mut cmd =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["build", "--release", "-p", package, "--bin", bin])
        .env("CARGO_TARGET_DIR", crate::report::target_dir());
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_MANIFEST_")
            || [
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
            ]
            .contains(&&*k)
        {
            cmd.env_remove(&*k);
        }
    }
    let status = cmd
        .status()
        .with_context(|| format!("run cargo build for {bin}"))?;
    anyhow::ensure!(status.success(), "cargo build of {bin} failed: {status}");
    Ok(crate::report::target_dir().join("release").join(bin))
}

/// Options every suite understands (each uses the ones that apply).
#[derive(Debug, Clone)]
pub struct Options {
    /// Seconds each timed job runs.
    pub runtime_s: u32,
    /// Size of the data set, in fio's notation (`1G`).
    pub size: String,
    /// Trials, for suites that repeat a fault.
    pub trials: u32,
    /// Arguments the common parser did not know, for the suite to read.
    pub rest: Vec<String>,
}

type SuiteFn = fn(&Options) -> anyhow::Result<Report>;

/// Every suite: its name, what it measures, and the function that runs it.
pub const SUITES: &[(&str, &str, SuiteFn)] = &[
    ("disk", "fio on a plain file: the physical limit", disk::run),
    (
        "nbd",
        "fio over NBD: Ferry vs nbdkit and qemu-nbd",
        nbd::run,
    ),
    (
        "pool",
        "pool volumes, snapshots, clones vs pread/pwrite on a raw file",
        pool::run,
    ),
    (
        "crash",
        "kill -9 a pool workload, reopen, check flushed data and verify",
        crash::run,
    ),
    (
        "backup",
        "full, 1% incremental and restore: Ferry's repository vs restic",
        backup::run,
    ),
    (
        "snapshot",
        "group snapshots of running VMs: guest pause, write stall, total time",
        snapshot::run,
    ),
    (
        "progress",
        "VM copy between two hosts: reported % vs elapsed time, vs naive weightings",
        vmcopy::progress,
    ),
    (
        "faults",
        "batch migration: phases × faults (kill -9 of ferryd/QEMU, lost coordinator), status then recover",
        faults::run,
    ),
    (
        "copy",
        "VM copy of a sparse and a dense disk vs qemu-img convert between the same NBD exports",
        vmcopy::copy,
    ),
    (
        "restore",
        "instant restore: time to boot vs local boot and full restore, stalls with/without profile",
        restore::run,
    ),
    (
        "migrate",
        "live migration ondemand vs precopy: time to running, downtime, hydration vs NBD copy",
        migrate::run,
    ),
];

/// `--rounds N` among a suite's own arguments (`default` without it, at
/// least 1); any other argument is an error naming the suite.
pub fn rounds(suite: &str, opts: &Options, default: u32) -> anyhow::Result<u32> {
    let mut it = opts.rest.iter();
    let mut rounds = default;
    while let Some(a) = it.next() {
        match a.as_str() {
            "--rounds" => {
                rounds = it
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("--rounds needs a value"))?
                    .parse()
                    .map_err(|e| anyhow::anyhow!("--rounds: {e}"))?;
            }
            _ => anyhow::bail!("{suite}: unknown argument {a}"),
        }
    }
    Ok(rounds.max(1))
}

/// The median of `v` (the upper of the middle two for an even count; NaN
/// when empty). Sorts `v`.
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
