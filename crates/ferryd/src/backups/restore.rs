//! The `backup.restore` operation: a backup into new pool volumes and a
//! new VM definition, on this host or on a registered peer. Steps are
//! described in the parent module.
//!
//! # Restore to a peer (`to`)
//! This host reads the backup (it holds the repository and its key) and
//! writes the data into new volumes in the *peer's* pool over NBD, the way
//! `vm.copy` writes a copy; the peer never sees the repository or the key.
//! 1. `check target` — the peer answers; the VM name and the volume names
//!    (`<name>-<device>`) are free there. Read-only.
//! 2. `create target volumes` — the volumes on the peer and a TCP NBD export
//!    of each (`.restore-<op>-<device>`); undo deletes exports and volumes,
//!    so a failed or cancelled restore leaves nothing on the peer.
//! 3. `restore data` — parallel fetch from the repository, written over
//!    NBD (several connections) into the exports, flushed as a local
//!    restore is. Retried after a crash (writes are idempotent).
//! 4. `define vm` — the backed-up definition, new name and UUID, on the new
//!    volumes, defined on the peer; undo deletes it.
//! 5. `clean up` — deletes the exports on the peer. Retried.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ferry_api::{VmDefinition, VmDisk, VmDiskSpec};
use ferry_backup::{DiskTarget, VolumeTarget};
use ferry_nbd::client::{Address, Pool as NbdPool};
use ferry_ops::{BoxFuture, Manager, Plan, Recovery, Step, StepContext, StepError};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{Backups, RESTORE};
use crate::daemon::App;
use crate::peers::{PeerClient, PeerError};

/// Fetch threads of a restore: each fetches, checks, decrypts and
/// decompresses a run of blocks, then writes it (parallel fetch is what
/// makes a restore fast, on S3 above all).
pub const RESTORE_THREADS: usize = 8;

/// NBD connections to each export of a peer a restore writes to.
const PEER_CONNECTIONS: usize = 4;

/// The journaled parameters of `backup.restore`, complete when accepted
/// (the plan is rebuilt from them after a restart).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestoreParams {
    pub repo: String,
    pub backup: String,
    /// The new VM's name.
    pub name: String,
    /// (device in the backup, new volume, size).
    pub disks: Vec<(String, String, u64)>,
    /// The backed-up definition (disks are replaced by the new volumes).
    pub definition: VmDefinition,
    /// The registered peer to restore to; `None`: this host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
}

pub fn register(m: &Arc<Manager<App>>, b: &Arc<Backups>) {
    let b = b.clone();
    m.register(RESTORE, move |p| plan(b.clone(), p));
}

/// The new VM's definition: the backed-up one with a new name, no UUID
/// (a new one is generated) and the new volumes in the same order.
pub fn new_definition(p: &RestoreParams) -> Result<VmDefinition, String> {
    let mut def = p.definition.clone();
    def.name = p.name.clone();
    def.uuid = None;
    let mut disks = Vec::new();
    for (i, d) in def.disks.iter().enumerate() {
        let device = format!("vd{}", char::from(b'a' + i as u8));
        let (_, vol, _) = p
            .disks
            .iter()
            .find(|x| x.0 == device)
            .ok_or_else(|| format!("backup {} holds no disk {device}", p.backup))?;
        disks.push(VmDisk::Spec(VmDiskSpec {
            volume: Some(vol.clone()),
            read_only: d.spec().read_only,
            ..VmDiskSpec::default()
        }));
    }
    def.disks = disks;
    Ok(def)
}

fn plan(b: Arc<Backups>, params: &Value) -> Result<Plan<App>, String> {
    let p: RestoreParams = serde_json::from_value(params.clone()).map_err(|e| e.to_string())?;
    new_definition(&p)?;
    let bytes: u64 = p.disks.iter().map(|d| d.2).sum::<u64>().max(1);
    if let Some(to) = &p.to {
        return Ok(Plan::new(
            &format!(
                "restore of backup {} from repository {} as VM {} on host {to}",
                p.backup, p.repo, p.name
            ),
            vec![
                (
                    Box::new(CheckPeer {
                        b: b.clone(),
                        p: p.clone(),
                    }),
                    0.0,
                ),
                (
                    Box::new(PeerVolumes {
                        b: b.clone(),
                        p: p.clone(),
                    }),
                    0.0,
                ),
                (
                    Box::new(PeerFetch {
                        b: b.clone(),
                        p: p.clone(),
                    }),
                    bytes as f64,
                ),
                (
                    Box::new(PeerDefine {
                        b: b.clone(),
                        p: p.clone(),
                    }),
                    bytes as f64 * 0.01,
                ),
                (Box::new(PeerCleanUp { b, p }), 0.0),
            ],
        ));
    }
    Ok(Plan::new(
        &format!(
            "restore of backup {} from repository {} as VM {}",
            p.backup, p.repo, p.name
        ),
        vec![
            (Box::new(CreateVolumes { p: p.clone() }), 0.0),
            (
                Box::new(Fetch {
                    b: b.clone(),
                    p: p.clone(),
                }),
                bytes as f64,
            ),
            (Box::new(Define { b, p }), bytes as f64 * 0.01),
        ],
    ))
}

struct CreateVolumes {
    p: RestoreParams,
}

impl Step<App> for CreateVolumes {
    fn name(&self) -> &str {
        "create volumes"
    }

    fn intent(&self, _cx: &StepContext<App>) -> Result<Value, StepError> {
        Ok(json!({ "volumes": self.p.disks.iter().map(|d| &d.1).collect::<Vec<_>>() }))
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let pool = cx.app.pool.clone();
            let disks = self.p.disks.clone();
            crate::operations::blocking(move || {
                for (_, vol, size) in &disks {
                    pool.create_volume(vol, *size)?;
                }
                Ok(())
            })
            .await?;
            for (dev, vol, size) in &self.p.disks {
                cx.log(format!(
                    "created volume {vol} ({size} bytes) for disk {dev}"
                ));
            }
            Ok(Value::Null)
        })
    }

    fn undo<'a>(
        &'a self,
        cx: &'a StepContext<App>,
        intent: &'a Value,
        _result: Option<&'a Value>,
    ) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let vols: Vec<String> = intent["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            let pool = cx.app.pool.clone();
            crate::operations::blocking(move || {
                for v in &vols {
                    match pool.delete_volume(v) {
                        Err(e) if e.kind() == ferry_pool::ErrorKind::NotFound => {}
                        r => r?,
                    }
                }
                Ok(())
            })
            .await?;
            cx.log("deleted the restore's volumes");
            Ok(())
        })
    }
}

struct Fetch {
    b: Arc<Backups>,
    p: RestoreParams,
}

impl Step<App> for Fetch {
    fn name(&self) -> &str {
        "restore data"
    }

    fn recovery(&self) -> Recovery {
        Recovery::Retry
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let (b, p, pool) = (self.b.clone(), self.p.clone(), cx.app.pool.clone());
            let (handle, node) = (cx.progress.clone(), cx.node);
            let total: u64 = p.disks.iter().map(|d| d.2).sum();
            let t0 = std::time::Instant::now();
            let fetched = tokio::task::spawn_blocking(move || -> Result<u64, String> {
                let (_, repo) = b.open(&p.repo).map_err(|e| e.to_string())?;
                let m = repo.show(&p.backup).map_err(|e| super::chain(&e))?;
                let before = AtomicU64::new(0);
                let mut fetched = 0;
                for (dev, vol, size) in &p.disks {
                    let v = pool.volume(vol).map_err(|e| e.to_string())?;
                    // The backed-up read profile, made durable by the
                    // restore's final flush.
                    if let Some(d) = m.disks.iter().find(|d| d.name == *dev) {
                        let cs = v.chunk_size();
                        let chunks: Vec<_> = d
                            .read_profile
                            .iter()
                            .map(|r| r.start / cs..r.end.div_ceil(cs))
                            .collect();
                        if !chunks.is_empty() {
                            v.set_read_profile(&chunks);
                        }
                    }
                    let base = before.load(Ordering::Relaxed);
                    let h = handle.clone();
                    let prog = move |done: u64, _: u64| {
                        h.update(|t| {
                            t.set_fraction(node, (base + done) as f64 / total.max(1) as f64)
                        })
                    };
                    let st = repo
                        .restore_disk(
                            &p.backup,
                            dev,
                            &VolumeTarget(v),
                            RESTORE_THREADS,
                            false,
                            Some(&prog),
                        )
                        .map_err(|e| format!("{}; volume {vol} is incomplete", super::chain(&e)))?;
                    fetched += st.chunks_fetched;
                    before.fetch_add(*size, Ordering::Relaxed);
                }
                Ok(fetched)
            })
            .await
            .map_err(StepError::failed)?
            .map_err(StepError::Failed)?;
            let secs = t0.elapsed().as_secs_f64();
            cx.log(format!(
                "restored {total} bytes ({fetched} blocks fetched) in {secs:.1} s ({:.0} MB/s)",
                total as f64 / secs.max(1e-6) / 1e6
            ));
            Ok(json!({ "bytes": total, "fetched_blocks": fetched }))
        })
    }
}

struct Define {
    b: Arc<Backups>,
    p: RestoreParams,
}

impl Step<App> for Define {
    fn name(&self) -> &str {
        "define vm"
    }

    fn recovery(&self) -> Recovery {
        Recovery::Retry
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let def = new_definition(&self.p).map_err(StepError::Failed)?;
            let vms = self.b.vms.clone();
            let vm = match vms.find(&self.p.name) {
                Ok(vm) => {
                    let mine = vm
                        .definition()
                        .disks
                        .iter()
                        .map(|d| d.volume().map(str::to_string))
                        .collect::<Vec<_>>()
                        == def
                            .disks
                            .iter()
                            .map(|d| d.volume().map(str::to_string))
                            .collect::<Vec<_>>();
                    if !mine {
                        return Err(StepError::failed(format!(
                            "a VM named {} exists already on other volumes; the restored volumes are kept",
                            self.p.name
                        )));
                    }
                    vm
                }
                Err(_) => tokio::task::spawn_blocking(move || vms.define(def))
                    .await
                    .map_err(StepError::failed)?
                    .map_err(StepError::failed)?,
            };
            cx.log(format!("defined VM {} ({})", vm.name, vm.uuid));
            Ok(json!({ "vm": vm.name, "uuid": vm.uuid.to_string() }))
        })
    }

    fn undo<'a>(
        &'a self,
        cx: &'a StepContext<App>,
        _intent: &'a Value,
        result: Option<&'a Value>,
    ) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            if let Some(uuid) = result.and_then(|r| r["uuid"].as_str())
                && let Ok(vm) = self.b.vms.find(uuid)
            {
                self.b.vms.delete(&vm).await.map_err(StepError::failed)?;
                cx.log(format!("deleted VM {}", self.p.name));
            }
            Ok(())
        })
    }
}

// ------------------------------------------------------- to a peer

fn peer_of(b: &Backups, p: &RestoreParams) -> Result<(String, PeerClient), StepError> {
    let to =
        p.to.clone()
            .ok_or_else(|| StepError::failed("restore has no target host"))?;
    let c = b.snaps.peers.client(&to).map_err(StepError::failed)?;
    Ok((to, c))
}

fn not_found(e: &PeerError) -> bool {
    matches!(e, PeerError::Failed { status: 404, .. })
}

/// `DELETE path` on a peer; absent counts as done. True if it deleted.
async fn delete_on(peer: &PeerClient, path: &str) -> Result<bool, StepError> {
    match peer.delete(path).await {
        Ok(()) => Ok(true),
        Err(e) if not_found(&e) => Ok(false),
        Err(e) => Err(StepError::failed(e)),
    }
}

fn peer_export(op_id: &str, dev: &str) -> String {
    let short: String = op_id.chars().filter(|c| *c != '-').take(12).collect();
    format!(".restore-{short}-{dev}")
}

struct CheckPeer {
    b: Arc<Backups>,
    p: RestoreParams,
}

impl Step<App> for CheckPeer {
    fn name(&self) -> &str {
        "check target"
    }

    fn recovery(&self) -> Recovery {
        Recovery::Retry
    }

    fn run<'a>(&'a self, _cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let (to, peer) = peer_of(&self.b, &self.p)?;
            let hello = peer.hello().await.map_err(StepError::failed)?;
            match peer.get::<Value>(&format!("/v1/vms/{}", self.p.name)).await {
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(StepError::failed(e)),
                Ok(_) => {
                    return Err(StepError::failed(format!(
                        "host {to} ({}) already has a VM {}; nothing was restored",
                        hello.name, self.p.name
                    )));
                }
            }
            for (_, vol, _) in &self.p.disks {
                match peer.get::<Value>(&format!("/v1/volumes/{vol}")).await {
                    Err(e) if not_found(&e) => {}
                    Err(e) => return Err(StepError::failed(e)),
                    Ok(_) => {
                        return Err(StepError::failed(format!(
                            "host {to} ({}) already has a volume {vol}; nothing was restored",
                            hello.name
                        )));
                    }
                }
            }
            Ok(json!({ "host": hello.name }))
        })
    }
}

/// A volume of the peer the restore writes: its export's NBD address.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PeerDisk {
    device: String,
    volume: String,
    export: String,
    /// `nbd://host:port/<export>/<secret>`.
    uri: String,
}

struct PeerVolumes {
    b: Arc<Backups>,
    p: RestoreParams,
}

impl Step<App> for PeerVolumes {
    fn name(&self) -> &str {
        "create target volumes"
    }

    fn intent(&self, cx: &StepContext<App>) -> Result<Value, StepError> {
        Ok(json!({
            "peer": self.p.to,
            "volumes": self.p.disks.iter().map(|d| &d.1).collect::<Vec<_>>(),
            "exports": self.p.disks.iter().map(|d| peer_export(&cx.op_id, &d.0)).collect::<Vec<_>>(),
        }))
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let (to, peer) = peer_of(&self.b, &self.p)?;
            let mut out = Vec::new();
            for (dev, volume, size) in &self.p.disks {
                let export = peer_export(&cx.op_id, dev);
                let uri = peer
                    .create_exported_volume(volume, &export, *size, false)
                    .await
                    .map_err(StepError::failed)?
                    .ok_or_else(|| {
                        StepError::failed(format!(
                            "host {to} serves NBD on no TCP address: it cannot receive a restore"
                        ))
                    })?;
                cx.log(format!(
                    "created volume {volume} ({size} bytes) and its export on {to}"
                ));
                out.push(PeerDisk {
                    device: dev.clone(),
                    volume: volume.clone(),
                    export,
                    uri,
                });
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
            let (to, peer) = peer_of(&self.b, &self.p)?;
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
                    cx.log(format!("deleted volume {v} on {to}"));
                }
            }
            Ok(())
        })
    }
}

fn peer_disks(cx: &StepContext<App>) -> Result<Vec<PeerDisk>, StepError> {
    let r = cx
        .result_of("create target volumes")
        .ok_or_else(|| StepError::failed("no result of step create target volumes"))?;
    serde_json::from_value(r["disks"].clone())
        .map_err(|e| StepError::failed(format!("malformed target disks: {e}")))
}

/// A peer's volume, written through its NBD export, as a restore target.
/// Called from the restore's own threads (outside the runtime): each call
/// blocks on the daemon's runtime.
struct NbdTarget {
    rt: tokio::runtime::Handle,
    nbd: Arc<NbdPool>,
}

impl DiskTarget for NbdTarget {
    fn write_at(&self, off: u64, data: &[u8]) -> std::io::Result<()> {
        let max = ferry_nbd::proto::MAX_PAYLOAD as usize;
        self.rt.block_on(async {
            for (i, piece) in data.chunks(max).enumerate() {
                self.nbd
                    .write_at(off + (i * max) as u64, piece, false)
                    .await
                    .map_err(std::io::Error::other)?;
            }
            Ok(())
        })
    }

    fn flush(&self) -> std::io::Result<()> {
        self.rt
            .block_on(self.nbd.flush())
            .map_err(std::io::Error::other)
    }
}

struct PeerFetch {
    b: Arc<Backups>,
    p: RestoreParams,
}

impl Step<App> for PeerFetch {
    fn name(&self) -> &str {
        "restore data"
    }

    fn recovery(&self) -> Recovery {
        Recovery::Retry
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let (to, _) = peer_of(&self.b, &self.p)?;
            let mut targets = Vec::new();
            for d in peer_disks(cx)? {
                let rest = d
                    .uri
                    .strip_prefix("nbd://")
                    .ok_or_else(|| StepError::failed(format!("not an NBD TCP URI: {}", d.uri)))?;
                let (addr, export) = rest.split_once('/').ok_or_else(|| {
                    StepError::failed(format!("NBD URI without an export: {}", d.uri))
                })?;
                let cfg = ferry_nbd::ClientConfig {
                    export: export.to_string(),
                    meta_contexts: Vec::new(),
                    tls: None,
                };
                let nbd = NbdPool::connect(Address::Tcp(addr.to_string()), cfg, PEER_CONNECTIONS)
                    .await
                    .map_err(|e| {
                        StepError::failed(format!(
                            "connecting to the export of {} on {to}: {e}",
                            d.volume
                        ))
                    })?;
                targets.push((d, Arc::new(nbd)));
            }
            let (b, p) = (self.b.clone(), self.p.clone());
            let (handle, node) = (cx.progress.clone(), cx.node);
            let rt = tokio::runtime::Handle::current();
            let total: u64 = p.disks.iter().map(|d| d.2).sum();
            let t0 = std::time::Instant::now();
            let to2 = to.clone();
            let (fetched, profiles) = tokio::task::spawn_blocking(move || -> Result<_, String> {
                let to = to2;
                let (_, repo) = b.open(&p.repo).map_err(|e| e.to_string())?;
                let m = repo.show(&p.backup).map_err(|e| super::chain(&e))?;
                let profiles: Vec<(String, Vec<[u64; 2]>)> = m
                    .disks
                    .iter()
                    .map(|d| {
                        let r = d.read_profile.iter().map(|r| [r.start, r.end]).collect();
                        (d.name.clone(), r)
                    })
                    .collect();
                let mut before = 0u64;
                let mut fetched = 0;
                for (dev, vol, size) in &p.disks {
                    let (_, nbd) = targets
                        .iter()
                        .find(|(d, _)| d.device == *dev)
                        .ok_or_else(|| format!("no target volume for disk {dev}"))?;
                    if nbd.size() < *size {
                        return Err(format!(
                            "volume {vol} on {to} is {} bytes, smaller than {size}",
                            nbd.size()
                        ));
                    }
                    let h = handle.clone();
                    let prog = move |done: u64, _: u64| {
                        h.update(|t| {
                            t.set_fraction(node, (before + done) as f64 / total.max(1) as f64)
                        })
                    };
                    let target = NbdTarget {
                        rt: rt.clone(),
                        nbd: nbd.clone(),
                    };
                    // The restore's threads are plain threads: they may block
                    // on the runtime; this one is a blocking-pool thread.
                    let st = std::thread::scope(|s| {
                        s.spawn(|| {
                            repo.restore_disk(
                                &p.backup,
                                dev,
                                &target,
                                RESTORE_THREADS,
                                false,
                                Some(&prog),
                            )
                        })
                        .join()
                    })
                    .map_err(|_| format!("restore of disk {dev} panicked"))?
                    .map_err(|e| {
                        format!("{}; volume {vol} on {to} is incomplete", super::chain(&e))
                    })?;
                    fetched += st.chunks_fetched;
                    before += size;
                }
                Ok((fetched, profiles))
            })
            .await
            .map_err(StepError::failed)?
            .map_err(StepError::Failed)?;
            let secs = t0.elapsed().as_secs_f64();
            cx.log(format!(
                "restored {total} bytes ({fetched} blocks fetched) into host {to} in {secs:.1} s ({:.0} MB/s)",
                total as f64 / secs.max(1e-6) / 1e6
            ));
            // The backed-up read profiles go to the new volumes.
            let (_, peer) = peer_of(&self.b, &self.p)?;
            for (dev, ranges) in profiles {
                if ranges.is_empty() {
                    continue;
                }
                let vol = self
                    .p
                    .disks
                    .iter()
                    .find(|d| d.0 == dev)
                    .map(|d| d.1.clone())
                    .unwrap_or_default();
                let _: ferry_api::ReadProfile = peer
                    .post(
                        &format!("/v1/volumes/{vol}/read-profile"),
                        &ferry_api::SetReadProfile {
                            ranges: Some(ranges),
                            ..Default::default()
                        },
                    )
                    .await
                    .map_err(StepError::failed)?;
                cx.log(format!("gave volume {vol} on {to} its read profile"));
            }
            Ok(json!({ "bytes": total, "fetched_blocks": fetched }))
        })
    }
}

struct PeerDefine {
    b: Arc<Backups>,
    p: RestoreParams,
}

impl Step<App> for PeerDefine {
    fn name(&self) -> &str {
        "define vm"
    }

    fn intent(&self, _cx: &StepContext<App>) -> Result<Value, StepError> {
        Ok(json!({ "peer": self.p.to, "vm": self.p.name }))
    }

    fn recovery(&self) -> Recovery {
        Recovery::Retry
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let (to, peer) = peer_of(&self.b, &self.p)?;
            let def = new_definition(&self.p).map_err(StepError::Failed)?;
            let volumes = |d: &VmDefinition| -> Vec<Option<String>> {
                d.disks
                    .iter()
                    .map(|x| x.volume().map(str::to_string))
                    .collect()
            };
            // A run after a crash finds the VM it defined.
            let info: ferry_api::VmInfo = match peer
                .get::<ferry_api::VmInfo>(&format!("/v1/vms/{}", self.p.name))
                .await
            {
                Ok(vm) if volumes(&vm.definition) == volumes(&def) => vm,
                Ok(_) => {
                    return Err(StepError::failed(format!(
                        "host {to} has a VM named {} on other volumes; the restored volumes are kept",
                        self.p.name
                    )));
                }
                Err(e) if not_found(&e) => peer
                    .post("/v1/vms", &def)
                    .await
                    .map_err(StepError::failed)?,
                Err(e) => return Err(StepError::failed(e)),
            };
            cx.log(format!(
                "defined VM {} (uuid {}) on {to}",
                info.name, info.uuid
            ));
            Ok(json!({ "vm": info.name, "uuid": info.uuid, "host": to }))
        })
    }

    fn undo<'a>(
        &'a self,
        cx: &'a StepContext<App>,
        _intent: &'a Value,
        _result: Option<&'a Value>,
    ) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let (to, peer) = peer_of(&self.b, &self.p)?;
            if delete_on(&peer, &format!("/v1/vms/{}", self.p.name)).await? {
                cx.log(format!("deleted VM {} on {to}", self.p.name));
            }
            Ok(())
        })
    }
}

struct PeerCleanUp {
    b: Arc<Backups>,
    p: RestoreParams,
}

impl Step<App> for PeerCleanUp {
    fn name(&self) -> &str {
        "clean up"
    }

    fn recovery(&self) -> Recovery {
        Recovery::Retry
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let (to, peer) = peer_of(&self.b, &self.p)?;
            for d in peer_disks(cx)? {
                delete_on(&peer, &format!("/v1/exports/{}", d.export)).await?;
            }
            cx.log(format!("deleted the restore's exports on {to}"));
            Ok(Value::Null)
        })
    }
}
