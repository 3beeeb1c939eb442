//! Appending records, each one made durable (fdatasync) before it is
//! acknowledged.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorKind};
use crate::record;
use crate::verify::{self, Report};

/// An open records file, positioned after its last valid record.
#[derive(Debug)]
pub struct Writer {
    path: PathBuf,
    file: File,
    seed: u64,
    next_seq: u64,
    record_len: usize,
    resumed: Report,
}

impl Writer {
    /// Opens (or creates) the records file at `path` and positions after
    /// its last valid record.
    ///
    /// A torn tail (an unacknowledged write cut short) is cut off and the
    /// cut made durable. A file with damaged records is refused: appending
    /// would bury the evidence.
    pub fn open(path: &Path, record_len: usize) -> Result<Writer, Error> {
        // Validate the size before touching anything.
        record::encode(0, 0, record_len)?;
        let existed = path.exists();
        let resumed = if existed {
            verify::verify_file(path)?
        } else {
            verify::verify_bytes(&[])
        };
        if !resumed.ok {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "records file {} is damaged, not appending: {}",
                    path.display(),
                    resumed.errors.join("; ")
                ),
            ));
        }
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io("opening", path, e))?;
        if !existed {
            sync_parent(path)?;
        }
        if resumed.torn_tail_bytes > 0 {
            file.set_len(resumed.valid_bytes)
                .map_err(|e| Error::io("cutting the torn tail of", path, e))?;
            file.sync_all().map_err(|e| Error::io("syncing", path, e))?;
        }
        let seed = resumed.seed.unwrap_or_else(new_seed);
        Ok(Writer {
            path: path.to_owned(),
            file,
            seed,
            next_seq: resumed.records,
            record_len,
            resumed,
        })
    }

    /// What was found in the file when it was opened.
    pub fn resumed(&self) -> &Report {
        &self.resumed
    }

    /// The sequence number the next [`append`](Self::append) writes.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The file's seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Appends the next record and returns its sequence number once
    /// `fdatasync` has returned: the record is then acknowledged.
    pub fn append(&mut self) -> Result<u64, Error> {
        let seq = self.next_seq;
        let buf = record::encode(self.seed, seq, self.record_len)?;
        self.file
            .write_all(&buf)
            .map_err(|e| Error::io(&format!("appending record {seq} to"), &self.path, e))?;
        self.file
            .sync_data()
            .map_err(|e| Error::io(&format!("syncing record {seq} of"), &self.path, e))?;
        self.next_seq += 1;
        Ok(seq)
    }
}

/// Makes the creation of `path` durable by syncing its directory.
fn sync_parent(path: &Path) -> Result<(), Error> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("syncing directory", dir, e))
}

/// A seed that differs between files: time and process id mixed.
fn new_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut z = nanos ^ (u64::from(std::process::id()) << 32) ^ 0xD1B5_4A32_D192_ED03;
    z = (z ^ (z >> 33)).wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    z ^ (z >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("records");
        let mut w = Writer::open(&path, 100).unwrap();
        let seed = w.seed();
        for i in 0..5 {
            assert_eq!(w.append().unwrap(), i);
        }
        drop(w);
        let mut w = Writer::open(&path, 300).unwrap();
        assert_eq!(w.next_seq(), 5);
        assert_eq!(w.seed(), seed);
        assert_eq!(w.append().unwrap(), 5);
        let r = verify::verify_file(&path).unwrap();
        assert!(r.ok, "{:?}", r.errors);
        assert_eq!(r.records, 6);
        assert_eq!(r.valid_bytes, 5 * 100 + 300);
    }

    #[test]
    fn cuts_a_torn_tail_before_appending() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("records");
        let mut w = Writer::open(&path, 64).unwrap();
        w.append().unwrap();
        w.append().unwrap();
        drop(w);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[0x55; 40]).unwrap();
        drop(f);
        let mut w = Writer::open(&path, 64).unwrap();
        assert_eq!(w.resumed().torn_tail_bytes, 40);
        assert_eq!(w.append().unwrap(), 2);
        let r = verify::verify_file(&path).unwrap();
        assert!(r.ok && r.records == 3 && r.torn_tail_bytes == 0, "{r:?}");
    }

    #[test]
    fn refuses_a_damaged_file_and_leaves_it_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("records");
        let mut w = Writer::open(&path, 64).unwrap();
        for _ in 0..3 {
            w.append().unwrap();
        }
        drop(w);
        let mut data = std::fs::read(&path).unwrap();
        data[70] ^= 1;
        std::fs::write(&path, &data).unwrap();
        let err = Writer::open(&path, 64).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt);
        assert!(err.to_string().contains("damaged"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), data);
    }

    #[test]
    fn rejects_a_bad_record_size_without_creating_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("records");
        let err = Writer::open(&path, 8).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(!path.exists());
    }
}
