//! Volumes, snapshots, clones.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use ferry_api::{
    CreateClone, CreateSnapshot, CreateVolume, GrowVolume, SnapshotInfo, Started, VolumeInfo,
};
use serde::Deserialize;
use serde_json::json;

use super::{ApiResult, Failure, bad_field, blocking, error_response};
use crate::body::Body;
use crate::daemon::Daemon;

fn volume_info(pool: &ferry_pool::Pool, v: ferry_pool::VolumeInfo) -> VolumeInfo {
    let space = pool.volume_space(&v.name).unwrap_or_default();
    VolumeInfo {
        exclusive_bytes: space.exclusive_bytes,
        shared_bytes: space.shared_bytes,
        name: v.name,
        size: v.size,
        parent_snapshot: v.parent_snapshot,
        lazy: v.lazy,
    }
}

pub async fn list(State(d): State<Arc<Daemon>>) -> ApiResult<Vec<VolumeInfo>> {
    let pool = d.pool().clone();
    let vols = blocking(move || {
        Ok(pool
            .volumes()
            .into_iter()
            .map(|v| volume_info(&pool, v))
            .collect())
    })
    .await?;
    Ok(Json(vols))
}

/// One volume as the API shows it (404 if there is none of that name).
fn find_volume(pool: &ferry_pool::Pool, name: &str) -> Result<VolumeInfo, ferry_pool::Error> {
    let v = pool
        .volumes()
        .into_iter()
        .find(|v| v.name == name)
        .ok_or_else(|| {
            ferry_pool::Error::new(ferry_pool::ErrorKind::NotFound, format!("volume {name}"))
        })?;
    Ok(volume_info(pool, v))
}

pub async fn show(State(d): State<Arc<Daemon>>, Path(name): Path<String>) -> ApiResult<VolumeInfo> {
    let pool = d.pool().clone();
    blocking(move || find_volume(&pool, &name)).await.map(Json)
}

pub(crate) fn check_name(field: &str, name: &str) -> Result<(), Failure> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(bad_field(
            field,
            &format!("{field} {name:?}: use 1-128 of A-Z a-z 0-9 - _ . @, not starting with ."),
        ))
    }
}

pub async fn create(
    State(d): State<Arc<Daemon>>,
    Body(req): Body<CreateVolume>,
) -> Result<(StatusCode, Json<VolumeInfo>), Failure> {
    check_name("name", &req.name)?;
    if req.size == 0 {
        return Err(bad_field("size", "size must be greater than 0"));
    }
    let pool = d.pool().clone();
    let info = blocking(move || {
        pool.create_volume(&req.name, req.size)?;
        find_volume(&pool, &req.name)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(info)))
}

pub async fn grow(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
    Body(req): Body<GrowVolume>,
) -> ApiResult<VolumeInfo> {
    let pool = d.pool().clone();
    blocking(move || {
        pool.grow_volume(&name, req.size)?;
        find_volume(&pool, &name)
    })
    .await
    .map(Json)
}

pub async fn delete(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
) -> Result<StatusCode, Failure> {
    if let Some(vm) = d.vms.user_of_volume(&name) {
        return Err(error_response(
            StatusCode::CONFLICT,
            &format!(
                "volume {name} is a disk of VM {vm}; delete the VM first; nothing was deleted"
            ),
            None,
        ));
    }
    refuse_if_exported(&d, &name, "volume")?;
    let pool = d.pool().clone();
    blocking(move || pool.delete_volume(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ImportRequest {
    /// Absolute path of a disk image on this host (raw, qcow2, or another
    /// format qemu-img reads).
    pub path: String,
    /// The image's format; detected by `qemu-img info` when absent.
    #[serde(default)]
    pub format: Option<String>,
}

/// Starts a `volume.import` operation; the volume must not exist yet. The
/// image is inspected first (`qemu-img info`), so a file that is not a
/// readable image is a 400 naming `path`, a wrong or unsupported format a
/// 400 naming `format`.
pub async fn import(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
    Body(req): Body<ImportRequest>,
) -> Result<(StatusCode, Json<Started>), Failure> {
    check_name("name", &name)?;
    let path = std::path::PathBuf::from(&req.path);
    if !path.is_absolute() {
        return Err(bad_field(
            "path",
            &format!("{} is not an absolute path", req.path),
        ));
    }
    if !path.is_file() {
        return Err(bad_field(
            "path",
            &format!("{} is not a readable file", req.path),
        ));
    }
    if d.pool().volume(&name).is_ok() {
        return Err(error_response(
            StatusCode::CONFLICT,
            &format!("volume {name} already exists; nothing was imported"),
            None,
        ));
    }
    let format = req.format.clone();
    let info =
        tokio::task::spawn_blocking(move || crate::operations::inspect(&path, format.as_deref()))
            .await
            .map_err(|e| {
                error_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("inspecting the image panicked: {e}"),
                    None,
                )
            })?
            .map_err(|e| bad_field(e.field, &format!("{}; nothing was imported", e.message)))?;
    let id = d.ops.start(
        "volume.import",
        json!({
            "volume": name,
            "path": req.path,
            "format": info.format,
            "size": info.virtual_size,
            "allocated": info.actual_size,
        }),
    )?;
    Ok((StatusCode::ACCEPTED, Json(Started { operation: id })))
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ExportRequest {
    /// Absolute path of the image file to create on this host; it must not
    /// exist, its directory must.
    pub path: String,
    /// `qcow2` (the default) or `raw`.
    #[serde(default)]
    pub format: Option<String>,
}

/// Starts a `volume.export` operation: the volume is snapshotted and the
/// snapshot written to a new image file.
pub async fn export(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
    Body(req): Body<ExportRequest>,
) -> Result<(StatusCode, Json<Started>), Failure> {
    let format = req.format.clone().unwrap_or_else(|| "qcow2".into());
    if !crate::operations::EXPORT_FORMATS.contains(&format.as_str()) {
        return Err(bad_field(
            "format",
            &format!(
                "format {format:?} is not supported; use one of {}",
                crate::operations::EXPORT_FORMATS.join(", ")
            ),
        ));
    }
    let path = std::path::PathBuf::from(&req.path);
    if !path.is_absolute() || path.file_name().is_none() {
        return Err(bad_field(
            "path",
            &format!("{} is not an absolute file path", req.path),
        ));
    }
    if !path.parent().is_some_and(|p| p.is_dir()) {
        return Err(bad_field(
            "path",
            &format!("the directory of {} does not exist", req.path),
        ));
    }
    if path.symlink_metadata().is_ok() {
        return Err(error_response(
            StatusCode::CONFLICT,
            &format!("{} already exists; nothing was exported", req.path),
            None,
        ));
    }
    let pool = d.pool().clone();
    let vol = name.clone();
    let space = blocking(move || {
        pool.volume(&vol)?;
        pool.volume_space(&vol)
    })
    .await?;
    let id = d.ops.start(
        "volume.export",
        json!({
            "volume": name,
            "path": req.path,
            "format": format,
            "bytes": space.exclusive_bytes + space.shared_bytes,
        }),
    )?;
    Ok((StatusCode::ACCEPTED, Json(Started { operation: id })))
}

/// A volume or snapshot served over NBD cannot be deleted.
fn refuse_if_exported(d: &Daemon, name: &str, what: &str) -> Result<(), Failure> {
    match d.exports.user_of(name) {
        Some(e) => Err(error_response(
            StatusCode::CONFLICT,
            &format!(
                "{what} {name} is in use by NBD export {e}; remove the export first; nothing was deleted"
            ),
            None,
        )),
        None => Ok(()),
    }
}

fn snapshot_info(s: ferry_pool::SnapshotInfo) -> SnapshotInfo {
    SnapshotInfo {
        name: s.name,
        volume: s.volume,
        size: s.size,
        group: s.group,
        created: s.created,
    }
}

pub async fn snapshots(State(d): State<Arc<Daemon>>) -> ApiResult<Vec<SnapshotInfo>> {
    let pool = d.pool().clone();
    let snaps = blocking(move || Ok(pool.snapshots())).await?;
    Ok(Json(snaps.into_iter().map(snapshot_info).collect()))
}

/// One volume: a snapshot named `name`. Several: one atomic group snapshot
/// `name` whose members are named `name@<volume>`.
pub async fn snapshot(
    State(d): State<Arc<Daemon>>,
    Body(req): Body<CreateSnapshot>,
) -> Result<(StatusCode, Json<Vec<SnapshotInfo>>), Failure> {
    check_name("name", &req.name)?;
    if req.volumes.is_empty() {
        return Err(bad_field("volumes", "name at least one volume"));
    }
    if let Some(names) = &req.snapshot_names {
        if names.len() != req.volumes.len() {
            return Err(bad_field(
                "snapshot_names",
                &format!(
                    "{} snapshot names for {} volumes; give one per volume",
                    names.len(),
                    req.volumes.len()
                ),
            ));
        }
        for n in names {
            check_name("snapshot_names", n)?;
        }
    }
    let pool = d.pool().clone();
    let made = blocking(move || {
        if let ([one], None) = (req.volumes.as_slice(), &req.snapshot_names) {
            Ok(vec![pool.snapshot(one, &req.name)?])
        } else {
            let names: Vec<String> = match req.snapshot_names {
                Some(n) => n,
                None => req
                    .volumes
                    .iter()
                    .map(|v| format!("{}@{v}", req.name))
                    .collect(),
            };
            let pairs: Vec<(&str, &str)> = req
                .volumes
                .iter()
                .zip(&names)
                .map(|(v, n)| (v.as_str(), n.as_str()))
                .collect();
            pool.group_snapshot(&req.name, &pairs)
        }
    })
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(made.into_iter().map(snapshot_info).collect()),
    ))
}

/// `POST /v1/volumes/{name}/revert`: the volume's content becomes its
/// snapshot's again; only the ranges written since the snapshot are
/// copied back (change tracking). Refused while a VM of this host that
/// uses the volume runs; a VM of another host using it over NBD must be
/// stopped by its caller (that host checks).
pub async fn revert(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
    Body(req): Body<ferry_api::RevertVolume>,
) -> ApiResult<ferry_api::RevertedVolume> {
    if let Some(vm) = d.vms.user_of_volume(&name) {
        let v = d.vms.find(&vm)?;
        let info = d.vms.info(&v).await;
        if matches!(
            info.state,
            ferry_api::VmState::Running | ferry_api::VmState::Paused
        ) {
            return Err(error_response(
                StatusCode::CONFLICT,
                &format!(
                    "volume {name} is a disk of VM {vm}, which is {}; stop it first; nothing was reverted",
                    info.state
                ),
                None,
            ));
        }
    }
    let pool = d.pool().clone();
    let snapshot = req.snapshot.clone();
    let bytes = blocking(move || revert_volume(&pool, &name, &snapshot)).await?;
    Ok(Json(ferry_api::RevertedVolume {
        snapshot: req.snapshot,
        bytes,
    }))
}

/// Copies back, from snapshot `snap`, every range of `volume` written
/// since it, and flushes; returns the bytes copied.
pub(crate) fn revert_volume(
    pool: &ferry_pool::Pool,
    volume: &str,
    snap: &str,
) -> Result<u64, ferry_pool::Error> {
    const BLOCK: u64 = 1 << 20;
    let s = pool.open_snapshot(snap)?;
    let v = pool.volume(volume)?;
    if v.size() != s.size() {
        return Err(ferry_pool::Error::new(
            ferry_pool::ErrorKind::InvalidArgument,
            format!(
                "volume {volume} is {} bytes, its snapshot {snap} {}: not reverted",
                v.size(),
                s.size()
            ),
        ));
    }
    let mut buf = vec![0u8; BLOCK as usize];
    let mut total = 0;
    for r in pool.changed_between(volume, snap, None)? {
        let mut off = r.start;
        while off < r.end {
            let n = (r.end - off).min(BLOCK) as usize;
            s.read_at(off, &mut buf[..n])?;
            v.write_at(off, &buf[..n])?;
            off += n as u64;
            total += n as u64;
        }
    }
    v.flush()?;
    Ok(total)
}

pub async fn delete_snapshot(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
) -> Result<StatusCode, Failure> {
    refuse_if_exported(&d, &name, "snapshot")?;
    let pool = d.pool().clone();
    blocking(move || pool.delete_snapshot(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn clone(
    State(d): State<Arc<Daemon>>,
    Body(req): Body<CreateClone>,
) -> Result<(StatusCode, Json<VolumeInfo>), Failure> {
    check_name("name", &req.name)?;
    let pool = d.pool().clone();
    let info = blocking(move || {
        pool.clone_snapshot(&req.snapshot, &req.name)?;
        find_volume(&pool, &req.name)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(info)))
}
