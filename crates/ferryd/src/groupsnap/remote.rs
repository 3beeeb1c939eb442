//! The part of a group snapshot that lives in other hosts' pools. A VM disk
//! that is a volume of a peer's pool (`vms::remote`) reaches QEMU as an NBD
//! export on that peer; `resolve` maps it back to (peer, volume) and the
//! storage step asks each such peer for **one atomic group snapshot of
//! exactly those volumes** (`POST /v1/snapshots` with the snapshot names),
//! next to the local pool's own. Every call here is idempotent, so a retry
//! after a crash or an undo can run it again.

use std::collections::BTreeMap;

use ferry_api::{CreateClone, CreateSnapshot, ExportInfo, RevertVolume, RevertedVolume};
use ferry_api::{SnapshotInfo, VmDefinition, VolumeInfo};
use serde::{Deserialize, Serialize};

use super::Env;
use crate::peers::{PeerClient, PeerError};
use crate::vms::remote::remote_export_name;

/// One volume of a peer's pool and the snapshot the group takes of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct RemotePair {
    pub peer: String,
    pub volume: String,
    pub snapshot: String,
}

fn client(env: &Env, peer: &str) -> Result<PeerClient, String> {
    env.peers.client(peer).map_err(|e| e.to_string())
}

/// Disk `device` (index `i` of `def`) runs on export `export` (`<name>/
/// <secret>`) of some TCP NBD server: checks that this is the export of the
/// peer the definition names and that it serves the definition's volume;
/// returns (peer, volume, size).
pub(super) async fn resolve(
    env: &Env,
    def: &VmDefinition,
    uuid: &uuid::Uuid,
    device: &str,
    export: &str,
) -> Result<(String, String, u64), String> {
    let i = device
        .strip_prefix("vd")
        .and_then(|c| c.bytes().next())
        .filter(|_| device.len() == 3)
        .map(|c| usize::from(c.wrapping_sub(b'a')))
        .ok_or_else(|| format!("disk {device} is not a Ferry disk id"))?;
    let (peer, volume) = def.disks.get(i).and_then(|d| d.remote()).ok_or_else(|| {
        format!("disk {device} is served over TCP but its definition names no volume of a peer")
    })?;
    let name = remote_export_name(uuid, device);
    if export.split('/').next() != Some(name.as_str()) {
        return Err(format!(
            "disk {device} runs on export {:?}, not {name} of {peer}",
            export.split('/').next().unwrap_or_default()
        ));
    }
    let c = client(env, peer)?;
    let e: ExportInfo = c
        .get(&format!("/v1/exports/{name}"))
        .await
        .map_err(|e| format!("disk {device}: {e}"))?;
    if e.volume.as_deref() != Some(volume) {
        return Err(format!(
            "disk {device}: export {name} on {peer} serves {:?}, not volume {volume}",
            e.volume
        ));
    }
    let v: VolumeInfo = c
        .get(&format!("/v1/volumes/{volume}"))
        .await
        .map_err(|e| format!("disk {device}: {e}"))?;
    Ok((peer.to_string(), volume.to_string(), v.size))
}

fn by_peer(pairs: &[RemotePair]) -> BTreeMap<&str, Vec<&RemotePair>> {
    let mut m: BTreeMap<&str, Vec<&RemotePair>> = BTreeMap::new();
    for p in pairs {
        m.entry(p.peer.as_str()).or_default().push(p);
    }
    m
}

/// Takes, on each peer, one atomic group snapshot `group` of exactly its
/// volumes in `pairs`, unless a run before a crash already did. Returns one
/// line per peer for the log.
pub(super) async fn take(
    env: &Env,
    group: &str,
    pairs: &[RemotePair],
) -> Result<Vec<String>, String> {
    let mut lines = Vec::new();
    for (peer, members) in by_peer(pairs) {
        let c = client(env, peer)?;
        let existing: Vec<SnapshotInfo> = c
            .get("/v1/snapshots")
            .await
            .map_err(|e| format!("{peer}: {e}"))?;
        let done = members.iter().all(|m| {
            existing.iter().any(|e| {
                e.name == m.snapshot && e.volume == m.volume && e.group.as_deref() == Some(group)
            })
        });
        if !done {
            let req = CreateSnapshot {
                name: group.to_string(),
                volumes: members.iter().map(|m| m.volume.clone()).collect(),
                snapshot_names: Some(members.iter().map(|m| m.snapshot.clone()).collect()),
            };
            let _: Vec<SnapshotInfo> = c
                .post("/v1/snapshots", &req)
                .await
                .map_err(|e| format!("group snapshot on {peer}: {e}"))?;
        }
        lines.push(format!(
            "{peer}: pool group snapshot {group} of exactly {} volume(s): {}",
            members.len(),
            members
                .iter()
                .map(|m| format!("{} → {}", m.volume, m.snapshot))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(lines)
}

/// Deletes the snapshots of `pairs` that exist on their peers.
pub(super) async fn delete(env: &Env, pairs: &[RemotePair]) -> Result<(), String> {
    for p in pairs {
        delete_snapshot(env, &p.peer, &p.snapshot)
            .await
            .map_err(|(_, e)| e)?;
    }
    Ok(())
}

/// Deletes one snapshot on a peer; absent is fine. The error carries the
/// peer's HTTP status when it answered (409: clones depend on it).
pub(super) async fn delete_snapshot(
    env: &Env,
    peer: &str,
    snapshot: &str,
) -> Result<(), (Option<u16>, String)> {
    let c = client(env, peer).map_err(|e| (None, e))?;
    match c.delete(&format!("/v1/snapshots/{snapshot}")).await {
        Ok(()) | Err(PeerError::Failed { status: 404, .. }) => Ok(()),
        Err(e) => {
            let status = match &e {
                PeerError::Failed { status, .. } => Some(*status),
                _ => None,
            };
            Err((status, format!("snapshot {snapshot} on {peer}: {e}")))
        }
    }
}

/// Reverts a peer's volume to its snapshot; returns the bytes copied back.
pub(super) async fn revert(
    env: &Env,
    peer: &str,
    volume: &str,
    snapshot: &str,
) -> Result<u64, String> {
    let req = RevertVolume {
        snapshot: snapshot.to_string(),
    };
    let r: RevertedVolume = client(env, peer)?
        .post(&format!("/v1/volumes/{volume}/revert"), &req)
        .await
        .map_err(|e| format!("volume {volume} on {peer}: {e}"))?;
    Ok(r.bytes)
}

/// Makes volume `name` on a peer, a clone of its snapshot `snapshot`.
pub(super) async fn clone(env: &Env, peer: &str, snapshot: &str, name: &str) -> Result<(), String> {
    let req = CreateClone {
        snapshot: snapshot.to_string(),
        name: name.to_string(),
    };
    let _: VolumeInfo = client(env, peer)?
        .post("/v1/clones", &req)
        .await
        .map_err(|e| format!("cannot clone {snapshot} on {peer}: {e}"))?;
    Ok(())
}

/// Deletes volume `name` on a peer (cleanup after a failed clone).
pub(super) async fn delete_volume(env: &Env, peer: &str, name: &str) {
    if let Ok(c) = client(env, peer) {
        let _ = c.delete(&format!("/v1/volumes/{name}")).await;
    }
}
