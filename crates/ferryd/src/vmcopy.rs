//! VM copy between hosts (flow 2 of DESIGN.md): the `vm.copy` operation.
//!
//! The VM's host runs this operation: it is the source (it sends the data)
//! and computes the progress tree. When another host got the request, that
//! host coordinates with [`relay`]: it sends the request here and mirrors
//! this operation's tree into its own.
//!
//! # Steps (each journaled: intent before it acts, result after)
//! 1. `snapshot` — a running VM is copied from an application-consistent
//!    group snapshot (a nested `vm-snapshot` operation in direct mode,
//!    group `copy-<op>`); a stopped VM from one atomic pool snapshot of its
//!    volumes (`.copy-<op>-<device>`). A live volume is never read. Undo
//!    deletes them.
//! 2. `check target` — the target peer answers, the new VM name and the
//!    new volume names (`<new>-<device>`) are free there. Read-only.
//! 3. `create target volumes` — volumes of the same sizes on the target and
//!    an NBD export of each (`.copy-<op>-<device>`, TCP with its secret).
//!    Undo deletes the exports and the volumes: a cancelled or failed copy
//!    leaves nothing on the target.
//! 4. `copy data` — see [`transfer`]: per disk, per partition (and the
//!    space outside partitions), *transfer* the allocated, non-zero chunks
//!    of the snapshot over NBD, then *verify* (XXH3-128 per 1 MiB block:
//!    the source's taken as it sent, the target's through
//!    `POST /v1/peer/copy/hash`, which then lets the target's page cache
//!    drop what it read). How far
//!    each transfer got is checkpointed in the journal, so a run after a
//!    crash of this host sends only what is missing; verify always covers
//!    everything. Retried after a crash.
//! 5. `define vm` — the VM definition on the target with a new UUID and
//!    the new volumes. Undo deletes it.
//! 6. `clean up` — deletes the target's exports and the source snapshots.
//!    Retried after a crash.

pub mod relay;
mod transfer;

pub use transfer::{Algorithm, hash_ranges};

use std::path::PathBuf;
use std::sync::{Arc, Weak};

use ferry_api::{VmDefinition, VmDisk, VmDiskSpec, VmSnapshotMode, VmState};
use ferry_ops::{BoxFuture, Manager, OpState, Plan, Recovery, Step, StepContext, StepError};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::daemon::App;
use crate::exports::Exports;
use crate::groupsnap;
use crate::operations::blocking;
use crate::peers::{PeerClient, PeerError, Peers};
use crate::vms::Vms;

/// The operation kind.
pub const KIND: &str = "vm.copy";

/// What the steps act on besides the pool.
pub struct Env {
    pub vms: Arc<Vms>,
    pub exports: Arc<Exports>,
    pub peers: Arc<Peers>,
    pub host: String,
    pub root: PathBuf,
    /// To run the nested `vm-snapshot` operation of a running VM.
    pub ops: Weak<Manager<App>>,
    /// Throughputs the last copy to each peer measured.
    pub(crate) rates: transfer::KnownRates,
}

impl Env {
    fn groups(&self) -> groupsnap::Env {
        groupsnap::Env {
            vms: self.vms.clone(),
            exports: self.exports.clone(),
            peers: self.peers.clone(),
            host: self.host.clone(),
            root: self.root.clone(),
        }
    }

    fn peer(&self, name: &str) -> Result<PeerClient, StepError> {
        self.peers.client(name).map_err(StepError::failed)
    }
}

/// Registers `vm.copy` with the manager.
pub fn register(m: &Arc<Manager<App>>, env: Env) {
    let env = Arc::new(env);
    m.register(KIND, move |params| plan(env.clone(), params));
}

/// The journaled parameters of `vm.copy`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Params {
    /// The source VM's UUID and name.
    pub uuid: String,
    pub vm: String,
    /// The target peer.
    pub to: String,
    /// The copy's name on the target.
    pub name: String,
    /// Bytes per second, if limited.
    #[serde(default)]
    pub bandwidth: Option<u64>,
    /// The coordinator's idempotency key, when a coordinator sent it.
    #[serde(default)]
    pub request: Option<String>,
}

fn short(op_id: &str) -> String {
    op_id.chars().filter(|c| *c != '-').take(12).collect()
}

/// Guest device id of disk `i` (as the VM layer names them).
pub(crate) fn device(i: usize) -> String {
    format!("vd{}", char::from(b'a' + i as u8))
}

fn target_volume(p: &Params, dev: &str) -> String {
    format!("{}-{dev}", p.name)
}

fn target_export(op_id: &str, dev: &str) -> String {
    format!(".copy-{}-{dev}", short(op_id))
}

fn plan(env: Arc<Env>, params: &Value) -> Result<Plan<App>, String> {
    let p: Params = serde_json::from_value(params.clone()).map_err(|e| e.to_string())?;
    let title = format!("copy vm {} to {} as {}", p.vm, p.to, p.name);
    // Only the data step has a weight until it starts: then it weighs
    // every step in seconds (the fixed ones by the time they took or are
    // expected to take) and gets the VM → disk → partition →
    // transfer/verify tree (it measures the disks first).
    Ok(Plan::new(
        &title,
        vec![
            (
                Box::new(Snapshot {
                    env: env.clone(),
                    p: p.clone(),
                }),
                0.0,
            ),
            (
                Box::new(CheckTarget {
                    env: env.clone(),
                    p: p.clone(),
                }),
                0.0,
            ),
            (
                Box::new(CreateTarget {
                    env: env.clone(),
                    p: p.clone(),
                }),
                0.0,
            ),
            (
                Box::new(transfer::CopyData {
                    env: env.clone(),
                    p: p.clone(),
                }),
                1.0,
            ),
            (
                Box::new(Define {
                    env: env.clone(),
                    p: p.clone(),
                }),
                0.0,
            ),
            (Box::new(CleanUp { env, p }), 0.0),
        ],
    ))
}

/// One disk of the copy as the snapshot step found it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SourceDisk {
    pub device: String,
    pub volume: String,
    pub snapshot: String,
    pub size: u64,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Snapped {
    /// `group` (a running VM's `vm-snapshot` group) or `plain`.
    pub mode: String,
    pub group: Option<String>,
    pub disks: Vec<SourceDisk>,
}

pub(crate) fn result<T: serde::de::DeserializeOwned>(
    cx: &StepContext<App>,
    step: &str,
) -> Result<T, StepError> {
    let r = cx
        .result_of(step)
        .ok_or_else(|| StepError::failed(format!("no result of step {step}")))?;
    serde_json::from_value(r.clone())
        .map_err(|e| StepError::failed(format!("malformed result of step {step}: {e}")))
}

struct Snapshot {
    env: Arc<Env>,
    p: Params,
}

fn group_name(op_id: &str) -> String {
    format!("copy-{}", short(op_id))
}

fn plain_snapshot(op_id: &str, dev: &str) -> String {
    format!(".copy-{}-{dev}", short(op_id))
}

impl Step<App> for Snapshot {
    fn name(&self) -> &str {
        "snapshot"
    }

    fn intent(&self, cx: &StepContext<App>) -> Result<Value, StepError> {
        Ok(json!({
            "group": group_name(&cx.op_id),
            "prefix": plain_snapshot(&cx.op_id, ""),
        }))
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let vm = self.env.vms.find(&self.p.uuid).map_err(StepError::failed)?;
            let def = vm.definition();
            let mut disks = Vec::new();
            for (i, d) in def.disks.iter().enumerate() {
                let spec = d.spec();
                if let Some(h) = &spec.host {
                    return Err(StepError::failed(format!(
                        "disk {} of VM {} is a volume of host {h}: only disks in this host's pool are copied; nothing was copied",
                        device(i),
                        self.p.vm
                    )));
                }
                let Some(volume) = spec.volume.clone() else {
                    return Err(StepError::failed(format!(
                        "disk {} of VM {} is an image file, not a pool volume: only pool volumes are copied; nothing was copied",
                        device(i),
                        self.p.vm
                    )));
                };
                disks.push(SourceDisk {
                    device: device(i),
                    volume,
                    snapshot: String::new(),
                    size: 0,
                    read_only: spec.read_only,
                });
            }
            let state = self.env.vms.info(&vm).await.state;
            let running = matches!(state, VmState::Running | VmState::Paused);
            let pool = cx.app.pool.clone();
            let (mode, group) = if running {
                let group = group_name(&cx.op_id);
                let genv = self.env.groups();
                if !groupsnap::group_exists(&genv, &pool, &group) {
                    let ops = self
                        .env
                        .ops
                        .upgrade()
                        .ok_or_else(|| StepError::failed("ferryd is shutting down"))?;
                    let params = groupsnap::Params {
                        name: group.clone(),
                        vms: vec![self.p.vm.clone()],
                        mode: VmSnapshotMode::Direct,
                        quiesce: true,
                    };
                    let id = ops
                        .start(groupsnap::KIND, json!(params))
                        .map_err(StepError::failed)?;
                    cx.log(format!(
                        "snapshot group {group} of running VM {}: operation {id}",
                        self.p.vm
                    ));
                    let rec = ops.wait(&id).await.map_err(StepError::failed)?;
                    if rec.state != OpState::Succeeded {
                        return Err(StepError::failed(format!(
                            "snapshot of running VM {} failed ({}): {}; nothing was copied",
                            self.p.vm,
                            rec.state.as_str(),
                            rec.error.unwrap_or_default()
                        )));
                    }
                }
                let g = groupsnap::read_group(&genv, &group).map_err(StepError::failed)?;
                let snap_vm = g
                    .vms
                    .into_iter()
                    .find(|v| v.uuid == self.p.uuid)
                    .ok_or_else(|| {
                        StepError::failed(format!("group {group} lacks VM {}", self.p.vm))
                    })?;
                cx.log_when_done(format!(
                    "VM {} is running: copying from snapshot group {group} ({:?}: {})",
                    self.p.vm, snap_vm.consistency, snap_vm.note
                ));
                for d in &mut disks {
                    let s = snap_vm
                        .disks
                        .iter()
                        .find(|s| s.device == d.device)
                        .ok_or_else(|| {
                            StepError::failed(format!("group {group} lacks disk {}", d.device))
                        })?;
                    d.snapshot = s.snapshot.clone();
                    d.size = s.size;
                }
                ("group", Some(group))
            } else {
                let op = cx.op_id.clone();
                let mut ds = disks.clone();
                disks = blocking(move || {
                    let have = pool.snapshots();
                    let names: Vec<(String, String)> = ds
                        .iter()
                        .map(|d| (d.volume.clone(), plain_snapshot(&op, &d.device)))
                        .collect();
                    if !names.iter().all(|(_, s)| have.iter().any(|h| h.name == *s)) {
                        let pairs: Vec<(&str, &str)> = names
                            .iter()
                            .map(|(v, s)| (v.as_str(), s.as_str()))
                            .collect();
                        pool.group_snapshot(&format!("copy-{}-stopped", short(&op)), &pairs)?;
                    }
                    for (d, (_, s)) in ds.iter_mut().zip(&names) {
                        d.snapshot = s.clone();
                        d.size = pool.open_snapshot(s)?.size();
                    }
                    Ok(ds)
                })
                .await?;
                cx.log_when_done(format!(
                    "VM {} is {state}: copying from pool snapshots {}",
                    self.p.vm,
                    disks
                        .iter()
                        .map(|d| d.snapshot.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
                ("plain", None)
            };
            serde_json::to_value(Snapped {
                mode: mode.into(),
                group,
                disks,
            })
            .map_err(StepError::failed)
        })
    }

    fn undo<'a>(
        &'a self,
        cx: &'a StepContext<App>,
        intent: &'a Value,
        _result: Option<&'a Value>,
    ) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let said = drop_snapshots(&self.env, cx, intent).await?;
            cx.log_all(&said);
            Ok(())
        })
    }
}

/// Deletes the copy's snapshot group or plain snapshots, whichever exist.
/// Deletes the copy's source snapshots (`names` as the snapshot step's
/// intent has them); returns what it did, for the operation's log.
async fn drop_snapshots(
    env: &Env,
    cx: &StepContext<App>,
    names: &Value,
) -> Result<Vec<String>, StepError> {
    let mut said = Vec::new();
    let group = names["group"].as_str().unwrap_or_default().to_string();
    let prefix = names["prefix"].as_str().unwrap_or_default().to_string();
    let genv = env.groups();
    let pool = cx.app.pool.clone();
    if !group.is_empty() && groupsnap::group_exists(&genv, &pool, &group) {
        groupsnap::delete_group(Arc::new(genv), pool.clone(), group.clone())
            .await
            .map_err(StepError::failed)?;
        said.push(format!("deleted snapshot group {group}"));
    }
    if prefix.len() > ".copy-".len() {
        let deleted = blocking(move || {
            let mut out = Vec::new();
            for s in pool.snapshots() {
                if s.name.starts_with(&prefix) {
                    match pool.delete_snapshot(&s.name) {
                        Err(e) if e.kind() != ferry_pool::ErrorKind::NotFound => return Err(e),
                        _ => out.push(s.name),
                    }
                }
            }
            Ok(out)
        })
        .await?;
        if !deleted.is_empty() {
            said.push(format!("deleted snapshots {}", deleted.join(", ")));
        }
    }
    Ok(said)
}

fn not_found(e: &PeerError) -> bool {
    matches!(e, PeerError::Failed { status: 404, .. })
}

struct CheckTarget {
    env: Arc<Env>,
    p: Params,
}

impl Step<App> for CheckTarget {
    fn name(&self) -> &str {
        "check target"
    }

    fn recovery(&self) -> Recovery {
        Recovery::Retry
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let peer = self.env.peer(&self.p.to)?;
            let snapped: Snapped = result(cx, "snapshot")?;
            // The questions are independent: asked at once.
            let vm_path = format!("/v1/vms/{}", self.p.name);
            let volumes: Vec<String> = snapped
                .disks
                .iter()
                .map(|d| target_volume(&self.p, &d.device))
                .collect();
            let paths: Vec<String> = volumes.iter().map(|v| format!("/v1/volumes/{v}")).collect();
            let (hello, vm, vols) = tokio::join!(
                peer.hello(),
                peer.get::<Value>(&vm_path),
                futures::future::join_all(paths.iter().map(|p| peer.get::<Value>(p)))
            );
            let hello = hello.map_err(StepError::failed)?;
            match vm {
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(StepError::failed(e)),
                Ok(_) => {
                    return Err(StepError::failed(format!(
                        "host {} already has a VM {}; nothing was copied",
                        hello.name, self.p.name
                    )));
                }
            }
            for (v, r) in volumes.iter().zip(vols) {
                match r {
                    Err(e) if not_found(&e) => {}
                    Err(e) => return Err(StepError::failed(e)),
                    Ok(_) => {
                        return Err(StepError::failed(format!(
                            "host {} already has a volume {v}; nothing was copied",
                            hello.name
                        )));
                    }
                }
            }
            Ok(json!({ "host": hello.name }))
        })
    }
}

/// One target disk: its volume and the export the source writes to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct TargetDisk {
    pub device: String,
    pub volume: String,
    pub export: String,
    /// `nbd://host:port/<export>/<secret>`.
    pub uri: String,
}

struct CreateTarget {
    env: Arc<Env>,
    p: Params,
}

impl CreateTarget {
    /// Creates one disk's volume on the target, then its export; also
    /// returns the line to log.
    async fn create_one(
        &self,
        peer: &PeerClient,
        op_id: &str,
        d: &SourceDisk,
    ) -> Result<(TargetDisk, String), StepError> {
        let volume = target_volume(&self.p, &d.device);
        let export = target_export(op_id, &d.device);
        // The copy flushes now and then and at its end: its writes go
        // out to the target's disk as they come.
        let uri = peer
            .create_exported_volume(&volume, &export, d.size, true)
            .await
            .map_err(StepError::failed)?
            .ok_or_else(|| {
                StepError::failed(format!(
                    "peer {} serves NBD on no TCP address: it cannot receive a copy",
                    self.p.to
                ))
            })?;
        let line = format!(
            "created volume {volume} ({} bytes) and its export on {}",
            d.size, self.p.to
        );
        Ok((
            TargetDisk {
                device: d.device.clone(),
                volume,
                export,
                uri,
            },
            line,
        ))
    }
}

impl Step<App> for CreateTarget {
    fn name(&self) -> &str {
        "create target volumes"
    }

    fn intent(&self, cx: &StepContext<App>) -> Result<Value, StepError> {
        let snapped: Snapped = result(cx, "snapshot")?;
        let volumes: Vec<String> = snapped
            .disks
            .iter()
            .map(|d| target_volume(&self.p, &d.device))
            .collect();
        let exports: Vec<String> = snapped
            .disks
            .iter()
            .map(|d| target_export(&cx.op_id, &d.device))
            .collect();
        Ok(json!({ "peer": self.p.to, "volumes": volumes, "exports": exports }))
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let peer = self.env.peer(&self.p.to)?;
            let snapped: Snapped = result(cx, "snapshot")?;
            // The disks' volumes and exports are made at once (each
            // volume before its export); undo deletes whichever of them
            // exist.
            let made = futures::future::join_all(
                snapped
                    .disks
                    .iter()
                    .map(|d| self.create_one(&peer, &cx.op_id, d)),
            )
            .await;
            let mut out = Vec::new();
            for r in made {
                let (t, line) = r?;
                out.push(t);
                cx.log_when_done(line);
            }
            Ok(json!({ "disks": out }))
        })
    }

    fn undo<'a>(
        &'a self,
        cx: &'a StepContext<App>,
        intent: &'a Value,
        _result: Option<&'a Value>,
    ) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let peer = self.env.peer(&self.p.to)?;
            let names = |k: &str| -> Vec<String> {
                intent[k]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            };
            for e in names("exports") {
                delete_on(&peer, &format!("/v1/exports/{e}")).await?;
            }
            for v in names("volumes") {
                if delete_on(&peer, &format!("/v1/volumes/{v}")).await? {
                    cx.log(format!("deleted volume {v} on {}", self.p.to));
                }
            }
            Ok(())
        })
    }
}

/// `DELETE path` on a peer; absent counts as done. True if it deleted.
async fn delete_on(peer: &PeerClient, path: &str) -> Result<bool, StepError> {
    match peer.delete(path).await {
        Ok(()) => Ok(true),
        Err(e) if not_found(&e) => Ok(false),
        Err(e) => Err(StepError::failed(e)),
    }
}

struct Define {
    env: Arc<Env>,
    p: Params,
}

impl Step<App> for Define {
    fn name(&self) -> &str {
        "define vm"
    }

    fn intent(&self, _cx: &StepContext<App>) -> Result<Value, StepError> {
        Ok(json!({ "peer": self.p.to, "vm": self.p.name }))
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let peer = self.env.peer(&self.p.to)?;
            let vm = self.env.vms.find(&self.p.uuid).map_err(StepError::failed)?;
            let snapped: Snapped = result(cx, "snapshot")?;
            let mut def: VmDefinition = vm.definition();
            def.name = self.p.name.clone();
            def.uuid = None;
            def.disks = snapped
                .disks
                .iter()
                .map(|d| {
                    VmDisk::Spec(VmDiskSpec {
                        volume: Some(target_volume(&self.p, &d.device)),
                        read_only: d.read_only,
                        ..VmDiskSpec::default()
                    })
                })
                .collect();
            let info: ferry_api::VmInfo = peer
                .post("/v1/vms", &def)
                .await
                .map_err(StepError::failed)?;
            cx.log_when_done(format!(
                "defined VM {} (uuid {}) on {}",
                info.name, info.uuid, self.p.to
            ));
            Ok(json!({ "uuid": info.uuid, "name": info.name }))
        })
    }

    fn undo<'a>(
        &'a self,
        cx: &'a StepContext<App>,
        _intent: &'a Value,
        _result: Option<&'a Value>,
    ) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let peer = self.env.peer(&self.p.to)?;
            if delete_on(&peer, &format!("/v1/vms/{}", self.p.name)).await? {
                cx.log(format!("deleted VM {} on {}", self.p.name, self.p.to));
            }
            Ok(())
        })
    }
}

struct CleanUp {
    env: Arc<Env>,
    p: Params,
}

impl Step<App> for CleanUp {
    fn name(&self) -> &str {
        "clean up"
    }

    fn recovery(&self) -> Recovery {
        Recovery::Retry
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let peer = self.env.peer(&self.p.to)?;
            let targets: Value = result(cx, "create target volumes")?;
            // The target's exports and this host's snapshots at once.
            let exports = futures::future::try_join_all(
                targets["disks"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|d| d["export"].as_str())
                    .map(|e| {
                        let path = format!("/v1/exports/{e}");
                        let peer = &peer;
                        async move { delete_on(peer, &path).await }
                    }),
            );
            let names = json!({
                "group": group_name(&cx.op_id),
                "prefix": plain_snapshot(&cx.op_id, ""),
            });
            let (exports, said) = tokio::join!(exports, drop_snapshots(&self.env, cx, &names));
            exports?;
            said?.into_iter().for_each(|l| cx.log_when_done(l));
            Ok(Value::Null)
        })
    }
}
