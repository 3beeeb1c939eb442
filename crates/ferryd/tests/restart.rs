//! Restart tests: `kill -9` ferryd at every step boundary of the
//! multi-step operations (`volume.import`, `volume.export`) and in the
//! middle of their copies, restart it, and check that each operation ends
//! as its log says (rolled forward or compensated) and that the world
//! matches: the volume and its content, the export file (equal to the
//! source by `qemu-img compare`, or removed), no temporary snapshot, no
//! `qemu-nbd` left running.
//!
//! The stop points come from the test-only fault-injection hook of
//! `ferry-ops` (`FERRY_OPS_TEST_PAUSE`): ferryd prints
//! `FERRY_OPS_TEST_PAUSED <point>` and waits there until killed.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Host, processes, wait_line};
use serde_json::{Value, json};

fn sh(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A 48 MiB qcow2 with 1 MiB of distinct data every 3 MiB.
fn source_image(dir: &Path) -> PathBuf {
    let qcow = dir.join("src.qcow2");
    sh(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&qcow)
        .arg("48M"));
    let mut io = Command::new("qemu-io");
    io.args(["-f", "qcow2"]);
    for i in 0..16u64 {
        io.arg("-c")
            .arg(format!("write -P {} {}M 1M", i + 1, i * 3));
    }
    sh(io.arg(&qcow));
    qcow
}

fn images_equal(a: &Path, b: &Path) -> bool {
    let out = Command::new("qemu-img")
        .arg("compare")
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "qemu-img compare: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.status.success()
}

fn log_of(op: &Value) -> String {
    op["log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["msg"].as_str().unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

/// qemu-nbd children die with ferryd (PR_SET_PDEATHSIG); the signal is
/// asynchronous, so allow it a moment.
fn assert_no_qemu_nbd(h: &Host) {
    let data = h.data().to_string_lossy().into_owned();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = processes("qemu-nbd", &data);
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "qemu-nbd left running: {left:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn start_op(h: &Host, path: &str, body: Value) -> String {
    let (s, started) = h.post(path, body).await;
    assert_eq!(s, 202, "{started}");
    started["operation"].as_str().unwrap().to_string()
}

/// Runs until `point`, kills ferryd there, restarts it and returns the
/// finished operation. `before_kill` runs while ferryd waits at the point.
async fn kill_at(h: &mut Host, point: &str, path: &str, body: Value) -> (String, Value) {
    let rx = h.start_watched(&[("FERRY_OPS_TEST_PAUSE", point)]);
    let id = start_op(h, path, body).await;
    wait_line(&rx, &format!("FERRY_OPS_TEST_PAUSED {point}"), 60);
    if point.ends_with(":copying") {
        let running = processes("qemu-nbd", &h.data().to_string_lossy());
        assert_eq!(running.len(), 1, "a copy runs through one qemu-nbd");
    }
    h.kill9();
    assert_no_qemu_nbd(h);
    h.start();
    let op = h.wait_op(&id).await;
    (id, op)
}

/// A host without a running ferryd (the test starts it with the hook).
fn stopped_host() -> Host {
    let mut h = Host::new();
    h.kill9();
    h
}

#[tokio::test]
async fn import_killed_at_every_step_boundary() {
    // (point, expected end): a crash inside "create volume" compensates
    // (the step is not idempotent); everything else rolls forward.
    let cases = [
        ("volume.import:started:0", "failed"),
        ("volume.import:done:0", "succeeded"),
        ("volume.import:started:1", "succeeded"),
        ("volume.import:copying", "succeeded"),
        ("volume.import:done:1", "succeeded"),
    ];
    for (point, expected) in cases {
        let mut h = stopped_host();
        let src = source_image(h.dir.path());
        let (_, op) = kill_at(
            &mut h,
            point,
            "/v1/volumes/vol/import",
            json!({ "path": src }),
        )
        .await;
        let log = log_of(&op);
        println!("--- {point}: {}\n{log}", op["state"]);
        assert_eq!(op["state"], expected, "{point}: {log}");
        let (s, vol) = h.get("/v1/volumes/vol").await;
        if expected == "succeeded" {
            assert!(
                log.contains("recovered after restart: rolling forward"),
                "{point}: {log}"
            );
            assert_eq!(s, 200, "{point}: {vol}");
            assert_eq!(vol["exclusive_bytes"], 16 << 20, "{point}: {vol}");
            // The content: export it (no hook now) and compare.
            let out = h.dir.path().join("check.qcow2");
            let id = start_op(&h, "/v1/volumes/vol/export", json!({ "path": out })).await;
            let ex = h.wait_op(&id).await;
            assert_eq!(ex["state"], "succeeded", "{ex}");
            assert!(images_equal(&src, &out), "{point}: content differs");
        } else {
            assert!(
                log.contains("recovered after restart: compensating"),
                "{point}: {log}"
            );
            assert!(log.contains("step create volume undone"), "{point}: {log}");
            assert_eq!(s, 404, "{point}: volume left behind: {vol}");
        }
        assert_no_qemu_nbd(&h);
    }
}

#[tokio::test]
async fn export_killed_at_every_step_boundary() {
    let mut points = vec!["volume.export:copying".to_string()];
    for i in 0..4 {
        points.push(format!("volume.export:started:{i}"));
        points.push(format!("volume.export:done:{i}"));
    }
    for point in &points {
        let mut h = stopped_host();
        let src = source_image(h.dir.path());
        let rx = h.start_watched(&[("FERRY_OPS_TEST_PAUSE", point)]);
        drop(rx);
        let id = start_op(&h, "/v1/volumes/vol/import", json!({ "path": src })).await;
        assert_eq!(h.wait_op(&id).await["state"], "succeeded");
        h.kill9();
        let out = h.dir.path().join("out.qcow2");
        let (_, op) = kill_at(
            &mut h,
            point,
            "/v1/volumes/vol/export",
            json!({ "path": out, "format": "qcow2" }),
        )
        .await;
        let log = log_of(&op);
        println!("--- {point}: {}\n{log}", op["state"]);
        // Every export step is idempotent: all roll forward.
        assert_eq!(op["state"], "succeeded", "{point}: {log}");
        assert!(
            log.contains("recovered after restart: rolling forward"),
            "{point}: {log}"
        );
        assert!(images_equal(&src, &out), "{point}: export differs");
        let (_, snaps) = h.get("/v1/snapshots").await;
        assert_eq!(snaps, json!([]), "{point}: temporary snapshot left");
        assert_no_qemu_nbd(&h);
    }
}

/// The world changed while ferryd was down (the temporary snapshot is
/// gone): the resumed copy fails and the export is compensated — partial
/// file removed, nothing left.
#[tokio::test]
async fn export_compensates_when_the_snapshot_vanished_during_a_restart() {
    let mut h = Host::new();
    let src = source_image(h.dir.path());
    let id = start_op(&h, "/v1/volumes/vol/import", json!({ "path": src })).await;
    assert_eq!(h.wait_op(&id).await["state"], "succeeded");
    h.kill9();
    let point = "volume.export:done:1";
    let rx = h.start_watched(&[("FERRY_OPS_TEST_PAUSE", point)]);
    let out = h.dir.path().join("out.qcow2");
    let id = start_op(&h, "/v1/volumes/vol/export", json!({ "path": out })).await;
    wait_line(&rx, &format!("FERRY_OPS_TEST_PAUSED {point}"), 60);
    assert!(out.exists(), "the target was created");
    let snap = format!(".export-{id}");
    let (s, e) = h.delete(&format!("/v1/snapshots/{snap}")).await;
    assert_eq!(s, 204, "{e}");
    h.kill9();
    h.start();
    let op = h.wait_op(&id).await;
    let log = log_of(&op);
    println!("{log}");
    assert_eq!(op["state"], "failed", "{log}");
    assert!(log.contains("step copy data failed"), "{log}");
    assert!(log.contains("step create target undone"), "{log}");
    assert!(log.contains("step snapshot volume undone"), "{log}");
    assert!(!out.exists(), "partial export left at {}", out.display());
    let (_, snaps) = h.get("/v1/snapshots").await;
    assert_eq!(snaps, json!([]));
    assert_no_qemu_nbd(&h);
}
