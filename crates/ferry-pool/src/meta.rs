//! The metadata store (redb): tables, records and the queries on them.
//!
//! Tables:
//! - `volumes`: volume id → JSON [`VolumeRec`] (name, size, current epoch,
//!   parent snapshot of a clone, lazy flag).
//! - `snapshots`: snapshot name → JSON [`SnapRec`] (volume id, frozen epoch).
//! - `map`: (lineage, chunk, epoch) → physical chunk, or [`ZERO`] for a chunk
//!   that reads as zeroes without space (trimmed). The newest entry of a
//!   chunk with epoch ≤ e is the chunk's content at epoch e.
//! - `epochs`: (lineage, epoch, chunk) → (): the same entries ordered by
//!   epoch, so change tracking and snapshot deletion read only the entries
//!   of the epochs concerned.
//! - `profiles`: volume id → JSON list of chunks in first-read order.

use std::collections::HashMap;

use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::{Ctx, Error, ErrorKind, Result};

pub(crate) const VOLUMES: TableDefinition<u64, &[u8]> = TableDefinition::new("volumes");
pub(crate) const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
pub(crate) const MAP: TableDefinition<(u64, u64, u64), u64> = TableDefinition::new("map");
pub(crate) const EPOCHS: TableDefinition<(u64, u64, u64), ()> = TableDefinition::new("epochs");
pub(crate) const PROFILES: TableDefinition<u64, &[u8]> = TableDefinition::new("profiles");
pub(crate) const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

/// Physical chunk number meaning "reads as zeroes, holds no space".
pub(crate) const ZERO: u64 = u64::MAX;

/// A volume as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct VolumeRec {
    pub id: u64,
    pub name: String,
    pub size: u64,
    /// The epoch the live volume writes in; snapshots freeze smaller ones.
    pub epoch: u64,
    /// For a clone: (lineage, epoch) of the snapshot it was made from.
    pub parent: Option<(u64, u64)>,
    /// Chunks without an entry are fetched from a source.
    pub lazy: bool,
}

/// A snapshot as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct SnapRec {
    pub name: String,
    pub volume: u64,
    pub epoch: u64,
    pub size: u64,
    /// The group snapshot it was taken in, if any.
    pub group: Option<String>,
    pub created: u64,
}

/// Create every table (so read transactions find them).
pub(crate) fn create_tables(db: &redb::Database) -> Result<()> {
    let txn = db.begin_write().ctx(|| "create metadata tables".into())?;
    {
        txn.open_table(VOLUMES)
            .ctx(|| "create table volumes".into())?;
        txn.open_table(SNAPSHOTS)
            .ctx(|| "create table snapshots".into())?;
        txn.open_table(MAP).ctx(|| "create table map".into())?;
        txn.open_table(EPOCHS)
            .ctx(|| "create table epochs".into())?;
        txn.open_table(PROFILES)
            .ctx(|| "create table profiles".into())?;
        let mut c = txn
            .open_table(COUNTERS)
            .ctx(|| "create table counters".into())?;
        if c.get("next_id").ctx(|| "read counter".into())?.is_none() {
            c.insert("next_id", 1).ctx(|| "init counter".into())?;
        }
    }
    txn.commit().ctx(|| "commit metadata tables".into())
}

/// Insert or replace a mapping entry, keeping the epoch index in step.
pub(crate) fn put_entry(
    map: &mut redb::Table<(u64, u64, u64), u64>,
    epochs: &mut redb::Table<(u64, u64, u64), ()>,
    key: (u64, u64, u64),
    phys: u64,
) -> Result<()> {
    map.insert(key, phys)
        .ctx(|| format!("insert map entry {key:?}"))?;
    epochs
        .insert((key.0, key.2, key.1), ())
        .ctx(|| format!("insert epoch index {key:?}"))?;
    Ok(())
}

/// Remove a mapping entry; returns its physical chunk if it existed.
pub(crate) fn del_entry(
    map: &mut redb::Table<(u64, u64, u64), u64>,
    epochs: &mut redb::Table<(u64, u64, u64), ()>,
    key: (u64, u64, u64),
) -> Result<Option<u64>> {
    let old = map
        .remove(key)
        .ctx(|| format!("remove map entry {key:?}"))?
        .map(|g| g.value());
    epochs
        .remove((key.0, key.2, key.1))
        .ctx(|| format!("remove epoch index {key:?}"))?;
    Ok(old)
}

/// The content of every chunk of `lineage` at `epoch`, following clones into
/// their parents: chunk → (physical chunk or ZERO, epoch of the entry, own).
/// `own` is false for entries inherited from a parent lineage.
pub(crate) fn view<T: ReadableTable<(u64, u64, u64), u64>>(
    map: &T,
    volumes: &HashMap<u64, VolumeRec>,
    lineage: u64,
    epoch: u64,
) -> Result<HashMap<u64, (u64, u64, bool)>> {
    let mut out: HashMap<u64, (u64, u64, bool)> = HashMap::new();
    let range = map
        .range((lineage, 0, 0)..=(lineage, u64::MAX, u64::MAX))
        .ctx(|| format!("scan map of lineage {lineage}"))?;
    for item in range {
        let (k, v) = item.ctx(|| format!("scan map of lineage {lineage}"))?;
        let (_, chunk, e) = k.value();
        if e <= epoch {
            // Keys are ordered by epoch within a chunk: the last one wins.
            out.insert(chunk, (v.value(), e, true));
        }
    }
    if let Some((p, pe)) = volumes.get(&lineage).and_then(|v| v.parent) {
        for (chunk, (phys, e, _)) in view(map, volumes, p, pe)? {
            out.entry(chunk).or_insert((phys, e, false));
        }
    }
    Ok(out)
}

/// The content of one chunk of `lineage` at `epoch` (physical chunk or ZERO),
/// or None for a hole.
pub(crate) fn resolve<T: ReadableTable<(u64, u64, u64), u64>>(
    map: &T,
    parents: &dyn Fn(u64) -> Option<(u64, u64)>,
    lineage: u64,
    chunk: u64,
    epoch: u64,
) -> Result<Option<u64>> {
    let mut l = lineage;
    let mut e = epoch;
    loop {
        let mut r = map
            .range((l, chunk, 0)..=(l, chunk, e))
            .ctx(|| format!("look up chunk {chunk} of lineage {l}"))?;
        if let Some(item) = r.next_back() {
            let (_, v) = item.ctx(|| format!("look up chunk {chunk} of lineage {l}"))?;
            return Ok(Some(v.value()));
        }
        match parents(l) {
            Some((p, pe)) => {
                l = p;
                e = pe;
            }
            None => return Ok(None),
        }
    }
}

fn bad(what: String) -> Error {
    Error::new(ErrorKind::Metadata, what)
}

/// Decode and check the stored record of volume `key`: well-formed JSON,
/// its own id, a valid name, an epoch ≥ 1, and a clone's parent an older
/// lineage (ids only grow, so parent chains end).
pub(crate) fn decode_volume(key: u64, bytes: &[u8]) -> Result<VolumeRec> {
    let rec: VolumeRec =
        serde_json::from_slice(bytes).ctx(|| format!("decode record of volume {key}"))?;
    if rec.id != key {
        return Err(bad(format!(
            "record of volume {key} names volume id {}",
            rec.id
        )));
    }
    if rec.name.is_empty() || rec.name.len() > 255 || rec.name.contains('\0') {
        return Err(bad(format!(
            "record of volume {key}: invalid name {:?}",
            rec.name
        )));
    }
    if rec.epoch == 0 || rec.epoch == u64::MAX {
        return Err(bad(format!(
            "record of volume {key} ({}): invalid epoch {}",
            rec.name, rec.epoch
        )));
    }
    if let Some((p, pe)) = rec.parent
        && (p >= key || pe == 0)
    {
        return Err(bad(format!(
            "record of volume {key} ({}): invalid parent snapshot ({p}, {pe})",
            rec.name
        )));
    }
    Ok(rec)
}

/// Decode and check the stored record of snapshot `key`.
pub(crate) fn decode_snapshot(key: &str, bytes: &[u8]) -> Result<SnapRec> {
    let rec: SnapRec =
        serde_json::from_slice(bytes).ctx(|| format!("decode record of snapshot {key:?}"))?;
    if rec.name != key {
        return Err(bad(format!(
            "record of snapshot {key:?} names snapshot {:?}",
            rec.name
        )));
    }
    if rec.epoch == 0 {
        return Err(bad(format!("record of snapshot {key:?}: epoch 0")));
    }
    Ok(rec)
}

/// Decode a stored read profile: a list of distinct chunk numbers.
pub(crate) fn decode_profile(key: u64, bytes: &[u8]) -> Result<Vec<u64>> {
    let chunks: Vec<u64> =
        serde_json::from_slice(bytes).ctx(|| format!("decode read profile of volume {key}"))?;
    let mut seen = std::collections::HashSet::with_capacity(chunks.len());
    if let Some(c) = chunks.iter().find(|c| !seen.insert(**c)) {
        return Err(bad(format!(
            "read profile of volume {key} lists chunk {c} twice"
        )));
    }
    Ok(chunks)
}

/// Check the decoded catalog as a whole: snapshots of existing volumes and
/// older epochs, clones of existing snapshots, ids below the next id.
pub(crate) fn check_catalog(
    recs: &HashMap<u64, VolumeRec>,
    snaps: &std::collections::BTreeMap<String, SnapRec>,
    next_id: u64,
) -> Result<()> {
    for s in snaps.values() {
        match recs.get(&s.volume) {
            None => {
                return Err(bad(format!(
                    "snapshot {:?} of volume id {} that does not exist",
                    s.name, s.volume
                )));
            }
            Some(v) if s.epoch >= v.epoch => {
                return Err(bad(format!(
                    "snapshot {:?} at epoch {} not older than volume {} at epoch {}",
                    s.name, s.epoch, v.name, v.epoch
                )));
            }
            Some(_) => {}
        }
    }
    let mut names = std::collections::HashSet::new();
    for r in recs.values() {
        if r.id >= next_id {
            return Err(bad(format!(
                "volume {} has id {} not below the next id {next_id}",
                r.name, r.id
            )));
        }
        if !names.insert(r.name.as_str()) {
            return Err(bad(format!("two volumes named {}", r.name)));
        }
        if let Some((p, pe)) = r.parent
            && !snaps.values().any(|s| s.volume == p && s.epoch == pe)
        {
            return Err(bad(format!(
                "clone {} of snapshot ({p}, {pe}) that does not exist",
                r.name
            )));
        }
    }
    Ok(())
}

pub(crate) fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize")
}
