//! Live migration of a VM to a peer with on-demand data (flow 3 of
//! DESIGN.md): the `vm.migrate` operation, run on the source host.
//!
//! # Steps (each journaled: intent before it acts, result after)
//! 1. `prepare` — the destination (`POST /v1/peer/migrate/incoming`)
//!    creates one lazy volume per disk (size only, no data) whose chunk
//!    source is the VM's internal export of that disk on this host, over
//!    NBD/TCP with the export's secret; it persists the source descriptors
//!    (a restart re-attaches them), defines the VM with the same UUID and
//!    starts its QEMU with `-incoming`, post-copy enabled. Undo: the
//!    destination removes its QEMU, definition and lazy volumes — it
//!    refuses once the VM runs there.
//! 2. `memory` — QEMU migrates the memory (pre-copy pass, then
//!    post-copy). Ends at switchover: post-copy started (the destination
//!    runs the VM and pulls the remaining pages) or the migration
//!    completed. Cancel before that point cancels the QEMU migration: the
//!    VM keeps running here, untouched, and the compensation removes what
//!    `prepare` made. After it, cancel is ignored (the VM lives there).
//! 3. `switchover` — waits for the memory migration to complete (this
//!    QEMU has flushed and inactivated its disks), records the downtime
//!    QEMU reports, then asks the destination to start hydrating. Retried
//!    after a crash.
//! 4. `hydration` — follows the destination's hydration per disk (missing
//!    chunks, errors while this host is down). Retried after a crash.
//! 5. `release` — waits until this host's own copies are complete (a VM
//!    still hydrating *here* from an earlier migration keeps serving the
//!    next destination until then), removes the VM here (its QEMU, now
//!    idle after the migration, its definition and exports) and deletes
//!    its volumes unless `keep_source`; tells the destination to forget
//!    its source records. Retried after a crash.
//!
//! # Invariant
//! The destination never serves a chunk older than this host's state at
//! switchover: nothing is fetched before switchover (the destination QEMU
//! waits in `inmigrate` with its disks inactive, and hydration starts only
//! in step 3), and from switchover on this host's QEMU writes nothing.

pub mod inbound;
pub mod precopy;
pub mod records;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_api::{
    IncomingDisk, IncomingReady, IncomingRequest, IncomingStatus, MigrateMode, OnMissing,
};
use ferry_ops::{BoxFuture, Manager, Plan, ProgressTree, Recovery, Step, StepContext, StepError};
use ferry_qemu::{MigrationParams, QmpClient};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub use inbound::Inbound;

use crate::daemon::App;
use crate::exports::Exports;
use crate::operations::blocking;
use crate::peers::{PeerClient, PeerError, Peers};
use crate::vms::{Vms, export_name};

/// The operation kind.
pub const KIND: &str = "vm.migrate";

/// How long a step waits for ferryd to re-attach the VM after a restart.
const REATTACH_WAIT: Duration = Duration::from_secs(30);
/// Memory bytes sent in pre-copy before switching to post-copy.
const POSTCOPY_AFTER: u64 = 16 << 20;
/// How often hydration is polled.
const POLL: Duration = Duration::from_millis(500);

/// What the steps act on besides the pool.
pub struct Env {
    pub vms: Arc<Vms>,
    pub exports: Arc<Exports>,
    pub peers: Arc<Peers>,
    pub inbound: Arc<Inbound>,
    /// This host's name.
    pub host: String,
}

/// Registers `vm.migrate`.
pub fn register(m: &Manager<App>, env: Arc<Env>) {
    m.register(KIND, move |params| plan(env.clone(), params));
}

/// The journaled parameters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Params {
    /// The VM's UUID.
    pub vm: String,
    pub name: String,
    /// The destination peer.
    pub to: String,
    pub mode: MigrateMode,
    #[serde(default)]
    pub bandwidth: Option<u64>,
    #[serde(default)]
    pub keep_source: bool,
    #[serde(default)]
    pub on_missing: OnMissing,
    /// The VM's volumes, in disk order (`vda`, ...).
    pub volumes: Vec<String>,
    /// The batch this migration belongs to (`migrate.batch`): the
    /// destination keeps its durable records ([`records`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<String>,
}

fn plan(env: Arc<Env>, params: &Value) -> Result<Plan<App>, String> {
    let p: Params = serde_json::from_value(params.clone()).map_err(|e| e.to_string())?;
    if p.mode == MigrateMode::Precopy {
        return precopy::plan(env, p);
    }
    let mut progress = ProgressTree::new(format!("migrate VM {} to {} ({})", p.name, p.to, p.mode));
    let prepare = progress.add(ProgressTree::ROOT, "prepare", 1.0);
    let memory = progress.add(ProgressTree::ROOT, "memory", 3.0);
    let switchover = progress.add(ProgressTree::ROOT, "switchover", 0.5);
    let hydration = progress.add(ProgressTree::ROOT, "hydration", 10.0);
    let disks = p
        .volumes
        .iter()
        .enumerate()
        .map(|(i, v)| {
            progress.add(
                hydration,
                format!("vd{} ({v})", (b'a' + i as u8) as char),
                1.0,
            )
        })
        .collect();
    let release = progress.add(ProgressTree::ROOT, "release", 0.5);
    let p = Arc::new(p);
    let steps: Vec<Box<dyn Step<App>>> = vec![
        Box::new(Prepare {
            env: env.clone(),
            p: p.clone(),
        }),
        Box::new(Memory {
            env: env.clone(),
            p: p.clone(),
        }),
        Box::new(Switchover {
            env: env.clone(),
            p: p.clone(),
        }),
        Box::new(Hydration {
            env: env.clone(),
            p: p.clone(),
            disks,
        }),
        Box::new(Release { env, p }),
    ];
    Ok(Plan {
        steps,
        progress,
        nodes: vec![prepare, memory, switchover, hydration, release],
    })
}

fn peer(env: &Env, p: &Params) -> Result<PeerClient, StepError> {
    env.peers.client(&p.to).map_err(StepError::failed)
}

/// The QMP client of the VM here, waiting for a re-attach after a restart.
async fn qmp_wait(env: &Env, p: &Params) -> Result<QmpClient, String> {
    let deadline = Instant::now() + REATTACH_WAIT;
    loop {
        let vm = env.vms.find(&p.vm).map_err(|e| e.to_string())?;
        match env.vms.control(&vm).await {
            Some((q, _)) => return Ok(q),
            None if Instant::now() >= deadline => {
                return Err(format!("VM {} does not run on this host", p.name));
            }
            None => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Retries a peer call while the peer cannot be reached (it may be
/// restarting), logging once; other errors are returned.
async fn patient<T, F, Fut>(cx: &StepContext<App>, what: &str, f: F) -> Result<T, PeerError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, PeerError>>,
{
    let mut logged = false;
    loop {
        match f().await {
            Err(e @ PeerError::Unreachable { .. }) => {
                if !logged {
                    cx.log(format!("{what}: {e}; retrying until it answers"));
                    logged = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            r => return r,
        }
    }
}

/// `nbd://host:port/name/secret` → (`host:port`, `name/secret`).
fn split_tcp_uri(uri: &str) -> Option<(String, String)> {
    let rest = uri.strip_prefix("nbd://")?;
    let (addr, export) = rest.split_once('/')?;
    Some((addr.to_string(), export.to_string()))
}

/// An unspecified listen address (`0.0.0.0`) in `uri` replaced by the host
/// the peer's URL names.
fn reachable_uri(uri: &str, peer_url: &str) -> String {
    let host = peer_url
        .split("://")
        .nth(1)
        .and_then(|r| r.split(['/', ':']).next())
        .unwrap_or("");
    if host.is_empty() {
        return uri.to_string();
    }
    uri.replace("tcp:0.0.0.0:", &format!("tcp:{host}:"))
        .replace("tcp:[::]:", &format!("tcp:{host}:"))
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
            let uuid = vm.uuid;
            let mut disks = Vec::new();
            for (i, d) in def.disks.iter().enumerate() {
                let id = format!("vd{}", (b'a' + i as u8) as char);
                let Some(volume) = d.volume() else {
                    return Err(StepError::failed(format!(
                        "disk {id} is not a volume of this host's pool (a file, or a peer's volume); only this host's volumes migrate"
                    )));
                };
                let export = export_name(&uuid, &id);
                let info = env.exports.get(&export).ok_or_else(|| {
                    StepError::failed(format!("the export {export} of disk {id} is missing"))
                })?;
                let (nbd, tcp_export) = info
                    .tcp_uri
                    .as_deref()
                    .and_then(split_tcp_uri)
                    .ok_or_else(|| StepError::failed("this host serves no NBD over TCP"))?;
                let size = cx
                    .app
                    .pool
                    .volume(volume)
                    .map_err(StepError::failed)?
                    .size();
                disks.push(IncomingDisk {
                    volume: volume.to_string(),
                    size,
                    nbd,
                    export: tcp_export,
                });
            }
            let req = IncomingRequest {
                definition: def,
                disks,
                postcopy: true,
                on_missing: p.on_missing,
                from: env.host.clone(),
                rate_limit: p.bandwidth,
                batch: p.batch.clone(),
            };
            let client = peer(env, p)?;
            let ready: IncomingReady = client
                .post("/v1/peer/migrate/incoming", &req)
                .await
                .map_err(StepError::failed)?;
            let uri = reachable_uri(&ready.uri, client.url());
            cx.log(format!(
                "{} made {} lazy volume(s) and waits for the VM on {uri}",
                p.to,
                req.disks.len()
            ));
            Ok(json!({ "uri": uri }))
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
            let path = format!("/v1/peer/migrate/{}", self.p.vm);
            match patient(cx, "removing the incoming VM", || client.delete(&path)).await {
                Ok(()) => Ok(()),
                Err(PeerError::Failed { status: 404, .. }) => Ok(()),
                Err(e) => Err(StepError::failed(e)),
            }
        })
    }
}

// ---------------------------------------------------------------- memory

struct Memory {
    env: Arc<Env>,
    p: Arc<Params>,
}

fn switched(status: &str) -> bool {
    matches!(status, "postcopy-active" | "completed")
}

/// The outgoing migration's status when this host's QEMU has switched the
/// VM over to the destination. `query-migrate` alone cannot say: a VM that
/// *arrived* by migration reports the incoming one as `completed` — but it
/// runs, and a source after switchover does not.
async fn switched_away(qmp: &QmpClient) -> Result<Option<String>, StepError> {
    let st = ferry_qemu::migration::query_migrate(qmp)
        .await
        .map_err(StepError::failed)?;
    let rs = qmp.query_status().await.map_err(StepError::failed)?;
    Ok((switched(&st.status) && !rs.running).then_some(st.status))
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
                // A restart found the switchover done.
                return Ok(json!({ "status": status }));
            }
            let params = MigrationParams {
                postcopy: true,
                // Post-copy early: the VM runs on the destination soon,
                // and plain pre-copy of a writing guest is not trusted
                // under QEMU 7.2 TCG (it damaged guest memory in up to
                // half the runs here). Until then the migration can be
                // cancelled.
                postcopy_after_bytes: Some(POSTCOPY_AFTER),
                max_bandwidth: self.p.bandwidth,
                timeout: Duration::from_secs(24 * 3600),
                ..MigrationParams::default()
            };
            let (tx, mut rx) = tokio::sync::mpsc::channel(16);
            let q2 = qmp.clone();
            let task = tokio::spawn(async move {
                ferry_qemu::migration::migrate(&q2, &uri, &params, Some(tx)).await
            });
            let started = Instant::now();
            let mut held = false;
            loop {
                tokio::select! {
                    msg = rx.recv() => match msg {
                        Some(m) => {
                            cx.set_fraction(m.fraction.min(0.99));
                            if !held && m.stats.status == "active" && m.stats.transferred > 0 {
                                // Test-only: hold while memory moves (the
                                // migration task blocks on its progress
                                // channel, so post-copy does not start).
                                held = true;
                                ferry_ops::test_pause("vm.migrate:memory").await;
                            }
                            if switched(&m.stats.status) {
                                cx.log(format!(
                                    "switchover ({}) after {:.1?}: {} bytes of memory sent",
                                    m.stats.status,
                                    started.elapsed(),
                                    m.stats.transferred
                                ));
                                // The task follows the post-copy phase to
                                // its end; `switchover` polls QEMU itself.
                                return Ok(json!({ "status": m.stats.status }));
                            }
                        }
                        None => {
                            return match task.await {
                                Ok(Ok(st)) => Ok(json!({ "status": st.status })),
                                Ok(Err(e)) => Err(StepError::failed(e)),
                                Err(e) => Err(StepError::failed(e)),
                            };
                        }
                    },
                    _ = cx.cancelled() => {
                        task.abort();
                        match ferry_qemu::migration::cancel(&qmp, Duration::from_secs(60)).await {
                            Ok(_) => {
                                cx.log("memory migration cancelled before switchover; the VM runs here as before");
                                return Err(StepError::Cancelled);
                            }
                            Err(e) => {
                                if let Some(status) = switched_away(&qmp).await? {
                                    cx.log(format!("cancel came too late: {e}; the VM runs on {} and the migration goes on", self.p.to));
                                    return Ok(json!({ "status": status }));
                                }
                                return Err(StepError::failed(format!("cancelling the memory migration: {e}")));
                            }
                        }
                    }
                }
            }
        })
    }

    fn undo<'a>(
        &'a self,
        cx: &'a StepContext<App>,
        _intent: &'a Value,
        _result: Option<&'a Value>,
    ) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let qmp = qmp_wait(&self.env, &self.p)
                .await
                .map_err(StepError::failed)?;
            if let Some(status) = switched_away(&qmp).await? {
                return Err(StepError::failed(format!(
                    "the VM switched over to {} ({status}): it cannot come back by undoing",
                    self.p.to
                )));
            }
            let st = ferry_qemu::migration::query_migrate(&qmp)
                .await
                .map_err(StepError::failed)?;
            if matches!(st.status.as_str(), "setup" | "active" | "pre-switchover") {
                ferry_qemu::migration::cancel(&qmp, Duration::from_secs(60))
                    .await
                    .map_err(StepError::failed)?;
            }
            let s = qmp.query_status().await.map_err(StepError::failed)?;
            cx.log(format!(
                "memory migration stopped ({}); the VM here is {:?}",
                st.status, s.status
            ));
            Ok(())
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
            // The migration ends by itself (post-copy pulls the rest);
            // QEMU inactivates its disks before the destination runs.
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
            let path = format!("/v1/peer/migrate/{}/hydrate", p.vm);
            let empty = json!({});
            let status: IncomingStatus =
                patient(cx, "starting hydration", || client.post(&path, &empty))
                    .await
                    .map_err(StepError::failed)?;
            let downtime = stats.as_ref().and_then(|s| s.downtime_ms);
            let total = stats.as_ref().and_then(|s| s.total_time_ms);
            cx.log(format!(
                "VM {} runs on {}; downtime {} ms, memory migration {} ms (QEMU); hydrating {} disk(s)",
                p.name,
                p.to,
                downtime.map_or("?".into(), |d| d.to_string()),
                total.map_or("?".into(), |d| d.to_string()),
                status.disks.len()
            ));
            Ok(json!({
                "downtime_ms": downtime,
                "total_time_ms": total,
                "postcopy_requests": stats.and_then(|s| s.postcopy_requests),
            }))
        })
    }
}

// ---------------------------------------------------------------- hydration

struct Hydration {
    env: Arc<Env>,
    p: Arc<Params>,
    disks: Vec<ferry_ops::progress::NodeId>,
}

impl Step<App> for Hydration {
    fn name(&self) -> &str {
        "hydration"
    }

    fn recovery(&self) -> Recovery {
        Recovery::Retry
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let client = peer(&self.env, &self.p)?;
            let path = format!("/v1/peer/migrate/{}", self.p.vm);
            let started = Instant::now();
            let mut said_down: Option<String> = None;
            let mut cancel_logged = false;
            loop {
                if cx.is_cancelled() && !cancel_logged {
                    cx.log("cancel ignored: the VM runs on the destination; hydration goes on");
                    cancel_logged = true;
                }
                let st: IncomingStatus = patient(cx, "following hydration", || client.get(&path))
                    .await
                    .map_err(StepError::failed)?;
                let mut down = None;
                for d in &st.disks {
                    let f = d.present_chunks as f64 / d.total_chunks.max(1) as f64;
                    if let Some(i) = self.p.volumes.iter().position(|v| *v == d.volume) {
                        let node = self.disks[i];
                        cx.progress.update(|t| t.set_fraction(node, f));
                    }
                    if let Some(e) = &d.last_error {
                        down = Some(format!(
                            "{}: {} chunk(s) missing; {e}",
                            d.volume, d.missing_chunks
                        ));
                    }
                }
                if down.is_some() != said_down.is_some() {
                    match &down {
                        Some(m) => cx.log(format!("hydration stalls: {m}")),
                        None => cx.log("hydration goes on: the source answers again"),
                    }
                    said_down = down;
                }
                if st.done {
                    cx.log(format!(
                        "hydration of {} disk(s) done after {:.1?}",
                        st.disks.len(),
                        started.elapsed()
                    ));
                    return Ok(json!({ "seconds": started.elapsed().as_secs_f64() }));
                }
                tokio::time::sleep(POLL).await;
            }
        })
    }
}

// ---------------------------------------------------------------- release

struct Release {
    env: Arc<Env>,
    p: Arc<Params>,
}

impl Step<App> for Release {
    fn name(&self) -> &str {
        "release"
    }

    fn recovery(&self) -> Recovery {
        Recovery::Retry
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let (env, p) = (&self.env, &self.p);
            // A VM that came here by an on-demand migration and is not
            // fully here yet: this host's volumes still serve the next
            // destination and fetch from the previous source.
            let mut logged = false;
            loop {
                let lazy: Vec<&String> = p
                    .volumes
                    .iter()
                    .filter(|v| cx.app.pool.volume(v).is_ok_and(|v| v.is_lazy()))
                    .collect();
                if lazy.is_empty() {
                    break;
                }
                if !logged {
                    cx.log(format!(
                        "waiting until this host's own hydration of {lazy:?} ends before releasing"
                    ));
                    logged = true;
                }
                // Keeps the inbound records' state current.
                let _ = env.inbound.status(&p.vm);
                tokio::time::sleep(POLL).await;
            }
            if let Ok(vm) = env.vms.find(&p.vm) {
                if env.vms.control(&vm).await.is_some()
                    && let Err(e) = env.vms.kill(&vm).await
                {
                    return Err(StepError::failed(e));
                }
                env.vms.delete(&vm).await.map_err(StepError::failed)?;
                cx.log(format!("VM {} removed from this host", p.name));
            }
            if p.keep_source {
                cx.log(format!("volumes {:?} kept (keep_source)", p.volumes));
            } else {
                for v in &p.volumes {
                    let pool = cx.app.pool.clone();
                    let name = v.clone();
                    blocking(move || match pool.delete_volume(&name) {
                        Err(e) if e.kind() == ferry_pool::ErrorKind::NotFound => Ok(()),
                        r => r,
                    })
                    .await?;
                }
                cx.log(format!("volumes {:?} deleted", p.volumes));
            }
            let client = peer(env, p)?;
            let path = format!("/v1/peer/migrate/{}/finish", p.vm);
            let empty = json!({});
            patient(cx, "telling the destination", || {
                client.post::<_, serde::de::IgnoredAny>(&path, &empty)
            })
            .await
            .map_err(StepError::failed)?;
            Ok(json!({ "kept": p.keep_source }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        assert_eq!(
            split_tcp_uri("nbd://127.0.0.1:4000/vm.x.vda/abc"),
            Some(("127.0.0.1:4000".into(), "vm.x.vda/abc".into()))
        );
        assert_eq!(split_tcp_uri("nbd+unix:///x"), None);
        assert_eq!(
            reachable_uri("tcp:0.0.0.0:5000", "http://10.1.0.2:7450"),
            "tcp:10.1.0.2:5000"
        );
        assert_eq!(
            reachable_uri("tcp:10.0.0.1:5000", "http://10.1.0.2:7450"),
            "tcp:10.0.0.1:5000"
        );
    }
}
