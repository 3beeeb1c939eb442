//! Reading a records file out of a raw ext4 disk image on the host.
//!
//! The image is never modified. The guest may have stopped without
//! unmounting (power-off, `kill -9` of QEMU), so its metadata — the
//! file's size and extents — may still sit in the ext4 journal. The image
//! is therefore copied (sparsely) to a scratch directory, the journal is
//! replayed on the copy with `e2fsck -E journal_only`, and the file is
//! dumped with `debugfs`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, ErrorKind};
use crate::verify::{self, Report};

/// Copies the file at `fs_path` (absolute, inside the filesystem) out of
/// the raw ext4 image `image` into `out`.
pub fn extract_file(image: &Path, fs_path: &str, out: &Path) -> Result<(), Error> {
    let scratch = tempfile::Builder::new()
        .prefix("ferry-guest-image-")
        .tempdir()
        .map_err(|e| Error::io("creating a scratch directory for", image, e))?;
    let copy = scratch.path().join("disk.raw");
    run(
        Command::new("cp")
            .arg("--sparse=always")
            .arg("--reflink=auto")
            .arg(image)
            .arg(&copy),
        "copying",
        image,
        &[0],
    )?;
    // 0: clean, 1: journal replayed / fixed. Anything else: a broken fs.
    run(
        Command::new(sbin("e2fsck"))
            .args(["-E", "journal_only", "-y"])
            .arg(&copy),
        "replaying the ext4 journal of a copy of",
        image,
        &[0, 1],
    )?;
    if out.exists() {
        std::fs::remove_file(out).map_err(|e| Error::io("removing", out, e))?;
    }
    let request = format!("dump {fs_path} {}", out.display());
    run(
        Command::new(sbin("debugfs"))
            .arg("-R")
            .arg(&request)
            .arg(&copy),
        &format!("dumping {fs_path} from"),
        image,
        &[0],
    )?;
    if !out.exists() {
        return Err(Error::new(
            ErrorKind::Tool,
            format!(
                "{fs_path} not found in the filesystem of {}",
                image.display()
            ),
        ));
    }
    Ok(())
}

/// Verifies the records file at `fs_path` inside the raw ext4 image.
pub fn verify_image(image: &Path, fs_path: &str) -> Result<Report, Error> {
    let scratch = tempfile::Builder::new()
        .prefix("ferry-guest-records-")
        .tempdir()
        .map_err(|e| Error::io("creating a scratch directory for", image, e))?;
    let out = scratch.path().join("records");
    extract_file(image, fs_path, &out)?;
    verify::verify_file(&out)
}

/// An e2fsprogs tool: found in `PATH`, else in `/usr/sbin` or `/sbin`
/// (which a non-root `PATH` often lacks).
pub fn sbin(name: &str) -> PathBuf {
    let in_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    if !in_path {
        for dir in ["/usr/sbin", "/sbin"] {
            let p = Path::new(dir).join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    PathBuf::from(name)
}

fn run(cmd: &mut Command, what: &str, image: &Path, ok_codes: &[i32]) -> Result<(), Error> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let output = cmd.output().map_err(|e| {
        Error::new(
            ErrorKind::Tool,
            format!("{what} {}: cannot run {program}: {e}", image.display()),
        )
    })?;
    match output.status.code() {
        Some(c) if ok_codes.contains(&c) => Ok(()),
        _ => Err(Error::new(
            ErrorKind::Tool,
            format!(
                "{what} {}: {program} failed ({}): {}",
                image.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        )),
    }
}
