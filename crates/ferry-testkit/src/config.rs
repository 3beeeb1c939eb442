//! What a test guest is made of, and the QEMU arguments that say it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_qemu::{Boot, DiskSource, DiskSpec, ImageFormat, NbdServer, VmSpec};

use crate::error::{Error, ErrorKind, Result};

/// Where a guest disk's data lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disk {
    /// A local raw image file.
    Raw(PathBuf),
    /// A local qcow2 image file.
    Qcow2(PathBuf),
    /// An NBD export (Ferry's NBD server, `qemu-nbd`, `nbdkit`).
    Nbd {
        /// Where the server listens.
        server: NbdServer,
        /// The export name.
        export: String,
    },
}

/// What the guest runs once it is ready.
#[derive(Debug, Clone, PartialEq)]
pub enum Workload {
    /// Nothing: the guest idles (commands come through the guest agent).
    Idle,
    /// Verify `/mnt/data/records` if present, then append records with
    /// fsync at `rate` per second (0: as fast as possible), `count` of them
    /// or forever, each `size` bytes.
    Records {
        /// Records per second.
        rate: f64,
        /// How many to write (None: until stopped).
        count: Option<u64>,
        /// Bytes per record.
        size: usize,
    },
}

impl Workload {
    /// The records workload at `rate` per second, forever, 512-byte records.
    pub fn records(rate: f64) -> Workload {
        Workload::Records {
            rate,
            count: None,
            size: ferry_guest::record::DEFAULT_RECORD_LEN,
        }
    }
}

/// The full description of a test guest.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    /// A name for messages and the run directory.
    pub name: String,
    /// Disks, in order: the first is `/dev/vda`.
    pub disks: Vec<Disk>,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// QEMU accelerator (`tcg`, `kvm`, `kvm:tcg`).
    pub accel: String,
    /// Machine type (`q35`, `pc`); `ferry_qemu`'s default when `None`.
    pub machine: Option<String>,
    /// Start the guest agent (and its virtio-serial port).
    pub agent: bool,
    /// Device to mount at `/mnt/data` (default `/dev/vda` when there is a disk).
    pub mount: Option<String>,
    /// What the guest runs after it is ready.
    pub workload: Workload,
    /// Extra kernel command-line arguments.
    pub cmdline: Vec<String>,
    /// Extra QEMU arguments.
    pub qemu_args: Vec<String>,
    /// `-incoming` URI: QEMU waits for a migration instead of booting.
    pub incoming: Option<String>,
    /// How long `start` waits for the ready event.
    pub ready_timeout: Duration,
    /// The QEMU binary (`$FERRY_TEST_QEMU`, else `qemu-system-x86_64` from
    /// `PATH`).
    pub qemu_binary: PathBuf,
}

impl GuestConfig {
    /// The defaults: 256 MiB, one vCPU, agent on, accelerator from
    /// `$FERRY_TEST_ACCEL` or `tcg`, idle, 60 s to become ready.
    pub fn new(name: &str) -> GuestConfig {
        GuestConfig {
            name: name.to_owned(),
            disks: Vec::new(),
            memory_mib: 256,
            vcpus: 1,
            accel: std::env::var("FERRY_TEST_ACCEL").unwrap_or_else(|_| "tcg".into()),
            machine: None,
            agent: true,
            mount: None,
            workload: Workload::Idle,
            cmdline: Vec::new(),
            qemu_args: Vec::new(),
            incoming: None,
            ready_timeout: Duration::from_secs(60),
            qemu_binary: std::env::var_os("FERRY_TEST_QEMU")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64")),
        }
    }

    /// The kernel command line.
    pub fn kernel_cmdline(&self) -> String {
        // `no_timer_check`: under TCG on a loaded host the kernel's
        // IO-APIC timer check can miss its window and panic at boot
        // ("IO-APIC + timer doesn't work"); seen here with load ~9.
        let mut args: Vec<String> = [
            "console=ttyS0",
            "quiet",
            "loglevel=3",
            "panic=0",
            "no_timer_check",
        ]
        .map(String::from)
        .to_vec();
        if self.agent {
            args.push("ferry.agent=1".into());
        }
        let mount = self
            .mount
            .clone()
            .or_else(|| (!self.disks.is_empty()).then(|| "/dev/vda".into()));
        if let Some(dev) = mount {
            args.push(format!("ferry.mount={dev}"));
        }
        match &self.workload {
            Workload::Idle => args.push("ferry.workload=idle".into()),
            Workload::Records { rate, count, size } => {
                args.push("ferry.workload=records".into());
                args.push(format!("ferry.rate={rate}"));
                args.push(format!("ferry.size={size}"));
                if let Some(c) = count {
                    args.push(format!("ferry.count={c}"));
                }
            }
        }
        args.extend(self.cmdline.iter().cloned());
        args.join(" ")
    }

    /// The `ferry_qemu` VM definition booting `kernel` and `initramfs`:
    /// disks are `vda`, `vdb`, ... in order.
    pub fn to_spec(&self, kernel: &Path, initramfs: &Path) -> Result<VmSpec> {
        let mut spec = VmSpec::new(&self.name);
        spec.vcpus = self.vcpus;
        spec.memory_mib = u64::from(self.memory_mib);
        spec.accel = self.accel.clone();
        if let Some(m) = &self.machine {
            spec.machine = m.clone();
        }
        spec.guest_agent = self.agent;
        spec.boot = Boot::Kernel {
            kernel: kernel.to_owned(),
            initrd: Some(initramfs.to_owned()),
            cmdline: self.kernel_cmdline(),
        };
        for (i, d) in self.disks.iter().enumerate() {
            let letter = char::from(
                b'a' + u8::try_from(i).ok().filter(|&i| i < 26).ok_or_else(|| {
                    Error::new(
                        ErrorKind::Qemu,
                        format!("guest {}: more than 26 disks", self.name),
                    )
                })?,
            );
            let source = match d {
                Disk::Raw(p) => DiskSource::File {
                    path: absolute(p)?,
                    format: ImageFormat::Raw,
                },
                Disk::Qcow2(p) => DiskSource::File {
                    path: absolute(p)?,
                    format: ImageFormat::Qcow2,
                },
                Disk::Nbd { server, export } => DiskSource::Nbd {
                    server: server.clone(),
                    export: export.clone(),
                    tls_creds: None,
                },
            };
            spec.disks.push(DiskSpec {
                id: format!("vd{letter}"),
                source,
                read_only: false,
            });
        }
        Ok(spec)
    }
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).map_err(|e| Error::io("resolving", p, e))
}

/// Where `scripts/install-qemu-new.sh` unpacks QEMU 10 beside the system's
/// QEMU 7.2 (`$FERRY_QEMU_NEW_DIR` overrides, as for the script).
pub fn newer_qemu_dir() -> PathBuf {
    std::env::var_os("FERRY_QEMU_NEW_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/ferry/qemu-10"))
}

/// The newer QEMU (10.x) for the tests that QEMU 7.2 under TCG cannot pass:
/// its wrapper script, or an error saying how to get it.
pub fn newer_qemu() -> Result<PathBuf> {
    let bin = newer_qemu_dir().join("qemu-system-x86_64");
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(Error::new(
            ErrorKind::Tool,
            format!(
                "no newer QEMU at {}: run scripts/install-qemu-new.sh (make deps does)",
                bin.display()
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_carries_the_workload() {
        let mut c = GuestConfig::new("t");
        c.disks.push(Disk::Raw("/x/d.raw".into()));
        c.workload = Workload::Records {
            rate: 50.0,
            count: Some(10),
            size: 512,
        };
        let line = c.kernel_cmdline();
        for p in [
            "console=ttyS0",
            "ferry.agent=1",
            "ferry.mount=/dev/vda",
            "ferry.workload=records",
            "ferry.rate=50",
            "ferry.count=10",
        ] {
            assert!(line.split(' ').any(|a| a == p), "{p} missing from {line}");
        }
    }

    #[test]
    fn disks_become_vda_vdb_in_the_spec() {
        let mut c = GuestConfig::new("t");
        c.accel = "tcg".into();
        c.disks.push(Disk::Qcow2("/a/d.qcow2".into()));
        c.disks.push(Disk::Nbd {
            server: NbdServer::Unix("/run/n.sock".into()),
            export: "vol1".into(),
        });
        let spec = c.to_spec("/k".as_ref(), "/i".as_ref()).unwrap();
        assert_eq!(spec.accel, "tcg");
        assert!(spec.guest_agent);
        assert_eq!(spec.disks[0].id, "vda");
        assert_eq!(
            spec.disks[0].source,
            DiskSource::File {
                path: "/a/d.qcow2".into(),
                format: ImageFormat::Qcow2
            }
        );
        assert_eq!(spec.disks[1].id, "vdb");
        assert!(
            matches!(&spec.disks[1].source, DiskSource::Nbd { export, .. } if export == "vol1")
        );
        match &spec.boot {
            Boot::Kernel {
                cmdline, initrd, ..
            } => {
                assert!(cmdline.contains("ferry.mount=/dev/vda"), "{cmdline}");
                assert_eq!(initrd.as_deref(), Some(Path::new("/i")));
            }
            other => panic!("boot {other:?}"),
        }
    }
}
