//! `crash`: the pool's crash test in long mode. A child process runs a
//! random pool workload with flushes and is SIGKILLed at a random moment;
//! the pool is reopened, every write that returned must be there (three
//! trials in four: the process died, the page cache lived) or every write
//! acknowledged by a flush (one in four: taken as a machine crash, the
//! stage logs dropped), and `verify` must be clean. `--trials N` (default
//! 1000).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferry_pool::crashtest::{Crash, trial};
use ferry_pool::workload::Rng;

use crate::report::{Measurement, Report, scratch_dir};
use crate::suites::Options;

/// Build the child binary with the same profile and target directory.
fn child_exe() -> anyhow::Result<PathBuf> {
    crate::suites::build_release("ferry-pool", "ferry-pool-crashchild")
}

pub fn run(opts: &Options) -> anyhow::Result<Report> {
    let exe = child_exe()?;
    let scratch = scratch_dir("crash")?;
    let mut rng = Rng(0xc4a5_0001 ^ std::process::id() as u64);
    let (mut lost, mut verify_errors, mut problems, mut flushed, mut ops) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let started = Instant::now();
    for t in 0..opts.trials {
        let seed = rng.next_u64();
        let kill_after = Duration::from_micros(rng.below(60_000));
        let dir = scratch.path().join(format!("t{t}"));
        let crash = if t % 4 == 3 {
            Crash::Machine
        } else {
            Crash::Process
        };
        let r = trial(&exe, &dir, seed, 5000, kill_after, crash)?;
        if r.lost > 0 || !r.problems.is_empty() || !r.verify_errors.is_empty() {
            eprintln!("crash: trial {t} seed {seed} kill after {kill_after:?}: {r:?}");
        }
        lost += r.lost;
        verify_errors += r.verify_errors.len() as u64;
        problems += r.problems.len() as u64;
        flushed += u64::from(r.last_flush.is_some());
        ops += r.ops_started as u64;
        std::fs::remove_dir_all(&dir)?;
        if (t + 1) % 100 == 0 {
            eprintln!(
                "crash: {} trials, {lost} lost, {verify_errors} verify errors",
                t + 1
            );
        }
    }
    let mut report = Report::new("crash");
    report.push(Measurement::new("trials", "count", opts.trials as f64));
    report.push(Measurement::new(
        "trials-with-acknowledged-flush",
        "count",
        flushed as f64,
    ));
    report.push(Measurement::new("ops-before-kill", "count", ops as f64));
    report.push(Measurement::new(
        "machine-crash-trials",
        "count",
        (opts.trials / 4) as f64,
    ));
    report.push(
        Measurement::new("lost-acknowledged-writes", "sectors", lost as f64).lower_is_better(),
    );
    report.push(Measurement::new("verify-errors", "count", verify_errors as f64).lower_is_better());
    report.push(Measurement::new("other-problems", "count", problems as f64).lower_is_better());
    report.push(
        Measurement::new("wall-time", "s", started.elapsed().as_secs_f64()).lower_is_better(),
    );
    Ok(report)
}
