//! The destination side of an on-demand migration: lazy volumes whose
//! chunks come from the source host's volumes over NBD, their durable
//! source descriptors, and their hydrators.
//!
//! # On disk
//! `<data>/migrate-in.json` (mode 0600: it holds export secrets) maps each
//! lazy volume to its [`SourceRecord`]: the VM it belongs to, the source's
//! NBD address and export, whether hydration has started (only after
//! switchover) and whether it is done. A record is written *before* its
//! volume is created, so a crash leaves at worst a record without a volume
//! (dropped at the next load), never a lazy volume nobody can re-attach.
//!
//! # After a restart
//! [`Inbound::load`] re-attaches a [`RemoteSource`] to every lazy volume
//! with a record (its connection is made on first use, so a source that is
//! down does not stop ferryd) and restarts the hydrators of the records
//! whose hydration had started; chunks fetched before are never fetched
//! again.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ferry_api::{DiskHydration, IncomingDisk, IncomingStatus, OnMissing};
use ferry_pool::{Hydrator, HydratorOptions, Pool};
use serde::{Deserialize, Serialize};

use crate::config::write_atomic;
use crate::remote_source::RemoteSource;

/// Where one lazy volume's chunks come from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SourceRecord {
    pub volume: String,
    /// The VM's UUID.
    pub vm: String,
    /// The source host's name.
    pub from: String,
    pub size: u64,
    pub nbd: String,
    pub export: String,
    pub on_missing: OnMissing,
    /// Background hydration cap, bytes per second.
    #[serde(default)]
    pub rate_limit: Option<u64>,
    /// Hydration started (after switchover).
    pub hydrate: bool,
    /// Every chunk is present; the source is no longer used.
    pub done: bool,
}

fn hydrator_options(r: &SourceRecord) -> HydratorOptions {
    HydratorOptions {
        rate_limit: r.rate_limit,
        ..HydratorOptions::default()
    }
}

struct Live {
    source: Arc<RemoteSource>,
    hydrator: Option<Hydrator>,
}

/// The incoming lazy volumes of this host.
pub struct Inbound {
    file: PathBuf,
    pool: Pool,
    records: Mutex<BTreeMap<String, SourceRecord>>,
    live: Mutex<HashMap<String, Live>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inbound {
    /// Reads the records, re-attaches sources, restarts hydrators.
    pub fn load(pool: Pool, file: PathBuf) -> anyhow::Result<Inbound> {
        let records: BTreeMap<String, SourceRecord> = match std::fs::read(&file) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| anyhow::anyhow!("{} is damaged: {e}", file.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => anyhow::bail!("cannot read {}: {e}", file.display()),
        };
        let me = Inbound {
            file,
            pool,
            records: Mutex::new(BTreeMap::new()),
            live: Mutex::new(HashMap::new()),
        };
        let mut kept = BTreeMap::new();
        for (name, mut rec) in records {
            if !rec.done {
                match me.pool.volume(&name) {
                    Ok(v) if v.is_lazy() => {
                        let source = me.attach(&rec, &v)?;
                        let hydrator = rec.hydrate.then(|| {
                            tracing::info!("resuming hydration of volume {name} from {}", rec.from);
                            Hydrator::start(&v, hydrator_options(&rec))
                        });
                        lock(&me.live).insert(name.clone(), Live { source, hydrator });
                    }
                    Ok(_) => rec.done = true,
                    Err(e) if e.kind() == ferry_pool::ErrorKind::NotFound => {
                        tracing::info!("dropping the source record of missing volume {name}");
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            kept.insert(name, rec);
        }
        me.persist(&kept)?;
        *lock(&me.records) = kept;
        Ok(me)
    }

    fn attach(
        &self,
        rec: &SourceRecord,
        v: &ferry_pool::Volume,
    ) -> anyhow::Result<Arc<RemoteSource>> {
        let source = Arc::new(RemoteSource::new(
            &rec.nbd,
            &rec.export,
            rec.size,
            rec.on_missing,
        ));
        v.attach_source(source.clone())?;
        Ok(source)
    }

    fn persist(&self, records: &BTreeMap<String, SourceRecord>) -> anyhow::Result<()> {
        let data = serde_json::to_vec_pretty(records)?;
        write_atomic(&self.file, &data, 0o600)
    }

    /// Creates one lazy volume per disk, sourced from the source's exports.
    /// All or nothing. Blocking.
    pub fn create(
        &self,
        vm: &str,
        from: &str,
        disks: &[IncomingDisk],
        on_missing: OnMissing,
        rate_limit: Option<u64>,
    ) -> Result<(), String> {
        for d in disks {
            match self.pool.volume(&d.volume) {
                Ok(_) => {
                    return Err(format!(
                        "volume {} already exists on this host; nothing was created",
                        d.volume
                    ));
                }
                Err(e) if e.kind() == ferry_pool::ErrorKind::NotFound => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        let mut records = lock(&self.records);
        let before = records.clone();
        for d in disks {
            records.insert(
                d.volume.clone(),
                SourceRecord {
                    volume: d.volume.clone(),
                    vm: vm.to_string(),
                    from: from.to_string(),
                    size: d.size,
                    nbd: d.nbd.clone(),
                    export: d.export.clone(),
                    on_missing,
                    rate_limit,
                    hydrate: false,
                    done: false,
                },
            );
        }
        if let Err(e) = self.persist(&records) {
            *records = before;
            return Err(format!("{e:#}"));
        }
        let mut made = Vec::new();
        let mut failed = None;
        for d in disks {
            let source = Arc::new(RemoteSource::new(&d.nbd, &d.export, d.size, on_missing));
            match self.pool.create_lazy(&d.volume, source.clone()) {
                Ok(_) => {
                    made.push(d.volume.clone());
                    lock(&self.live).insert(
                        d.volume.clone(),
                        Live {
                            source,
                            hydrator: None,
                        },
                    );
                }
                Err(e) => {
                    failed = Some(format!("creating lazy volume {}: {e}", d.volume));
                    break;
                }
            }
        }
        if let Some(err) = failed {
            for v in &made {
                lock(&self.live).remove(v);
                let _ = self.pool.delete_volume(v);
            }
            *records = before;
            let _ = self.persist(&records);
            return Err(format!("{err}; nothing was left behind"));
        }
        Ok(())
    }

    /// The records of VM `vm`.
    fn of(&self, vm: &str) -> Vec<SourceRecord> {
        lock(&self.records)
            .values()
            .filter(|r| r.vm == vm)
            .cloned()
            .collect()
    }

    /// Whether this host has incoming volumes of VM `vm`.
    pub fn has(&self, vm: &str) -> bool {
        !self.of(vm).is_empty()
    }

    /// Whether hydration of VM `vm` has started.
    pub fn hydrating(&self, vm: &str) -> bool {
        self.of(vm).iter().any(|r| r.hydrate)
    }

    /// Starts hydrating every volume of VM `vm` (after switchover: the
    /// source's QEMU has flushed and inactivated its disks). Idempotent.
    pub fn start_hydration(&self, vm: &str) -> anyhow::Result<()> {
        {
            let mut records = lock(&self.records);
            let mut changed = false;
            for r in records.values_mut().filter(|r| r.vm == vm) {
                changed |= !r.hydrate;
                r.hydrate = true;
            }
            if changed {
                self.persist(&records)?;
            }
        }
        let mut live = lock(&self.live);
        for r in self.of(vm).into_iter().filter(|r| !r.done) {
            let Some(l) = live.get_mut(&r.volume) else {
                continue;
            };
            if l.hydrator.is_none() {
                let v = self.pool.volume(&r.volume)?;
                tracing::info!("hydrating volume {} from {}", r.volume, r.from);
                l.hydrator = Some(Hydrator::start(&v, hydrator_options(&r)));
            }
        }
        Ok(())
    }

    /// Where VM `vm`'s hydration stands; marks finished volumes done.
    pub fn status(&self, vm: &str) -> Option<IncomingStatus> {
        let recs = self.of(vm);
        if recs.is_empty() {
            return None;
        }
        let mut disks = Vec::new();
        let mut newly_done = Vec::new();
        for r in &recs {
            let (mut present, mut total, mut last_error) = (0, 0, None);
            let mut done = r.done;
            if !done {
                match self.pool.volume(&r.volume) {
                    Ok(v) => {
                        (present, total) = v.presence();
                        let live = lock(&self.live);
                        let l = live.get(&r.volume);
                        last_error = l.and_then(|l| l.source.down()).or_else(|| {
                            l.and_then(|l| l.hydrator.as_ref())
                                .and_then(|h| h.progress().last_error)
                        });
                        if !v.is_lazy() {
                            done = true;
                            newly_done.push(r.volume.clone());
                        }
                    }
                    Err(e) => last_error = Some(e.to_string()),
                }
            }
            if done {
                total = total.max(present);
                present = total;
                last_error = None;
            }
            disks.push(DiskHydration {
                volume: r.volume.clone(),
                present_chunks: present,
                total_chunks: total,
                missing_chunks: total - present,
                done,
                last_error,
            });
        }
        if !newly_done.is_empty() {
            let mut records = lock(&self.records);
            for v in &newly_done {
                if let Some(r) = records.get_mut(v) {
                    r.done = true;
                }
            }
            if let Err(e) = self.persist(&records) {
                tracing::warn!("{e:#}");
            }
            let mut live = lock(&self.live);
            for v in &newly_done {
                live.remove(v);
            }
        }
        Some(IncomingStatus {
            uuid: vm.to_string(),
            hydrating: recs.iter().any(|r| r.hydrate),
            done: disks.iter().all(|d| d.done),
            disks,
        })
    }

    /// Removes VM `vm`'s lazy volumes and records (a migration that did
    /// not switch over). Blocking.
    pub fn abort(&self, vm: &str) -> Result<(), String> {
        let recs = self.of(vm);
        for r in &recs {
            if let Some(l) = lock(&self.live).remove(&r.volume) {
                l.source.close();
                drop(l.hydrator);
            }
            match self.pool.delete_volume(&r.volume) {
                Ok(()) => {}
                Err(e) if e.kind() == ferry_pool::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("deleting lazy volume {}: {e}", r.volume)),
            }
        }
        self.forget(vm)
    }

    /// Drops VM `vm`'s records (the source released its volumes).
    pub fn forget(&self, vm: &str) -> Result<(), String> {
        let mut records = lock(&self.records);
        let before = records.clone();
        records.retain(|_, r| r.vm != vm);
        if records.len() != before.len()
            && let Err(e) = self.persist(&records)
        {
            *records = before;
            return Err(format!("{e:#}"));
        }
        Ok(())
    }
}
