//! The destination's durable records of batch migrations (flow 4 of
//! DESIGN.md): what decides, after any fault, whether a VM was migrated.
//!
//! # On disk
//! `<data>/migrations/<batch>.json` holds the batch's manifest (its
//! members, their sources, the destination; sent by the coordinator before
//! any VM moves) and, per VM, a [`MigrationRecord`] whose marks are set in
//! this order, each written (file and directory fsync'd) before the step it
//! guards proceeds:
//! 1. `started` — in `POST /v1/peer/migrate/incoming`, before a lazy
//!    volume is made;
//! 2. `placeholder` — after the VM is defined here (same UUID, not
//!    running), before its QEMU waits for memory;
//! 3. `completed` — in `POST /v1/peer/migrate/{uuid}/hydrate`, once the VM
//!    runs here (the source's QEMU finished the memory migration: the
//!    source calls `hydrate` only then) and hydration of its disks has
//!    started: this is the *verification*;
//! 4. or `rolled_back` — the placeholder was removed before switchover.
//!
//! The file outlives the migration: `status` reads it after the source
//! released the VM and after the coordinator lost its own journal.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use ferry_api::{BatchManifest, BatchRecords, Mark, MigrationRecord};

use crate::config::write_atomic;

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn mark(note: impl Into<String>) -> Mark {
    Mark {
        at_ms: now_ms(),
        note: note.into(),
    }
}

/// Whether `id` may name a batch (it names a file).
pub fn valid_batch_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The batch records of this host (as a destination).
pub struct Records {
    dir: PathBuf,
    lock: Mutex<()>,
}

impl Records {
    pub fn open(dir: PathBuf) -> anyhow::Result<Records> {
        std::fs::create_dir_all(&dir)?;
        Ok(Records {
            dir,
            lock: Mutex::new(()),
        })
    }

    fn file(&self, batch: &str) -> PathBuf {
        self.dir.join(format!("{batch}.json"))
    }

    fn read(&self, batch: &str) -> Result<BatchRecords, String> {
        if !valid_batch_id(batch) {
            return Err(format!("{batch:?} is not a valid batch id"));
        }
        match std::fs::read(self.file(batch)) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| format!("{} is damaged: {e}", self.file(batch).display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BatchRecords {
                manifest: None,
                records: BTreeMap::new(),
            }),
            Err(e) => Err(format!("cannot read {}: {e}", self.file(batch).display())),
        }
    }

    /// Reads, changes and durably rewrites one batch's file.
    fn update<T>(
        &self,
        batch: &str,
        f: impl FnOnce(&mut BatchRecords) -> Result<T, String>,
    ) -> Result<T, String> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut recs = self.read(batch)?;
        let out = f(&mut recs)?;
        let data = serde_json::to_vec_pretty(&recs).map_err(|e| e.to_string())?;
        write_atomic(&self.file(batch), &data, 0o644).map_err(|e| format!("{e:#}"))?;
        Ok(out)
    }

    /// What this host holds of `batch` (empty when nothing).
    pub fn get(&self, batch: &str) -> Result<BatchRecords, String> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.read(batch)
    }

    /// Every batch this host holds records of.
    pub fn batches(&self) -> Vec<(String, BatchRecords)> {
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return out;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(b) = name.strip_suffix(".json")
                && let Ok(r) = self.get(b)
            {
                out.push((b.to_string(), r));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Stores the batch's manifest (merging the members of a re-run).
    pub fn register(&self, m: &BatchManifest) -> Result<(), String> {
        self.update(&m.batch, |r| {
            match &mut r.manifest {
                Some(old) => {
                    if old.to != m.to {
                        return Err(format!(
                            "batch {} migrates to {}, not {}",
                            m.batch, old.to, m.to
                        ));
                    }
                    for mem in &m.members {
                        if !old.members.iter().any(|o| o.vm == mem.vm) {
                            old.members.push(mem.clone());
                        }
                    }
                    old.coordinator = m.coordinator.clone();
                }
                None => r.manifest = Some(m.clone()),
            }
            Ok(())
        })
    }

    /// The *migration started* record of VM `vm` (a new attempt after a
    /// roll-back starts afresh).
    pub fn started(
        &self,
        batch: &str,
        vm: &str,
        name: &str,
        from: &str,
        volumes: &[String],
    ) -> Result<(), String> {
        self.update(batch, |r| {
            if let Some(rec) = r.records.get(vm)
                && rec.completed.is_some()
            {
                return Err(format!("VM {name} was already migrated by batch {batch}"));
            }
            r.records.insert(
                vm.to_string(),
                MigrationRecord {
                    batch: batch.to_string(),
                    vm: vm.to_string(),
                    name: name.to_string(),
                    from: from.to_string(),
                    volumes: volumes.to_vec(),
                    started: mark(""),
                    placeholder: None,
                    rolled_back: None,
                    completed: None,
                },
            );
            Ok(())
        })
    }

    fn set(
        &self,
        batch: &str,
        vm: &str,
        f: impl FnOnce(&mut MigrationRecord),
    ) -> Result<(), String> {
        self.update(batch, |r| {
            let rec = r
                .records
                .get_mut(vm)
                .ok_or_else(|| format!("batch {batch} has no record of VM {vm}"))?;
            f(rec);
            Ok(())
        })
    }

    /// The VM is defined here as a placeholder (not running).
    pub fn placeholder(&self, batch: &str, vm: &str) -> Result<(), String> {
        self.set(batch, vm, |r| {
            r.placeholder = Some(mark("defined here with the VM's UUID, not running"))
        })
    }

    /// The migration was verified complete here.
    pub fn completed(&self, batch: &str, vm: &str, note: &str) -> Result<(), String> {
        self.set(batch, vm, |r| {
            if r.completed.is_none() {
                r.completed = Some(mark(note));
            }
        })
    }

    /// The placeholder was removed: the migration did not switch over.
    pub fn rolled_back(&self, batch: &str, vm: &str, note: &str) -> Result<(), String> {
        self.set(batch, vm, |r| {
            if r.completed.is_none() {
                r.rolled_back = Some(mark(note));
            }
        })
    }

    /// The open batch record of VM `vm` (started, neither completed nor
    /// rolled back), if any: `(batch, record)`.
    pub fn open_record_of(&self, vm: &str) -> Option<(String, MigrationRecord)> {
        self.batches().into_iter().find_map(|(b, r)| {
            r.records
                .get(vm)
                .filter(|rec| rec.completed.is_none() && rec.rolled_back.is_none())
                .map(|rec| (b, rec.clone()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_api::BatchMember;

    #[test]
    fn marks_are_durable_and_ordered() {
        let dir = tempfile::tempdir().unwrap();
        let r = Records::open(dir.path().join("m")).unwrap();
        let m = BatchManifest {
            batch: "b1".into(),
            to: "host-b".into(),
            coordinator: "host-c".into(),
            members: vec![BatchMember {
                vm: "u1".into(),
                name: "vm1".into(),
                from: "host-a".into(),
            }],
            created: 1,
        };
        r.register(&m).unwrap();
        assert!(r.placeholder("b1", "u1").is_err());
        r.started("b1", "u1", "vm1", "host-a", &[]).unwrap();
        assert!(r.open_record_of("u1").is_some());
        r.placeholder("b1", "u1").unwrap();
        r.completed("b1", "u1", "ok").unwrap();
        // A new handle reads what the first one wrote.
        let r2 = Records::open(dir.path().join("m")).unwrap();
        let got = r2.get("b1").unwrap();
        assert_eq!(got.manifest.unwrap().members.len(), 1);
        let rec = &got.records["u1"];
        assert!(rec.placeholder.is_some() && rec.completed.is_some());
        assert!(r2.open_record_of("u1").is_none());
        assert!(r2.started("b1", "u1", "vm1", "host-a", &[]).is_err());
        assert!(r2.get("../x").is_err());
    }
}
