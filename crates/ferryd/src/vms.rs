//! The VMs of this host: durable definitions, their QEMU processes, and
//! re-attaching to those processes after a ferryd restart.
//!
//! # On disk
//! - `<data>/vms/<uuid>.json` — one [`VmRecord`] per VM (`format` 1),
//!   written atomically (`config::write_atomic`): the definition as the
//!   API accepted it (uuid and accel filled in), the last known state and a
//!   note saying why the VM is in it.
//! - `<data>/run/vms/<uuid>/` — the QEMU run directory (`ferry-qemu`'s
//!   layout: `qmp.sock`, `qga.sock`, `qemu.pid`, `serial.log`, `qemu.log`,
//!   `vm.json`).
//! - Each volume disk is served to QEMU by an internal NBD export named
//!   `vm.<uuid>.<disk id>` on the local unix socket, persisted with the
//!   other exports (`exports.json`), so a volume with a VM cannot be deleted
//!   and QEMU finds the same export again after a ferryd restart.
//! - A disk in another host's pool (`{"host": peer, "volume": v}`) is
//!   served by an export on that peer, reached over NBD/TCP ([`remote`]).
//!
//! # Life cycle and crashes
//! ferryd never kills a VM except when asked to (`stop`, `kill`): a clean
//! shutdown detaches from every QEMU, and so does dropping the registry.
//! QEMU runs in its own process group with its output in `qemu.log`, so a
//! `kill -9` of ferryd leaves it running; NBD disks reconnect to the
//! restarted ferryd (`reconnect-delay`). At start, [`Vms::reattach_all`]
//! finds every run directory whose QEMU is alive and reconnects to its QMP
//! socket (same pid, not restarted). A VM recorded as running whose QEMU is
//! gone is shown as `crashed`, with a note saying it exited while ferryd was
//! not running. While ferryd runs, a watcher per VM follows QMP: QEMU
//! exiting after a `SHUTDOWN` event is `stopped`, without one `crashed`.
//!
//! A crash between the steps of `define` or `delete` leaves either the
//! record without some exports (they are re-created at `start`) or exports
//! without a record (removed at the next start of ferryd).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ferry_api::{VmBoot, VmDefinition, VmDiskInfo, VmInfo, VmState};
use ferry_pool::Pool;
use ferry_qemu::{
    Boot, DiskSource, DiskSpec, EventStream, ImageFormat, LaunchOptions, NbdServer, QmpClient,
    StopOutcome, VmProcess, VmSpec,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::config::{DataDir, write_atomic};
use crate::exports::{ExportError, Exports};
use crate::peers::Peers;

pub mod relocate;
pub mod relocate_op;
pub mod remote;
use remote::RemoteDisk;

/// Version of the record format in `vms/<uuid>.json`.
pub const RECORD_FORMAT: u32 = 1;

/// Most disks a VM may have (`vda` .. `vdz`).
pub const MAX_DISKS: usize = 26;

/// How long re-attaching waits for a QMP greeting.
const REATTACH_TIMEOUT: Duration = Duration::from_secs(5);

/// The durable record of one VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmRecord {
    pub format: u32,
    /// uuid and accel always present.
    pub definition: VmDefinition,
    /// Last known state; `paused` is never stored (QMP says it).
    pub state: VmState,
    pub note: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("no VM {0}")]
    NotFound(String),
    #[error("volume {0} does not exist; nothing was defined")]
    VolumeNotFound(String),
    #[error("{msg}")]
    Invalid { field: String, msg: String },
    #[error("{0}")]
    Conflict(String),
    #[error("VM {vm}: {err}")]
    Qemu { vm: String, err: ferry_qemu::Error },
    #[error("VM {vm}: {msg}")]
    Other { vm: String, msg: String },
}

fn invalid(field: impl Into<String>, msg: impl Into<String>) -> VmError {
    VmError::Invalid {
        field: field.into(),
        msg: msg.into(),
    }
}

/// One VM: its record and, while it runs, its QEMU.
pub struct Vm {
    pub uuid: Uuid,
    pub name: String,
    rec: Mutex<VmRecord>,
    /// Serialises life-cycle actions; owns the process.
    slot: tokio::sync::Mutex<Slot>,
    /// What `show` needs without waiting for a life-cycle action.
    live: Mutex<Option<Live>>,
}

#[derive(Clone)]
struct Live {
    pid: i32,
    qmp: QmpClient,
}

#[derive(Default)]
struct Slot {
    process: Option<VmProcess>,
    /// Bumped at every start/re-attach, so a watcher of an earlier process
    /// does not touch a later one.
    generation: u64,
    deleted: bool,
}

impl Drop for Slot {
    /// ferryd going away never takes its VMs with it.
    fn drop(&mut self) {
        if let Some(p) = self.process.take() {
            p.detach();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Vm {
    fn record(&self) -> VmRecord {
        lock(&self.rec).clone()
    }

    fn set_live(&self, live: Option<Live>) {
        *lock(&self.live) = live;
    }
}

/// The registry of this host's VMs.
pub struct Vms {
    defs: PathBuf,
    run: PathBuf,
    nbd_socket: PathBuf,
    default_accel: String,
    pool: Pool,
    exports: Arc<Exports>,
    peers: Arc<Peers>,
    table: Mutex<BTreeMap<Uuid, Arc<Vm>>>,
}

/// The internal export serving disk `id` of VM `uuid`.
pub fn export_name(uuid: &Uuid, id: &str) -> String {
    format!("vm.{uuid}.{id}")
}

fn disk_id(i: usize) -> String {
    format!("vd{}", char::from(b'a' + i as u8))
}

fn check_vm_name(name: &str) -> Result<(), VmError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if !ok {
        return Err(invalid(
            "name",
            format!("name {name:?}: use 1-64 of A-Z a-z 0-9 - _ ., not starting with ."),
        ));
    }
    if Uuid::parse_str(name).is_ok() {
        return Err(invalid(
            "name",
            format!("name {name:?} is a UUID; VMs are looked up by name or UUID"),
        ));
    }
    Ok(())
}

fn check_host_file(field: &str, path: &str) -> Result<(), VmError> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(invalid(
            field,
            format!("{field} {path:?} is not an absolute path"),
        ));
    }
    if !p.is_file() {
        return Err(invalid(
            field,
            format!("{field} {path} is not a file on this host"),
        ));
    }
    Ok(())
}

impl Vms {
    /// Reads every VM record and removes internal exports whose VM is gone.
    /// Processes are found again by [`Vms::reattach_all`].
    pub fn load(
        dir: &DataDir,
        default_accel: &str,
        pool: Pool,
        exports: Arc<Exports>,
        peers: Arc<Peers>,
    ) -> anyhow::Result<Vms> {
        use anyhow::Context;
        let defs = dir.root.join("vms");
        let run = dir.run().join("vms");
        for d in [&defs, &run] {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        let mut table = BTreeMap::new();
        for entry in std::fs::read_dir(&defs)? {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let rec: VmRecord = serde_json::from_str(&text)
                .with_context(|| format!("invalid VM record {}", path.display()))?;
            if rec.format != RECORD_FORMAT {
                anyhow::bail!(
                    "{}: record format {} is not {RECORD_FORMAT}",
                    path.display(),
                    rec.format
                );
            }
            let uuid = rec
                .definition
                .uuid
                .as_deref()
                .and_then(|u| Uuid::parse_str(u).ok())
                .with_context(|| format!("{}: no valid uuid", path.display()))?;
            let name = rec.definition.name.clone();
            table.insert(
                uuid,
                Arc::new(Vm {
                    uuid,
                    name,
                    rec: Mutex::new(rec),
                    slot: tokio::sync::Mutex::new(Slot::default()),
                    live: Mutex::new(None),
                }),
            );
        }
        for e in exports.list() {
            let owner = e
                .name
                .strip_prefix("vm.")
                .and_then(|r| r.split_once('.'))
                .and_then(|(u, _)| Uuid::parse_str(u).ok());
            if let Some(u) = owner
                && !table.contains_key(&u)
            {
                tracing::info!("removing export {} of a deleted VM", e.name);
                exports.remove(&e.name)?;
            }
        }
        Ok(Vms {
            defs,
            run,
            nbd_socket: dir.nbd_socket(),
            default_accel: default_accel.to_string(),
            pool,
            exports,
            peers,
            table: Mutex::new(table),
        })
    }

    fn record_path(&self, uuid: &Uuid) -> PathBuf {
        self.defs.join(format!("{uuid}.json"))
    }

    /// The run directory of VM `uuid`.
    pub fn run_dir(&self, uuid: &Uuid) -> PathBuf {
        self.run.join(uuid.to_string())
    }

    fn save(&self, rec: &VmRecord, uuid: &Uuid) -> Result<(), VmError> {
        let data = serde_json::to_vec_pretty(rec).map_err(|e| VmError::Other {
            vm: rec.definition.name.clone(),
            msg: e.to_string(),
        })?;
        write_atomic(&self.record_path(uuid), &data, 0o644).map_err(|e| VmError::Other {
            vm: rec.definition.name.clone(),
            msg: format!("cannot save its record: {e:#}"),
        })
    }

    /// Records a new state (and note) durably.
    fn set_state(&self, vm: &Vm, state: VmState, note: Option<String>) {
        let rec = {
            let mut r = lock(&vm.rec);
            r.state = state;
            r.note = note;
            r.clone()
        };
        if let Err(e) = self.save(&rec, &vm.uuid) {
            tracing::error!("{e}");
        }
    }

    /// Every VM, by name.
    pub fn list(&self) -> Vec<Arc<Vm>> {
        let mut v: Vec<Arc<Vm>> = lock(&self.table).values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// A VM by UUID or name.
    pub fn find(&self, id: &str) -> Result<Arc<Vm>, VmError> {
        let table = lock(&self.table);
        if let Ok(u) = Uuid::parse_str(id)
            && let Some(vm) = table.get(&u)
        {
            return Ok(vm.clone());
        }
        table
            .values()
            .find(|v| v.name == id)
            .cloned()
            .ok_or_else(|| VmError::NotFound(id.to_string()))
    }

    /// The VM that has `volume` as a disk, if any.
    pub fn user_of_volume(&self, volume: &str) -> Option<String> {
        let table = lock(&self.table);
        table
            .values()
            .find(|vm| {
                lock(&vm.rec)
                    .definition
                    .disks
                    .iter()
                    .any(|d| d.volume() == Some(volume))
            })
            .map(|vm| vm.name.clone())
    }

    /// Validates and stores a new definition; creates the internal exports
    /// of its volumes. Blocking (fsyncs).
    pub fn define(&self, mut def: VmDefinition) -> Result<Arc<Vm>, VmError> {
        check_vm_name(&def.name)?;
        let uuid = match def.uuid.as_deref() {
            Some(u) => Uuid::parse_str(u)
                .map_err(|e| invalid("uuid", format!("uuid {u:?} is not a UUID: {e}")))?,
            None => Uuid::new_v4(),
        };
        def.uuid = Some(uuid.to_string());
        if def.vcpus == 0 || def.vcpus > 288 {
            return Err(invalid(
                "vcpus",
                format!("vcpus {} is not within 1..=288", def.vcpus),
            ));
        }
        if def.memory_mib < 16 || def.memory_mib > 16 * 1024 * 1024 {
            return Err(invalid(
                "memory_mib",
                format!("memory_mib {} is not within 16..=16777216", def.memory_mib),
            ));
        }
        let accel = def
            .accel
            .clone()
            .unwrap_or_else(|| self.default_accel.clone());
        let mut probe = VmSpec::new("probe");
        probe.accel = accel.clone();
        if let Err(e) = probe.validate() {
            return Err(invalid("accel", format!("accel {accel:?}: {}", e.kind)));
        }
        def.accel = Some(accel);
        match &def.boot {
            VmBoot::Kernel { kernel, initrd, .. } => {
                check_host_file("boot.kernel", kernel)?;
                if let Some(i) = initrd {
                    check_host_file("boot.initrd", i)?;
                }
            }
            VmBoot::Firmware { firmware } => {
                if def.disks.is_empty() {
                    return Err(invalid("disks", "firmware boot needs at least one disk"));
                }
                if let Some(f) = firmware {
                    check_host_file("boot.firmware", f)?;
                }
            }
        }
        if def.disks.len() > MAX_DISKS {
            return Err(invalid(
                "disks",
                format!("{} disks; at most {MAX_DISKS}", def.disks.len()),
            ));
        }
        let mut volumes: Vec<String> = Vec::new();
        for (i, d) in def.disks.iter().enumerate() {
            let s = d.spec();
            let field = format!("disks[{i}]");
            match (&s.volume, &s.file) {
                (Some(v), None) if s.host.is_some() => {
                    if s.format.is_some() {
                        return Err(invalid(
                            format!("{field}.format"),
                            "format applies to file disks only (volumes are raw)",
                        ));
                    }
                    let h = s.host.as_deref().unwrap_or_default();
                    if h.is_empty() {
                        return Err(invalid(format!("{field}.host"), "name a registered peer"));
                    }
                    let twice = def.disks[..i].iter().any(|o| o.remote() == Some((h, v)));
                    if twice {
                        return Err(invalid(field, format!("volume {v} on {h} is named twice")));
                    }
                }
                (None, Some(_)) if s.host.is_some() => {
                    return Err(invalid(
                        format!("{field}.host"),
                        "host applies to volume disks only",
                    ));
                }
                (Some(v), None) => {
                    if s.format.is_some() {
                        return Err(invalid(
                            format!("{field}.format"),
                            "format applies to file disks only (volumes are raw)",
                        ));
                    }
                    if volumes.contains(v) {
                        return Err(invalid(field, format!("volume {v} is named twice")));
                    }
                    volumes.push(v.clone());
                }
                (None, Some(f)) => {
                    check_host_file(&format!("{field}.file"), f)?;
                    if !matches!(s.format.as_deref(), None | Some("raw") | Some("qcow2")) {
                        return Err(invalid(format!("{field}.format"), "format is raw or qcow2"));
                    }
                }
                _ => {
                    return Err(invalid(field, "a disk names exactly one of volume or file"));
                }
            }
        }
        for v in &volumes {
            if let Err(e) = self.pool.volume(v) {
                return Err(match e.kind() {
                    ferry_pool::ErrorKind::NotFound => VmError::VolumeNotFound(v.to_string()),
                    _ => VmError::Other {
                        vm: def.name.clone(),
                        msg: format!("volume {v}: {e}"),
                    },
                });
            }
        }
        let rec = VmRecord {
            format: RECORD_FORMAT,
            definition: def,
            state: VmState::Defined,
            note: None,
        };
        // The QEMU-level checks (node names, paths) before anything is written.
        self.spec_of(&rec, &uuid, None)?
            .validate()
            .map_err(|e| invalid("definition", e.to_string()))?;

        let mut table = lock(&self.table);
        let name = rec.definition.name.clone();
        if table.contains_key(&uuid) {
            return Err(VmError::Conflict(format!(
                "a VM with uuid {uuid} already exists; nothing was defined"
            )));
        }
        if let Some(other) = table.values().find(|v| v.name == name) {
            return Err(VmError::Conflict(format!(
                "VM {name} already exists (uuid {}); nothing was defined",
                other.uuid
            )));
        }
        for v in &volumes {
            if let Some(other) = table.values().find(|vm| {
                lock(&vm.rec)
                    .definition
                    .disks
                    .iter()
                    .any(|d| d.volume() == Some(v.as_str()))
            }) {
                return Err(VmError::Conflict(format!(
                    "volume {v} is already a disk of VM {}; nothing was defined",
                    other.name
                )));
            }
        }
        self.save(&rec, &uuid)?;
        if let Err(e) = self.ensure_exports(&rec, &uuid) {
            for i in 0..rec.definition.disks.len() {
                let _ = self.exports.remove(&export_name(&uuid, &disk_id(i)));
            }
            let _ = std::fs::remove_file(self.record_path(&uuid));
            return Err(e);
        }
        let vm = Arc::new(Vm {
            uuid,
            name: name.clone(),
            rec: Mutex::new(rec),
            slot: tokio::sync::Mutex::new(Slot::default()),
            live: Mutex::new(None),
        });
        table.insert(uuid, vm.clone());
        tracing::info!("defined VM {name} ({uuid})");
        Ok(vm)
    }

    /// Makes sure every volume disk has its internal export. Blocking.
    fn ensure_exports(&self, rec: &VmRecord, uuid: &Uuid) -> Result<(), VmError> {
        for (i, d) in rec.definition.disks.iter().enumerate() {
            let Some(v) = d.volume() else { continue };
            let name = export_name(uuid, &disk_id(i));
            match self.exports.get(&name) {
                Some(e) if e.volume.as_deref() == Some(v) => continue,
                Some(_) => {
                    return Err(VmError::Conflict(format!(
                        "export {name} exists but does not serve volume {v}; remove it first"
                    )));
                }
                None => {}
            }
            self.exports
                .add(
                    &self.pool,
                    &name,
                    Some(v.to_string()),
                    None,
                    Default::default(),
                )
                .map_err(|e| match e {
                    ExportError::Pool(p) if p.kind() == ferry_pool::ErrorKind::NotFound => {
                        VmError::VolumeNotFound(v.to_string())
                    }
                    e => VmError::Other {
                        vm: rec.definition.name.clone(),
                        msg: format!("cannot export volume {v}: {e}"),
                    },
                })?;
        }
        Ok(())
    }

    /// Checks what [`Vms::define`] cannot without the network: every disk
    /// in another host's pool names a registered peer holding the volume.
    pub async fn check_remote(&self, def: &VmDefinition) -> Result<(), VmError> {
        remote::check(&self.peers, def).await
    }

    /// The QEMU definition of a record; `remote` says where each disk in
    /// another host's pool is served (`None`: only validating, a
    /// placeholder address stands in).
    fn spec_of(
        &self,
        rec: &VmRecord,
        uuid: &Uuid,
        remote: Option<&HashMap<String, RemoteDisk>>,
    ) -> Result<VmSpec, VmError> {
        let d = &rec.definition;
        let mut spec = VmSpec::new(&d.name);
        spec.uuid = *uuid;
        spec.vcpus = d.vcpus;
        spec.memory_mib = d.memory_mib;
        spec.guest_agent = d.guest_agent;
        spec.accel = d
            .accel
            .clone()
            .unwrap_or_else(|| self.default_accel.clone());
        spec.boot = match &d.boot {
            VmBoot::Kernel {
                kernel,
                initrd,
                cmdline,
            } => Boot::Kernel {
                kernel: kernel.into(),
                initrd: initrd.as_ref().map(PathBuf::from),
                cmdline: cmdline.clone(),
            },
            VmBoot::Firmware { firmware } => Boot::Disk {
                firmware: firmware.as_ref().map(PathBuf::from),
            },
        };
        for (i, disk) in d.disks.iter().enumerate() {
            let s = disk.spec();
            let id = disk_id(i);
            let source = match (&s.volume, &s.file) {
                (Some(_), _) if s.host.is_some() => {
                    let placeholder = RemoteDisk {
                        server: NbdServer::Tcp {
                            host: s.host.clone().unwrap_or_default(),
                            port: 10809,
                        },
                        export: remote::remote_export_name(uuid, &id),
                    };
                    let r = match remote {
                        Some(m) => m.get(&id).cloned().ok_or_else(|| VmError::Other {
                            vm: d.name.clone(),
                            msg: format!("disk {id}: its peer's export is not known"),
                        })?,
                        None => placeholder,
                    };
                    DiskSource::Nbd {
                        server: r.server,
                        export: r.export,
                        tls_creds: None,
                    }
                }
                (Some(_), _) => DiskSource::Nbd {
                    server: NbdServer::Unix(self.nbd_socket.clone()),
                    export: export_name(uuid, &id),
                    tls_creds: None,
                },
                (None, Some(f)) => DiskSource::File {
                    path: f.into(),
                    format: if s.format.as_deref() == Some("qcow2") {
                        ImageFormat::Qcow2
                    } else {
                        ImageFormat::Raw
                    },
                },
                (None, None) => return Err(invalid(format!("disks[{i}]"), "empty disk")),
            };
            spec.disks.push(DiskSpec {
                id,
                source,
                read_only: s.read_only,
            });
        }
        Ok(spec)
    }

    /// What the API shows of a VM (asks QEMU for its status while it runs).
    pub async fn info(&self, vm: &Vm) -> VmInfo {
        let rec = vm.record();
        let live = lock(&vm.live).clone();
        let mut state = rec.state;
        let mut note = rec.note.clone();
        let (mut pid, mut qmp_status) = (None, None);
        if let Some(l) = live {
            pid = Some(l.pid);
            state = VmState::Running;
            match l
                .qmp
                .execute_with_timeout(
                    "query-status",
                    serde_json::Value::Null,
                    Duration::from_secs(2),
                )
                .await
            {
                Ok(v) => {
                    let running = v["running"].as_bool().unwrap_or(false);
                    qmp_status = v["status"].as_str().map(str::to_string);
                    if !running {
                        state = VmState::Paused;
                    }
                }
                Err(e) => note = Some(format!("QMP did not answer query-status: {e}")),
            }
        }
        let run_dir = self.run_dir(&vm.uuid);
        let disks = rec
            .definition
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let s = d.spec();
                let export = match (&s.volume, &s.host) {
                    (Some(_), Some(_)) => Some(remote::remote_export_name(&vm.uuid, &disk_id(i))),
                    (Some(_), None) => Some(export_name(&vm.uuid, &disk_id(i))),
                    _ => None,
                };
                VmDiskInfo {
                    id: disk_id(i),
                    export,
                    host: s.host,
                    volume: s.volume,
                    file: s.file,
                    read_only: s.read_only,
                }
            })
            .collect();
        VmInfo {
            uuid: vm.uuid.to_string(),
            name: vm.name.clone(),
            state,
            pid,
            qmp_status,
            note,
            serial_bytes: std::fs::metadata(run_dir.join("serial.log"))
                .map(|m| m.len())
                .unwrap_or(0),
            serial_log: run_dir.join("serial.log").display().to_string(),
            run_dir: run_dir.display().to_string(),
            disks,
            definition: rec.definition,
        }
    }

    /// Adopts a process (started or re-attached) and follows it.
    fn adopt(self: &Arc<Self>, vm: &Arc<Vm>, slot: &mut Slot, p: VmProcess) {
        slot.generation += 1;
        let events = p.qmp().events();
        vm.set_live(Some(Live {
            pid: p.pid(),
            qmp: p.qmp().clone(),
        }));
        slot.process = Some(p);
        self.watch(vm.clone(), events, slot.generation);
    }

    /// Follows QMP until the connection closes, then records how QEMU ended.
    fn watch(self: &Arc<Self>, vm: Arc<Vm>, mut events: EventStream, generation: u64) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut shutdown: Option<String> = None;
            loop {
                match events.next().await {
                    Ok(ev) if ev.name == "SHUTDOWN" => {
                        let reason = ev.data["reason"].as_str().unwrap_or("unknown").to_string();
                        shutdown = Some(reason);
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            let mut slot = vm.slot.lock().await;
            if slot.generation != generation {
                return;
            }
            let Some(p) = slot.process.as_mut() else {
                return;
            };
            if !p.wait_exit(Duration::from_secs(10)).await {
                tracing::warn!(
                    "VM {}: QMP closed but QEMU (pid {}) still runs; leaving it",
                    vm.name,
                    p.pid()
                );
                return;
            }
            let log = p.qemu_log_path().to_path_buf();
            slot.process = None;
            vm.set_live(None);
            let (state, note) = match shutdown {
                Some(r) => (VmState::Stopped, format!("QEMU shut down ({r})")),
                None => (
                    VmState::Crashed,
                    format!("QEMU exited unexpectedly{}", log_tail(&log)),
                ),
            };
            tracing::info!("VM {}: {note}", vm.name);
            me.set_state(&vm, state, Some(note));
        });
    }

    /// Re-attaches to every VM whose QEMU still runs; marks VMs recorded as
    /// running whose QEMU is gone as crashed.
    pub async fn reattach_all(self: &Arc<Self>) {
        let alive: Vec<PathBuf> = VmProcess::find_running(&self.run).unwrap_or_else(|e| {
            tracing::warn!("{e}");
            Vec::new()
        });
        for vm in self.list() {
            let dir = self.run_dir(&vm.uuid);
            let mut slot = vm.slot.lock().await;
            if alive.contains(&dir) {
                match VmProcess::reattach(&dir, REATTACH_TIMEOUT).await {
                    Ok(p) => {
                        tracing::info!("re-attached to VM {} (pid {})", vm.name, p.pid());
                        self.adopt(&vm, &mut slot, p);
                        self.set_state(
                            &vm,
                            VmState::Running,
                            Some("re-attached after a ferryd restart".into()),
                        );
                    }
                    Err(e) => {
                        tracing::error!("VM {}: {e}", vm.name);
                        let rec = vm.record();
                        self.set_state(
                            &vm,
                            rec.state,
                            Some(format!("QEMU runs but re-attaching failed: {e}")),
                        );
                    }
                }
            } else if vm.record().state == VmState::Running {
                let log = ferry_qemu::RunPaths::new(&dir).log;
                self.set_state(
                    &vm,
                    VmState::Crashed,
                    Some(format!(
                        "QEMU exited while ferryd was not running{}",
                        log_tail(&log)
                    )),
                );
            }
        }
    }

    /// Starts QEMU for a defined (not running) VM.
    pub async fn start(self: &Arc<Self>, vm: &Arc<Vm>) -> Result<(), VmError> {
        self.start_with(vm, LaunchOptions::default()).await
    }

    /// Starts QEMU for a defined VM as the destination of a live migration
    /// (`-incoming defer`), enables post-copy if asked, and listens for the
    /// migration stream on `ip` at a free port; returns the URI
    /// (`tcp:ip:port`) the source migrates to.
    pub async fn start_incoming(
        self: &Arc<Self>,
        vm: &Arc<Vm>,
        ip: std::net::IpAddr,
        postcopy: bool,
    ) -> Result<String, VmError> {
        let opts = LaunchOptions {
            incoming: Some("defer".into()),
            ..LaunchOptions::default()
        };
        self.start_with(vm, opts).await?;
        let other = |msg: String| VmError::Other {
            vm: vm.name.clone(),
            msg,
        };
        let port = std::net::TcpListener::bind((ip, 0))
            .and_then(|l| l.local_addr())
            .map_err(|e| other(format!("no free port on {ip} for the migration: {e}")))?
            .port();
        let uri = match ip {
            std::net::IpAddr::V4(a) => format!("tcp:{a}:{port}"),
            std::net::IpAddr::V6(a) => format!("tcp:[{a}]:{port}"),
        };
        let (qmp, _) = self
            .control(vm)
            .await
            .ok_or_else(|| other("QEMU exited at start".into()))?;
        ferry_qemu::migration::listen(&qmp, &uri, postcopy)
            .await
            .map_err(|err| VmError::Qemu {
                vm: vm.name.clone(),
                err,
            })?;
        Ok(uri)
    }

    async fn start_with(
        self: &Arc<Self>,
        vm: &Arc<Vm>,
        opts: LaunchOptions,
    ) -> Result<(), VmError> {
        let mut slot = vm.slot.lock().await;
        if slot.deleted {
            return Err(VmError::NotFound(vm.name.clone()));
        }
        if let Some(p) = slot.process.as_mut() {
            if !p.has_exited() {
                return Err(VmError::Conflict(format!(
                    "VM {} is already running (pid {})",
                    vm.name,
                    p.pid()
                )));
            }
            slot.process = None;
            vm.set_live(None);
        }
        let rec = vm.record();
        let (me, rec2, uuid) = (self.clone(), rec.clone(), vm.uuid);
        tokio::task::spawn_blocking(move || me.ensure_exports(&rec2, &uuid))
            .await
            .map_err(|e| VmError::Other {
                vm: vm.name.clone(),
                msg: e.to_string(),
            })??;
        let remote = remote::ensure(&self.peers, &rec.definition, &vm.uuid).await?;
        let spec = self.spec_of(&rec, &vm.uuid, Some(&remote))?;
        self.remove_relocation_exports(&vm.uuid);
        self.profile_boot(&rec.definition);
        let p = VmProcess::start(&spec, self.run_dir(&vm.uuid), opts)
            .await
            .map_err(|err| VmError::Qemu {
                vm: vm.name.clone(),
                err,
            })?;
        tracing::info!("started VM {} (pid {})", vm.name, p.pid());
        self.adopt(vm, &mut slot, p);
        self.set_state(vm, VmState::Running, None);
        Ok(())
    }

    /// Graceful stop (guest agent, then ACPI), then kill after `timeout`.
    pub async fn stop(&self, vm: &Vm, timeout: Duration) -> Result<StopOutcome, VmError> {
        let mut slot = vm.slot.lock().await;
        let Some(p) = slot.process.as_mut() else {
            return Err(VmError::Conflict(format!("VM {} is not running", vm.name)));
        };
        let outcome = p.stop(timeout).await.map_err(|err| VmError::Qemu {
            vm: vm.name.clone(),
            err,
        })?;
        slot.process = None;
        vm.set_live(None);
        let how = match outcome {
            StopOutcome::GuestAgent => "the guest agent shut the guest down",
            StopOutcome::Acpi => "the guest shut down on the ACPI power button",
            StopOutcome::Killed => "graceful shutdown timed out; QEMU was killed",
            StopOutcome::AlreadyExited => "QEMU had already exited",
        };
        tracing::info!("stopped VM {}: {how}", vm.name);
        self.set_state(vm, VmState::Stopped, Some(format!("stopped: {how}")));
        Ok(outcome)
    }

    /// Kills QEMU at once.
    pub async fn kill(&self, vm: &Vm) -> Result<(), VmError> {
        let mut slot = vm.slot.lock().await;
        let Some(p) = slot.process.as_mut() else {
            return Err(VmError::Conflict(format!("VM {} is not running", vm.name)));
        };
        p.kill().map_err(|err| VmError::Qemu {
            vm: vm.name.clone(),
            err,
        })?;
        slot.process = None;
        vm.set_live(None);
        tracing::info!("killed VM {}", vm.name);
        self.set_state(vm, VmState::Stopped, Some("killed on request".into()));
        Ok(())
    }

    /// Pauses (`pause: true`) or resumes the vCPUs.
    pub async fn pause(&self, vm: &Vm, pause: bool) -> Result<(), VmError> {
        let slot = vm.slot.lock().await;
        let Some(p) = slot.process.as_ref() else {
            return Err(VmError::Conflict(format!("VM {} is not running", vm.name)));
        };
        let r = if pause {
            p.pause().await
        } else {
            p.resume().await
        };
        r.map_err(|err| VmError::Qemu {
            vm: vm.name.clone(),
            err,
        })
    }

    /// Deletes a VM that does not run: its internal exports, run directory
    /// and record. Never its volumes.
    pub async fn delete(self: &Arc<Self>, vm: &Arc<Vm>) -> Result<(), VmError> {
        let mut slot = vm.slot.lock().await;
        if slot.deleted {
            return Err(VmError::NotFound(vm.name.clone()));
        }
        if let Some(p) = slot.process.as_mut() {
            if !p.has_exited() {
                return Err(VmError::Conflict(format!(
                    "VM {} is running (pid {}); stop it first; nothing was deleted",
                    vm.name,
                    p.pid()
                )));
            }
            slot.process = None;
            vm.set_live(None);
        } else if let Some(pid) = VmProcess::running_pid(self.run_dir(&vm.uuid)) {
            // Its QEMU outlived a ferryd that has not re-attached to it
            // (yet): deleting the definition would orphan the process.
            return Err(VmError::Conflict(format!(
                "VM {}: its QEMU (pid {pid}) runs but this ferryd is not attached to it; nothing was deleted",
                vm.name
            )));
        }
        let (me, v) = (self.clone(), vm.clone());
        tokio::task::spawn_blocking(move || me.remove_files(&v))
            .await
            .map_err(|e| VmError::Other {
                vm: vm.name.clone(),
                msg: e.to_string(),
            })??;
        slot.deleted = true;
        lock(&self.table).remove(&vm.uuid);
        for l in remote::remove(&self.peers, &vm.record().definition, &vm.uuid).await {
            tracing::warn!("VM {}: {l}", vm.name);
        }
        tracing::info!("deleted VM {} ({})", vm.name, vm.uuid);
        Ok(())
    }

    fn remove_files(&self, vm: &Vm) -> Result<(), VmError> {
        self.remove_relocation_exports(&vm.uuid);
        let n = vm.record().definition.disks.len();
        for i in 0..n {
            match self.exports.remove(&export_name(&vm.uuid, &disk_id(i))) {
                Ok(()) | Err(ExportError::NotFound(_)) => {}
                Err(e) => {
                    return Err(VmError::Other {
                        vm: vm.name.clone(),
                        msg: format!("cannot remove its export: {e}; the VM was not deleted"),
                    });
                }
            }
        }
        let path = self.record_path(&vm.uuid);
        std::fs::remove_file(&path).map_err(|e| VmError::Other {
            vm: vm.name.clone(),
            msg: format!(
                "cannot remove {}: {e}; its exports were removed",
                path.display()
            ),
        })?;
        if let Ok(d) = std::fs::File::open(&self.defs) {
            let _ = d.sync_all();
        }
        let _ = std::fs::remove_dir_all(self.run_dir(&vm.uuid));
        Ok(())
    }

    /// Leaves every VM running and forgets its process (clean shutdown).
    pub fn detach_all(&self) -> usize {
        let mut n = 0;
        for vm in self.list() {
            if let Ok(mut slot) = vm.slot.try_lock()
                && let Some(p) = slot.process.take()
            {
                p.detach();
                n += 1;
            }
        }
        n
    }
}

/// `: <last lines of qemu.log>` when it says anything.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(300);
    let tail = String::from_utf8_lossy(&text[start..]).trim().to_string();
    if tail.is_empty() {
        String::new()
    } else {
        format!(": {tail}")
    }
}

impl Vms {
    /// The QMP client and, when the VM has a guest-agent channel, the agent
    /// client of a running VM (`None` when it does not run). Clones share
    /// the process's connections. Waits for a life-cycle action under way.
    pub async fn control(&self, vm: &Vm) -> Option<(QmpClient, Option<ferry_qemu::QgaClient>)> {
        let slot = vm.slot.lock().await;
        let p = slot.process.as_ref()?;
        Some((p.qmp().clone(), p.qga().ok()))
    }
}

impl Vm {
    /// The VM's definition as stored (uuid and accel filled in).
    pub fn definition(&self) -> VmDefinition {
        self.record().definition
    }
}
