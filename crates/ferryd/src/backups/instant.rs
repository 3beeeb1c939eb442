//! Instant restore (`backup.instant_restore`, flow 5 of DESIGN.md): the VM
//! runs straight from its backup, then moves to primary storage with no
//! downtime.
//!
//! # Staging volumes
//! One lazy pool volume per disk, `<name>-<disk>-staging`, whose
//! [`ChunkSource`] is the disk in the backup repository (a
//! [`ferry_backup::DiskReader`]): a chunk present in staging is served from
//! there; a missing one is fetched from the backup, stored, then served
//! (copy-on-read). The VM's writes land in staging like in any volume, so
//! they are as durable as the pool's. Each staging volume has a *record*
//! in `<data>/instant-restore.json` (mode 0600): repository location, id
//! and key-file path (never the key), backup, disk and the prefetch order.
//! The record is written before the volume is created, and at start-up
//! [`Staging::load`] re-attaches the source and restarts the hydrator of
//! every record, so a `kill -9` of ferryd loses no staged chunk and no
//! guest write; QEMU's NBD reconnect rides out the restart.
//!
//! # Prefetch
//! A hydrator per staging volume fetches, in this order: the chunks of
//! the VM's boot profile (recorded by the pool when the VM started and
//! stored with the backup), then the backup's data chunks in ascending
//! order — the order in which the relocation's mirror reads them — then
//! anything left. Reads of chunks not yet staged are *stalls* (on-demand
//! fetches); the source counts them apart from the hydrator's prefetches.
//!
//! # Steps (each journaled)
//! 1. `stage` — the staging volumes and their records (retried; undo
//!    deletes them, unless a VM uses them: then they hold its writes and
//!    are kept).
//! 2. `boot` — defines the VM on the staging volumes (new UUID) and starts
//!    it, before any data is copied; measures the time to the first guest
//!    output (serial console) and to boot complete (the guest agent
//!    answers). Retried (an existing VM of that name on exactly these
//!    volumes is taken as done). Undo deletes the VM only if it never ran.
//! 3. `profile prefetch` — waits until the profile's chunks are staged.
//! 4. `relocate <disk>` per disk — a new volume `<name>-<disk>`, QEMU
//!    `blockdev-mirror` (sync full) from the staging export to it, pivot,
//!    then the VM's definition names the new volume
//!    ([`crate::vms::relocate`]). Retried: a mirror an interrupted run left
//!    is cancelled and started again; a pivot already made is recognised.
//!    A failed relocation leaves the VM running on staging, never
//!    discarding its writes; running the same restore again resumes it.
//! 5. `clean up` — stops the hydrators and deletes the staging volumes
//!    and their records; its result is the restore's report.
//!
//! # Onto another host
//! With `to` a peer, staging stays here (the host holding the repository)
//! and the VM runs on the peer: `boot` defines it there with each disk
//! `{"host": <this host as the peer names it>, "volume": <staging>}` (the
//! peer reads it over NBD/TCP) and starts it; `relocate <disk>` asks the
//! peer to relocate the disk into its own pool (`POST
//! /v1/vms/{id}/relocate`, [`crate::vms::relocate_op`], keyed by this
//! operation and disk so a retry after a restart follows the same one) and
//! follows it; `clean up` checks the peer's definition, then removes the
//! exports the peer read staging through. Stage's undo asks the peer and
//! keeps every staging volume its VM still uses.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_api::{VmDefinition, VmDisk, VmDiskSpec, VmState};
use ferry_backup::{DiskReader, Key, Repository};
use ferry_ops::{BoxFuture, Manager, Plan, Recovery, Step, StepContext, StepError};
use ferry_pool::{ChunkSource, Extent, ExtentKind, Hydrator, HydratorOptions, Pool};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{Backups, chain};
use crate::config::write_atomic;
use crate::daemon::App;

/// The operation kind.
pub const INSTANT_RESTORE: &str = "backup.instant_restore";

/// The log line holding the JSON report starts with this.
pub const REPORT_PREFIX: &str = "report: ";

/// How long the VM may take to boot (TCG guests on a loaded host are slow).
const BOOT_TIMEOUT: Duration = Duration::from_secs(900);
/// How long a relocation may wait for its mirror to be ready or pivot.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(3600);

/// One disk of an instant restore.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InstantDisk {
    /// Device in the backup (`vda`).
    pub device: String,
    /// The staging (lazy) volume.
    pub staging: String,
    /// The volume the disk is relocated to.
    pub target: String,
    pub size: u64,
    /// The backup's read profile of this disk: byte ranges, first-read
    /// order.
    #[serde(default)]
    pub profile: Vec<[u64; 2]>,
}

/// The journaled parameters of `backup.instant_restore`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstantParams {
    /// Repository name, location, id and key file (at acceptance).
    pub repo: String,
    pub location: String,
    pub repo_id: String,
    #[serde(default)]
    pub key_file: Option<String>,
    pub backup: String,
    /// The new VM's name.
    pub name: String,
    pub disks: Vec<InstantDisk>,
    /// The backed-up definition (disks are replaced).
    pub definition: VmDefinition,
    /// Prefetch the profile first (false: only the relocation order).
    pub prefetch_profile: bool,
    /// The host the VM runs on and is relocated to: a registered peer
    /// (none: this host). Staging stays here.
    #[serde(default)]
    pub to: Option<String>,
    /// This host's name in `to`'s peer list: the VM's disks there are
    /// `{"host": staging_host, "volume": <staging>}`.
    #[serde(default)]
    pub staging_host: Option<String>,
}

impl InstantParams {
    /// The peer the VM runs on, with this host's name there.
    fn remote(&self) -> Option<(&str, &str)> {
        match (&self.to, &self.staging_host) {
            (Some(t), Some(h)) => Some((t, h)),
            _ => None,
        }
    }
}

/// How long a peer may stay unreachable while this host follows its
/// relocation.
const PEER_PATIENCE: Duration = Duration::from_secs(600);

/// Where one staging volume's chunks come from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StagingRecord {
    pub volume: String,
    /// The restored VM's name.
    pub vm: String,
    pub location: String,
    pub repo_id: String,
    #[serde(default)]
    pub key_file: Option<String>,
    pub backup: String,
    pub disk: String,
    pub size: u64,
    /// Chunk ranges to prefetch first, in order.
    pub priority: Vec<[u64; 2]>,
}

/// A backup disk as a chunk source that counts on-demand fetches (reads
/// from any thread but a hydrator's) apart from prefetches.
pub struct CountingSource {
    inner: DiskReader,
    on_demand: AtomicU64,
    prefetched: AtomicU64,
}

impl CountingSource {
    /// (on-demand fetches, prefetched chunks) since it was attached.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.on_demand.load(Ordering::Relaxed),
            self.prefetched.load(Ordering::Relaxed),
        )
    }
}

impl ChunkSource for CountingSource {
    fn size(&self) -> u64 {
        ChunkSource::size(&self.inner)
    }

    fn read_at(&self, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let r = ChunkSource::read_at(&self.inner, off, buf);
        if r.is_ok() {
            let hydrator = std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with("hydrate-"));
            if hydrator {
                self.prefetched.fetch_add(1, Ordering::Relaxed);
            } else {
                self.on_demand.fetch_add(1, Ordering::Relaxed);
            }
        }
        r
    }

    fn allocation(&self, off: u64, len: u64) -> Option<Vec<Extent>> {
        self.inner.allocation(off, len)
    }
}

struct Live {
    source: Arc<CountingSource>,
    hydrator: Option<Hydrator>,
}

/// The staging volumes of this host.
pub struct Staging {
    file: PathBuf,
    pool: Pool,
    records: Mutex<BTreeMap<String, StagingRecord>>,
    live: Mutex<HashMap<String, Live>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn open_reader(r: &StagingRecord) -> Result<DiskReader, String> {
    let key = match &r.key_file {
        Some(f) => Some(Key::load(Path::new(f)).map_err(|e| format!("key file {f}: {e}"))?),
        None => None,
    };
    let repo = Repository::open(&r.location, key).map_err(|e| chain(&e))?;
    if repo.config().id != r.repo_id {
        return Err(format!(
            "the repository at {} now has id {}, not {}",
            r.location,
            repo.config().id,
            r.repo_id
        ));
    }
    repo.open_disk(&r.backup, &r.disk).map_err(|e| chain(&e))
}

fn hydrator_options(r: &StagingRecord) -> HydratorOptions {
    HydratorOptions {
        priority: r.priority.iter().map(|x| x[0]..x[1]).collect(),
        ..HydratorOptions::default()
    }
}

impl Staging {
    /// Reads the records, re-attaches the sources, restarts the hydrators.
    /// A repository that cannot be opened now leaves its volumes detached
    /// (the restore's next step attaches them again, or says why not).
    pub fn load(pool: Pool, file: PathBuf) -> anyhow::Result<Staging> {
        let records: BTreeMap<String, StagingRecord> = match std::fs::read(&file) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| anyhow::anyhow!("{} is damaged: {e}", file.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => anyhow::bail!("cannot read {}: {e}", file.display()),
        };
        let me = Staging {
            file,
            pool,
            records: Mutex::new(BTreeMap::new()),
            live: Mutex::new(HashMap::new()),
        };
        let mut kept = BTreeMap::new();
        for (name, rec) in records {
            match me.pool.volume(&name) {
                Ok(_) => {
                    if let Err(e) = me.attach(&rec) {
                        tracing::warn!("staging volume {name}: {e}");
                    }
                }
                Err(e) if e.kind() == ferry_pool::ErrorKind::NotFound => {
                    tracing::info!("dropping the staging record of missing volume {name}");
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            kept.insert(name, rec);
        }
        me.persist(&kept)?;
        *lock(&me.records) = kept;
        Ok(me)
    }

    fn persist(&self, records: &BTreeMap<String, StagingRecord>) -> anyhow::Result<()> {
        let data = serde_json::to_vec_pretty(records)?;
        write_atomic(&self.file, &data, 0o600)
    }

    /// Attaches the source and starts the hydrator of an existing staging
    /// volume unless they run. Blocking.
    fn attach(&self, rec: &StagingRecord) -> Result<(), String> {
        if lock(&self.live).contains_key(&rec.volume) {
            return Ok(());
        }
        let v = self.pool.volume(&rec.volume).map_err(|e| e.to_string())?;
        if !v.is_lazy() {
            return Ok(());
        }
        let source = Arc::new(CountingSource {
            inner: open_reader(rec)?,
            on_demand: AtomicU64::new(0),
            prefetched: AtomicU64::new(0),
        });
        v.attach_source(source.clone()).map_err(|e| e.to_string())?;
        tracing::info!(
            "staging volume {}: hydrating from {}",
            rec.volume,
            rec.backup
        );
        let hydrator = Some(Hydrator::start(&v, hydrator_options(rec)));
        lock(&self.live).insert(rec.volume.clone(), Live { source, hydrator });
        Ok(())
    }

    /// Makes sure staging volume `rec.volume` exists with its record,
    /// source and hydrator. Blocking.
    pub fn ensure(&self, rec: &StagingRecord) -> Result<(), String> {
        {
            let mut records = lock(&self.records);
            match records.get(&rec.volume) {
                Some(r) if r.backup == rec.backup && r.disk == rec.disk => {}
                Some(r) => {
                    return Err(format!(
                        "staging volume {} belongs to another restore (backup {})",
                        rec.volume, r.backup
                    ));
                }
                None => {
                    if self.pool.volume(&rec.volume).is_ok() {
                        return Err(format!(
                            "volume {} exists already and is not a staging volume",
                            rec.volume
                        ));
                    }
                    let before = records.clone();
                    records.insert(rec.volume.clone(), rec.clone());
                    if let Err(e) = self.persist(&records) {
                        *records = before;
                        return Err(format!("{e:#}"));
                    }
                }
            }
        }
        match self.pool.volume(&rec.volume) {
            Ok(_) => self.attach(rec),
            Err(e) if e.kind() == ferry_pool::ErrorKind::NotFound => {
                let source = Arc::new(CountingSource {
                    inner: open_reader(rec)?,
                    on_demand: AtomicU64::new(0),
                    prefetched: AtomicU64::new(0),
                });
                let v = self
                    .pool
                    .create_lazy(&rec.volume, source.clone())
                    .map_err(|e| format!("creating staging volume {}: {e}", rec.volume))?;
                let hydrator = Some(Hydrator::start(&v, hydrator_options(rec)));
                lock(&self.live).insert(rec.volume.clone(), Live { source, hydrator });
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// (on-demand fetches, prefetched chunks) of a staging volume since
    /// its source was attached (in this ferryd process).
    pub fn counts(&self, volume: &str) -> (u64, u64) {
        lock(&self.live)
            .get(volume)
            .map(|l| l.source.counts())
            .unwrap_or_default()
    }

    /// The same counts summed over the staging volumes of `disks`.
    pub fn total_counts(&self, disks: &[InstantDisk]) -> (u64, u64) {
        disks.iter().fold((0, 0), |(s, p), d| {
            let (a, b) = self.counts(&d.staging);
            (s + a, p + b)
        })
    }

    /// Stops the hydrator, deletes the staging volume and its record.
    /// Blocking.
    pub fn remove(&self, volume: &str) -> Result<(), String> {
        if let Some(l) = lock(&self.live).remove(volume) {
            drop(l.hydrator);
        }
        match self.pool.delete_volume(volume) {
            Ok(()) => {}
            Err(e) if e.kind() == ferry_pool::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("deleting staging volume {volume}: {e}")),
        }
        let mut records = lock(&self.records);
        if records.remove(volume).is_some()
            && let Err(e) = self.persist(&records)
        {
            return Err(format!("{e:#}"));
        }
        Ok(())
    }

    /// Staging volume names with a record.
    pub fn volumes(&self) -> Vec<String> {
        lock(&self.records).keys().cloned().collect()
    }
}

/// Chunk ranges: the profile's first (when asked), then the backup's data
/// extents in ascending order.
pub fn prefetch_order(
    profile: &[[u64; 2]],
    data: &[Extent],
    chunk: u64,
    with_profile: bool,
) -> Vec<[u64; 2]> {
    let mut out: Vec<Range<u64>> = Vec::new();
    let mut push = |r: Range<u64>| {
        if r.is_empty() {
            return;
        }
        match out.last_mut() {
            Some(l) if l.end == r.start => l.end = r.end,
            _ => out.push(r),
        }
    };
    if with_profile {
        for p in profile {
            push(p[0] / chunk..p[1].div_ceil(chunk));
        }
    }
    for e in data.iter().filter(|e| e.kind == ExtentKind::Data) {
        push(e.offset / chunk..(e.offset + e.length).div_ceil(chunk));
    }
    out.into_iter().map(|r| [r.start, r.end]).collect()
}

/// Registers the operation kind and loads the staging volumes (sources
/// re-attached, hydrators restarted) before operations are recovered.
pub fn register(m: &Arc<Manager<App>>, b: &Arc<Backups>) -> anyhow::Result<()> {
    let staging = Arc::new(Staging::load(
        m.app().pool.clone(),
        b.root.join("instant-restore.json"),
    )?);
    let b = b.clone();
    m.register(INSTANT_RESTORE, move |p| {
        plan(b.clone(), staging.clone(), p)
    });
    Ok(())
}

fn plan(b: Arc<Backups>, s: Arc<Staging>, params: &Value) -> Result<Plan<App>, String> {
    let p: InstantParams = serde_json::from_value(params.clone()).map_err(|e| e.to_string())?;
    definition(&p, |d| d.staging.clone())?;
    let bytes: u64 = p.disks.iter().map(|d| d.size).sum::<u64>().max(1);
    let profile: u64 = p
        .disks
        .iter()
        .flat_map(|d| d.profile.iter().map(|r| r[1] - r[0]))
        .sum();
    let mut steps: Vec<(Box<dyn Step<App>>, f64)> = vec![
        (
            Box::new(Stage {
                b: b.clone(),
                s: s.clone(),
                p: p.clone(),
            }),
            bytes as f64 * 0.01,
        ),
        (
            Box::new(Boot {
                b: b.clone(),
                s: s.clone(),
                p: p.clone(),
            }),
            bytes as f64 * 0.05,
        ),
        (
            Box::new(ProfilePrefetch {
                b: b.clone(),
                p: p.clone(),
            }),
            (profile as f64).max(bytes as f64 * 0.01),
        ),
    ];
    for (i, d) in p.disks.iter().enumerate() {
        steps.push((
            Box::new(Relocate {
                b: b.clone(),
                p: p.clone(),
                index: i,
                name: format!("relocate {}", d.device),
            }),
            d.size.max(1) as f64,
        ));
    }
    steps.push((
        Box::new(CleanUp { b, s, p: p.clone() }),
        bytes as f64 * 0.01,
    ));
    Ok(Plan::new(
        &format!(
            "instant restore of backup {} from repository {} as VM {}",
            p.backup, p.repo, p.name
        ),
        steps,
    ))
}

/// The restored VM's definition with each disk on `volume(disk)`.
pub fn definition(
    p: &InstantParams,
    volume: impl Fn(&InstantDisk) -> String,
) -> Result<VmDefinition, String> {
    let mut def = p.definition.clone();
    def.name = p.name.clone();
    def.uuid = None;
    let mut disks = Vec::new();
    for (i, d) in def.disks.iter().enumerate() {
        let device = format!("vd{}", char::from(b'a' + i as u8));
        let x = p
            .disks
            .iter()
            .find(|x| x.device == device)
            .ok_or_else(|| format!("backup {} holds no disk {device}", p.backup))?;
        disks.push(VmDisk::Spec(VmDiskSpec {
            volume: Some(volume(x)),
            read_only: d.spec().read_only,
            ..VmDiskSpec::default()
        }));
    }
    def.disks = disks;
    Ok(def)
}

/// The restored VM's definition for peer `p.to`: each disk is this host's
/// staging volume, reached over NBD/TCP.
pub fn remote_definition(p: &InstantParams, me: &str) -> Result<VmDefinition, String> {
    let mut def = definition(p, |d| d.staging.clone())?;
    for d in &mut def.disks {
        let mut spec = d.spec();
        spec.host = Some(me.to_string());
        *d = VmDisk::Spec(spec);
    }
    Ok(def)
}

/// True when `def` (of the VM on the peer) has each disk on its staging
/// volume here or on its target volume there.
fn remote_is_mine(p: &InstantParams, me: &str, def: &VmDefinition) -> bool {
    def.disks.len() == p.disks.len()
        && def.disks.iter().zip(&p.disks).all(|(v, x)| {
            v.remote() == Some((me, x.staging.as_str())) || v.volume() == Some(x.target.as_str())
        })
}

fn peer_of(b: &Backups, to: &str) -> Result<crate::peers::PeerClient, StepError> {
    b.snaps.peers.client(to).map_err(|e| {
        StepError::failed(format!("host {to}: {e}; the staging volumes here are kept"))
    })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, StepError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(StepError::failed)?
        .map_err(StepError::Failed)
}

// ---------------------------------------------------------------- stage

struct Stage {
    b: Arc<Backups>,
    s: Arc<Staging>,
    p: InstantParams,
}

impl Step<App> for Stage {
    fn name(&self) -> &str {
        "stage"
    }

    fn recovery(&self) -> Recovery {
        Recovery::Retry
    }

    fn intent(&self, _cx: &StepContext<App>) -> Result<Value, StepError> {
        Ok(json!({ "volumes": self.p.disks.iter().map(|d| &d.staging).collect::<Vec<_>>() }))
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let (s, p) = (self.s.clone(), self.p.clone());
            let chunk = cx.app.pool.chunk_size();
            let t0 = Instant::now();
            let made = blocking(move || {
                let mut out = Vec::new();
                for d in &p.disks {
                    let mut rec = StagingRecord {
                        volume: d.staging.clone(),
                        vm: p.name.clone(),
                        location: p.location.clone(),
                        repo_id: p.repo_id.clone(),
                        key_file: p.key_file.clone(),
                        backup: p.backup.clone(),
                        disk: d.device.clone(),
                        size: d.size,
                        priority: Vec::new(),
                    };
                    let reader = open_reader(&rec)?;
                    let data = reader.allocation(0, d.size).unwrap_or_default();
                    rec.priority = prefetch_order(&d.profile, &data, chunk, p.prefetch_profile);
                    let data_chunks: u64 = data
                        .iter()
                        .filter(|e| e.kind == ExtentKind::Data)
                        .map(|e| e.length.div_ceil(chunk))
                        .sum();
                    s.ensure(&rec)?;
                    out.push((d.staging.clone(), data_chunks));
                }
                Ok(out)
            })
            .await?;
            for (v, n) in &made {
                cx.log(format!(
                    "staging volume {v}: sourced from backup {}, {n} data chunks to prefetch",
                    self.p.backup
                ));
            }
            Ok(json!({ "stage_s": t0.elapsed().as_secs_f64() }))
        })
    }

    fn undo<'a>(
        &'a self,
        cx: &'a StepContext<App>,
        _intent: &'a Value,
        _result: Option<&'a Value>,
    ) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            // The VM on the peer may run from the staging volumes: they
            // are kept unless the peer says it has no such VM.
            let mut remote_user = None;
            if let Some((to, me)) = self.p.remote() {
                let peer = peer_of(&self.b, to)?;
                match peer
                    .get::<ferry_api::VmInfo>(&format!("/v1/vms/{}", self.p.name))
                    .await
                {
                    Ok(info) => {
                        remote_user = Some((to, me, info.definition));
                    }
                    Err(crate::peers::PeerError::Failed { status: 404, .. }) => {}
                    Err(e) => {
                        return Err(StepError::failed(format!(
                            "host {to} did not say whether VM {} uses the staging volumes ({e}); they are kept",
                            self.p.name
                        )));
                    }
                }
            }
            for d in &self.p.disks {
                let user = self.b.vms.user_of_volume(&d.staging).or_else(|| {
                    remote_user.as_ref().and_then(|(to, me, def)| {
                        def.disks
                            .iter()
                            .any(|x| x.remote() == Some((*me, d.staging.as_str())))
                            .then(|| format!("{} on {to}", self.p.name))
                    })
                });
                if let Some(vm) = user {
                    cx.log(format!(
                        "staging volume {} is a disk of VM {vm} and holds its writes: kept (run the restore again to relocate it)",
                        d.staging
                    ));
                    continue;
                }
                let (s, v) = (self.s.clone(), d.staging.clone());
                blocking(move || s.remove(&v)).await?;
                cx.log(format!("deleted staging volume {}", d.staging));
            }
            Ok(())
        })
    }
}

// ----------------------------------------------------------------- boot

struct Boot {
    b: Arc<Backups>,
    s: Arc<Staging>,
    p: InstantParams,
}

fn disk_volumes(def: &VmDefinition) -> Vec<Option<String>> {
    def.disks
        .iter()
        .map(|d| d.volume().map(str::to_string))
        .collect()
}

impl Step<App> for Boot {
    fn name(&self) -> &str {
        "boot"
    }

    fn recovery(&self) -> Recovery {
        Recovery::Retry
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            if let Some((to, me)) = self.p.remote() {
                return self.boot_remote(cx, to, me).await;
            }
            let staged = definition(&self.p, |d| d.staging.clone()).map_err(StepError::Failed)?;
            let vms = self.b.vms.clone();
            let vm = match vms.find(&self.p.name) {
                Ok(vm) => {
                    let have = disk_volumes(&vm.definition());
                    let ok = have.iter().zip(&self.p.disks).all(|(h, d)| {
                        h.as_deref() == Some(d.staging.as_str())
                            || h.as_deref() == Some(d.target.as_str())
                    }) && have.len() == self.p.disks.len();
                    if !ok {
                        return Err(StepError::failed(format!(
                            "a VM named {} exists already on other volumes",
                            self.p.name
                        )));
                    }
                    vm
                }
                Err(_) => {
                    let v2 = vms.clone();
                    tokio::task::spawn_blocking(move || v2.define(staged))
                        .await
                        .map_err(StepError::failed)?
                        .map_err(StepError::failed)?
                }
            };
            cx.log(format!(
                "VM {} ({}) on the staging volumes",
                vm.name, vm.uuid
            ));
            if running(&vms, &vm).await {
                cx.log("the VM runs already (an interrupted run started it)");
                return Ok(json!({ "vm": vm.name, "uuid": vm.uuid.to_string() }));
            }
            let t0 = Instant::now();
            vms.start(&vm).await.map_err(StepError::failed)?;
            let started_s = t0.elapsed().as_secs_f64();
            cx.log(format!(
                "VM started in {started_s:.2} s; waiting for it to boot"
            ));
            cx.set_fraction(0.2);
            let serial = vms.run_dir(&vm.uuid).join("serial.log");
            let agent = vm.definition().guest_agent;
            // The first output is watched apart: an agent ping may block.
            let watcher = tokio::spawn(async move {
                loop {
                    if std::fs::metadata(&serial).is_ok_and(|m| m.len() > 0) {
                        return t0.elapsed().as_secs_f64();
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            });
            let mut first_output = None;
            let mut booted = None;
            let deadline = t0 + BOOT_TIMEOUT;
            while Instant::now() < deadline {
                if first_output.is_none() && watcher.is_finished() {
                    first_output = Some(0.0);
                    cx.set_fraction(0.5);
                }
                if !agent {
                    if first_output.is_some() {
                        break;
                    }
                } else if let Some((_, Some(qga))) = vms.control(&vm).await
                    && tokio::time::timeout(Duration::from_secs(3), qga.ping())
                        .await
                        .is_ok_and(|r| r.is_ok())
                {
                    booted = Some(t0.elapsed().as_secs_f64());
                    break;
                }
                if vms.control(&vm).await.is_none() {
                    return Err(StepError::failed(format!(
                        "VM {} stopped while booting from staging; its volumes are kept",
                        vm.name
                    )));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let (stalls, prefetched) = self.s.total_counts(&self.p.disks);
            first_output = if watcher.is_finished() {
                watcher.await.ok()
            } else {
                watcher.abort();
                None
            };
            cx.log(format!(
                "first guest output after {}, boot complete after {}; {stalls} on-demand fetches (stalls) and {prefetched} prefetched chunks so far",
                secs(first_output),
                secs(booted)
            ));
            Ok(json!({
                "vm": vm.name,
                "uuid": vm.uuid.to_string(),
                "start_s": started_s,
                "first_output_s": first_output,
                "boot_complete_s": booted,
                "boot_stalls": stalls,
                "boot_prefetched": prefetched,
            }))
        })
    }

    fn undo<'a>(
        &'a self,
        cx: &'a StepContext<App>,
        _intent: &'a Value,
        _result: Option<&'a Value>,
    ) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            if let Some((to, _)) = self.p.remote() {
                let peer = peer_of(&self.b, to)?;
                let path = format!("/v1/vms/{}", self.p.name);
                match peer.get::<ferry_api::VmInfo>(&path).await {
                    Ok(info) if info.state == VmState::Defined => {
                        peer.delete(&path).await.map_err(StepError::failed)?;
                        cx.log(format!("deleted VM {} on {to} (it never ran)", self.p.name));
                    }
                    Ok(info) => cx.log(format!(
                        "VM {} ran on {to} from the staging volumes here ({}): kept with them, nothing it wrote is lost",
                        self.p.name, info.state
                    )),
                    Err(crate::peers::PeerError::Failed { status: 404, .. }) => {}
                    Err(e) => return Err(StepError::failed(e)),
                }
                return Ok(());
            }
            if let Ok(vm) = self.b.vms.find(&self.p.name) {
                let info = self.b.vms.info(&vm).await;
                if info.state == VmState::Defined {
                    self.b.vms.delete(&vm).await.map_err(StepError::failed)?;
                    cx.log(format!("deleted VM {} (it never ran)", self.p.name));
                } else {
                    cx.log(format!(
                        "VM {} ran on the staging volumes ({}): kept with them, nothing it wrote is lost",
                        self.p.name, info.state
                    ));
                }
            }
            Ok(())
        })
    }
}

impl Boot {
    /// Defines the VM on peer `to` on the staging volumes here (reached
    /// over NBD/TCP as `me`'s volumes) and starts it there.
    async fn boot_remote(
        &self,
        cx: &StepContext<App>,
        to: &str,
        me: &str,
    ) -> Result<Value, StepError> {
        let peer = peer_of(&self.b, to)?;
        let path = format!("/v1/vms/{}", self.p.name);
        let info = match peer.get::<ferry_api::VmInfo>(&path).await {
            Ok(info) => {
                if !remote_is_mine(&self.p, me, &info.definition) {
                    return Err(StepError::failed(format!(
                        "a VM named {} exists already on {to} on other volumes",
                        self.p.name
                    )));
                }
                info
            }
            Err(crate::peers::PeerError::Failed { status: 404, .. }) => {
                let def = remote_definition(&self.p, me).map_err(StepError::Failed)?;
                peer.post::<_, ferry_api::VmInfo>("/v1/vms", &def)
                    .await
                    .map_err(|e| {
                        StepError::failed(format!(
                            "host {to} refused the VM on the staging volumes here: {e}"
                        ))
                    })?
            }
            Err(e) => return Err(StepError::failed(format!("host {to}: {e}"))),
        };
        cx.log(format!(
            "VM {} ({}) on {to}, its disks the staging volumes here (as host {me})",
            info.name, info.uuid
        ));
        if matches!(info.state, VmState::Running | VmState::Paused) {
            cx.log("the VM runs already (an interrupted run started it)");
            return Ok(json!({ "vm": info.name, "uuid": info.uuid, "host": to }));
        }
        let t0 = Instant::now();
        let info: ferry_api::VmInfo = peer
            .post(&format!("{path}/start"), &json!({}))
            .await
            .map_err(|e| StepError::failed(format!("starting VM {} on {to}: {e}", self.p.name)))?;
        let started_s = t0.elapsed().as_secs_f64();
        cx.log(format!(
            "VM started on {to} in {started_s:.2} s ({}); waiting for its first output",
            info.state
        ));
        cx.set_fraction(0.2);
        // The first output, as the peer reports its serial log's size.
        let mut first_output = None;
        let deadline = t0 + BOOT_TIMEOUT;
        while Instant::now() < deadline {
            match peer.get::<ferry_api::VmInfo>(&path).await {
                Ok(i) if i.serial_bytes > 0 => {
                    first_output = Some(t0.elapsed().as_secs_f64());
                    break;
                }
                Ok(i) if !matches!(i.state, VmState::Running | VmState::Paused) => {
                    return Err(StepError::failed(format!(
                        "VM {} stopped on {to} while booting from the staging volumes here ({}); they are kept",
                        self.p.name, i.state
                    )));
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("VM {} on {to}: {e}", self.p.name),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (stalls, prefetched) = self.s.total_counts(&self.p.disks);
        cx.log(format!(
            "first guest output on {to} after {}; {stalls} on-demand fetches (stalls) and {prefetched} prefetched chunks so far (boot completion is not watched from here)",
            secs(first_output)
        ));
        Ok(json!({
            "vm": info.name,
            "uuid": info.uuid,
            "host": to,
            "start_s": started_s,
            "first_output_s": first_output,
            "boot_complete_s": null,
            "boot_stalls": stalls,
            "boot_prefetched": prefetched,
        }))
    }
}

/// True when the VM runs. Right after a ferryd restart the VMs are
/// re-attached while recovered operations already run: a VM recorded as
/// running is waited for (up to a minute) rather than started twice.
async fn running(vms: &crate::vms::Vms, vm: &crate::vms::Vm) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if vms.control(vm).await.is_some() {
            return true;
        }
        let state = vms.info(vm).await.state;
        if !matches!(state, VmState::Running | VmState::Paused) || Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn secs(s: Option<f64>) -> String {
    s.map(|s| format!("{s:.2} s"))
        .unwrap_or_else(|| "(not measured)".into())
}

// ------------------------------------------------------ profile prefetch

struct ProfilePrefetch {
    b: Arc<Backups>,
    p: InstantParams,
}

impl Step<App> for ProfilePrefetch {
    fn name(&self) -> &str {
        "profile prefetch"
    }

    fn recovery(&self) -> Recovery {
        Recovery::Retry
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let chunk = cx.app.pool.chunk_size();
            let mut want: Vec<(String, Vec<u64>)> = Vec::new();
            if self.p.prefetch_profile {
                for d in &self.p.disks {
                    let cs: Vec<u64> = d
                        .profile
                        .iter()
                        .flat_map(|r| r[0] / chunk..r[1].div_ceil(chunk))
                        .collect();
                    want.push((d.staging.clone(), cs));
                }
            }
            let total: usize = want.iter().map(|w| w.1.len()).sum();
            if total == 0 {
                let why = if self.p.prefetch_profile {
                    "the backup holds no read profile"
                } else {
                    "profile prefetch was turned off"
                };
                cx.log(format!("no profile to prefetch: {why}"));
                return Ok(json!({ "profile_chunks": 0 }));
            }
            let t0 = Instant::now();
            loop {
                let mut present = 0;
                for (v, cs) in &want {
                    match cx.app.pool.volume(v) {
                        Ok(vol) => present += cs.iter().filter(|c| vol.is_present(**c)).count(),
                        // Relocated and cleaned up by an earlier run.
                        Err(_) => present += cs.len(),
                    }
                }
                cx.set_fraction(present as f64 / total as f64);
                if present == total {
                    break;
                }
                if self.p.to.is_none() && self.b.vms.find(&self.p.name).is_err() {
                    return Err(StepError::failed(format!("VM {} is gone", self.p.name)));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let s = t0.elapsed().as_secs_f64();
            cx.log(format!(
                "{total} profile chunks staged ({s:.2} s after boot)"
            ));
            Ok(json!({ "profile_chunks": total, "after_boot_s": s }))
        })
    }
}

// ------------------------------------------------------------- relocate

struct Relocate {
    b: Arc<Backups>,
    p: InstantParams,
    index: usize,
    name: String,
}

impl Step<App> for Relocate {
    fn name(&self) -> &str {
        &self.name
    }

    fn recovery(&self) -> Recovery {
        Recovery::Retry
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            if let Some((to, _)) = self.p.remote() {
                return self.relocate_remote(cx, to).await;
            }
            let d = &self.p.disks[self.index];
            let vm = self.b.vms.find(&self.p.name).map_err(StepError::failed)?;
            running(&self.b.vms, &vm).await;
            let (pool, target, size) = (cx.app.pool.clone(), d.target.clone(), d.size);
            let on_vm = disk_volumes(&vm.definition())
                .get(self.index)
                .cloned()
                .flatten();
            if on_vm.as_deref() != Some(d.target.as_str()) {
                blocking(move || match pool.volume(&target) {
                    Ok(_) => Ok(()),
                    Err(e) if e.kind() == ferry_pool::ErrorKind::NotFound => pool
                        .create_volume(&target, size)
                        .map(drop)
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                })
                .await?;
            }
            let (h, node) = (cx.progress.clone(), cx.node);
            let progress = move |done: u64, total: u64| {
                h.update(|t| t.set_fraction(node, done as f64 / total.max(1) as f64));
            };
            let t0 = Instant::now();
            // Cancelling drops the mirror's future: the job may run on in
            // QEMU, the disk stays on staging; a retry cancels the job.
            let r = tokio::select! {
                r = self.b.vms.relocate_disk(&vm, self.index, &d.target, &progress, MIRROR_TIMEOUT) => r,
                _ = cx.cancelled() => return Err(StepError::Cancelled),
            };
            let r = r.map_err(|e| {
                    StepError::Failed(format!(
                        "{e}; the VM keeps running on staging volume {} (nothing it wrote is lost); run the restore again to retry",
                        d.staging
                    ))
                })?;
            let secs = t0.elapsed().as_secs_f64();
            use crate::vms::relocate::Relocated;
            let v = match r {
                Relocated::AlreadyDone => {
                    cx.log(format!("disk {} is on {} already", d.device, d.target));
                    json!({ "volume": d.target, "bytes": 0 })
                }
                Relocated::RecordOnly => {
                    cx.log(format!(
                        "disk {}: the pivot to {} had happened; definition updated",
                        d.device, d.target
                    ));
                    json!({ "volume": d.target, "bytes": 0 })
                }
                Relocated::Mirrored { bytes } => {
                    let mbs = bytes as f64 / secs.max(1e-6) / 1e6;
                    cx.log(format!(
                        "disk {} relocated to volume {}: {bytes} bytes in {secs:.1} s ({mbs:.1} MB/s), no downtime",
                        d.device, d.target
                    ));
                    json!({ "volume": d.target, "bytes": bytes, "secs": secs, "mb_per_s": mbs })
                }
            };
            Ok(v)
        })
    }
}

impl Relocate {
    /// Asks peer `to` to relocate the disk (its `vm.relocate`, keyed by
    /// this operation and disk, so a retry after a restart follows the
    /// same one) and follows it, its progress as this step's.
    async fn relocate_remote(&self, cx: &StepContext<App>, to: &str) -> Result<Value, StepError> {
        let d = &self.p.disks[self.index];
        let peer = peer_of(&self.b, to)?;
        let keep = format!(
            "the VM keeps running on {to} from staging volume {} here (nothing it wrote is lost); run the restore again to retry",
            d.staging
        );
        let req = ferry_api::RelocateVm {
            disks: vec![ferry_api::RelocateDisk {
                index: self.index,
                volume: d.target.clone(),
                size: d.size,
            }],
            request: Some(format!("{}/{}", cx.op_id, d.device)),
        };
        let started: ferry_api::Started = peer
            .post(&format!("/v1/vms/{}/relocate", self.p.name), &req)
            .await
            .map_err(|e| {
                StepError::failed(format!(
                    "host {to} refused the relocation of disk {}: {e}; {keep}",
                    d.device
                ))
            })?;
        let id = started.operation;
        cx.log(format!(
            "host {to} relocates disk {} to its volume {}: its operation {id}",
            d.device, d.target
        ));
        let (h, node) = (cx.progress.clone(), cx.node);
        let wait = peer.wait_operation(&id, PEER_PATIENCE, |op| {
            if let Some(v) = &op.progress {
                h.update(|t| t.set_fraction(node, v.overall));
            }
        });
        let op = tokio::select! {
            r = wait => r.map_err(|e| StepError::failed(format!(
                "following the relocation on {to} (operation {id}): {e}; {keep}"
            )))?,
            _ = cx.cancelled() => {
                let _ = peer
                    .post::<_, Value>(&format!("/v1/operations/{id}/cancel"), &json!({}))
                    .await;
                let _ = peer.wait_operation(&id, PEER_PATIENCE, |_| {}).await;
                return Err(StepError::Cancelled);
            }
        };
        if op.state != ferry_api::OpState::Succeeded {
            return Err(StepError::Failed(format!(
                "the relocation of disk {} on {to} (operation {id}) {}: {}; {keep}",
                d.device,
                op.state.as_str(),
                op.error.unwrap_or_default()
            )));
        }
        let figures = op
            .log
            .iter()
            .find_map(|l| {
                l.msg
                    .strip_prefix(crate::vms::relocate_op::RELOCATED_PREFIX)
                    .and_then(|j| serde_json::from_str::<Value>(j).ok())
            })
            .unwrap_or_else(|| json!({ "volume": d.target, "bytes": 0 }));
        let bytes = figures["bytes"].as_u64().unwrap_or(0);
        let secs = figures["secs"].as_f64().unwrap_or(0.0);
        cx.log(format!(
            "disk {} relocated on {to} to volume {}: {bytes} bytes in {secs:.1} s ({:.1} MB/s), no downtime",
            d.device,
            d.target,
            figures["mb_per_s"].as_f64().unwrap_or(0.0)
        ));
        Ok(figures)
    }
}

// -------------------------------------------------------------- clean up

struct CleanUp {
    b: Arc<Backups>,
    s: Arc<Staging>,
    p: InstantParams,
}

impl Step<App> for CleanUp {
    fn name(&self) -> &str {
        "clean up"
    }

    fn recovery(&self) -> Recovery {
        Recovery::Retry
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            if let Some((to, me)) = self.p.remote() {
                let peer = peer_of(&self.b, to)?;
                let info: ferry_api::VmInfo =
                    peer.get(&format!("/v1/vms/{}", self.p.name))
                        .await
                        .map_err(|e| StepError::failed(format!("host {to}: {e}")))?;
                for (i, x) in info.definition.disks.iter().enumerate() {
                    if let Some((h, v)) = x.remote()
                        && h == me
                        && self.p.disks.iter().any(|d| d.staging == v)
                    {
                        return Err(StepError::failed(format!(
                            "staging volume {v} is still disk {i} of VM {} on {to}",
                            self.p.name
                        )));
                    }
                }
            }
            let (stalls, prefetched) = self.s.total_counts(&self.p.disks);
            for d in &self.p.disks {
                if let Some(vm) = self.b.vms.user_of_volume(&d.staging) {
                    return Err(StepError::failed(format!(
                        "staging volume {} is still a disk of VM {vm}",
                        d.staging
                    )));
                }
                // The exports a peer's QEMU read staging through (it reads
                // its own volume since the pivot).
                for e in self.b.snaps.exports.list() {
                    if e.volume.as_deref() == Some(d.staging.as_str()) {
                        self.b.snaps.exports.remove(&e.name).map_err(|err| {
                            StepError::failed(format!("removing export {}: {err}", e.name))
                        })?;
                        cx.log(format!("removed export {}", e.name));
                    }
                }
                let (s, v) = (self.s.clone(), d.staging.clone());
                blocking(move || s.remove(&v)).await?;
                cx.log(format!("deleted staging volume {}", d.staging));
            }
            let boot = cx.result_of("boot").cloned().unwrap_or(Value::Null);
            let mut bytes = 0u64;
            let mut secs = 0f64;
            for d in &self.p.disks {
                if let Some(r) = cx.result_of(&format!("relocate {}", d.device)) {
                    bytes += r["bytes"].as_u64().unwrap_or(0);
                    secs += r["secs"].as_f64().unwrap_or(0.0);
                }
            }
            let report = json!({
                "vm": self.p.name,
                "host": self.p.to,
                "first_output_s": boot["first_output_s"],
                "boot_complete_s": boot["boot_complete_s"],
                "boot_stalls": boot["boot_stalls"],
                "boot_prefetched": boot["boot_prefetched"],
                "stalls": stalls,
                "prefetched_chunks": prefetched,
                "relocated_bytes": bytes,
                "relocation_s": secs,
                "relocation_mb_per_s": if secs > 0.0 { Some(bytes as f64 / secs / 1e6) } else { None },
                "note": "fetch counts cover this ferryd process; a restart during the restore resets them",
            });
            cx.log(format!(
                "restore report: {stalls} on-demand fetches (stalls) vs {prefetched} prefetched chunks; relocation {bytes} bytes in {secs:.1} s"
            ));
            // The machine-readable report (the step's result stays in the
            // journal; the API shows the log).
            cx.log(format!("{REPORT_PREFIX}{report}"));
            Ok(report)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_order_puts_the_profile_first_then_data_in_order() {
        let data = vec![
            Extent {
                offset: 0,
                length: 3 << 20,
                kind: ExtentKind::Data,
            },
            Extent {
                offset: 3 << 20,
                length: 5 << 20,
                kind: ExtentKind::Hole,
            },
            Extent {
                offset: 8 << 20,
                length: 1 << 20,
                kind: ExtentKind::Data,
            },
        ];
        let mib = 1 << 20;
        let profile = [[5 * mib, 6 * mib], [mib, mib + 10]];
        assert_eq!(
            prefetch_order(&profile, &data, mib, true),
            vec![[5, 6], [1, 2], [0, 3], [8, 9]]
        );
        assert_eq!(
            prefetch_order(&profile, &data, mib, false),
            vec![[0, 3], [8, 9]]
        );
    }
}
