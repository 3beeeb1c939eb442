//! VMs: what `POST /v1/vms` accepts and what `GET /v1/vms[/{id}]` shows.
//!
//! ```json
//! {
//!   "name": "web-1", "vcpus": 2, "memory_mib": 512,
//!   "disks": ["web-1-root", {"volume": "web-1-data", "read_only": true},
//!             {"file": "/var/lib/images/seed.qcow2", "format": "qcow2"}],
//!   "boot": {"kind": "kernel", "kernel": "/boot/vmlinuz", "initrd": "/boot/initrd", "cmdline": "console=ttyS0"},
//!   "guest_agent": true,
//!   "accel": "tcg"
//! }
//! ```
//!
//! A disk named by a plain string is a pool volume of the same host; the
//! daemon serves it to QEMU over its local NBD socket.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

fn default_vcpus() -> u32 {
    1
}

fn default_memory_mib() -> u64 {
    256
}

/// A VM definition.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmDefinition {
    /// 1-64 of `A-Z a-z 0-9 - _ .`, not starting with `.`, not a UUID.
    pub name: String,
    /// Stable identity; generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// Disks in guest order (`vda`, `vdb`, ...).
    #[serde(default)]
    pub disks: Vec<VmDisk>,
    pub boot: VmBoot,
    /// Attach a guest-agent channel (used for graceful stop).
    #[serde(default)]
    pub guest_agent: bool,
    /// QEMU accelerators (`kvm:tcg`, `tcg`); the daemon's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<String>,
}

/// One disk: a volume name, or a detailed form.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(untagged)]
pub enum VmDisk {
    /// A pool volume of this host.
    Volume(String),
    /// `{"volume": ...}` or `{"file": ..., "format": "raw"|"qcow2"}`.
    Spec(VmDiskSpec),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmDiskSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// The peer (as registered on this host) whose pool holds `volume`;
    /// absent: this host's pool. QEMU reaches it over NBD/TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// An image file on the daemon's host (absolute path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// `raw` (default) or `qcow2`, for files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    #[serde(default)]
    pub read_only: bool,
}

impl VmDisk {
    /// The detailed form of this disk.
    pub fn spec(&self) -> VmDiskSpec {
        match self {
            VmDisk::Volume(v) => VmDiskSpec {
                volume: Some(v.clone()),
                ..VmDiskSpec::default()
            },
            VmDisk::Spec(s) => s.clone(),
        }
    }

    /// The volume of this host's pool this disk uses, if it is one.
    pub fn volume(&self) -> Option<&str> {
        match self {
            VmDisk::Volume(v) => Some(v),
            VmDisk::Spec(s) if s.host.is_none() => s.volume.as_deref(),
            VmDisk::Spec(_) => None,
        }
    }

    /// `(peer, volume)` when this disk is a volume in another host's pool.
    pub fn remote(&self) -> Option<(&str, &str)> {
        match self {
            VmDisk::Spec(VmDiskSpec {
                host: Some(h),
                volume: Some(v),
                ..
            }) => Some((h, v)),
            _ => None,
        }
    }
}

/// How a VM boots.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum VmBoot {
    /// Direct kernel boot.
    Kernel {
        kernel: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        initrd: Option<String>,
        #[serde(default)]
        cmdline: String,
    },
    /// Firmware (`-bios`, SeaBIOS when absent) boots the first disk.
    Firmware {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        firmware: Option<String>,
    },
}

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Never started.
    Defined,
    /// QEMU runs and its vCPUs run.
    Running,
    /// QEMU runs, its vCPUs are paused.
    Paused,
    /// QEMU exited because it was asked to (stop, kill, guest power-off).
    Stopped,
    /// QEMU exited without being asked to, or while ferryd was not running.
    Crashed,
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmState::Defined => "defined",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopped => "stopped",
            VmState::Crashed => "crashed",
        })
    }
}

/// One disk as the daemon attached it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct VmDiskInfo {
    /// Guest device id (`vda`, ...).
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// The peer whose pool holds `volume` (absent: this host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The NBD export serving the volume (on `host` when set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export: Option<String>,
    pub read_only: bool,
}

/// A VM as `GET /v1/vms[/{id}]` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct VmInfo {
    pub uuid: String,
    pub name: String,
    pub state: VmState,
    /// QEMU's pid while it runs.
    pub pid: Option<i32>,
    /// QEMU's own run state (`query-status`) while it runs.
    pub qmp_status: Option<String>,
    /// Why the VM is in its state (how it stopped, why it crashed).
    pub note: Option<String>,
    pub run_dir: String,
    /// The guest's serial console.
    pub serial_log: String,
    /// Bytes in the serial console log (the guest's output since its last
    /// start): a peer sees from it when the guest first printed.
    #[serde(default)]
    pub serial_bytes: u64,
    pub disks: Vec<VmDiskInfo>,
    /// The stored definition (uuid and accel filled in).
    pub definition: VmDefinition,
}

/// The answer to `POST /v1/vms/{id}/stop`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct VmStopped {
    /// `guest_agent`, `acpi`, `killed` (graceful stop timed out) or
    /// `already_exited`.
    pub outcome: String,
    pub vm: VmInfo,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_are_names_or_specs() {
        let d: VmDefinition = serde_json::from_str(
            r#"{"name":"a","disks":["v1",{"volume":"v2","read_only":true},{"file":"/x","format":"qcow2"}],
               "boot":{"kind":"kernel","kernel":"/k"}}"#,
        )
        .unwrap();
        assert_eq!(d.vcpus, 1);
        assert_eq!(d.memory_mib, 256);
        assert_eq!(d.disks[0].volume(), Some("v1"));
        assert!(d.disks[1].spec().read_only);
        assert_eq!(d.disks[2].spec().file.as_deref(), Some("/x"));
        let back: VmDefinition = serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
        assert_eq!(back, d);
        assert!(
            serde_json::from_str::<VmDefinition>(r#"{"name":"a","boot":{"kind":"kernel"}}"#)
                .is_err()
        );
    }
}

/// `POST /v1/vms/{id}/relocate`: move disks of a running VM to new volumes
/// of this host's pool with no downtime (QEMU mirror, then pivot). A disk
/// may be a volume of this host or of a peer (the instant restore onto
/// another host relocates its disks from the staging host's export).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RelocateVm {
    pub disks: Vec<RelocateDisk>,
    /// An idempotency key: a second request with the same key answers the
    /// operation the first one started, unless it failed or was
    /// cancelled (then a new one starts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
}

/// One disk of a [`RelocateVm`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RelocateDisk {
    /// Index of the disk in the VM's definition (0 is `vda`).
    pub index: usize,
    /// The new volume (created with `size` bytes when missing).
    pub volume: String,
    pub size: u64,
}
