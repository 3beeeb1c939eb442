//! The read path's view of a volume's live map: one atomic word per chunk
//! in a three-level radix table, so a read looks its chunks up without
//! taking a lock or writing a shared cache line.
//!
//! The shards of [`crate::volume::VolInner`] stay the truth; every change of
//! a shard entry is mirrored here while the shard's write lock is held, so
//! the words of one chunk change in the order of its entries.
//!
//! A word holds the chunk's kind (hole, zeroes, data, or "ask the shards"),
//! its physical chunk, and a generation that grows with every change of the
//! word. A reader loads the words of its run, preads, and loads them again:
//! if one changed, the chunk may have been freed and reused during the
//! pread, and the read is done again under the shard locks. A freed chunk is
//! reused only after its entry changed (the change is staged and committed
//! first), so data read from a reused chunk always shows as a changed word.
//! The generation (22 bits) makes a word that went away and came back (a
//! chunk trimmed and the same physical chunk written again) differ too; a
//! false match needs 4 million changes of one chunk during one pread.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::meta::ZERO;
use crate::volume::Slot;

const FAN_BITS: u32 = 9;
const FAN: usize = 1 << FAN_BITS;
/// Chunks the table covers (2^27: 8 PiB of 64 KiB chunks); chunks beyond
/// take the shards' path.
const COVERED: u64 = 1 << (3 * FAN_BITS);

const PHYS_BITS: u32 = 40;
const PHYS_MASK: u64 = (1 << PHYS_BITS) - 1;
const KIND_SHIFT: u32 = PHYS_BITS;
const GEN_SHIFT: u32 = PHYS_BITS + 2;

const HOLE: u64 = 0;
const ZEROES: u64 = 1;
const DATA: u64 = 2;
const SLOW: u64 = 3;

/// What one chunk holds, as the read path needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fast {
    /// No entry: zeroes, or (lazy volume) not fetched yet.
    Hole,
    /// Reads as zeroes.
    Zeroes,
    /// Data in this physical chunk.
    Data(u64),
    /// Not covered here: ask the shards.
    Slow,
}

/// One chunk's word: compare two of them to see whether the chunk changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Word(u64);

impl Word {
    pub fn fast(self) -> Fast {
        match (self.0 >> KIND_SHIFT) & 3 {
            HOLE => Fast::Hole,
            ZEROES => Fast::Zeroes,
            DATA => Fast::Data(self.0 & PHYS_MASK),
            _ => Fast::Slow,
        }
    }
}

type Leaf = Box<[AtomicU64]>;
type Mid = Box<[OnceLock<Leaf>]>;

/// See the module documentation.
pub(crate) struct FastMap {
    top: Box<[OnceLock<Mid>]>,
}

impl Default for FastMap {
    fn default() -> FastMap {
        FastMap {
            top: (0..FAN).map(|_| OnceLock::new()).collect(),
        }
    }
}

fn index(c: u64) -> (usize, usize, usize) {
    let m = FAN as u64 - 1;
    (
        (c >> (2 * FAN_BITS)) as usize,
        ((c >> FAN_BITS) & m) as usize,
        (c & m) as usize,
    )
}

impl FastMap {
    /// The word of chunk `c` (a hole where nothing was ever stored).
    pub fn load(&self, c: u64) -> Word {
        if c >= COVERED {
            return Word(SLOW << KIND_SHIFT);
        }
        let (t, m, l) = index(c);
        match self.top[t].get().and_then(|mid| mid[m].get()) {
            Some(leaf) => Word(leaf[l].load(Ordering::Acquire)),
            None => Word(HOLE << KIND_SHIFT),
        }
    }

    /// Mirror chunk `c`'s new shard entry. The caller holds the write lock
    /// of the chunk's shard.
    pub fn store(&self, c: u64, slot: Option<Slot>) {
        if c >= COVERED {
            return;
        }
        let (t, m, l) = index(c);
        let mid = self.top[t].get_or_init(|| (0..FAN).map(|_| OnceLock::new()).collect());
        let leaf = mid[m].get_or_init(|| (0..FAN).map(|_| AtomicU64::new(0)).collect());
        let word = &leaf[l];
        let old = word.load(Ordering::Relaxed);
        let kind_phys = match slot {
            None => HOLE << KIND_SHIFT,
            Some(s) if s.phys == ZERO => ZEROES << KIND_SHIFT,
            Some(s) if s.phys <= PHYS_MASK => DATA << KIND_SHIFT | s.phys,
            Some(_) => SLOW << KIND_SHIFT,
        };
        let generation = (old >> GEN_SHIFT).wrapping_add(1) << GEN_SHIFT;
        word.store(generation | kind_phys, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(phys: u64) -> Option<Slot> {
        Some(Slot {
            phys,
            epoch: 1,
            own: true,
        })
    }

    #[test]
    fn words_say_what_the_chunk_holds_and_change_on_every_store() {
        let m = FastMap::default();
        assert_eq!(m.load(7).fast(), Fast::Hole);
        m.store(7, data(42));
        let a = m.load(7);
        assert_eq!(a.fast(), Fast::Data(42));
        m.store(7, None);
        assert_eq!(m.load(7).fast(), Fast::Hole);
        m.store(7, data(42));
        let b = m.load(7);
        assert_eq!(b.fast(), Fast::Data(42));
        assert_ne!(a, b, "the same chunk again is a different word");
        m.store(
            7,
            Some(Slot {
                phys: ZERO,
                epoch: 2,
                own: true,
            }),
        );
        assert_eq!(m.load(7).fast(), Fast::Zeroes);
        m.store(1 << 40, data(1 << 41));
        assert_eq!(m.load(1 << 40).fast(), Fast::Slow, "beyond the table");
        m.store(COVERED - 1, data(1 << 41));
        assert_eq!(
            m.load(COVERED - 1).fast(),
            Fast::Slow,
            "physical beyond 40 bits"
        );
        m.store(COVERED - 2, data(PHYS_MASK));
        assert_eq!(m.load(COVERED - 2).fast(), Fast::Data(PHYS_MASK));
        assert_eq!(m.load(COVERED - 3).fast(), Fast::Hole);
    }
}
