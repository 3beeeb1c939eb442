//! Operations end to end: success, failure with compensation, cancel, and
//! recovery after a real `kill -9` of the process running an operation at
//! every step boundary.
//!
//! The steps here create and remove files, so the state of the world after
//! each path can be checked against what the journal says.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use ferry_ops::{
    BoxFuture, Journal, Manager, OpState, Plan, Recovery, Step, StepContext, StepError, StepState,
};
use serde_json::{Value, json};

/// The application state of these tests: a directory the steps write in.
struct World {
    dir: PathBuf,
}

/// Creates one file. Pauses (for the crash test) where `FERRY_OPS_PAUSE`
/// says, after printing a marker the parent waits for.
struct CreateFile {
    name: String,
    recovery: Recovery,
    fail: bool,
    slow: bool,
}

fn pause_point(point: &str, step: &str) {
    if std::env::var("FERRY_OPS_PAUSE").as_deref() == Ok(&format!("{point}:{step}")) {
        println!("PAUSED {point}:{step}");
        loop {
            std::thread::sleep(Duration::from_secs(60));
        }
    }
}

impl Step<World> for CreateFile {
    fn name(&self) -> &str {
        &self.name
    }

    fn recovery(&self) -> Recovery {
        self.recovery
    }

    fn intent(&self, cx: &StepContext<World>) -> Result<Value, StepError> {
        pause_point("before-intent", &self.name);
        Ok(json!({ "path": cx.app.dir.join(&self.name) }))
    }

    fn run<'a>(&'a self, cx: &'a StepContext<World>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            pause_point("before-act", &self.name);
            cx.log_when_done(format!("{} looked around", self.name));
            if self.fail {
                return Err(StepError::failed(format!("{} refused", self.name)));
            }
            if self.slow {
                for i in 0..100 {
                    if cx.is_cancelled() {
                        return Err(StepError::Cancelled);
                    }
                    cx.set_fraction(i as f64 / 100.0);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            let path = cx.app.dir.join(&self.name);
            std::fs::write(&path, &self.name).map_err(StepError::failed)?;
            cx.log(format!("created {}", path.display()));
            pause_point("after-act", &self.name);
            Ok(json!({ "bytes": self.name.len() }))
        })
    }

    fn undo<'a>(
        &'a self,
        _cx: &'a StepContext<World>,
        intent: &'a Value,
        _result: Option<&'a Value>,
    ) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let path = intent["path"]
                .as_str()
                .ok_or(StepError::failed("no path"))?;
            match std::fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(StepError::failed(e)),
            }
        })
    }
}

/// Kind `files`: params `{"fail": "<step>", "slow": "<step>"}`; steps a
/// (retry), b (compensate), c (retry).
fn register(m: &Manager<World>) {
    m.register("files", |params| {
        let step = |name: &str, recovery| -> (Box<dyn Step<World>>, f64) {
            (
                Box::new(CreateFile {
                    name: name.into(),
                    recovery,
                    fail: params["fail"] == name,
                    slow: params["slow"] == name,
                }),
                1.0,
            )
        };
        Ok(Plan::new(
            "create files",
            vec![
                step("a", Recovery::Retry),
                step("b", Recovery::Compensate),
                step("c", Recovery::Retry),
            ],
        ))
    });
}

fn manager(dir: &Path) -> Arc<Manager<World>> {
    let journal = Arc::new(Journal::open(dir.join("journal.db")).unwrap());
    let m = Manager::new(
        journal,
        Arc::new(World {
            dir: dir.join("world"),
        }),
    );
    std::fs::create_dir_all(dir.join("world")).unwrap();
    register(&m);
    m
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("world"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn success_runs_every_step_and_reaches_100() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager(dir.path());
    let id = m.start("files", json!({})).unwrap();
    let op = m.wait(&id).await.unwrap();
    assert_eq!(op.state, OpState::Succeeded, "{op:?}");
    assert_eq!(files(dir.path()), ["a", "b", "c"]);
    let p = m.progress(&id).unwrap().unwrap();
    assert_eq!(p.overall, 1.0);
    assert!(p.complete);
    let steps = m.journal().steps(&id).unwrap();
    assert!(steps.iter().all(|s| s.state == StepState::Done));
    assert_eq!(steps[1].result, Some(json!({"bytes": 1})));
    // A line kept for the step's end is written with it, after the lines
    // the step wrote at once.
    let log: Vec<String> = logs(&m, &id);
    let at = |m: &str| {
        log.iter()
            .position(|l| l == m)
            .unwrap_or_else(|| panic!("{m:?} in {log:?}"))
    };
    assert_eq!(at("b looked around") + 1, at("step b done"));
    assert!(
        at("b looked around")
            > log
                .iter()
                .position(|l| l.starts_with("created ") && l.ends_with("/b"))
                .unwrap()
    );
}

fn logs(m: &Manager<World>, id: &str) -> Vec<String> {
    m.journal()
        .logs(id)
        .unwrap()
        .into_iter()
        .map(|l| l.msg)
        .collect()
}

#[tokio::test]
async fn failure_compensates_and_names_the_step() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager(dir.path());
    let id = m.start("files", json!({"fail": "c"})).unwrap();
    let op = m.wait(&id).await.unwrap();
    assert_eq!(op.state, OpState::Failed);
    let err = op.error.unwrap();
    assert!(err.contains("step c failed: c refused"), "{err}");
    assert!(err.contains("undone: c, b, a"), "{err}");
    // What the failed step kept for its end is written all the same.
    assert!(logs(&m, &id).iter().any(|l| l == "c looked around"));
    assert!(files(dir.path()).is_empty());
    let p = m.progress(&id).unwrap().unwrap();
    assert!(p.overall < 1.0 && !p.complete);
}

#[tokio::test]
async fn cancel_stops_a_running_step_and_compensates() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager(dir.path());
    let id = m.start("files", json!({"slow": "b"})).unwrap();
    let mut rx = m.subscribe(&id).unwrap();
    // Wait until step b reports progress, then cancel.
    rx.wait_for(|v| v.nodes.iter().any(|n| n.name == "b" && n.fraction > 0.0))
        .await
        .unwrap();
    m.cancel(&id).unwrap();
    let op = m.wait(&id).await.unwrap();
    assert_eq!(op.state, OpState::Cancelled, "{op:?}");
    assert!(files(dir.path()).is_empty());
    assert!(
        m.cancel(&id).is_err(),
        "a finished operation cannot be cancelled"
    );
}

#[tokio::test]
async fn unknown_kind_is_refused_before_journaling() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager(dir.path());
    let e = m.start("nope", json!({})).unwrap_err();
    assert!(
        e.to_string()
            .contains("no plan is registered for kind nope")
    );
    assert!(m.journal().list().unwrap().is_empty());
}

#[tokio::test]
async fn progress_never_goes_back_while_running() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager(dir.path());
    let id = m.start("files", json!({"slow": "a"})).unwrap();
    let mut rx = m.subscribe(&id).unwrap();
    let mut last = 0.0;
    let mut seen = 0;
    while rx.changed().await.is_ok() {
        let v = rx.borrow_and_update().overall;
        assert!(v >= last, "progress went back from {last} to {v}");
        last = v;
        seen += 1;
    }
    assert!(seen > 10, "saw only {seen} updates");
    assert_eq!(m.wait(&id).await.unwrap().state, OpState::Succeeded);
}

/// The child side of the crash test: runs one operation and pauses where
/// told. Does nothing unless started by `kill_9_at_every_step_boundary`.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var("FERRY_OPS_CHILD_DIR") else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let m = manager(Path::new(&dir));
        let id = m.start("files", json!({})).unwrap();
        m.wait(&id).await.unwrap();
        println!("FINISHED");
    });
}

/// Kills the child at a pause point; returns the operation's id.
fn run_child_until(dir: &Path, pause: &str) -> String {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env("FERRY_OPS_CHILD_DIR", dir)
        .env("FERRY_OPS_PAUSE", pause)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut paused = false;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        if line.unwrap().contains("PAUSED ") {
            paused = true;
            break;
        }
    }
    assert!(paused, "child never reached {pause}");
    // SIGKILL: no destructor, no journal flush beyond what was committed.
    child.kill().unwrap();
    child.wait().unwrap();
    let ops = Journal::open(dir.join("journal.db"))
        .unwrap()
        .list()
        .unwrap();
    assert_eq!(ops.len(), 1);
    ops[0].id.clone()
}

#[tokio::test]
async fn kill_9_at_every_step_boundary() {
    // (pause point, expected end, expected files, expected log phrase)
    let cases: &[(&str, OpState, &[&str], &str)] = &[
        // Before step a journals its intent: nothing acted, roll forward.
        (
            "before-intent:a",
            OpState::Succeeded,
            &["a", "b", "c"],
            "rolling forward from step a",
        ),
        // a (retry) journaled but not acted / acted but not journaled done.
        (
            "before-act:a",
            OpState::Succeeded,
            &["a", "b", "c"],
            "rolling forward from step a",
        ),
        (
            "after-act:a",
            OpState::Succeeded,
            &["a", "b", "c"],
            "rolling forward from step a",
        ),
        // a done, b not started: a (retry) waits to journal its end with
        // b's start, so it is run again.
        (
            "before-intent:b",
            OpState::Succeeded,
            &["a", "b", "c"],
            "rolling forward from step a",
        ),
        // b (compensate) interrupted: everything is undone.
        (
            "before-act:b",
            OpState::Failed,
            &[],
            "interrupted by a restart during step b",
        ),
        (
            "after-act:b",
            OpState::Failed,
            &[],
            "interrupted by a restart during step b",
        ),
        // b (compensate) journaled its end at once: roll forward.
        (
            "before-intent:c",
            OpState::Succeeded,
            &["a", "b", "c"],
            "rolling forward from step c",
        ),
        (
            "after-act:c",
            OpState::Succeeded,
            &["a", "b", "c"],
            "rolling forward from step c",
        ),
    ];
    for (pause, end, expect, phrase) in cases {
        let dir = tempfile::tempdir().unwrap();
        let id = run_child_until(dir.path(), pause);
        let m = manager(dir.path());
        let recovered = m.recover().unwrap();
        assert_eq!(recovered, vec![id.clone()], "at {pause}");
        let op = m.wait(&id).await.unwrap();
        assert_eq!(op.state, *end, "at {pause}: {op:?}");
        assert_eq!(files(dir.path()), *expect, "at {pause}");
        let log: Vec<String> = m
            .journal()
            .logs(&id)
            .unwrap()
            .into_iter()
            .map(|l| l.msg)
            .collect();
        assert!(
            log.iter().any(|l| l.contains(phrase)),
            "at {pause}: log lacks {phrase:?}: {log:#?}"
        );
        // A second restart finds nothing left to do.
        assert!(manager(dir.path()).recover().unwrap().is_empty());
    }
}
