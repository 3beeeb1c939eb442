//! Read profiles: which chunks a volume reads, in first-read order, after a
//! start marker, until a number of reads or a duration has passed. Instant
//! restore hydrates these chunks first. The profile is persisted with the
//! volume at each commit.

use std::collections::HashSet;
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::pool::lock;
use crate::volume::Volume;

/// When a read profile stops recording.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProfileLimit {
    /// After this many reads.
    Reads(u64),
    /// After this long.
    Duration(Duration),
}

#[derive(Default)]
struct State {
    limit: Option<ProfileLimit>,
    started: Option<Instant>,
    reads: u64,
    order: Vec<u64>,
    seen: HashSet<u64>,
    dirty: bool,
}

#[derive(Default)]
pub(crate) struct Profile {
    active: AtomicBool,
    st: Mutex<State>,
}

impl Profile {
    /// Note a read of chunk `c` (a relaxed load when no profile runs).
    pub fn record(&self, c: u64) {
        if !self.active.load(Ordering::Relaxed) {
            return;
        }
        let mut st = lock(&self.st);
        let over = match st.limit {
            Some(ProfileLimit::Reads(n)) => st.reads >= n,
            Some(ProfileLimit::Duration(d)) => st.started.is_some_and(|s| s.elapsed() >= d),
            None => true,
        };
        if over {
            self.active.store(false, Ordering::Relaxed);
            return;
        }
        st.reads += 1;
        if st.seen.insert(c) {
            st.order.push(c);
            st.dirty = true;
        }
    }
}

impl crate::volume::VolInner {
    pub(crate) fn profile_to_persist(&self) -> Option<(u64, Vec<u8>)> {
        let mut st = lock(&self.profile.st);
        if !st.dirty {
            return None;
        }
        st.dirty = false;
        Some((
            self.id,
            serde_json::to_vec(&st.order).expect("chunk list serializes"),
        ))
    }

    pub(crate) fn profile_dirty(&self) -> bool {
        lock(&self.profile.st).dirty
    }

    pub(crate) fn load_profile(&self, order: Vec<u64>) {
        let mut st = lock(&self.profile.st);
        st.seen = order.iter().copied().collect();
        st.order = order;
    }
}

impl Volume {
    /// Start recording the chunks read from now on, until `limit`. Replaces
    /// any earlier profile; persisted at each flush.
    pub fn start_read_profile(&self, limit: ProfileLimit) {
        {
            let mut st = lock(&self.v.profile.st);
            *st = State {
                limit: Some(limit),
                started: Some(Instant::now()),
                dirty: true,
                ..State::default()
            };
            self.v.profile.active.store(true, Ordering::Relaxed);
        }
        let mut list = lock(&self.sh.profiling);
        if !list.iter().any(|v| v.id == self.v.id) {
            list.push(self.v.clone());
        }
    }

    /// Replace the volume's profile by `ranges` of chunks, in that order
    /// (chunks past the end and repeats are dropped), and stop any
    /// recording. Persisted at the next flush. A restored volume gets its
    /// backup's profile this way.
    pub fn set_read_profile(&self, ranges: &[Range<u64>]) {
        let chunks = self.size().div_ceil(self.chunk_size());
        {
            let mut st = lock(&self.v.profile.st);
            self.v.profile.active.store(false, Ordering::Relaxed);
            *st = State {
                dirty: true,
                ..State::default()
            };
            for r in ranges {
                for c in r.start..r.end.min(chunks) {
                    if st.seen.insert(c) {
                        st.order.push(c);
                    }
                }
            }
        }
        let mut list = lock(&self.sh.profiling);
        if !list.iter().any(|v| v.id == self.v.id) {
            list.push(self.v.clone());
        }
    }

    /// True while a read profile is recording.
    pub fn read_profile_active(&self) -> bool {
        self.v.profile.active.load(Ordering::Relaxed)
    }

    /// The recorded profile as chunk ranges in first-read order (consecutive
    /// chunks read in ascending order are merged into one range).
    pub fn read_profile(&self) -> Vec<Range<u64>> {
        let st = lock(&self.v.profile.st);
        let mut out: Vec<Range<u64>> = Vec::new();
        for &c in &st.order {
            match out.last_mut() {
                Some(r) if r.end == c => r.end += 1,
                _ => out.push(c..c + 1),
            }
        }
        out
    }
}
