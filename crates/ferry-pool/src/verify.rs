//! Space accounting and `verify` (fsck): every invariant of the metadata and
//! of the in-memory state, checked against each other.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use redb::{ReadableDatabase, ReadableTable};

use crate::control::Pool;
use crate::error::{Ctx, Error, ErrorKind, Result};
use crate::meta::{self, COUNTERS, EPOCHS, MAP, ZERO};
use crate::pool::lock;

/// Space used by the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolUsage {
    /// Bytes per chunk.
    pub chunk_size: u64,
    /// Bytes of chunks in use (including chunks whose release awaits the next flush).
    pub used_bytes: u64,
    /// Size limit, if any.
    pub limit_bytes: Option<u64>,
}

/// Space of one volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VolumeSpace {
    /// Live chunks no snapshot or clone shares: freed if the volume is deleted.
    pub exclusive_bytes: u64,
    /// Live chunks shared with snapshots or inherited from a clone's parent.
    pub shared_bytes: u64,
    /// Chunks of this volume's lineage only its snapshots still see.
    pub snapshot_only_bytes: u64,
}

impl Pool {
    /// Space used by the pool.
    pub fn usage(&self) -> PoolUsage {
        let a = lock(&self.sh.alloc);
        PoolUsage {
            chunk_size: self.sh.chunk,
            used_bytes: a.used * self.sh.chunk,
            limit_bytes: a.limit.map(|l| l * self.sh.chunk),
        }
    }

    /// Set or clear the pool's size limit (persisted).
    pub fn set_limit(&self, limit_bytes: Option<u64>) -> Result<()> {
        self.sh.commit_with(|txn, _| {
            let mut c = txn.open_table(COUNTERS).ctx(|| "open counters".into())?;
            match limit_bytes {
                Some(l) => c
                    .insert("limit_bytes", l)
                    .ctx(|| "store pool limit".into())?,
                None => c.remove("limit_bytes").ctx(|| "clear pool limit".into())?,
            };
            Ok(())
        })?;
        lock(&self.sh.alloc).limit = limit_bytes.map(|l| l / self.sh.chunk);
        Ok(())
    }

    /// Exclusive and shared bytes of volume `name`.
    pub fn volume_space(&self, name: &str) -> Result<VolumeSpace> {
        let vol = self.volume(name)?;
        self.sh.commit_with(|_, _| Ok(()))?;
        let cs = self.sh.chunk;
        let slots = vol.v.slots();
        let mut out = VolumeSpace::default();
        self.vol_state(&vol.v, |st| {
            for s in slots.values() {
                if s.phys == ZERO {
                    continue;
                }
                if s.own && st.exclusive(s.epoch) {
                    out.exclusive_bytes += cs;
                } else {
                    out.shared_bytes += cs;
                }
            }
        });
        let txn = self
            .sh
            .db
            .begin_read()
            .ctx(|| format!("space of volume {name}"))?;
        let map = txn.open_table(MAP).ctx(|| "open map".into())?;
        let id = vol.v.id;
        for item in map
            .range((id, 0, 0)..=(id, u64::MAX, u64::MAX))
            .ctx(|| format!("space of volume {name}"))?
        {
            let (k, v) = item.ctx(|| format!("space of volume {name}"))?;
            let (_, c, e) = k.value();
            let live = slots.get(&c).is_some_and(|s| s.own && s.epoch == e);
            if !live && v.value() != ZERO {
                out.snapshot_only_bytes += cs;
            }
        }
        Ok(out)
    }

    /// Check every invariant; returns the problems found (empty when clean).
    /// Waits for in-flight writes and holds new ones during the check.
    pub fn verify(&self) -> Result<Vec<String>> {
        crate::error::store_guard(|| "verify pool".into(), || self.verify_store())
    }

    fn verify_store(&self) -> Result<Vec<String>> {
        let cat = self.sh.catalog.read().unwrap_or_else(|e| e.into_inner());
        let mut vols: Vec<_> = cat.by_id.values().cloned().collect();
        vols.sort_by_key(|v| v.id);
        let states: Vec<_> = vols
            .iter()
            .map(|v| v.state.write().unwrap_or_else(|e| e.into_inner()))
            .collect();
        self.sh.commit_with(|_, _| Ok(()))?;
        let mut problems = Vec::new();
        let txn = self.sh.db.begin_read().ctx(|| "verify".into())?;
        let map = txn.open_table(MAP).ctx(|| "open map".into())?;
        let ep = txn.open_table(EPOCHS).ctx(|| "open epochs".into())?;
        // Freed chunks still being sent (limbo) count as used until the
        // send ends, and as free here.
        let (free, hw, used_count) = {
            let a = lock(&self.sh.alloc);
            let free: BTreeSet<u64> = a.free.union(&a.limbo).copied().collect();
            (free, a.hw, a.used - a.limbo.len() as u64)
        };
        let mut owners: HashMap<u64, (u64, u64, u64)> = HashMap::new();
        let mut chains: BTreeMap<(u64, u64), Vec<u64>> = BTreeMap::new();
        let mut keys = BTreeSet::new();
        for item in map.iter().ctx(|| "verify: scan map".into())? {
            let (k, v) = item.ctx(|| "verify: scan map".into())?;
            let (l, c, e) = k.value();
            let phys = v.value();
            keys.insert((l, e, c));
            chains.entry((l, c)).or_default().push(e);
            match cat.recs.get(&l) {
                None => problems.push(format!("map entry ({l},{c},{e}) of unknown volume {l}")),
                Some(r) if e > r.epoch || e == 0 => problems.push(format!(
                    "map entry ({l},{c},{e}) of volume {} beyond its epoch {}",
                    r.name, r.epoch
                )),
                _ => {}
            }
            if phys == ZERO {
                continue;
            }
            if phys >= hw {
                problems.push(format!(
                    "map entry ({l},{c},{e}) points past the data file end: chunk {phys}"
                ));
            }
            if free.contains(&phys) {
                problems.push(format!(
                    "physical chunk {phys} referenced by ({l},{c},{e}) is on the free list"
                ));
            }
            if let Some(o) = owners.insert(phys, (l, c, e)) {
                problems.push(format!(
                    "physical chunk {phys} referenced twice: {o:?} and ({l},{c},{e})"
                ));
            }
        }
        let mut ekeys = BTreeSet::new();
        for item in ep.iter().ctx(|| "verify: scan epochs".into())? {
            let (k, _) = item.ctx(|| "verify: scan epochs".into())?;
            ekeys.insert(k.value());
        }
        if ekeys != keys {
            problems.push(format!(
                "epoch index differs from map: {} missing, {} extra",
                keys.difference(&ekeys).count(),
                ekeys.difference(&keys).count()
            ));
        }
        for p in 0..hw {
            if !owners.contains_key(&p) && !free.contains(&p) {
                problems.push(format!(
                    "physical chunk {p} leaked: neither referenced nor free"
                ));
            }
        }
        if used_count != owners.len() as u64 {
            problems.push(format!(
                "space accounting: {used_count} chunks counted used, {} referenced",
                owners.len()
            ));
        }
        let snap_epochs: HashMap<u64, BTreeSet<u64>> =
            cat.snaps.values().fold(HashMap::new(), |mut m, s| {
                m.entry(s.volume).or_default().insert(s.epoch);
                m
            });
        // Within one interval between snapshots a chunk has at most one
        // entry; an older one would be visible to nobody (leaked).
        for ((l, c), es) in &chains {
            let snaps = snap_epochs.get(l).cloned().unwrap_or_default();
            for w in es.windows(2) {
                if snaps.range(w[0]..w[1]).next().is_none() {
                    problems.push(format!(
                        "map entry ({l},{c},{}) is hidden by ({l},{c},{}) and no snapshot sees it",
                        w[0], w[1]
                    ));
                }
            }
        }
        for s in cat.snaps.values() {
            match cat.recs.get(&s.volume) {
                None => problems.push(format!(
                    "snapshot {} of unknown volume {}",
                    s.name, s.volume
                )),
                Some(r) if s.epoch >= r.epoch => problems.push(format!(
                    "snapshot {} epoch {} not below volume epoch {}",
                    s.name, s.epoch, r.epoch
                )),
                _ => {}
            }
        }
        for (v, st) in vols.iter().zip(&states) {
            let rec = &cat.recs[&v.id];
            if let Some((p, pe)) = rec.parent
                && !cat.snaps.values().any(|s| s.volume == p && s.epoch == pe)
            {
                problems.push(format!(
                    "clone {} depends on a missing snapshot ({p},{pe})",
                    rec.name
                ));
            }
            if st.epoch != rec.epoch {
                problems.push(format!(
                    "volume {}: in-memory epoch {} but stored {}",
                    rec.name, st.epoch, rec.epoch
                ));
            }
            if st.snaps != snap_epochs.get(&v.id).cloned().unwrap_or_default() {
                problems.push(format!(
                    "volume {}: in-memory snapshot epochs differ from stored ones",
                    rec.name
                ));
            }
            let want = meta::view(&map, &cat.recs, v.id, rec.epoch)?;
            let have = v.slots();
            let want: HashMap<u64, (u64, u64, bool)> = want;
            let have: HashMap<u64, (u64, u64, bool)> = have
                .into_iter()
                .map(|(c, s)| (c, (s.phys, s.epoch, s.own)))
                .collect();
            if want != have {
                let diff = want.iter().filter(|(c, w)| have.get(c) != Some(w)).count()
                    + have.keys().filter(|c| !want.contains_key(c)).count();
                problems.push(format!(
                    "volume {}: live map differs from metadata in {diff} chunks",
                    rec.name
                ));
            }
        }
        Ok(problems)
    }

    /// `verify`, as an error naming the first problems when not clean.
    pub fn verify_clean(&self) -> Result<()> {
        let p = self.verify()?;
        if p.is_empty() {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::Metadata,
            format!(
                "verify pool {}: {} problems: {}",
                self.sh.dir.display(),
                p.len(),
                p.iter().take(5).cloned().collect::<Vec<_>>().join("; ")
            ),
        ))
    }
}
