//! Instant restore (issue 12) against two real `ferryd`: host A runs a
//! test-kit guest (QEMU, TCG) writing verifiable records and backs it up
//! into a directory repository; host B, which registers the same
//! repository, restores it instantly: the guest boots from staging volumes
//! sourced from the backup, resumes its records after the backed-up ones
//! and keeps writing while its disk is relocated (blockdev-mirror, pivot)
//! to a new pool volume; the staging volume is gone afterwards and every
//! record acknowledged by the guest, before the backup and during and
//! after the restore, verifies on the new volume. Also with `kill -9` of
//! B's ferryd mid-relocation (held there by the test-only pause point),
//! and with a relocation cancelled (the VM keeps running on staging, its
//! writes kept) then retried by running the same restore again.
//!
//! Onto another host: host A holds the repository and stages, the guest
//! runs on host B from A's staging volumes over NBD/TCP, and B relocates
//! its disk into B's pool (`vm.relocate`, followed by A); also with
//! `kill -9` of A's ferryd while B's mirror runs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Host, wait_line};
use ferry_testkit::console::Console;
use ferry_testkit::{Disk, GuestConfig, GuestImage, NbdServer, Workload, disk};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(900);

/// Kills, on drop, every QEMU whose command line names these directories.
struct Reaper(Vec<PathBuf>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for d in &self.0 {
            for pid in common::processes("qemu-system-x86_64", &d.to_string_lossy()) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
    }
}

async fn wait_op(h: &Host, id: &str) -> Value {
    let deadline = Instant::now() + T;
    loop {
        let (s, op) = h.get(&format!("/v1/operations/{id}")).await;
        assert_eq!(s, 200, "{op}");
        let state = op["state"].as_str().unwrap();
        if ["succeeded", "failed", "cancelled"].contains(&state) {
            println!("operation {id}: {state}\n{}", log_of(&op));
            return op;
        }
        assert!(Instant::now() < deadline, "operation {id} still {state}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn log_of(op: &Value) -> String {
    op["log"]
        .as_array()
        .map(|l| {
            l.iter()
                .map(|x| x["msg"].as_str().unwrap_or("").to_string())
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

async fn run_op(h: &Host, path: &str, body: Value) -> Value {
    let (s, started) = h.post(path, body).await;
    assert_eq!(s, 202, "{path}: {started}");
    wait_op(h, started["operation"].as_str().unwrap()).await
}

/// Reads a pool snapshot or volume through a read-only export into a raw
/// file.
async fn copy_out(h: &Host, field: &str, object: &str, to: &Path) {
    let (s, e) = h.post("/v1/exports", json!({ field: object })).await;
    assert_eq!(s, 201, "{e}");
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(e["unix_uri"].as_str().unwrap())
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
    let (s, e) = h
        .delete(&format!("/v1/exports/{}", e["name"].as_str().unwrap()))
        .await;
    assert!(s == 204 || s == 200, "{e}");
}

/// A guest's console: the records it acknowledged.
struct Guest {
    name: String,
    console: Console,
}

impl Guest {
    fn last_record(&mut self) -> Option<u64> {
        self.console.poll().unwrap();
        self.console
            .events()
            .iter()
            .filter(|e| e.name == "record")
            .filter_map(|e| e.u64("seq"))
            .max()
    }

    fn wait_record_after(&mut self, seq: Option<u64>) -> u64 {
        let deadline = Instant::now() + T;
        loop {
            if let Some(s) = self.last_record()
                && seq.is_none_or(|q| s > q)
            {
                return s;
            }
            if let Some(f) = self.console.fatal() {
                panic!(
                    "{}: guest failed: {f}\n{}",
                    self.name,
                    self.console.tail(30)
                );
            }
            assert!(
                Instant::now() < deadline,
                "{}: no record after {seq:?}: {}",
                self.name,
                self.console.tail(30)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn writer_next_seq(&mut self) -> u64 {
        let deadline = Instant::now() + T;
        loop {
            self.console.poll().unwrap();
            if let Some(n) = self
                .console
                .events()
                .iter()
                .find(|e| e.name == "writer")
                .and_then(|e| e.u64("next_seq"))
            {
                return n;
            }
            assert!(
                Instant::now() < deadline,
                "{}: no writer event: {}",
                self.name,
                self.console.tail(30)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Waits until VM `name` is defined on `h` and returns its console.
async fn console_of(h: &Host, name: &str) -> Guest {
    let deadline = Instant::now() + T;
    loop {
        let (s, v) = h.get(&format!("/v1/vms/{name}")).await;
        if s == 200 && v["state"] == "running" {
            return Guest {
                name: name.into(),
                console: Console::new(Path::new(v["serial_log"].as_str().unwrap())),
            };
        }
        assert!(Instant::now() < deadline, "VM {name} never ran on the host");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Host A: a guest writing records on a 64 MiB ext4 volume, backed up
/// into a new repository at `repo_dir`, then stopped. Returns the backup
/// id and the records of the backed-up snapshot.
async fn backed_up_guest(a: &Host, repo_dir: &Path) -> (String, ferry_guest::Report) {
    let raw = a.dir.path().join("disk.raw");
    disk::make_ext4_disk(&raw, 64 << 20).unwrap();
    let op = run_op(
        a,
        "/v1/volumes/disk-a/import",
        json!({ "path": raw, "format": "raw" }),
    )
    .await;
    assert_eq!(op["state"], "succeeded", "{op}");
    std::fs::remove_file(&raw).unwrap();
    let image = GuestImage::get().await.unwrap();
    let mut cfg = GuestConfig::new("vm-a");
    cfg.workload = Workload::records(20.0);
    cfg.disks.push(Disk::Nbd {
        server: NbdServer::Unix("/unused".into()),
        export: "disk-a".into(),
    });
    let def = json!({
        "name": "vm-a", "vcpus": 1, "memory_mib": 256, "disks": ["disk-a"],
        "boot": { "kind": "kernel", "kernel": image.kernel(), "initrd": image.initramfs(),
                  "cmdline": cfg.kernel_cmdline() },
        "guest_agent": true, "accel": "tcg",
    });
    let (s, v) = a.post("/v1/vms", def).await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = a.post("/v1/vms/vm-a/start", json!({})).await;
    assert_eq!(s, 200, "{v}");
    let mut g = Guest {
        name: "vm-a".into(),
        console: Console::new(Path::new(v["serial_log"].as_str().unwrap())),
    };
    let first = g.wait_record_after(None);
    g.wait_record_after(Some(first + 5));

    let (s, r) = a
        .post(
            "/v1/repos",
            json!({ "location": repo_dir, "name": "r", "create": true }),
        )
        .await;
    assert_eq!(s, 201, "{r}");
    let op = run_op(a, "/v1/repos/r/backups", json!({ "vm": "vm-a" })).await;
    assert_eq!(op["state"], "succeeded", "{op}");
    let (_, list) = a.get("/v1/repos/r/backups").await;
    let b = list.as_array().unwrap().last().unwrap().clone();
    println!("backup: {}", serde_json::to_string(&b["disks"]).unwrap());
    assert!(
        !b["disks"][0]["read_profile"].as_array().unwrap().is_empty(),
        "the backup holds the VM's boot profile: {b}"
    );
    let (s, v) = a.post("/v1/vms/vm-a/stop?timeout_s=120", json!({})).await;
    assert_eq!(s, 200, "{v}");
    let group = b["config"]["snapshot_group"].as_str().unwrap();
    let snap_img = a.dir.path().join("snap.raw");
    copy_out(a, "snapshot", &format!("{group}.vm-a.vda"), &snap_img).await;
    let r = disk::verify_records_on_image(&snap_img).unwrap();
    assert!(r.ok && r.records > 0, "{r:?}");
    std::fs::remove_file(&snap_img).unwrap();
    (b["id"].as_str().unwrap().to_string(), r)
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Fault {
    None,
    /// `kill -9` of the restoring ferryd while the mirror runs.
    Kill9,
    /// The relocation is cancelled, then the restore is run again.
    CancelRetry,
}

async fn instant_restore(fault: Fault) {
    let mut a = Host::named("host-a");
    let mut b = Host::named("host-b");
    let _reaper = Reaper(vec![a.data(), b.data()]);
    let repo_dir = a.dir.path().join("repo");
    let (backup, before) = backed_up_guest(&a, &repo_dir).await;
    a.kill9();

    let pause = [("FERRY_OPS_TEST_PAUSE", "backup.instant_restore:relocating")];
    let lines = match fault {
        Fault::None => None,
        _ => {
            b.kill9();
            Some(b.start_watched(&pause))
        }
    };
    let (s, r) = b
        .post(
            "/v1/repos",
            json!({ "location": repo_dir, "name": "r", "create": false }),
        )
        .await;
    assert_eq!(s, 201, "{r}");
    let path = format!("/v1/repos/r/backups/{backup}/restore");
    let body = json!({ "name": "vm-i", "to": "host-b", "instant": true });
    let t0 = Instant::now();
    let (s, started) = b.post(&path, body.clone()).await;
    assert_eq!(s, 202, "{started}");
    let op_id = started["operation"].as_str().unwrap().to_string();

    // The guest runs from staging and resumes after the backed-up records.
    let mut g = console_of(&b, "vm-i").await;
    let next = g.writer_next_seq();
    println!("guest writing after {:?}", t0.elapsed());
    assert_eq!(
        Some(next),
        before.last_seq.map(|s| s + 1),
        "the restored guest resumes after the backed-up records"
    );
    let acked = g.wait_record_after(Some(next));
    println!("restored guest acknowledged record {acked}");

    let op = match fault {
        Fault::None => wait_op(&b, &op_id).await,
        Fault::Kill9 => {
            wait_line(lines.as_ref().unwrap(), "FERRY_OPS_TEST_PAUSED", 900);
            let last = g.last_record();
            let seen = g.wait_record_after(last);
            b.kill9();
            println!("killed the restoring ferryd mid-relocation (record {seen} acknowledged)");
            b.start();
            let op = wait_op(&b, &op_id).await;
            assert!(
                log_of(&op).contains("recovered after restart"),
                "the restore resumed after the restart: {op}"
            );
            op
        }
        Fault::CancelRetry => {
            wait_line(lines.as_ref().unwrap(), "FERRY_OPS_TEST_PAUSED", 900);
            let (s, v) = b
                .post(&format!("/v1/operations/{op_id}/cancel"), json!({}))
                .await;
            assert!(s == 200 || s == 202, "{v}");
            let op = wait_op(&b, &op_id).await;
            assert_eq!(op["state"], "cancelled", "{op}");
            // The VM keeps running on staging and keeps its writes.
            let (_, vm) = b.get("/v1/vms/vm-i").await;
            assert_eq!(vm["state"], "running", "{vm}");
            assert_eq!(vm["disks"][0]["volume"], "vm-i-vda-staging", "{vm}");
            let last = g.last_record();
            let seen = g.wait_record_after(last);
            println!("cancelled; the guest still writes (record {seen})");
            // A restart without the pause point, then the same restore.
            b.kill9();
            b.start();
            let op = run_op(&b, &path, body).await;
            assert!(
                log_of(&op).contains("runs already"),
                "the retry took the running VM over: {op}"
            );
            op
        }
    };
    assert_eq!(op["state"], "succeeded", "{op}");
    println!("instant restore took {:?}", t0.elapsed());
    let steps = op["steps"].as_array().unwrap();
    let report: Value = op["log"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|l| l["msg"].as_str().and_then(|m| m.strip_prefix("report: ")))
        .map(|r| serde_json::from_str(r).unwrap())
        .unwrap_or_else(|| panic!("no report in the log: {op}"));
    println!("report: {report}");
    assert!(
        report["boot_complete_s"].as_f64().is_some() || fault != Fault::None,
        "{report}"
    );
    assert!(report["relocated_bytes"].as_u64().is_some(), "{report}");
    let names: Vec<&str> = steps.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "stage",
            "boot",
            "profile prefetch",
            "relocate vda",
            "clean up"
        ]
    );

    // The VM now runs on the new volume; staging is gone.
    let (_, vm) = b.get("/v1/vms/vm-i").await;
    assert_eq!(vm["state"], "running", "{vm}");
    assert_eq!(vm["disks"][0]["volume"], "vm-i-vda", "{vm}");
    let (_, vols) = b.get("/v1/volumes").await;
    let names: Vec<&str> = vols
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"vm-i-vda"), "{names:?}");
    assert!(!names.iter().any(|n| n.contains("staging")), "{names:?}");
    let rec = std::fs::read_to_string(b.data().join("instant-restore.json")).unwrap();
    assert_eq!(rec.trim(), "{}", "no staging record is left");

    // The guest keeps writing on the new volume.
    let last = g.last_record();
    let acked = g.wait_record_after(last.map(|s| s + 3));
    let (s, v) = b.post("/v1/vms/vm-i/stop?timeout_s=120", json!({})).await;
    assert_eq!(s, 200, "{v}");
    let acked = g.last_record().unwrap_or(acked).max(acked);
    let after = b.dir.path().join("after.raw");
    copy_out(&b, "volume", "vm-i-vda", &after).await;
    let r = disk::verify_records_on_image(&after).unwrap();
    println!("after the restore: {r:?}; guest acknowledged up to {acked}");
    assert!(r.ok, "{r:?}");
    assert!(
        r.last_seq >= Some(acked),
        "every acknowledged record is on the new volume: {r:?}, acknowledged {acked}"
    );
    assert!(r.records > before.records, "{r:?} vs {before:?}");
    std::fs::remove_file(&after).unwrap();

    // The VM starts again from its new volume alone.
    let (s, v) = b.post("/v1/vms/vm-i/start", json!({})).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = b.post("/v1/vms/vm-i/kill", json!({})).await;
    assert_eq!(s, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instant_restore_on_another_host_keeps_every_record() {
    instant_restore(Fault::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instant_restore_resumes_after_kill9_mid_relocation() {
    instant_restore(Fault::Kill9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelled_relocation_keeps_the_vm_and_is_retried() {
    instant_restore(Fault::CancelRetry).await;
}

async fn peer_add(on: &Host, of: &Host, name: &str) {
    let (s, t) = of.get("/v1/host/peer-token").await;
    assert_eq!(s, 200, "{t}");
    let (s, p) = on
        .post(
            "/v1/peers",
            json!({ "url": of.url, "token": t["token"], "name": name }),
        )
        .await;
    assert_eq!(s, 201, "{p}");
}

/// Host A holds the repository and the staging volumes; the restored VM
/// runs on host B and is relocated into B's pool. With `Kill9`, A's ferryd
/// is killed (`kill -9`) while B's mirror runs (held at the test-only
/// pause point), then restarted; with `CancelRetry`, the restore is
/// cancelled there (the VM keeps running on B from A's staging volume,
/// which is kept), then run again.
async fn instant_restore_onto_peer(fault: Fault) {
    let mut a = Host::named("host-a");
    let mut b = Host::named("host-b");
    let _reaper = Reaper(vec![a.data(), b.data()]);
    let repo_dir = a.dir.path().join("repo");
    let (backup, before) = backed_up_guest(&a, &repo_dir).await;
    // A is restarted on the same ports: B's peer record and its QEMU's
    // NBD connection keep their addresses.
    a.pin_ports();
    let release = b.dir.path().join("release");
    let lines = if fault == Fault::None {
        None
    } else {
        b.kill9();
        let r = release.to_string_lossy().to_string();
        let lines = b.start_watched(&[
            ("FERRY_OPS_TEST_PAUSE", "backup.instant_restore:relocating"),
            ("FERRY_OPS_TEST_RELEASE", &r),
        ]);
        b.pin_ports();
        Some(lines)
    };
    peer_add(&a, &b, "host-b").await;
    let path = format!("/v1/repos/r/backups/{backup}/restore");
    let body = json!({ "name": "vm-i", "to": "host-b", "instant": true });
    // B does not know A yet: refused, nothing made.
    let (s, v) = a.post(&path, body.clone()).await;
    assert_eq!(s, 400, "{v}");
    assert!(v.to_string().contains("ferry peer add"), "{v}");
    let (s, v) = a
        .post(
            &path,
            json!({ "name": "vm-i", "to": "host-b", "instant": true, "via": "host-b" }),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    // B knows A under another name than A's own: found by A's name.
    peer_add(&b, &a, "stager").await;

    let t0 = Instant::now();
    let (s, started) = a.post(&path, body.clone()).await;
    assert_eq!(s, 202, "{started}");
    let op_id = started["operation"].as_str().unwrap().to_string();

    // The guest runs on B from A's staging volume and resumes after the
    // backed-up records.
    let mut g = console_of(&b, "vm-i").await;
    let (_, vm) = b.get("/v1/vms/vm-i").await;
    let disk0 = &vm["definition"]["disks"][0];
    assert_eq!(disk0["host"], "stager", "{vm}");
    assert_eq!(disk0["volume"], "vm-i-vda-staging", "{vm}");
    let next = g.writer_next_seq();
    println!("guest writing on host-b after {:?}", t0.elapsed());
    assert_eq!(
        Some(next),
        before.last_seq.map(|s| s + 1),
        "the restored guest resumes after the backed-up records"
    );
    let acked = g.wait_record_after(Some(next));
    println!("restored guest acknowledged record {acked}");

    let op = match fault {
        Fault::None => wait_op(&a, &op_id).await,
        Fault::Kill9 => {
            wait_line(lines.as_ref().unwrap(), "FERRY_OPS_TEST_PAUSED", 900);
            let last = g.last_record();
            let seen = g.wait_record_after(last);
            a.kill9();
            println!(
                "killed the restoring ferryd (host-a) mid-relocation (record {seen} acknowledged)"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
            a.start();
            // The guest's writes go on through A's restarted NBD server.
            let last = g.last_record();
            let seen = g.wait_record_after(last.map(|s| s + 2));
            println!("host-a restarted; the guest acknowledged record {seen}");
            std::fs::write(&release, b"go").unwrap();
            let op = wait_op(&a, &op_id).await;
            assert!(
                log_of(&op).contains("recovered after restart"),
                "the restore resumed after the restart: {op}"
            );
            op
        }
        Fault::CancelRetry => {
            wait_line(lines.as_ref().unwrap(), "FERRY_OPS_TEST_PAUSED", 900);
            let (s, v) = a
                .post(&format!("/v1/operations/{op_id}/cancel"), json!({}))
                .await;
            assert!(s == 200 || s == 202, "{v}");
            let op = wait_op(&a, &op_id).await;
            assert_eq!(op["state"], "cancelled", "{op}");
            // The VM keeps running on B from A's staging volume, kept.
            let (_, vm) = b.get("/v1/vms/vm-i").await;
            assert_eq!(vm["state"], "running", "{vm}");
            assert_eq!(vm["definition"]["disks"][0]["host"], "stager", "{vm}");
            let (s, v) = a.get("/v1/volumes/vm-i-vda-staging").await;
            assert_eq!(s, 200, "the staging volume is kept: {v}");
            let last = g.last_record();
            let seen = g.wait_record_after(last);
            println!("cancelled; the guest still writes (record {seen})");
            // B restarted without the pause point; the same restore again.
            b.kill9();
            b.start();
            let op = run_op(&a, &path, body).await;
            assert!(
                log_of(&op).contains("runs already"),
                "the retry took the running VM over: {op}"
            );
            op
        }
    };
    assert_eq!(op["state"], "succeeded", "{op}");
    println!("instant restore onto host-b took {:?}", t0.elapsed());
    let report: Value = op["log"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|l| l["msg"].as_str().and_then(|m| m.strip_prefix("report: ")))
        .map(|r| serde_json::from_str(r).unwrap())
        .unwrap_or_else(|| panic!("no report in the log: {op}"));
    println!("report: {report}");
    assert_eq!(report["host"], "host-b", "{report}");
    assert!(report["relocated_bytes"].as_u64().is_some(), "{report}");
    let names: Vec<&str> = op["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "stage",
            "boot",
            "profile prefetch",
            "relocate vda",
            "clean up"
        ]
    );

    // The VM runs on B's own volume; nothing of the restore is left on A.
    let (_, vm) = b.get("/v1/vms/vm-i").await;
    assert_eq!(vm["state"], "running", "{vm}");
    assert_eq!(vm["disks"][0]["volume"], "vm-i-vda", "{vm}");
    assert!(
        vm["definition"]["disks"][0]["host"].is_null(),
        "the disk is a volume of host-b's pool: {vm}"
    );
    let (_, vols) = b.get("/v1/volumes").await;
    assert!(
        vols.as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "vm-i-vda"),
        "{vols}"
    );
    let (_, vols) = a.get("/v1/volumes").await;
    let left: Vec<&str> = vols
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .filter(|n| n.starts_with("vm-i"))
        .collect();
    assert!(left.is_empty(), "volumes left on host-a: {left:?}");
    let (_, exports) = a.get("/v1/exports").await;
    assert!(
        !exports.to_string().contains("vm-i-vda-staging"),
        "exports left on host-a: {exports}"
    );
    let rec = std::fs::read_to_string(a.data().join("instant-restore.json")).unwrap();
    assert_eq!(rec.trim(), "{}", "no staging record is left");

    // The guest keeps writing on B's volume; every record verifies there.
    let last = g.last_record();
    let acked = g.wait_record_after(last.map(|s| s + 3));
    let (s, v) = b.post("/v1/vms/vm-i/stop?timeout_s=120", json!({})).await;
    assert_eq!(s, 200, "{v}");
    let acked = g.last_record().unwrap_or(acked).max(acked);
    let after = b.dir.path().join("after.raw");
    copy_out(&b, "volume", "vm-i-vda", &after).await;
    let r = disk::verify_records_on_image(&after).unwrap();
    println!("after the restore: {r:?}; guest acknowledged up to {acked}");
    assert!(r.ok, "{r:?}");
    assert!(
        r.last_seq >= Some(acked),
        "every acknowledged record is on host-b's volume: {r:?}, acknowledged {acked}"
    );
    assert!(r.records > before.records, "{r:?} vs {before:?}");
    std::fs::remove_file(&after).unwrap();

    // The VM starts again on B from its volume alone, A gone.
    a.kill9();
    let (s, v) = b.post("/v1/vms/vm-i/start", json!({})).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = b.post("/v1/vms/vm-i/kill", json!({})).await;
    assert_eq!(s, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instant_restore_onto_another_host() {
    instant_restore_onto_peer(Fault::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restoring_ferryd_killed_mid_relocation_onto_another_host() {
    instant_restore_onto_peer(Fault::Kill9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelled_restore_onto_another_host_keeps_the_vm_and_is_retried() {
    instant_restore_onto_peer(Fault::CancelRetry).await;
}
