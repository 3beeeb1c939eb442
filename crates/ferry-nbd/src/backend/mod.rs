//! The backends of this crate: a raw file and an in-memory sparse disk.
//! (The pool's volumes are served through an adapter in another crate.)

mod file;
mod memory;

pub use file::FileExport;
pub use memory::MemoryExport;

use crate::export::Extent;

/// Appends an extent, merging it with the previous one when the flags match.
pub(crate) fn push_extent(v: &mut Vec<Extent>, length: u64, flags: u32) {
    if length == 0 {
        return;
    }
    if let Some(last) = v.last_mut()
        && last.flags == flags
    {
        last.length += length;
        return;
    }
    v.push(Extent { length, flags });
}
