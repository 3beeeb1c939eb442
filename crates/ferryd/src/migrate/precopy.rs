//! `vm.migrate` in `precopy` mode: the disks are mirrored to plain
//! volumes on the destination before the memory moves, so the VM does not
//! depend on the source once it runs there (libvirt's
//! `--copy-storage-all` works this way).
//!
//! # Steps (each journaled: intent before it acts, result after)
//! 1. `prepare` — the destination (`POST /v1/peer/migrate-precopy`)
//!    records the arrival (`<data>/migrate-precopy-in/<uuid>.json`: the
//!    volumes it makes, so an abort removes those and nothing else),
//!    creates one empty volume per disk, defines the VM on them with the
//!    same UUID (which exports each over NBD, TCP with a secret) and starts
//!    its QEMU with `-incoming` and post-copy enabled. Undo: the
//!    destination removes the QEMU, definition and recorded volumes — it
//!    refuses once the VM runs there.
//! 2. `mirror` — this host's QEMU runs one `blockdev-mirror` (sync
//!    `full`) per disk into the destination's export of the new volume,
//!    over NBD/TCP, and waits until every job is *ready* (in sync; guest
//!    writes now reach both). Progress is the jobs' (never backwards).
//!    Undo (cancel, or a crash here): the jobs are force-cancelled and
//!    their target nodes removed; the disks never left this host.
//! 3. `memory` — QEMU migrates the memory with `pause-before-switchover`:
//!    a pre-copy pass, then post-copy (see below). When QEMU stops the
//!    guest and pauses (`pre-switchover`), each mirror is completed
//!    *without pivot* (`block-job-cancel` of a ready job: a final sync
//!    with the guest stopped, then a flush, ending `BLOCK_JOB_COMPLETED`
//!    — the target is then the disk as the guest last wrote it), its
//!    target node is deleted (the NBD connection closes after the flush),
//!    and only then does the migration continue: the destination's QEMU
//!    activates its disks after they are complete, and this QEMU's disks
//!    were never switched, so a failure before this point leaves the VM
//!    running here on its own disks. Cancel before the continue cancels
//!    the migration (the VM resumes here, untouched) and the compensation
//!    undoes `mirror` and `prepare`.
//! 4. `switchover` — waits for the memory migration to complete, records
//!    the downtime QEMU reports (it includes the final disk sync), then
//!    tells the destination (`.../finish`), which waits for the VM to run
//!    and drops its arrival record. Retried after a crash.
//! 5. `release` — as in `ondemand` mode: this host's QEMU, definition,
//!    exports and (unless `keep_source`) volumes are removed.
//!
//! # Memory: post-copy, by choice
//! Plain pre-copy of a writing guest's memory damaged guest memory in up
//! to half of the runs under QEMU 7.2 TCG on this machine (the ignored
//! test in `ferry-qemu/tests/guest_ops.rs`), so, as in `ondemand` mode,
//! memory switches to post-copy once 16 MiB were sent. The disks are
//! complete on the destination before the switch, so post-copy adds no
//! dependency on the source's *storage*; the memory pages still come from
//! the source's QEMU for the few seconds of the post-copy phase, and
//! losing either QEMU during those seconds loses the VM (as with any
//! post-copy).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_api::{PrecopyDisk, PrecopyReady, PrecopyRequest};
use ferry_ops::progress::NodeId;
use ferry_ops::{BoxFuture, Plan, ProgressTree, Recovery, Step, StepContext, StepError};
use ferry_qemu::jobs::{self, JobEnd, MonotonicProgress};
use ferry_qemu::{NbdServer, QmpClient};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{
    Env, Memory as OndemandMemory, POSTCOPY_AFTER, Params, Release, patient, peer, qmp_wait,
    switched_away,
};
use crate::config::write_atomic;
use crate::daemon::App;
use crate::peers::PeerError;

/// How often the mirror jobs are polled for progress.
const JOB_POLL: Duration = Duration::from_millis(500);
/// How long the final sync of a disk may take while the guest is paused.
const FINAL_SYNC: Duration = Duration::from_secs(300);

/// The guest device id of disk `i` (`vda`, `vdb`, ...).
pub fn disk_id(i: usize) -> String {
    format!("vd{}", char::from(b'a' + i as u8))
}

/// The destination's durable note of the VMs arriving by pre-copy: one
/// file per VM naming the volumes made for it. Written before they are
/// made, removed after an abort removed them or once the VM runs here.
pub struct Arrivals {
    dir: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct Arrival {
    volumes: Vec<String>,
}

impl Arrivals {
    pub fn new(root: &Path) -> Arrivals {
        Arrivals {
            dir: root.join("migrate-precopy-in"),
        }
    }

    fn path(&self, uuid: &str) -> Option<PathBuf> {
        // A UUID, never a path.
        uuid::Uuid::parse_str(uuid)
            .ok()
            .map(|u| self.dir.join(format!("{u}.json")))
    }

    /// Notes that `volumes` are being made for VM `uuid`. Blocking.
    pub fn record(&self, uuid: &str, volumes: &[String]) -> anyhow::Result<()> {
        let path = self
            .path(uuid)
            .ok_or_else(|| anyhow::anyhow!("{uuid:?} is not a UUID"))?;
        std::fs::create_dir_all(&self.dir)?;
        let data = serde_json::to_vec(&Arrival {
            volumes: volumes.to_vec(),
        })?;
        write_atomic(&path, &data, 0o600)
    }

    /// The volumes made for VM `uuid`, if it is arriving.
    pub fn get(&self, uuid: &str) -> anyhow::Result<Option<Vec<String>>> {
        let Some(path) = self.path(uuid) else {
            return Ok(None);
        };
        match std::fs::read(&path) {
            Ok(b) => {
                let a: Arrival = serde_json::from_slice(&b)
                    .map_err(|e| anyhow::anyhow!("{} is damaged: {e}", path.display()))?;
                Ok(Some(a.volumes))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
        }
    }

    /// Drops VM `uuid`'s note. Blocking.
    pub fn forget(&self, uuid: &str) -> anyhow::Result<()> {
        let Some(path) = self.path(uuid) else {
            return Ok(());
        };
        match std::fs::remove_file(&path) {
            Ok(()) => {
                if let Ok(d) = std::fs::File::open(&self.dir) {
                    let _ = d.sync_all();
                }
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(anyhow::anyhow!("cannot remove {}: {e}", path.display())),
        }
    }
}

/// The plan of a `precopy` migration.
pub(super) fn plan(env: Arc<Env>, p: Params) -> Result<Plan<App>, String> {
    let mut progress = ProgressTree::new(format!("migrate VM {} to {} ({})", p.name, p.to, p.mode));
    let prepare = progress.add(ProgressTree::ROOT, "prepare", 1.0);
    let mirror = progress.add(ProgressTree::ROOT, "mirror", 10.0);
    let disks = p
        .volumes
        .iter()
        .enumerate()
        .map(|(i, v)| progress.add(mirror, format!("{} ({v})", disk_id(i)), 1.0))
        .collect();
    let memory = progress.add(ProgressTree::ROOT, "memory", 3.0);
    let switchover = progress.add(ProgressTree::ROOT, "switchover", 0.5);
    let release = progress.add(ProgressTree::ROOT, "release", 0.5);
    let p = Arc::new(p);
    let steps: Vec<Box<dyn Step<App>>> = vec![
        Box::new(Prepare {
            env: env.clone(),
            p: p.clone(),
        }),
        Box::new(Mirror {
            env: env.clone(),
            p: p.clone(),
            disks,
        }),
        Box::new(Memory {
            env: env.clone(),
            p: p.clone(),
        }),
        Box::new(Switchover {
            env: env.clone(),
            p: p.clone(),
        }),
        Box::new(Release { env, p }),
    ];
    Ok(Plan {
        steps,
        progress,
        nodes: vec![prepare, mirror, memory, switchover, release],
    })
}

/// `host:port` with an unspecified address replaced by the host the
/// peer's URL names.
fn reachable_addr(addr: &str, peer_url: &str) -> String {
    let host = peer_url
        .split("://")
        .nth(1)
        .and_then(|r| r.split(['/', ':']).next())
        .unwrap_or("");
    match addr.rsplit_once(':') {
        Some((h, port)) if !host.is_empty() && matches!(h, "0.0.0.0" | "[::]") => {
            format!("{host}:{port}")
        }
        _ => addr.to_string(),
    }
}

fn nbd_server(addr: &str) -> Result<NbdServer, StepError> {
    let (host, port) = addr
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
        .ok_or_else(|| StepError::failed(format!("bad NBD address {addr:?}")))?;
    Ok(NbdServer::Tcp {
        host: host.trim_start_matches('[').trim_end_matches(']').into(),
        port,
    })
}

fn mirror_job(i: usize) -> String {
    format!("mirror-{}", disk_id(i))
}

// ---------------------------------------------------------------- prepare

struct Prepare {
    env: Arc<Env>,
    p: Arc<Params>,
}

impl Step<App> for Prepare {
    fn name(&self) -> &str {
        "prepare"
    }

    fn intent(&self, _cx: &StepContext<App>) -> Result<Value, StepError> {
        Ok(json!({ "to": self.p.to, "vm": self.p.vm }))
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let (env, p) = (&self.env, &self.p);
            let vm = env.vms.find(&p.vm).map_err(StepError::failed)?;
            let def = vm.definition();
            let mut disks = Vec::new();
            for (i, d) in def.disks.iter().enumerate() {
                let Some(volume) = d.volume() else {
                    return Err(StepError::failed(format!(
                        "disk {} is not a volume of this host's pool; only this host's volumes migrate",
                        disk_id(i)
                    )));
                };
                let size = cx
                    .app
                    .pool
                    .volume(volume)
                    .map_err(StepError::failed)?
                    .size();
                disks.push(PrecopyDisk {
                    volume: volume.to_string(),
                    size,
                });
            }
            let req = PrecopyRequest {
                definition: def,
                disks,
                postcopy: true,
                from: env.host.clone(),
            };
            let client = peer(env, p)?;
            let mut ready: PrecopyReady = client
                .post("/v1/peer/migrate-precopy", &req)
                .await
                .map_err(StepError::failed)?;
            ready.uri = super::reachable_uri(&ready.uri, client.url());
            for t in &mut ready.disks {
                t.nbd = reachable_addr(&t.nbd, client.url());
            }
            cx.log(format!(
                "{} made {} empty volume(s) and waits for the VM on {}",
                p.to,
                ready.disks.len(),
                ready.uri
            ));
            serde_json::to_value(&ready).map_err(StepError::failed)
        })
    }

    fn undo<'a>(
        &'a self,
        cx: &'a StepContext<App>,
        _intent: &'a Value,
        _result: Option<&'a Value>,
    ) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let client = peer(&self.env, &self.p)?;
            let path = format!("/v1/peer/migrate-precopy/{}", self.p.vm);
            match patient(cx, "removing the arriving VM", || client.delete(&path)).await {
                Ok(()) => Ok(()),
                Err(PeerError::Failed { status: 404, .. }) => Ok(()),
                Err(e) => Err(StepError::failed(e)),
            }
        })
    }
}

// ---------------------------------------------------------------- mirror

struct Mirror {
    env: Arc<Env>,
    p: Arc<Params>,
    disks: Vec<NodeId>,
}

/// Force-cancels mirror job `job` if it runs and removes `target` if it
/// exists; the disk stays on this host.
async fn drop_mirror(qmp: &QmpClient, job: &str, target: &str) -> Result<(), StepError> {
    let running = jobs::query_block_jobs(qmp)
        .await
        .map_err(StepError::failed)?
        .into_iter()
        .any(|j| j.id == job);
    if running {
        let mut events = qmp.events();
        jobs::cancel(qmp, job, true)
            .await
            .map_err(StepError::failed)?;
        // Gone already when the event was missed: fine.
        let _ = jobs::wait_end(&mut events, job, Duration::from_secs(60)).await;
    }
    let graph = ferry_qemu::block_graph(qmp)
        .await
        .map_err(StepError::failed)?;
    if graph.nodes.contains_key(target) {
        qmp.execute("blockdev-del", json!({ "node-name": target }))
            .await
            .map_err(StepError::failed)?;
    }
    Ok(())
}

impl Step<App> for Mirror {
    fn name(&self) -> &str {
        "mirror"
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let ready: PrecopyReady = cx
                .result_of("prepare")
                .cloned()
                .and_then(|r| serde_json::from_value(r).ok())
                .ok_or_else(|| StepError::failed("prepare left no mirror targets"))?;
            let qmp = qmp_wait(&self.env, &self.p)
                .await
                .map_err(StepError::failed)?;
            let started = Instant::now();
            let mut mirrors = Vec::new();
            let mut out = Vec::new();
            for (i, t) in ready.disks.iter().enumerate() {
                let device = disk_id(i);
                let job =
                    match ferry_qemu::start_mirror(&qmp, &device, &nbd_server(&t.nbd)?, &t.export)
                        .await
                    {
                        Ok(j) => j,
                        Err(e) => {
                            for m in mirrors {
                                let _ =
                                    ferry_qemu::MirrorJob::cancel(m, Duration::from_secs(60)).await;
                            }
                            return Err(StepError::failed(format!(
                                "mirroring disk {device} to {}: {e}",
                                self.p.to
                            )));
                        }
                    };
                out.push(
                    json!({ "job": job.job, "device": device, "target_node": job.target_node }),
                );
                mirrors.push(job);
            }
            let mut streams: Vec<_> = mirrors.iter().map(|m| m.progress(JOB_POLL)).collect();
            let mut ready_flags = vec![false; mirrors.len()];
            let mut total = MonotonicProgress::new();
            let mut bytes = vec![(0u64, 0u64); mirrors.len()];
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(JOB_POLL) => {}
                    _ = cx.cancelled() => {
                        for m in mirrors {
                            let _ = m.cancel(Duration::from_secs(60)).await;
                        }
                        cx.log("mirror cancelled; the disks stay on this host, the VM runs here as before");
                        return Err(StepError::Cancelled);
                    }
                }
                for (i, s) in streams.iter_mut().enumerate() {
                    loop {
                        match s.try_recv() {
                            Ok(pr) => {
                                let node = self.disks[i];
                                cx.progress.update(|t| t.set_fraction(node, pr.fraction));
                                bytes[i] = (pr.offset, pr.len);
                                ready_flags[i] |= pr.ready;
                            }
                            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => {
                                if !ready_flags[i] {
                                    // The job ended before it was ready: its
                                    // events say why.
                                    let m = &mut mirrors[i];
                                    let why = match m.wait_ready(Duration::from_secs(5)).await {
                                        Err(e) => e.to_string(),
                                        Ok(()) => "ended".into(),
                                    };
                                    for m in mirrors {
                                        let _ = m.cancel(Duration::from_secs(60)).await;
                                    }
                                    return Err(StepError::failed(format!(
                                        "the mirror of disk {} to {} failed: {why}; the disks stay on this host",
                                        disk_id(i),
                                        self.p.to
                                    )));
                                }
                                break;
                            }
                        }
                    }
                }
                let (done, len) = bytes.iter().fold((0, 0), |(d, l), (o, n)| (d + o, l + n));
                cx.set_fraction(total.update(done, len).min(0.99));
                if ready_flags.iter().all(|r| *r) {
                    break;
                }
            }
            let copied: u64 = bytes.iter().map(|b| b.1).sum();
            cx.log(format!(
                "{} disk(s) in sync with {} after {:.1?} ({} MiB mirrored)",
                mirrors.len(),
                self.p.to,
                started.elapsed(),
                copied >> 20
            ));
            // The jobs keep running in QEMU (ready: guest writes reach
            // both sides); `memory` completes them.
            drop(mirrors);
            Ok(json!({ "jobs": out, "seconds": started.elapsed().as_secs_f64(), "bytes": copied }))
        })
    }

    fn undo<'a>(
        &'a self,
        cx: &'a StepContext<App>,
        _intent: &'a Value,
        result: Option<&'a Value>,
    ) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let Ok(qmp) = qmp_wait(&self.env, &self.p).await else {
                cx.log("the VM does not run here: no mirror to stop");
                return Ok(());
            };
            let listed = result.and_then(|r| r["jobs"].as_array().cloned());
            let pairs: Vec<(String, String)> = match listed {
                Some(jobs) => jobs
                    .iter()
                    .map(|j| {
                        (
                            j["job"].as_str().unwrap_or_default().to_string(),
                            j["target_node"].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect(),
                // Interrupted while starting them: the names they get.
                None => (0..self.p.volumes.len())
                    .map(|i| (mirror_job(i), format!("{}-mi", disk_id(i))))
                    .collect(),
            };
            for (job, target) in &pairs {
                drop_mirror(&qmp, job, target).await?;
            }
            Ok(())
        })
    }
}

// ---------------------------------------------------------------- memory

struct Memory {
    env: Arc<Env>,
    p: Arc<Params>,
}

fn mig_err(e: ferry_qemu::Error) -> StepError {
    StepError::failed(format!("memory migration: {e}"))
}

impl Memory {
    /// Completes every mirror without pivot while the guest is stopped
    /// (the targets are then exact copies) and closes the targets.
    async fn complete_disks(
        &self,
        cx: &StepContext<App>,
        qmp: &QmpClient,
    ) -> Result<Duration, StepError> {
        let t = Instant::now();
        let listed: Vec<(String, String)> = cx
            .result_of("mirror")
            .and_then(|r| r["jobs"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .map(|j| {
                (
                    j["job"].as_str().unwrap_or_default().to_string(),
                    j["target_node"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        if listed.len() != self.p.volumes.len() {
            return Err(StepError::failed("mirror left no job list"));
        }
        let running = jobs::query_block_jobs(qmp).await.map_err(mig_err)?;
        for (job, _) in &listed {
            match running.iter().find(|j| j.id == *job) {
                Some(j) if j.ready => {}
                Some(j) => {
                    return Err(StepError::failed(format!(
                        "the mirror {job} is {} (not in sync)",
                        j.status
                    )));
                }
                None => {
                    return Err(StepError::failed(format!(
                        "the mirror {job} is gone; the destination's disk is not current"
                    )));
                }
            }
        }
        // One event stream per job, subscribed before the jobs are told to
        // end: waiting for one job's end must not discard another's (with
        // one shared stream, a second job ending first was lost and its
        // wait timed out).
        let mut streams: Vec<_> = listed.iter().map(|_| qmp.events()).collect();
        for (job, _) in &listed {
            jobs::cancel(qmp, job, false).await.map_err(mig_err)?;
        }
        for ((job, target), events) in listed.iter().zip(streams.iter_mut()) {
            match jobs::wait_end(events, job, FINAL_SYNC).await {
                Ok(JobEnd::Completed) => {}
                Ok(JobEnd::Cancelled) => {
                    return Err(StepError::failed(format!(
                        "the mirror {job} was cancelled instead of completing its final sync"
                    )));
                }
                Err(e) => {
                    return Err(StepError::failed(format!("final sync of {job}: {e}")));
                }
            }
            qmp.execute("blockdev-del", json!({ "node-name": target }))
                .await
                .map_err(|e| {
                    StepError::failed(format!("closing the mirror target {target}: {e}"))
                })?;
        }
        Ok(t.elapsed())
    }
}

impl Step<App> for Memory {
    fn name(&self) -> &str {
        "memory"
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let uri = cx
                .result_of("prepare")
                .and_then(|r| r["uri"].as_str())
                .ok_or_else(|| StepError::failed("prepare left no migration URI"))?
                .to_string();
            let qmp = qmp_wait(&self.env, &self.p)
                .await
                .map_err(StepError::failed)?;
            if let Some(status) = switched_away(&qmp).await? {
                return Ok(json!({ "status": status }));
            }
            let mut params = json!({ "downtime-limit": 300 });
            if let Some(b) = self.p.bandwidth {
                params["max-bandwidth"] = json!(b);
            }
            qmp.execute("migrate-set-parameters", params)
                .await
                .map_err(mig_err)?;
            qmp.execute(
                "migrate-set-capabilities",
                json!({ "capabilities": [
                    { "capability": "postcopy-ram", "state": true },
                    { "capability": "pause-before-switchover", "state": true },
                ]}),
            )
            .await
            .map_err(mig_err)?;
            qmp.execute("migrate", json!({ "uri": uri }))
                .await
                .map_err(mig_err)?;
            let started = Instant::now();
            let mut clamp = MonotonicProgress::new();
            let mut postcopy = false;
            let mut sync = None;
            loop {
                if cx.is_cancelled() && sync.is_none() {
                    return match ferry_qemu::migration::cancel(&qmp, Duration::from_secs(60)).await
                    {
                        Ok(_) => {
                            cx.log("memory migration cancelled before switchover; the VM runs here as before");
                            Err(StepError::Cancelled)
                        }
                        Err(e) => Err(StepError::failed(format!(
                            "cancelling the memory migration: {e}"
                        ))),
                    };
                }
                let st = ferry_qemu::migration::query_migrate(&qmp)
                    .await
                    .map_err(mig_err)?;
                cx.set_fraction(
                    clamp
                        .update(st.transferred, st.transferred + st.remaining)
                        .min(0.99),
                );
                match st.status.as_str() {
                    "active" if !postcopy && st.transferred >= POSTCOPY_AFTER => {
                        qmp.execute("migrate-start-postcopy", Value::Null)
                            .await
                            .map_err(mig_err)?;
                        postcopy = true;
                    }
                    "pre-switchover" if sync.is_none() => {
                        // The guest is stopped: the disks' last writes
                        // reach the destination before it may run.
                        match self.complete_disks(cx, &qmp).await {
                            Ok(d) => sync = Some(d),
                            Err(e) => {
                                let _ =
                                    ferry_qemu::migration::cancel(&qmp, Duration::from_secs(60))
                                        .await;
                                return Err(e);
                            }
                        }
                        qmp.execute("migrate-continue", json!({ "state": "pre-switchover" }))
                            .await
                            .map_err(mig_err)?;
                    }
                    "postcopy-active" | "completed" if sync.is_some() => {
                        let sync = sync.unwrap_or_default();
                        cx.log(format!(
                            "switchover ({}) after {:.1?}: {} bytes of memory sent; final disk sync took {:.0?} with the guest paused",
                            st.status,
                            started.elapsed(),
                            st.transferred,
                            sync
                        ));
                        return Ok(json!({
                            "status": st.status,
                            "final_sync_ms": sync.as_millis() as u64,
                        }));
                    }
                    "failed" | "cancelled" => {
                        return Err(StepError::failed(format!(
                            "the memory migration {}: {}; the VM runs here",
                            st.status,
                            st.error.unwrap_or_default()
                        )));
                    }
                    _ => {}
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    }

    fn undo<'a>(
        &'a self,
        cx: &'a StepContext<App>,
        intent: &'a Value,
        result: Option<&'a Value>,
    ) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let m = OndemandMemory {
                env: self.env.clone(),
                p: self.p.clone(),
            };
            m.undo(cx, intent, result).await
        })
    }
}

// ---------------------------------------------------------------- switchover

struct Switchover {
    env: Arc<Env>,
    p: Arc<Params>,
}

impl Step<App> for Switchover {
    fn name(&self) -> &str {
        "switchover"
    }

    fn recovery(&self) -> Recovery {
        Recovery::Retry
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let (env, p) = (&self.env, &self.p);
            let mut stats = None;
            match qmp_wait(env, p).await {
                Ok(qmp) => loop {
                    let st = ferry_qemu::migration::query_migrate(&qmp)
                        .await
                        .map_err(StepError::failed)?;
                    match st.status.as_str() {
                        "completed" => {
                            stats = Some(st);
                            break;
                        }
                        "failed" | "cancelled" => {
                            return Err(StepError::failed(format!(
                                "the memory migration ended {} after switchover: {}; the VM's state is split between the hosts",
                                st.status,
                                st.error.unwrap_or_default()
                            )));
                        }
                        _ => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                },
                Err(e) => cx.log(format!("{e}; relying on the destination's state")),
            }
            let client = peer(env, p)?;
            let path = format!("/v1/peer/migrate-precopy/{}/finish", p.vm);
            let empty = json!({});
            patient(cx, "telling the destination", || {
                client.post::<_, serde::de::IgnoredAny>(&path, &empty)
            })
            .await
            .map_err(StepError::failed)?;
            let downtime = stats.as_ref().and_then(|s| s.downtime_ms);
            let total = stats.as_ref().and_then(|s| s.total_time_ms);
            cx.log(format!(
                "VM {} runs on {} on its own copies of the disks; downtime {} ms, memory migration {} ms (QEMU)",
                p.name,
                p.to,
                downtime.map_or("?".into(), |d| d.to_string()),
                total.map_or("?".into(), |d| d.to_string()),
            ));
            Ok(json!({
                "downtime_ms": downtime,
                "total_time_ms": total,
                "postcopy_requests": stats.and_then(|s| s.postcopy_requests),
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            reachable_addr("0.0.0.0:10809", "http://10.1.0.2:7450"),
            "10.1.0.2:10809"
        );
        assert_eq!(
            reachable_addr("127.0.0.1:10809", "http://10.1.0.2:7450"),
            "127.0.0.1:10809"
        );
        assert!(matches!(
            nbd_server("10.0.0.1:4000").unwrap(),
            NbdServer::Tcp { ref host, port: 4000 } if host == "10.0.0.1"
        ));
        assert!(nbd_server("nope").is_err());
    }

    #[test]
    fn arrivals_are_kept_by_uuid_only() {
        let dir = tempfile::tempdir().unwrap();
        let a = Arrivals::new(dir.path());
        let u = "0b4d3f4e-1111-4a4a-8b8b-123456789abc";
        assert_eq!(a.get(u).unwrap(), None);
        a.record(u, &["data".into()]).unwrap();
        assert_eq!(a.get(u).unwrap(), Some(vec!["data".to_string()]));
        assert!(a.record("../x", &[]).is_err());
        assert_eq!(a.get("../x").unwrap(), None);
        a.forget(u).unwrap();
        assert_eq!(a.get(u).unwrap(), None);
    }
}
