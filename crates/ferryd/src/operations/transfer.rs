//! The disk-image side of import and export: `qemu-img info` to learn an
//! image's format and size, and `qemu-nbd` as the format engine.
//!
//! Ferry does not parse qcow2 (or any other image format) itself: a
//! `qemu-nbd` child serves the image on a private unix socket under
//! `<data-dir>/run/`, and the operation copies through it with Ferry's own
//! NBD client, asking for `base:allocation` block status to skip holes.
//!
//! # The child never outlives its use
//! - [`QemuNbd`] kills and reaps the child when dropped (step finished,
//!   failed or cancelled) and removes the socket and log files;
//! - the child is started with `PR_SET_PDEATHSIG(SIGKILL)` from a thread
//!   that lives as long as the guard, so a `kill -9` of ferryd kills it too
//!   (the recovered step starts a fresh one);
//! - it is started without `--persistent`: it exits by itself when the
//!   connection ends.

use std::fs::File;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// Image formats `volume.import` accepts (given or detected).
pub const IMPORT_FORMATS: &[&str] = &["raw", "qcow2", "qed", "vmdk", "vdi", "vhdx", "vpc"];
/// Image formats `volume.export` writes.
pub const EXPORT_FORMATS: &[&str] = &["raw", "qcow2"];

/// What `qemu-img info` says about an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: String,
    pub virtual_size: u64,
    /// Bytes the image file occupies on the host (its allocation).
    pub actual_size: u64,
}

/// Why an image cannot be imported, and which request field is at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageError {
    /// `path` or `format`.
    pub field: &'static str,
    pub message: String,
}

#[derive(Deserialize)]
struct QemuImgInfo {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "actual-size", default)]
    actual_size: u64,
    #[serde(rename = "backing-filename")]
    backing_filename: Option<String>,
}

fn qemu_img_info(path: &Path, format: Option<&str>) -> Result<QemuImgInfo, String> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["info", "--output=json"]);
    if let Some(f) = format {
        cmd.args(["-f", f]);
    }
    let out = cmd
        .arg(path)
        .output()
        .map_err(|e| format!("cannot run qemu-img: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("cannot read qemu-img info: {e}"))
}

/// Inspects an image to import: its format (detected unless given), virtual
/// size and allocation. Refuses formats outside [`IMPORT_FORMATS`] and
/// images with a backing file.
pub fn inspect(path: &Path, format: Option<&str>) -> Result<ImageInfo, ImageError> {
    let shown = path.display();
    if let Some(f) = format
        && !IMPORT_FORMATS.contains(&f)
    {
        return Err(ImageError {
            field: "format",
            message: format!(
                "format {f:?} is not supported; use one of {}",
                IMPORT_FORMATS.join(", ")
            ),
        });
    }
    let info = match qemu_img_info(path, format) {
        Ok(i) => i,
        Err(e) => {
            // Given a format: is the file readable as something else?
            if let Some(f) = format
                && let Ok(other) = qemu_img_info(path, None)
            {
                return Err(ImageError {
                    field: "format",
                    message: format!("{shown} is not a {f} image (it reads as {})", other.format),
                });
            }
            return Err(ImageError {
                field: "path",
                message: format!("cannot read {shown} as a disk image: {e}"),
            });
        }
    };
    if !IMPORT_FORMATS.contains(&info.format.as_str()) {
        return Err(ImageError {
            field: "format",
            message: format!(
                "{shown} is a {} image, which is not supported; use one of {}",
                info.format,
                IMPORT_FORMATS.join(", ")
            ),
        });
    }
    if let Some(b) = info.backing_filename {
        return Err(ImageError {
            field: "path",
            message: format!(
                "{shown} has a backing file ({b}); flatten it first (qemu-img convert)"
            ),
        });
    }
    if info.virtual_size == 0 {
        return Err(ImageError {
            field: "path",
            message: format!("{shown} is empty (virtual size 0)"),
        });
    }
    Ok(ImageInfo {
        format: info.format,
        virtual_size: info.virtual_size,
        actual_size: info.actual_size,
    })
}

/// Creates an empty image of `size` bytes (`qemu-img create`), replacing
/// any file at `path`, and makes it and its directory entry durable.
pub fn create_image(path: &Path, format: &str, size: u64) -> Result<(), String> {
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", format])
        .arg(path)
        .arg(size.to_string())
        .output()
        .map_err(|e| format!("cannot run qemu-img: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img create -f {format} {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    sync_file_and_dir(path)
}

/// fsyncs a file and the directory that names it.
pub fn sync_file_and_dir(path: &Path) -> Result<(), String> {
    let err = |e: io::Error| format!("syncing {}: {e}", path.display());
    File::open(path).and_then(|f| f.sync_all()).map_err(err)?;
    if let Some(dir) = path.parent() {
        File::open(dir).and_then(|f| f.sync_all()).map_err(err)?;
    }
    Ok(())
}

/// A `qemu-nbd` child serving one image on a private unix socket; killed
/// and reaped on drop.
pub struct QemuNbd {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
    /// Dropping it ends the thread that forked the child (whose death
    /// would send the child SIGKILL), after the child is gone.
    keep: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl QemuNbd {
    /// Starts `qemu-nbd` on `image` and waits until it listens on `socket`
    /// (a stale socket file is removed first). Blocking.
    pub fn start(
        image: &Path,
        format: &str,
        read_only: bool,
        socket: &Path,
    ) -> Result<Self, String> {
        let _ = std::fs::remove_file(socket);
        let log = socket.with_extension("log");
        let log_file = File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let mut cmd = Command::new("qemu-nbd");
        cmd.arg(format!("--format={format}"))
            .arg(format!("--socket={}", socket.display()))
            .arg("--cache=writeback");
        if read_only {
            cmd.arg("--read-only");
        }
        cmd.arg(image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: the closure runs in the forked child before exec and only
        // makes async-signal-safe system calls (prctl, getppid); it touches
        // no memory shared with the parent.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    return Err(io::Error::other("ferryd exited"));
                }
                Ok(())
            });
        }
        let (child_tx, child_rx) = mpsc::channel();
        let (keep, keep_rx) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("qemu-nbd-parent".into())
            .spawn(move || {
                let _ = child_tx.send(cmd.spawn());
                // Live until the guard is dropped: the child's death signal
                // is tied to this thread.
                let _ = keep_rx.recv();
            })
            .map_err(|e| format!("cannot start a thread for qemu-nbd: {e}"))?;
        let child = child_rx
            .recv()
            .map_err(|_| "qemu-nbd parent thread died".to_string())?
            .map_err(|e| format!("cannot run qemu-nbd: {e}"))?;
        let mut me = QemuNbd {
            child: Some(child),
            socket: socket.to_path_buf(),
            log,
            keep: Some(keep),
            thread: Some(thread),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if socket.exists() {
                return Ok(me);
            }
            if let Some(st) = me.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                return Err(format!(
                    "qemu-nbd on {} exited ({st}) before listening: {}",
                    image.display(),
                    me.log_text()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "qemu-nbd on {} did not listen within 20 s",
                    image.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    #[cfg(test)]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    }

    /// Waits (blocking) for the child to exit by itself after the client
    /// disconnected, so that the image is closed cleanly; an error if it
    /// fails or takes longer than `timeout`.
    pub fn wait_exit(mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let deadline = Instant::now() + timeout;
        let Some(child) = self.child.as_mut() else {
            return Err("qemu-nbd is gone".into());
        };
        loop {
            match child.try_wait() {
                Ok(Some(st)) => {
                    self.child = None;
                    if st.success() {
                        return Ok(st);
                    }
                    return Err(format!("qemu-nbd exited ({st}): {}", self.log_text()));
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Ok(None) => return Err("qemu-nbd did not exit after the copy".into()),
                Err(e) => return Err(format!("waiting for qemu-nbd: {e}")),
            }
        }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.keep.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(&self.log);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inspect_names_the_field_at_fault() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("a.raw");
        let f = File::create(&raw).unwrap();
        f.set_len(4 << 20).unwrap();
        let i = inspect(&raw, None).unwrap();
        assert_eq!((i.format.as_str(), i.virtual_size), ("raw", 4 << 20));
        assert_eq!(inspect(&raw, Some("qcow2")).unwrap_err().field, "format");
        assert_eq!(inspect(&raw, Some("bogus")).unwrap_err().field, "format");
        let missing = dir.path().join("nope");
        assert_eq!(inspect(&missing, None).unwrap_err().field, "path");
    }

    #[test]
    fn qemu_nbd_child_is_reaped_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.qcow2");
        create_image(&img, "qcow2", 8 << 20).unwrap();
        let sock = dir.path().join("s.sock");
        let nbd = QemuNbd::start(&img, "qcow2", true, &sock).unwrap();
        let pid = nbd.pid().unwrap();
        assert!(Path::new(&format!("/proc/{pid}")).exists());
        drop(nbd);
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        assert!(!sock.exists());
    }
}
