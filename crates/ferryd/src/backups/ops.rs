//! The `vm.backup` operation and the repository maintenance operations
//! (`repo.verify`, `repo.prune`, `repo.gc`). Steps are described in the
//! parent module.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use ferry_api::{VmDefinition, VmSnapshotMode};
use ferry_backup::{BackupOptions, DiskInput, PrunePolicy, Repository, SnapshotSource};
use ferry_ops::{
    BoxFuture, Manager, OpState, Plan, ProgressHandle, Recovery, Step, StepContext, StepError,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{BACKUP, Backups, Base, GC, PRUNE, THREADS, VERIFY, base_key, delete_snapshots};
use crate::daemon::App;
use crate::groupsnap;

/// Test-only: when [`ferry_ops::fault::PAUSE_VAR`] names
/// `vm.backup:uploading`, the backup stops half-way through its disks
/// (writer marker written, part of the chunks uploaded) until the file
/// named by this variable exists. Never set outside tests.
pub const RELEASE_VAR: &str = "FERRY_BACKUP_TEST_RELEASE";

/// The journaled parameters of `vm.backup`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupParams {
    /// Repository name.
    pub repo: String,
    pub vm: String,
    pub uuid: String,
    pub quiesce: bool,
    /// The snapshot group this backup reads from (`backup-...`).
    pub group: String,
    /// Sum of the disks' sizes (progress weight).
    #[serde(default)]
    pub bytes: u64,
}

/// The journaled parameters of the repository operations.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RepoOpParams {
    pub repo: String,
    #[serde(default)]
    pub keep_last: usize,
    #[serde(default)]
    pub keep_daily: usize,
    #[serde(default)]
    pub keep_weekly: usize,
    #[serde(default)]
    pub keep_monthly: usize,
    #[serde(default)]
    pub dry_run: bool,
}

pub fn register(m: &Arc<Manager<App>>, b: &Arc<Backups>) {
    let b1 = b.clone();
    m.register(BACKUP, move |p| backup_plan(b1.clone(), p));
    for kind in [VERIFY, PRUNE, GC] {
        let b2 = b.clone();
        m.register(kind, move |p| repo_plan(b2.clone(), kind, p));
    }
}

fn backup_plan(b: Arc<Backups>, params: &Value) -> Result<Plan<App>, String> {
    let p: BackupParams = serde_json::from_value(params.clone()).map_err(|e| e.to_string())?;
    groupsnap::check_group_name(&p.group)?;
    let data = p.bytes.max(1) as f64;
    Ok(Plan::new(
        &format!("backup of VM {} to repository {}", p.vm, p.repo),
        vec![
            (
                Box::new(Snap {
                    b: b.clone(),
                    p: p.clone(),
                }),
                data * 0.02,
            ),
            (
                Box::new(Upload {
                    b: b.clone(),
                    p: p.clone(),
                }),
                data,
            ),
            (Box::new(KeepBase { b, p }), data * 0.01),
        ],
    ))
}

/// What the `snapshot` step took.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Taken {
    group: String,
    /// `quiesced`, `crash-consistent` or `stopped`.
    consistency: String,
    note: String,
    definition: VmDefinition,
    /// (device, volume, snapshot, size).
    disks: Vec<(String, String, String, u64)>,
}

fn taken(cx: &StepContext<App>) -> Result<Taken, StepError> {
    let v = cx
        .result_of("snapshot")
        .ok_or_else(|| StepError::failed("the snapshot step has no result"))?;
    serde_json::from_value(v.clone()).map_err(StepError::failed)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, StepError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(StepError::failed)?
        .map_err(StepError::Failed)
}

// ------------------------------------------------------------- snapshot

struct Snap {
    b: Arc<Backups>,
    p: BackupParams,
}

impl Snap {
    fn taken_in(&self, g: &ferry_api::VmSnapshotGroup) -> Result<Taken, StepError> {
        let v = g
            .vms
            .iter()
            .find(|v| v.uuid == self.p.uuid)
            .ok_or_else(|| {
                StepError::failed(format!("group {} does not hold VM {}", g.name, self.p.vm))
            })?;
        if let Some(d) = v.disks.iter().find(|d| d.host != self.b.host) {
            return Err(StepError::failed(format!(
                "VM {}: disk {} is in the pool of host {}; backups of disks in other hosts' pools are not supported yet",
                self.p.vm, d.device, d.host
            )));
        }
        Ok(Taken {
            group: g.name.clone(),
            consistency: v.consistency.to_string(),
            note: v.note.clone(),
            definition: v.definition.clone(),
            disks: v
                .disks
                .iter()
                .map(|d| {
                    (
                        d.device.clone(),
                        d.volume.clone(),
                        d.snapshot.clone(),
                        d.size,
                    )
                })
                .collect(),
        })
    }

    /// A running VM: a `vm-snapshot` operation of it alone (or the one an
    /// interrupted run started).
    async fn through_groupsnap(&self, cx: &StepContext<App>) -> Result<Taken, StepError> {
        let m = self
            .b
            .manager()
            .ok_or_else(|| StepError::failed("ferryd is shutting down"))?;
        let running = m
            .journal()
            .unfinished()
            .map_err(StepError::failed)?
            .into_iter()
            .find(|o| o.kind == groupsnap::KIND && o.params["name"] == self.p.group.as_str());
        let id = match running {
            Some(o) => o.id,
            None => {
                let params = groupsnap::Params {
                    name: self.p.group.clone(),
                    vms: vec![self.p.vm.clone()],
                    mode: VmSnapshotMode::Direct,
                    quiesce: self.p.quiesce,
                };
                let v = serde_json::to_value(&params).map_err(StepError::failed)?;
                m.start(groupsnap::KIND, v).map_err(StepError::failed)?
            }
        };
        cx.log(format!(
            "snapshot of VM {} by operation {id} (group {})",
            self.p.vm, self.p.group
        ));
        let rec = m.wait(&id).await.map_err(StepError::failed)?;
        if rec.state != OpState::Succeeded {
            return Err(StepError::failed(format!(
                "snapshot operation {id} {}: {}",
                rec.state,
                rec.error.unwrap_or_default()
            )));
        }
        let g = groupsnap::read_group(&self.b.snaps, &self.p.group).map_err(StepError::failed)?;
        self.taken_in(&g)
    }

    /// A stopped VM: one pool group snapshot of its volumes.
    async fn plain(&self, cx: &StepContext<App>) -> Result<Taken, StepError> {
        let vm = self.b.vms.find(&self.p.uuid).map_err(StepError::failed)?;
        let def = vm.definition();
        let mut disks = Vec::new();
        for (i, d) in def.disks.iter().enumerate() {
            let device = format!("vd{}", char::from(b'a' + i as u8));
            let vol = d.volume().ok_or_else(|| {
                StepError::failed(format!(
                    "VM {}: disk {device} is a file, not a pool volume; it cannot be backed up",
                    self.p.vm
                ))
            })?;
            let snap = groupsnap::snapshot_name(&self.p.group, &self.p.vm, &device);
            disks.push((device, vol.to_string(), snap, 0u64));
        }
        let pool = cx.app.pool.clone();
        let group = self.p.group.clone();
        let mut d2 = disks.clone();
        let disks = blocking(move || {
            let existing = pool.snapshots();
            let have = |n: &str| existing.iter().find(|s| s.name == n).map(|s| s.size);
            if d2.iter().all(|d| have(&d.2).is_none()) {
                let pairs: Vec<(&str, &str)> =
                    d2.iter().map(|d| (d.1.as_str(), d.2.as_str())).collect();
                pool.group_snapshot(&group, &pairs)
                    .map_err(|e| format!("pool group snapshot {group}: {e}"))?;
            }
            let existing = pool.snapshots();
            for d in &mut d2 {
                d.3 = existing
                    .iter()
                    .find(|s| s.name == d.2)
                    .map(|s| s.size)
                    .ok_or_else(|| format!("snapshot {} is missing", d.2))?;
            }
            Ok(d2)
        })
        .await?;
        Ok(Taken {
            group: self.p.group.clone(),
            consistency: "stopped".into(),
            note: "the VM was stopped: plain pool snapshot of its volumes".into(),
            definition: def,
            disks,
        })
    }
}

impl Step<App> for Snap {
    fn name(&self) -> &str {
        "snapshot"
    }

    fn recovery(&self) -> Recovery {
        Recovery::Retry
    }

    fn intent(&self, _cx: &StepContext<App>) -> Result<Value, StepError> {
        Ok(json!({ "group": self.p.group, "vm": self.p.vm }))
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let t = if let Ok(g) = groupsnap::read_group(&self.b.snaps, &self.p.group) {
                self.taken_in(&g)?
            } else {
                let vm = self.b.vms.find(&self.p.uuid).map_err(StepError::failed)?;
                let running = self.b.vms.control(&vm).await.is_some();
                let pending = self
                    .b
                    .manager()
                    .and_then(|m| m.journal().unfinished().ok())
                    .unwrap_or_default()
                    .iter()
                    .any(|o| {
                        o.kind == groupsnap::KIND && o.params["name"] == self.p.group.as_str()
                    });
                if running || pending {
                    self.through_groupsnap(cx).await?
                } else {
                    self.plain(cx).await?
                }
            };
            cx.log(format!(
                "VM {}: {} ({}); snapshot group {}",
                self.p.vm, t.consistency, t.note, t.group
            ));
            serde_json::to_value(&t).map_err(StepError::failed)
        })
    }

    fn undo<'a>(
        &'a self,
        cx: &'a StepContext<App>,
        _intent: &'a Value,
        result: Option<&'a Value>,
    ) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let group = self.p.group.clone();
            if self.b.group_is_base(&group) {
                return Ok(());
            }
            let snaps: Vec<String> = result
                .and_then(|r| serde_json::from_value::<Taken>(r.clone()).ok())
                .map(|t| t.disks.into_iter().map(|d| d.2).collect())
                .unwrap_or_else(|| {
                    cx.app
                        .pool
                        .snapshots()
                        .into_iter()
                        .filter(|s| s.group.as_deref() == Some(group.as_str()))
                        .map(|s| s.name)
                        .collect()
                });
            delete_snapshots(&self.b, &cx.app.pool, &group, &snaps)
                .await
                .map_err(StepError::Failed)?;
            cx.log(format!(
                "deleted the backup's snapshots (group {})",
                self.p.group
            ));
            Ok(())
        })
    }
}

// --------------------------------------------------------------- upload

struct Upload {
    b: Arc<Backups>,
    p: BackupParams,
}

/// Reports the step's fraction; at the test pause point, holds every
/// worker thread half-way until released.
fn progress_fn(
    handle: ProgressHandle,
    node: ferry_ops::NodeId,
) -> impl Fn(u64, u64) + Send + Sync + 'static {
    let armed =
        std::env::var(ferry_ops::fault::PAUSE_VAR).ok().as_deref() == Some("vm.backup:uploading");
    let release = std::env::var(RELEASE_VAR).ok();
    let announced = std::sync::atomic::AtomicBool::new(false);
    move |done, total| {
        handle.update(|t| t.set_fraction(node, done as f64 / total.max(1) as f64));
        if armed && done * 2 >= total {
            if !announced.swap(true, std::sync::atomic::Ordering::SeqCst) {
                eprintln!("FERRY_OPS_TEST_PAUSED vm.backup:uploading");
            }
            loop {
                if release
                    .as_deref()
                    .is_some_and(|f| std::path::Path::new(f).exists())
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

impl Step<App> for Upload {
    fn name(&self) -> &str {
        "back up disks"
    }

    fn recovery(&self) -> Recovery {
        Recovery::Retry
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let t = taken(cx)?;
            let (b, p, pool) = (self.b.clone(), self.p.clone(), cx.app.pool.clone());
            let op_id = cx.op_id.clone();
            let progress = progress_fn(cx.progress.clone(), cx.node);
            let (manifest, notes, incremental) = blocking(move || {
                let (entry, repo) = b.open(&p.repo).map_err(|e| e.to_string())?;
                // A backup the interrupted run committed.
                for m in repo.list().map_err(|e| super::chain(&e))?.into_iter().rev() {
                    if m.config["operation"] == op_id.as_str() {
                        return Ok((
                            m,
                            vec!["found the backup an interrupted run committed".to_string()],
                            false,
                        ));
                    }
                }
                back_up(&b, &entry.id, &repo, &pool, &p, &t, &op_id, &progress)
            })
            .await?;
            for n in &notes {
                cx.log(n);
            }
            let read: u64 = manifest.disks.iter().map(|d| d.read_bytes).sum();
            let new_chunks: u64 = manifest.disks.iter().map(|d| d.new_chunks).sum();
            let new_bytes: u64 = manifest.disks.iter().map(|d| d.new_bytes).sum();
            cx.log(format!(
                "backup {} committed ({}): read {read} bytes, uploaded {new_chunks} new chunks ({new_bytes} bytes)",
                manifest.id,
                if incremental { "incremental" } else { "full" }
            ));
            Ok(json!({
                "backup": manifest.id,
                "incremental": incremental,
                "read_bytes": read,
                "new_chunks": new_chunks,
                "new_bytes": new_bytes,
                "notes": notes,
            }))
        })
    }
}

/// Reads the disks from their snapshots into a new backup.
#[allow(clippy::too_many_arguments)]
fn back_up(
    b: &Backups,
    repo_id: &str,
    repo: &Repository,
    pool: &ferry_pool::Pool,
    p: &BackupParams,
    t: &Taken,
    op_id: &str,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<(ferry_backup::Manifest, Vec<String>, bool), String> {
    let mut notes = Vec::new();
    let base = b
        .bases()
        .map_err(|e| e.to_string())?
        .get(&base_key(repo_id, &p.uuid))
        .cloned();
    let parent = match &base {
        Some(base) => match repo.show(&base.backup) {
            Ok(_) => Some(base.clone()),
            Err(e) => {
                notes.push(format!(
                    "previous backup {} is not in the repository ({e}): full read",
                    base.backup
                ));
                None
            }
        },
        None => {
            notes.push("no previous backup of this VM in this repository: full read".into());
            None
        }
    };
    let snaps_now = pool.snapshots();
    let mut sources = Vec::new();
    let mut changed: Vec<Option<Vec<Range<u64>>>> = Vec::new();
    let mut modes = BTreeMap::new();
    for (device, volume, snap, _) in &t.disks {
        let s = pool
            .open_snapshot(snap)
            .map_err(|e| format!("snapshot {snap} of disk {device}: {e}"))?;
        sources.push(SnapshotSource::new(s));
        let ch = match parent.as_ref().and_then(|b| b.disks.get(device)) {
            None if parent.is_some() => {
                notes.push(format!(
                    "disk {device}: not in the previous backup: full read"
                ));
                None
            }
            None => None,
            Some((bvol, bsnap)) => {
                if bvol != volume {
                    notes.push(format!(
                        "disk {device}: now volume {volume}, was {bvol}: full read"
                    ));
                    None
                } else if !snaps_now.iter().any(|x| x.name == *bsnap) {
                    notes.push(format!(
                        "disk {device}: base snapshot {bsnap} of the previous backup is missing: full read"
                    ));
                    None
                } else {
                    match pool.changed_between(volume, bsnap, Some(snap)) {
                        Ok(c) => Some(c),
                        Err(e) => {
                            notes.push(format!(
                                "disk {device}: no change tracking from {bsnap} ({e}): full read"
                            ));
                            None
                        }
                    }
                }
            }
        };
        modes.insert(
            device.clone(),
            match &ch {
                Some(c) => json!({
                    "mode": "incremental",
                    "changed_bytes": c.iter().map(|r| r.end - r.start).sum::<u64>(),
                }),
                None => json!({ "mode": "full" }),
            },
        );
        changed.push(ch);
    }
    let incremental = changed.iter().any(Option::is_some);
    let chunk = pool.chunk_size();
    let mut inputs = Vec::new();
    for (i, (device, volume, _, _)) in t.disks.iter().enumerate() {
        let profile = pool
            .volume(volume)
            .map(|v| {
                v.read_profile()
                    .into_iter()
                    .map(|r| r.start * chunk..r.end * chunk)
                    .collect()
            })
            .unwrap_or_default();
        inputs.push(DiskInput {
            name: device.clone(),
            source: &sources[i],
            changed: changed[i].clone(),
            read_profile: profile,
        });
    }
    let config = json!({
        "definition": t.definition,
        "uuid": p.uuid,
        "host": b.host,
        "consistency": t.consistency,
        "consistency_note": t.note,
        "snapshot_group": t.group,
        "operation": op_id,
        "disks": modes,
        "notes": notes,
    });
    let mut opts = BackupOptions::new(&p.vm, config);
    opts.threads = THREADS;
    if incremental && let Some(base) = &parent {
        opts = opts.parent(&base.backup);
    }
    let m = repo
        .backup(&opts, &inputs, Some(progress))
        .map_err(|e| super::chain(&e))?;
    Ok((m, notes, incremental))
}

// ------------------------------------------------------------ keep base

struct KeepBase {
    b: Arc<Backups>,
    p: BackupParams,
}

impl Step<App> for KeepBase {
    fn name(&self) -> &str {
        "keep base"
    }

    fn recovery(&self) -> Recovery {
        Recovery::Retry
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let t = taken(cx)?;
            let backup = cx
                .result_of("back up disks")
                .and_then(|r| r["backup"].as_str())
                .ok_or_else(|| StepError::failed("the back up step has no result"))?
                .to_string();
            let (b, p) = (self.b.clone(), self.p.clone());
            let group = t.group.clone();
            let old = blocking(move || {
                let (entry, _) = b.open(&p.repo).map_err(|e| e.to_string())?;
                let base = Base {
                    backup,
                    group: t.group.clone(),
                    disks: t
                        .disks
                        .iter()
                        .map(|d| (d.0.clone(), (d.1.clone(), d.2.clone())))
                        .collect(),
                };
                b.set_base(&base_key(&entry.id, &p.uuid), base)
                    .map_err(|e| e.to_string())
            })
            .await?;
            let msg = match old {
                Some(o) if o.group != group => {
                    let snaps: Vec<String> = o.disks.values().map(|x| x.1.clone()).collect();
                    if self.b.group_is_base(&o.group) {
                        format!(
                            "older base {} is the base of another repository: kept",
                            o.group
                        )
                    } else {
                        match delete_snapshots(&self.b, &cx.app.pool, &o.group, &snaps).await {
                            Ok(()) => {
                                format!("deleted the older base snapshots (group {})", o.group)
                            }
                            Err(e) => format!(
                                "older base snapshots (group {}) NOT deleted: {e}; delete them by hand",
                                o.group
                            ),
                        }
                    }
                }
                _ => "first base of this VM in this repository".to_string(),
            };
            cx.log(&msg);
            Ok(json!({ "base": self.p.group, "note": msg }))
        })
    }
}

// ---------------------------------------------------- repository ops

fn repo_plan(b: Arc<Backups>, kind: &'static str, params: &Value) -> Result<Plan<App>, String> {
    let p: RepoOpParams = serde_json::from_value(params.clone()).map_err(|e| e.to_string())?;
    let title = format!("{} of repository {}", &kind[5..], p.repo);
    Ok(Plan::new(
        &title,
        vec![(Box::new(RepoStep { b, p, kind }), 1.0)],
    ))
}

struct RepoStep {
    b: Arc<Backups>,
    p: RepoOpParams,
    kind: &'static str,
}

impl Step<App> for RepoStep {
    fn name(&self) -> &str {
        &self.kind[5..]
    }

    fn recovery(&self) -> Recovery {
        Recovery::Retry
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let (b, p, kind) = (self.b.clone(), self.p.clone(), self.kind);
            let (v, lines, failure) = blocking(move || {
                let (_, repo) = b.open(&p.repo).map_err(|e| e.to_string())?;
                let mut lines = Vec::new();
                let mut failure = None;
                let v = match kind {
                    VERIFY => {
                        let r = repo.verify(THREADS).map_err(|e| super::chain(&e))?;
                        lines.push(format!(
                            "checked {} backups, {} chunks",
                            r.backups, r.chunks_checked
                        ));
                        for c in &r.bad_chunks {
                            lines.push(format!(
                                "BAD chunk {}: {}; affects backups: {}",
                                c.id,
                                c.error,
                                if c.backups.is_empty() { "none".into() } else { c.backups.join(", ") }
                            ));
                        }
                        for (id, e) in &r.bad_backups {
                            lines.push(format!("BAD backup {id}: {e}"));
                        }
                        if !r.ok() {
                            failure = Some(format!(
                                "repository {} is damaged: {} bad chunk(s) ({}); affected backups: {}",
                                p.repo,
                                r.bad_chunks.len(),
                                r.bad_chunks.iter().map(|c| c.id.as_str()).collect::<Vec<_>>().join(", "),
                                r.affected_backups.join(", ")
                            ));
                        }
                        serde_json::to_value(&r).map_err(|e| e.to_string())?
                    }
                    PRUNE => {
                        let policy = PrunePolicy {
                            keep_last: p.keep_last,
                            keep_daily: p.keep_daily,
                            keep_weekly: p.keep_weekly,
                            keep_monthly: p.keep_monthly,
                        };
                        let r = repo.prune(&policy, p.dry_run).map_err(|e| super::chain(&e))?;
                        let verb = if p.dry_run { "would forget" } else { "forgot" };
                        for id in &r.forgotten {
                            lines.push(format!("{verb} {id}"));
                        }
                        lines.push(format!(
                            "kept {} backups, {verb} {}",
                            r.kept.len(),
                            r.forgotten.len()
                        ));
                        serde_json::to_value(&r).map_err(|e| e.to_string())?
                    }
                    _ => {
                        let r = repo.gc().map_err(|e| super::chain(&e))?;
                        lines.push(format!(
                            "{} chunks, {} referenced, removed {} ({} bytes), kept {} recent, removed {} indexes{}",
                            r.chunks,
                            r.marked,
                            r.removed,
                            r.removed_bytes,
                            r.kept_recent,
                            r.removed_indexes,
                            if r.deferred { "; sweep deferred: a backup is running" } else { "" }
                        ));
                        serde_json::to_value(&r).map_err(|e| e.to_string())?
                    }
                };
                Ok((v, lines, failure))
            })
            .await?;
            for l in &lines {
                cx.log(l);
            }
            if let Some(f) = failure {
                return Err(StepError::Failed(f));
            }
            Ok(v)
        })
    }
}
