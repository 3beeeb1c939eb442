//! VM snapshot groups: take (a `vm-snapshot` operation), list, show,
//! delete, revert stopped VMs, clone a VM. `{name}` is the group's name.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use ferry_api::{
    CloneVmSnapshot, CreateVmSnapshot, RevertVmSnapshot, RevertedVm, Started, VmInfo,
    VmSnapshotGroup, VmState,
};

use super::{ApiResult, Failure, bad_field, error_response};
use crate::body::Body;
use crate::daemon::Daemon;
use crate::groupsnap::{self, Env, GroupError, Params};

impl From<GroupError> for Failure {
    fn from(e: GroupError) -> Self {
        let msg = e.to_string();
        match e {
            GroupError::NotFound(_) => error_response(StatusCode::NOT_FOUND, &msg, None),
            GroupError::Invalid(_) => error_response(StatusCode::BAD_REQUEST, &msg, None),
            GroupError::Conflict(_) => error_response(StatusCode::CONFLICT, &msg, None),
            GroupError::Other(_) => error_response(StatusCode::INTERNAL_SERVER_ERROR, &msg, None),
            GroupError::Vm(v) => v.into(),
        }
    }
}

fn default_name(d: &Daemon, env: &Env) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let base = format!("vms-{}", now.as_secs());
    if !groupsnap::group_exists(env, d.pool(), &base) {
        return base;
    }
    format!("{base}-{}", now.subsec_millis())
}

/// Starts a `vm-snapshot` operation. Every VM must run on this host.
pub async fn create(
    State(d): State<Arc<Daemon>>,
    Body(req): Body<CreateVmSnapshot>,
) -> Result<(StatusCode, Json<Started>), Failure> {
    let env = Env::of(&d);
    if req.vms.is_empty() {
        return Err(bad_field("vms", "name at least one VM"));
    }
    let mut names = Vec::new();
    for id in &req.vms {
        let vm = d.vms.find(id)?;
        if names.contains(&vm.name) {
            return Err(bad_field("vms", &format!("VM {} is named twice", vm.name)));
        }
        let info = d.vms.info(&vm).await;
        if !matches!(info.state, VmState::Running | VmState::Paused) {
            return Err(error_response(
                StatusCode::CONFLICT,
                &format!(
                    "VM {} is {}, not running; nothing was snapshotted",
                    vm.name, info.state
                ),
                None,
            ));
        }
        names.push(vm.name.clone());
    }
    // One snapshot operation per VM at a time.
    for op in d.ops.journal().unfinished()? {
        if op.kind != groupsnap::KIND {
            continue;
        }
        if let Some(vm) = op.params["vms"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str())
            .find(|v| names.iter().any(|n| n == v))
        {
            return Err(error_response(
                StatusCode::CONFLICT,
                &format!(
                    "VM {vm} is in snapshot operation {} already; nothing was snapshotted",
                    op.id
                ),
                None,
            ));
        }
    }
    let name = match req.name {
        Some(n) => {
            groupsnap::check_group_name(&n).map_err(|m| bad_field("name", &m))?;
            if groupsnap::group_exists(&env, d.pool(), &n) {
                return Err(error_response(
                    StatusCode::CONFLICT,
                    &format!("snapshot group {n} already exists; nothing was snapshotted"),
                    None,
                ));
            }
            n
        }
        None => default_name(&d, &env),
    };
    let params = Params {
        name,
        vms: names,
        mode: req.mode,
        quiesce: req.quiesce,
    };
    let v = serde_json::to_value(&params)
        .map_err(|e| error_response(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string(), None))?;
    let id = d.ops.start(groupsnap::KIND, v)?;
    Ok((StatusCode::ACCEPTED, Json(Started { operation: id })))
}

pub async fn list(State(d): State<Arc<Daemon>>) -> ApiResult<Vec<VmSnapshotGroup>> {
    Ok(Json(groupsnap::list_groups(&Env::of(&d))?))
}

pub async fn show(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
) -> ApiResult<VmSnapshotGroup> {
    Ok(Json(groupsnap::read_group(&Env::of(&d), &name)?))
}

pub async fn delete(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
) -> Result<StatusCode, Failure> {
    let env = Env::of(&d);
    let pool = d.pool().clone();
    groupsnap::delete_group(env, pool, name).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn revert(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
    Body(req): Body<RevertVmSnapshot>,
) -> ApiResult<Vec<RevertedVm>> {
    let (env, pool) = (Env::of(&d), d.pool().clone());
    // Its own task: a client that goes away does not stop a revert half-way.
    let out = tokio::spawn(async move { groupsnap::revert(env, pool, &name, &req.vms).await })
        .await
        .map_err(|e| error_response(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string(), None))??;
    Ok(Json(out))
}

pub async fn clone(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
    Body(req): Body<CloneVmSnapshot>,
) -> Result<(StatusCode, Json<VmInfo>), Failure> {
    let (env, pool) = (Env::of(&d), d.pool().clone());
    let info = tokio::spawn(async move { groupsnap::clone_vm(env, pool, &name, &req).await })
        .await
        .map_err(|e| error_response(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string(), None))??;
    Ok((StatusCode::CREATED, Json(info)))
}
