//! VM copy: start a `vm.copy` operation; the target side's verify call.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use ferry_api::{HashRanges, RangeHashes, Started, VmCopyRequest};

use super::{ApiResult, Failure, bad_field, blocking, error_response};
use crate::body::Body;
use crate::daemon::Daemon;
use crate::vmcopy::{self, Params};

/// Starts copying VM `{id}` of this host to a peer.
pub async fn copy(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
    Body(req): Body<VmCopyRequest>,
) -> Result<(StatusCode, Json<Started>), Failure> {
    let vm = d.vms.find(&id)?;
    if let Err(e) = d.peers.get(&req.to) {
        return Err(bad_field("to", &e.to_string()));
    }
    let name = req
        .name
        .clone()
        .unwrap_or_else(|| format!("{}-copy", vm.name));
    if name.is_empty()
        || name.len() > 60
        || name.starts_with('.')
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(bad_field(
            "name",
            &format!("VM name {name:?}: 1-60 of A-Z a-z 0-9 - _ ., not starting with ."),
        ));
    }
    for d in vm.definition().disks {
        if d.volume().is_none() || d.spec().host.is_some() {
            return Err(error_response(
                StatusCode::CONFLICT,
                &format!(
                    "VM {} has a disk that is an image file or another host's volume: only volumes of this host's pool are copied; nothing was started",
                    vm.name
                ),
                None,
            ));
        }
    }
    if req.bandwidth == Some(0) {
        return Err(bad_field("bandwidth", "bandwidth must be above 0 bytes/s"));
    }
    let p = Params {
        uuid: vm.uuid.to_string(),
        vm: vm.name.clone(),
        to: req.to,
        name,
        bandwidth: req.bandwidth,
    };
    let params = serde_json::to_value(&p)
        .map_err(|e| error_response(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string(), None))?;
    let operation = d.ops.start(vmcopy::KIND, params)?;
    Ok((StatusCode::ACCEPTED, Json(Started { operation })))
}

/// Hashes ranges of a volume of this host (BLAKE3 each), for a peer that
/// copied to it and verifies.
pub async fn hash(
    State(d): State<Arc<Daemon>>,
    Body(req): Body<HashRanges>,
) -> ApiResult<RangeHashes> {
    if let Some((off, len)) = req.ranges.iter().find(|(_, l)| *l > 16 << 20) {
        return Err(bad_field(
            "ranges",
            &format!("range {off}+{len} is above 16 MiB"),
        ));
    }
    let pool = d.pool().clone();
    let vol = req.volume.clone();
    let hashes = blocking(move || {
        let v = pool.volume(&vol)?;
        vmcopy::hash_ranges(&req.ranges, |off, buf| {
            v.read_at(off, buf).map_err(|e| e.to_string())
        })
        .map_err(|e| ferry_pool::Error::new(ferry_pool::ErrorKind::InvalidArgument, e))
    })
    .await?;
    Ok(Json(RangeHashes { hashes }))
}
