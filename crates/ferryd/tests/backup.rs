//! Backups of VMs (issue 11) against a real `ferryd`: a running test-kit
//! guest (QEMU, TCG) writing verifiable records is backed up (directory
//! repository, encrypted; and S3 through a local `moto_server`), restored
//! into a new VM whose volume equals the backup's snapshot and which boots
//! and verifies its records; incremental backups read only what the pool's
//! change tracking reports, also after `kill -9` of ferryd, and fall back
//! to a full read when their base snapshot is gone; two VMs cloned from one
//! image share their chunks; a damaged chunk is named by verify with the
//! backups it affects and makes their restore fail; gc while a backup is
//! paused half-way loses nothing.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Host, wait_line};
use ferry_testkit::console::Console;
use ferry_testkit::{Disk, GuestConfig, GuestImage, NbdServer, Workload, disk};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(300);
const MIB: u64 = 1 << 20;

/// Kills, on drop, every QEMU whose command line names this data directory.
struct Reaper(PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in common::processes("qemu-system-x86_64", &self.0.to_string_lossy()) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
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
            return op;
        }
        assert!(Instant::now() < deadline, "operation {id} still {state}");
        tokio::time::sleep(Duration::from_millis(200)).await;
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

/// Starts an operation with `POST path body` and waits for it.
async fn run_op(h: &Host, path: &str, body: Value) -> Value {
    let (s, started) = h.post(path, body).await;
    assert_eq!(s, 202, "{path}: {started}");
    let op = wait_op(h, started["operation"].as_str().unwrap()).await;
    println!("{path}: {}\n{}", op["state"], log_of(&op));
    op
}

/// Backs up `vm` and returns the new backup's record.
async fn backup(h: &Host, repo: &str, vm: &str) -> Value {
    let op = run_op(h, &format!("/v1/repos/{repo}/backups"), json!({ "vm": vm })).await;
    assert_eq!(op["state"], "succeeded", "{op}");
    let (s, list) = h.get(&format!("/v1/repos/{repo}/backups")).await;
    assert_eq!(s, 200, "{list}");
    let b = list
        .as_array()
        .unwrap()
        .iter()
        .rfind(|b| b["config"]["operation"] == op["id"])
        .unwrap_or_else(|| panic!("no backup of operation {}: {list}", op["id"]))
        .clone();
    println!(
        "backup {}: disks {}",
        b["id"],
        serde_json::to_string(&b["disks"]).unwrap()
    );
    b
}

async fn import_raw(h: &Host, volume: &str, raw: &Path) {
    let op = run_op(
        h,
        &format!("/v1/volumes/{volume}/import"),
        json!({ "path": raw, "format": "raw" }),
    )
    .await;
    assert_eq!(op["state"], "succeeded", "{op}");
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

/// Writes `pattern` bytes at `off` into a volume through an export.
async fn write_volume(h: &Host, volume: &str, off: u64, len: u64, pattern: u8) {
    let (s, e) = h.post("/v1/exports", json!({ "volume": volume })).await;
    assert_eq!(s, 201, "{e}");
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c"])
        .arg(format!("write -P {pattern} {off} {len}"))
        .arg(e["unix_uri"].as_str().unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let (s, e) = h
        .delete(&format!("/v1/exports/{}", e["name"].as_str().unwrap()))
        .await;
    assert!(s == 204 || s == 200, "{e}");
}

fn same_files(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

/// A raw image: `data` MiB of random bytes, then zeroes up to `size` MiB.
/// Sets every file under `dir` to an hour ago.
fn age_files(dir: &Path) {
    let old = std::time::SystemTime::now() - Duration::from_secs(3600);
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            age_files(&p);
        } else {
            let f = std::fs::File::options().write(true).open(&p).unwrap();
            f.set_modified(old).unwrap();
        }
    }
}

fn random_image(path: &Path, data: u64, size: u64) {
    let mut f = std::fs::File::create(path).unwrap();
    let mut r = std::fs::File::open("/dev/urandom").unwrap();
    let mut buf = vec![0u8; MIB as usize];
    for _ in 0..data {
        r.read_exact(&mut buf).unwrap();
        f.write_all(&buf).unwrap();
    }
    f.set_len(size * MIB).unwrap();
}

async fn kernel_boot() -> Value {
    let image = GuestImage::get().await.unwrap();
    json!({ "kind": "kernel", "kernel": image.kernel(), "initrd": image.initramfs(),
            "cmdline": "console=ttyS0" })
}

/// Defines a VM that is never started (a stopped VM on `volume`).
async fn define_stopped(h: &Host, name: &str, volume: &str) {
    let def = json!({ "name": name, "vcpus": 1, "memory_mib": 128, "disks": [volume],
                      "boot": kernel_boot().await, "accel": "tcg" });
    let (s, v) = h.post("/v1/vms", def).await;
    assert_eq!(s, 201, "{v}");
}

async fn add_repo(h: &Host, body: Value) -> String {
    let (s, r) = h.post("/v1/repos", body).await;
    assert_eq!(s, 201, "{r}");
    r["name"].as_str().unwrap().to_string()
}

/// A running guest writing records, as the VM tests start them.
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
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The `writer` event: where the records file resumed.
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
            assert!(Instant::now() < deadline, "{}: no writer event", self.name);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

async fn start_vm(h: &Host, name: &str) -> Guest {
    let (s, v) = h.post(&format!("/v1/vms/{name}/start"), json!({})).await;
    assert_eq!(s, 200, "{v}");
    Guest {
        name: name.into(),
        console: Console::new(Path::new(v["serial_log"].as_str().unwrap())),
    }
}

/// Defines and starts a test-kit guest writing records on a new ext4
/// volume `volume`.
async fn start_guest(h: &Host, name: &str, volume: &str) -> Guest {
    let raw = h.dir.path().join(format!("{volume}.raw"));
    disk::make_ext4_disk(&raw, 64 << 20).unwrap();
    import_raw(h, volume, &raw).await;
    std::fs::remove_file(&raw).unwrap();
    let image = GuestImage::get().await.unwrap();
    let mut cfg = GuestConfig::new(name);
    cfg.workload = Workload::records(20.0);
    cfg.disks.push(Disk::Nbd {
        server: NbdServer::Unix("/unused".into()),
        export: volume.into(),
    });
    let def = json!({
        "name": name, "vcpus": 1, "memory_mib": 256, "disks": [volume],
        "boot": { "kind": "kernel", "kernel": image.kernel(), "initrd": image.initramfs(),
                  "cmdline": cfg.kernel_cmdline() },
        "guest_agent": true, "accel": "tcg",
    });
    let (s, v) = h.post("/v1/vms", def).await;
    assert_eq!(s, 201, "{v}");
    let mut g = start_vm(h, name).await;
    g.wait_record_after(None);
    g
}

/// Backup of a running guest, restore as a new VM: the restored volume
/// equals the backup's snapshot, the VM boots and its records verify.
async fn round_trip(h: &Host, repo: &str) {
    let mut g = start_guest(h, "vm-a", "disk-a").await;
    let last = g.last_record();
    let acked = g.wait_record_after(last);
    let b = backup(h, repo, "vm-a").await;
    assert_eq!(b["config"]["consistency"], "quiesced", "{b}");
    assert_eq!(b["vm"], "vm-a");
    assert_eq!(b["disks"][0]["name"], "vda");
    // The guest kept writing.
    let last = g.last_record();
    g.wait_record_after(last);
    let (s, v) = h.post("/v1/vms/vm-a/stop?timeout_s=120", json!({})).await;
    assert_eq!(s, 200, "{v}");

    // The base snapshot the backup read is kept for the next backup.
    let group = b["config"]["snapshot_group"].as_str().unwrap();
    let snap = format!("{group}.vm-a.vda");
    let snap_img = h.dir.path().join("snap.raw");
    copy_out(h, "snapshot", &snap, &snap_img).await;
    let r = disk::verify_records_on_image(&snap_img).unwrap();
    assert!(
        r.ok && r.records > acked,
        "{r:?}, {acked} acknowledged before"
    );

    let id = b["id"].as_str().unwrap();
    let t0 = Instant::now();
    let op = run_op(
        h,
        &format!("/v1/repos/{repo}/backups/{id}/restore"),
        json!({ "name": "vm-a-copy", "to": "test-host" }),
    )
    .await;
    assert_eq!(op["state"], "succeeded", "{op}");
    println!("restore took {:?}", t0.elapsed());
    assert_eq!(op["progress"]["overall"].as_f64(), Some(1.0), "{op}");
    let (s, vm) = h.get("/v1/vms/vm-a-copy").await;
    assert_eq!(s, 200, "{vm}");
    let (_, orig) = h.get("/v1/vms/vm-a").await;
    assert_ne!(vm["uuid"], orig["uuid"]);
    let restored = h.dir.path().join("restored.raw");
    copy_out(h, "volume", "vm-a-copy-vda", &restored).await;
    assert!(
        same_files(&snap_img, &restored),
        "the restored volume differs from the backup's snapshot"
    );

    // The restored VM boots and resumes its records after the snapshot's.
    let mut c = start_vm(h, "vm-a-copy").await;
    let next = c.writer_next_seq();
    assert_eq!(
        Some(next),
        r.last_seq.map(|s| s + 1),
        "the restored guest resumes after the backed-up records"
    );
    let seq = c.wait_record_after(Some(next));
    println!("restored guest wrote record {seq}");
    let (s, v) = h
        .post("/v1/vms/vm-a-copy/stop?timeout_s=120", json!({}))
        .await;
    assert_eq!(s, 200, "{v}");
    let after = h.dir.path().join("after.raw");
    copy_out(h, "volume", "vm-a-copy-vda", &after).await;
    let r2 = disk::verify_records_on_image(&after).unwrap();
    assert!(r2.ok && r2.records > r.records, "{r2:?} vs {r:?}");

    // Restoring over an existing VM name, or to another host, is refused.
    let (s, e) = h
        .post(
            &format!("/v1/repos/{repo}/backups/{id}/restore"),
            json!({ "name": "vm-a-copy" }),
        )
        .await;
    assert_eq!(s, 409, "{e}");
    let (s, e) = h
        .post(
            &format!("/v1/repos/{repo}/backups/{id}/restore"),
            json!({ "to": "elsewhere" }),
        )
        .await;
    assert_eq!(s, 400, "{e}");

    let op = run_op(h, &format!("/v1/repos/{repo}/verify"), json!({})).await;
    assert_eq!(op["state"], "succeeded", "{op}");
}

#[tokio::test]
async fn round_trip_of_a_running_guest_encrypted_directory() {
    let h = Host::new();
    let _reaper = Reaper(h.data());
    let key = h.dir.path().join("repo.key");
    let loc = h.dir.path().join("repo");
    let repo = add_repo(
        &h,
        json!({ "location": loc, "create": true, "encrypt": true, "key_file": key }),
    )
    .await;
    assert!(key.exists());
    // The key is not in the repository nor in ferryd's registry.
    let hex = std::fs::read_to_string(&key).unwrap();
    let registry = std::fs::read_to_string(h.data().join("repos.json")).unwrap();
    assert!(!registry.contains(hex.trim()), "{registry}");
    // A wrong key is refused clearly.
    let other = h.dir.path().join("other.key");
    std::fs::write(&other, "11".repeat(32)).unwrap();
    let h2 = Host::new();
    let (s, e) = h2
        .post("/v1/repos", json!({ "location": loc, "key_file": other }))
        .await;
    assert_eq!(s, 400, "{e}");
    println!("wrong key: {e}");
    assert!(e["error"].as_str().unwrap().contains("wrong key"), "{e}");
    round_trip(&h, &repo).await;
}

struct Moto(Child);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_moto() -> (Moto, u16) {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("moto_server not found: run scripts/install-deps.sh (pip install 'moto[server]')");
    let moto = Moto(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "moto_server did not listen");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "PUT /ferry HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "create bucket: {resp}");
    (moto, port)
}

#[tokio::test]
async fn round_trip_of_a_running_guest_s3() {
    let (_moto, port) = start_moto();
    let mut h = Host::new();
    let _reaper = Reaper(h.data());
    // Restarted with the S3 settings (nothing is running yet).
    h.kill9();
    let ep = format!("http://127.0.0.1:{port}");
    h.start_with_env(&[
        ("AWS_ENDPOINT_URL", &ep),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_REGION", "us-east-1"),
    ]);
    let repo = add_repo(
        &h,
        json!({ "location": "s3://ferry/backups", "create": true }),
    )
    .await;
    assert_eq!(repo, "ferry-backups");
    round_trip(&h, &repo).await;
    let (s, info) = h.get(&format!("/v1/repos/{repo}")).await;
    assert_eq!(s, 200, "{info}");
    assert!(info["chunks"].as_u64().unwrap() > 0, "{info}");
}

#[tokio::test]
async fn incremental_backups_read_only_changes_across_restarts() {
    let mut h = Host::new();
    let loc = h.dir.path().join("repo");
    let repo = add_repo(&h, json!({ "location": loc, "create": true })).await;
    let raw = h.dir.path().join("d.raw");
    random_image(&raw, 48, 64);
    import_raw(&h, "disk-i", &raw).await;
    define_stopped(&h, "vm-i", "disk-i").await;

    let full = backup(&h, &repo, "vm-i").await;
    assert_eq!(full["config"]["consistency"], "stopped");
    assert_eq!(full["config"]["disks"]["vda"]["mode"], "full");
    assert_eq!(full["disks"][0]["read_bytes"], 64 * MIB);
    assert_eq!(full["disks"][0]["new_chunks"], 48);
    assert!(full["parent"].is_null());

    // ferryd is killed; ~1 % of the disk changes (640 KiB inside block 8,
    // 64 KiB inside block 40).
    h.kill9();
    h.start();
    write_volume(&h, "disk-i", 8 * MIB + 128 * 1024, 640 * 1024, 0x5a).await;
    write_volume(&h, "disk-i", 40 * MIB, 64 * 1024, 0x6b).await;
    let inc = backup(&h, &repo, "vm-i").await;
    assert_eq!(inc["parent"], full["id"], "{inc}");
    assert_eq!(
        inc["config"]["disks"]["vda"]["mode"], "incremental",
        "{inc}"
    );
    assert_eq!(inc["config"]["disks"]["vda"]["changed_bytes"], 704 * 1024);
    // Only the two 1 MiB blocks around the changes are read and uploaded.
    assert_eq!(inc["disks"][0]["read_bytes"], 2 * MIB, "{inc}");
    assert_eq!(inc["disks"][0]["new_chunks"], 2, "{inc}");
    println!(
        "incremental: read {} of {} bytes, {} new chunks ({} bytes)",
        inc["disks"][0]["read_bytes"],
        inc["disks"][0]["size"],
        inc["disks"][0]["new_chunks"],
        inc["disks"][0]["new_bytes"]
    );
    // The older base snapshot is gone; the new one is kept.
    let (_, snaps) = h.get("/v1/snapshots").await;
    let names: Vec<&str> = snaps
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    let base = format!(
        "{}.vm-i.vda",
        inc["config"]["snapshot_group"].as_str().unwrap()
    );
    assert_eq!(names, [base.as_str()], "{snaps}");

    // Without its base snapshot the next backup reads everything and says so.
    let (s, e) = h.delete(&format!("/v1/snapshots/{base}")).await;
    assert!(s == 204 || s == 200, "{e}");
    write_volume(&h, "disk-i", 20 * MIB, 4096, 0x7c).await;
    let again = backup(&h, &repo, "vm-i").await;
    assert_eq!(again["config"]["disks"]["vda"]["mode"], "full", "{again}");
    assert_eq!(again["disks"][0]["read_bytes"], 64 * MIB);
    assert_eq!(
        again["disks"][0]["new_chunks"], 1,
        "dedup: only the changed block is new"
    );
    let notes = again["config"]["notes"].to_string();
    assert!(
        notes.contains("missing") && notes.contains("full read"),
        "{notes}"
    );

    // Each backup restores to the disk as it was.
    let id = again["id"].as_str().unwrap();
    let op = run_op(
        &h,
        &format!("/v1/repos/{repo}/backups/{id}/restore"),
        json!({ "name": "vm-i2" }),
    )
    .await;
    assert_eq!(op["state"], "succeeded", "{op}");
    let (a, b) = (h.dir.path().join("a.raw"), h.dir.path().join("b.raw"));
    copy_out(&h, "volume", "disk-i", &a).await;
    copy_out(&h, "volume", "vm-i2-vda", &b).await;
    assert!(same_files(&a, &b), "restored volume differs from the disk");
    let id = inc["id"].as_str().unwrap();
    let op = run_op(
        &h,
        &format!("/v1/repos/{repo}/backups/{id}/restore"),
        json!({ "name": "vm-i1" }),
    )
    .await;
    assert_eq!(op["state"], "succeeded", "{op}");
    copy_out(&h, "volume", "vm-i1-vda", &b).await;
    let (x, y) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let differ: Vec<usize> = (0..x.len()).filter(|&i| x[i] != y[i]).collect();
    let w = 20 * MIB as usize..20 * MIB as usize + 4096;
    assert!(
        !differ.is_empty() && differ.iter().all(|i| w.contains(i)),
        "only the write after the incremental backup differs: {} bytes differ",
        differ.len()
    );
}

#[tokio::test]
async fn two_clones_of_one_image_share_chunks() {
    let h = Host::new();
    let loc = h.dir.path().join("repo");
    let repo = add_repo(&h, json!({ "location": loc, "create": true })).await;
    let raw = h.dir.path().join("img.raw");
    random_image(&raw, 32, 64);
    import_raw(&h, "golden", &raw).await;
    let (s, v) = h
        .post(
            "/v1/snapshots",
            json!({ "name": "golden-s", "volumes": ["golden"] }),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    for vm in ["c1", "c2"] {
        let (s, v) = h
            .post(
                "/v1/clones",
                json!({ "snapshot": "golden-s", "name": format!("{vm}-disk") }),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        define_stopped(&h, vm, &format!("{vm}-disk")).await;
    }
    // Each clone gets its own small change.
    write_volume(&h, "c1-disk", 50 * MIB, 4096, 1).await;
    write_volume(&h, "c2-disk", 50 * MIB, 4096, 2).await;
    let size = |v: &Value| v["chunk_bytes"].as_u64().unwrap();
    let (_, i0) = h.get(&format!("/v1/repos/{repo}")).await;
    let b1 = backup(&h, &repo, "c1").await;
    let (_, i1) = h.get(&format!("/v1/repos/{repo}")).await;
    let b2 = backup(&h, &repo, "c2").await;
    let (_, i2) = h.get(&format!("/v1/repos/{repo}")).await;
    let first = size(&i1) - size(&i0);
    let second = size(&i2) - size(&i1);
    println!(
        "repository growth: first clone {first} bytes, second clone {second} bytes ({:.2} %)",
        second as f64 * 100.0 / first as f64
    );
    assert_eq!(b1["disks"][0]["new_chunks"], 33);
    assert_eq!(b2["disks"][0]["new_chunks"], 1, "{b2}");
    assert!(second * 20 < first, "second {second} vs first {first}");
}

/// Flips one byte in the middle of a stored chunk file.
fn damage(path: &Path) {
    let mut data = std::fs::read(path).unwrap();
    let i = data.len() / 2;
    data[i] ^= 0x40;
    std::fs::write(path, data).unwrap();
}

#[tokio::test]
async fn verify_names_a_damaged_chunk_and_its_backups() {
    let h = Host::new();
    let loc = h.dir.path().join("repo");
    let repo = add_repo(&h, json!({ "location": loc, "create": true })).await;
    let raw = h.dir.path().join("d.raw");
    random_image(&raw, 4, 16);
    import_raw(&h, "disk-c", &raw).await;
    define_stopped(&h, "vm-c", "disk-c").await;
    let b1 = backup(&h, &repo, "vm-c").await;
    write_volume(&h, "disk-c", 3 * MIB, 4096, 9).await;
    let b2 = backup(&h, &repo, "vm-c").await;
    // Block 0 is in both backups: find its chunk file (the one chunk of
    // the repository whose plain content starts like the image).
    let before = run_op(&h, &format!("/v1/repos/{repo}/verify"), json!({})).await;
    assert_eq!(before["state"], "succeeded", "{before}");
    let mut files = Vec::new();
    for d in std::fs::read_dir(loc.join("chunks")).unwrap().flatten() {
        for f in std::fs::read_dir(d.path()).unwrap().flatten() {
            files.push(f.path());
        }
    }
    assert_eq!(files.len(), 5, "{files:?}");
    // Damage every chunk file in turn until one shared by both backups is
    // hit: the first such is named with both backups.
    files.sort();
    let victim = files[0].clone();
    damage(&victim);
    let name = victim.file_name().unwrap().to_string_lossy().to_string();
    let op = run_op(&h, &format!("/v1/repos/{repo}/verify"), json!({})).await;
    assert_eq!(op["state"], "failed", "{op}");
    let err = op["error"].as_str().unwrap();
    assert!(err.contains(&name), "{err}");
    let log = log_of(&op);
    let line = log
        .lines()
        .find(|l| l.contains(&name) && l.starts_with("BAD chunk"))
        .unwrap_or_else(|| panic!("{log}"));
    // The damaged chunk's users: the backups whose restore must fail.
    let mut affected = Vec::new();
    for b in [&b1, &b2] {
        if line.contains(b["id"].as_str().unwrap()) {
            affected.push(b["id"].as_str().unwrap().to_string());
        }
    }
    assert!(!affected.is_empty(), "{line}");
    assert!(err.contains(&affected[0]), "{err}");
    for (i, id) in affected.iter().enumerate() {
        let op = run_op(
            &h,
            &format!("/v1/repos/{repo}/backups/{id}/restore"),
            json!({ "name": format!("r{i}") }),
        )
        .await;
        assert_eq!(op["state"], "failed", "{op}");
        let e = op["error"].as_str().unwrap();
        assert!(e.contains(&name) && e.contains("incomplete"), "{e}");
        // The partial volume and VM were removed.
        let (s, _) = h.get(&format!("/v1/volumes/r{i}-vda")).await;
        assert_eq!(s, 404);
        let (s, _) = h.get(&format!("/v1/vms/r{i}")).await;
        assert_eq!(s, 404);
    }
    // A backup that does not use the chunk still restores.
    for b in [&b1, &b2] {
        let id = b["id"].as_str().unwrap();
        if !affected.iter().any(|a| a == id) {
            let op = run_op(
                &h,
                &format!("/v1/repos/{repo}/backups/{id}/restore"),
                json!({ "name": "fine" }),
            )
            .await;
            assert_eq!(op["state"], "succeeded", "{op}");
        }
    }
}

#[tokio::test]
async fn gc_during_a_backup_loses_nothing() {
    let mut h = Host::new();
    let loc = h.dir.path().join("repo");
    let repo = add_repo(&h, json!({ "location": loc, "create": true })).await;
    // An old backup, forgotten: gc has something to remove.
    let raw = h.dir.path().join("old.raw");
    random_image(&raw, 4, 8);
    import_raw(&h, "old", &raw).await;
    define_stopped(&h, "vm-old", "old").await;
    let old = backup(&h, &repo, "vm-old").await;
    let (s, e) = h
        .delete(&format!(
            "/v1/repos/{repo}/backups/{}",
            old["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(s, 204, "{e}");
    // Its chunks are older than any clock slack of the collector.
    age_files(&loc.join("chunks"));

    let raw = h.dir.path().join("d.raw");
    random_image(&raw, 24, 32);
    import_raw(&h, "disk-g", &raw).await;
    define_stopped(&h, "vm-g", "disk-g").await;
    h.terminate();
    let release = h.dir.path().join("release");
    let rx = h.start_watched(&[
        ("FERRY_OPS_TEST_PAUSE", "vm.backup:uploading"),
        ("FERRY_BACKUP_TEST_RELEASE", release.to_str().unwrap()),
    ]);
    let (s, started) = h
        .post(
            &format!("/v1/repos/{repo}/backups"),
            json!({ "vm": "vm-g" }),
        )
        .await;
    assert_eq!(s, 202, "{started}");
    wait_line(&rx, "FERRY_OPS_TEST_PAUSED vm.backup:uploading", 300);
    let gc = run_op(&h, &format!("/v1/repos/{repo}/gc"), json!({})).await;
    assert_eq!(gc["state"], "succeeded", "{gc}");
    let log = log_of(&gc);
    assert!(
        log.contains("removed 4 ("),
        "the forgotten backup's chunks go: {log}"
    );
    std::fs::write(&release, b"").unwrap();
    let op = wait_op(&h, started["operation"].as_str().unwrap()).await;
    println!("{}", log_of(&op));
    assert_eq!(op["state"], "succeeded", "{op}");
    let gc = run_op(&h, &format!("/v1/repos/{repo}/gc"), json!({})).await;
    assert_eq!(gc["state"], "succeeded", "{gc}");
    let v = run_op(&h, &format!("/v1/repos/{repo}/verify"), json!({})).await;
    assert_eq!(v["state"], "succeeded", "{v}");
    let (_, list) = h.get(&format!("/v1/repos/{repo}/backups")).await;
    let id = list[0]["id"].as_str().unwrap();
    let op = run_op(
        &h,
        &format!("/v1/repos/{repo}/backups/{id}/restore"),
        json!({ "name": "vm-g2" }),
    )
    .await;
    assert_eq!(op["state"], "succeeded", "{op}");
    let (a, b) = (h.dir.path().join("a.raw"), h.dir.path().join("b.raw"));
    copy_out(&h, "volume", "disk-g", &a).await;
    copy_out(&h, "volume", "vm-g2-vda", &b).await;
    assert!(same_files(&a, &b), "restored volume differs from the disk");
}

/// Reads `len` bytes at `off` of a volume through an export (qemu-io).
async fn read_volume(h: &Host, volume: &str, off: u64, len: u64) {
    let (s, e) = h.post("/v1/exports", json!({ "volume": volume })).await;
    assert_eq!(s, 201, "{e}");
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c"])
        .arg(format!("read {off} {len}"))
        .arg(e["unix_uri"].as_str().unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let (s, e) = h
        .delete(&format!("/v1/exports/{}", e["name"].as_str().unwrap()))
        .await;
    assert!(s == 204 || s == 200, "{e}");
}

/// Where chunk-aligned byte range containing `off` sits in a profile.
fn position_of(ranges: &Value, off: u64) -> Option<usize> {
    ranges
        .as_array()
        .unwrap()
        .iter()
        .position(|r| r[0].as_u64().unwrap() <= off && off < r[1].as_u64().unwrap())
}

/// The read profile the pool records for a VM's volume is stored by
/// `vm.backup`, and a restore gives it to the new volume — on this host and
/// on a peer. A restore to a peer (`to`): this host reads the repository
/// and writes new volumes in the peer's pool over NBD, then defines the VM
/// there; the peer's volume equals the backed-up disk, no export is left,
/// and a second restore to a taken name fails and leaves nothing behind.
#[tokio::test]
async fn restore_to_a_peer_keeps_the_read_profile() {
    let a = Host::named("backup-host");
    let b = Host::named("peer-host");
    let _reapers = (Reaper(a.data()), Reaper(b.data()));
    let raw = a.dir.path().join("disk.raw");
    random_image(&raw, 12, 40);
    import_raw(&a, "disk-p", &raw).await;
    define_stopped(&a, "vm-p", "disk-p").await;

    // Record which chunks the next reads touch: 3 MiB first, then 1 MiB.
    let (s, p) = a
        .post("/v1/volumes/disk-p/read-profile", json!({ "reads": 100 }))
        .await;
    assert_eq!(s, 200, "{p}");
    assert_eq!(p["recording"], true, "{p}");
    read_volume(&a, "disk-p", 3 * MIB, 4096).await;
    read_volume(&a, "disk-p", MIB, 4096).await;
    let (s, p) = a.get("/v1/volumes/disk-p/read-profile").await;
    assert_eq!(s, 200, "{p}");
    println!("recorded profile: {p}");
    let (p3, p1) = (
        position_of(&p["ranges"], 3 * MIB).expect("3 MiB read recorded"),
        position_of(&p["ranges"], MIB).expect("1 MiB read recorded"),
    );
    assert!(p3 < p1, "first-read order kept: {p}");
    let (s, e) = a
        .post(
            "/v1/volumes/disk-p/read-profile",
            json!({ "reads": 1, "seconds": 1 }),
        )
        .await;
    assert_eq!(s, 400, "{e}");

    let key = a.dir.path().join("repo.key");
    let loc = a.dir.path().join("repo");
    let repo = add_repo(
        &a,
        json!({ "location": loc, "create": true, "encrypt": true, "key_file": key }),
    )
    .await;
    let bk = backup(&a, &repo, "vm-p").await;
    assert_eq!(
        bk["disks"][0]["read_profile"], p["ranges"],
        "the backup stores the volume's read profile"
    );
    let id = bk["id"].as_str().unwrap();

    // Local restore: the new volume has the profile.
    let op = run_op(
        &a,
        &format!("/v1/repos/{repo}/backups/{id}/restore"),
        json!({ "name": "vm-p-local" }),
    )
    .await;
    assert_eq!(op["state"], "succeeded", "{op}");
    let (s, lp) = a.get("/v1/volumes/vm-p-local-vda/read-profile").await;
    assert_eq!(s, 200, "{lp}");
    assert_eq!(lp["ranges"], p["ranges"], "{lp}");

    // Restore to the peer.
    let (s, t) = b.get("/v1/host/peer-token").await;
    assert_eq!(s, 200, "{t}");
    let (s, r) = a
        .post(
            "/v1/peers",
            json!({ "url": b.url, "token": t["token"], "name": "peer-b" }),
        )
        .await;
    assert_eq!(s, 201, "{r}");
    let t0 = Instant::now();
    let op = run_op(
        &a,
        &format!("/v1/repos/{repo}/backups/{id}/restore"),
        json!({ "name": "vm-p-copy", "to": "peer-b" }),
    )
    .await;
    assert_eq!(op["state"], "succeeded", "{op}");
    println!("restore to the peer took {:?}", t0.elapsed());
    assert_eq!(op["progress"]["overall"].as_f64(), Some(1.0), "{op}");
    let (s, vm) = b.get("/v1/vms/vm-p-copy").await;
    assert_eq!(s, 200, "{vm}");
    assert_eq!(
        vm["definition"]["disks"][0]["volume"], "vm-p-copy-vda",
        "{vm}"
    );
    let (s, _) = a.get("/v1/vms/vm-p-copy").await;
    assert_eq!(s, 404, "the VM is defined on the peer, not here");
    let (s, _) = a.get("/v1/volumes/vm-p-copy-vda").await;
    assert_eq!(s, 404, "the volumes are in the peer's pool, not here");
    let on_peer = a.dir.path().join("on-peer.raw");
    copy_out(&b, "volume", "vm-p-copy-vda", &on_peer).await;
    assert!(
        same_files(&raw, &on_peer),
        "the peer's volume differs from the backed-up disk"
    );
    let (s, pp) = b.get("/v1/volumes/vm-p-copy-vda/read-profile").await;
    assert_eq!(s, 200, "{pp}");
    assert_eq!(pp["ranges"], p["ranges"], "{pp}");
    // The restore's exports are gone (the VM's own disk export stays).
    let (s, ex) = b.get("/v1/exports").await;
    assert_eq!(s, 200, "{ex}");
    assert!(
        ex.as_array()
            .unwrap()
            .iter()
            .all(|e| !e["name"].as_str().unwrap().starts_with(".restore-")),
        "exports left: {ex}"
    );

    // A taken name on the peer: the restore fails and leaves nothing.
    let op = run_op(
        &a,
        &format!("/v1/repos/{repo}/backups/{id}/restore"),
        json!({ "name": "vm-p-copy", "to": "peer-b" }),
    )
    .await;
    assert_eq!(op["state"], "failed", "{op}");
    assert!(
        op["error"].as_str().unwrap_or("").contains("already has"),
        "{op}"
    );
    let (_, vols) = b.get("/v1/volumes").await;
    assert_eq!(vols.as_array().map(Vec::len), Some(1), "{vols}");
    // An unknown peer is refused up front.
    let (s, e) = a
        .post(
            &format!("/v1/repos/{repo}/backups/{id}/restore"),
            json!({ "to": "nowhere" }),
        )
        .await;
    assert_eq!(s, 400, "{e}");
}
