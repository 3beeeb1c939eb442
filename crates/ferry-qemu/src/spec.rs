//! VM definitions: what a VM is made of, stored as JSON, validated with
//! clear errors before any QEMU is started.
//!
//! ```json
//! {
//!   "uuid": "5f0c...", "name": "web-1", "vcpus": 2, "memory_mib": 512,
//!   "disks": [
//!     {"id": "vda", "source": {"kind": "nbd", "server": {"unix": "/run/ferry/nbd.sock"}, "export": "vol-1"}},
//!     {"id": "vdb", "source": {"kind": "file", "path": "/var/lib/x.qcow2", "format": "qcow2"}}
//!   ],
//!   "boot": {"kind": "kernel", "kernel": "/boot/vmlinuz", "initrd": "/boot/initrd", "cmdline": "console=ttyS0"},
//!   "guest_agent": true,
//!   "accel": "kvm:tcg"
//! }
//! ```
//!
//! Each disk's `id` is the guest device id; QEMU node names are derived
//! from it (see [`DiskSpec::format_node`], [`DiskSpec::protocol_node`]).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{Error, Result};

/// The default accelerator list: KVM when it works, TCG otherwise.
pub const DEFAULT_ACCEL: &str = "kvm:tcg";

/// Longest disk id: QEMU node names are at most 31 characters and ours add
/// a 5-character suffix.
pub const MAX_DISK_ID_LEN: usize = 26;

/// A VM definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// Stable identity of the VM (also given to QEMU with `-uuid`).
    pub uuid: Uuid,
    /// Human name (letters, digits, `-`, `_`, `.`).
    pub name: String,
    /// Number of virtual CPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Disks in guest order.
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    /// How the VM boots.
    pub boot: Boot,
    /// Whether a guest-agent channel is attached.
    #[serde(default)]
    pub guest_agent: bool,
    /// Accelerators to try in order, `:`-separated (`kvm:tcg`, `tcg`); each
    /// may carry `-accel` options (`tcg,thread=single`).
    #[serde(default = "default_accel")]
    pub accel: String,
    /// Machine type.
    #[serde(default = "default_machine")]
    pub machine: String,
}

fn default_accel() -> String {
    DEFAULT_ACCEL.to_string()
}

fn default_machine() -> String {
    "q35".to_string()
}

/// One disk of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// Device id in QEMU (and prefix of the node names): a letter, then
    /// letters, digits, `-` or `_`; at most [`MAX_DISK_ID_LEN`] characters.
    pub id: String,
    /// Where the data lives.
    pub source: DiskSource,
    /// Attach read-only.
    #[serde(default)]
    pub read_only: bool,
}

impl DiskSpec {
    /// Node name of the format layer attached to the guest device.
    pub fn format_node(&self) -> String {
        format!("{}-fmt", self.id)
    }

    /// Node name of the protocol layer (nbd or file) under the format node.
    pub fn protocol_node(&self) -> String {
        format!("{}-pro", self.id)
    }
}

/// Where a disk's data lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DiskSource {
    /// An NBD export (raw data).
    Nbd {
        /// The NBD server.
        server: NbdServer,
        /// Export name.
        export: String,
        /// Id of a `tls-creds-x509` object, when the export needs TLS.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tls_creds: Option<String>,
    },
    /// A local image file.
    File {
        /// Path of the image.
        path: PathBuf,
        /// Image format.
        format: ImageFormat,
    },
}

/// Address of an NBD server.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NbdServer {
    /// A unix socket path.
    Unix(PathBuf),
    /// A TCP host and port.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
}

impl NbdServer {
    /// The QAPI `SocketAddress` of this server.
    pub fn to_qapi(&self) -> serde_json::Value {
        match self {
            NbdServer::Unix(p) => {
                serde_json::json!({"type": "unix", "path": p.to_string_lossy()})
            }
            NbdServer::Tcp { host, port } => {
                serde_json::json!({"type": "inet", "host": host, "port": port.to_string()})
            }
        }
    }
}

/// Image format of a file disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageFormat {
    /// Raw data.
    Raw,
    /// qcow2.
    Qcow2,
}

impl ImageFormat {
    /// QEMU's driver name.
    pub fn driver(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

/// How a VM boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Boot {
    /// Direct kernel boot (test guests).
    Kernel {
        /// Kernel image.
        kernel: PathBuf,
        /// Initial ramdisk.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        initrd: Option<PathBuf>,
        /// Kernel command line.
        #[serde(default)]
        cmdline: String,
    },
    /// Firmware boot of the first disk.
    Disk {
        /// Firmware image (`-bios`); QEMU's default SeaBIOS when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        firmware: Option<PathBuf>,
    },
    /// No boot device: the VM only runs firmware (tests, or a VM waiting
    /// for an incoming migration that carries everything).
    None,
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn valid_id(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && s.len() <= MAX_DISK_ID_LEN
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
}

fn check_file(path: &Path, what: &str, ctx: &str) -> Result<()> {
    if !path.is_absolute() {
        return Err(Error::invalid(
            format!("{what} path {} is not absolute", path.display()),
            ctx,
        ));
    }
    if !path.exists() {
        return Err(Error::invalid(
            format!("{what} {} does not exist", path.display()),
            ctx,
        ));
    }
    Ok(())
}

impl VmSpec {
    /// A definition with one vCPU, 256 MiB, no disk, no boot device, no
    /// agent, default accelerator.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            uuid: Uuid::new_v4(),
            name: name.into(),
            vcpus: 1,
            memory_mib: 256,
            disks: Vec::new(),
            boot: Boot::None,
            guest_agent: false,
            accel: default_accel(),
            machine: default_machine(),
        }
    }

    /// Parses a definition from JSON and validates it.
    pub fn from_json(text: &str) -> Result<Self> {
        let spec: VmSpec = serde_json::from_str(text)
            .map_err(|e| Error::invalid(e.to_string(), "parsing VM definition"))?;
        spec.validate()?;
        Ok(spec)
    }

    /// The definition as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The accelerators to try, in order.
    pub fn accelerators(&self) -> Vec<&str> {
        self.accel.split(':').filter(|s| !s.is_empty()).collect()
    }

    /// The disk with this id.
    pub fn disk(&self, id: &str) -> Option<&DiskSpec> {
        self.disks.iter().find(|d| d.id == id)
    }

    /// Checks the definition; the error names the VM and the field.
    pub fn validate(&self) -> Result<()> {
        let ctx = format!("VM definition {}", self.name);
        if !valid_name(&self.name) {
            return Err(Error::invalid(
                format!(
                    "name {:?} must be 1-64 letters, digits, '-', '_' or '.'",
                    self.name
                ),
                ctx,
            ));
        }
        if self.vcpus == 0 || self.vcpus > 288 {
            return Err(Error::invalid(
                format!("vcpus {} is not within 1..=288", self.vcpus),
                ctx,
            ));
        }
        if self.memory_mib < 16 || self.memory_mib > 16 * 1024 * 1024 {
            return Err(Error::invalid(
                format!("memory_mib {} is not within 16..=16777216", self.memory_mib),
                ctx,
            ));
        }
        let accels = self.accelerators();
        if accels.is_empty() {
            return Err(Error::invalid("accel is empty", ctx));
        }
        for a in &accels {
            // `name` or `name,opt=value,...` (`tcg,thread=single`).
            let name = a.split(',').next().unwrap_or("");
            if !matches!(
                name,
                "kvm" | "tcg" | "xen" | "hvf" | "whpx" | "nvmm" | "qtest"
            ) {
                return Err(Error::invalid(format!("unknown accelerator {a:?}"), ctx));
            }
        }
        if !valid_name(&self.machine) {
            return Err(Error::invalid(
                format!("machine type {:?} is invalid", self.machine),
                ctx,
            ));
        }
        let mut seen = HashSet::new();
        for d in &self.disks {
            let dctx = format!("{ctx}, disk {}", d.id);
            if !valid_id(&d.id) {
                return Err(Error::invalid(
                    format!(
                        "disk id {:?} must start with a letter, then letters, digits, '-' or '_', at most {MAX_DISK_ID_LEN} characters",
                        d.id
                    ),
                    ctx,
                ));
            }
            if !seen.insert(d.id.as_str()) {
                return Err(Error::invalid("disk id used twice", dctx));
            }
            match &d.source {
                DiskSource::Nbd { server, export, .. } => {
                    if export.len() > 4096 {
                        return Err(Error::invalid("export name longer than 4096 bytes", dctx));
                    }
                    match server {
                        NbdServer::Unix(p) if !p.is_absolute() => {
                            return Err(Error::invalid(
                                format!("NBD socket path {} is not absolute", p.display()),
                                dctx,
                            ));
                        }
                        NbdServer::Tcp { host, port } if host.is_empty() || *port == 0 => {
                            return Err(Error::invalid("NBD server needs a host and a port", dctx));
                        }
                        _ => {}
                    }
                }
                DiskSource::File { path, .. } => check_file(path, "disk image", &dctx)?,
            }
        }
        match &self.boot {
            Boot::Kernel { kernel, initrd, .. } => {
                check_file(kernel, "kernel", &ctx)?;
                if let Some(i) = initrd {
                    check_file(i, "initrd", &ctx)?;
                }
            }
            Boot::Disk { firmware } => {
                if self.disks.is_empty() {
                    return Err(Error::invalid("disk boot needs at least one disk", ctx));
                }
                if let Some(f) = firmware {
                    check_file(f, "firmware", &ctx)?;
                }
            }
            Boot::None => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_and_defaults() {
        let text = r#"{"uuid":"6f1c1a3e-5b7e-4d43-9d1a-2f6e1b1f0a01","name":"web-1","vcpus":2,
            "memory_mib":512,"disks":[{"id":"vda","source":{"kind":"nbd",
            "server":{"unix":"/run/x.sock"},"export":"vol-1"}}],"boot":{"kind":"none"},
            "future_field":1}"#;
        let spec = VmSpec::from_json(text).unwrap();
        assert_eq!(spec.accel, "kvm:tcg");
        assert_eq!(spec.machine, "q35");
        assert_eq!(spec.accelerators(), vec!["kvm", "tcg"]);
        let back = VmSpec::from_json(&spec.to_json()).unwrap();
        assert_eq!(back, spec);
        assert_eq!(spec.disks[0].format_node(), "vda-fmt");
    }

    #[test]
    fn invalid_definitions_are_named() {
        let mut s = VmSpec::new("ok");
        s.vcpus = 0;
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("vcpus 0"), "{e}");

        let mut s = VmSpec::new("bad name");
        assert!(s.validate().unwrap_err().to_string().contains("name"));
        s.name = "ok".into();
        s.accel = "kvm:warp".into();
        assert!(s.validate().unwrap_err().to_string().contains("warp"));
        s.accel = "kvm:tcg,thread=single".into();
        s.validate().unwrap();
        s.accel = "tcg".into();
        let disk = DiskSpec {
            id: "vda".into(),
            source: DiskSource::Nbd {
                server: NbdServer::Tcp {
                    host: "h".into(),
                    port: 1,
                },
                export: "e".into(),
                tls_creds: None,
            },
            read_only: false,
        };
        s.disks = vec![disk.clone(), disk];
        assert!(s.validate().unwrap_err().to_string().contains("used twice"));
        s.disks.truncate(1);
        s.disks[0].id = "1abc".into();
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("start with a letter")
        );
        s.disks[0].id = "vda".into();
        s.validate().unwrap();
        s.disks[0].source = DiskSource::File {
            path: "/nonexistent/x.img".into(),
            format: ImageFormat::Raw,
        };
        let e = s.validate().unwrap_err().to_string();
        assert!(
            e.contains("disk vda") && e.contains("does not exist"),
            "{e}"
        );
    }
}
