//! Batch migration: `/v1/migrations/batches` (the coordinator) and
//! `/v1/peer/migrations/...` (the destination's durable records). See
//! [`crate::batch`].

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use ferry_api::{
    BatchManifest, BatchMember, BatchRecords, BatchRequest, BatchStarted, BatchStatus,
    BatchSummary, Started, VmInfo,
};
use serde::Deserialize;
use serde_json::json;

use super::{Failure, bad_field, error_response};
use crate::batch::status::{self, Known};
use crate::batch::{DEFAULT_PARALLEL, KIND, Params, RECOVER_KIND};
use crate::body::Body;
use crate::daemon::Daemon;
use crate::migrate::records::valid_batch_id;

fn internal(msg: impl std::fmt::Display) -> Failure {
    error_response(StatusCode::INTERNAL_SERVER_ERROR, &msg.to_string(), None)
}

fn conflict(msg: impl std::fmt::Display) -> Failure {
    error_response(StatusCode::CONFLICT, &msg.to_string(), None)
}

fn not_found(msg: impl std::fmt::Display) -> Failure {
    error_response(StatusCode::NOT_FOUND, &msg.to_string(), None)
}

/// Starts a `migrate.batch` operation on this host (the coordinator).
pub async fn start(
    State(d): State<Arc<Daemon>>,
    Body(req): Body<BatchRequest>,
) -> Result<(StatusCode, Json<BatchStarted>), Failure> {
    if req.vms.is_empty() {
        return Err(bad_field("vms", "no VM given"));
    }
    let batch = match &req.name {
        Some(n) if !valid_batch_id(n) => {
            return Err(bad_field(
                "name",
                "a batch id is 1-64 letters, digits, '-', '_' or '.'",
            ));
        }
        Some(n) => n.clone(),
        None => format!("batch-{:08x}", rand::random::<u32>()),
    };
    let env = d.batches.clone();
    if req.to != d.cfg.name {
        d.peers
            .get(&req.to)
            .map_err(|e| bad_field("to", &e.to_string()))?;
    }
    for op in d.ops.journal().unfinished().map_err(internal)? {
        if op.kind == KIND && op.params["batch"] == json!(batch) {
            return Err(conflict(format!(
                "batch {batch} is running as operation {}",
                op.id
            )));
        }
    }
    // Each VM's source: this host or a peer.
    let mut hosts = vec![d.cfg.name.clone()];
    hosts.extend(d.peers.list().into_iter().map(|p| p.name));
    let mut members: Vec<BatchMember> = Vec::new();
    for id in &req.vms {
        let mut found = None;
        for h in &hosts {
            if *h == req.to {
                continue;
            }
            let Ok(c) = env.client(h).await else { continue };
            if let Ok(info) = c.get::<VmInfo>(&format!("/v1/vms/{id}")).await {
                found = Some(BatchMember {
                    vm: info.uuid,
                    name: info.name,
                    from: h.clone(),
                });
                break;
            }
        }
        let m = found.ok_or_else(|| {
            bad_field(
                "vms",
                &format!(
                    "VM {id} is on neither this host nor a peer other than {}",
                    req.to
                ),
            )
        })?;
        if members.iter().any(|x| x.vm == m.vm) {
            return Err(bad_field("vms", &format!("VM {id} is given twice")));
        }
        members.push(m);
    }
    let p = Params {
        batch: batch.clone(),
        to: req.to,
        members,
        parallel: req.parallel.unwrap_or(DEFAULT_PARALLEL).max(1),
        bandwidth: req.bandwidth,
    };
    let id = d
        .ops
        .start(KIND, serde_json::to_value(&p).map_err(internal)?)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(BatchStarted {
            batch,
            operation: id,
        }),
    ))
}

#[derive(Debug, Deserialize)]
pub struct DestQuery {
    /// The destination to ask when this host holds no journal of the batch.
    pub dest: Option<String>,
}

/// What this host knows of batch `id`: its own journal, its own records
/// (it is the destination), or the records of `dest`.
async fn known(d: &Daemon, id: &str, dest: Option<&str>) -> Result<Known, Failure> {
    if !valid_batch_id(id) {
        return Err(bad_field("id", "not a valid batch id"));
    }
    let ops = d.ops.journal().list().map_err(internal)?;
    if let Some(op) = ops
        .iter()
        .find(|o| o.kind == KIND && o.params["batch"] == json!(id))
    {
        let p: Params = serde_json::from_value(op.params.clone()).map_err(internal)?;
        return Ok(Known {
            batch: id.to_string(),
            to: p.to,
            members: p.members,
            operation: Some((op.id.clone(), op.state.to_string())),
            from: "journal".into(),
        });
    }
    let env = &d.batches;
    let recs = match dest {
        Some(h) => env
            .dest_records(h, id)
            .await
            .map_err(|e| error_response(StatusCode::BAD_GATEWAY, &e, Some("dest")))?,
        None => env.records.get(id).map_err(internal)?,
    };
    match recs.manifest {
        Some(m) => Ok(Known {
            batch: id.to_string(),
            to: m.to,
            members: m.members,
            operation: None,
            from: "destination".into(),
        }),
        None => Err(not_found(format!(
            "batch {id} is unknown here{}",
            if dest.is_some() {
                " and at the destination"
            } else {
                " (no journal, no records; give ?dest=HOST)"
            }
        ))),
    }
}

/// `GET /v1/migrations/batches/{id}`: the status of each VM.
pub async fn show(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
    Query(q): Query<DestQuery>,
) -> Result<Json<BatchStatus>, Failure> {
    let k = known(&d, &id, q.dest.as_deref()).await?;
    status::status(&d.batches, &k)
        .await
        .map(Json)
        .map_err(|e| error_response(StatusCode::BAD_GATEWAY, &e, None))
}

/// `GET /v1/migrations/batches`: batches this host coordinates and those
/// it holds records of as the destination.
pub async fn list(State(d): State<Arc<Daemon>>) -> Result<Json<Vec<BatchSummary>>, Failure> {
    let mut out: Vec<BatchSummary> = Vec::new();
    for op in d.ops.journal().list().map_err(internal)? {
        if op.kind != KIND {
            continue;
        }
        let Ok(p) = serde_json::from_value::<Params>(op.params.clone()) else {
            continue;
        };
        if out.iter().any(|b| b.batch == p.batch) {
            continue;
        }
        out.push(BatchSummary {
            batch: p.batch,
            to: p.to,
            vms: p.members.len(),
            operation: Some(op.id.clone()),
            operation_state: Some(op.state.to_string()),
            role: "coordinator".into(),
        });
    }
    for (b, r) in d.batches.records.batches() {
        if out.iter().any(|x| x.batch == b) {
            continue;
        }
        if let Some(m) = r.manifest {
            out.push(BatchSummary {
                batch: b,
                to: m.to,
                vms: m.members.len(),
                operation: None,
                operation_state: None,
                role: "destination".into(),
            });
        }
    }
    Ok(Json(out))
}

/// `POST /v1/migrations/batches/{id}/recover`: finish or roll back every
/// VM of the batch.
pub async fn recover(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
    Query(q): Query<DestQuery>,
) -> Result<(StatusCode, Json<Started>), Failure> {
    let k = known(&d, &id, q.dest.as_deref()).await?;
    if let Some((op, state)) = &k.operation
        && !matches!(state.as_str(), "succeeded" | "failed" | "cancelled")
    {
        return Err(conflict(format!(
            "batch {id} is still running as operation {op} ({state}); recover once it ended (or after a restart of this host)"
        )));
    }
    for op in d.ops.journal().unfinished().map_err(internal)? {
        if op.kind == RECOVER_KIND && op.params["batch"] == json!(id) {
            return Err(conflict(format!(
                "batch {id} is being recovered by operation {}",
                op.id
            )));
        }
    }
    let p = crate::batch::recover::Params {
        batch: k.batch,
        to: k.to,
        members: k.members,
    };
    let op = d
        .ops
        .start(RECOVER_KIND, serde_json::to_value(&p).map_err(internal)?)?;
    Ok((StatusCode::ACCEPTED, Json(Started { operation: op })))
}

// ------------------------------------------------------ destination (peer)

/// `POST /v1/peer/migrations/batches`: store a batch's manifest.
pub async fn register(
    State(d): State<Arc<Daemon>>,
    Body(m): Body<BatchManifest>,
) -> Result<StatusCode, Failure> {
    if !valid_batch_id(&m.batch) {
        return Err(bad_field("batch", "not a valid batch id"));
    }
    let recs = d.batches.records.clone();
    tokio::task::spawn_blocking(move || recs.register(&m))
        .await
        .map_err(internal)?
        .map_err(conflict)?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/peer/migrations/records?batch=`: this host's records.
pub async fn records(
    State(d): State<Arc<Daemon>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<BatchRecords>, Failure> {
    let b = q
        .get("batch")
        .ok_or_else(|| bad_field("batch", "give ?batch=ID"))?;
    d.batches
        .records
        .get(b)
        .map(Json)
        .map_err(|e| bad_field("batch", &e))
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CompleteRequest {
    pub batch: String,
    pub vm: String,
}

/// `POST /v1/peer/migrations/complete`: record the *completed* event of a
/// VM that runs here after switchover (recovery, when the migration's own
/// step could not).
pub async fn complete(
    State(d): State<Arc<Daemon>>,
    Body(req): Body<CompleteRequest>,
) -> Result<StatusCode, Failure> {
    let recs = d
        .batches
        .records
        .get(&req.batch)
        .map_err(|e| bad_field("batch", &e))?;
    let rec = recs.records.get(&req.vm).ok_or_else(|| {
        not_found(format!(
            "batch {} has no record of VM {}",
            req.batch, req.vm
        ))
    })?;
    if rec.completed.is_some() {
        return Ok(StatusCode::NO_CONTENT);
    }
    if rec.rolled_back.is_some() {
        return Err(conflict(format!(
            "VM {} was rolled back; it did not migrate",
            req.vm
        )));
    }
    let vm = d.vms.find(&req.vm)?;
    let running = match d.vms.control(&vm).await {
        Some((qmp, _)) => qmp
            .query_status()
            .await
            .is_ok_and(|s| s.status != ferry_qemu::RunState::Inmigrate),
        None => false,
    };
    if !running {
        return Err(conflict(format!(
            "VM {} does not run here; no completed event",
            vm.name
        )));
    }
    let recs = d.batches.records.clone();
    tokio::task::spawn_blocking(move || {
        recs.completed(
            &req.batch,
            &req.vm,
            "recovery: the VM runs here after switchover, its disks attached",
        )
    })
    .await
    .map_err(internal)?
    .map_err(internal)?;
    Ok(StatusCode::NO_CONTENT)
}
