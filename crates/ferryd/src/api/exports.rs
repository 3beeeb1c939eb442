//! NBD exports of volumes and snapshots.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use ferry_api::{CreateExport, ExportInfo};

use super::{ApiResult, Failure, bad_field, error_response};
use crate::body::Body;
use crate::daemon::Daemon;
use crate::exports::{ExportError, WriteOptions};

impl From<ExportError> for Failure {
    fn from(e: ExportError) -> Self {
        match e {
            ExportError::Pool(p) => Failure::from(p),
            ExportError::Exists(_) => error_response(StatusCode::CONFLICT, &e.to_string(), None),
            ExportError::NotFound(_) => error_response(StatusCode::NOT_FOUND, &e.to_string(), None),
            ExportError::Target => bad_field("volume", &e.to_string()),
            ExportError::ReadOnly(field) => bad_field(field, &e.to_string()),
            ExportError::Other { .. } => {
                error_response(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string(), None)
            }
        }
    }
}

pub async fn list(State(d): State<Arc<Daemon>>) -> ApiResult<Vec<ExportInfo>> {
    Ok(Json(d.exports.list()))
}

pub async fn show(State(d): State<Arc<Daemon>>, Path(name): Path<String>) -> ApiResult<ExportInfo> {
    d.exports
        .get(&name)
        .map(Json)
        .ok_or_else(|| ExportError::NotFound(name).into())
}

pub async fn create(
    State(d): State<Arc<Daemon>>,
    Body(req): Body<CreateExport>,
) -> Result<(StatusCode, Json<ExportInfo>), Failure> {
    let name = req
        .name
        .clone()
        .or_else(|| req.volume.clone())
        .or_else(|| req.snapshot.clone())
        .ok_or(ExportError::Target)?;
    if name.is_empty() || name.contains('/') || name.len() > 255 {
        return Err(bad_field(
            "name",
            &format!("export name {name:?}: 1-255 bytes, no '/'"),
        ));
    }
    let (exports, pool) = (d.exports.clone(), d.pool().clone());
    let info = tokio::task::spawn_blocking(move || {
        let writes = WriteOptions {
            direct: req.direct,
            write_out: req.write_out,
        };
        exports.add(&pool, &name, req.volume, req.snapshot, writes)
    })
    .await
    .map_err(|e| error_response(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string(), None))??;
    Ok((StatusCode::CREATED, Json(info)))
}

pub async fn delete(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
) -> Result<StatusCode, Failure> {
    d.exports.remove(&name)?;
    Ok(StatusCode::NO_CONTENT)
}
