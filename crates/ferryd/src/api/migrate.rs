//! Live migration: `POST /v1/vms/{id}/migrate` starts a `vm.migrate`
//! operation on the VM's (source) host; `/v1/peer/migrate/...` is what the
//! source asks of the destination (see [`crate::migrate`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use ferry_api::{IncomingReady, IncomingRequest, IncomingStatus, MigrateVm, Started, VmState};
use serde_json::json;

use super::{Failure, bad_field, error_response};
use crate::body::Body;
use crate::daemon::Daemon;
use crate::migrate::{KIND, Params};

/// How long `hydrate` waits for the migrated VM to run here.
const RUN_WAIT: Duration = Duration::from_secs(600);

fn internal(msg: impl std::fmt::Display) -> Failure {
    error_response(StatusCode::INTERNAL_SERVER_ERROR, &msg.to_string(), None)
}

fn conflict(msg: impl std::fmt::Display) -> Failure {
    error_response(StatusCode::CONFLICT, &msg.to_string(), None)
}

/// Starts a `vm.migrate` operation.
pub async fn migrate(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
    Body(req): Body<MigrateVm>,
) -> Result<(StatusCode, Json<Started>), Failure> {
    let vm = d.vms.find(&id)?;
    let peer = d
        .peers
        .get(&req.to)
        .map_err(|e| bad_field("to", &e.to_string()))?;
    if peer.nbd.is_none() {
        return Err(bad_field(
            "to",
            &format!("peer {} serves no NBD over TCP", req.to),
        ));
    }
    if let Some(b) = &req.batch
        && !crate::migrate::records::valid_batch_id(b)
    {
        return Err(bad_field("batch", "not a valid batch id"));
    }
    let info = d.vms.info(&vm).await;
    if !matches!(info.state, VmState::Running | VmState::Paused) {
        return Err(conflict(format!(
            "VM {} is {}, not running; nothing was migrated",
            vm.name, info.state
        )));
    }
    let def = vm.definition();
    let mut volumes = Vec::new();
    for (i, disk) in def.disks.iter().enumerate() {
        match disk.volume() {
            Some(v) => volumes.push(v.to_string()),
            None => {
                return Err(bad_field(
                    "id",
                    &format!(
                        "disk {i} of VM {} is not a volume of this host's pool (a file, or a peer's volume); only this host's volumes migrate",
                        vm.name
                    ),
                ));
            }
        }
    }
    if d.inbound.has(&vm.uuid.to_string()) && !d.inbound.hydrating(&vm.uuid.to_string()) {
        return Err(conflict(format!(
            "VM {} is still arriving on this host",
            vm.name
        )));
    }
    for op in d.ops.journal().unfinished().map_err(internal)? {
        if op.kind == KIND && op.params["vm"] == json!(vm.uuid.to_string()) {
            // The release of an earlier migration *to* here may still run
            // on the previous host; only a migration *from* here conflicts.
            return Err(conflict(format!(
                "VM {} is being migrated by operation {}",
                vm.name, op.id
            )));
        }
    }
    let p = Params {
        vm: vm.uuid.to_string(),
        name: vm.name.clone(),
        to: req.to,
        mode: req.mode,
        bandwidth: req.bandwidth,
        keep_source: req.keep_source,
        on_missing: req.on_missing,
        volumes,
        batch: req.batch,
    };
    let id = d
        .ops
        .start(KIND, serde_json::to_value(&p).map_err(internal)?)?;
    Ok((StatusCode::ACCEPTED, Json(Started { operation: id })))
}

/// Destination: lazy volumes, the VM's definition, QEMU with `-incoming`.
pub async fn incoming(
    State(d): State<Arc<Daemon>>,
    Body(req): Body<IncomingRequest>,
) -> Result<(StatusCode, Json<IncomingReady>), Failure> {
    let uuid = req
        .definition
        .uuid
        .clone()
        .ok_or_else(|| bad_field("definition.uuid", "the definition has no uuid"))?;
    if d.vms.find(&uuid).is_ok() || d.vms.find(&req.definition.name).is_ok() {
        return Err(conflict(format!(
            "VM {} ({uuid}) already exists on this host; nothing was made",
            req.definition.name
        )));
    }
    let ip = d
        .exports
        .tcp_addr
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .map(|a| a.ip())
        .ok_or_else(|| internal("this host serves no NBD over TCP"))?;
    // Batch: the *migration started* record, durable before anything moves.
    if let Some(b) = &req.batch {
        ferry_ops::test_pause("migrate.in:before-record").await;
        let (recs, b2, u, n, f) = (
            d.batches.records.clone(),
            b.clone(),
            uuid.clone(),
            req.definition.name.clone(),
            req.from.clone(),
        );
        let vols: Vec<String> = req.disks.iter().map(|x| x.volume.clone()).collect();
        tokio::task::spawn_blocking(move || recs.started(&b2, &u, &n, &f, &vols))
            .await
            .map_err(internal)?
            .map_err(conflict)?;
        ferry_ops::test_pause("migrate.in:recorded").await;
    }
    let (inbound, u, from, disks, on_missing, rate) = (
        d.inbound.clone(),
        uuid.clone(),
        req.from.clone(),
        req.disks.clone(),
        req.on_missing,
        req.rate_limit,
    );
    tokio::task::spawn_blocking(move || inbound.create(&u, &from, &disks, on_missing, rate))
        .await
        .map_err(internal)?
        .map_err(conflict)?;
    let batch = req.batch.clone();
    let cleanup = |d: Arc<Daemon>, u: String| async move {
        let inbound = d.inbound.clone();
        if let Ok(vm) = d.vms.find(&u) {
            let _ = d.vms.kill(&vm).await;
            let _ = d.vms.delete(&vm).await;
        }
        let u2 = u.clone();
        let _ = tokio::task::spawn_blocking(move || inbound.abort(&u2)).await;
        if let Some(b) = &batch {
            let _ = d
                .batches
                .records
                .rolled_back(b, &u, "the incoming VM could not be prepared");
        }
    };
    let vms = d.vms.clone();
    let def = req.definition.clone();
    let vm = match tokio::task::spawn_blocking(move || vms.define(def)).await {
        Ok(Ok(vm)) => vm,
        Ok(Err(e)) => {
            cleanup(d.clone(), uuid).await;
            return Err(e.into());
        }
        Err(e) => {
            cleanup(d.clone(), uuid).await;
            return Err(internal(e));
        }
    };
    // Batch: the definition is the *placeholder* (same UUID, not running).
    if let Some(b) = &req.batch {
        let (recs, b2, u) = (d.batches.records.clone(), b.clone(), uuid.clone());
        let r = tokio::task::spawn_blocking(move || recs.placeholder(&b2, &u)).await;
        if let Err(e) = r.map_err(|e| e.to_string()).and_then(|r| r) {
            cleanup(d.clone(), uuid).await;
            return Err(internal(e));
        }
    }
    let (vms, v, postcopy) = (d.vms.clone(), vm.clone(), req.postcopy);
    let r = tokio::spawn(async move { vms.start_incoming(&v, ip, postcopy).await }).await;
    match r {
        Ok(Ok(uri)) => {
            tracing::info!(
                "VM {} ({uuid}) waits for its migration from {} on {uri}",
                vm.name,
                req.from
            );
            Ok((StatusCode::CREATED, Json(IncomingReady { uri })))
        }
        Ok(Err(e)) => {
            cleanup(d.clone(), uuid).await;
            Err(e.into())
        }
        Err(e) => {
            cleanup(d.clone(), uuid).await;
            Err(internal(e))
        }
    }
}

/// Destination: after switchover, wait for the VM to run here and start
/// hydrating its volumes.
pub async fn hydrate(
    State(d): State<Arc<Daemon>>,
    Path(uuid): Path<String>,
) -> Result<Json<IncomingStatus>, Failure> {
    if !d.inbound.has(&uuid) {
        return Err(error_response(
            StatusCode::NOT_FOUND,
            &format!("no incoming VM {uuid}"),
            None,
        ));
    }
    if !d.inbound.hydrating(&uuid) {
        let vm = d.vms.find(&uuid)?;
        let deadline = Instant::now() + RUN_WAIT;
        loop {
            if let Some((qmp, _)) = d.vms.control(&vm).await
                && qmp.query_status().await.is_ok_and(|s| s.running)
            {
                break;
            }
            if Instant::now() > deadline {
                return Err(conflict(format!(
                    "VM {} does not run on this host after {RUN_WAIT:?}; hydration not started",
                    vm.name
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ferry_ops::test_pause("migrate.in:switched").await;
        let (inbound, u) = (d.inbound.clone(), uuid.clone());
        tokio::task::spawn_blocking(move || inbound.start_hydration(&u))
            .await
            .map_err(internal)?
            .map_err(|e| internal(format!("{e:#}")))?;
    }
    // Batch: the *migration completed* event, once the VM runs here and
    // its disks hydrate from the source (idempotent).
    if let Some((b, _)) = d.batches.records.open_record_of(&uuid) {
        let (recs, u) = (d.batches.records.clone(), uuid.clone());
        tokio::task::spawn_blocking(move || {
            recs.completed(
                &b,
                &u,
                "switchover confirmed: the source's memory migration completed, the VM runs here, its disks are attached and hydrating",
            )
        })
        .await
        .map_err(internal)?
        .map_err(internal)?;
    }
    status(State(d), Path(uuid)).await
}

/// Destination: where the hydration of an incoming VM stands.
pub async fn status(
    State(d): State<Arc<Daemon>>,
    Path(uuid): Path<String>,
) -> Result<Json<IncomingStatus>, Failure> {
    let inbound = d.inbound.clone();
    let u = uuid.clone();
    tokio::task::spawn_blocking(move || inbound.status(&u))
        .await
        .map_err(internal)?
        .map(Json)
        .ok_or_else(|| {
            error_response(
                StatusCode::NOT_FOUND,
                &format!("no incoming VM {uuid}"),
                None,
            )
        })
}

/// Destination: remove an incoming VM that has not switched over (its
/// QEMU, definition and lazy volumes). Refused once it runs here.
pub async fn abort(
    State(d): State<Arc<Daemon>>,
    Path(uuid): Path<String>,
) -> Result<StatusCode, Failure> {
    // A batch record without lazy volumes (a crash between the record and
    // them, or a placeholder left alone) is rolled back too.
    if !d.inbound.has(&uuid) && d.batches.records.open_record_of(&uuid).is_none() {
        return Err(error_response(
            StatusCode::NOT_FOUND,
            &format!("no incoming VM {uuid}"),
            None,
        ));
    }
    if d.inbound.hydrating(&uuid) {
        return Err(conflict(format!(
            "VM {uuid} switched over to this host; it is not removed"
        )));
    }
    if let Ok(vm) = d.vms.find(&uuid) {
        if let Some((qmp, _)) = d.vms.control(&vm).await
            && let Ok(s) = qmp.query_status().await
            && s.status != ferry_qemu::RunState::Inmigrate
        {
            return Err(conflict(format!(
                "VM {} is {:?} on this host, past the incoming migration; it is not removed",
                vm.name, s.status
            )));
        }
        let _ = d.vms.kill(&vm).await;
        d.vms.delete(&vm).await?;
    }
    let (inbound, u) = (d.inbound.clone(), uuid.clone());
    tokio::task::spawn_blocking(move || inbound.abort(&u))
        .await
        .map_err(internal)?
        .map_err(internal)?;
    if let Some((b, _)) = d.batches.records.open_record_of(&uuid) {
        let (recs, u) = (d.batches.records.clone(), uuid.clone());
        tokio::task::spawn_blocking(move || {
            recs.rolled_back(
                &b,
                &u,
                "placeholder, QEMU and lazy volumes removed before switchover",
            )
        })
        .await
        .map_err(internal)?
        .map_err(internal)?;
    }
    tracing::info!("incoming VM {uuid} removed: its migration did not switch over");
    Ok(StatusCode::NO_CONTENT)
}

/// Destination: the source released its volumes; forget the source
/// records of VM `uuid`.
pub async fn finish(
    State(d): State<Arc<Daemon>>,
    Path(uuid): Path<String>,
) -> Result<StatusCode, Failure> {
    let st = d.inbound.status(&uuid);
    if let Some(st) = st
        && !st.done
    {
        return Err(conflict(format!(
            "VM {uuid} is still hydrating here; its sources are kept"
        )));
    }
    d.inbound.forget(&uuid).map_err(internal)?;
    Ok(StatusCode::NO_CONTENT)
}
