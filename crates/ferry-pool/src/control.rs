//! The control plane: the [`Pool`] handle, volumes, snapshots, group
//! snapshots, clones and deletion. Every operation here commits
//! synchronously (pending data-path changes ride along in the same commit).

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLockWriteGuard};

use redb::{ReadableDatabase, ReadableTable};

use crate::error::{Ctx, Error, ErrorKind, Result};
use crate::lazy::ChunkSource;
use crate::meta::{
    self, COUNTERS, EPOCHS, MAP, PROFILES, SNAPSHOTS, SnapRec, VOLUMES, VolumeRec, ZERO,
};
use crate::pool::{self, Catalog, PoolOptions, Shared, lock};
use crate::volume::{Slot, VolInner, VolState, Volume};

/// A pool: `Send + Sync`, cheap to clone.
#[derive(Clone)]
pub struct Pool {
    pub(crate) sh: Arc<Shared>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("dir", &self.sh.dir).finish()
    }
}

/// A volume as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    /// Name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// The snapshot it was cloned from, if any.
    pub parent_snapshot: Option<String>,
    /// Whether chunks are still fetched from a source.
    pub lazy: bool,
}

/// A snapshot as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Name (unique in the pool).
    pub name: String,
    /// The volume it freezes.
    pub volume: String,
    /// Size of the volume when taken.
    pub size: u64,
    /// The group snapshot it belongs to, if any.
    pub group: Option<String>,
    /// Seconds since the Unix epoch.
    pub created: u64,
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn check_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 255 || name.contains('\0') {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("{what} name {name:?} must be 1..255 bytes without NUL"),
        ));
    }
    Ok(())
}

impl Pool {
    /// Create a pool in `dir`.
    pub fn create(dir: impl AsRef<Path>, opts: PoolOptions) -> Result<Pool> {
        Ok(Pool {
            sh: pool::create(dir.as_ref(), &opts)?,
        })
    }

    /// Open the pool in `dir` (fails with `UnknownVersion` on a newer format).
    pub fn open(dir: impl AsRef<Path>) -> Result<Pool> {
        let dir = dir.as_ref();
        Ok(Pool {
            sh: crate::error::store_guard(
                || format!("open pool {}", dir.display()),
                || pool::open(dir),
            )?,
        })
    }

    /// What opening found in the stage logs: changes of acknowledged but
    /// unflushed writes replayed after the previous process was killed,
    /// logs dropped because the machine rebooted since.
    pub fn recovery(&self) -> &crate::Recovery {
        &self.sh.recovery
    }

    /// Bytes per chunk.
    pub fn chunk_size(&self) -> u64 {
        self.sh.chunk
    }

    /// Make every acknowledged write of every volume durable.
    pub fn flush(&self) -> Result<()> {
        self.sh.flush()
    }

    fn cat_write(&self) -> RwLockWriteGuard<'_, Catalog> {
        self.sh.catalog.write().unwrap_or_else(|e| e.into_inner())
    }

    fn cat_read(&self) -> std::sync::RwLockReadGuard<'_, Catalog> {
        self.sh.catalog.read().unwrap_or_else(|e| e.into_inner())
    }

    /// A handle on volume `name`.
    pub fn volume(&self, name: &str) -> Result<Volume> {
        let cat = self.cat_read();
        let v = cat
            .by_name
            .get(name)
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("volume {name}")))?;
        Ok(Volume {
            sh: self.sh.clone(),
            v: v.clone(),
        })
    }

    /// Every volume, sorted by name.
    pub fn volumes(&self) -> Vec<VolumeInfo> {
        let cat = self.cat_read();
        let mut out: Vec<VolumeInfo> = cat
            .recs
            .values()
            .map(|r| VolumeInfo {
                name: r.name.clone(),
                size: cat
                    .by_id
                    .get(&r.id)
                    .map(|v| v.size.load(Ordering::Acquire))
                    .unwrap_or(r.size),
                parent_snapshot: r.parent.and_then(|(l, e)| {
                    cat.snaps
                        .values()
                        .find(|s| s.volume == l && s.epoch == e)
                        .map(|s| s.name.clone())
                }),
                lazy: cat.by_id.get(&r.id).is_some_and(|v| v.lazy.is_lazy()),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    fn new_volume(
        &self,
        name: &str,
        size: u64,
        parent: Option<(u64, u64)>,
        lazy: bool,
    ) -> Result<Volume> {
        check_name("volume", name)?;
        let mut cat = self.cat_write();
        if cat.by_name.contains_key(name) {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("create volume {name}"),
            ));
        }
        let id = cat.next_id;
        let rec = VolumeRec {
            id,
            name: name.to_string(),
            size,
            epoch: 1,
            parent,
            lazy,
        };
        let enc = meta::encode(&rec);
        self.sh.commit_with(|txn, _| {
            txn.open_table(VOLUMES)
                .ctx(|| "open volumes".into())?
                .insert(id, enc.as_slice())
                .ctx(|| format!("store volume {name}"))?;
            txn.open_table(COUNTERS)
                .ctx(|| "open counters".into())?
                .insert("next_id", id + 1)
                .ctx(|| "store next id".into())?;
            Ok(())
        })?;
        cat.next_id = id + 1;
        cat.recs.insert(id, rec.clone());
        let vol = Arc::new(VolInner::new(&rec, BTreeSet::new(), self.sh.chunk));
        if let Some((p, pe)) = parent {
            let txn = self
                .sh
                .db
                .begin_read()
                .ctx(|| format!("read parent of clone {name}"))?;
            let map = txn.open_table(MAP).ctx(|| "open map".into())?;
            for (c, (phys, epoch, _)) in meta::view(&map, &cat.recs, p, pe)? {
                vol.set_slot(
                    c,
                    Some(Slot {
                        phys,
                        epoch,
                        own: false,
                    }),
                );
            }
        }
        cat.by_name.insert(name.to_string(), vol.clone());
        cat.by_id.insert(id, vol.clone());
        Ok(Volume {
            sh: self.sh.clone(),
            v: vol,
        })
    }

    /// Create an empty thin volume of `size` bytes.
    pub fn create_volume(&self, name: &str, size: u64) -> Result<Volume> {
        self.new_volume(name, size, None, false)
    }

    /// Create a lazy volume of the source's size whose chunks are fetched from
    /// `source` on first access or by a [`crate::Hydrator`].
    pub fn create_lazy(&self, name: &str, source: Arc<dyn ChunkSource>) -> Result<Volume> {
        let v = self.new_volume(name, source.size(), None, true)?;
        v.attach_source(source)?;
        Ok(v)
    }

    /// Grow a volume to `new_size` bytes (shrinking is refused).
    pub fn grow_volume(&self, name: &str, new_size: u64) -> Result<()> {
        let mut cat = self.cat_write();
        let vol = cat
            .by_name
            .get(name)
            .cloned()
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("grow volume {name}")))?;
        if vol.lazy.is_lazy() {
            return Err(Error::new(
                ErrorKind::Lazy,
                format!("grow volume {name}: hydrate it first"),
            ));
        }
        let old = vol.size.load(Ordering::Acquire);
        if new_size < old {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("grow volume {name}: {new_size} is smaller than {old}"),
            ));
        }
        let _st = vol.state.write().unwrap_or_else(|e| e.into_inner());
        let mut rec = cat.recs[&vol.id].clone();
        rec.size = new_size;
        let enc = meta::encode(&rec);
        self.sh.commit_with(|txn, _| {
            txn.open_table(VOLUMES)
                .ctx(|| "open volumes".into())?
                .insert(vol.id, enc.as_slice())
                .ctx(|| format!("grow volume {name}"))?;
            Ok(())
        })?;
        // Bytes past the old end read as zeroes: no write ever reaches past a
        // volume's size and new chunks are zero-filled.
        vol.size.store(new_size, Ordering::Release);
        cat.recs.insert(vol.id, rec);
        Ok(())
    }

    /// Delete a volume and free its chunks. Refused while it has snapshots.
    pub fn delete_volume(&self, name: &str) -> Result<()> {
        let mut cat = self.cat_write();
        let vol = cat
            .by_name
            .get(name)
            .cloned()
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("delete volume {name}")))?;
        let mut st = vol.state.write().unwrap_or_else(|e| e.into_inner());
        let snaps: Vec<&str> = cat
            .snaps
            .values()
            .filter(|s| s.volume == vol.id)
            .map(|s| s.name.as_str())
            .collect();
        if !snaps.is_empty() {
            return Err(Error::new(
                ErrorKind::InUse,
                format!(
                    "delete volume {name}: it has snapshots ({}); delete them first; nothing was changed",
                    snaps.join(", ")
                ),
            ));
        }
        let id = vol.id;
        self.sh.commit_with(|txn, freed| {
            let mut map = txn.open_table(MAP).ctx(|| "open map".into())?;
            let mut ep = txn.open_table(EPOCHS).ctx(|| "open epochs".into())?;
            let keys: Vec<((u64, u64, u64), u64)> = map
                .range((id, 0, 0)..=(id, u64::MAX, u64::MAX))
                .ctx(|| format!("scan volume {name}"))?
                .map(|r| r.map(|(k, v)| (k.value(), v.value())))
                .collect::<std::result::Result<_, _>>()
                .ctx(|| format!("scan volume {name}"))?;
            for (k, phys) in keys {
                meta::del_entry(&mut map, &mut ep, k)?;
                if phys != ZERO {
                    freed.push(phys);
                }
            }
            txn.open_table(VOLUMES)
                .ctx(|| "open volumes".into())?
                .remove(id)
                .ctx(|| format!("remove volume {name}"))?;
            txn.open_table(PROFILES)
                .ctx(|| "open profiles".into())?
                .remove(id)
                .ctx(|| format!("remove profile of {name}"))?;
            Ok(())
        })?;
        st.deleted = true;
        vol.deleted.store(true, Ordering::Release);
        vol.clear();
        drop(st);
        cat.by_name.remove(name);
        cat.by_id.remove(&id);
        cat.recs.remove(&id);
        lock(&self.sh.profiling).retain(|v| v.id != id);
        Ok(())
    }

    /// Snapshot one volume. O(1) in the volume's size.
    pub fn snapshot(&self, volume: &str, snapshot: &str) -> Result<SnapshotInfo> {
        Ok(self.snapshot_group(None, &[(volume, snapshot)])?.remove(0))
    }

    /// Snapshot several volumes at one atomic point in time: no write of any
    /// of them is in one snapshot and not in the others.
    pub fn group_snapshot(&self, group: &str, pairs: &[(&str, &str)]) -> Result<Vec<SnapshotInfo>> {
        check_name("group", group)?;
        self.snapshot_group(Some(group), pairs)
    }

    fn snapshot_group(
        &self,
        group: Option<&str>,
        pairs: &[(&str, &str)],
    ) -> Result<Vec<SnapshotInfo>> {
        let mut cat = self.cat_write();
        let what = || match group {
            Some(g) => format!("group snapshot {g}"),
            None => format!("snapshot {}", pairs.first().map(|p| p.1).unwrap_or("")),
        };
        if pairs.is_empty() {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("{}: no volumes", what()),
            ));
        }
        let mut vols: Vec<(Arc<VolInner>, &str)> = Vec::new();
        for (v, s) in pairs {
            check_name("snapshot", s)?;
            if cat.snaps.contains_key(*s) || pairs.iter().filter(|p| p.1 == *s).count() > 1 {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!("{}: snapshot {s}; nothing was changed", what()),
                ));
            }
            let vol = cat.by_name.get(*v).cloned().ok_or_else(|| {
                Error::new(ErrorKind::NotFound, format!("{}: volume {v}", what()))
            })?;
            if vol.lazy.is_lazy() {
                return Err(Error::new(
                    ErrorKind::Lazy,
                    format!(
                        "{}: volume {v} is still hydrating; nothing was changed",
                        what()
                    ),
                ));
            }
            if vols.iter().any(|(x, _)| x.id == vol.id) {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    format!("{}: volume {v} named twice", what()),
                ));
            }
            vols.push((vol, s));
        }
        vols.sort_by_key(|(v, _)| v.id);
        // Exclusive state locks: in-flight writes finish, new ones wait.
        let mut guards: Vec<_> = vols
            .iter()
            .map(|(v, _)| v.state.write().unwrap_or_else(|e| e.into_inner()))
            .collect();
        let created = now();
        let mut recs = Vec::new();
        for ((v, s), st) in vols.iter().zip(&guards) {
            let snap = SnapRec {
                name: s.to_string(),
                volume: v.id,
                epoch: st.epoch,
                size: v.size.load(Ordering::Acquire),
                group: group.map(str::to_string),
                created,
            };
            let mut vr = cat.recs[&v.id].clone();
            vr.epoch = st.epoch + 1;
            recs.push((snap, vr));
        }
        self.sh.commit_with(|txn, _| {
            let mut st = txn.open_table(SNAPSHOTS).ctx(|| "open snapshots".into())?;
            let mut vt = txn.open_table(VOLUMES).ctx(|| "open volumes".into())?;
            for (snap, vr) in &recs {
                st.insert(snap.name.as_str(), meta::encode(snap).as_slice())
                    .ctx(|| format!("store snapshot {}", snap.name))?;
                vt.insert(vr.id, meta::encode(vr).as_slice())
                    .ctx(|| format!("store volume {}", vr.name))?;
            }
            Ok(())
        })?;
        let mut out = Vec::new();
        for ((snap, vr), st) in recs.into_iter().zip(guards.iter_mut()) {
            let e = st.epoch;
            st.snaps.insert(e);
            st.epoch += 1;
            out.push(SnapshotInfo {
                name: snap.name.clone(),
                volume: vr.name.clone(),
                size: snap.size,
                group: snap.group.clone(),
                created: snap.created,
            });
            cat.snaps.insert(snap.name.clone(), snap);
            cat.recs.insert(vr.id, vr);
        }
        Ok(out)
    }

    /// Every snapshot, sorted by name.
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        let cat = self.cat_read();
        cat.snaps
            .values()
            .map(|s| SnapshotInfo {
                name: s.name.clone(),
                volume: cat
                    .recs
                    .get(&s.volume)
                    .map(|r| r.name.clone())
                    .unwrap_or_default(),
                size: s.size,
                group: s.group.clone(),
                created: s.created,
            })
            .collect()
    }

    /// Delete a snapshot: frees the chunks no one else sees, in work
    /// proportional to the chunks written around it. Refused while clones
    /// depend on it.
    pub fn delete_snapshot(&self, name: &str) -> Result<()> {
        let mut cat = self.cat_write();
        let snap =
            cat.snaps.get(name).cloned().ok_or_else(|| {
                Error::new(ErrorKind::NotFound, format!("delete snapshot {name}"))
            })?;
        let clones: Vec<&str> = cat
            .recs
            .values()
            .filter(|r| r.parent == Some((snap.volume, snap.epoch)))
            .map(|r| r.name.as_str())
            .collect();
        if !clones.is_empty() {
            return Err(Error::new(
                ErrorKind::InUse,
                format!(
                    "delete snapshot {name}: clones depend on it ({}); nothing was changed",
                    clones.join(", ")
                ),
            ));
        }
        let vol = cat.by_id.get(&snap.volume).cloned().ok_or_else(|| {
            Error::new(
                ErrorKind::Metadata,
                format!(
                    "delete snapshot {name}: its volume {} is missing",
                    snap.volume
                ),
            )
        })?;
        let mut st = vol.state.write().unwrap_or_else(|e| e.into_inner());
        let l = snap.volume;
        let s = snap.epoch;
        let prev = st.snaps.range(..s).next_back().copied().unwrap_or(0);
        let next = st.snaps.range(s + 1..).next().copied().unwrap_or(u64::MAX);
        self.sh.commit_with(|txn, freed| {
            let mut map = txn.open_table(MAP).ctx(|| "open map".into())?;
            let mut ep = txn.open_table(EPOCHS).ctx(|| "open epochs".into())?;
            let entries: Vec<(u64, u64)> = ep
                .range((l, prev + 1, 0)..=(l, s, u64::MAX))
                .ctx(|| format!("scan epochs of snapshot {name}"))?
                .map(|r| r.map(|(k, _)| (k.value().1, k.value().2)))
                .collect::<std::result::Result<_, _>>()
                .ctx(|| format!("scan epochs of snapshot {name}"))?;
            for (e, c) in entries {
                let superseded = map
                    .range((l, c, s + 1)..=(l, c, next))
                    .ctx(|| format!("look up chunk {c}"))?
                    .next()
                    .is_some();
                if superseded
                    && let Some(phys) = meta::del_entry(&mut map, &mut ep, (l, c, e))?
                    && phys != ZERO
                {
                    freed.push(phys);
                }
            }
            txn.open_table(SNAPSHOTS)
                .ctx(|| "open snapshots".into())?
                .remove(name)
                .ctx(|| format!("remove snapshot {name}"))?;
            Ok(())
        })?;
        st.snaps.remove(&s);
        cat.snaps.remove(name);
        Ok(())
    }

    /// A writable volume `name` sharing the chunks of `snapshot`.
    pub fn clone_snapshot(&self, snapshot: &str, name: &str) -> Result<Volume> {
        let (parent, size) = {
            let cat = self.cat_read();
            let s = cat.snaps.get(snapshot).ok_or_else(|| {
                Error::new(ErrorKind::NotFound, format!("clone snapshot {snapshot}"))
            })?;
            ((s.volume, s.epoch), s.size)
        };
        self.new_volume(name, size, Some(parent), false)
    }

    pub(crate) fn snap_rec(&self, name: &str) -> Result<SnapRec> {
        self.cat_read()
            .snaps
            .get(name)
            .cloned()
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("snapshot {name}")))
    }

    pub(crate) fn parents(&self) -> std::collections::HashMap<u64, Option<(u64, u64)>> {
        self.cat_read()
            .recs
            .values()
            .map(|r| (r.id, r.parent))
            .collect()
    }

    /// Snapshot state of a volume (for accounting and verify).
    pub(crate) fn vol_state<R>(&self, v: &VolInner, f: impl FnOnce(&VolState) -> R) -> R {
        f(&v.read_state())
    }
}
