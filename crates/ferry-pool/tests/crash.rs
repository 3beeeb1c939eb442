//! Crash test: a child process runs a random workload with flushes and is
//! SIGKILLed at a random moment; after reopening, every op that returned is
//! present (the process died, not the machine), or — in one trial of four,
//! taken as a machine crash — everything acknowledged by a flush is; and
//! `verify` is clean. 200 trials.

use std::path::Path;
use std::time::Duration;

use ferry_pool::crashtest::{Crash, trial};
use ferry_pool::workload::Rng;

#[test]
fn kill9_loses_no_flushed_write() -> anyhow::Result<()> {
    let exe = Path::new(env!("CARGO_BIN_EXE_ferry-pool-crashchild"));
    let tmp = tempfile::tempdir()?;
    let mut rng = Rng(0x5eed_c0de ^ std::process::id() as u64);
    let trials = 200;
    let mut flushed_trials = 0;
    let mut finished = 0;
    let mut ops = 0;
    for t in 0..trials {
        let seed = rng.next_u64();
        let kill_after = Duration::from_micros(rng.below(40_000));
        let dir = tmp.path().join(format!("t{t}"));
        let crash = if t % 4 == 3 {
            Crash::Machine
        } else {
            Crash::Process
        };
        let r = trial(exe, &dir, seed, 3000, kill_after, crash)?;
        anyhow::ensure!(
            r.lost == 0 && r.problems.is_empty() && r.verify_errors.is_empty(),
            "trial {t} seed {seed} killed after {kill_after:?}: {r:?}"
        );
        finished += usize::from(r.finished);
        ops += r.ops_started;
        if r.last_flush.is_some() {
            flushed_trials += 1;
        }
        std::fs::remove_dir_all(&dir)?;
    }
    eprintln!(
        "{trials} trials: {flushed_trials} with a flush before the kill, {finished} finished, {ops} ops"
    );
    anyhow::ensure!(
        finished < trials / 4,
        "{finished} children finished before the kill"
    );
    // The kill must land mid-workload often enough to mean something.
    anyhow::ensure!(
        flushed_trials >= trials / 2,
        "only {flushed_trials} trials saw a flush before the kill"
    );
    Ok(())
}
