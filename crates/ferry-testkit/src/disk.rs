//! Disk images for test guests.

use std::path::Path;
use std::process::Command;

use ferry_guest::Report;

use crate::error::{Error, ErrorKind, Result};

/// Path of the records file inside the guest's data filesystem.
pub const RECORDS_PATH: &str = "/records";

fn run(cmd: &mut Command, what: &str, path: &Path) -> Result<()> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd.output().map_err(|e| {
        Error::with_source(
            ErrorKind::Tool,
            format!("{what} {}: cannot run {program}", path.display()),
            e,
        )
    })?;
    if !out.status.success() {
        return Err(Error::new(
            ErrorKind::Tool,
            format!(
                "{what} {}: {program} failed ({}): {}",
                path.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(())
}

/// Creates a sparse raw disk of `size` bytes at `path` holding an empty
/// ext4 filesystem (`mkfs.ext4 -F -q`). An existing file is replaced.
pub fn make_ext4_disk(path: &Path, size: u64) -> Result<()> {
    let f = std::fs::File::create(path).map_err(|e| Error::io("creating", path, e))?;
    f.set_len(size).map_err(|e| Error::io("sizing", path, e))?;
    drop(f);
    run(
        Command::new(ferry_guest::image::sbin("mkfs.ext4"))
            .args(["-F", "-q"])
            .arg(path),
        "making an ext4 filesystem on",
        path,
    )
}

/// Creates a qcow2 image of `size` bytes at `path` (`qemu-img create`).
pub fn make_qcow2_disk(path: &Path, size: u64) -> Result<()> {
    run(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(path)
            .arg(size.to_string()),
        "creating qcow2 image",
        path,
    )
}

/// Verifies the guest's records file inside a raw ext4 image (left
/// unchanged: the journal is replayed on a copy).
pub fn verify_records_on_image(path: &Path) -> Result<Report> {
    ferry_guest::image::verify_image(path, RECORDS_PATH).map_err(|e| {
        Error::with_source(
            ErrorKind::Tool,
            format!("verifying the records in {}", path.display()),
            e,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ext4_disk_without_records_is_reported_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("d.raw");
        make_ext4_disk(&disk, 16 << 20).unwrap();
        assert_eq!(std::fs::metadata(&disk).unwrap().len(), 16 << 20);
        let err = verify_records_on_image(&disk).unwrap_err();
        let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(chain.contains("/records not found"), "{chain}");
    }

    #[test]
    fn qcow2_disk() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("d.qcow2");
        make_qcow2_disk(&disk, 1 << 30).unwrap();
        let head = std::fs::read(&disk).unwrap();
        assert_eq!(&head[..4], b"QFI\xfb");
    }
}

/// How much of a file the page cache holds, in pages (`cachestat(2)`,
/// Linux 6.5 and later): for tests of what a writer leaves there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PageStates {
    pub cached: u64,
    pub dirty: u64,
    pub writeback: u64,
}

/// The [`PageStates`] of all of `file`.
pub fn page_states(file: &Path) -> std::io::Result<PageStates> {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        cache: u64,
        dirty: u64,
        writeback: u64,
        evicted: u64,
        recently_evicted: u64,
    }
    /// `cachestat`'s number on x86-64 and aarch64 (the libc crate does not
    /// name it yet).
    const SYS_CACHESTAT: libc::c_long = 451;
    let f = std::fs::File::open(file)?;
    // Length 0: to the end of the file.
    let range = Range { off: 0, len: 0 };
    let mut st = Stat::default();
    // SAFETY: cachestat reads `range` and fills `st`, both alive for the
    // call and laid out as the kernel's structs; flags must be 0.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            f.as_raw_fd(),
            &range as *const Range,
            &mut st as *mut Stat,
            0,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(PageStates {
        cached: st.cache,
        dirty: st.dirty,
        writeback: st.writeback,
    })
}
