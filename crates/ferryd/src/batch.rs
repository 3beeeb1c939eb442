//! Batch migration (flow 4 of DESIGN.md): `migrate.batch` runs
//! `vm.migrate` on each VM's source host, `parallel` at a time, and goes on
//! past per-VM errors; `status` decides where each VM is from the
//! destination's durable records ([`crate::migrate::records`]) and the live
//! state of both sides; `migrate.batch.recover` finishes the VMs past
//! switchover and rolls back the others.
//!
//! # The decision (per VM)
//! - no *started* record → not migrated (`not started`, side `source`);
//! - record, no placeholder → not migrated (`in progress` while its
//!   `vm.migrate` runs on the source, else `failed`);
//! - placeholder rolled back → not migrated (`failed`);
//! - placeholder, no *completed* event → from live state: the VM switched
//!   over when the destination's QEMU runs it (any state but `inmigrate`),
//!   when the source's QEMU is `postmigrate`/`finish-migrate`, or when the
//!   destination started hydrating (it only does after switchover); else it
//!   did not;
//! - *completed* event → migrated.
//!
//! The coordinator's journal only names the batch's members and
//! destination; the destination's manifest names them too, so a host that
//! lost its journal answers `status` from the destination's records
//! (`?dest=HOST`).

pub mod recover;
pub mod status;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ferry_api::{BatchManifest, BatchMember, BatchRecords, MigrateVm, Operation, Started};
use ferry_ops::{BoxFuture, Manager, Plan, ProgressTree, Recovery, Step, StepContext, StepError};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::daemon::App;
use crate::migrate::records::Records;
use crate::peers::{PeerClient, PeerError, Peers};

/// The operation kind of a batch.
pub const KIND: &str = "migrate.batch";
/// The operation kind of a batch's recovery.
pub const RECOVER_KIND: &str = "migrate.batch.recover";
/// VMs migrated at a time by default.
pub const DEFAULT_PARALLEL: u32 = 2;
/// How long a host may stay unreachable while the batch waits on it.
const PATIENCE: Duration = Duration::from_secs(900);

/// What the batch operations act on.
pub struct Env {
    pub peers: Arc<Peers>,
    /// This host's name.
    pub host: String,
    /// This host's batch records (as a destination).
    pub records: Arc<Records>,
    /// This host's peer token (for calls to itself).
    pub peer_token: String,
    /// This host's own API URL, set once it listens.
    pub self_url: OnceLock<String>,
}

impl Env {
    /// A client for `host`: a peer, or this host itself.
    pub async fn client(&self, host: &str) -> Result<PeerClient, String> {
        if host == self.host {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Some(u) = self.self_url.get() {
                    return Ok(PeerClient::new(u, &self.peer_token));
                }
                if Instant::now() > deadline {
                    return Err("this host does not listen yet".into());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        self.peers.client(host).map_err(|e| e.to_string())
    }

    /// The destination's records of `batch`.
    pub async fn dest_records(&self, to: &str, batch: &str) -> Result<BatchRecords, String> {
        if to == self.host {
            return self.records.get(batch);
        }
        let c = self.client(to).await?;
        c.get(&format!("/v1/peer/migrations/records?batch={batch}"))
            .await
            .map_err(|e| e.to_string())
    }
}

/// The journaled parameters of `migrate.batch`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Params {
    pub batch: String,
    pub to: String,
    pub members: Vec<BatchMember>,
    pub parallel: u32,
    #[serde(default)]
    pub bandwidth: Option<u64>,
}

/// Registers `migrate.batch` and `migrate.batch.recover`.
pub fn register(m: &Manager<App>, env: Arc<Env>) {
    let e = env.clone();
    m.register(KIND, move |params| plan(e.clone(), params));
    m.register(RECOVER_KIND, move |params| {
        recover::plan(env.clone(), params)
    });
}

fn plan(env: Arc<Env>, params: &Value) -> Result<Plan<App>, String> {
    let p: Params = serde_json::from_value(params.clone()).map_err(|e| e.to_string())?;
    let mut progress = ProgressTree::new(format!(
        "migrate {} VM(s) to {} (batch {})",
        p.members.len(),
        p.to,
        p.batch
    ));
    let reg = progress.add(ProgressTree::ROOT, "register", 0.1);
    let mig = progress.add(ProgressTree::ROOT, "migrate", 10.0);
    let nodes = p
        .members
        .iter()
        .map(|m| progress.add(mig, format!("{} from {}", m.name, m.from), 1.0))
        .collect();
    let p = Arc::new(p);
    Ok(Plan {
        steps: vec![
            Box::new(Register {
                env: env.clone(),
                p: p.clone(),
            }),
            Box::new(Migrate { env, p, nodes }),
        ],
        progress,
        nodes: vec![reg, mig],
    })
}

/// Retries while `f` finds its host unreachable (restarting, cut off),
/// up to [`PATIENCE`].
pub(crate) async fn patient<T, F, Fut>(what: &str, f: F) -> Result<T, String>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, PeerError>>,
{
    let since = Instant::now();
    loop {
        match f().await {
            Err(e @ PeerError::Unreachable { .. }) => {
                if since.elapsed() > PATIENCE {
                    return Err(format!("{what}: {e}"));
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            r => return r.map_err(|e| format!("{what}: {e}")),
        }
    }
}

// ---------------------------------------------------------------- register

struct Register {
    env: Arc<Env>,
    p: Arc<Params>,
}

impl Step<App> for Register {
    fn name(&self) -> &str {
        "register"
    }

    fn recovery(&self) -> Recovery {
        Recovery::Retry
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let (env, p) = (&self.env, &self.p);
            let m = BatchManifest {
                batch: p.batch.clone(),
                to: p.to.clone(),
                coordinator: env.host.clone(),
                members: p.members.clone(),
                created: crate::migrate::records::now_ms() / 1000,
            };
            if p.to == env.host {
                env.records.register(&m).map_err(StepError::failed)?;
            } else {
                let c = env.client(&p.to).await.map_err(StepError::failed)?;
                patient("registering the batch at the destination", || {
                    c.post::<_, serde::de::IgnoredAny>("/v1/peer/migrations/batches", &m)
                })
                .await
                .map_err(StepError::failed)?;
            }
            cx.log(format!(
                "batch {} registered at {} with {} VM(s)",
                p.batch,
                p.to,
                p.members.len()
            ));
            Ok(json!({}))
        })
    }
}

// ---------------------------------------------------------------- migrate

struct Migrate {
    env: Arc<Env>,
    p: Arc<Params>,
    nodes: Vec<ferry_ops::progress::NodeId>,
}

/// The latest `vm.migrate` operation of VM `vm` in batch `batch` on a host.
pub(crate) async fn source_op(
    c: &PeerClient,
    vm: &str,
    batch: &str,
) -> Result<Option<Operation>, PeerError> {
    let ops: Vec<Operation> = c.get("/v1/operations").await?;
    Ok(ops
        .into_iter()
        .filter(|o| {
            o.kind == crate::migrate::KIND
                && o.params["vm"] == json!(vm)
                && o.params["batch"] == json!(batch)
        })
        .max_by_key(|o| o.created_ms))
}

impl Migrate {
    /// Migrates one VM; `Ok(outcome)` names what became of it.
    async fn one(&self, cx: &StepContext<App>, i: usize) -> Result<String, String> {
        let (env, p) = (&self.env, &self.p);
        let m = &p.members[i];
        let node = self.nodes[i];
        let recs = env.dest_records(&p.to, &p.batch).await?;
        if recs
            .records
            .get(&m.vm)
            .is_some_and(|r| r.completed.is_some())
        {
            cx.progress.update(|t| t.finish(node));
            return Ok("migrated (skipped: already migrated)".into());
        }
        let c = env.client(&m.from).await?;
        // An operation this batch started before a crash, else a new one.
        let started = format!("started {} ", m.vm);
        let mut op_id = cx
            .checkpoints()
            .map_err(|e| e.to_string())?
            .iter()
            .rev()
            .find_map(|l| l.strip_prefix(&started).map(str::to_string));
        if op_id.is_none() {
            let req = MigrateVm {
                to: p.to.clone(),
                mode: Default::default(),
                bandwidth: p.bandwidth,
                keep_source: false,
                on_missing: Default::default(),
                batch: Some(p.batch.clone()),
            };
            let path = format!("/v1/vms/{}/migrate", m.vm);
            let r: Result<Started, String> =
                patient("starting vm.migrate", || c.post(&path, &req)).await;
            let id = match r {
                Ok(s) => s.operation,
                Err(e) => {
                    // Started by this batch before a crash lost the checkpoint?
                    match source_op(&c, &m.vm, &p.batch).await {
                        Ok(Some(o)) if !o.state.is_finished() => o.id,
                        _ => return Err(e),
                    }
                }
            };
            cx.checkpoint(format!("{started}{id}"))
                .map_err(|e| e.to_string())?;
            cx.log(format!("VM {} from {}: operation {id}", m.name, m.from));
            op_id = Some(id);
        }
        let id = op_id.unwrap_or_default();
        let op = c
            .wait_operation(&id, PATIENCE, |o| {
                if let Some(v) = &o.progress {
                    let f = v.overall;
                    cx.progress.update(|t| t.set_fraction(node, f));
                }
            })
            .await
            .map_err(|e| format!("following operation {id} on {}: {e}", m.from))?;
        cx.progress.update(|t| t.finish(node));
        match op.state {
            ferry_api::OpState::Succeeded => Ok("migrated".into()),
            s => Err(format!(
                "operation {id} on {} {s}: {}",
                m.from,
                op.error.unwrap_or_default()
            )),
        }
    }
}

impl Step<App> for Migrate {
    fn name(&self) -> &str {
        "migrate"
    }

    fn recovery(&self) -> Recovery {
        Recovery::Retry
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            use futures::StreamExt;
            let p = &self.p;
            let outcomes: Vec<(usize, Result<String, String>)> =
                futures::stream::iter(0..p.members.len())
                    .map(|i| async move { (i, self.one(cx, i).await) })
                    .buffer_unordered(p.parallel.max(1) as usize)
                    .collect()
                    .await;
            let mut out = serde_json::Map::new();
            let mut failed = 0;
            for (i, r) in outcomes {
                let m = &p.members[i];
                let v = match r {
                    Ok(s) => s,
                    Err(e) => {
                        failed += 1;
                        cx.log(format!("VM {} failed: {e}", m.name));
                        format!("failed: {e}")
                    }
                };
                out.insert(m.name.clone(), json!(v));
            }
            if failed > 0 {
                return Err(StepError::failed(format!(
                    "{failed} of {} VM(s) not migrated (see `ferry migrate status {}`; `ferry migrate recover {}` rolls them back)",
                    p.members.len(),
                    p.batch,
                    p.batch
                )));
            }
            Ok(Value::Object(out))
        })
    }
}
