//! Targeted, application-consistent group snapshots of running VMs (flow 1
//! of DESIGN.md): the `vm-snapshot` operation.
//!
//! # Steps (each journaled: intent before it acts, result after)
//! Overlay mode:
//! 1. `resolve` — for each VM, read QEMU's block graph; each disk's base
//!    layer must be an export of this host's NBD socket, whose volume is
//!    the disk's (host, pool, volume). Read-only; retried after a crash.
//! 2. `vm <name>: quiesce, overlay, thaw` (one per VM) — create the
//!    overlays (qcow2 files in `<data>/overlays/<group>/<vm>/`, added to
//!    QEMU, not yet used), freeze the guest through its agent, switch every
//!    disk to its overlay in one QMP `transaction`, thaw. The intent names
//!    the overlay directory, which is all the undo needs: it thaws the
//!    guest, commits every overlay of that directory that is active (the
//!    guest's newer writes are in it: they are never discarded), deletes
//!    the ones that are not, and removes the files. A crash inside the step
//!    (even while the guest is frozen) is compensated.
//! 3. `storage snapshot` — one pool group snapshot of exactly the resolved
//!    volumes (the base volumes no longer change: writes go to overlays).
//!    Retried after a crash (it checks whether the snapshots exist); undo
//!    deletes them.
//! 4. `vm <name>: merge` (one per VM) — commit every overlay back into its
//!    base (active commit), drop it and remove its file. Retried after a
//!    crash (the sweep finds what is left).
//! 5. `record` — write `<data>/vmsnaps/<group>.json` (the snapshot group).
//!
//! Direct mode replaces 2–4 by one step `quiesce, snapshot, thaw`: freeze
//! every guest (in parallel), take the pool group snapshot, thaw them all;
//! its undo thaws every guest and deletes the snapshots.
//!
//! Nothing is written to the journal while a guest is frozen: the step's
//! intent is journaled before the freeze and its log lines after the thaw,
//! so the guests' pause holds no fsync.
//!
//! # Consistency
//! A VM is *quiesced* when its agent froze its file systems for the
//! switch (overlay) or the pool snapshot (direct). A VM with no agent
//! channel, whose agent does not answer a sync within [`AGENT_PROBE`], whose
//! freeze fails, or a request with `quiesce: false`, is snapshotted
//! *crash-consistent*; the group record and the operation's log say why.
//!
//! Disks in pools of other hosts are snapshotted on those hosts
//! (`remote.rs`), one atomic group snapshot per pool.
//!
//! Files: this one (plan, resolve, storage snapshot, record),
//! `overlay_mode.rs` (per-VM quiesce + overlay switch, merge),
//! `direct_mode.rs` (the one quiesce-snapshot-thaw step), `remote.rs`
//! (peers' pools), `store.rs` (groups at rest).

mod direct_mode;
mod overlay_mode;
mod remote;
mod store;

use direct_mode::Direct;
use overlay_mode::{Merge, VmOverlay};

pub use store::{
    GroupError, clone_vm, delete_group, group_exists, list_groups, read_group, revert,
};

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry_api::{Consistency, VmSnapshotDisk, VmSnapshotGroup, VmSnapshotMode, VmSnapshotVm};
use ferry_ops::{
    BoxFuture, Manager, Plan, ProgressTree, Recovery, Step, StepContext, StepError, test_pause,
};
use ferry_qemu::{
    BlockTarget, NbdServer, Overlay, OverlaySet, QgaClient, QmpClient, block_graph, overlay,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::daemon::App;
use crate::exports::Exports;
use crate::operations::blocking;
use crate::peers::Peers;
use crate::vms::{Vm, Vms};
use remote::RemotePair;

/// The operation kind.
pub const KIND: &str = "vm-snapshot";

/// How long an agent has to answer the sync that precedes a freeze.
pub const AGENT_PROBE: Duration = Duration::from_secs(3);

/// How long a freeze or a thaw may take.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long each phase of an overlay's commit may take.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(600);

/// How long an undo after a restart waits for ferryd to re-attach a VM.
const REATTACH_WAIT: Duration = Duration::from_secs(30);

/// Test-only fault injection: `FERRY_VMSNAP_TEST_FAULT=qmp:<vm>` makes the
/// overlay transaction of VM `<vm>` name a node that does not exist, so
/// QEMU answers it with an error. Never set outside tests.
pub const FAULT_VAR: &str = "FERRY_VMSNAP_TEST_FAULT";

/// What the steps act on besides the pool.
pub struct Env {
    pub vms: Arc<Vms>,
    pub exports: Arc<Exports>,
    /// Other hosts, whose pools may hold some of the VMs' disks.
    pub peers: Arc<Peers>,
    /// This host's name.
    pub host: String,
    /// `<data>`.
    pub root: PathBuf,
}

impl Env {
    pub fn groups_dir(&self) -> PathBuf {
        self.root.join("vmsnaps")
    }

    fn overlay_dir(&self, group: &str, vm: &str) -> PathBuf {
        self.root.join("overlays").join(group).join(vm)
    }
}

impl Env {
    /// What the API handlers of a running daemon need.
    pub fn of(d: &crate::daemon::Daemon) -> Arc<Env> {
        Arc::new(Env {
            vms: d.vms.clone(),
            exports: d.exports.clone(),
            peers: d.peers.clone(),
            host: d.cfg.name.clone(),
            root: d.dir.root.clone(),
        })
    }
}

/// Registers `vm-snapshot` with the manager.
pub fn register(
    m: &Manager<App>,
    vms: &Arc<Vms>,
    exports: &Arc<Exports>,
    peers: &Arc<Peers>,
    host: &str,
    root: &Path,
) {
    let env = Arc::new(Env {
        vms: vms.clone(),
        exports: exports.clone(),
        peers: peers.clone(),
        host: host.to_string(),
        root: root.to_path_buf(),
    });
    m.register(KIND, move |params| plan(env.clone(), params));
}

/// The journaled parameters of `vm-snapshot`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Params {
    /// Group name (validated by [`check_group_name`]).
    pub name: String,
    /// VM names, in the order given.
    pub vms: Vec<String>,
    pub mode: VmSnapshotMode,
    pub quiesce: bool,
}

/// 1-64 of `A-Z a-z 0-9 - _`: group names appear in pool snapshot names
/// (`<group>.<vm>.<device>`) and in a directory name.
pub fn check_group_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "snapshot group name {name:?}: use 1-64 of A-Z a-z 0-9 - _"
        ))
    }
}

/// The pool snapshot of one disk of a group.
pub fn snapshot_name(group: &str, vm: &str, device: &str) -> String {
    format!("{group}.{vm}.{device}")
}

fn plan(env: Arc<Env>, params: &Value) -> Result<Plan<App>, String> {
    let p: Params = serde_json::from_value(params.clone()).map_err(|e| e.to_string())?;
    check_group_name(&p.name)?;
    if p.vms.is_empty() {
        return Err("no VMs named".into());
    }
    let mut progress = ProgressTree::new(format!(
        "{} snapshot {} of {}",
        p.mode,
        p.name,
        p.vms.join(", ")
    ));
    let mut steps: Vec<Box<dyn Step<App>>> = Vec::new();
    let mut nodes = Vec::new();
    let mut push = |steps: &mut Vec<Box<dyn Step<App>>>, s: Box<dyn Step<App>>, node| {
        steps.push(s);
        nodes.push(node);
    };
    let n = progress.add(ProgressTree::ROOT, "resolve disks", 0.2);
    push(
        &mut steps,
        Box::new(Resolve {
            env: env.clone(),
            p: p.clone(),
        }),
        n,
    );
    match p.mode {
        VmSnapshotMode::Overlay => {
            for vm in &p.vms {
                let n = progress.add(ProgressTree::ROOT, format!("vm {vm}"), 1.0);
                let phases = ["quiesce", "overlay", "thaw"].map(|ph| progress.add(n, ph, 1.0));
                push(
                    &mut steps,
                    Box::new(VmOverlay {
                        env: env.clone(),
                        p: p.clone(),
                        vm: vm.clone(),
                        name: format!("vm {vm}: quiesce, overlay, thaw"),
                        phases,
                    }),
                    n,
                );
            }
            let n = progress.add(ProgressTree::ROOT, "storage snapshot", 0.5);
            push(
                &mut steps,
                Box::new(StorageSnapshot {
                    env: env.clone(),
                    p: p.clone(),
                }),
                n,
            );
            let merge = progress.add(ProgressTree::ROOT, "merge", 2.0 * p.vms.len() as f64);
            for vm in &p.vms {
                let n = progress.add(merge, format!("vm {vm}"), 1.0);
                push(
                    &mut steps,
                    Box::new(Merge {
                        env: env.clone(),
                        p: p.clone(),
                        vm: vm.clone(),
                        name: format!("vm {vm}: merge"),
                    }),
                    n,
                );
            }
        }
        VmSnapshotMode::Direct => {
            let n = progress.add(ProgressTree::ROOT, "quiesce, snapshot, thaw", 1.0);
            let per_vm = p
                .vms
                .iter()
                .map(|vm| {
                    let v = progress.add(n, format!("vm {vm}"), 1.0);
                    ["quiesce", "thaw"].map(|ph| progress.add(v, ph, 1.0))
                })
                .collect();
            let storage = progress.add(n, "storage snapshot", 1.0);
            push(
                &mut steps,
                Box::new(Direct {
                    env: env.clone(),
                    p: p.clone(),
                    per_vm,
                    storage,
                }),
                n,
            );
        }
    }
    let n = progress.add(ProgressTree::ROOT, "record", 0.1);
    push(&mut steps, Box::new(Record { env, p }), n);
    Ok(Plan {
        steps,
        progress,
        nodes,
    })
}

/// One VM as `resolve` found it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ResolvedVm {
    name: String,
    uuid: String,
    agent_channel: bool,
    disks: Vec<ResolvedDisk>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ResolvedDisk {
    device: String,
    export: String,
    volume: String,
    size: u64,
    /// The peer whose pool holds `volume` (absent: this host's pool).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    peer: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Resolved {
    vms: Vec<ResolvedVm>,
    /// When the operation's first step ran (ms since the epoch).
    started_ms: u64,
}

/// What a freeze→thaw did for one VM.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Quiesce {
    quiesced: bool,
    note: String,
    frozen_ms: Option<f64>,
    freeze_ms: Option<f64>,
    pause_ms: Option<f64>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn resolved(cx: &StepContext<App>) -> Result<Resolved, StepError> {
    let v = cx
        .result_of("resolve")
        .ok_or_else(|| StepError::failed("the resolve step has no result"))?;
    serde_json::from_value(v.clone()).map_err(StepError::failed)
}

fn resolved_vm<'a>(r: &'a Resolved, vm: &str) -> Result<&'a ResolvedVm, StepError> {
    r.vms
        .iter()
        .find(|v| v.name == vm)
        .ok_or_else(|| StepError::failed(format!("VM {vm} is not in the resolve step's result")))
}

/// The QMP and agent clients of a running VM.
async fn control(env: &Env, vm: &str) -> Result<(Arc<Vm>, QmpClient, Option<QgaClient>), String> {
    let v = env.vms.find(vm).map_err(|e| e.to_string())?;
    match env.vms.control(&v).await {
        Some((qmp, qga)) => Ok((v, qmp, qga)),
        None => Err(format!("VM {vm} is not running")),
    }
}

/// Like [`control`], but waits for ferryd to re-attach the VM (an undo
/// or a retry right after a restart runs before the re-attach).
async fn control_wait(env: &Env, vm: &str) -> Result<(QmpClient, Option<QgaClient>), String> {
    let deadline = Instant::now() + REATTACH_WAIT;
    loop {
        match control(env, vm).await {
            Ok((_, q, a)) => return Ok((q, a)),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

// ---------------------------------------------------------------- resolve

struct Resolve {
    env: Arc<Env>,
    p: Params,
}

impl Resolve {
    async fn vm(&self, name: &str, pool: &ferry_pool::Pool) -> Result<ResolvedVm, String> {
        let (vm, qmp, qga) = control(&self.env, name).await?;
        let graph = block_graph(&qmp)
            .await
            .map_err(|e| format!("VM {name}: cannot read its block graph: {e}"))?;
        let mut disks = Vec::new();
        for chain in &graph.disks {
            let dev = &chain.device;
            if chain.layers.len() > 1 {
                return Err(format!(
                    "VM {name}: disk {dev} already runs on an overlay ({}); commit it first",
                    chain.top().protocol.filename
                ));
            }
            let local = match &chain.base().target {
                BlockTarget::Nbd {
                    server: NbdServer::Unix(sock),
                    export,
                } if *sock == self.env.exports.unix_path => Some(export.clone()),
                BlockTarget::Nbd {
                    server: NbdServer::Tcp { .. },
                    export,
                } => {
                    let (peer, volume, size) =
                        remote::resolve(&self.env, &vm.definition(), &vm.uuid, dev, export)
                            .await
                            .map_err(|e| format!("VM {name}: {e}"))?;
                    disks.push(ResolvedDisk {
                        device: dev.clone(),
                        export: export.split('/').next().unwrap_or_default().to_string(),
                        volume,
                        size,
                        peer: Some(peer),
                    });
                    None
                }
                BlockTarget::Nbd { server, .. } => {
                    return Err(format!(
                        "VM {name}: disk {dev} is served by {server:?}, neither this host's pool \
                         nor a peer's"
                    ));
                }
                other => {
                    return Err(format!(
                        "VM {name}: disk {dev} is not a pool volume ({other:?})"
                    ));
                }
            };
            let Some(export) = local else { continue };
            let volume = self
                .env
                .exports
                .get(&export)
                .and_then(|e| e.volume)
                .ok_or_else(|| {
                    format!("VM {name}: disk {dev}: export {export} serves no volume")
                })?;
            let size = pool
                .volume(&volume)
                .map_err(|e| format!("VM {name}: disk {dev}: {e}"))?
                .size();
            disks.push(ResolvedDisk {
                device: dev.clone(),
                export,
                volume,
                size,
                peer: None,
            });
        }
        if disks.is_empty() {
            return Err(format!("VM {name} has no disks"));
        }
        Ok(ResolvedVm {
            name: vm.name.clone(),
            uuid: vm.uuid.to_string(),
            agent_channel: qga.is_some(),
            disks,
        })
    }
}

impl Step<App> for Resolve {
    fn name(&self) -> &str {
        "resolve"
    }

    fn recovery(&self) -> Recovery {
        Recovery::Retry
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let started_ms = now_ms();
            let mut vms = Vec::new();
            let mut seen = HashSet::new();
            for name in &self.p.vms {
                let vm = self
                    .vm(name, &cx.app.pool)
                    .await
                    .map_err(StepError::Failed)?;
                for d in &vm.disks {
                    if !seen.insert((d.peer.clone(), d.volume.clone())) {
                        return Err(StepError::failed(format!(
                            "volume {} is a disk of two of the VMs",
                            d.volume
                        )));
                    }
                }
                cx.log(format!(
                    "VM {}: {}; agent channel: {}",
                    vm.name,
                    vm.disks
                        .iter()
                        .map(|d| format!(
                            "{} → ({}, local, {})",
                            d.device,
                            d.peer.as_deref().unwrap_or(&self.env.host),
                            d.volume
                        ))
                        .collect::<Vec<_>>()
                        .join(", "),
                    if vm.agent_channel { "yes" } else { "no" }
                ));
                vms.push(vm);
            }
            serde_json::to_value(Resolved { vms, started_ms }).map_err(StepError::failed)
        })
    }
}

// --------------------------------------------------------------- quiesce

/// Checks that an agent answers, so that a freeze is only sent to an agent
/// that will read it (a freeze queued for a stuck agent could freeze the
/// guest later, with no one left to thaw it).
async fn probe_agent(quiesce: bool, qga: Option<&QgaClient>) -> Result<QgaClient, String> {
    if !quiesce {
        return Err("quiesce not requested".into());
    }
    let Some(qga) = qga else {
        return Err("the VM has no guest-agent channel".into());
    };
    qga.sync(AGENT_PROBE)
        .await
        .map_err(|e| format!("the guest agent did not answer: {e}"))?;
    Ok(qga.clone())
}

/// Thaws a guest after a freeze failed or as an undo; true when an agent
/// answered.
async fn thaw(qga: &QgaClient) -> Result<u64, String> {
    qga.execute_with_timeout("guest-fsfreeze-thaw", Value::Null, AGENT_TIMEOUT)
        .await
        .map(|v| v.as_u64().unwrap_or(0))
        .map_err(|e| e.to_string())
}

// ---------------------------------------------------- storage snapshot

/// (volume, snapshot) of every disk in this host's pool.
fn pairs(p: &Params, r: &Resolved) -> Vec<(String, String)> {
    r.vms
        .iter()
        .flat_map(|vm| {
            vm.disks.iter().filter(|d| d.peer.is_none()).map(|d| {
                (
                    d.volume.clone(),
                    snapshot_name(&p.name, &vm.name, &d.device),
                )
            })
        })
        .collect()
}

/// Every disk in a peer's pool.
fn remote_pairs(p: &Params, r: &Resolved) -> Vec<RemotePair> {
    r.vms
        .iter()
        .flat_map(|vm| {
            vm.disks.iter().filter_map(|d| {
                Some(RemotePair {
                    peer: d.peer.clone()?,
                    volume: d.volume.clone(),
                    snapshot: snapshot_name(&p.name, &vm.name, &d.device),
                })
            })
        })
        .collect()
}

fn intent_remote(intent: &Value) -> Vec<RemotePair> {
    serde_json::from_value(intent["remote"].clone()).unwrap_or_default()
}

/// Takes the group snapshot in this host's pool, then on each peer
/// holding some of the disks (one atomic group snapshot per pool).
async fn take_everywhere(
    env: &Env,
    pool: &ferry_pool::Pool,
    group: &str,
    local: &[(String, String)],
    remote: &[RemotePair],
) -> Result<Vec<String>, String> {
    if !local.is_empty() {
        let (pool, g, pp) = (pool.clone(), group.to_string(), local.to_vec());
        blocking(move || take_group(&pool, &g, &pp))
            .await
            .map_err(|e| e.to_string())?;
    }
    remote::take(env, group, remote).await
}

/// Takes the group snapshot unless a run before a crash already did.
fn take_group(
    pool: &ferry_pool::Pool,
    group: &str,
    pairs: &[(String, String)],
) -> Result<(), ferry_pool::Error> {
    let existing = pool.snapshots();
    let done = pairs.iter().all(|(v, s)| {
        existing
            .iter()
            .any(|e| &e.name == s && &e.volume == v && e.group.as_deref() == Some(group))
    });
    if done {
        return Ok(());
    }
    let refs: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(v, s)| (v.as_str(), s.as_str()))
        .collect();
    pool.group_snapshot(group, &refs).map(drop)
}

/// Deletes the snapshots of `pairs` that exist.
fn delete_pairs(pool: &ferry_pool::Pool, pairs: &[(String, String)]) -> Result<(), StepError> {
    for (_, s) in pairs {
        match pool.delete_snapshot(s) {
            Ok(()) => {}
            Err(e) if e.kind() == ferry_pool::ErrorKind::NotFound => {}
            Err(e) => return Err(StepError::failed(e)),
        }
    }
    Ok(())
}

fn intent_pairs(intent: &Value) -> Vec<(String, String)> {
    serde_json::from_value(intent["pairs"].clone()).unwrap_or_default()
}

struct StorageSnapshot {
    env: Arc<Env>,
    p: Params,
}

impl Step<App> for StorageSnapshot {
    fn name(&self) -> &str {
        "storage snapshot"
    }

    /// The base volumes do not change while the overlays are active, so
    /// the snapshot taken again after a crash holds the same data.
    fn recovery(&self) -> Recovery {
        Recovery::Retry
    }

    fn intent(&self, cx: &StepContext<App>) -> Result<Value, StepError> {
        let r = resolved(cx)?;
        Ok(json!({
            "group": self.p.name,
            "pairs": pairs(&self.p, &r),
            "remote": remote_pairs(&self.p, &r),
        }))
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let r = resolved(cx)?;
            let pairs = pairs(&self.p, &r);
            let remote = remote_pairs(&self.p, &r);
            let t0 = Instant::now();
            let lines = take_everywhere(&self.env, &cx.app.pool, &self.p.name, &pairs, &remote)
                .await
                .map_err(StepError::Failed)?;
            let storage_ms = ms(t0.elapsed());
            if !pairs.is_empty() {
                cx.log(format!(
                    "pool group snapshot {} of exactly {} volume(s): {} ({storage_ms:.1} ms)",
                    self.p.name,
                    pairs.len(),
                    pairs
                        .iter()
                        .map(|(v, s)| format!("{v} → {s}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            for l in lines {
                cx.log(l);
            }
            Ok(json!({ "storage_ms": storage_ms }))
        })
    }

    fn undo<'a>(
        &'a self,
        cx: &'a StepContext<App>,
        intent: &'a Value,
        _result: Option<&'a Value>,
    ) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let pool = cx.app.pool.clone();
            let pairs = intent_pairs(intent);
            let remote = intent_remote(intent);
            let n = pairs.len() + remote.len();
            tokio::task::spawn_blocking(move || delete_pairs(&pool, &pairs))
                .await
                .map_err(StepError::failed)??;
            remote::delete(&self.env, &remote)
                .await
                .map_err(StepError::Failed)?;
            cx.log(format!("deleted the group's snapshots ({n} volume(s))"));
            Ok(())
        })
    }
}

// --------------------------------------------------------------- record

struct Record {
    env: Arc<Env>,
    p: Params,
}

impl Record {
    fn build(&self, cx: &StepContext<App>) -> Result<VmSnapshotGroup, StepError> {
        let r = resolved(cx)?;
        let direct = cx.result_of("quiesce, snapshot, thaw");
        let storage_ms = match direct {
            Some(d) => d["storage_ms"].as_f64(),
            None => cx
                .result_of("storage snapshot")
                .and_then(|s| s["storage_ms"].as_f64()),
        }
        .unwrap_or(0.0);
        let mut vms = Vec::new();
        for (i, rv) in r.vms.iter().enumerate() {
            let qv = match direct {
                Some(d) => d["vms"][i].clone(),
                None => cx
                    .result_of(&format!("vm {}: quiesce, overlay, thaw", rv.name))
                    .cloned()
                    .unwrap_or(Value::Null),
            };
            let q: Quiesce = serde_json::from_value(qv).unwrap_or_default();
            let definition = self
                .env
                .vms
                .find(&rv.uuid)
                .map(|vm| vm.definition())
                .map_err(|e| StepError::failed(format!("VM {}: {e}", rv.name)))?;
            vms.push(VmSnapshotVm {
                name: rv.name.clone(),
                uuid: rv.uuid.clone(),
                consistency: if q.quiesced {
                    Consistency::Quiesced
                } else {
                    Consistency::CrashConsistent
                },
                note: q.note,
                frozen_ms: q.frozen_ms,
                freeze_ms: q.freeze_ms,
                pause_ms: q.pause_ms,
                disks: rv
                    .disks
                    .iter()
                    .map(|d| VmSnapshotDisk {
                        device: d.device.clone(),
                        host: d.peer.clone().unwrap_or_else(|| self.env.host.clone()),
                        pool: "local".into(),
                        volume: d.volume.clone(),
                        snapshot: snapshot_name(&self.p.name, &rv.name, &d.device),
                        size: d.size,
                    })
                    .collect(),
                definition,
            });
        }
        Ok(VmSnapshotGroup {
            name: self.p.name.clone(),
            mode: self.p.mode,
            created: r.started_ms / 1000,
            operation: cx.op_id.clone(),
            total_ms: now_ms().saturating_sub(r.started_ms) as f64,
            storage_ms,
            vms,
        })
    }
}

impl Step<App> for Record {
    fn name(&self) -> &str {
        "record"
    }

    fn recovery(&self) -> Recovery {
        Recovery::Retry
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let g = self.build(cx)?;
            store::write_group(&self.env.groups_dir(), &g).map_err(StepError::failed)?;
            for vm in &g.vms {
                cx.log(format!("VM {}: {}", vm.name, vm.consistency));
            }
            serde_json::to_value(&g).map_err(StepError::failed)
        })
    }

    fn undo<'a>(
        &'a self,
        _cx: &'a StepContext<App>,
        _intent: &'a Value,
        _result: Option<&'a Value>,
    ) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            store::remove_group_file(&self.env.groups_dir(), &self.p.name)
                .map_err(StepError::failed)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_names() {
        assert!(check_group_name("nightly-1_a").is_ok());
        for bad in ["", "a.b", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_group_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(snapshot_name("g", "web.1", "vda"), "g.web.1.vda");
    }
}
