//! The run directory of a VM and the QEMU command line built from a
//! [`VmSpec`].
//!
//! A run directory holds, for one QEMU process:
//!
//! | file          | what                                                   |
//! |---------------|--------------------------------------------------------|
//! | `qmp.sock`    | QMP monitor socket (QEMU listens)                      |
//! | `qga.sock`    | guest-agent chardev socket (QEMU listens)              |
//! | `qemu.pid`    | pid written by QEMU (`-pidfile`)                       |
//! | `serial.log`  | the guest's first serial port                          |
//! | `qemu.log`    | QEMU's own stdout and stderr                           |
//! | `vm.json`     | the [`VmSpec`] the process was started from            |
//!
//! Disks are attached with `-blockdev` in JSON syntax (no comma escaping of
//! paths) as two nodes each: a protocol node (`<id>-pro`: `nbd` or `file`)
//! under a format node (`<id>-fmt`: `raw` or `qcow2`) that a `virtio-blk-pci`
//! device with id `<id>` uses.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::{Value, json};

use crate::error::{Error, ErrorKind, Result};
use crate::qmp::QemuVersion;
use crate::spec::{Boot, DiskSource, VmSpec};

/// Seconds QEMU waits before reconnecting a lost NBD connection, and during
/// which guest requests wait instead of failing.
pub const NBD_RECONNECT_DELAY_S: u64 = 10;
/// Seconds QEMU keeps retrying the first NBD connection (QEMU >= 7.0).
pub const NBD_OPEN_TIMEOUT_S: u64 = 30;

/// Longest unix socket path the kernel accepts (`sun_path` less the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The files of a run directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunPaths {
    /// The directory.
    pub dir: PathBuf,
    /// QMP socket.
    pub qmp: PathBuf,
    /// Guest-agent socket.
    pub qga: PathBuf,
    /// Pid file.
    pub pid: PathBuf,
    /// Serial console log.
    pub serial: PathBuf,
    /// QEMU's stdout/stderr.
    pub log: PathBuf,
    /// The VM definition.
    pub spec: PathBuf,
}

impl RunPaths {
    /// The paths inside `dir`.
    pub fn new(dir: impl AsRef<Path>) -> Self {
        let dir = dir.as_ref().to_path_buf();
        Self {
            qmp: dir.join("qmp.sock"),
            qga: dir.join("qga.sock"),
            pid: dir.join("qemu.pid"),
            serial: dir.join("serial.log"),
            log: dir.join("qemu.log"),
            spec: dir.join("vm.json"),
            dir,
        }
    }

    /// Checks that the paths can be used on a QEMU command line and as
    /// unix sockets.
    pub fn check(&self) -> Result<()> {
        let ctx = format!("run directory {}", self.dir.display());
        let s = self
            .dir
            .to_str()
            .ok_or_else(|| Error::invalid("path is not UTF-8", &ctx))?;
        if s.contains(',') {
            return Err(Error::invalid("path contains a comma", &ctx));
        }
        if !self.dir.is_absolute() {
            return Err(Error::invalid("path is not absolute", &ctx));
        }
        if self.qmp.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(Error::invalid(
                format!("socket paths would exceed {MAX_SOCKET_PATH} bytes"),
                &ctx,
            ));
        }
        Ok(())
    }
}

/// How to launch a process beyond what the [`VmSpec`] says.
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// QEMU binary (default `qemu-system-x86_64`, looked up in `PATH`).
    pub binary: PathBuf,
    /// `-incoming` URI (`unix:/path`, `tcp:host:port`, `defer`).
    pub incoming: Option<String>,
    /// Start with the vCPUs paused (`-S`).
    pub paused: bool,
    /// Raw arguments appended to the command line.
    pub extra_args: Vec<String>,
}

impl Default for LaunchOptions {
    fn default() -> Self {
        Self {
            binary: PathBuf::from("qemu-system-x86_64"),
            incoming: None,
            paused: false,
            extra_args: Vec::new(),
        }
    }
}

static VERSIONS: Mutex<Option<HashMap<PathBuf, QemuVersion>>> = Mutex::new(None);

/// The version of a QEMU binary (from `--version`, cached per binary).
pub fn binary_version(binary: &Path) -> Result<QemuVersion> {
    if let Ok(guard) = VERSIONS.lock()
        && let Some(v) = guard.as_ref().and_then(|m| m.get(binary))
    {
        return Ok(*v);
    }
    let ctx = format!("querying the version of {}", binary.display());
    let out = std::process::Command::new(binary)
        .arg("--version")
        .output()
        .map_err(|e| Error::io(e, &ctx))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = parse_version(&text).ok_or_else(|| {
        Error::new(
            ErrorKind::Process(format!("unrecognised --version output: {text:?}")),
            &ctx,
        )
    })?;
    if let Ok(mut guard) = VERSIONS.lock() {
        guard
            .get_or_insert_with(HashMap::new)
            .insert(binary.to_path_buf(), v);
    }
    Ok(v)
}

fn parse_version(text: &str) -> Option<QemuVersion> {
    let rest = text.split("version ").nth(1)?;
    let word: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let mut parts = word.split('.').map(|p| p.parse::<u32>().ok());
    Some(QemuVersion {
        major: parts.next()??,
        minor: parts.next().flatten().unwrap_or(0),
        micro: parts.next().flatten().unwrap_or(0),
    })
}

/// The `-blockdev` definitions (protocol node, then format node) of every
/// disk, as QAPI `BlockdevOptions` objects.
pub fn blockdevs(spec: &VmSpec, version: QemuVersion) -> Vec<Value> {
    let mut out = Vec::new();
    for d in &spec.disks {
        let (proto, fmt_driver) = match &d.source {
            DiskSource::Nbd {
                server,
                export,
                tls_creds,
            } => {
                let mut p = json!({
                    "driver": "nbd",
                    "node-name": d.protocol_node(),
                    "server": server.to_qapi(),
                    "export": export,
                    "reconnect-delay": NBD_RECONNECT_DELAY_S,
                });
                if version
                    >= (QemuVersion {
                        major: 7,
                        minor: 0,
                        micro: 0,
                    })
                {
                    p["open-timeout"] = json!(NBD_OPEN_TIMEOUT_S);
                }
                if let Some(t) = tls_creds {
                    p["tls-creds"] = json!(t);
                }
                (p, "raw")
            }
            DiskSource::File { path, format } => (
                json!({
                    "driver": "file",
                    "node-name": d.protocol_node(),
                    "filename": path.to_string_lossy(),
                }),
                format.driver(),
            ),
        };
        let mut proto = proto;
        if d.read_only {
            proto["read-only"] = json!(true);
        }
        let fmt = json!({
            "driver": fmt_driver,
            "node-name": d.format_node(),
            "file": d.protocol_node(),
            "read-only": d.read_only,
            "discard": "unmap",
        });
        out.push(proto);
        out.push(fmt);
    }
    out
}

/// The whole QEMU argument list (without the binary).
pub fn qemu_args(
    spec: &VmSpec,
    paths: &RunPaths,
    opts: &LaunchOptions,
    version: QemuVersion,
) -> Vec<String> {
    let p = |p: &Path| p.to_string_lossy().into_owned();
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&["-nodefaults", "-no-user-config", "-display", "none"]);
    push(&["-name", &format!("guest={},debug-threads=on", spec.name)]);
    push(&["-uuid", &spec.uuid.to_string()]);
    push(&["-machine", &spec.machine]);
    for accel in spec.accelerators() {
        push(&["-accel", accel]);
    }
    push(&["-smp", &spec.vcpus.to_string()]);
    push(&["-m", &format!("{}M", spec.memory_mib)]);
    push(&["-pidfile", &p(&paths.pid)]);
    push(&[
        "-chardev",
        &format!("socket,id=qmp0,path={},server=on,wait=off", p(&paths.qmp)),
    ]);
    push(&["-mon", "chardev=qmp0,mode=control"]);
    push(&[
        "-chardev",
        &format!("file,id=serial0,path={}", p(&paths.serial)),
    ]);
    push(&["-serial", "chardev:serial0"]);
    if spec.guest_agent {
        push(&[
            "-chardev",
            &format!("socket,id=qga0,path={},server=on,wait=off", p(&paths.qga)),
        ]);
        push(&["-device", "virtio-serial-pci,id=vser0"]);
        push(&[
            "-device",
            "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
        ]);
    }
    for b in blockdevs(spec, version) {
        push(&["-blockdev", &b.to_string()]);
    }
    for (i, d) in spec.disks.iter().enumerate() {
        let mut dev = json!({
            "driver": "virtio-blk-pci",
            "id": d.id,
            "drive": d.format_node(),
        });
        if i == 0 && matches!(spec.boot, Boot::Disk { .. }) {
            dev["bootindex"] = json!(1);
        }
        push(&["-device", &dev.to_string()]);
    }
    match &spec.boot {
        Boot::Kernel {
            kernel,
            initrd,
            cmdline,
        } => {
            push(&["-kernel", &p(kernel)]);
            if let Some(i) = initrd {
                push(&["-initrd", &p(i)]);
            }
            if !cmdline.is_empty() {
                push(&["-append", cmdline]);
            }
        }
        Boot::Disk { firmware } => {
            if let Some(f) = firmware {
                push(&["-bios", &p(f)]);
            }
        }
        Boot::None => {}
    }
    if opts.paused {
        push(&["-S"]);
    }
    if let Some(uri) = &opts.incoming {
        push(&["-incoming", uri]);
    }
    a.extend(opts.extra_args.iter().cloned());
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{DiskSpec, NbdServer};

    #[test]
    fn versions_parse() {
        let v = parse_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7)\n").unwrap();
        assert_eq!((v.major, v.minor, v.micro), (7, 2, 22));
        let v = parse_version("QEMU emulator version 10.1.0\n").unwrap();
        assert_eq!((v.major, v.minor), (10, 1));
        assert!(parse_version("nonsense").is_none());
    }

    #[test]
    fn nbd_disks_get_reconnect_and_open_timeout_where_supported() {
        let mut spec = VmSpec::new("t");
        spec.disks.push(DiskSpec {
            id: "vda".into(),
            source: DiskSource::Nbd {
                server: NbdServer::Unix("/r/n.sock".into()),
                export: "e".into(),
                tls_creds: None,
            },
            read_only: false,
        });
        let new = blockdevs(
            &spec,
            QemuVersion {
                major: 7,
                minor: 2,
                micro: 0,
            },
        );
        assert_eq!(new[0]["reconnect-delay"], json!(NBD_RECONNECT_DELAY_S));
        assert_eq!(new[0]["open-timeout"], json!(NBD_OPEN_TIMEOUT_S));
        assert_eq!(new[1]["file"], json!("vda-pro"));
        let old = blockdevs(
            &spec,
            QemuVersion {
                major: 6,
                minor: 2,
                micro: 0,
            },
        );
        assert!(old[0].get("open-timeout").is_none());
        let args = qemu_args(
            &spec,
            &RunPaths::new("/run/vm"),
            &LaunchOptions::default(),
            QemuVersion {
                major: 7,
                minor: 2,
                micro: 0,
            },
        );
        let accels: Vec<_> = args
            .windows(2)
            .filter(|w| w[0] == "-accel")
            .map(|w| w[1].as_str())
            .collect();
        assert_eq!(accels, vec!["kvm", "tcg"]);
    }
}
