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
    let accepted = |operation| Ok((StatusCode::ACCEPTED, Json(Started { operation })));
    // A VM of another host: this host coordinates (`vm.copy.relay`).
    let from = match (&req.from, d.vms.find(&id)) {
        (Some(from), _) if *from != d.cfg.name => Some(from.clone()),
        (None, Err(e)) => Some(locate(&d, &id).await?.ok_or(e)?),
        _ => None,
    };
    if let Some(from) = from {
        return accepted(relay(&d, id, from, req)?);
    }
    let vm = d.vms.find(&id)?;
    if let Some(key) = &req.request {
        let same = d
            .ops
            .journal()
            .list()?
            .into_iter()
            .find(|o| o.kind == vmcopy::KIND && o.params["request"].as_str() == Some(key))
            .map(|o| o.id);
        if let Some(operation) = same {
            return accepted(operation);
        }
    }
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
        request: req.request,
    };
    let params = serde_json::to_value(&p)
        .map_err(|e| error_response(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string(), None))?;
    accepted(d.ops.start(vmcopy::KIND, params)?)
}

/// The one registered peer that has VM `id` (none has it: `None`; several:
/// 409 asking for `from`). Unreachable peers are skipped.
async fn locate(d: &Daemon, id: &str) -> Result<Option<String>, Failure> {
    let mut found = Vec::new();
    for peer in d.peers.list() {
        let Ok(client) = d.peers.client(&peer.name) else {
            continue;
        };
        if client
            .get::<serde_json::Value>(&format!("/v1/vms/{id}"))
            .await
            .is_ok()
        {
            found.push(peer.name);
        }
    }
    match found.len() {
        0 | 1 => Ok(found.pop()),
        _ => Err(error_response(
            StatusCode::CONFLICT,
            &format!(
                "VM {id} is on hosts {}: say which with \"from\"; nothing was started",
                found.join(", ")
            ),
            None,
        )),
    }
}

/// Starts `vm.copy.relay`: this host coordinates the copy of a VM of host
/// `from`, which sends the data to the target itself.
fn relay(d: &Daemon, vm: String, from: String, req: VmCopyRequest) -> Result<String, Failure> {
    if let Err(e) = d.peers.get(&from) {
        return Err(bad_field("from", &e.to_string()));
    }
    if req.bandwidth == Some(0) {
        return Err(bad_field("bandwidth", "bandwidth must be above 0 bytes/s"));
    }
    let p = vmcopy::relay::Params {
        vm,
        from,
        to: req.to,
        name: req.name,
        bandwidth: req.bandwidth,
    };
    let params = serde_json::to_value(&p)
        .map_err(|e| error_response(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string(), None))?;
    Ok(d.ops.start(vmcopy::relay::KIND, params)?)
}

/// Hashes ranges of a volume of this host (XXH3-128 or BLAKE3 each), for a
/// peer that copied to it and verifies. Read through the page cache; the
/// ranges are then written out behind (`Volume::write_behind`): the copy
/// asks for a piece once its writes answered, flushes only now and then,
/// and its next pieces take the pages freed (see `docs/vm-copy.md`).
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
    let Some(algorithm) = vmcopy::Algorithm::named(&req.algorithm) else {
        return Err(bad_field(
            "algorithm",
            &format!("unknown hash {:?} (xxh3-128 or blake3)", req.algorithm),
        ));
    };
    let pool = d.pool().clone();
    let vol = req.volume.clone();
    let hashes = blocking(move || {
        let v = pool.volume(&vol)?;
        vmcopy::hash_ranges(algorithm, &req.ranges, |off, buf| {
            v.read_at(off, buf).map_err(|e| e.to_string())
        })
        .inspect(|_| v.write_behind(&req.ranges))
        .map_err(|e| ferry_pool::Error::new(ferry_pool::ErrorKind::InvalidArgument, e))
    })
    .await?;
    Ok(Json(RangeHashes {
        hashes,
        algorithm: req.algorithm,
    }))
}
