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
use ferry_api::{VmDefinition, VmInfo, VmStopped};
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
