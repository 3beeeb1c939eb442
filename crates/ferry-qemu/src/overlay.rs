//! Overlay snapshots of several disks in one atomic `transaction`, and the
//! active commit that folds them back.
//!
//! Steps, and what each leaves on a crash:
//!
//! 1. [`prepare`] (before any freeze): for each disk, `qemu-img create` a
//!    qcow2 overlay in the overlay directory whose header names the current
//!    active layer as backing file (`-u`: nothing is opened), then
//!    `blockdev-add` it with `backing: null`. A crash leaves an unused
//!    overlay file (and, if QEMU lives, an unused node): [`Prepared::abort`]
//!    or a sweep of the directory removes them.
//! 2. [`Prepared::snapshot`] (while frozen): one `transaction` of
//!    `blockdev-snapshot` actions. Atomic in QEMU: all disks switch to their
//!    overlays or none does. From here the overlays hold the newest writes;
//!    because each header names its backing file, `qemu-img commit` can fold
//!    an overlay back even without QEMU.
//! 3. [`OverlaySet::commit`]: `block-commit` of each active overlay into the
//!    layer below, wait for `BLOCK_JOB_READY`, `block-job-complete`, wait
//!    for `BLOCK_JOB_COMPLETED`; then `blockdev-del` the overlay node and
//!    remove its file. A crash mid-commit leaves the overlay active (QEMU
//!    cancelled the job or died): committing again is safe.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::block::block_graph;
use crate::error::{Error, ErrorKind, Result};
use crate::jobs::{self, JobEnd};
use crate::qga::QgaClient;
use crate::qmp::QmpClient;

/// One disk's overlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    /// Guest device id.
    pub device: String,
    /// The node that was active before the snapshot (the overlay's backing).
    pub below: String,
    /// The overlay's node name.
    pub node: String,
    /// The overlay file.
    pub path: PathBuf,
}

/// Overlays created and added but not yet switched to.
#[derive(Debug)]
#[must_use = "call snapshot() or abort()"]
pub struct Prepared {
    qmp: QmpClient,
    overlays: Vec<Overlay>,
}

/// Overlays the disks are running on.
#[derive(Debug)]
pub struct OverlaySet {
    qmp: QmpClient,
    /// The overlays, in the order of the request.
    pub overlays: Vec<Overlay>,
}

fn ctx(qmp: &QmpClient) -> String {
    format!("overlay snapshot over {}", qmp.path().display())
}

async fn qemu_img_create(path: &Path, backing: &str, backing_fmt: &str, size: u64) -> Result<()> {
    let c = format!("creating overlay {}", path.display());
    let out = tokio::process::Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            backing,
            "-F",
            backing_fmt,
        ])
        .arg(path)
        .arg(size.to_string())
        .output()
        .await
        .map_err(|e| Error::io(e, &c))?;
    if !out.status.success() {
        return Err(Error::new(
            ErrorKind::Process(format!(
                "qemu-img create failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            c,
        ));
    }
    Ok(())
}

/// Creates and adds one overlay per device (in `dir`), without switching
/// the disks to them yet. Nothing is left behind on error.
pub async fn prepare(qmp: &QmpClient, devices: &[&str], dir: &Path) -> Result<Prepared> {
    let graph = block_graph(qmp).await?;
    let mut prepared = Prepared {
        qmp: qmp.clone(),
        overlays: Vec::new(),
    };
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    for dev in devices {
        let r = async {
            let chain = graph.disk(dev)?;
            let top = &chain.top().node;
            let node = graph.unused_name(&format!("{dev}-ov"));
            let path = dir.join(format!("{dev}-{stamp}-{node}.qcow2"));
            let backing_fmt = match top.driver.as_str() {
                "qcow2" | "raw" => top.driver.as_str(),
                other => {
                    return Err(Error::invalid(
                        format!("disk {dev}: cannot put an overlay on a {other} node"),
                        ctx(qmp),
                    ));
                }
            };
            qemu_img_create(&path, &top.filename, backing_fmt, top.virtual_size).await?;
            let added = qmp
                .execute(
                    "blockdev-add",
                    json!({
                        "driver": "qcow2",
                        "node-name": node,
                        "file": {"driver": "file", "filename": path.to_string_lossy()},
                        "backing": null,
                        "discard": "unmap",
                    }),
                )
                .await;
            if let Err(e) = added {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
            Ok(Overlay {
                device: dev.to_string(),
                below: chain.root.clone(),
                node,
                path,
            })
        }
        .await;
        match r {
            Ok(o) => prepared.overlays.push(o),
            Err(e) => {
                prepared.abort().await;
                return Err(e);
            }
        }
    }
    Ok(prepared)
}

async fn drop_overlay(qmp: &QmpClient, o: &Overlay) -> Result<()> {
    let r = qmp
        .execute("blockdev-del", json!({"node-name": o.node}))
        .await
        .map(drop);
    if let Err(e) = std::fs::remove_file(&o.path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        return Err(Error::io(
            e,
            format!("removing overlay {}", o.path.display()),
        ));
    }
    r
}

impl Prepared {
    /// The overlays that [`Self::snapshot`] will switch to.
    pub fn overlays(&self) -> &[Overlay] {
        &self.overlays
    }

    /// Switches every disk to its overlay in one atomic transaction. On
    /// failure no disk was switched and the overlays are removed.
    pub async fn snapshot(self) -> Result<OverlaySet> {
        let actions: Vec<Value> = self
            .overlays
            .iter()
            .map(|o| {
                json!({"type": "blockdev-snapshot", "data": {"node": o.below, "overlay": o.node}})
            })
            .collect();
        match self
            .qmp
            .execute("transaction", json!({"actions": actions}))
            .await
        {
            Ok(_) => Ok(OverlaySet {
                qmp: self.qmp,
                overlays: self.overlays,
            }),
            Err(e) => {
                self.abort().await;
                Err(e)
            }
        }
    }

    /// Removes the overlays (nodes and files) without switching.
    pub async fn abort(self) {
        for o in &self.overlays {
            if let Err(e) = drop_overlay(&self.qmp, o).await {
                tracing::warn!(overlay = %o.path.display(), error = %e, "could not remove a prepared overlay");
            }
        }
    }
}

/// The result of [`snapshot_frozen`].
#[derive(Debug)]
pub struct FrozenSnapshot {
    /// The overlays the disks now run on.
    pub set: OverlaySet,
    /// From the freeze request to the thaw's answer.
    pub window: Duration,
}

/// Freeze (when an agent is given) → atomic overlay transaction → thaw.
/// The thaw is sent also when the transaction fails.
pub async fn snapshot_frozen(
    prepared: Prepared,
    agent: Option<&QgaClient>,
) -> Result<FrozenSnapshot> {
    let t0 = Instant::now();
    let guard = match agent {
        Some(a) => Some(a.freeze().await?),
        None => None,
    };
    let snap = prepared.snapshot().await;
    let thawed = match guard {
        Some(g) => g.thaw().await.map(drop),
        None => Ok(()),
    };
    let window = t0.elapsed();
    let set = snap?;
    thawed?;
    Ok(FrozenSnapshot { set, window })
}

impl OverlaySet {
    /// The overlays a VM runs on, found again (for example from the block
    /// graph after a restart of the process that made them), so that they
    /// can be committed.
    pub fn adopt(qmp: QmpClient, overlays: Vec<Overlay>) -> OverlaySet {
        OverlaySet { qmp, overlays }
    }

    /// Commits every overlay back into the layer below (active commit,
    /// jobs in parallel), pivots, and removes the overlays. `timeout` bounds
    /// each phase (ready, complete).
    pub async fn commit(self, timeout: Duration) -> Result<()> {
        let qmp = self.qmp.clone();
        let c = ctx(&qmp);
        // One event stream per job, subscribed before the job starts, so
        // that waiting for one job never discards another job's events.
        let mut started = Vec::new();
        for o in &self.overlays {
            let job = format!("commit-{}", o.device);
            let events = qmp.events();
            qmp.execute(
                "block-commit",
                json!({"job-id": job, "device": o.node, "base-node": o.below}),
            )
            .await
            .map_err(|e| {
                Error::new(
                    e.kind,
                    format!("{c}: committing {} ({})", o.device, e.context),
                )
            })?;
            started.push((job, events));
        }
        // Every job must become ready before any pivot, so the disks switch
        // back together.
        for (job, events) in &mut started {
            jobs::wait_ready(events, job, timeout).await?;
        }
        for (job, _) in &started {
            jobs::complete(&qmp, job).await?;
        }
        for (job, events) in &mut started {
            if jobs::wait_end(events, job, timeout).await? != JobEnd::Completed {
                return Err(Error::new(
                    ErrorKind::Job(format!("{job} was cancelled")),
                    c,
                ));
            }
        }
        for o in &self.overlays {
            drop_overlay(&qmp, o).await?;
        }
        Ok(())
    }

    /// The QMP client.
    pub fn qmp(&self) -> &QmpClient {
        &self.qmp
    }
}
