//! Garbage collection (mark and sweep) and the writer markers that make it
//! safe against backups running at the same time.
//!
//! # Protocol
//!
//! A backup first stores a *writer marker* `writers/<backup id>` holding
//! its start time and its parent backup; only then does it store or touch
//! chunks. Every chunk it needs is either (a) stored by it (modified after
//! its marker), (b) found present and *touched* (modified time set to now,
//! after its marker), or (c) reused from its parent's index without being
//! read; for (c) the backup checks, just before committing its manifest,
//! that the parent's manifest still exists, and fails otherwise.
//!
//! The collector takes `start = now`, lists the markers, and sets the
//! cutoff to the earliest of `start` and the markers' start times (markers
//! older than [`STALE_WRITER`] are from crashed backups: ignored and
//! removed). Mark: every chunk of every index of every manifest, and of the
//! parents named by live markers. Sweep: a chunk not marked is removed only
//! if its modified time is before the cutoff. A backup whose marker the
//! collector saw started after the cutoff; one whose marker it did not see
//! wrote the marker after the collector's start. Either way its stored and
//! touched chunks are newer than the cutoff and survive. Its parent's
//! chunks are marked if the parent's manifest (or a marker naming it) was
//! seen; if the parent was forgotten before the collector looked, the
//! backup's final check fails and it commits nothing.
//!
//! Times are compared across two clocks: the markers' and the collector's
//! start come from the system clock, the chunks' modified times from the
//! file system, which stamps them with a coarse clock (a tick of up to
//! 10 ms behind on Linux, whole seconds on some file systems). A chunk
//! stored a millisecond after a marker can carry a time *before* it, so the
//! cutoff is moved back by [`CLOCK_SLACK`]: unreferenced chunks that recent
//! are kept until the next collection.
//!
//! The removal itself must not lose a touch that races with it: in a
//! directory the chunk is renamed aside, its time read again, and put back
//! if it was touched ([`crate::Storage::delete_if_older`]). Object stores
//! cannot do that atomically, so on them the collector sweeps nothing while
//! a live marker exists (it says so in [`GcStats::deferred`]), and keeps
//! chunks younger than [`OBJECT_STORE_GRACE`]. A residual window remains on
//! object stores: a backup that starts *during* a sweep and touches a chunk
//! between the collector's HEAD and DELETE of it. Run gc on S3 when no
//! backup is scheduled to start; `verify` finds such a loss.
//!
//! Index objects of forgotten backups (no manifest) are removed too, except
//! those of live writers and of the parents they name.

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::crypto::ChunkId;
use crate::error::{Error, ErrorKind, Result};
use crate::format::{self, MAGIC_WRITER};
use crate::repo::{Repository, manifest_key};

/// On stores without an atomic conditional delete (S3), chunks modified
/// less than this before the collection starts are kept too: it covers
/// clock skew between client and server and second-granular times.
pub const OBJECT_STORE_GRACE: Duration = Duration::from_secs(600);

/// How far the cutoff is moved back to cover the coarser clock of chunks'
/// modified times (see the module doc).
pub const CLOCK_SLACK: Duration = Duration::from_secs(2);

/// A marker older than this is from a backup that crashed.
pub const STALE_WRITER: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WriterMarker {
    pub id: String,
    pub start_ns: u128,
    pub parent: Option<String>,
    pub pid: u32,
}

fn ns(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

impl WriterMarker {
    pub fn write(repo: &Repository, id: &str, parent: Option<String>) -> Result<WriterMarker> {
        let m = WriterMarker {
            id: id.to_string(),
            start_ns: ns(SystemTime::now()),
            parent,
            pid: std::process::id(),
        };
        let json = serde_json::to_vec(&m).expect("marker serializes");
        repo.store()
            .put(&key(id), &format::seal(MAGIC_WRITER, &json, false, None))?;
        // No sync: a collector sees the marker as soon as it is renamed into
        // place, and after a crash the backup it protects has committed
        // nothing, so a marker lost with it is harmless.
        Ok(m)
    }

    pub fn remove(&self, repo: &Repository) {
        // A marker left behind only makes gc keep more; it goes stale.
        let _ = repo.store().delete(&key(&self.id));
    }
}

fn key(id: &str) -> String {
    format!("writers/{id}")
}

/// What a garbage collection did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcStats {
    /// Chunks stored before the collection.
    pub chunks: usize,
    /// Chunks some backup (or running backup) references.
    pub marked: usize,
    /// Chunks removed.
    pub removed: usize,
    /// Bytes removed.
    pub removed_bytes: u64,
    /// Unreferenced chunks kept because they are newer than the cutoff.
    pub kept_recent: usize,
    /// Index objects of forgotten backups removed.
    pub removed_indexes: usize,
    /// The sweep was skipped: a backup is running and the storage cannot
    /// remove conditionally in an atomic way.
    pub deferred: bool,
}

impl Repository {
    /// Mark and sweep unreferenced chunks; safe while backups run (see the
    /// module doc of `gc`).
    pub fn gc(&self) -> Result<GcStats> {
        let store = self.store();
        let start = SystemTime::now();
        let mut cutoff = if store.atomic_conditional_delete() {
            start
        } else {
            start - OBJECT_STORE_GRACE
        };
        let mut live_writers: HashSet<String> = HashSet::new();
        let mut protected_parents: HashSet<String> = HashSet::new();
        for o in store.list("writers/")? {
            let what = format!("writer marker {} in repository {}", o.key, self.location());
            let Some(blob) = store.get(&o.key)? else {
                continue;
            };
            let m: WriterMarker = format::open(MAGIC_WRITER, &blob, None, &what).and_then(|j| {
                serde_json::from_slice(&j)
                    .map_err(|e| Error::with_source(ErrorKind::Corrupt, what.clone(), e))
            })?;
            let t = UNIX_EPOCH + Duration::from_nanos(m.start_ns as u64);
            if start.duration_since(t).unwrap_or_default() > STALE_WRITER {
                store.delete(&o.key)?;
                continue;
            }
            cutoff = cutoff.min(t);
            live_writers.insert(m.id.clone());
            if let Some(p) = m.parent {
                protected_parents.insert(p);
            }
        }
        let cutoff = cutoff - CLOCK_SLACK;
        // Mark.
        let mut marked: HashSet<ChunkId> = HashSet::new();
        let objects = store.list("backups/")?;
        let mut with_manifest: HashSet<String> = HashSet::new();
        for o in &objects {
            if let Some(id) = o
                .key
                .strip_prefix("backups/")
                .and_then(|k| k.strip_suffix("/manifest"))
            {
                with_manifest.insert(id.to_string());
            }
        }
        for id in &with_manifest {
            let m = self.show(id)?;
            marked.extend(self.backup_chunks(&m)?);
        }
        let mut orphan_indexes = Vec::new();
        for o in &objects {
            let Some(rest) = o.key.strip_prefix("backups/") else {
                continue;
            };
            let Some((id, file)) = rest.split_once('/') else {
                continue;
            };
            if file == "manifest" || with_manifest.contains(id) || live_writers.contains(id) {
                continue;
            }
            if protected_parents.contains(id) {
                let ix = self.read_index(&o.key)?;
                marked.extend(ix.chunks.into_iter().filter(|c| *c != ChunkId::HOLE));
            } else {
                orphan_indexes.push(o.key.clone());
            }
        }
        // Sweep.
        let chunks = store.list("chunks/")?;
        let mut st = GcStats {
            chunks: chunks.len(),
            marked: 0,
            deferred: !live_writers.is_empty() && !store.atomic_conditional_delete(),
            ..GcStats::default()
        };
        for c in &chunks {
            let Some(id) = ChunkId::parse(&c.key) else {
                continue;
            };
            if marked.contains(&id) {
                st.marked += 1;
                continue;
            }
            if st.deferred || c.modified >= cutoff {
                st.kept_recent += 1;
                continue;
            }
            if store.delete_if_older(&c.key, cutoff)? {
                st.removed += 1;
                st.removed_bytes += c.size;
            } else {
                st.kept_recent += 1;
            }
        }
        if !st.deferred {
            for k in orphan_indexes {
                // Only indexes whose backup was forgotten (never those of a
                // manifest written meanwhile).
                let id = k.split('/').nth(1).unwrap_or_default();
                if !store.exists(&manifest_key(id))? {
                    store.delete(&k)?;
                    st.removed_indexes += 1;
                }
            }
        }
        store.sync()?;
        Ok(st)
    }
}
