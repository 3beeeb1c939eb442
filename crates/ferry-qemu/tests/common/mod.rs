//! Helpers shared by the integration tests: qemu-nbd servers, images,
//! guest-less VMs, data checks with qemu-io.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ferry_qemu::{DiskSource, DiskSpec, ImageFormat, NbdServer, VmSpec};

pub const T: Duration = Duration::from_secs(60);

/// A `qemu-nbd` serving one raw file on a unix socket to up to 4 clients;
/// killed on drop.
pub struct QemuNbd {
    child: Child,
    pub socket: PathBuf,
}

impl QemuNbd {
    pub fn serve(file: &Path, socket: &Path) -> Result<Self> {
        let child = Command::new("qemu-nbd")
            .args(["--persistent", "--shared=4", "--format=raw"])
            .arg("--socket")
            .arg(socket)
            .arg(file)
            .stdin(Stdio::null())
            .spawn()
            .context("spawning qemu-nbd")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if Instant::now() > deadline {
                bail!("qemu-nbd did not create {}", socket.display());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Self {
            child,
            socket: socket.to_path_buf(),
        })
    }

    pub fn server(&self) -> NbdServer {
        NbdServer::Unix(self.socket.clone())
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn create_image(path: &Path, format: &str, size: &str) -> Result<()> {
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", format])
        .arg(path)
        .arg(size))?;
    Ok(())
}

/// Checks with qemu-io that `len` bytes at `offset` of `image` (a path or
/// an NBD URI) all hold `pattern`. `-U` shares the image with a running
/// QEMU.
pub fn verify_pattern(image: &str, format: &str, offset: u64, len: u64, pattern: u8) -> Result<()> {
    let out = run(Command::new("qemu-io").args([
        "-U",
        "-r",
        "-f",
        format,
        "-c",
        &format!("read -P {pattern:#x} {offset} {len}"),
        image,
    ]))?;
    if out.contains("Pattern verification failed") || !out.contains("read ") {
        bail!("pattern {pattern:#x} not found at {offset}+{len} of {image}: {out}");
    }
    Ok(())
}

/// Writes through the guest device with HMP `qemu-io -d` (the path a guest
/// write takes: the device's active layer).
pub async fn device_write(
    vm: &ferry_qemu::VmProcess,
    device: &str,
    offset: u64,
    len: u64,
    pattern: u8,
) -> Result<()> {
    // The write, then a flush: qcow2 keeps new L2 entries in QEMU's memory
    // until a flush, and the tests read the images from another process.
    for op in [
        format!("write -P {pattern:#x} {offset} {len}"),
        "flush".to_string(),
    ] {
        let cmd = format!("qemu-io -d /machine/peripheral/{device}/virtio-backend \"{op}\"");
        let out = vm
            .qmp()
            .execute(
                "human-monitor-command",
                serde_json::json!({"command-line": cmd}),
            )
            .await?;
        let text = out.as_str().unwrap_or("");
        // qemu-io prints its report on QEMU's stdout; the monitor only sees errors.
        if text.contains("rror") || text.contains("failed") {
            bail!("qemu-io {op} on {device} failed: {text}");
        }
    }
    Ok(())
}

pub fn spec_with(name: &str, disks: Vec<DiskSpec>) -> VmSpec {
    let mut s = VmSpec::new(name);
    s.accel = "tcg".into();
    s.memory_mib = 64;
    s.disks = disks;
    s
}

pub fn nbd_disk(id: &str, server: NbdServer) -> DiskSpec {
    DiskSpec {
        id: id.into(),
        source: DiskSource::Nbd {
            server,
            export: String::new(),
            tls_creds: None,
        },
        read_only: false,
    }
}

pub fn file_disk(id: &str, path: &Path, format: ImageFormat) -> DiskSpec {
    DiskSpec {
        id: id.into(),
        source: DiskSource::File {
            path: path.to_path_buf(),
            format,
        },
        read_only: false,
    }
}

pub fn alive(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
}
