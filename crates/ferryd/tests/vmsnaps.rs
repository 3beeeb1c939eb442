//! Group snapshots of running VMs (issue 7) against a real `ferryd` and
//! real QEMU guests (TCG) writing verifiable records to ext4 on pool
//! volumes: both modes while the guests write, e2fsck of every snapshot,
//! records on clones, only the target volumes snapshotted, revert, delete;
//! and the faults: no agent, an agent that does not answer, a QMP error,
//! `kill -9` of ferryd while a guest is frozen and during the merge.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::Host;
use ferry_testkit::console::Console;
use ferry_testkit::{Disk, GuestConfig, GuestImage, NbdServer, Workload, disk};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(180);

/// Kills, on drop, every QEMU whose command line names this data directory.
struct Reaper(PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            if cmd.contains("qemu-system") && cmd.contains(&*self.0.to_string_lossy()) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
    }
}

/// A running test-kit guest defined in ferryd, with its console.
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

    /// Waits for a record newer than the newest seen now.
    fn wait_new_record(&mut self) -> u64 {
        let seq = self.last_record();
        self.wait_record_after(seq)
    }

    /// Waits for a record newer than `seq`: the guest's file system is not
    /// frozen and its disk writes go through.
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
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

async fn import_ext4(h: &Host, volume: &str) {
    let raw = h.dir.path().join(format!("{volume}.raw"));
    disk::make_ext4_disk(&raw, 64 << 20).unwrap();
    let (s, started) = h
        .post(
            &format!("/v1/volumes/{volume}/import"),
            json!({ "path": raw }),
        )
        .await;
    assert_eq!(s, 202, "{started}");
    let op = h.wait_op(started["operation"].as_str().unwrap()).await;
    assert_eq!(op["state"], "succeeded", "{op}");
    std::fs::remove_file(&raw).unwrap();
}

/// Defines and starts a test-kit guest writing records at `rate` on
/// `volume`; waits for its first record.
async fn start_guest(h: &Host, name: &str, volume: &str, agent: bool, rate: f64) -> Guest {
    start_guest_with(h, name, volume, agent, rate, &[]).await
}

/// [`start_guest`] with extra kernel command-line arguments for the kit's
/// init (e.g. `ferry.freeze_hook_sleep=S`).
async fn start_guest_with(
    h: &Host,
    name: &str,
    volume: &str,
    agent: bool,
    rate: f64,
    cmdline: &[&str],
) -> Guest {
    import_ext4(h, volume).await;
    start_guest_on(h, name, json!([volume]), agent, rate, cmdline).await
}

/// Defines and starts a test-kit guest on `disks` (as the API takes them;
/// the first one holds the records); waits for its first record.
async fn start_guest_on(
    h: &Host,
    name: &str,
    disks: Value,
    agent: bool,
    rate: f64,
    cmdline: &[&str],
) -> Guest {
    let image = GuestImage::get().await.unwrap();
    let mut cfg = GuestConfig::new(name);
    cfg.workload = Workload::records(rate);
    cfg.cmdline = cmdline.iter().map(|a| a.to_string()).collect();
    // Only to make the kit mount /dev/vda; ferryd supplies the disk.
    cfg.disks.push(Disk::Nbd {
        server: NbdServer::Unix("/unused".into()),
        export: "unused".into(),
    });
    let def = json!({
        "name": name,
        "vcpus": 1,
        "memory_mib": 256,
        "disks": disks,
        "boot": {
            "kind": "kernel",
            "kernel": image.kernel(),
            "initrd": image.initramfs(),
            "cmdline": cfg.kernel_cmdline(),
        },
        "guest_agent": agent,
        "accel": "tcg",
    });
    let (s, v) = h.post("/v1/vms", def).await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = h.post(&format!("/v1/vms/{name}/start"), json!({})).await;
    assert_eq!(s, 200, "{v}");
    let mut g = Guest {
        name: name.into(),
        console: Console::new(Path::new(v["serial_log"].as_str().unwrap())),
    };
    let t0 = Instant::now();
    g.wait_record_after(None);
    println!("{name}: first record {:?} after start", t0.elapsed());
    g
}

/// Takes a group snapshot and waits for the operation.
async fn snapshot(h: &Host, body: Value) -> Value {
    let (s, started) = h.post("/v1/vm-snapshots", body).await;
    assert_eq!(s, 202, "{started}");
    wait_op(h, started["operation"].as_str().unwrap()).await
}

async fn wait_op(h: &Host, id: &str) -> Value {
    let deadline = Instant::now() + T;
    loop {
        let (s, op) = h.get(&format!("/v1/operations/{id}")).await;
        assert_eq!(s, 200, "{op}");
        let state = op["state"].as_str().unwrap();
        if ["succeeded", "failed", "cancelled"].contains(&state) {
            return op;
        }
        assert!(Instant::now() < deadline, "operation {id} still {state}");
        tokio::time::sleep(Duration::from_millis(100)).await;
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

/// Every file left under `<data>/overlays`.
fn overlay_files(h: &Host) -> Vec<PathBuf> {
    fn walk(p: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(rd) = std::fs::read_dir(p) {
            for e in rd.flatten() {
                if e.path().is_dir() {
                    walk(&e.path(), out);
                } else {
                    out.push(e.path());
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(&h.data().join("overlays"), &mut out);
    out
}

/// Reads a pool snapshot (or volume) through a read-only ferryd export
/// into a raw file.
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

/// `e2fsck -fn`: (exit code, output).
fn e2fsck(image: &Path) -> (i32, String) {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(image)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// Checks one VM's snapshot: clean ext4 (without journal recovery when
/// quiesced), and every record acknowledged before the operation started.
async fn check_snapshot(h: &Host, group: &Value, vm: &str, acked_before: u64) -> PathBuf {
    let v = group["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == vm)
        .unwrap_or_else(|| panic!("{vm} not in {group}"));
    let snap = v["disks"][0]["snapshot"].as_str().unwrap();
    let img = h.dir.path().join(format!("{snap}.raw"));
    copy_out(h, "snapshot", snap, &img).await;
    let (code, text) = e2fsck(&img);
    println!("{snap}: {} e2fsck -fn exit {code}", v["consistency"]);
    if v["consistency"] == "quiesced" {
        assert_eq!(
            code, 0,
            "{snap}: e2fsck -fn of a quiesced snapshot:\n{text}"
        );
        assert!(
            !text.to_lowercase().contains("recovery"),
            "{snap} needs journal recovery:\n{text}"
        );
    }
    let report = disk::verify_records_on_image(&img).unwrap();
    assert!(report.ok, "{snap}: {report:?}");
    assert!(
        report.records > acked_before,
        "{snap}: {report:?}; record {acked_before} was acknowledged before the snapshot"
    );
    println!(
        "{snap}: {} records (record {acked_before} acknowledged before the operation)",
        report.records
    );
    img
}

#[tokio::test]
async fn group_snapshots_of_writing_guests_in_both_modes() {
    let h = Host::new();
    let _reaper = Reaper(h.data());
    let mut a = start_guest(&h, "vm-a", "disk-a", true, 20.0).await;
    let mut b = start_guest(&h, "vm-b", "disk-b", true, 20.0).await;
    // A volume of the same pool that is no VM's disk.
    let (s, v) = h
        .post(
            "/v1/volumes",
            json!({"name": "bystander", "size": 16 << 20}),
        )
        .await;
    assert_eq!(s, 201, "{v}");

    for mode in ["overlay", "direct"] {
        let before_a = a.wait_new_record();
        let before_b = b.wait_new_record();
        let t0 = Instant::now();
        let op = snapshot(
            &h,
            json!({"vms": ["vm-a", "vm-b"], "name": mode, "mode": mode}),
        )
        .await;
        println!("{mode}: operation took {:?}", t0.elapsed());
        let log = log_of(&op);
        println!("{log}");
        assert_eq!(op["state"], "succeeded", "{op}");
        assert!(overlay_files(&h).is_empty(), "{:?}", overlay_files(&h));
        // Both guests keep writing: thawed, disks back on their volumes.
        a.wait_new_record();
        b.wait_new_record();

        let (s, g) = h.get(&format!("/v1/vm-snapshots/{mode}")).await;
        assert_eq!(s, 200, "{g}");
        println!("{g}");
        assert_eq!(g["mode"], mode);
        for v in g["vms"].as_array().unwrap() {
            assert_eq!(v["consistency"], "quiesced", "{v}");
            assert!(v["frozen_ms"].as_f64().unwrap() > 0.0, "{v}");
            let d = &v["disks"][0];
            assert_eq!(d["host"], "test-host");
            assert_eq!(d["pool"], "local");
            assert_eq!(
                d["snapshot"],
                format!("{mode}.{}.vda", v["name"].as_str().unwrap())
            );
        }
        check_snapshot(&h, &g, "vm-a", before_a).await;
        check_snapshot(&h, &g, "vm-b", before_b).await;
    }

    // Only the target volumes got snapshots.
    let (s, snaps) = h.get("/v1/snapshots").await;
    assert_eq!(s, 200);
    let snaps = snaps.as_array().unwrap();
    assert_eq!(snaps.len(), 4, "{snaps:?}");
    for sn in snaps {
        assert!(
            ["disk-a", "disk-b"].contains(&sn["volume"].as_str().unwrap()),
            "{sn}"
        );
    }
    let (s, list) = h.get("/v1/vm-snapshots").await;
    assert_eq!(s, 200);
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");

    // Clone vm-a from the overlay-mode group: its records are those of the
    // snapshot.
    let (s, c) = h
        .post(
            "/v1/vm-snapshots/overlay/clone",
            json!({"vm": "vm-a", "name": "vm-a-copy"}),
        )
        .await;
    assert_eq!(s, 201, "{c}");
    assert_eq!(c["state"], "defined", "{c}");
    assert_eq!(c["disks"][0]["volume"], "vm-a-copy-vda", "{c}");
    let (s, g) = h.get("/v1/vm-snapshots/overlay").await;
    assert_eq!(s, 200);
    let snap_img = h.dir.path().join("overlay.vm-a.vda.raw");
    let clone_img = h.dir.path().join("clone.raw");
    copy_out(&h, "volume", "vm-a-copy-vda", &clone_img).await;
    let r1 = disk::verify_records_on_image(&snap_img).unwrap();
    let r2 = disk::verify_records_on_image(&clone_img).unwrap();
    assert!(r2.ok, "{r2:?}");
    assert_eq!(r1.records, r2.records, "clone {r2:?} vs snapshot {r1:?}");
    // A clone holds a snapshot: the group cannot be deleted under it.
    let (s, e) = h.delete("/v1/vm-snapshots/overlay").await;
    assert_eq!(s, 409, "{e}");
    println!("{}", g["name"]);

    // Revert: a running VM is refused; a stopped one gets the group's
    // content back.
    let (s, e) = h
        .post("/v1/vm-snapshots/direct/revert", json!({"vms": ["vm-b"]}))
        .await;
    assert_eq!(s, 409, "{e}");
    let (s, st) = h.post("/v1/vms/vm-b/stop?timeout_s=60", json!({})).await;
    assert_eq!(s, 200, "{st}");
    let (s, r) = h
        .post("/v1/vm-snapshots/direct/revert", json!({"vms": ["vm-b"]}))
        .await;
    assert_eq!(s, 200, "{r}");
    println!("revert: {r}");
    assert!(r[0]["bytes"].as_u64().unwrap() > 0, "{r}");
    let (s, v) = h
        .post(
            "/v1/snapshots",
            json!({"name": "reverted", "volumes": ["disk-b"]}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let reverted = h.dir.path().join("reverted.raw");
    copy_out(&h, "snapshot", "reverted", &reverted).await;
    let group_img = h.dir.path().join("direct.vm-b.vda.raw");
    assert!(
        std::fs::read(&reverted).unwrap() == std::fs::read(&group_img).unwrap(),
        "the reverted volume differs from the group's snapshot"
    );

    // Delete: the group's pool snapshots go with it.
    let (s, e) = h.delete("/v1/vm-snapshots/direct").await;
    assert_eq!(s, 204, "{e}");
    let (s, e) = h.get("/v1/vm-snapshots/direct").await;
    assert_eq!(s, 404, "{e}");
    let (_, snaps) = h.get("/v1/snapshots").await;
    assert!(
        snaps
            .as_array()
            .unwrap()
            .iter()
            .all(|s| !s["name"].as_str().unwrap().starts_with("direct.")),
        "{snaps}"
    );

    // Bad input.
    let (s, e) = h.post("/v1/vm-snapshots", json!({"vms": []})).await;
    assert_eq!(s, 400, "{e}");
    let (s, e) = h.post("/v1/vm-snapshots", json!({"vms": ["nope"]})).await;
    assert_eq!(s, 404, "{e}");
    let (s, e) = h
        .post("/v1/vm-snapshots", json!({"vms": ["vm-b"], "name": "x1"}))
        .await;
    assert_eq!(s, 409, "a stopped VM: {e}");
    let (s, e) = h
        .post(
            "/v1/vm-snapshots",
            json!({"vms": ["vm-a"], "name": "overlay"}),
        )
        .await;
    assert_eq!(s, 409, "an existing name: {e}");
    let (s, e) = h
        .post("/v1/vm-snapshots", json!({"vms": ["vm-a"], "name": "a.b"}))
        .await;
    assert_eq!(s, 400, "{e}");
}

/// An agent stuck *inside* the freeze: the guest's fsfreeze hook (run by
/// the real qemu-ga before it freezes) sleeps longer than Ferry waits for
/// a freeze. The snapshot goes on crash-consistent and says why, a thaw is
/// sent, and once the hook returns and the agent has frozen the file
/// system, that queued thaw runs: the guest writes on. Both modes.
#[tokio::test]
async fn an_agent_stuck_inside_the_freeze_ends_thawed() {
    let h = Host::new();
    let _reaper = Reaper(h.data());
    let hook = (vmsnap_agent_timeout() + Duration::from_secs(4)).as_secs();
    let arg = format!("ferry.freeze_hook_sleep={hook}");
    let mut a = start_guest_with(&h, "vm-a", "disk-a", true, 20.0, &[&arg]).await;
    for mode in ["overlay", "direct"] {
        let name = format!("hook-{mode}");
        let acked = a.wait_new_record();
        let hooks_done = hook_events(&mut a, "done");
        let t0 = Instant::now();
        let op = snapshot(&h, json!({"vms": ["vm-a"], "name": name, "mode": mode})).await;
        println!("{mode}: operation took {:?}\n{}", t0.elapsed(), log_of(&op));
        assert_eq!(op["state"], "succeeded", "{op}");
        let (_, g) = h.get(&format!("/v1/vm-snapshots/{name}")).await;
        let v = &g["vms"][0];
        assert_eq!(v["consistency"], "crash_consistent", "{g}");
        let note = v["note"].as_str().unwrap_or_default();
        assert!(note.contains("freeze"), "{g}");
        assert!(overlay_files(&h).is_empty(), "{:?}", overlay_files(&h));
        check_snapshot(&h, &g, "vm-a", acked).await;
        // The hook returns, the agent freezes, then runs the queued thaw.
        let deadline = Instant::now() + T;
        while hook_events(&mut a, "done") == hooks_done {
            assert!(Instant::now() < deadline, "{}", a.console.tail(30));
            std::thread::sleep(Duration::from_millis(200));
        }
        std::thread::sleep(Duration::from_secs(2));
        let seq = a.last_record();
        let after = a.wait_record_after(seq);
        println!("{mode}: record {after} written after the late freeze: thawed");
    }
}

/// How long ferryd waits for a freeze (groupsnap's `AGENT_TIMEOUT`).
fn vmsnap_agent_timeout() -> Duration {
    ferryd::groupsnap::AGENT_TIMEOUT
}

/// How many `freeze-hook` events with this state the guest printed.
fn hook_events(g: &mut Guest, state: &str) -> usize {
    g.console.poll().unwrap();
    g.console
        .events()
        .iter()
        .filter(|e| e.name == "freeze-hook" && e.str("state") == Some(state))
        .count()
}

/// Waits until `g` writes no record for `quiet`: its file system is frozen.
fn wait_frozen(g: &mut Guest, quiet: Duration) {
    let deadline = Instant::now() + T;
    let mut last = g.last_record();
    let mut since = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = g.last_record();
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} never stopped writing",
            g.name
        );
    }
}

/// A VM of host A whose record disk is a volume in host B's pool (served
/// over NBD/TCP by B) and whose second disk is in A's pool: a group
/// snapshot in each mode snapshots exactly those two volumes, each in its
/// own pool, and nothing else on B; the snapshot on B is clean and holds
/// the records; clone, revert and delete reach B; deleting the VM removes
/// its export on B.
#[tokio::test]
async fn disks_in_another_hosts_pool() {
    let a = Host::named("host-a");
    let b = Host::named("host-b");
    let _reapers = (Reaper(a.data()), Reaper(b.data()));
    let (s, t) = b.get("/v1/host/peer-token").await;
    assert_eq!(s, 200, "{t}");
    let (s, p) = a
        .post("/v1/peers", json!({ "url": b.url, "token": t["token"] }))
        .await;
    assert_eq!(s, 201, "{p}");
    import_ext4(&b, "disk-r").await;
    import_ext4(&b, "other-b").await;
    import_ext4(&a, "disk-l").await;

    // A remote disk naming a volume the peer does not have: 404, nothing defined.
    let (s, e) = a
        .post(
            "/v1/vms",
            json!({"name": "bad", "disks": [{"host": "host-b", "volume": "nope"}],
                   "boot": {"kind": "kernel", "kernel": "/bin/sh"}}),
        )
        .await;
    assert_eq!(s, 404, "{e}");
    let disks = json!([{"host": "host-b", "volume": "disk-r"}, "disk-l"]);
    let mut g = start_guest_on(&a, "vm-r", disks, true, 20.0, &[]).await;
    let (_, info) = a.get("/v1/vms/vm-r").await;
    assert_eq!(info["disks"][0]["host"], "host-b", "{info}");
    let export = info["disks"][0]["export"].as_str().unwrap().to_string();
    let (s, e) = b.get(&format!("/v1/exports/{export}")).await;
    assert_eq!((s, &e["volume"]), (200, &json!("disk-r")), "{e}");

    for mode in ["overlay", "direct"] {
        let name = format!("remote-{mode}");
        let acked = g.wait_new_record();
        let op = snapshot(&a, json!({"vms": ["vm-r"], "name": name, "mode": mode})).await;
        let log = log_of(&op);
        println!("{mode}:\n{log}");
        assert_eq!(op["state"], "succeeded", "{op}");
        assert!(log.contains("vda → (host-b, local, disk-r)"), "{log}");
        let (_, grp) = a.get(&format!("/v1/vm-snapshots/{name}")).await;
        let d = &grp["vms"][0]["disks"];
        assert_eq!(
            (&d[0]["host"], &d[1]["host"]),
            (&json!("host-b"), &json!("host-a")),
            "{grp}"
        );
        assert_eq!(grp["vms"][0]["consistency"], "quiesced", "{grp}");
        // Exactly the VM's volumes, each in its own pool.
        let (_, sb) = b.get("/v1/snapshots").await;
        let on_b: Vec<&Value> = sb
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["group"] == json!(name))
            .collect();
        assert_eq!(on_b.len(), 1, "{sb}");
        assert_eq!(on_b[0]["volume"], "disk-r");
        assert!(
            sb.as_array()
                .unwrap()
                .iter()
                .all(|x| x["volume"] != "other-b"),
            "{sb}"
        );
        let (_, sa) = a.get("/v1/snapshots").await;
        assert_eq!(
            sa.as_array()
                .unwrap()
                .iter()
                .filter(|x| x["group"] == json!(name) && x["volume"] == "disk-l")
                .count(),
            1,
            "{sa}"
        );
        check_snapshot(&b, &grp, "vm-r", acked).await;
        g.wait_new_record();
    }

    // Clone: the remote disk's clone is made on B, the local one on A.
    let (s, c) = a
        .post(
            "/v1/vm-snapshots/remote-direct/clone",
            json!({"name": "vm-c"}),
        )
        .await;
    assert_eq!(s, 201, "{c}");
    assert_eq!(c["disks"][0]["host"], "host-b", "{c}");
    let (s, v) = b.get("/v1/volumes/vm-c-vda").await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = a.get("/v1/volumes/vm-c-vdb").await;
    assert_eq!(s, 200, "{v}");
    let (s, e) = a.delete("/v1/vms/vm-c").await;
    assert!(s == 204 || s == 200, "{e}");

    // Revert needs the VM stopped; then the disk on B gets its content back.
    let (s, e) = a
        .post("/v1/vm-snapshots/remote-direct/revert", json!({}))
        .await;
    assert_eq!(s, 409, "{e}");
    let (s, v) = a.post("/v1/vms/vm-r/kill", json!({})).await;
    assert_eq!(s, 200, "{v}");
    let (s, r) = a
        .post("/v1/vm-snapshots/remote-direct/revert", json!({}))
        .await;
    assert_eq!(s, 200, "{r}");
    assert!(r[0]["bytes"].as_u64().unwrap() > 0, "{r}");

    // A group whose snapshot on B has a clone cannot be deleted (409, as
    // for a local one); once the clone's volumes are gone it can.
    let (s, e) = a.delete("/v1/vm-snapshots/remote-direct").await;
    assert_eq!(s, 409, "{e}");
    let (s, e) = b.delete("/v1/volumes/vm-c-vda").await;
    assert_eq!(s, 204, "{e}");
    let (s, e) = a.delete("/v1/volumes/vm-c-vdb").await;
    assert_eq!(s, 204, "{e}");
    // Delete the groups: their snapshots go on both hosts.
    for name in ["remote-overlay", "remote-direct"] {
        let (s, e) = a.delete(&format!("/v1/vm-snapshots/{name}")).await;
        assert_eq!(s, 204, "{e}");
    }
    let (_, sb) = b.get("/v1/snapshots").await;
    assert_eq!(sb, json!([]), "{sb}");
    // Deleting the VM removes its export on B.
    let (s, e) = a.delete("/v1/vms/vm-r").await;
    assert!(s == 204 || s == 200, "{e}");
    let (s, _) = b.get(&format!("/v1/exports/{export}")).await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn faults_end_with_guests_thawed_and_no_overlay_left() {
    let mut h = Host::new();
    let _reaper = Reaper(h.data());
    let mut a = start_guest(&h, "vm-a", "disk-a", true, 20.0).await;
    let mut b = start_guest(&h, "vm-b", "disk-b", false, 20.0).await;

    // 1. No agent channel (vm-b): crash-consistent, said so.
    let op = snapshot(&h, json!({"vms": ["vm-a", "vm-b"], "name": "noagent"})).await;
    assert_eq!(op["state"], "succeeded", "{op}");
    let (_, g) = h.get("/v1/vm-snapshots/noagent").await;
    assert_eq!(g["vms"][0]["consistency"], "quiesced", "{g}");
    assert_eq!(g["vms"][1]["consistency"], "crash_consistent", "{g}");
    assert!(
        g["vms"][1]["note"]
            .as_str()
            .unwrap()
            .contains("no guest-agent channel"),
        "{g}"
    );
    check_snapshot(&h, &g, "vm-b", 0).await;

    // 2. --no-quiesce: crash-consistent even with an agent.
    let op = snapshot(
        &h,
        json!({"vms": ["vm-a"], "name": "noq", "quiesce": false, "mode": "direct"}),
    )
    .await;
    assert_eq!(op["state"], "succeeded", "{op}");
    let (_, g) = h.get("/v1/vm-snapshots/noq").await;
    assert_eq!(g["vms"][0]["consistency"], "crash_consistent", "{g}");

    // 3. An agent that does not answer (the VM's vCPUs are paused, so
    // qemu-ga cannot run): crash-consistent, and the guest runs on.
    let (s, v) = h.post("/v1/vms/vm-a/pause", json!({})).await;
    assert_eq!(s, 200, "{v}");
    let op = snapshot(&h, json!({"vms": ["vm-a"], "name": "stuck"})).await;
    let (s, v) = h.post("/v1/vms/vm-a/resume", json!({})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(op["state"], "succeeded", "{op}");
    let (_, g) = h.get("/v1/vm-snapshots/stuck").await;
    assert_eq!(g["vms"][0]["consistency"], "crash_consistent", "{g}");
    assert!(
        g["vms"][0]["note"]
            .as_str()
            .unwrap()
            .contains("did not answer"),
        "{g}"
    );
    a.wait_new_record();
    assert!(overlay_files(&h).is_empty());

    // 4. A QMP error on vm-b's overlay transaction, after vm-a's overlay
    // is active: the operation fails, vm-a's overlay is committed back, no
    // snapshot is left, both guests write on.
    h.kill9();
    h.start_with_env(&[("FERRY_VMSNAP_TEST_FAULT", "qmp:vm-b")]);
    let op = snapshot(&h, json!({"vms": ["vm-a", "vm-b"], "name": "qmperr"})).await;
    let log = log_of(&op);
    println!("{log}\n{}", op["error"]);
    assert_eq!(op["state"], "failed", "{op}");
    let err = op["error"].as_str().unwrap();
    assert!(err.contains("vm-b") && err.contains("QEMU error"), "{err}");
    assert!(
        log.contains("VM vm-a: 1 overlay(s) committed back"),
        "{log}"
    );
    assert!(overlay_files(&h).is_empty(), "{:?}", overlay_files(&h));
    let (_, snaps) = h.get("/v1/snapshots").await;
    assert!(
        snaps
            .as_array()
            .unwrap()
            .iter()
            .all(|s| !s["name"].as_str().unwrap().starts_with("qmperr.")),
        "{snaps}"
    );
    let (s, _) = h.get("/v1/vm-snapshots/qmperr").await;
    assert_eq!(s, 404);
    a.wait_new_record();
    b.wait_new_record();

    // 5. kill -9 of ferryd while vm-a is frozen (overlays prepared): after
    // the restart the operation is compensated: vm-a thawed, no overlay.
    h.kill9();
    h.start_with_env(&[("FERRY_OPS_TEST_PAUSE", "vm-snapshot:frozen:vm-a")]);
    let (s, started) = h
        .post(
            "/v1/vm-snapshots",
            json!({"vms": ["vm-a", "vm-b"], "name": "killed"}),
        )
        .await;
    assert_eq!(s, 202, "{started}");
    let id = started["operation"].as_str().unwrap().to_string();
    wait_frozen(&mut a, Duration::from_secs(3));
    let frozen_at = a.last_record();
    println!("vm-a frozen after record {frozen_at:?}");
    // A VM held by an unfinished snapshot operation is refused.
    let (s, e) = h
        .post(
            "/v1/vm-snapshots",
            json!({"vms": ["vm-a"], "name": "second"}),
        )
        .await;
    assert_eq!(s, 409, "{e}");
    h.kill9();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(a.last_record(), frozen_at, "vm-a wrote while frozen");
    h.start();
    let op = wait_op(&h, &id).await;
    let log = log_of(&op);
    println!("{log}\n{}", op["error"]);
    assert_eq!(op["state"], "failed", "{op}");
    assert!(
        log.contains("recovered after restart: compensating"),
        "{log}"
    );
    assert!(log.contains("VM vm-a: thaw sent"), "{log}");
    a.wait_record_after(frozen_at);
    assert!(overlay_files(&h).is_empty(), "{:?}", overlay_files(&h));
    let (s, _) = h.get("/v1/vm-snapshots/killed").await;
    assert_eq!(s, 404);

    // 6. kill -9 after the storage snapshot, before the merge (overlays
    // active on both VMs): rolled forward, the overlays are committed, the
    // group exists. Steps: resolve, vm-a, vm-b, storage snapshot (3).
    h.kill9();
    h.start_with_env(&[("FERRY_OPS_TEST_PAUSE", "vm-snapshot:done:3")]);
    let (s, started) = h
        .post(
            "/v1/vm-snapshots",
            json!({"vms": ["vm-a", "vm-b"], "name": "merge"}),
        )
        .await;
    assert_eq!(s, 202, "{started}");
    let id = started["operation"].as_str().unwrap().to_string();
    let deadline = Instant::now() + T;
    loop {
        let (_, op) = h.get(&format!("/v1/operations/{id}")).await;
        let done = op["steps"].as_array().is_some_and(|s| {
            s.iter()
                .any(|x| x["name"] == "storage snapshot" && x["state"] == "done")
        });
        if done {
            break;
        }
        assert!(Instant::now() < deadline, "{op}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        !overlay_files(&h).is_empty(),
        "overlays active before the merge"
    );
    let before_a = a.last_record().unwrap();
    h.kill9();
    h.start();
    let op = wait_op(&h, &id).await;
    println!("{}", log_of(&op));
    assert_eq!(op["state"], "succeeded", "{op}");
    assert!(overlay_files(&h).is_empty(), "{:?}", overlay_files(&h));
    a.wait_record_after(Some(before_a));
    b.wait_new_record();
    let (s, g) = h.get("/v1/vm-snapshots/merge").await;
    assert_eq!(s, 200, "{g}");
    check_snapshot(&h, &g, "vm-a", 0).await;
}
