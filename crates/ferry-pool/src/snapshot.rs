//! Reading snapshots and change tracking.
//!
//! A snapshot is (lineage, epoch): its content is, per chunk, the newest
//! mapping entry with an epoch ≤ the snapshot's, falling through to the
//! parent snapshot for a clone. Entries at or below a snapshot's epoch are
//! never modified while the snapshot exists (the live volume copies on
//! write), so reads need only a read transaction of the metadata store.
//!
//! The chunks changed between snapshot A and snapshot B (or the live volume)
//! are the entries of the lineage with epoch in (A, B]; the `epochs` index
//! reads exactly those.

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;

use redb::ReadableDatabase;

use crate::control::Pool;
use crate::error::{Ctx, Error, ErrorKind, Result};
use crate::meta::{self, EPOCHS, MAP, ZERO};
use crate::volume::Volume;

/// A read-only handle on a snapshot.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pool: Pool,
    name: String,
    lineage: u64,
    epoch: u64,
    size: u64,
    parents: HashMap<u64, Option<(u64, u64)>>,
}

impl Pool {
    /// A read-only handle on snapshot `name`.
    pub fn open_snapshot(&self, name: &str) -> Result<Snapshot> {
        let rec = self.snap_rec(name)?;
        Ok(Snapshot {
            pool: self.clone(),
            name: name.to_string(),
            lineage: rec.volume,
            epoch: rec.epoch,
            size: rec.size,
            parents: self.parents(),
        })
    }

    /// Byte ranges of `volume` written between snapshot `from` and snapshot
    /// `to` (or the live volume when `to` is None). Survives restarts: it is
    /// read from the metadata store.
    pub fn changed_between(
        &self,
        volume: &str,
        from: &str,
        to: Option<&str>,
    ) -> Result<Vec<Range<u64>>> {
        let vol = self.volume(volume)?;
        let a = self.snap_rec(from)?;
        let id = vol.v.id;
        if a.volume != id {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("changes of volume {volume}: snapshot {from} is of another volume"),
            ));
        }
        let (b_epoch, size) = match to {
            Some(t) => {
                let b = self.snap_rec(t)?;
                if b.volume != id || b.epoch < a.epoch {
                    return Err(Error::new(
                        ErrorKind::InvalidArgument,
                        format!(
                            "changes of volume {volume}: snapshot {t} is not a later snapshot of the volume than {from}"
                        ),
                    ));
                }
                (b.epoch, b.size)
            }
            None => {
                // Live changes may still be pending: commit them first.
                self.sh.commit_with(|_, _| Ok(()))?;
                (u64::MAX, vol.size())
            }
        };
        let txn = self
            .sh
            .db
            .begin_read()
            .ctx(|| format!("changes of volume {volume}"))?;
        let ep = txn.open_table(EPOCHS).ctx(|| "open epochs".into())?;
        let mut chunks = BTreeSet::new();
        if a.epoch < b_epoch {
            for item in ep
                .range((id, a.epoch + 1, 0)..=(id, b_epoch, u64::MAX))
                .ctx(|| format!("changes of volume {volume}"))?
            {
                let (k, _) = item.ctx(|| format!("changes of volume {volume}"))?;
                chunks.insert(k.value().2);
            }
        }
        let cs = self.sh.chunk;
        let mut out: Vec<Range<u64>> = Vec::new();
        for c in chunks {
            let start = c * cs;
            if start >= size {
                continue;
            }
            let end = (start + cs).min(size);
            match out.last_mut() {
                Some(r) if r.end == start => r.end = end,
                _ => out.push(start..end),
            }
        }
        Ok(out)
    }
}

impl Volume {
    /// Byte ranges written since snapshot `from` (a snapshot of this volume).
    pub fn changed_since(&self, pool: &Pool, from: &str) -> Result<Vec<Range<u64>>> {
        pool.changed_between(self.name(), from, None)
    }
}

impl Snapshot {
    /// The snapshot's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Size of the volume when the snapshot was taken.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The read of `[off, off + len)` as places in the mapped data file
    /// (see [`crate::MappedRead`]; its bytes may be read in place once
    /// [`crate::MappedRead::into_cached`] found them cached), when every
    /// chunk of it holds
    /// data; `None` otherwise (holes, zeroes, out of bounds, a deleted
    /// snapshot, no mapping), and the caller reads with
    /// [`Snapshot::read_at`].
    pub fn try_read_mapped(&self, off: u64, len: u64) -> Option<crate::MappedRead> {
        let sh = &self.pool.sh;
        if len == 0 || off.checked_add(len).is_none_or(|e| e > self.size) {
            return None;
        }
        let txn = sh.db.begin_read().ok()?;
        let map = txn.open_table(MAP).ok()?;
        let parents = |l: u64| self.parents.get(&l).copied().flatten();
        let (mut pinned, mut runs) = (Vec::new(), Vec::new());
        for (c, within, n, _) in sh.pieces(off, len) {
            match meta::resolve(&map, &parents, self.lineage, c, self.epoch).ok()? {
                None | Some(ZERO) => return None,
                Some(p) => {
                    pinned.push(p);
                    crate::pool::add_run(&mut runs, sh.data_at(p) + within, n as u64);
                }
            }
        }
        // Pinned, then still there (the same snapshot, not a new one of
        // that name): its chunks were not freed before the pin (deleting
        // a snapshot frees them under the catalog's lock).
        sh.mapped_read(pinned, &runs, true, || {
            self.pool
                .snap_rec(&self.name)
                .is_ok_and(|r| (r.volume, r.epoch) == (self.lineage, self.epoch))
        })
    }

    /// Read `buf.len()` bytes at `off` of the frozen content.
    pub fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        let sh = &self.pool.sh;
        if off
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.size)
        {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "read snapshot {}: range {off}+{} beyond size {}",
                    self.name,
                    buf.len(),
                    self.size
                ),
            ));
        }
        // Refuse reads of a deleted snapshot (its chunks may be reused).
        self.pool.snap_rec(&self.name)?;
        let txn = sh
            .db
            .begin_read()
            .ctx(|| format!("read snapshot {}", self.name))?;
        let map = txn.open_table(MAP).ctx(|| "open map".into())?;
        let parents = |l: u64| self.parents.get(&l).copied().flatten();
        let cs = sh.chunk;
        // Chunks that follow each other in the data file are read with one
        // pread: (first physical chunk, offset within it, start in buf, length).
        let mut run: Option<(u64, u64, usize, usize)> = None;
        for (c, within, n, at) in sh.pieces(off, buf.len() as u64) {
            match meta::resolve(&map, &parents, self.lineage, c, self.epoch)? {
                None | Some(ZERO) => buf[at..at + n].fill(0),
                Some(p) => match &mut run {
                    Some((p0, w0, a0, len))
                        if within == 0
                            && *a0 + *len == at
                            && p > *p0
                            && *w0 + *len as u64 == (p - *p0) * cs =>
                    {
                        *len += n;
                    }
                    _ => {
                        if let Some((p0, w0, a0, len)) = run.take() {
                            sh.pread(p0, w0, &mut buf[a0..a0 + len])?;
                        }
                        run = Some((p, within, at, n));
                    }
                },
            }
        }
        if let Some((p0, w0, a0, len)) = run {
            sh.pread(p0, w0, &mut buf[a0..a0 + len])?;
        }
        Ok(())
    }
}
