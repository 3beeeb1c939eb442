//! `faults`: the batch-migration fault-injection matrix (issue 10). Each
//! phase × fault cell runs `--trials N` trials (default 4: 6 phases × 5
//! faults × 4 = 120) of [`crate::faults::run_trial`]. `--phase P` and
//! `--fault F` (repeatable) restrict the matrix.
//!
//! `target/bench-results/faults.json` holds, per cell, the trials and the
//! counts of wrong statuses, lost VMs, duplicated VMs, orphans, records
//! that did not verify and harness errors; `faults-trials.json` (rewritten
//! after every trial, so an interrupted run keeps what it did) holds every
//! trial with its notes. `FERRY_BENCH_FERRYD=PATH` uses that `ferryd`
//! instead of building the release one.

use std::collections::BTreeMap;

use crate::faults::{Fault, Phase, Trial, run_trial};
use crate::report::{Measurement, Report, results_dir};
use crate::suites::Options;
use crate::suites::daemon::ferryd_exe;

pub fn run(opts: &Options) -> anyhow::Result<Report> {
    // FERRY_BENCH_FERRYD: an already built ferryd (e.g. a debug build).
    let exe = match std::env::var_os("FERRY_BENCH_FERRYD") {
        Some(p) => std::path::PathBuf::from(p),
        None => ferryd_exe()?,
    };
    let mut phases: Vec<Phase> = Vec::new();
    let mut faults: Vec<Fault> = Vec::new();
    let mut it = opts.rest.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--phase" => {
                let v = it.next().map(String::as_str).unwrap_or("");
                phases.push(
                    *Phase::ALL
                        .iter()
                        .find(|p| p.name() == v)
                        .ok_or_else(|| anyhow::anyhow!("unknown phase {v}"))?,
                );
            }
            "--fault" => {
                let v = it.next().map(String::as_str).unwrap_or("");
                faults.push(
                    *Fault::ALL
                        .iter()
                        .find(|f| f.name() == v)
                        .ok_or_else(|| anyhow::anyhow!("unknown fault {v}"))?,
                );
            }
            other => anyhow::bail!("faults: unknown argument {other}"),
        }
    }
    if phases.is_empty() {
        phases = Phase::ALL.to_vec();
    }
    if faults.is_empty() {
        faults = Fault::ALL.to_vec();
    }
    // The common default (1000) is meant for cheap trials; these boot
    // guests.
    let repeat = if opts.trials == 1000 { 4 } else { opts.trials };
    let rt = tokio::runtime::Runtime::new()?;
    let mut trials: Vec<Trial> = Vec::new();
    let detail = results_dir().join("faults-trials.json");
    std::fs::create_dir_all(results_dir())?;
    for r in 0..repeat {
        for &p in &phases {
            for &f in &faults {
                let t = rt.block_on(run_trial(&exe, p, f));
                eprintln!(
                    "faults: round {} {} × {}: {} in {:.0} s{}",
                    r + 1,
                    p.name(),
                    f.name(),
                    if t.clean() { "clean" } else { "PROBLEM" },
                    t.seconds,
                    t.error
                        .as_ref()
                        .map(|e| format!(" (error: {e})"))
                        .unwrap_or_default()
                );
                for n in &t.notes {
                    eprintln!("    {n}");
                }
                trials.push(t);
                std::fs::write(&detail, serde_json::to_string_pretty(&trials)? + "\n")?;
                // An interrupted run keeps its counts.
                summarize(&trials).write()?;
            }
        }
    }
    Ok(summarize(&trials))
}

/// The per-cell counts of `trials`.
fn summarize(trials: &[Trial]) -> Report {
    let mut cells: BTreeMap<(usize, usize), [u32; 7]> = BTreeMap::new();
    for t in trials {
        let key = (
            Phase::ALL.iter().position(|p| *p == t.phase).unwrap_or(0),
            Fault::ALL.iter().position(|f| *f == t.fault).unwrap_or(0),
        );
        let c = cells.entry(key).or_default();
        c[0] += 1;
        c[1] += t.wrong_status;
        c[2] += t.lost;
        c[3] += t.duplicated;
        c[4] += t.orphans;
        c[5] += t.bad_records;
        c[6] += u32::from(t.error.is_some());
    }
    let mut report = Report::new("faults");
    let mut totals = [0u32; 7];
    for ((p, f), c) in &cells {
        let cell = format!("{} × {}", Phase::ALL[*p].name(), Fault::ALL[*f].name());
        let names = [
            "trials",
            "wrong-status",
            "lost",
            "duplicated",
            "orphans",
            "bad-records",
            "harness-errors",
        ];
        for (i, n) in names.iter().enumerate() {
            let m = Measurement::new(format!("{cell}: {n}"), "count", c[i] as f64);
            report.push(if i == 0 { m } else { m.lower_is_better() });
            totals[i] += c[i];
        }
    }
    for (i, n) in [
        "total trials",
        "total wrong-status",
        "total lost",
        "total duplicated",
        "total orphans",
        "total bad-records",
        "total harness-errors",
    ]
    .iter()
    .enumerate()
    {
        let m = Measurement::new(*n, "count", totals[i] as f64);
        report.push(if i == 0 { m } else { m.lower_is_better() });
    }
    report
}
