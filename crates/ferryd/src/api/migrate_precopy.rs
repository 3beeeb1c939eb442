//! The destination's side of a `precopy` migration
//! (`/v1/peer/migrate-precopy...`, see [`crate::migrate::precopy`]):
//! empty volumes, the VM defined on them and its QEMU waiting with
//! `-incoming`; the removal of all that when the migration did not switch
//! over; and the end of the arrival once the VM runs here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use ferry_api::{PrecopyReady, PrecopyRequest, PrecopyTarget};

use super::{Failure, bad_field, error_response};
use crate::body::Body;
use crate::daemon::Daemon;
use crate::migrate::precopy::{Arrivals, disk_id};
use crate::vms::export_name;

/// How long `finish` waits for the migrated VM to run here.
const RUN_WAIT: Duration = Duration::from_secs(600);

fn internal(msg: impl std::fmt::Display) -> Failure {
    error_response(StatusCode::INTERNAL_SERVER_ERROR, &msg.to_string(), None)
}

fn conflict(msg: impl std::fmt::Display) -> Failure {
    error_response(StatusCode::CONFLICT, &msg.to_string(), None)
}

fn not_found(uuid: &str) -> Failure {
    error_response(
        StatusCode::NOT_FOUND,
        &format!("no VM {uuid} arriving by pre-copy"),
        None,
    )
}

fn arrivals(d: &Daemon) -> Arrivals {
    Arrivals::new(&d.dir.root)
}

/// Removes what an arrival made: the VM (its QEMU, definition and
/// exports) and the volumes recorded as made for it, then the record.
async fn remove_arrival(d: &Arc<Daemon>, uuid: &str, volumes: &[String]) -> Result<(), Failure> {
    if let Ok(vm) = d.vms.find(uuid) {
        if d.vms.control(&vm).await.is_some() {
            d.vms.kill(&vm).await?;
        }
        d.vms.delete(&vm).await?;
    }
    let (pool, vols, a, u) = (
        d.pool().clone(),
        volumes.to_vec(),
        arrivals(d),
        uuid.to_string(),
    );
    tokio::task::spawn_blocking(move || -> Result<(), String> {
        for v in &vols {
            match pool.delete_volume(v) {
                Ok(()) => {}
                Err(e) if e.kind() == ferry_pool::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("deleting volume {v}: {e}")),
            }
        }
        a.forget(&u).map_err(|e| format!("{e:#}"))
    })
    .await
    .map_err(internal)?
    .map_err(internal)
}

/// Destination: empty volumes, the VM defined on them, QEMU with
/// `-incoming`; answers where the source mirrors each disk.
pub async fn incoming(
    State(d): State<Arc<Daemon>>,
    Body(req): Body<PrecopyRequest>,
) -> Result<(StatusCode, Json<PrecopyReady>), Failure> {
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
    for (i, disk) in req.definition.disks.iter().enumerate() {
        let Some(v) = disk.volume() else {
            return Err(bad_field(
                "definition.disks",
                &format!("disk {} is not a volume", disk_id(i)),
            ));
        };
        if !req.disks.iter().any(|x| x.volume == v) {
            return Err(bad_field("disks", &format!("no size given for volume {v}")));
        }
    }
    let ip = d
        .exports
        .tcp_addr
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .map(|a| a.ip())
        .ok_or_else(|| internal("this host serves no NBD over TCP"))?;
    let volumes: Vec<String> = req.disks.iter().map(|x| x.volume.clone()).collect();
    // The record first: whatever a crash leaves is named by it, and only
    // what it names is ever removed by an abort.
    let (pool, disks, a, u) = (
        d.pool().clone(),
        req.disks.clone(),
        arrivals(&d),
        uuid.clone(),
    );
    tokio::task::spawn_blocking(move || -> Result<(), Failure> {
        for x in &disks {
            match pool.volume(&x.volume) {
                Ok(_) => {
                    return Err(conflict(format!(
                        "volume {} already exists on this host; nothing was made",
                        x.volume
                    )));
                }
                Err(e) if e.kind() == ferry_pool::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        let names: Vec<String> = disks.iter().map(|x| x.volume.clone()).collect();
        a.record(&u, &names)
            .map_err(|e| internal(format!("{e:#}")))?;
        for (i, x) in disks.iter().enumerate() {
            if let Err(e) = pool.create_volume(&x.volume, x.size) {
                for y in &disks[..i] {
                    let _ = pool.delete_volume(&y.volume);
                }
                let _ = a.forget(&u);
                return Err(internal(format!(
                    "creating volume {}: {e}; nothing was left behind",
                    x.volume
                )));
            }
        }
        Ok(())
    })
    .await
    .map_err(internal)??;
    let made = async {
        let vms = d.vms.clone();
        let def = req.definition.clone();
        let vm = tokio::task::spawn_blocking(move || vms.define(def))
            .await
            .map_err(internal)??;
        let uri = d
            .vms
            .start_incoming(&vm, ip, req.postcopy)
            .await
            .map_err(Failure::from)?;
        let mut targets = Vec::new();
        for (i, disk) in req.definition.disks.iter().enumerate() {
            let name = export_name(&vm.uuid, &disk_id(i));
            let info = d
                .exports
                .get(&name)
                .ok_or_else(|| internal(format!("the export {name} is missing")))?;
            let (nbd, export) = info
                .tcp_uri
                .as_deref()
                .and_then(|u| u.strip_prefix("nbd://"))
                .and_then(|r| r.split_once('/'))
                .ok_or_else(|| internal("this host serves no NBD over TCP"))?;
            targets.push(PrecopyTarget {
                volume: disk.volume().unwrap_or_default().to_string(),
                nbd: nbd.to_string(),
                export: export.to_string(),
            });
        }
        Ok::<_, Failure>(PrecopyReady {
            uri,
            disks: targets,
        })
    }
    .await;
    match made {
        Ok(ready) => {
            tracing::info!(
                "VM {} ({uuid}) waits for its pre-copy migration from {} on {}",
                req.definition.name,
                req.from,
                ready.uri
            );
            Ok((StatusCode::CREATED, Json(ready)))
        }
        Err(e) => {
            if let Err(c) = remove_arrival(&d, &uuid, &volumes).await {
                tracing::warn!("cleaning up the failed arrival of VM {uuid}: {}", c.1.error);
            }
            Err(e)
        }
    }
}

/// Destination: remove a VM arriving by pre-copy that did not switch over
/// (QEMU, definition, the volumes made for it). Refused once it runs.
pub async fn abort(
    State(d): State<Arc<Daemon>>,
    Path(uuid): Path<String>,
) -> Result<StatusCode, Failure> {
    let a = arrivals(&d);
    let Some(volumes) = a.get(&uuid).map_err(|e| internal(format!("{e:#}")))? else {
        return Err(not_found(&uuid));
    };
    if let Ok(vm) = d.vms.find(&uuid)
        && let Some((qmp, _)) = d.vms.control(&vm).await
        && let Ok(s) = qmp.query_status().await
        && s.status != ferry_qemu::RunState::Inmigrate
    {
        return Err(conflict(format!(
            "VM {} is {:?} on this host, past the incoming migration; it is not removed",
            vm.name, s.status
        )));
    }
    remove_arrival(&d, &uuid, &volumes).await?;
    tracing::info!("arriving VM {uuid} removed: its pre-copy migration did not switch over");
    Ok(StatusCode::NO_CONTENT)
}

/// Destination: after switchover, wait for the VM to run here; from then
/// on it is an ordinary VM of this host (an abort no longer removes it).
pub async fn finish(
    State(d): State<Arc<Daemon>>,
    Path(uuid): Path<String>,
) -> Result<StatusCode, Failure> {
    let a = arrivals(&d);
    if a.get(&uuid)
        .map_err(|e| internal(format!("{e:#}")))?
        .is_none()
    {
        // Finished before (a retried step).
        return Ok(StatusCode::NO_CONTENT);
    }
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
                "VM {} does not run on this host after {RUN_WAIT:?}",
                vm.name
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::task::spawn_blocking(move || a.forget(&uuid))
        .await
        .map_err(internal)?
        .map_err(|e| internal(format!("{e:#}")))?;
    Ok(StatusCode::NO_CONTENT)
}
