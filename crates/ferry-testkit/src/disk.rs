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
