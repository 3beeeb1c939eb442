//! Live migration with on-demand data between real `ferryd` processes:
//! a TCG guest writing records moves A→B (and on to C before B has all of
//! its data), its records verify on the last host after hydration, and
//! every source volume is released. Cancel before switchover, and the
//! source or the destination killed (-9) during hydration.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::Host;
use ferry_testkit::console::Console;
use ferry_testkit::{Disk, GuestConfig, GuestImage, NbdServer, Workload, disk};
use serde_json::{Value, json};

/// Guest events and operations under TCG on a shared machine are slow.
const T: Duration = Duration::from_secs(300);

/// Kills, on drop, every QEMU whose command line names one of these data
/// directories (ferryd never kills its VMs itself).
struct Reaper(Vec<PathBuf>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for d in &self.0 {
            for pid in qemus_of(d) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
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

async fn definition(name: &str, volumes: &[&str]) -> Value {
    let volume = volumes[0];
    let image = GuestImage::get().await.unwrap();
    let mut cfg = GuestConfig::new(name);
    cfg.workload = Workload::records(20.0);
    cfg.disks.push(Disk::Nbd {
        server: NbdServer::Unix("/unused".into()),
        export: volume.into(),
    });
    json!({
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
    })
}

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

async fn peer_token(h: &Host) -> String {
    let (s, t) = h.get("/v1/host/peer-token").await;
    assert_eq!(s, 200, "{t}");
    t["token"].as_str().unwrap().to_string()
}

/// Registers `to` as a peer of `from` under `to`'s host name.
async fn register(from: &Host, to: &Host) {
    let (s, p) = from
        .post(
            "/v1/peers",
            json!({ "url": to.url, "token": peer_token(to).await }),
        )
        .await;
    assert_eq!(s, 201, "{p}");
}

/// Waits for an operation to finish, printing its progress now and then.
async fn wait_op(h: &Host, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut last_print = Instant::now();
    loop {
        let (s, op) = h.get(&format!("/v1/operations/{id}")).await;
        assert_eq!(s, 200, "{op}");
        let state = op["state"].as_str().unwrap();
        if ["succeeded", "failed", "cancelled"].contains(&state) {
            return op;
        }
        if last_print.elapsed() > Duration::from_secs(10) {
            println!("op {id}: {state} {}", op["progress"]["fraction"]);
            last_print = Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "operation {id} still {state}: {op}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the operation's step `step` has started (or finished).
async fn wait_step(h: &Host, id: &str, step: &str) -> Value {
    let deadline = Instant::now() + T;
    loop {
        let (_, op) = h.get(&format!("/v1/operations/{id}")).await;
        let steps = op["steps"].as_array().cloned().unwrap_or_default();
        if steps.iter().any(|s| s["name"] == step) {
            return op;
        }
        let state = op["state"].as_str().unwrap_or("");
        assert!(
            !["succeeded", "failed", "cancelled"].contains(&state),
            "operation ended before step {step}: {op}"
        );
        assert!(Instant::now() < deadline, "step {step} never started: {op}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn import_disk(h: &Host, volume: &str, size: u64) {
    let raw = h.dir.path().join(format!("{volume}.raw"));
    disk::make_ext4_disk(&raw, size).unwrap();
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

/// Defines and starts `vm1` on `h` with its disk on `volume`; returns its
/// console once it wrote a first record.
async fn start_guest(h: &Host, volumes: &[&str]) -> Console {
    let (s, v) = h.post("/v1/vms", definition("vm1", volumes).await).await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = h.post("/v1/vms/vm1/start", json!({})).await;
    assert_eq!(s, 200, "{v}");
    let mut c = Console::new(Path::new(v["serial_log"].as_str().unwrap()));
    wait_event(&mut c, "ready", |e| e.name == "ready");
    wait_record_after(&mut c, None);
    c
}

/// The console of `vm1` on `h` (its serial log there).
async fn console_on(h: &Host) -> Console {
    let (s, v) = h.get("/v1/vms/vm1").await;
    assert_eq!(s, 200, "{v}");
    Console::new(Path::new(v["serial_log"].as_str().unwrap()))
}

/// Stops `vm1` on `h` and checks that every record the guest
/// acknowledged (up to `acked`) is on `volume`.
async fn stop_and_verify(h: &Host, volume: &str, acked: u64) {
    let (s, st) = h.post("/v1/vms/vm1/stop?timeout_s=60", json!({})).await;
    assert_eq!(s, 200, "{st}");
    let (s, v) = h.get(&format!("/v1/volumes/{volume}")).await;
    assert_eq!(s, 200, "{v}");
    let (s, e) = h
        .post(
            "/v1/snapshots",
            json!({ "name": "verify", "volumes": [volume] }),
        )
        .await;
    assert_eq!(s, 201, "{e}");
    let (s, e) = h.post("/v1/exports", json!({ "snapshot": "verify" })).await;
    assert_eq!(s, 201, "{e}");
    let copy = h.dir.path().join("verify.raw");
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
        "{} records on {volume}, last acknowledged seq {acked}",
        report.records
    );
}

async fn migrate(h: &Host, to: &str, extra: Value) -> String {
    let mut body = json!({ "to": to });
    if let Some(o) = extra.as_object() {
        for (k, v) in o {
            body[k] = v.clone();
        }
    }
    let (s, r) = h.post("/v1/vms/vm1/migrate", body).await;
    assert_eq!(s, 202, "{r}");
    r["operation"].as_str().unwrap().to_string()
}

/// The VM and its volume are gone from `h`.
async fn assert_released(h: &Host, volume: &str) {
    let (s, v) = h.get("/v1/vms/vm1").await;
    assert_eq!(s, 404, "{v}");
    let (s, v) = h.get(&format!("/v1/volumes/{volume}")).await;
    assert_eq!(s, 404, "{v}");
}

fn print_log(op: &Value) {
    for l in op["log"].as_array().into_iter().flatten() {
        println!("  {}", l["msg"].as_str().unwrap_or(""));
    }
}

#[tokio::test]
async fn a_writing_guest_migrates_on_demand_then_again_before_hydration_ends() {
    let a = Host::named("host-a");
    let b = Host::named("host-b");
    let c = Host::named("host-c");
    let _reaper = Reaper(vec![a.data(), b.data(), c.data()]);
    chain(&a, &b, &c).await;
}

/// Three network namespaces on one bridge, each with its own address;
/// removed on drop (the test's failure included). The test process
/// reaches them through the bridge's own address.
struct Netns {
    bridge: String,
    spaces: Vec<String>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {}: {} (network namespaces need root and iproute2)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    /// Namespaces `<tag>a`, `<tag>b`, ... with addresses `10.<n>.<m>.1`,
    /// `.2`, ...; returns (namespace, address) pairs.
    fn new(hosts: usize) -> (Netns, Vec<(String, String)>) {
        let pid = std::process::id();
        let tag = format!("fm{pid}");
        let net = format!("10.{}.{}", 200 + (pid >> 8) % 50, pid % 256);
        let mut me = Netns {
            bridge: format!("{tag}br"),
            spaces: Vec::new(),
        };
        ip(&["link", "add", &me.bridge, "type", "bridge"]);
        ip(&["addr", "add", &format!("{net}.254/24"), "dev", &me.bridge]);
        ip(&["link", "set", &me.bridge, "up"]);
        let mut out = Vec::new();
        for i in 0..hosts {
            let ns = format!("{tag}{}", (b'a' + i as u8) as char);
            let veth = format!("{tag}v{i}");
            ip(&["netns", "add", &ns]);
            me.spaces.push(ns.clone());
            ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ]);
            ip(&["link", "set", &veth, "master", &me.bridge, "up"]);
            let addr = format!("{net}.{}", i + 1);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            out.push((ns, addr));
        }
        (me, out)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // A namespace's veth goes with it, and its peer on the bridge.
        for ns in &self.spaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}

/// The namespace of process `pid` (the target of /proc/pid/ns/net).
fn netns_of(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/net"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[tokio::test]
async fn on_demand_chain_between_hosts_in_network_namespaces() {
    // Dropped last: the hosts and their QEMUs go first.
    let (_netns, spaces) = Netns::new(3);
    let a = Host::in_netns("host-a", &spaces[0].0, &spaces[0].1);
    let b = Host::in_netns("host-b", &spaces[1].0, &spaces[1].1);
    let c = Host::in_netns("host-c", &spaces[2].0, &spaces[2].1);
    let _reaper = Reaper(vec![a.data(), b.data(), c.data()]);
    for (h, (_, addr)) in [&a, &b, &c].iter().zip(&spaces) {
        assert!(h.url.contains(addr.as_str()), "{} not on {addr}", h.url);
        assert!(h.nbd.starts_with(addr.as_str()), "{} not on {addr}", h.nbd);
    }
    let names: Vec<String> = spaces.iter().map(|s| s.0.clone()).collect();
    chain_checked(&a, &b, &c, Some(&names)).await;
}

/// Every QEMU of `h` runs in network namespace `ns`.
fn assert_qemus_in(h: &Host, ns: &str) {
    use std::os::unix::fs::MetadataExt;
    let want = format!(
        "net:[{}]",
        std::fs::metadata(format!("/run/netns/{ns}")).unwrap().ino()
    );
    let pids = qemus_of(&h.data());
    assert!(!pids.is_empty(), "no QEMU of {}", h.url);
    for pid in pids {
        assert_eq!(
            netns_of(pid),
            want,
            "QEMU {pid} of {} is not in {ns}",
            h.url
        );
    }
}

async fn chain(a: &Host, b: &Host, c: &Host) {
    chain_checked(a, b, c, None).await
}

/// A→B on demand, then B→C before B's hydration ends; records verify on
/// C and every source volume is released.
async fn chain_checked(a: &Host, b: &Host, c: &Host, netns: Option<&[String]>) {
    register(a, b).await;
    register(b, c).await;
    import_disk(a, "data", 256 << 20).await;
    let mut con_a = start_guest(a, &["data"]).await;
    if let Some(ns) = netns {
        assert_qemus_in(a, &ns[0]);
    }

    // A → B on demand.
    let t = Instant::now();
    let op_ab = migrate(a, "host-b", json!({})).await;
    wait_step(a, &op_ab, "hydration").await;
    println!(
        "A→B: hydration started {:.1?} after the request",
        t.elapsed()
    );
    let before = last_record(&mut con_a);
    let mut con_b = console_on(b).await;
    let seq = wait_record_after(&mut con_b, before);
    println!("A→B: the guest writes on B (record {seq}, last on A {before:?})");

    // B → C at once, while B still fetches from A.
    let (_, st) = b
        .get(&format!("/v1/peer/migrate/{}", vm_uuid(b).await))
        .await;
    println!("B's hydration when B→C starts: {st}");
    let op_bc = migrate(b, "host-c", json!({})).await;
    let op = wait_op(b, &op_bc).await;
    print_log(&op);
    assert_eq!(op["state"], "succeeded", "{op}");
    let op = wait_op(a, &op_ab).await;
    print_log(&op);
    assert_eq!(op["state"], "succeeded", "{op}");
    println!(
        "A→B→C: both operations done {:.1?} after the first request",
        t.elapsed()
    );

    let before = last_record(&mut con_b);
    let mut con_c = console_on(c).await;
    let mut seq = wait_record_after(&mut con_c, before);
    for _ in 0..3 {
        seq = wait_record_after(&mut con_c, Some(seq));
    }
    assert_released(a, "data").await;
    assert_released(b, "data").await;
    let (_, v) = c.get("/v1/volumes/data").await;
    println!("on C: {v}");
    if let Some(ns) = netns {
        assert_qemus_in(c, &ns[2]);
    }
    let acked = last_record(&mut con_c).unwrap();
    stop_and_verify(c, "data", acked).await;
}

async fn vm_uuid(h: &Host) -> String {
    let (s, v) = h.get("/v1/vms/vm1").await;
    assert_eq!(s, 200, "{v}");
    v["uuid"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn cancel_before_switchover_leaves_the_vm_running_on_the_source() {
    let a = Host::named("host-a");
    let b = Host::named("host-b");
    let _reaper = Reaper(vec![a.data(), b.data()]);
    register(&a, &b).await;
    import_disk(&a, "data", 64 << 20).await;
    let mut con_a = start_guest(&a, &["data"]).await;
    let (_, v) = a.get("/v1/vms/vm1").await;
    let pid = v["pid"].as_u64().unwrap();

    // 1 MiB/s: the first pass over the guest's memory takes a while.
    let op = migrate(&a, "host-b", json!({ "bandwidth": 1 << 20 })).await;
    wait_step(&a, &op, "memory").await;
    // B has the VM waiting and its lazy volume.
    let deadline = Instant::now() + T;
    loop {
        let (s, v) = b.get("/v1/vms/vm1").await;
        if s == 200 {
            println!("on B before cancel: {} {}", v["state"], v["qmp_status"]);
            break;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (s, r) = a
        .post(&format!("/v1/operations/{op}/cancel"), json!({}))
        .await;
    assert!(s == 200 || s == 202, "{s} {r}");
    let op = wait_op(&a, &op).await;
    print_log(&op);
    assert_eq!(op["state"], "cancelled", "{op}");

    // The VM runs on A, the same QEMU, and keeps writing.
    let (_, v) = a.get("/v1/vms/vm1").await;
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["qmp_status"], "running", "{v}");
    assert_eq!(v["pid"].as_u64(), Some(pid), "{v}");
    let seq = last_record(&mut con_a);
    let next = wait_record_after(&mut con_a, seq);
    println!("after cancel the guest wrote record {next} on A");
    // Nothing is left on B.
    let (s, v) = b.get("/v1/vms/vm1").await;
    assert_eq!(s, 404, "{v}");
    let (s, v) = b.get("/v1/volumes/data").await;
    assert_eq!(s, 404, "{v}");
    assert!(qemus_of(&b.data()).is_empty(), "a QEMU is left on B");
    let acked = last_record(&mut con_a).unwrap();
    stop_and_verify(&a, "data", acked).await;
}

/// A volume of `mib` MiB of random data (every chunk must be fetched).
async fn import_random(h: &Host, volume: &str, mib: u64) {
    let raw = h.dir.path().join(format!("{volume}.raw"));
    let st = Command::new("dd")
        .args(["if=/dev/urandom", "bs=1M", "status=none"])
        .arg(format!("count={mib}"))
        .arg(format!("of={}", raw.display()))
        .status()
        .unwrap();
    assert!(st.success());
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

/// B's view of the incoming VM's hydration.
async fn incoming(b: &Host, uuid: &str) -> Value {
    let (s, st) = b.get(&format!("/v1/peer/migrate/{uuid}")).await;
    assert_eq!(s, 200, "{st}");
    st
}

fn missing(st: &Value) -> u64 {
    st["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["missing_chunks"].as_u64().unwrap())
        .sum()
}

/// Sets up A (guest writing records on `data`, 128 MiB of random data on
/// `bulk`) and B, and migrates A→B with hydration capped at 8 MiB/s;
/// returns once hydration has started and fetched something.
async fn migrating_pair() -> (Host, Host, String, String) {
    migrating_pair_with(json!({})).await
}

/// [`migrating_pair`] with extra migration parameters.
async fn migrating_pair_with(extra: Value) -> (Host, Host, String, String) {
    let mut a = Host::named("host-a");
    let mut b = Host::named("host-b");
    // They restart on the same ports: B's lazy volumes hold A's NBD
    // address, A's peer record B's URL.
    a.pin_ports();
    b.pin_ports();
    register(&a, &b).await;
    import_disk(&a, "data", 64 << 20).await;
    import_random(&a, "bulk", 128).await;
    start_guest(&a, &["data", "bulk"]).await;
    let uuid = vm_uuid(&a).await;
    let mut params = json!({ "bandwidth": 8 << 20 });
    for (k, v) in extra.as_object().unwrap() {
        params[k] = v.clone();
    }
    let op = migrate(&a, "host-b", params).await;
    wait_step(&a, &op, "hydration").await;
    let deadline = Instant::now() + T;
    loop {
        let st = incoming(&b, &uuid).await;
        let present: u64 = st["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["present_chunks"].as_u64().unwrap())
            .sum();
        if present > 100 && !st["done"].as_bool().unwrap() {
            println!("hydrating: {st}");
            break;
        }
        assert!(Instant::now() < deadline, "{st}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    (a, b, uuid, op)
}

#[tokio::test]
async fn the_source_killed_during_hydration_and_restarted_resumes() {
    let (mut a, b, uuid, op) = migrating_pair().await;
    let _reaper = Reaper(vec![a.data(), b.data()]);
    a.kill9();
    // While A is down, B names the missing chunks and why (once the NBD
    // client's reconnection attempts are spent).
    let deadline = Instant::now() + T;
    let st = loop {
        let st = incoming(&b, &uuid).await;
        let said = st["disks"].as_array().unwrap().iter().any(|d| {
            d["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("unreachable"))
        });
        if said {
            break st;
        }
        assert!(Instant::now() < deadline, "{st}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    println!("A down: {st}");
    let down = missing(&st);
    assert!(down > 0, "{st}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        missing(&incoming(&b, &uuid).await),
        down,
        "fetched while the source was down"
    );
    // The guest keeps running on B meanwhile (its disk's chunks that it
    // reads were fetched, or it waits for them).
    a.start();
    let op = wait_op(&a, &op).await;
    print_log(&op);
    assert_eq!(op["state"], "succeeded", "{op}");
    assert_released(&a, "data").await;
    let (s, v) = a.get("/v1/volumes/bulk").await;
    assert_eq!(s, 404, "{v}");
    let mut con = console_on(&b).await;
    let seq = last_record(&mut con);
    wait_record_after(&mut con, seq);
    let acked = last_record(&mut con).unwrap();
    stop_and_verify(&b, "data", acked).await;
    assert_same_bulk(&a, &b).await;
}

#[tokio::test]
async fn the_destination_killed_during_hydration_and_restarted_resumes() {
    let (a, mut b, uuid, op) = migrating_pair().await;
    let _reaper = Reaper(vec![a.data(), b.data()]);
    let before = missing(&incoming(&b, &uuid).await);
    b.kill9();
    tokio::time::sleep(Duration::from_secs(3)).await;
    b.start();
    let st = incoming(&b, &uuid).await;
    println!("B restarted: {st} (missing before the kill: {before})");
    assert!(st["hydrating"].as_bool().unwrap(), "{st}");
    let op = wait_op(&a, &op).await;
    print_log(&op);
    assert_eq!(op["state"], "succeeded", "{op}");
    assert_released(&a, "data").await;
    let (_, v) = b.get("/v1/vms/vm1").await;
    assert_eq!(v["state"], "running", "{v}");
    let mut con = console_on(&b).await;
    let seq = last_record(&mut con);
    wait_record_after(&mut con, seq);
    let acked = last_record(&mut con).unwrap();
    stop_and_verify(&b, "data", acked).await;
    // The bulk disk is whole on B and equal to what A had.
    let (s, v) = b.get("/v1/volumes/bulk").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["lazy"], false, "{v}");
    assert_same_bulk(&a, &b).await;
}

/// B's `bulk` volume holds exactly the random data imported on A.
async fn assert_same_bulk(a: &Host, b: &Host) {
    let (s, e) = b
        .post(
            "/v1/snapshots",
            json!({ "name": "bulk-check", "volumes": ["bulk"] }),
        )
        .await;
    assert_eq!(s, 201, "{e}");
    let (s, e) = b
        .post("/v1/exports", json!({ "snapshot": "bulk-check" }))
        .await;
    assert_eq!(s, 201, "{e}");
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(a.dir.path().join("bulk.raw"))
        .arg(e["unix_uri"].as_str().unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bulk differs: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Waits for an operation like [`wait_op`], checking that its overall
/// progress never goes backwards.
async fn wait_op_monotonic(h: &Host, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut last = 0.0f64;
    let mut last_print = Instant::now();
    loop {
        let (s, op) = h.get(&format!("/v1/operations/{id}")).await;
        assert_eq!(s, 200, "{op}");
        let f = op["progress"]["fraction"].as_f64().unwrap_or(0.0);
        assert!(
            f + 1e-9 >= last,
            "progress went back from {last} to {f}: {op}"
        );
        last = f;
        let state = op["state"].as_str().unwrap();
        if ["succeeded", "failed", "cancelled"].contains(&state) {
            return op;
        }
        if last_print.elapsed() > Duration::from_secs(10) {
            println!("op {id}: {state} {f:.3}");
            last_print = Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "operation {id} still {state}: {op}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_writing_guest_migrates_in_precopy_mode() {
    let a = Host::named("host-a");
    let b = Host::named("host-b");
    let _reaper = Reaper(vec![a.data(), b.data()]);
    register(&a, &b).await;
    import_disk(&a, "data", 128 << 20).await;
    import_random(&a, "bulk", 64).await;
    let mut con_a = start_guest(&a, &["data", "bulk"]).await;

    let t = Instant::now();
    let op = migrate(&a, "host-b", json!({ "mode": "precopy" })).await;
    let op = wait_op_monotonic(&a, &op).await;
    print_log(&op);
    assert_eq!(op["state"], "succeeded", "{op}");
    let steps: Vec<&str> = op["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        ["prepare", "mirror", "memory", "switchover", "release"],
        "{op}"
    );
    println!("precopy A→B done {:.1?} after the request", t.elapsed());

    // The guest writes on B, on plain volumes that owe nothing to A.
    let before = last_record(&mut con_a);
    let mut con_b = console_on(&b).await;
    let mut seq = wait_record_after(&mut con_b, before);
    for _ in 0..3 {
        seq = wait_record_after(&mut con_b, Some(seq));
    }
    println!("the guest writes on B (record {seq}, last seen on A {before:?})");
    for v in ["data", "bulk"] {
        let (s, info) = b.get(&format!("/v1/volumes/{v}")).await;
        assert_eq!(s, 200, "{info}");
        assert_eq!(info["lazy"], false, "{info}");
    }
    // Nothing of the arrival is left to abort on B.
    let uuid = vm_uuid(&b).await;
    let (s, r) = b.delete(&format!("/v1/peer/migrate-precopy/{uuid}")).await;
    assert_eq!(s, 404, "{r}");
    assert_released(&a, "data").await;
    let (s, v) = a.get("/v1/volumes/bulk").await;
    assert_eq!(s, 404, "{v}");
    assert!(qemus_of(&a.data()).is_empty(), "a QEMU is left on A");
    let acked = last_record(&mut con_b).unwrap();
    stop_and_verify(&b, "data", acked).await;
    assert_same_bulk(&a, &b).await;
}

/// Reads all of `volume` on `h` through a new export; the error output of
/// `qemu-img` when the read fails.
async fn read_volume(h: &Host, volume: &str, export: &str) -> Result<(), String> {
    let (s, e) = h
        .post("/v1/exports", json!({ "volume": volume, "name": export }))
        .await;
    assert_eq!(s, 201, "{e}");
    let out = h.dir.path().join(format!("{export}.raw"));
    let r = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(e["unix_uri"].as_str().unwrap())
        .arg(&out)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&out);
    let (s, e) = h.delete(&format!("/v1/exports/{export}")).await;
    assert_eq!(s, 204, "{e}");
    if r.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&r.stderr).into_owned())
    }
}

#[tokio::test]
async fn on_missing_error_fails_reads_of_missing_chunks_while_the_source_is_down() {
    let (mut a, b, uuid, op) = migrating_pair_with(json!({ "on_missing": "error" })).await;
    let _reaper = Reaper(vec![a.data(), b.data()]);
    // The guest's own disk first: only `bulk` should be left to fetch.
    let deadline = Instant::now() + T;
    loop {
        let st = incoming(&b, &uuid).await;
        let data_done = st["disks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["volume"] == "data" && d["done"] == true);
        if data_done {
            break;
        }
        assert!(Instant::now() < deadline, "{st}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    a.kill9();
    let deadline = Instant::now() + T;
    let st = loop {
        let st = incoming(&b, &uuid).await;
        let said = st["disks"].as_array().unwrap().iter().any(|d| {
            d["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("unreachable"))
        });
        if said {
            break st;
        }
        assert!(Instant::now() < deadline, "{st}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    println!("A down: {st}");
    assert!(missing(&st) > 0, "{st}");
    // A read of the missing chunks fails (it does not wait for A).
    let t = Instant::now();
    let err = read_volume(&b, "bulk", "bulk-read-1")
        .await
        .expect_err("a read of chunks B does not have succeeded while A is down");
    println!("read failed after {:.1?}: {err}", t.elapsed());
    assert!(err.contains("Input/output error"), "{err}");

    a.start();
    let op = wait_op(&a, &op).await;
    print_log(&op);
    assert_eq!(op["state"], "succeeded", "{op}");
    read_volume(&b, "bulk", "bulk-read-2").await.unwrap();
    assert_same_bulk(&a, &b).await;
    let mut con = console_on(&b).await;
    let seq = last_record(&mut con);
    wait_record_after(&mut con, seq);
    let acked = last_record(&mut con).unwrap();
    stop_and_verify(&b, "data", acked).await;
}
