//! The batch-migration fault-injection engine, shared by
//! `cargo test -p ferryd --test batch` (a few trials) and
//! `ferry-bench faults` (the whole matrix).
//!
//! One trial: three real `ferryd` (coordinator C, source A, destination B,
//! ports pinned so restarts keep their addresses), two TCG guests writing
//! records on A, a batch A→B coordinated by C. The holding host runs with
//! the test-only `FERRY_OPS_TEST_PAUSE` hook armed at the phase's point and
//! `FERRY_OPS_TEST_RELEASE` naming a file; once a VM is held there the
//! fault is injected, what was killed is restarted (unarmed), and the hold
//! is released. When the batch has ended the trial derives the ground truth
//! itself (which QEMU process runs each VM, in which run state), compares
//! `status`, runs `recover`, and checks that every VM runs on exactly one
//! host, that its records verify, and that nothing is left behind.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ferry_testkit::{Disk, GuestConfig, GuestImage, NbdServer, Workload, disk};
use serde::Serialize;
use serde_json::{Value, json};

/// Where a batch is held when the fault strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    BeforeRecord,
    AfterRecord,
    AfterPlaceholder,
    DuringMemory,
    AfterSwitchover,
    AfterEvent,
}

impl Phase {
    pub const ALL: [Phase; 6] = [
        Phase::BeforeRecord,
        Phase::AfterRecord,
        Phase::AfterPlaceholder,
        Phase::DuringMemory,
        Phase::AfterSwitchover,
        Phase::AfterEvent,
    ];

    /// The pause point and whether the destination (else the source)
    /// holds it.
    fn point(self) -> (&'static str, bool) {
        match self {
            Phase::BeforeRecord => ("migrate.in:before-record", true),
            Phase::AfterRecord => ("migrate.in:recorded", true),
            Phase::AfterPlaceholder => ("vm.migrate:done:0", false),
            Phase::DuringMemory => ("vm.migrate:memory", false),
            Phase::AfterSwitchover => ("migrate.in:switched", true),
            Phase::AfterEvent => ("vm.migrate:started:4", false),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Phase::BeforeRecord => "before-record",
            Phase::AfterRecord => "after-record",
            Phase::AfterPlaceholder => "after-placeholder",
            Phase::DuringMemory => "during-memory",
            Phase::AfterSwitchover => "after-switchover",
            Phase::AfterEvent => "after-event",
        }
    }
}

/// What goes wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    KillCoordinator,
    KillSource,
    KillDestination,
    KillSourceQemu,
    /// The coordinator killed and its data directory (journal) lost: status
    /// and recover are asked of the destination.
    LoseCoordinator,
    /// The source site cut off from the others for [`CUT`]: host-a runs in
    /// its own network namespace behind a veth pair whose outer end goes
    /// down, then up.
    NetCut,
}

/// How long a network cut lasts (longer than the peers' 10 s timeout).
const CUT: Duration = Duration::from_secs(20);

impl Fault {
    pub const ALL: [Fault; 6] = [
        Fault::KillCoordinator,
        Fault::KillSource,
        Fault::KillDestination,
        Fault::KillSourceQemu,
        Fault::LoseCoordinator,
        Fault::NetCut,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::KillCoordinator => "kill-coordinator",
            Fault::KillSource => "kill-source-ferryd",
            Fault::KillDestination => "kill-destination-ferryd",
            Fault::KillSourceQemu => "kill-source-qemu",
            Fault::LoseCoordinator => "lose-coordinator-db",
            Fault::NetCut => "network-cut",
        }
    }
}

/// The outcome of one trial.
#[derive(Debug, Clone, Serialize)]
pub struct Trial {
    pub phase: Phase,
    pub fault: Fault,
    /// VMs whose status disagreed with the ground truth.
    pub wrong_status: u32,
    /// VMs running nowhere after recover.
    pub lost: u32,
    /// VMs running on both hosts after recover.
    pub duplicated: u32,
    /// Leftovers after recover (volumes, definitions, QEMU processes,
    /// exports, open records, inbound sources).
    pub orphans: u32,
    /// VMs whose records did not verify.
    pub bad_records: u32,
    /// Per VM: the status before recover and the ground truth.
    pub notes: Vec<String>,
    /// The trial could not be carried out (harness failure).
    pub error: Option<String>,
    pub seconds: f64,
}

impl Trial {
    pub fn clean(&self) -> bool {
        self.error.is_none()
            && self.wrong_status == 0
            && self.lost == 0
            && self.duplicated == 0
            && self.orphans == 0
            && self.bad_records == 0
    }
}

/// How long guests, operations and recoveries may take (TCG, shared CPU).
const T: Duration = Duration::from_secs(600);
const VMS: [&str; 2] = ["bvm1", "bvm2"];

/// One ferryd with pinned addresses, restartable.
struct Node {
    name: String,
    exe: PathBuf,
    _dir: Option<tempfile::TempDir>,
    data: PathBuf,
    http: String,
    nbd: String,
    url: String,
    token: String,
    child: Option<Child>,
    lines: Option<mpsc::Receiver<String>>,
    /// The network namespace ferryd runs in, if any.
    netns: Option<String>,
}

/// A network namespace with a veth pair to the root namespace: inside
/// `10.<n>.<m>.2`, outside `10.<n>.<m>.1`. Removed on drop.
pub struct Site {
    pub ns: String,
    pub outer_dev: String,
    pub inside: String,
    pub outside: String,
}

fn sh(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    if !out.status.success() {
        bail!("{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

impl Site {
    fn new() -> anyhow::Result<Site> {
        let id = std::process::id() as u16 ^ (rand_u16());
        let (n, m) = (100 + (id >> 8) % 100, id & 0xff);
        let ns = format!("ferryft{id:04x}");
        let outer = format!("fto{id:04x}");
        let inner = format!("fti{id:04x}");
        let inside = format!("10.{n}.{m}.2");
        let outside = format!("10.{n}.{m}.1");
        sh(&["ip", "netns", "add", &ns])?;
        let site = Site {
            ns: ns.clone(),
            outer_dev: outer.clone(),
            inside: inside.clone(),
            outside: outside.clone(),
        };
        sh(&[
            "ip", "link", "add", &outer, "type", "veth", "peer", "name", &inner,
        ])?;
        sh(&["ip", "link", "set", &inner, "netns", &ns])?;
        sh(&["ip", "addr", "add", &format!("{outside}/30"), "dev", &outer])?;
        sh(&["ip", "link", "set", &outer, "up"])?;
        let x = |a: &[&str]| {
            let mut v = vec!["ip", "netns", "exec", &ns];
            v.extend_from_slice(a);
            sh(&v)
        };
        x(&["ip", "addr", "add", &format!("{inside}/30"), "dev", &inner])?;
        x(&["ip", "link", "set", &inner, "up"])?;
        x(&["ip", "link", "set", "lo", "up"])?;
        Ok(site)
    }

    /// Cuts (`false`) or heals (`true`) the link.
    pub fn link(&self, up: bool) -> anyhow::Result<()> {
        sh(&[
            "ip",
            "link",
            "set",
            &self.outer_dev,
            if up { "up" } else { "down" },
        ])
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = sh(&["ip", "link", "del", &self.outer_dev]);
        let _ = sh(&["ip", "netns", "del", &self.ns]);
    }
}

fn rand_u16() -> u16 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    (t ^ (t >> 16)) as u16
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Node {
    /// A node listening on `ip`, in network namespace `netns` if given.
    fn new_at(exe: &Path, name: &str, ip: &str, netns: Option<&str>) -> anyhow::Result<Node> {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("data");
        let out = Command::new(exe)
            .args(["init", "--no-cli-config", "--name", name, "--data-dir"])
            .arg(&data)
            .output()?;
        if !out.status.success() {
            bail!("ferryd init: {}", String::from_utf8_lossy(&out.stderr));
        }
        let token = std::fs::read_to_string(data.join("admin.token"))?
            .trim()
            .to_string();
        let mut n = Node {
            name: name.into(),
            exe: exe.into(),
            _dir: Some(dir),
            data,
            http: format!("{ip}:{}", free_port()?),
            nbd: format!("{ip}:{}", free_port()?),
            url: String::new(),
            token,
            child: None,
            lines: None,
            netns: netns.map(str::to_string),
        };
        n.start(&[])?;
        Ok(n)
    }

    fn start(&mut self, env: &[(&str, String)]) -> anyhow::Result<()> {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.exe);
                c
            }
            None => Command::new(&self.exe),
        };
        cmd.args([
            "run",
            "--listen",
            &self.http,
            "--nbd-listen",
            &self.nbd,
            "--data-dir",
        ])
        .arg(&self.data)
        .env("FERRYD_LOG", "warn")
        .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn()?;
        let mut lines = BufReader::new(child.stderr.take().context("stderr")?).lines();
        let url = loop {
            let line = lines.next().context("ferryd exited before listening")??;
            if let Some((_, url)) = line.split_once(" listening on ") {
                break url.to_string();
            }
        };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        self.url = url;
        self.child = Some(child);
        self.lines = Some(rx);
        Ok(())
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for a stderr line containing `needle`.
    fn wait_line(&self, needle: &str, within: Duration) -> anyhow::Result<()> {
        let rx = self.lines.as_ref().context("not running")?;
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return Ok(()),
                Ok(_) => {}
                Err(_) => bail!("{}: no {needle:?} within {within:?}", self.name),
            }
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> (u16, Value) {
        let mut rb = reqwest::Client::new()
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(60));
        if !body.is_null() {
            rb = rb.json(&body);
        }
        match rb.send().await {
            Ok(r) => {
                let s = r.status().as_u16();
                let t = r.text().await.unwrap_or_default();
                (s, serde_json::from_str(&t).unwrap_or(Value::String(t)))
            }
            Err(e) => (0, Value::String(e.to_string())),
        }
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, Value::Null).await
    }

    async fn ok(&self, method: reqwest::Method, path: &str, body: Value) -> anyhow::Result<Value> {
        let (s, v) = self.call(method, path, body).await;
        if !(200..300).contains(&s) {
            bail!("{} {path}: {s} {v}", self.name);
        }
        Ok(v)
    }

    async fn wait_op(&self, id: &str) -> anyhow::Result<Value> {
        let deadline = Instant::now() + T;
        loop {
            let (s, op) = self.get(&format!("/v1/operations/{id}")).await;
            if s == 200 {
                let st = op["state"].as_str().unwrap_or("");
                if ["succeeded", "failed", "cancelled"].contains(&st) {
                    return Ok(op);
                }
            }
            if Instant::now() > deadline {
                bail!("{}: operation {id} did not end: {op}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Pids of QEMU processes of this host running VM `uuid`.
    fn qemus(&self, uuid: &str) -> Vec<u32> {
        qemus_matching(&[&self.data.to_string_lossy(), uuid])
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
        for pid in qemus_matching(&[&self.data.to_string_lossy()]) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

/// Pids of live `qemu-system` processes whose command line holds every
/// needle.
fn qemus_matching(needles: &[&str]) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("qemu-system") && needles.iter().all(|n| cmd.contains(n)) {
            out.push(pid);
        }
    }
    out
}

async fn register(from: &Node, to: &Node) -> anyhow::Result<()> {
    let t = to
        .ok(reqwest::Method::GET, "/v1/host/peer-token", Value::Null)
        .await?;
    from.ok(
        reqwest::Method::POST,
        "/v1/peers",
        json!({ "url": to.url, "token": t["token"] }),
    )
    .await?;
    Ok(())
}

async fn definition(name: &str, volume: &str) -> anyhow::Result<Value> {
    let image = GuestImage::get().await?;
    let mut cfg = GuestConfig::new(name);
    cfg.workload = Workload::records(20.0);
    cfg.disks.push(Disk::Nbd {
        server: NbdServer::Unix("/unused".into()),
        export: volume.into(),
    });
    Ok(json!({
        "name": name,
        "vcpus": 1,
        "memory_mib": 256,
        "disks": [volume],
        "boot": {
            "kind": "kernel",
            "kernel": image.kernel(),
            "initrd": image.initramfs(),
            "cmdline": cfg.kernel_cmdline(),
        },
        "guest_agent": true,
        "accel": "tcg",
    }))
}

/// Starts a guest on `a` writing records on its own volume; returns its
/// UUID once it wrote a record.
async fn start_guest(a: &Node, name: &str) -> anyhow::Result<String> {
    let vol = format!("{name}-disk");
    let raw = a.data.join(format!("{vol}.raw"));
    disk::make_ext4_disk(&raw, 32 << 20)?;
    let s = a
        .ok(
            reqwest::Method::POST,
            &format!("/v1/volumes/{vol}/import"),
            json!({ "path": raw }),
        )
        .await?;
    let op = a.wait_op(s["operation"].as_str().unwrap_or("")).await?;
    if op["state"] != "succeeded" {
        bail!("import of {vol}: {op}");
    }
    let _ = std::fs::remove_file(&raw);
    let v = a
        .ok(
            reqwest::Method::POST,
            "/v1/vms",
            definition(name, &vol).await?,
        )
        .await?;
    let uuid = v["uuid"].as_str().context("uuid")?.to_string();
    let v = a
        .ok(
            reqwest::Method::POST,
            &format!("/v1/vms/{name}/start"),
            json!({}),
        )
        .await?;
    let log = PathBuf::from(v["serial_log"].as_str().context("serial_log")?);
    let mut con = ferry_testkit::console::Console::new(&log);
    let deadline = Instant::now() + T;
    loop {
        con.poll()?;
        if con.events().iter().any(|e| e.name == "record") {
            return Ok(uuid);
        }
        if let Some(f) = con.fatal() {
            bail!("guest {name} failed: {f}");
        }
        if Instant::now() > deadline {
            bail!("guest {name} wrote no record: {}", con.tail(20));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A VM's live state on one host: its QEMU pids and run state.
async fn live(n: &Node, uuid: &str) -> (bool, Option<String>, Vec<u32>) {
    let (s, v) = n.get(&format!("/v1/vms/{uuid}")).await;
    let defined = s == 200;
    let qmp = v["qmp_status"].as_str().map(str::to_string);
    (defined, qmp, n.qemus(uuid))
}

/// The ground truth: does the destination hold VM `uuid` (switchover
/// happened)? From the QEMU processes and their run states only.
async fn truth(a: &Node, b: &Node, uuid: &str) -> (&'static str, String) {
    let (_, qa, pa) = live(a, uuid).await;
    let (_, qb, pb) = live(b, uuid).await;
    let b_runs = !pb.is_empty() && qb.as_deref().is_some_and(|s| s != "inmigrate");
    let a_handed = qa
        .as_deref()
        .is_some_and(|s| s == "postmigrate" || s == "finish-migrate");
    let side = if b_runs || a_handed {
        "destination"
    } else {
        "source"
    };
    (
        side,
        format!(
            "source qemu {:?} {:?}, destination qemu {:?} {:?}",
            pa, qa, pb, qb
        ),
    )
}

/// Stops the VM where it runs and verifies its records on its volume.
async fn verify_records(n: &Node, uuid: &str, vol: &str) -> anyhow::Result<()> {
    n.ok(
        reqwest::Method::POST,
        &format!("/v1/vms/{uuid}/stop?timeout_s=60"),
        json!({}),
    )
    .await?;
    let snap = format!("verify-{vol}");
    n.ok(
        reqwest::Method::POST,
        "/v1/snapshots",
        json!({ "name": snap, "volumes": [vol] }),
    )
    .await?;
    let e = n
        .ok(
            reqwest::Method::POST,
            "/v1/exports",
            json!({ "snapshot": snap }),
        )
        .await?;
    let copy = n.data.join(format!("{snap}.raw"));
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(e["unix_uri"].as_str().context("unix_uri")?)
        .arg(&copy)
        .status()?;
    if !st.success() {
        bail!("qemu-img convert of {vol} failed");
    }
    let report = disk::verify_records_on_image(&copy)?;
    let _ = std::fs::remove_file(&copy);
    if !report.ok || report.records == 0 {
        bail!("records of {vol} on {}: {report:?}", n.name);
    }
    let _ = n
        .call(
            reqwest::Method::DELETE,
            &format!("/v1/exports/{}", e["name"].as_str().unwrap_or("")),
            Value::Null,
        )
        .await;
    Ok(())
}

/// Leftovers of VM `uuid` (volume `vol`) on `n`, which must not hold it.
async fn leftovers(n: &Node, uuid: &str, vol: &str) -> Vec<String> {
    let mut out = Vec::new();
    if n.get(&format!("/v1/vms/{uuid}")).await.0 == 200 {
        out.push(format!("{}: VM definition", n.name));
    }
    if n.get(&format!("/v1/volumes/{vol}")).await.0 == 200 {
        out.push(format!("{}: volume {vol}", n.name));
    }
    let q = n.qemus(uuid);
    if !q.is_empty() {
        out.push(format!("{}: QEMU {q:?}", n.name));
    }
    let (_, ex) = n.get("/v1/exports").await;
    for e in ex.as_array().into_iter().flatten() {
        if e["name"].as_str().is_some_and(|x| x.contains(uuid)) {
            out.push(format!("{}: export {}", n.name, e["name"]));
        }
    }
    if n.get(&format!("/v1/peer/migrate/{uuid}")).await.0 == 200 {
        out.push(format!("{}: inbound source records", n.name));
    }
    out
}

/// Runs one trial. `exe` is a built `ferryd`.
pub async fn run_trial(exe: &Path, phase: Phase, fault: Fault) -> Trial {
    let t0 = Instant::now();
    let mut trial = Trial {
        phase,
        fault,
        wrong_status: 0,
        lost: 0,
        duplicated: 0,
        orphans: 0,
        bad_records: 0,
        notes: Vec::new(),
        error: None,
        seconds: 0.0,
    };
    if let Err(e) = trial_inner(exe, &mut trial).await {
        trial.error = Some(format!("{e:#}"));
    }
    trial.seconds = t0.elapsed().as_secs_f64();
    trial
}

async fn trial_inner(exe: &Path, t: &mut Trial) -> anyhow::Result<()> {
    let (point, dest_holds) = t.phase.point();
    // A network cut puts host-a in its own namespace; the others listen
    // on the outer end of its link.
    let site = if t.fault == Fault::NetCut {
        Some(Site::new()?)
    } else {
        None
    };
    let (outer_ip, a_ip, a_ns) = match &site {
        Some(s) => (s.outside.as_str(), s.inside.as_str(), Some(s.ns.as_str())),
        None => ("127.0.0.1", "127.0.0.1", None),
    };
    let mut c = Node::new_at(exe, "host-c", outer_ip, None)?;
    let mut a = Node::new_at(exe, "host-a", a_ip, a_ns)?;
    let mut b = Node::new_at(exe, "host-b", outer_ip, None)?;
    let release = c.data.parent().context("dir")?.join("release");
    let arm = vec![
        ("FERRY_OPS_TEST_PAUSE", point.to_string()),
        ("FERRY_OPS_TEST_RELEASE", release.display().to_string()),
    ];
    // The holder restarts armed.
    {
        let h = if dest_holds { &mut b } else { &mut a };
        h.kill9();
        h.start(&arm)?;
    }
    register(&c, &a).await?;
    register(&c, &b).await?;
    register(&a, &b).await?;
    register(&b, &a).await?;
    let mut uuids = Vec::new();
    for name in VMS {
        uuids.push(start_guest(&a, name).await?);
    }
    let batch = format!("t-{}-{}", t.phase.name(), t.fault.name());
    let s = c
        .ok(
            reqwest::Method::POST,
            "/v1/migrations/batches",
            json!({
                "vms": VMS, "to": "host-b", "name": batch, "parallel": 2,
                // Slow enough that memory is still moving while held.
                "bandwidth": 8 << 20,
            }),
        )
        .await?;
    let batch_op = s["operation"].as_str().context("operation")?.to_string();
    {
        let h = if dest_holds { &b } else { &a };
        h.wait_line(&format!("FERRY_OPS_TEST_PAUSED {point}"), T)?;
    }
    // The fault, then the restart of what was killed.
    let mut coordinator_lost = false;
    match t.fault {
        Fault::KillCoordinator => {
            c.kill9();
            c.start(&[])?;
        }
        Fault::LoseCoordinator => {
            c.kill9();
            coordinator_lost = true;
        }
        Fault::KillSource => {
            a.kill9();
            a.start(&[])?;
        }
        Fault::KillDestination => {
            b.kill9();
            b.start(&[])?;
        }
        Fault::NetCut => {
            let s = site.as_ref().context("site")?;
            s.link(false)?;
            // Released while cut: the held step meets the cut.
            std::fs::write(&release, b"go")?;
            tokio::time::sleep(CUT).await;
            s.link(true)?;
        }
        Fault::KillSourceQemu => {
            for u in &uuids {
                for pid in a.qemus(u) {
                    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                }
            }
        }
    }
    std::fs::write(&release, b"go")?;
    // Wait until the migrations have ended: the batch operation (when the
    // coordinator lives), then every vm.migrate on the source.
    if !coordinator_lost {
        c.wait_op(&batch_op).await?;
    }
    let deadline = Instant::now() + T;
    loop {
        let (_, ops) = a.get("/v1/operations").await;
        let busy = ops.as_array().into_iter().flatten().any(|o| {
            o["kind"] == "vm.migrate"
                && !["succeeded", "failed", "cancelled"]
                    .contains(&o["state"].as_str().unwrap_or(""))
        });
        if !busy {
            break;
        }
        if Instant::now() > deadline {
            bail!("vm.migrate operations on host-a did not end");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Status: from the coordinator, or from the destination's records
    // when the coordinator lost its database.
    // (the source, which holds no journal of the batch, asks host-b).
    let (asker, q) = if coordinator_lost {
        (&a, "?dest=host-b".to_string())
    } else {
        (&c, String::new())
    };
    let st = asker
        .ok(
            reqwest::Method::GET,
            &format!("/v1/migrations/batches/{batch}{q}"),
            Value::Null,
        )
        .await?;
    for u in &uuids {
        let (side, why) = truth(&a, &b, u).await;
        let v = st["vms"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["vm"] == json!(u))
            .cloned()
            .unwrap_or(Value::Null);
        let wrong = v["side"] != json!(side) || (v["state"] == "migrated" && side != "destination");
        if wrong {
            t.wrong_status += 1;
        }
        t.notes.push(format!(
            "{}: status {} on {} ({}) evidence {}; truth {side} ({why}){}",
            v["name"].as_str().unwrap_or(u),
            v["state"],
            v["side"],
            v["reason"].as_str().unwrap_or(""),
            v["evidence"],
            if wrong { " WRONG" } else { "" }
        ));
    }
    // Recover.
    let r = asker
        .ok(
            reqwest::Method::POST,
            &format!("/v1/migrations/batches/{batch}/recover{q}"),
            json!({}),
        )
        .await?;
    let op = asker
        .wait_op(r["operation"].as_str().context("operation")?)
        .await?;
    if op["state"] != "succeeded" {
        t.notes
            .push(format!("recover {}: {}", op["state"], op["error"]));
    }
    // Every VM on exactly one host, records good, nothing left.
    for (i, u) in uuids.iter().enumerate() {
        let vol = format!("{}-disk", VMS[i]);
        let (_, qa, pa) = live(&a, u).await;
        let (_, qb, pb) = live(&b, u).await;
        let ra = !pa.is_empty() && qa.as_deref() == Some("running");
        let rb = !pb.is_empty() && qb.as_deref() == Some("running");
        let (holder, other) = match (ra, rb) {
            (true, false) => (&a, &b),
            (false, true) => (&b, &a),
            (true, true) => {
                t.duplicated += 1;
                t.notes.push(format!("{}: runs on both hosts", VMS[i]));
                continue;
            }
            (false, false) => {
                t.lost += 1;
                t.notes.push(format!(
                    "{}: runs nowhere (A {qa:?} {pa:?}, B {qb:?} {pb:?})",
                    VMS[i]
                ));
                continue;
            }
        };
        let left = leftovers(other, u, &vol).await;
        if !left.is_empty() {
            t.orphans += left.len() as u32;
            t.notes.push(format!("{}: left behind {left:?}", VMS[i]));
        }
        if holder.name == "host-b" {
            let (_, recs) = b
                .get(&format!("/v1/peer/migrations/records?batch={batch}"))
                .await;
            if recs["records"][u.as_str()]["completed"].is_null() {
                t.orphans += 1;
                t.notes
                    .push(format!("{}: runs on B without a completed event", VMS[i]));
            }
        }
        if let Err(e) = verify_records(holder, u, &vol).await {
            t.bad_records += 1;
            t.notes.push(format!("{}: {e:#}", VMS[i]));
        }
    }
    Ok(())
}
