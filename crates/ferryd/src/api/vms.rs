//! VMs: define, list, show, start, stop, pause, resume, kill, delete.
//! `{id}` is a VM's name or UUID.
//!
//! Start, stop and kill run in their own task: a client that disconnects
//! mid-way does not abandon a half-started or half-stopped QEMU.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use ferry_api::{OpState, RelocateVm, Started, VmDefinition, VmInfo, VmStopped};
use ferry_qemu::{ErrorKind as QemuKind, StopOutcome};
use serde::Deserialize;

use super::{ApiResult, Failure, bad_field, error_response};
use crate::body::Body;
use crate::daemon::Daemon;
use crate::vms::VmError;

/// Default time a graceful stop has before QEMU is killed.
pub const DEFAULT_STOP_TIMEOUT_S: u64 = 60;

impl From<VmError> for Failure {
    fn from(e: VmError) -> Self {
        let msg = e.to_string();
        match e {
            VmError::NotFound(_) | VmError::VolumeNotFound(_) => {
                error_response(StatusCode::NOT_FOUND, &msg, None)
            }
            VmError::Invalid { field, .. } => bad_field(&field, &msg),
            VmError::Conflict(_) => error_response(StatusCode::CONFLICT, &msg, None),
            VmError::Qemu { err, .. } => {
                let status = match err.kind {
                    QemuKind::Invalid(_) => StatusCode::BAD_REQUEST,
                    QemuKind::Process(_) if msg.contains("already runs") => StatusCode::CONFLICT,
                    _ => StatusCode::INTERNAL_SERVER_ERROR,
                };
                error_response(status, &msg, None)
            }
            VmError::Other { .. } => error_response(StatusCode::INTERNAL_SERVER_ERROR, &msg, None),
        }
    }
}

fn join_error(e: tokio::task::JoinError) -> Failure {
    error_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        &format!("VM task failed: {e}"),
        None,
    )
}

pub async fn list(State(d): State<Arc<Daemon>>) -> ApiResult<Vec<VmInfo>> {
    let mut out = Vec::new();
    for vm in d.vms.list() {
        out.push(d.vms.info(&vm).await);
    }
    Ok(Json(out))
}

pub async fn show(State(d): State<Arc<Daemon>>, Path(id): Path<String>) -> ApiResult<VmInfo> {
    let vm = d.vms.find(&id)?;
    Ok(Json(d.vms.info(&vm).await))
}

pub async fn define(
    State(d): State<Arc<Daemon>>,
    Body(def): Body<VmDefinition>,
) -> Result<(StatusCode, Json<VmInfo>), Failure> {
    d.vms.check_remote(&def).await?;
    let vms = d.vms.clone();
    let vm = tokio::task::spawn_blocking(move || vms.define(def))
        .await
        .map_err(join_error)??;
    Ok((StatusCode::CREATED, Json(d.vms.info(&vm).await)))
}

pub async fn delete(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
) -> Result<StatusCode, Failure> {
    let vm = d.vms.find(&id)?;
    let vms = d.vms.clone();
    tokio::spawn(async move { vms.delete(&vm).await })
        .await
        .map_err(join_error)??;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn start(State(d): State<Arc<Daemon>>, Path(id): Path<String>) -> ApiResult<VmInfo> {
    let vm = d.vms.find(&id)?;
    let (vms, v) = (d.vms.clone(), vm.clone());
    tokio::spawn(async move { vms.start(&v).await })
        .await
        .map_err(join_error)??;
    Ok(Json(d.vms.info(&vm).await))
}

#[derive(Debug, Deserialize)]
pub struct StopParams {
    /// Seconds the graceful shutdown has before QEMU is killed.
    pub timeout_s: Option<u64>,
}

pub async fn stop(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
    Query(q): Query<StopParams>,
) -> ApiResult<VmStopped> {
    let timeout = q.timeout_s.unwrap_or(DEFAULT_STOP_TIMEOUT_S);
    if timeout == 0 || timeout > 3600 {
        return Err(bad_field("timeout_s", "timeout_s is within 1..=3600"));
    }
    let vm = d.vms.find(&id)?;
    let (vms, v) = (d.vms.clone(), vm.clone());
    let outcome = tokio::spawn(async move { vms.stop(&v, Duration::from_secs(timeout)).await })
        .await
        .map_err(join_error)??;
    let outcome = match outcome {
        StopOutcome::GuestAgent => "guest_agent",
        StopOutcome::Acpi => "acpi",
        StopOutcome::Killed => "killed",
        StopOutcome::AlreadyExited => "already_exited",
    };
    Ok(Json(VmStopped {
        outcome: outcome.into(),
        vm: d.vms.info(&vm).await,
    }))
}

pub async fn kill(State(d): State<Arc<Daemon>>, Path(id): Path<String>) -> ApiResult<VmInfo> {
    let vm = d.vms.find(&id)?;
    let (vms, v) = (d.vms.clone(), vm.clone());
    tokio::spawn(async move { vms.kill(&v).await })
        .await
        .map_err(join_error)??;
    Ok(Json(d.vms.info(&vm).await))
}

pub async fn pause(State(d): State<Arc<Daemon>>, Path(id): Path<String>) -> ApiResult<VmInfo> {
    let vm = d.vms.find(&id)?;
    d.vms.pause(&vm, true).await?;
    Ok(Json(d.vms.info(&vm).await))
}

pub async fn resume(State(d): State<Arc<Daemon>>, Path(id): Path<String>) -> ApiResult<VmInfo> {
    let vm = d.vms.find(&id)?;
    d.vms.pause(&vm, false).await?;
    Ok(Json(d.vms.info(&vm).await))
}

/// `POST /v1/vms/{id}/relocate`: starts a `vm.relocate` operation (or
/// answers the one a request with the same key started, unless it failed
/// or was cancelled).
pub async fn relocate(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
    Body(req): Body<RelocateVm>,
) -> Result<(StatusCode, Json<Started>), Failure> {
    use crate::vms::relocate_op;
    let accepted = |operation| Ok((StatusCode::ACCEPTED, Json(Started { operation })));
    let vm = d.vms.find(&id)?;
    if let Some(key) = &req.request {
        let same = d
            .ops
            .journal()
            .list()?
            .into_iter()
            .find(|o| {
                o.kind == relocate_op::KIND
                    && o.params["request"].as_str() == Some(key)
                    && !matches!(o.state, OpState::Failed | OpState::Cancelled)
            })
            .map(|o| o.id);
        if let Some(operation) = same {
            return accepted(operation);
        }
    }
    if req.disks.is_empty() {
        return Err(bad_field("disks", "no disk to relocate"));
    }
    let def = vm.definition();
    for (i, x) in req.disks.iter().enumerate() {
        let Some(disk) = def.disks.get(x.index) else {
            return Err(bad_field(
                &format!("disks[{i}].index"),
                &format!("VM {} has no disk {}", vm.name, x.index),
            ));
        };
        if disk.volume().is_none() && disk.remote().is_none() {
            return Err(bad_field(
                &format!("disks[{i}].index"),
                &format!(
                    "disk {} of VM {} is an image file, not a pool volume",
                    x.index, vm.name
                ),
            ));
        }
        if disk.volume() != Some(x.volume.as_str())
            && let Some(user) = d.vms.user_of_volume(&x.volume)
        {
            return Err(error_response(
                StatusCode::CONFLICT,
                &format!(
                    "volume {} is a disk of VM {user}; nothing was started",
                    x.volume
                ),
                Some("disks"),
            ));
        }
    }
    let p = relocate_op::Params {
        vm: vm.name.clone(),
        uuid: vm.uuid.to_string(),
        disks: req.disks,
        request: req.request,
    };
    let v = serde_json::to_value(p)
        .map_err(|e| error_response(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string(), None))?;
    accepted(d.ops.start(relocate_op::KIND, v)?)
}
