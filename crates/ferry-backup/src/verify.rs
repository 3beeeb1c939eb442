//! `verify`: read and check every chunk (envelope, decryption,
//! decompression, content against id), every index and manifest, and say
//! which backups each bad chunk affects.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::Serialize;

use crate::crypto::ChunkId;
use crate::error::Result;
use crate::repo::Repository;

/// A chunk that failed its check.
#[derive(Debug, Clone, Serialize)]
pub struct BadChunk {
    /// The chunk's id.
    pub id: String,
    /// What is wrong with it.
    pub error: String,
    /// Backups that reference it (empty for an unreferenced chunk).
    pub backups: Vec<String>,
}

/// What `verify` found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    /// Backups checked.
    pub backups: usize,
    /// Chunks read and checked.
    pub chunks_checked: usize,
    /// Bad or missing chunks.
    pub bad_chunks: Vec<BadChunk>,
    /// Backups whose manifest or index cannot be read, with the error.
    pub bad_backups: Vec<(String, String)>,
    /// Every backup affected by a bad chunk, manifest or index.
    pub affected_backups: Vec<String>,
}

impl VerifyReport {
    /// True when nothing is wrong.
    pub fn ok(&self) -> bool {
        self.bad_chunks.is_empty() && self.bad_backups.is_empty()
    }
}

impl Repository {
    /// Check the whole repository with `threads` readers.
    pub fn verify(&self, threads: usize) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        let mut users: BTreeMap<ChunkId, Vec<String>> = BTreeMap::new();
        for id in self.list_ids()? {
            report.backups += 1;
            match self.show(&id).and_then(|m| self.backup_chunks(&m)) {
                Ok(set) => {
                    for c in set {
                        users.entry(c).or_default().push(id.clone());
                    }
                }
                Err(e) => report.bad_backups.push((id, e.to_string())),
            }
        }
        // Every stored chunk, and every referenced one (a missing chunk is
        // bad too).
        let mut all: BTreeSet<ChunkId> = users.keys().copied().collect();
        for o in self.store().list("chunks/")? {
            if let Some(id) = ChunkId::parse(&o.key) {
                all.insert(id);
            }
        }
        let all: Vec<ChunkId> = all.into_iter().collect();
        let next = AtomicUsize::new(0);
        let bad = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..threads.max(1) {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&id) = all.get(i) else { break };
                        if let Err(e) = self.read_chunk(id) {
                            bad.lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(BadChunk {
                                    id: id.to_string(),
                                    error: e.to_string(),
                                    backups: users.get(&id).cloned().unwrap_or_default(),
                                });
                        }
                    }
                });
            }
        });
        report.chunks_checked = all.len();
        report.bad_chunks = bad.into_inner().unwrap_or_else(|e| e.into_inner());
        report.bad_chunks.sort_by(|a, b| a.id.cmp(&b.id));
        let mut affected: BTreeSet<String> = BTreeSet::new();
        for b in &report.bad_chunks {
            affected.extend(b.backups.iter().cloned());
        }
        affected.extend(report.bad_backups.iter().map(|(id, _)| id.clone()));
        report.affected_backups = affected.into_iter().collect();
        Ok(report)
    }
}
