//! Snapshot groups at rest: `<data>/vmsnaps/<group>.json` (one
//! [`VmSnapshotGroup`], written atomically by the operation's last step),
//! and what can be done with them: list, show, delete, revert stopped VMs,
//! clone new VMs.
//!
//! The pool snapshots of a group are named `<group>.<vm>.<device>` and carry
//! the group's name. Deleting a group deletes its pool snapshots first,
//! then the record: a crash in between leaves a record whose missing
//! snapshots `delete` skips when asked again. Disks in a peer's pool
//! (`host` is not this host) are deleted, reverted and cloned there.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_api::{
    CloneVmSnapshot, RevertedVm, VmDisk, VmDiskSpec, VmSnapshotGroup, VmSnapshotVm, VmState,
};
use ferry_pool::Pool;

use super::Env;
use crate::config::write_atomic;
use crate::vms::VmError;

#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error("no VM snapshot group {0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Other(String),
    #[error(transparent)]
    Vm(#[from] VmError),
}

fn path_of(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.json"))
}

/// Writes a group record atomically.
pub(super) fn write_group(dir: &Path, g: &VmSnapshotGroup) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let data = serde_json::to_vec_pretty(g).map_err(|e| e.to_string())?;
    write_atomic(&path_of(dir, &g.name), &data, 0o644).map_err(|e| format!("{e:#}"))
}

pub(super) fn remove_group_file(dir: &Path, name: &str) -> Result<(), String> {
    match std::fs::remove_file(path_of(dir, name)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot remove the record of group {name}: {e}")),
    }
}

/// One group.
pub fn read_group(env: &Env, name: &str) -> Result<VmSnapshotGroup, GroupError> {
    if super::check_group_name(name).is_err() {
        return Err(GroupError::NotFound(name.to_string()));
    }
    let p = path_of(&env.groups_dir(), name);
    let text = match std::fs::read(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(GroupError::NotFound(name.to_string()));
        }
        Err(e) => {
            return Err(GroupError::Other(format!(
                "cannot read {}: {e}",
                p.display()
            )));
        }
    };
    serde_json::from_slice(&text)
        .map_err(|e| GroupError::Other(format!("invalid group record {}: {e}", p.display())))
}

/// True when a record or a pool snapshot already uses group name `name`.
pub fn group_exists(env: &Env, pool: &Pool, name: &str) -> bool {
    path_of(&env.groups_dir(), name).exists()
        || pool
            .snapshots()
            .iter()
            .any(|s| s.group.as_deref() == Some(name))
}

/// Every group, oldest first.
pub fn list_groups(env: &Env) -> Result<Vec<VmSnapshotGroup>, GroupError> {
    let dir = env.groups_dir();
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => {
            return Err(GroupError::Other(format!(
                "cannot read {}: {e}",
                dir.display()
            )));
        }
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        if let Some(name) = p.file_stem().and_then(|s| s.to_str()) {
            out.push(read_group(env, name)?);
        }
    }
    out.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
    Ok(out)
}

/// Whether a disk of a group lives in a peer's pool: its peer's name.
fn peer_of<'a>(env: &Env, d: &'a ferry_api::VmSnapshotDisk) -> Option<&'a str> {
    (d.host != env.host).then_some(d.host.as_str())
}

/// Deletes a group's pool snapshots (here and on peers), then its record.
pub async fn delete_group(env: Arc<Env>, pool: Pool, name: String) -> Result<(), GroupError> {
    let g = read_group(&env, &name)?;
    for vm in &g.vms {
        for d in &vm.disks {
            if let Some(peer) = peer_of(&env, d) {
                super::remote::delete_snapshot(&env, peer, &d.snapshot)
                    .await
                    .map_err(|(status, e)| match status {
                        Some(409) => GroupError::Conflict(format!(
                            "group {name}: {e}; the group's other snapshots were kept as they are"
                        )),
                        _ => GroupError::Other(format!(
                            "group {name}: {e}; delete the group again to finish"
                        )),
                    })?;
                continue;
            }
            let (p, snap) = (pool.clone(), d.snapshot.clone());
            let r = tokio::task::spawn_blocking(move || p.delete_snapshot(&snap))
                .await
                .map_err(|e| GroupError::Other(e.to_string()))?;
            match r {
                Ok(()) => {}
                Err(e) if e.kind() == ferry_pool::ErrorKind::NotFound => {}
                Err(e) if e.kind() == ferry_pool::ErrorKind::InUse => {
                    return Err(GroupError::Conflict(format!(
                        "group {name}: {e}; the group's other snapshots were kept as they are"
                    )));
                }
                Err(e) => {
                    return Err(GroupError::Other(format!(
                        "group {name}: {e}; delete the group again to finish"
                    )));
                }
            }
        }
    }
    let dir = env.groups_dir();
    tokio::task::spawn_blocking(move || remove_group_file(&dir, &name))
        .await
        .map_err(|e| GroupError::Other(e.to_string()))?
        .map_err(GroupError::Other)
}

fn find_vm<'a>(g: &'a VmSnapshotGroup, id: &str) -> Result<&'a VmSnapshotVm, GroupError> {
    g.vms
        .iter()
        .find(|v| v.name == id || v.uuid == id)
        .ok_or_else(|| GroupError::Invalid(format!("VM {id} is not in group {}", g.name)))
}

/// Rewrites the disks of stopped VMs with their content in the group: only
/// the byte ranges written since the snapshot are copied back (the pool's
/// change tracking). The VMs must still use the same volumes.
pub async fn revert(
    env: Arc<Env>,
    pool: Pool,
    name: &str,
    which: &[String],
) -> Result<Vec<RevertedVm>, GroupError> {
    let g = read_group(&env, name)?;
    let targets: Vec<VmSnapshotVm> = if which.is_empty() {
        g.vms.clone()
    } else {
        which
            .iter()
            .map(|w| find_vm(&g, w).cloned())
            .collect::<Result<_, _>>()?
    };
    // Check every VM before touching any disk.
    for t in &targets {
        let vm = env.vms.find(&t.uuid)?;
        let info = env.vms.info(&vm).await;
        if matches!(info.state, VmState::Running | VmState::Paused) {
            return Err(GroupError::Conflict(format!(
                "VM {} is {}; stop it before reverting; nothing was reverted",
                t.name, info.state
            )));
        }
        for d in &t.disks {
            let now = info.disks.iter().find(|x| x.id == d.device);
            let same = now.is_some_and(|x| {
                x.volume.as_deref() == Some(d.volume.as_str())
                    && x.host.as_deref() == peer_of(&env, d)
            });
            if !same {
                return Err(GroupError::Conflict(format!(
                    "VM {}: disk {} no longer uses volume {} of {}; nothing was reverted",
                    t.name, d.device, d.volume, d.host
                )));
            }
        }
    }
    let mut out = Vec::new();
    for t in targets {
        let p = pool.clone();
        let (remote, disks): (Vec<_>, Vec<_>) = t
            .disks
            .iter()
            .cloned()
            .partition(|d| peer_of(&env, d).is_some());
        let mut remote_bytes = 0;
        for d in &remote {
            remote_bytes += super::remote::revert(&env, &d.host, &d.volume, &d.snapshot)
                .await
                .map_err(|e| {
                    GroupError::Other(format!(
                        "revert of VM {} failed: disk {}: {e}; its disks may be partly reverted: revert again",
                        t.name, d.device
                    ))
                })?;
        }
        let bytes = tokio::task::spawn_blocking(move || -> Result<u64, String> {
            let mut total = 0;
            for d in &disks {
                total += crate::api::revert_volume(&p, &d.volume, &d.snapshot)
                    .map_err(|e| format!("disk {} (volume {}): {e}", d.device, d.volume))?;
            }
            p.flush().map_err(|e| e.to_string())?;
            Ok(total)
        })
        .await
        .map_err(|e| GroupError::Other(e.to_string()))?
        .map_err(|e| {
            GroupError::Other(format!(
                "revert of VM {} failed: {e}; its disks may be partly reverted: revert again",
                t.name
            ))
        })?;
        out.push(RevertedVm {
            name: t.name.clone(),
            bytes: bytes + remote_bytes,
        });
    }
    Ok(out)
}

/// Defines a new VM whose disks are clones of one VM's snapshots in the
/// group (volumes `<new name>-<device>`); starts it when asked. A failure
/// removes the clones made.
pub async fn clone_vm(
    env: Arc<Env>,
    pool: Pool,
    name: &str,
    req: &CloneVmSnapshot,
) -> Result<ferry_api::VmInfo, GroupError> {
    let g = read_group(&env, name)?;
    let src = match (&req.vm, g.vms.len()) {
        (Some(v), _) => find_vm(&g, v)?.clone(),
        (None, 1) => g.vms[0].clone(),
        (None, _) => {
            return Err(GroupError::Invalid(format!(
                "group {name} holds {} VMs; name the one to clone",
                g.vms.len()
            )));
        }
    };
    let mut def = src.definition.clone();
    def.name = req.name.clone();
    def.uuid = None;
    // (peer, volume) of every clone made, for the cleanup of a failure.
    let mut made: Vec<(Option<String>, String)> = Vec::new();
    let mut disks = Vec::new();
    let result = async {
        for (i, d) in def.disks.iter().enumerate() {
            let s = d.spec();
            let device = format!("vd{}", char::from(b'a' + i as u8));
            if s.volume.is_none() {
                return Err(GroupError::Invalid(format!(
                    "VM {}: disk {device} is a file, not a volume; it cannot be cloned",
                    src.name
                )));
            }
            let snap = src
                .disks
                .iter()
                .find(|x| x.device == device)
                .ok_or_else(|| {
                    GroupError::Other(format!(
                        "group {name}: VM {} has no snapshot of disk {device}",
                        src.name
                    ))
                })?;
            let vol = format!("{}-{device}", req.name);
            let peer = peer_of(&env, snap).map(str::to_string);
            if let Some(peer) = &peer {
                super::remote::clone(&env, peer, &snap.snapshot, &vol)
                    .await
                    .map_err(GroupError::Conflict)?;
            } else {
                let (p, sn, v) = (pool.clone(), snap.snapshot.clone(), vol.clone());
                tokio::task::spawn_blocking(move || p.clone_snapshot(&sn, &v).map(drop))
                    .await
                    .map_err(|e| GroupError::Other(e.to_string()))?
                    .map_err(|e| {
                        GroupError::Conflict(format!("cannot clone {}: {e}", snap.snapshot))
                    })?;
            }
            made.push((peer.clone(), vol.clone()));
            disks.push(VmDisk::Spec(VmDiskSpec {
                volume: Some(vol),
                host: peer,
                read_only: s.read_only,
                ..VmDiskSpec::default()
            }));
        }
        def.disks = disks;
        let vms = env.vms.clone();
        let d2 = def.clone();
        let vm = tokio::task::spawn_blocking(move || vms.define(d2))
            .await
            .map_err(|e| GroupError::Other(e.to_string()))??;
        if req.start {
            env.vms.start(&vm).await?;
        }
        Ok(env.vms.info(&vm).await)
    }
    .await;
    if result.is_err() {
        for (peer, v) in &made {
            match peer {
                Some(peer) => super::remote::delete_volume(&env, peer, v).await,
                None if env.vms.user_of_volume(v).is_none() => {
                    let _ = pool.delete_volume(v);
                }
                None => {}
            }
        }
    }
    result
}
