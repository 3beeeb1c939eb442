//! The crash-test harness: a child process (`ferry-pool-crashchild`) runs a
//! deterministic workload and prints a marker before each op and after each
//! acknowledged flush; the parent SIGKILLs it at a random moment, reopens
//! the pool, rebuilds the expected state by replaying the workload from the
//! same seed, and checks that everything acknowledged is there and that
//! `verify` is clean. Used by the crate's tests and the `crash` bench suite.
//!
//! Two kinds of trial:
//! - [`Crash::Process`]: only the process died, the page cache lived on.
//!   Every op that returned must be there, flushed or not (the stage logs
//!   are replayed); only the op running at the kill may be missing.
//! - [`Crash::Machine`]: the machine is taken to have crashed: before the
//!   reopen the stage logs are stamped with another boot id, so they are
//!   dropped. Everything acknowledged by a flush must be there. (The page
//!   cache is not really lost here; what this checks is that dropping the
//!   logs leaves a consistent pool with every flushed write.)

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::control::Pool;
use crate::error::Result;
use crate::pool::PoolOptions;
use crate::workload::{Generator, Model, Op, check_after_crash, run_op};

/// Chunk size of crash-test pools (small, so tiny volumes have many chunks).
pub const CHUNK: u64 = 4096;

/// The state after setup: two volumes, one of an unaligned size.
pub fn initial_model() -> Model {
    let mut m = Model::default();
    m.vols
        .insert("v0".into(), vec![0u8; (24 * CHUNK + 1536) as usize]);
    m.vols.insert("v1".into(), vec![0u8; (16 * CHUNK) as usize]);
    m
}

/// The child's side: create the pool in `dir`, run `ops` ops of workload
/// `seed`, printing `READY`, then `B i` before and `F i` after each
/// acknowledged flush, `DONE` at the end. Exits with status 3 on a read
/// that differs from the model.
pub fn child_main(dir: &Path, seed: u64, ops: usize) -> Result<()> {
    let pool = Pool::create(
        dir,
        PoolOptions {
            chunk_size: CHUNK as u32,
            limit_bytes: None,
        },
    )?;
    let mut m = initial_model();
    for (name, c) in &m.vols {
        pool.create_volume(name, c.len() as u64)?;
    }
    pool.flush()?;
    let out = std::io::stdout();
    let mut out = out.lock();
    let say = |out: &mut std::io::StdoutLock<'_>, s: String| {
        let _ = writeln!(out, "{s}");
        let _ = out.flush();
    };
    say(&mut out, "READY".into());
    let mut g = Generator::new(seed, CHUNK);
    for i in 0..ops {
        let op = g.next(&m);
        say(&mut out, format!("B {i}"));
        if let Some(msg) = run_op(&pool, &m, &op)? {
            say(&mut out, format!("MISMATCH {i} {msg}"));
            std::process::exit(3);
        }
        m.apply(&op);
        if op == Op::Flush {
            say(&mut out, format!("F {i}"));
        }
    }
    say(&mut out, "DONE".into());
    Ok(())
}

/// What the kill stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Crash {
    /// The process was killed; the machine (and its page cache) lived on.
    #[default]
    Process,
    /// The machine crashed: unflushed writes may be lost.
    Machine,
}

/// What one trial found.
#[derive(Debug, Clone, Default)]
pub struct TrialResult {
    /// What the kill stood for.
    pub crash: Crash,
    /// Index of the last acknowledged flush (None: only the setup was).
    pub last_flush: Option<usize>,
    /// Ops the child started.
    pub ops_started: usize,
    /// Whether the child finished before the kill.
    pub finished: bool,
    /// Sectors or snapshots whose acknowledged content was not found.
    pub lost: u64,
    /// Problems: missing objects, child mismatches, failures to reopen.
    pub problems: Vec<String>,
    /// Problems `verify` reported.
    pub verify_errors: Vec<String>,
}

/// Run one trial in `dir` (must not exist or be empty): start `child_exe`
/// with workload `seed`, kill it `kill_after` after it is ready, check.
pub fn trial(
    child_exe: &Path,
    dir: &Path,
    seed: u64,
    ops: usize,
    kill_after: Duration,
    crash: Crash,
) -> std::io::Result<TrialResult> {
    let mut child = Command::new(child_exe)
        .arg(dir)
        .arg(seed.to_string())
        .arg(ops.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    // Wait for READY (or the end of output).
    for line in rx.iter() {
        let ready = line == "READY";
        lines.push(line);
        if ready {
            break;
        }
    }
    std::thread::sleep(kill_after);
    // SAFETY: kill(2) with the pid of our own child and a constant signal.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGKILL);
    }
    let _ = child.wait()?;
    let _ = reader.join();
    lines.extend(rx.try_iter());
    let mut r = TrialResult {
        crash,
        ..TrialResult::default()
    };
    if !lines.iter().any(|l| l == "READY") {
        r.problems.push("child died before READY".into());
        return Ok(r);
    }
    for l in &lines {
        if let Some(i) = l.strip_prefix("F ") {
            r.last_flush = i.parse().ok();
        } else if let Some(i) = l.strip_prefix("B ") {
            r.ops_started = i.parse::<usize>().map(|i| i + 1).unwrap_or(0);
        } else if l == "DONE" {
            r.finished = true;
        } else if l.starts_with("MISMATCH") {
            r.problems.push(format!("child: {l}"));
        }
    }
    // Replay: versions[0] after the last acknowledged flush, then one per
    // op that may have run before the kill.
    // models[j] is the state after the first j ops.
    let mut m = initial_model();
    let mut g = Generator::new(seed, CHUNK);
    let mut models = vec![m.clone()];
    for _ in 0..r.ops_started {
        let op = g.next(&m);
        m.apply(&op);
        models.push(m.clone());
    }
    let base = match crash {
        // Every op before the last one started has returned.
        Crash::Process => r.ops_started.saturating_sub(1),
        Crash::Machine => r.last_flush.map(|k| k + 1).unwrap_or(0),
    };
    let versions = &models[base..];
    let check = (|| -> Result<()> {
        if crash == Crash::Machine {
            crate::stagelog::restamp_for_test(dir)?;
        }
        let pool = Pool::open(dir)?;
        let (lost, problems) = check_after_crash(&pool, versions)?;
        r.lost = lost;
        r.problems.extend(problems);
        r.verify_errors = pool.verify()?;
        Ok(())
    })();
    if let Err(e) = check {
        r.problems.push(format!("reopen and check: {e}"));
    }
    Ok(r)
}
