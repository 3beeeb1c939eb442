//! VMs managed by a real `ferryd`: QEMU under TCG booting the test-kit
//! guest with its data disk on a pool volume served by ferryd's NBD socket.
//! Life cycle (define, start, pause, resume, stop, kill, delete), re-attach
//! after `kill -9` and after a clean shutdown of ferryd, crash detection,
//! and bad input.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::Host;
use ferry_testkit::console::Console;
use ferry_testkit::{Disk, GuestConfig, GuestImage, NbdServer, Workload, disk};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(120);

/// Kills, on drop, every QEMU whose command line names this data
/// directory: a failing test must not leave VMs behind (ferryd itself
/// never kills them).
struct Reaper(PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in qemus_of(&self.0) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

fn qemus_of(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("qemu-system") && cmd.contains(&needle) {
            out.push(pid);
        }
    }
    out
}

fn alive(pid: u64) -> bool {
    // A zombie has an empty command line.
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
}

/// A kernel-boot definition of the test-kit guest.
async fn definition(name: &str, volume: Option<&str>, workload: Workload) -> Value {
    let image = GuestImage::get().await.unwrap();
    let mut cfg = GuestConfig::new(name);
    cfg.workload = workload;
    if let Some(v) = volume {
        // Only to make the kit mount /dev/vda; ferryd supplies the disk.
        cfg.disks.push(Disk::Nbd {
            server: NbdServer::Unix("/unused".into()),
            export: v.into(),
        });
    }
    json!({
        "name": name,
        "vcpus": 1,
        "memory_mib": 256,
        "disks": volume.map_or(vec![], |v| vec![v]),
        "boot": {
            "kind": "kernel",
            "kernel": image.kernel(),
            "initrd": image.initramfs(),
            "cmdline": cfg.kernel_cmdline(),
        },
        "guest_agent": true,
        "accel": "tcg",
    })
}

/// Reads the serial log until an event satisfies `pred`.
fn wait_event(
    c: &mut Console,
    what: &str,
    mut pred: impl FnMut(&ferry_guest::event::Event) -> bool,
) -> ferry_guest::event::Event {
    let deadline = Instant::now() + T;
    loop {
        c.poll().unwrap();
        if let Some(i) = c.find(0, &mut pred) {
            return c.events()[i].clone();
        }
        if let Some(f) = c.fatal() {
            panic!("guest failed waiting for {what}: {f}\n{}", c.tail(30));
        }
        assert!(
            Instant::now() < deadline,
            "no {what} on the console: {}",
            c.tail(30)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The highest record sequence number the guest reported (records are
/// reported after their fsync).
fn last_record(c: &mut Console) -> Option<u64> {
    c.poll().unwrap();
    c.events()
        .iter()
        .filter(|e| e.name == "record")
        .filter_map(|e| e.u64("seq"))
        .max()
}

fn wait_record_after(c: &mut Console, seq: Option<u64>) -> u64 {
    let ev = wait_event(c, "a new record", |e| {
        e.name == "record" && e.u64("seq").is_some_and(|s| seq.is_none_or(|q| s > q))
    });
    ev.u64("seq").unwrap()
}

async fn wait_state(h: &Host, vm: &str, state: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (s, v) = h.get(&format!("/v1/vms/{vm}")).await;
        assert_eq!(s, 200, "{v}");
        if v["state"] == state {
            return v;
        }
        assert!(Instant::now() < deadline, "VM {vm} never {state}: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn vm_on_a_pool_volume_survives_a_ferryd_kill9() {
    let mut h = Host::new();
    let _reaper = Reaper(h.data());
    let raw = h.dir.path().join("data.raw");
    disk::make_ext4_disk(&raw, 64 << 20).unwrap();
    let (s, started) = h
        .post("/v1/volumes/data/import", json!({ "path": raw }))
        .await;
    assert_eq!(s, 202, "{started}");
    let op = h.wait_op(started["operation"].as_str().unwrap()).await;
    assert_eq!(op["state"], "succeeded", "{op}");

    let def = definition("vm1", Some("data"), Workload::records(20.0)).await;
    let (s, v) = h.post("/v1/vms", def).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["state"], "defined");
    let uuid = v["uuid"].as_str().unwrap().to_string();
    let export = v["disks"][0]["export"].as_str().unwrap().to_string();
    assert_eq!(export, format!("vm.{uuid}.vda"));
    let (s, e) = h.get(&format!("/v1/exports/{export}")).await;
    assert_eq!(s, 200, "{e}");
    assert_eq!(e["volume"], "data");

    // The volume is in use by a defined VM.
    let (s, e) = h.delete("/v1/volumes/data").await;
    assert_eq!(s, 409, "{e}");
    assert!(e["error"].as_str().unwrap().contains("vm1"), "{e}");

    let (s, v) = h.post("/v1/vms/vm1/start", json!({})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["state"], "running", "{v}");
    let pid = v["pid"].as_u64().unwrap();
    let started_at = Instant::now();
    let mut console = Console::new(Path::new(v["serial_log"].as_str().unwrap()));
    wait_event(&mut console, "ready", |e| e.name == "ready");
    println!("vm1 ready {:?} after start", started_at.elapsed());
    let first = wait_record_after(&mut console, None);
    println!("vm1 first record {:?} after start", started_at.elapsed());

    let (s, e) = h.post("/v1/vms/vm1/start", json!({})).await;
    assert_eq!(s, 409, "{e}");
    let (s, e) = h.delete(&format!("/v1/vms/{uuid}")).await;
    assert_eq!(s, 409, "deleting a running VM: {e}");

    // Pause: QEMU says paused and the guest writes nothing.
    let (s, v) = h.post("/v1/vms/vm1/pause", json!({})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["state"], "paused", "{v}");
    assert_eq!(v["qmp_status"], "paused", "{v}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let at_pause = last_record(&mut console);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(last_record(&mut console), at_pause, "records while paused");
    let (s, v) = h.post("/v1/vms/vm1/resume", json!({})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["qmp_status"], "running", "{v}");
    let after_resume = wait_record_after(&mut console, at_pause);
    assert!(after_resume >= first);

    // kill -9 ferryd: QEMU keeps running; the restarted ferryd re-attaches
    // to the same process and the guest keeps writing through the new NBD
    // server.
    h.kill9();
    assert!(alive(pid), "QEMU died with ferryd");
    let before_restart = last_record(&mut console);
    let restarted_at = Instant::now();
    h.start();
    let (s, v) = h.get("/v1/vms/vm1").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["pid"].as_u64(), Some(pid), "{v}");
    assert!(v["note"].as_str().unwrap().contains("re-attached"), "{v}");
    let mut seq = wait_record_after(&mut console, before_restart);
    println!(
        "vm1 wrote record {seq} {:?} after ferryd restarted (last before: {before_restart:?})",
        restarted_at.elapsed()
    );
    for _ in 0..5 {
        seq = wait_record_after(&mut console, Some(seq));
    }

    let (s, st) = h.post("/v1/vms/vm1/stop?timeout_s=60", json!({})).await;
    assert_eq!(s, 200, "{st}");
    println!("vm1 stop outcome: {}", st["outcome"]);
    assert!(
        ["guest_agent", "acpi"].contains(&st["outcome"].as_str().unwrap()),
        "{st}"
    );
    assert_eq!(st["vm"]["state"], "stopped", "{st}");
    assert!(st["vm"]["pid"].is_null(), "{st}");
    assert!(!alive(pid));
    let acked = last_record(&mut console).unwrap();

    // Every acknowledged record is on the volume.
    let (s, _) = h
        .post(
            "/v1/snapshots",
            json!({ "name": "after", "volumes": ["data"] }),
        )
        .await;
    assert_eq!(s, 201);
    let (s, e) = h.post("/v1/exports", json!({ "snapshot": "after" })).await;
    assert_eq!(s, 201, "{e}");
    let copy = h.dir.path().join("copy.raw");
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(e["unix_uri"].as_str().unwrap())
        .arg(&copy)
        .status()
        .unwrap();
    assert!(st.success());
    let report = disk::verify_records_on_image(&copy).unwrap();
    assert!(report.ok, "{report:?}");
    assert!(
        report.records > acked,
        "{report:?}: record {acked} was acknowledged"
    );
    println!(
        "{} records on the volume, last acknowledged seq {acked}",
        report.records
    );

    // Delete: the VM and its internal export go, the volume stays.
    let (s, e) = h.delete("/v1/vms/vm1").await;
    assert_eq!(s, 204, "{e}");
    let (s, _) = h.get("/v1/vms/vm1").await;
    assert_eq!(s, 404);
    let (_, exports) = h.get("/v1/exports").await;
    assert!(
        exports
            .as_array()
            .unwrap()
            .iter()
            .all(|e| !e["name"].as_str().unwrap().starts_with("vm.")),
        "{exports}"
    );
    let (s, v) = h.get("/v1/volumes/data").await;
    assert_eq!(s, 200, "{v}");
    assert!(!h.data().join(format!("run/vms/{uuid}")).exists());
}

#[tokio::test]
async fn vms_are_left_running_by_a_clean_shutdown_and_crashes_are_seen() {
    let mut h = Host::new();
    let _reaper = Reaper(h.data());
    let def = definition("idle", None, Workload::Idle).await;
    let (s, v) = h.post("/v1/vms", def).await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = h.post("/v1/vms/idle/start", json!({})).await;
    assert_eq!(s, 200, "{v}");
    let pid = v["pid"].as_u64().unwrap();
    let mut console = Console::new(Path::new(v["serial_log"].as_str().unwrap()));
    wait_event(&mut console, "ready", |e| e.name == "ready");

    // SIGTERM: ferryd stops cleanly, the VM does not.
    h.terminate();
    assert!(alive(pid), "a clean ferryd shutdown killed the VM");
    h.start();
    let v = wait_state(&h, "idle", "running").await;
    assert_eq!(v["pid"].as_u64(), Some(pid), "{v}");

    // kill on request.
    let (s, v) = h.post("/v1/vms/idle/kill", json!({})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["state"], "stopped", "{v}");
    assert!(!alive(pid));

    // QEMU dies while ferryd is down: crashed after the restart.
    let (s, v) = h.post("/v1/vms/idle/start", json!({})).await;
    assert_eq!(s, 200, "{v}");
    let pid = v["pid"].as_u64().unwrap();
    h.kill9();
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    h.start();
    let v = wait_state(&h, "idle", "crashed").await;
    assert!(
        v["note"]
            .as_str()
            .unwrap()
            .contains("while ferryd was not running"),
        "{v}"
    );
    assert!(v["pid"].is_null(), "{v}");

    // QEMU dies while ferryd runs: the watcher sees it crash.
    let (s, v) = h.post("/v1/vms/idle/start", json!({})).await;
    assert_eq!(s, 200, "{v}");
    let pid = v["pid"].as_u64().unwrap();
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    let v = wait_state(&h, "idle", "crashed").await;
    assert!(v["note"].as_str().unwrap().contains("unexpectedly"), "{v}");

    let (s, e) = h.delete("/v1/vms/idle").await;
    assert_eq!(s, 204, "{e}");
    assert!(qemus_of(&h.data()).is_empty());
}

#[tokio::test]
async fn bad_vm_definitions_and_unknown_vms() {
    let mut h = Host::new();
    // Any existing file passes as a kernel for definition checks.
    let exe = std::env::current_exe().unwrap();
    let good = json!({
        "name": "a",
        "disks": ["v1"],
        "boot": { "kind": "kernel", "kernel": exe },
        "accel": "tcg",
    });
    let with = |k: &str, v: Value| {
        let mut d = good.clone();
        d[k] = v;
        d
    };
    let cases = [
        (with("name", json!("bad name")), "name"),
        (
            with("name", json!("6f1c1a3e-5b7e-4d43-9d1a-2f6e1b1f0a01")),
            "name",
        ),
        (with("vcpus", json!(0)), "vcpus"),
        (with("memory_mib", json!(1)), "memory_mib"),
        (with("accel", json!("warp")), "accel"),
        (with("uuid", json!("not-a-uuid")), "uuid"),
        (
            with(
                "boot",
                json!({"kind": "kernel", "kernel": "/nonexistent/k"}),
            ),
            "boot.kernel",
        ),
        (
            with("boot", json!({"kind": "kernel", "kernel": "relative/k"})),
            "boot.kernel",
        ),
        (
            with("disks", json!([{"volume": "v1", "file": "/x"}])),
            "disks[0]",
        ),
        (with("vcpus", json!("two")), "vcpus"),
    ];
    for (body, field) in cases {
        let (s, e) = h.post("/v1/vms", body.clone()).await;
        assert_eq!(s, 400, "{body} -> {e}");
        assert_eq!(e["field"], field, "{body} -> {e}");
    }
    let mut no_boot = good.clone();
    no_boot.as_object_mut().unwrap().remove("boot");
    let (s, e) = h.post("/v1/vms", no_boot).await;
    assert_eq!(s, 400, "{e}");
    assert_eq!(e["field"], "boot", "{e}");

    // Unknown volume: 404 naming it.
    let (s, e) = h.post("/v1/vms", good.clone()).await;
    assert_eq!(s, 404, "{e}");
    assert!(e["error"].as_str().unwrap().contains("v1"), "{e}");

    let (s, _) = h
        .post("/v1/volumes", json!({"name": "v1", "size": 1 << 20}))
        .await;
    assert_eq!(s, 201);
    let (s, v) = h.post("/v1/vms", good.clone()).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["definition"]["vcpus"], 1);
    assert_eq!(v["definition"]["memory_mib"], 256);
    let uuid = v["uuid"].as_str().unwrap().to_string();
    let (s, e) = h.post("/v1/vms", good.clone()).await;
    assert_eq!(s, 409, "duplicate name: {e}");
    let (s, e) = h.post("/v1/vms", with("name", json!("b"))).await;
    assert_eq!(s, 409, "volume of another VM: {e}");
    assert!(e["error"].as_str().unwrap().contains("VM a"), "{e}");
    let (s, e) = h.delete("/v1/volumes/v1").await;
    assert_eq!(s, 409, "{e}");
    assert!(e["error"].as_str().unwrap().contains("VM a"), "{e}");

    for (m, p) in [
        ("GET", "/v1/vms/nosuch"),
        ("DELETE", "/v1/vms/nosuch"),
        ("POST", "/v1/vms/nosuch/start"),
        ("POST", "/v1/vms/nosuch/stop"),
        ("POST", "/v1/vms/nosuch/pause"),
        ("POST", "/v1/vms/nosuch/resume"),
        ("POST", "/v1/vms/nosuch/kill"),
    ] {
        let (s, e) = common::send(h.req(m.parse().unwrap(), p).json(&json!({}))).await;
        assert_eq!(s, 404, "{m} {p}: {e}");
        assert!(e["error"].as_str().unwrap().contains("nosuch"), "{e}");
    }
    for verb in ["stop", "pause", "resume", "kill"] {
        let (s, e) = h.post(&format!("/v1/vms/a/{verb}"), json!({})).await;
        assert_eq!(s, 409, "{verb} of a VM that does not run: {e}");
    }

    // Definitions are durable; lookup by name or uuid.
    h.kill9();
    h.start();
    let (s, v) = h.get(&format!("/v1/vms/{uuid}")).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["name"], "a");
    assert_eq!(v["state"], "defined");
    let (s, list) = h.get("/v1/vms").await;
    assert_eq!(s, 200);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");

    let (s, e) = h.delete("/v1/vms/a").await;
    assert_eq!(s, 204, "{e}");
    let (s, e) = h.delete("/v1/volumes/v1").await;
    assert_eq!(s, 204, "the volume is free again: {e}");
}
