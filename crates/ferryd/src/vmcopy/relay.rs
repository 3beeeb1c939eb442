//! A third host as the coordinator of a VM copy: the `vm.copy.relay`
//! operation.
//!
//! The host that got `POST /v1/vms/{id}/copy` for a VM of another host (the
//! request's `from`, or the one peer that has the VM) sends the execution
//! request to that source host, which runs `vm.copy` and sends the data to
//! the target itself; the coordinator follows it. The source reports each
//! sub-operation's completion (its progress tree: weights measured there,
//! leaf fractions); the coordinator mirrors that tree under its own `copy`
//! step and computes the overall figure in its own [`ProgressTree`] — the
//! operations framework's one place — so the figure it shows never goes
//! back, even across a restart of either host.
//!
//! # Steps
//! 1. `request` — `POST /v1/vms/{vm}/copy` on the source with this
//!    operation's id as the idempotency key: a retry after a crash of this
//!    host gets the same operation, never a second copy. Undo cancels the
//!    source's operation (its own compensation removes what it made on the
//!    target) and waits for it to end.
//! 2. `copy` — follows the source's operation to its end. Cancel here is
//!    sent on to the source. Retried after a crash of this host.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ferry_api::{OpState, Operation, Started, VmCopyRequest};
use ferry_ops::{
    BoxFuture, Manager, NodeId, Plan, ProgressView, Recovery, Step, StepContext, StepError,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::daemon::App;
use crate::peers::{PeerClient, Peers};

/// The operation kind.
pub const KIND: &str = "vm.copy.relay";

/// How long the source may stay unreachable before the copy is failed here
/// (the source's own operation goes on; a retry follows it again).
const PATIENCE: Duration = Duration::from_secs(120);

/// What the steps need.
pub struct Env {
    pub peers: Arc<Peers>,
}

/// The journaled parameters of `vm.copy.relay`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Params {
    /// The VM as the request named it (name or UUID on the source).
    pub vm: String,
    /// The VM's host (a peer of this one) and the target (a peer of the
    /// source).
    pub from: String,
    pub to: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub bandwidth: Option<u64>,
}

/// Registers `vm.copy.relay` with the manager.
pub fn register(m: &Arc<Manager<App>>, env: Env) {
    let env = Arc::new(env);
    m.register(KIND, move |params| plan(env.clone(), params));
}

fn plan(env: Arc<Env>, params: &Value) -> Result<Plan<App>, String> {
    let p: Params = serde_json::from_value(params.clone()).map_err(|e| e.to_string())?;
    let title = format!(
        "copy vm {} of {} to {} (coordinated here)",
        p.vm, p.from, p.to
    );
    Ok(Plan::new(
        &title,
        vec![
            (
                Box::new(Request {
                    env: env.clone(),
                    p: p.clone(),
                }),
                0.0,
            ),
            (Box::new(Follow { env, p }), 1.0),
        ],
    ))
}

fn source(env: &Env, p: &Params) -> Result<PeerClient, StepError> {
    env.peers.client(&p.from).map_err(StepError::failed)
}

fn remote_op(v: Option<&Value>) -> Option<String> {
    v.and_then(|v| v["operation"].as_str()).map(str::to_owned)
}

struct Request {
    env: Arc<Env>,
    p: Params,
}

impl Step<App> for Request {
    fn name(&self) -> &str {
        "request"
    }

    fn recovery(&self) -> Recovery {
        // Idempotent: the key makes a second POST answer the first op.
        Recovery::Retry
    }

    fn intent(&self, cx: &StepContext<App>) -> Result<Value, StepError> {
        Ok(json!({ "from": self.p.from, "request": cx.op_id }))
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let peer = source(&self.env, &self.p)?;
            let body = VmCopyRequest {
                to: self.p.to.clone(),
                name: self.p.name.clone(),
                bandwidth: self.p.bandwidth,
                from: None,
                request: Some(cx.op_id.clone()),
            };
            let started: Started = peer
                .post(&format!("/v1/vms/{}/copy", self.p.vm), &body)
                .await
                .map_err(|e| {
                    StepError::failed(format!(
                        "host {} refused the copy of VM {}: {e}",
                        self.p.from, self.p.vm
                    ))
                })?;
            cx.log(format!(
                "host {} copies VM {} to {}: its operation {}",
                self.p.from, self.p.vm, self.p.to, started.operation
            ));
            Ok(json!({ "operation": started.operation }))
        })
    }

    fn undo<'a>(
        &'a self,
        cx: &'a StepContext<App>,
        _intent: &'a Value,
        result: Option<&'a Value>,
    ) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let peer = source(&self.env, &self.p)?;
            // Without a result the POST may still have started a copy
            // there: find it by its key.
            let id = match remote_op(result) {
                Some(id) => Some(id),
                None => {
                    let ops: Vec<Operation> = peer
                        .get("/v1/operations")
                        .await
                        .map_err(StepError::failed)?;
                    ops.into_iter()
                        .find(|o| o.params["request"].as_str() == Some(cx.op_id.as_str()))
                        .map(|o| o.id)
                }
            };
            let Some(id) = id else { return Ok(()) };
            cancel_and_wait(&peer, &id).await?;
            cx.log(format!("cancelled operation {id} on {}", self.p.from));
            Ok(())
        })
    }
}

/// Cancels operation `id` on the peer and waits until it has ended (its
/// compensation done).
async fn cancel_and_wait(peer: &PeerClient, id: &str) -> Result<Operation, StepError> {
    let _: Value = peer
        .post(&format!("/v1/operations/{id}/cancel"), &json!({}))
        .await
        .or_else(|e| match e {
            // Already finished: nothing to cancel.
            crate::peers::PeerError::Failed { status: 409, .. } => Ok(Value::Null),
            e => Err(e),
        })
        .map_err(StepError::failed)?;
    peer.wait_operation(id, PATIENCE, |_| {})
        .await
        .map_err(StepError::failed)
}

/// Mirrors the source's progress tree below one node of the local tree:
/// same names, same (re-measured) weights, same leaf fractions.
struct Mirror {
    at: NodeId,
    map: HashMap<NodeId, NodeId>,
}

impl Mirror {
    fn apply(&mut self, cx: &StepContext<App>, view: &ProgressView) {
        cx.progress.update(|t| {
            // Ids are assigned in order and a parent comes before its
            // children, so one pass in id order maps every parent first.
            let mut nodes: Vec<_> = view.nodes.iter().collect();
            nodes.sort_by_key(|n| n.id);
            for n in nodes {
                let local = match n.parent {
                    None => self.at,
                    Some(parent) => match (self.map.get(&n.id), self.map.get(&parent)) {
                        (Some(l), _) => {
                            t.set_weight(*l, n.weight);
                            *l
                        }
                        (None, Some(lp)) => {
                            let l = t.add(*lp, n.name.clone(), n.weight);
                            self.map.insert(n.id, l);
                            l
                        }
                        (None, None) => continue,
                    },
                };
                self.map.insert(n.id, local);
                if n.children.is_empty() && n.parent.is_some() {
                    t.set_fraction(local, n.fraction);
                }
            }
        });
    }
}

struct Follow {
    env: Arc<Env>,
    p: Params,
}

impl Step<App> for Follow {
    fn name(&self) -> &str {
        "copy"
    }

    fn recovery(&self) -> Recovery {
        Recovery::Retry
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let id = remote_op(cx.result_of("request"))
                .ok_or_else(|| StepError::failed("no operation id from the request step"))?;
            let peer = source(&self.env, &self.p)?;
            let mut mirror = Mirror {
                at: cx.node,
                map: HashMap::new(),
            };
            let wait = peer.wait_operation(&id, PATIENCE, |op| {
                if let Some(v) = &op.progress {
                    mirror.apply(cx, v);
                }
            });
            let op = tokio::select! {
                r = wait => r.map_err(|e| StepError::failed(format!(
                    "lost the copy's operation {id} on {}: {e} (it may go on there; retry to follow it again)",
                    self.p.from
                )))?,
                _ = cx.cancelled() => {
                    cx.log(format!("cancelling operation {id} on {}", self.p.from));
                    cancel_and_wait(&peer, &id).await?;
                    return Err(StepError::Cancelled);
                }
            };
            match op.state {
                OpState::Succeeded => {
                    let node = cx.node;
                    cx.progress.update(|t| t.finish(node));
                    Ok(json!({
                        "operation": id,
                        "host": self.p.from,
                        "target": self.p.to,
                        "name": op.params["name"],
                    }))
                }
                OpState::Cancelled => Err(StepError::failed(format!(
                    "the copy was cancelled on {} (operation {id})",
                    self.p.from
                ))),
                _ => Err(StepError::failed(format!(
                    "the copy failed on {} (operation {id}): {}",
                    self.p.from,
                    op.error.unwrap_or_else(|| op.state.as_str().into())
                ))),
            }
        })
    }
}
