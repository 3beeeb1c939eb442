//! An in-memory sparse disk: 64 KiB chunks allocated on first write, and
//! change tracking per snapshot (the `ferry:changed:<snapshot>` contexts),
//! as a pool volume offers them. For tests, and as the model a pool
//! adapter is checked against.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::sync::RwLock;

use super::push_extent;
use crate::export::{Export, Extent};
use crate::proto::{
    CONTEXT_ALLOCATION, CONTEXT_CHANGED_PREFIX, STATE_CHANGED, STATE_HOLE, STATE_ZERO,
};

const CHUNK: u64 = 64 << 10;

#[derive(Default)]
struct Inner {
    chunks: HashMap<u64, Box<[u8]>>,
    /// Snapshot name → chunks changed since it was taken.
    changed: BTreeMap<String, BTreeSet<u64>>,
}

pub struct MemoryExport {
    size: u64,
    read_only: bool,
    inner: RwLock<Inner>,
}

impl MemoryExport {
    pub fn new(size: u64) -> Self {
        MemoryExport {
            size,
            read_only: false,
            inner: RwLock::new(Inner::default()),
        }
    }

    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// Starts tracking changes under `name`: from now on the context
    /// `ferry:changed:<name>` reports every chunk written, trimmed or zeroed.
    pub fn snapshot(&self, name: &str) {
        let mut g = self.inner.write().unwrap_or_else(|e| e.into_inner());
        g.changed.insert(name.to_string(), BTreeSet::new());
    }

    /// Bytes of chunks allocated.
    pub fn allocated(&self) -> u64 {
        let g = self.inner.read().unwrap_or_else(|e| e.into_inner());
        g.chunks.len() as u64 * CHUNK
    }

    fn mark(g: &mut Inner, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let (first, last) = (offset / CHUNK, (offset + len - 1) / CHUNK);
        for set in g.changed.values_mut() {
            set.extend(first..=last);
        }
    }

    fn zero_range(&self, g: &mut Inner, offset: u64, len: u64, punch: bool) {
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let idx = pos / CHUNK;
            let start = pos - idx * CHUNK;
            let n = (CHUNK - start).min(end - pos);
            if punch && start == 0 && n == CHUNK {
                g.chunks.remove(&idx);
            } else if let Some(c) = g.chunks.get_mut(&idx) {
                c[start as usize..(start + n) as usize].fill(0);
            } else if !punch {
                g.chunks
                    .insert(idx, vec![0u8; CHUNK as usize].into_boxed_slice());
            }
            pos += n;
        }
        Self::mark(g, offset, len);
    }
}

impl Export for MemoryExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn can_multi_conn(&self) -> bool {
        true
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let g = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let idx = pos / CHUNK;
            let start = (pos - idx * CHUNK) as usize;
            let n = (CHUNK as usize - start).min(buf.len() - done);
            match g.chunks.get(&idx) {
                Some(c) => buf[done..done + n].copy_from_slice(&c[start..start + n]),
                None => buf[done..done + n].fill(0),
            }
            done += n;
        }
        Ok(())
    }

    fn try_read_at(&self, offset: u64, buf: &mut [u8]) -> Option<io::Result<()>> {
        Some(self.read_at(offset, buf))
    }

    fn write_at(&self, offset: u64, data: &[u8], _fua: bool) -> io::Result<()> {
        if self.read_only {
            return Err(io::ErrorKind::PermissionDenied.into());
        }
        let mut g = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let idx = pos / CHUNK;
            let start = (pos - idx * CHUNK) as usize;
            let n = (CHUNK as usize - start).min(data.len() - done);
            let c = g
                .chunks
                .entry(idx)
                .or_insert_with(|| vec![0u8; CHUNK as usize].into_boxed_slice());
            c[start..start + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        Self::mark(&mut g, offset, data.len() as u64);
        Ok(())
    }

    fn try_write_at(&self, offset: u64, data: &[u8], fua: bool) -> Option<io::Result<()>> {
        Some(self.write_at(offset, data, fua))
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len, true, false)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_punch: bool, _fast: bool) -> io::Result<()> {
        if self.read_only {
            return Err(io::ErrorKind::PermissionDenied.into());
        }
        let mut g = self.inner.write().unwrap_or_else(|e| e.into_inner());
        self.zero_range(&mut g, offset, len, may_punch);
        Ok(())
    }

    fn can_fast_zero(&self) -> bool {
        true
    }

    fn meta_contexts(&self) -> Vec<String> {
        let g = self.inner.read().unwrap_or_else(|e| e.into_inner());
        g.changed
            .keys()
            .map(|k| format!("{CONTEXT_CHANGED_PREFIX}{k}"))
            .collect()
    }

    fn try_block_status(
        &self,
        context: &str,
        offset: u64,
        len: u64,
    ) -> Option<io::Result<Vec<Extent>>> {
        Some(self.block_status(context, offset, len))
    }

    fn block_status(&self, context: &str, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let g = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let end = offset.saturating_add(len).min(self.size);
        let changed = match context {
            CONTEXT_ALLOCATION => None,
            c => match c.strip_prefix(CONTEXT_CHANGED_PREFIX) {
                Some(snap) => Some(g.changed.get(snap).ok_or(io::ErrorKind::InvalidInput)?),
                None => return Err(io::ErrorKind::InvalidInput.into()),
            },
        };
        let mut v = Vec::new();
        let mut pos = offset;
        while pos < end {
            let idx = pos / CHUNK;
            let n = ((idx + 1) * CHUNK).min(end) - pos;
            let flags = match changed {
                None if g.chunks.contains_key(&idx) => 0,
                None => STATE_HOLE | STATE_ZERO,
                Some(set) if set.contains(&idx) => STATE_CHANGED,
                Some(_) => 0,
            };
            push_extent(&mut v, n, flags);
            pos += n;
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_reads_writes_and_change_tracking() {
        let m = MemoryExport::new(1 << 20);
        m.snapshot("s1");
        m.write_at(70_000, b"hello", false).unwrap();
        let mut b = [1u8; 10];
        m.read_at(69_998, &mut b).unwrap();
        assert_eq!(&b, b"\0\0hello\0\0\0");
        let alloc = m.block_status(CONTEXT_ALLOCATION, 0, 1 << 20).unwrap();
        assert_eq!(
            alloc,
            vec![
                Extent {
                    length: CHUNK,
                    flags: 3
                },
                Extent {
                    length: CHUNK,
                    flags: 0
                },
                Extent {
                    length: (1 << 20) - 2 * CHUNK,
                    flags: 3
                },
            ]
        );
        let ch = m.block_status("ferry:changed:s1", 0, 3 * CHUNK).unwrap();
        assert_eq!(
            ch[1],
            Extent {
                length: CHUNK,
                flags: STATE_CHANGED
            }
        );
        m.trim(CHUNK, CHUNK).unwrap();
        assert_eq!(m.allocated(), 0);
        assert!(m.block_status("ferry:changed:nope", 0, 1).is_err());
    }
}
