//! Moving a running VM's disk to another volume of this host's pool with
//! no downtime (the relocation of an instant restore). The disk may be a
//! volume of this pool or of a peer's (its export over NBD/TCP): the mirror
//! reads whatever QEMU's disk node reads.
//!
//! The new volume gets an *alias* export `reloc.<uuid>.<disk>`; QEMU
//! mirrors the disk to it (`blockdev-mirror`, sync full), waits until both
//! are in sync, pivots, and drops its connection to the old export. Only
//! then is the VM's record changed to name the new volume and its internal
//! export `vm.<uuid>.<disk>` re-pointed at it. The running QEMU keeps
//! using the alias export (it is persisted, so NBD reconnect finds it after
//! a ferryd restart) until the VM is next started or deleted, which
//! removes it.
//!
//! Crash story: before the pivot, the disk runs on the old volume, which
//! stayed complete and current (a retry cancels a leftover mirror job and
//! starts again); after the pivot but before the record changed, a retry
//! sees from the block graph that the disk already reads the alias export
//! and only changes the record. Nothing here deletes the old volume.

use std::sync::Arc;
use std::time::Duration;

use ferry_api::{VmDisk, VmDiskSpec};
use ferry_qemu::{BlockTarget, NbdServer, jobs};
use serde_json::json;
use uuid::Uuid;

use super::{Vm, VmError, Vms, disk_id, export_name, lock};

/// Test-only pause point: the mirror runs, the pivot has not happened.
pub const PAUSE_RELOCATING: &str = "backup.instant_restore:relocating";

/// The alias export of the new volume of disk `id` during a relocation.
pub fn relocation_export(uuid: &Uuid, id: &str) -> String {
    format!("reloc.{uuid}.{id}")
}

/// What a relocation did.
#[derive(Debug, Clone, PartialEq)]
pub enum Relocated {
    /// The record already named the new volume.
    AlreadyDone,
    /// The pivot had happened before (a crash); only the record changed.
    RecordOnly,
    /// Mirrored `bytes` then pivoted.
    Mirrored { bytes: u64 },
}

impl Vms {
    /// Moves disk `index` of running VM `vm` to volume `target` (which
    /// must exist, at least as large as the current one). `progress` gets
    /// (bytes done, bytes known) of the mirror.
    pub async fn relocate_disk(
        &self,
        vm: &Arc<Vm>,
        index: usize,
        target: &str,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
        timeout: Duration,
    ) -> Result<Relocated, VmError> {
        let other = |msg: String| VmError::Other {
            vm: vm.name.clone(),
            msg,
        };
        let qerr = |err: ferry_qemu::Error| VmError::Qemu {
            vm: vm.name.clone(),
            err,
        };
        let id = disk_id(index);
        let rec = vm.record();
        let disk = rec
            .definition
            .disks
            .get(index)
            .ok_or_else(|| other(format!("has no disk {id}")))?;
        if disk.volume() == Some(target) && disk.spec().host.is_none() {
            return Ok(Relocated::AlreadyDone);
        }
        let new = self.pool.volume(target).map_err(|e| other(e.to_string()))?;
        // The disk's size: its local volume's, or (a volume of a peer's
        // pool, reached over NBD/TCP) the new volume's, which the caller
        // sized from the peer's.
        let cur_size = match (disk.volume(), disk.remote()) {
            (Some(current), _) => self
                .pool
                .volume(current)
                .map_err(|e| other(e.to_string()))?
                .size(),
            (None, Some(_)) => new.size(),
            (None, None) => {
                return Err(other(format!(
                    "disk {id} is an image file, not a pool volume; it cannot be relocated"
                )));
            }
        };
        if new.size() < cur_size {
            return Err(other(format!(
                "volume {target} ({} bytes) is smaller than disk {id} ({cur_size} bytes)",
                new.size(),
            )));
        }
        let alias = relocation_export(&vm.uuid, &id);
        match self.exports.get(&alias) {
            Some(e) if e.volume.as_deref() == Some(target) => {}
            Some(_) => {
                return Err(VmError::Conflict(format!(
                    "export {alias} serves something else than volume {target}"
                )));
            }
            None => {
                self.exports
                    .add(
                        &self.pool,
                        &alias,
                        Some(target.to_string()),
                        None,
                        Default::default(),
                    )
                    .map_err(|e| other(format!("cannot export volume {target}: {e}")))?;
            }
        }
        let (qmp, _) = self.control(vm).await.ok_or_else(|| {
            other(format!(
                "does not run; start it and retry the relocation of disk {id}"
            ))
        })?;
        let job = format!("mirror-{id}");
        // A mirror an interrupted run started: cancel it (the disk stays on
        // the current volume, which is complete), then start again.
        if jobs::query_block_jobs(&qmp)
            .await
            .map_err(qerr)?
            .iter()
            .any(|j| j.id == job)
        {
            tracing::info!("VM {}: cancelling leftover job {job}", vm.name);
            let _ = jobs::cancel(&qmp, &job, true).await;
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            while jobs::query_block_jobs(&qmp)
                .await
                .map_err(qerr)?
                .iter()
                .any(|j| j.id == job)
            {
                if std::time::Instant::now() > deadline {
                    return Err(other(format!("leftover job {job} does not go away")));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        let graph = ferry_qemu::block_graph(&qmp).await.map_err(qerr)?;
        let chain = graph.disk(&id).map_err(qerr)?;
        let on_alias =
            matches!(&chain.top().target, BlockTarget::Nbd { export, .. } if *export == alias);
        let mut outcome = Relocated::RecordOnly;
        if !on_alias {
            let used: Vec<&str> = chain.node_names();
            let prefix = format!("{id}-mi");
            for n in graph.nodes.keys() {
                if n.starts_with(&prefix) && !used.contains(&n.as_str()) {
                    let _ = qmp.execute("blockdev-del", json!({ "node-name": n })).await;
                }
            }
            let server = NbdServer::Unix(self.nbd_socket.clone());
            let mut m = ferry_qemu::start_mirror(&qmp, &id, &server, &alias)
                .await
                .map_err(qerr)?;
            ferry_ops::test_pause(PAUSE_RELOCATING).await;
            let mut rx = m.progress(Duration::from_millis(500));
            let mut bytes = 0;
            {
                let ready = m.wait_ready(timeout);
                tokio::pin!(ready);
                loop {
                    tokio::select! {
                        r = &mut ready => { r.map_err(qerr)?; break; }
                        Some(p) = rx.recv() => { bytes = p.len; progress(p.offset, p.len); }
                    }
                }
            }
            m.pivot(timeout, true).await.map_err(qerr)?;
            outcome = Relocated::Mirrored {
                bytes: bytes.max(cur_size),
            };
        }
        self.swap_volume(vm, index, target).await?;
        Ok(outcome)
    }

    /// Changes disk `index`'s volume in the VM's record and re-points its
    /// internal export. The running QEMU must not use that export (it uses
    /// the alias export after the pivot).
    async fn swap_volume(&self, vm: &Arc<Vm>, index: usize, target: &str) -> Result<(), VmError> {
        let rec = {
            let mut r = lock(&vm.rec);
            let old = r.definition.disks[index].spec();
            r.definition.disks[index] = VmDisk::Spec(VmDiskSpec {
                volume: Some(target.to_string()),
                read_only: old.read_only,
                ..VmDiskSpec::default()
            });
            r.clone()
        };
        self.save(&rec, &vm.uuid)?;
        let name = export_name(&vm.uuid, &disk_id(index));
        if self
            .exports
            .get(&name)
            .is_some_and(|e| e.volume.as_deref() != Some(target))
        {
            self.exports.remove(&name).map_err(|e| VmError::Other {
                vm: vm.name.clone(),
                msg: format!("cannot remove export {name}: {e}"),
            })?;
        }
        self.ensure_exports(&rec, &vm.uuid)
    }

    /// Removes the alias exports of VM `uuid` (no QEMU of it runs).
    pub(super) fn remove_relocation_exports(&self, uuid: &Uuid) {
        let prefix = format!("reloc.{uuid}.");
        for e in self.exports.list() {
            if e.name.starts_with(&prefix)
                && let Err(err) = self.exports.remove(&e.name)
            {
                tracing::warn!("cannot remove export {}: {err}", e.name);
            }
        }
    }
}

/// How long after a start the pool records which chunks a VM's disks read
/// (its boot profile, stored with its backups and prefetched first by an
/// instant restore).
pub const BOOT_PROFILE: Duration = Duration::from_secs(120);

impl Vms {
    /// Starts recording the boot profile of every local volume disk.
    pub(super) fn profile_boot(&self, def: &ferry_api::VmDefinition) {
        for d in &def.disks {
            if d.spec().host.is_some() {
                continue;
            }
            if let Some(v) = d.volume().and_then(|v| self.pool.volume(v).ok()) {
                v.start_read_profile(ferry_pool::ProfileLimit::Duration(BOOT_PROFILE));
            }
        }
    }
}
