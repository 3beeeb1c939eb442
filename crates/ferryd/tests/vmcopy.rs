//! VM copy between two real ferryd hosts (issue 8): a VM with three disks
//! — GPT with 3 partitions, MBR with an extended partition holding 2
//! logical ones, and an unpartitioned ext4 disk carrying the guest's
//! records — filled unevenly. Copied while it runs (from a group
//! snapshot) and stopped; the copy boots on the target and its records
//! verify; every volume's bytes match. Cancel leaves nothing on the
//! target; a `kill -9` of the source in the middle of the data resumes
//! and sends only what is missing.

mod common;

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Host, wait_line};
use ferry_testkit::console::Console;
use ferry_testkit::{Disk, GuestConfig, GuestImage, NbdServer, Workload, disk};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(300);
const MIB: u64 = 1 << 20;

/// Kills, on drop, every QEMU whose command line names this directory.
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

/// Deterministic pseudo-random bytes (xorshift), never all zero.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn sfdisk(path: &Path, size: u64, script: &str) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
    let mut child = Command::new("sfdisk")
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let script = script.replace('@', path.to_str().unwrap());
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "sfdisk failed");
}

fn fill(path: &Path, at: u64, len: u64, seed: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&noise(seed, len as usize), at).unwrap();
}

/// GPT, 64 MiB: p1 8 MiB nearly empty (16 KiB), p2 16 MiB full, p3 the
/// rest with 6 MiB.
fn gpt_image(path: &Path) {
    sfdisk(
        path,
        64 * MIB,
        "label: gpt\nstart=2048, size=16384, name=boot\nsize=32768, name=full\nname=half\n",
    );
    fill(path, MIB, 16 << 10, 1);
    fill(path, 9 * MIB, 16 * MIB, 2);
    fill(path, 30 * MIB, 6 * MIB, 3);
}

/// MBR, 64 MiB: p1 8 MiB with 3 MiB; extended 48 MiB with l5 16 MiB full
/// and l6 24 MiB nearly empty (64 KiB).
fn mbr_image(path: &Path) {
    sfdisk(
        path,
        64 * MIB,
        "label: dos\n@1: start=2048, size=16384, type=83\n@2: size=98304, type=5\n\
         @5: size=32768, type=83\n@6: size=49152, type=83\n",
    );
    fill(path, MIB, 3 * MIB, 4);
    // l5 starts one alignment step after the extended partition (9 MiB).
    fill(path, 10 * MIB, 16 * MIB, 5);
    fill(path, 28 * MIB, 64 << 10, 6);
}

async fn import(h: &Host, volume: &str, raw: &Path) {
    let (s, started) = h
        .post(
            &format!("/v1/volumes/{volume}/import"),
            json!({ "path": raw }),
        )
        .await;
    assert_eq!(s, 202, "{started}");
    let op = h.wait_op(started["operation"].as_str().unwrap()).await;
    assert_eq!(op["state"], "succeeded", "{op}");
}

/// The three volumes: `<p>-root` (ext4, records), `<p>-gpt`, `<p>-mbr`.
async fn make_volumes(h: &Host, p: &str) -> Vec<String> {
    let dir = h.dir.path();
    let root = dir.join(format!("{p}-root.raw"));
    disk::make_ext4_disk(&root, 64 * MIB).unwrap();
    import(h, &format!("{p}-root"), &root).await;
    let gpt = dir.join(format!("{p}-gpt.raw"));
    gpt_image(&gpt);
    import(h, &format!("{p}-gpt"), &gpt).await;
    let mbr = dir.join(format!("{p}-mbr.raw"));
    mbr_image(&mbr);
    import(h, &format!("{p}-mbr"), &mbr).await;
    ["root", "gpt", "mbr"]
        .iter()
        .map(|d| format!("{p}-{d}"))
        .collect()
}

async fn define(h: &Host, name: &str, volumes: &[String], rate: f64) {
    let image = GuestImage::get().await.unwrap();
    let mut cfg = GuestConfig::new(name);
    cfg.workload = Workload::records(rate);
    cfg.disks.push(Disk::Nbd {
        server: NbdServer::Unix("/unused".into()),
        export: volumes[0].clone(),
    });
    let def = json!({
        "name": name,
        "vcpus": 1,
        "memory_mib": 256,
        "disks": volumes,
        "boot": {
            "kind": "kernel",
            "kernel": image.kernel(),
            "initrd": image.initramfs(),
            "cmdline": cfg.kernel_cmdline(),
        },
        "guest_agent": true,
        "accel": "tcg",
    });
    let (s, v) = h.post("/v1/vms", def).await;
    assert_eq!(s, 201, "{v}");
}

/// Starts VM `name` and waits for a record on its console.
async fn start_and_wait_record(h: &Host, name: &str) -> Console {
    let (s, v) = h.post(&format!("/v1/vms/{name}/start"), json!({})).await;
    assert_eq!(s, 200, "{v}");
    let mut console = Console::new(Path::new(v["serial_log"].as_str().unwrap()));
    let deadline = Instant::now() + T;
    loop {
        console.poll().unwrap();
        if console.events().iter().any(|e| e.name == "record") {
            return console;
        }
        if let Some(f) = console.fatal() {
            panic!("{name}: guest failed: {f}\n{}", console.tail(30));
        }
        assert!(
            Instant::now() < deadline,
            "{name}: no record: {}",
            console.tail(30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn stop(h: &Host, name: &str) {
    let (s, v) = h
        .post(&format!("/v1/vms/{name}/stop?timeout_s=60"), json!({}))
        .await;
    assert_eq!(s, 200, "{v}");
}

async fn peer_up(a: &Host, b: &Host) {
    let (s, t) = b.get("/v1/host/peer-token").await;
    assert_eq!(s, 200, "{t}");
    let (s, p) = a
        .post(
            "/v1/peers",
            json!({ "url": b.url, "token": t["token"], "name": "target" }),
        )
        .await;
    assert_eq!(s, 201, "{p}");
}

/// Follows an operation, checking that its overall figure never goes
/// down; returns the final operation and the (seconds, overall) samples.
async fn follow(h: &Host, id: &str) -> (Value, Vec<(f64, f64)>) {
    let t0 = Instant::now();
    let mut samples: Vec<(f64, f64)> = Vec::new();
    loop {
        let (s, op) = h.get(&format!("/v1/operations/{id}")).await;
        assert_eq!(s, 200, "{op}");
        if let Some(o) = op["progress"]["overall"].as_f64() {
            if let Some((_, last)) = samples.last() {
                assert!(o >= *last, "progress went back from {last} to {o}");
            }
            samples.push((t0.elapsed().as_secs_f64(), o));
        }
        let state = op["state"].as_str().unwrap();
        if ["succeeded", "failed", "cancelled"].contains(&state) {
            return (op, samples);
        }
        assert!(t0.elapsed() < T, "operation {id} still {state}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn copy(a: &Host, vm: &str, body: Value) -> String {
    let (s, started) = a.post(&format!("/v1/vms/{vm}/copy"), body).await;
    assert_eq!(s, 202, "{started}");
    started["operation"].as_str().unwrap().to_string()
}

/// A volume's bytes, read through a unix-socket export of its host.
async fn read_volume(h: &Host, volume: &str) -> Vec<u8> {
    let (s, e) = h
        .post(
            "/v1/exports",
            json!({ "volume": volume, "name": format!("read-{volume}") }),
        )
        .await;
    assert_eq!(s, 201, "{e}");
    let to = h.dir.path().join(format!("read-{volume}.raw"));
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(e["unix_uri"].as_str().unwrap())
        .arg(&to)
        .status()
        .unwrap();
    assert!(st.success());
    let (s, e) = h.delete(&format!("/v1/exports/read-{volume}")).await;
    assert!(s == 204 || s == 200, "{e}");
    let data = std::fs::read(&to).unwrap();
    std::fs::remove_file(&to).unwrap();
    data
}

/// The operation's log lines.
fn log_of(op: &Value) -> Vec<String> {
    op["log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["msg"].as_str().unwrap().to_string())
        .collect()
}

/// The number after `word` in the log line of the copy's summary
/// (`sent N bytes (resumed after M bytes ...`).
fn summary(op: &Value, word: &str) -> u64 {
    let line = log_of(op)
        .into_iter()
        .find(|l| l.starts_with("sent "))
        .unwrap_or_else(|| panic!("no summary in {op}"));
    let at = line
        .find(word)
        .unwrap_or_else(|| panic!("{word} not in {line}"));
    line[at + word.len()..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("no number after {word} in {line}"))
}

fn copied_from_group(op: &Value) -> bool {
    log_of(op)
        .iter()
        .any(|l| l.contains("copying from snapshot group"))
}

/// The names of the children of the node named `name`.
fn children(op: &Value, name: &str) -> Vec<String> {
    let nodes = op["progress"]["nodes"].as_array().unwrap();
    let n = nodes
        .iter()
        .find(|n| n["name"].as_str().unwrap().starts_with(name))
        .unwrap_or_else(|| panic!("no node {name}"));
    n["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            nodes[c.as_u64().unwrap() as usize]["name"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

async fn names(h: &Host, path: &str) -> Vec<String> {
    let (s, l) = h.get(path).await;
    assert_eq!(s, 200, "{l}");
    l.as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn running_and_stopped_vms_copy_to_a_second_host() {
    let a = Host::named("source");
    let b = Host::named("target");
    let _ra = Reaper(a.dir.path().to_path_buf());
    let _rb = Reaper(b.dir.path().to_path_buf());
    peer_up(&a, &b).await;
    let vols = make_volumes(&a, "vm1").await;
    define(&a, "vm1", &vols, 20.0).await;
    let _console = start_and_wait_record(&a, "vm1").await;

    // Copy while it runs: from an application-consistent group snapshot.
    let id = copy(&a, "vm1", json!({ "to": "target", "name": "vm1-live" })).await;
    let (op, samples) = follow(&a, &id).await;
    assert_eq!(op["state"], "succeeded", "{op}");
    println!("running copy: {} progress samples", samples.len());
    assert!(copied_from_group(&op), "{op}");
    // The hierarchy: a leaf per partition plus the space outside them.
    let gpt = children(&op, "disk vdb");
    assert_eq!(gpt.len(), 4, "{gpt:?}");
    assert!(gpt.iter().any(|n| n == "partition 2 (full)"), "{gpt:?}");
    assert!(gpt.iter().any(|n| n == "outside partitions"), "{gpt:?}");
    let mbr = children(&op, "disk vdc");
    assert_eq!(
        mbr,
        [
            "partition 1",
            "partition 5",
            "partition 6",
            "outside partitions"
        ]
    );
    assert_eq!(children(&op, "disk vda"), ["whole disk"]);
    assert_eq!(children(&op, "partition 2 (full)"), ["transfer", "verify"]);
    // Leaf weights are allocated bytes: the full partition outweighs the
    // nearly empty one.
    let nodes = op["progress"]["nodes"].as_array().unwrap();
    let w = |n: &str| {
        nodes.iter().find(|x| x["name"] == n).unwrap()["weight"]
            .as_f64()
            .unwrap()
    };
    assert!(
        w("partition 2 (full)") >= 16.0 * MIB as f64,
        "{}",
        w("partition 2 (full)")
    );
    assert!(
        w("partition 1 (boot)") < 1.0 * MIB as f64,
        "{}",
        w("partition 1 (boot)")
    );
    // Nothing left behind: no exports on the target, no copy snapshots here.
    let exports = names(&b, "/v1/exports").await;
    assert!(
        !exports.iter().any(|e| e.starts_with(".copy-")),
        "{exports:?}"
    );
    assert!(
        !names(&a, "/v1/snapshots")
            .await
            .iter()
            .any(|n| n.contains("copy")),
        "{:?}",
        names(&a, "/v1/snapshots").await
    );
    // The partitioned disks do not change while the guest runs: they match.
    for d in ["gpt", "mbr"] {
        assert!(
            read_volume(&a, &format!("vm1-{d}")).await
                == read_volume(
                    &b,
                    &format!("vm1-live-vd{}", if d == "gpt" { 'b' } else { 'c' })
                )
                .await,
            "{d} differs"
        );
    }
    // The copy boots on the target, writes records, and they verify.
    let (s, v) = b.get("/v1/vms/vm1-live").await;
    assert_eq!(s, 200, "{v}");
    let (_, src) = a.get("/v1/vms/vm1").await;
    assert_ne!(v["uuid"], src["uuid"], "the copy has a new UUID");
    let _c2 = start_and_wait_record(&b, "vm1-live").await;
    stop(&b, "vm1-live").await;
    let img = b.dir.path().join("live-root.raw");
    std::fs::write(&img, read_volume(&b, "vm1-live-vda").await).unwrap();
    let report = disk::verify_records_on_image(&img).unwrap();
    assert!(report.ok, "{report:?}");
    println!("copy of the running VM: {} records verify", report.records);

    // Stopped: copied from plain snapshots; every volume matches.
    stop(&a, "vm1").await;
    let id = copy(&a, "vm1", json!({ "to": "target", "name": "vm1-cold" })).await;
    let (op, _) = follow(&a, &id).await;
    assert_eq!(op["state"], "succeeded", "{op}");
    assert!(!copied_from_group(&op), "{op}");
    for (d, dev) in [("root", 'a'), ("gpt", 'b'), ("mbr", 'c')] {
        let src = read_volume(&a, &format!("vm1-{d}")).await;
        let dst = read_volume(&b, &format!("vm1-cold-vd{dev}")).await;
        assert!(src == dst, "volume {d} differs after the copy");
        println!("vm1-{d}: {} bytes match", src.len());
    }
    let img = b.dir.path().join("cold-root.raw");
    std::fs::write(&img, read_volume(&b, "vm1-cold-vda").await).unwrap();
    let report = disk::verify_records_on_image(&img).unwrap();
    assert!(report.ok, "{report:?}");
}

#[tokio::test]
async fn a_cancelled_copy_leaves_nothing_on_the_target() {
    let a = Host::named("source");
    let b = Host::named("target");
    peer_up(&a, &b).await;
    let vols = make_volumes(&a, "vm2").await;
    define(&a, "vm2", &vols, 20.0).await;
    // Slow enough to cancel in the middle: 4 MB/s.
    let id = copy(&a, "vm2", json!({ "to": "target", "bandwidth": 4_000_000 })).await;
    let deadline = Instant::now() + T;
    loop {
        let (_, op) = a.get(&format!("/v1/operations/{id}")).await;
        if op["progress"]["overall"].as_f64().unwrap_or(0.0) > 0.1 {
            break;
        }
        assert_eq!(op["state"], "running", "{op}");
        assert!(Instant::now() < deadline, "{op}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (s, v) = a
        .post(&format!("/v1/operations/{id}/cancel"), json!({}))
        .await;
    assert!(s == 200 || s == 202, "{v}");
    let (op, _) = follow(&a, &id).await;
    assert_eq!(op["state"], "cancelled", "{op}");
    assert!(
        names(&b, "/v1/volumes").await.is_empty(),
        "{:?}",
        names(&b, "/v1/volumes").await
    );
    assert!(names(&b, "/v1/exports").await.is_empty());
    assert!(names(&b, "/v1/vms").await.is_empty());
    assert!(
        !names(&a, "/v1/snapshots")
            .await
            .iter()
            .any(|n| n.contains("copy")),
        "{:?}",
        names(&a, "/v1/snapshots").await
    );
}

#[tokio::test]
async fn a_copy_resumes_after_kill_9_of_the_source_sending_only_the_rest() {
    let mut a = Host::named("source");
    let b = Host::named("target");
    peer_up(&a, &b).await;
    let vols = make_volumes(&a, "vm3").await;
    define(&a, "vm3", &vols, 20.0).await;
    // A copy without interruption tells how much there is to send.
    let id = copy(&a, "vm3", json!({ "to": "target", "name": "full" })).await;
    let (op, _) = follow(&a, &id).await;
    assert_eq!(op["state"], "succeeded", "{op}");
    let whole = summary(&op, "sent");

    a.kill9();
    let rx = a.start_watched(&[("FERRY_OPS_TEST_PAUSE", "vm.copy:copying")]);
    let id = copy(&a, "vm3", json!({ "to": "target", "name": "resumed" })).await;
    wait_line(&rx, "FERRY_OPS_TEST_PAUSED vm.copy:copying", 120);
    a.kill9();
    a.start();
    let (op, _) = follow(&a, &id).await;
    assert_eq!(op["state"], "succeeded", "{op}");
    let (sent, before) = (summary(&op, "sent"), summary(&op, "resumed after"));
    println!(
        "resumed copy: sent {sent} after {before} before the kill; an uninterrupted copy sent {whole}"
    );
    assert!(before > 0, "{:?}", log_of(&op));
    assert!(
        sent < whole,
        "the resumed run sent {sent} bytes, an uninterrupted copy {whole}"
    );
    for (d, dev) in [("root", 'a'), ("gpt", 'b'), ("mbr", 'c')] {
        assert!(
            read_volume(&a, &format!("vm3-{d}")).await
                == read_volume(&b, &format!("resumed-vd{dev}")).await,
            "volume {d} differs after the resumed copy"
        );
    }
}

/// The source's operation id, from the coordinator's log.
fn relayed_op(op: &Value) -> String {
    let line = log_of(op)
        .into_iter()
        .find(|l| l.contains("its operation "))
        .unwrap_or_else(|| panic!("no relayed operation in {op}"));
    line.rsplit(' ').next().unwrap().to_string()
}

fn node_names(op: &Value) -> Vec<String> {
    op["progress"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .skip(1)
        .map(|n| n["name"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn a_third_host_coordinates_the_copy() {
    let a = Host::named("source");
    let b = Host::named("target");
    let c = Host::named("coord");
    peer_up(&a, &b).await;
    // The coordinator knows the source only.
    let (s, t) = a.get("/v1/host/peer-token").await;
    assert_eq!(s, 200, "{t}");
    let (s, p) = c
        .post(
            "/v1/peers",
            json!({ "url": a.url, "token": t["token"], "name": "source" }),
        )
        .await;
    assert_eq!(s, 201, "{p}");
    let vols = make_volumes(&a, "vm4").await;
    define(&a, "vm4", &vols, 20.0).await;

    // Without `from`: the coordinator finds the one peer that has the VM.
    let id = copy(&c, "vm4", json!({ "to": "target", "name": "via-c" })).await;
    let (op, samples) = follow(&c, &id).await;
    assert_eq!(op["state"], "succeeded", "{op}");
    assert_eq!(op["kind"], "vm.copy.relay");
    assert_eq!(op["progress"]["overall"], 1.0, "{op}");
    println!(
        "coordinated copy: {} progress samples, {:.1} s",
        samples.len(),
        samples.last().map_or(0.0, |s| s.0)
    );
    // The source ran the copy; the coordinator's tree mirrors its tree
    // (VM → disk → partition → transfer/verify) node for node.
    let src_id = relayed_op(&op);
    let (s, src_op) = a.get(&format!("/v1/operations/{src_id}")).await;
    assert_eq!(s, 200, "{src_op}");
    assert_eq!(src_op["kind"], "vm.copy");
    assert_eq!(src_op["state"], "succeeded");
    let mirrored = node_names(&op);
    for n in node_names(&src_op) {
        assert!(
            mirrored.contains(&n),
            "node {n} of the source not mirrored: {mirrored:?}"
        );
    }
    assert!(mirrored.iter().any(|n| n == "verify"), "{mirrored:?}");
    // The coordinator's key makes a retried request answer the same copy.
    let again = copy(
        &a,
        "vm4",
        json!({ "to": "target", "name": "via-c", "request": id }),
    )
    .await;
    assert_eq!(again, src_id);
    for (d, dev) in [("root", 'a'), ("gpt", 'b'), ("mbr", 'c')] {
        assert!(
            read_volume(&a, &format!("vm4-{d}")).await
                == read_volume(&b, &format!("via-c-vd{dev}")).await,
            "volume {d} differs after the coordinated copy"
        );
    }
    assert!(names(&b, "/v1/vms").await.contains(&"via-c".to_string()));
    // Nothing of the copy on the coordinator.
    assert!(names(&c, "/v1/volumes").await.is_empty());

    // An unknown VM: 404 from the coordinator, nothing started.
    let (s, v) = c
        .post("/v1/vms/nowhere/copy", json!({ "to": "target" }))
        .await;
    assert_eq!(s, 404, "{v}");

    // Cancel at the coordinator reaches the source: nothing left on B.
    let id = copy(
        &c,
        "vm4",
        json!({ "to": "target", "name": "cancelled", "from": "source", "bandwidth": 4_000_000 }),
    )
    .await;
    let deadline = Instant::now() + T;
    loop {
        let (_, op) = c.get(&format!("/v1/operations/{id}")).await;
        if op["progress"]["overall"].as_f64().unwrap_or(0.0) > 0.1 {
            break;
        }
        assert_eq!(op["state"], "running", "{op}");
        assert!(Instant::now() < deadline, "{op}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (s, v) = c
        .post(&format!("/v1/operations/{id}/cancel"), json!({}))
        .await;
    assert!(s == 200 || s == 202, "{v}");
    let (op, _) = follow(&c, &id).await;
    assert_eq!(op["state"], "cancelled", "{op}");
    let (_, src_op) = a.get(&format!("/v1/operations/{}", relayed_op(&op))).await;
    assert_eq!(src_op["state"], "cancelled", "{src_op}");
    let vols_b = names(&b, "/v1/volumes").await;
    assert!(
        !vols_b.iter().any(|v| v.starts_with("cancelled")),
        "{vols_b:?}"
    );
    assert!(
        !names(&b, "/v1/vms")
            .await
            .contains(&"cancelled".to_string())
    );
}

#[tokio::test]
async fn the_hash_call_answers_in_the_algorithm_asked_and_blake3_by_default() {
    let h = Host::named("hashes");
    let (s, v) = h
        .post("/v1/volumes", json!({ "name": "hv", "size": 4 * MIB }))
        .await;
    assert!(s == 200 || s == 201, "{v}");
    let zeros = vec![0u8; MIB as usize];
    let ask = |alg: Option<&str>| {
        let mut b = json!({ "volume": "hv", "ranges": [[0, MIB], [MIB, MIB]] });
        if let Some(a) = alg {
            b["algorithm"] = json!(a);
        }
        b
    };
    // A copy of an earlier version names no hash: BLAKE3.
    let (s, v) = h.post("/v1/peer/copy/hash", ask(None)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["algorithm"], "blake3");
    let b3 = blake3::hash(&zeros).to_hex().to_string();
    assert_eq!(v["hashes"], json!([b3, b3]));
    let (s, v) = h.post("/v1/peer/copy/hash", ask(Some("xxh3-128"))).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["algorithm"], "xxh3-128");
    let x = format!("{:032x}", twox_hash::XxHash3_128::oneshot(&zeros));
    assert_eq!(v["hashes"], json!([x, x]));
    let (s, v) = h.post("/v1/peer/copy/hash", ask(Some("md5"))).await;
    assert_eq!(s, 400, "{v}");
    assert!(v.to_string().contains("unknown hash"), "{v}");
}
