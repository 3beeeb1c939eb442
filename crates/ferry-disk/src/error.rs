//! The crate's error type.

/// Why a disk's partition table could not be read.
///
/// A caller that only wants a progress hierarchy treats any of these as
/// "the disk is one piece"; none of them is fatal to a copy.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("reading {len} bytes at offset {offset}: {source}")]
    Io {
        offset: u64,
        len: usize,
        source: std::io::Error,
    },
    /// The primary GPT and its backup are both unusable.
    #[error("GPT unusable: primary: {primary}; backup: {backup}")]
    Gpt { primary: String, backup: String },
    /// The MBR (or one of its extended boot records) is corrupt.
    #[error("MBR corrupt: {0}")]
    Mbr(String),
    /// Partitions overlap or lie outside the disk.
    #[error("partition table inconsistent: {0}")]
    Layout(String),
}
