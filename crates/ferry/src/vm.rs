//! `ferry vm define|list|show|start|stop|pause|resume|kill|delete`.

use anyhow::Context;
use clap::{Args, Subcommand};
use ferry_api::{VmBoot, VmDefinition, VmDisk, VmInfo, VmStopped};
use serde_json::json;

use crate::client::{Client, parse_size};
use crate::output::{emit, size, table};

#[derive(Args)]
pub struct DefineArgs {
    /// VM name (omit with --from-json).
    #[arg(required_unless_present = "from_json")]
    name: Option<String>,
    /// A full definition (JSON, as `POST /v1/vms` takes it); other flags are ignored.
    #[arg(long, conflicts_with = "name")]
    from_json: Option<String>,
    /// A pool volume to attach (vda, vdb, ... in order); `PEER:VOLUME` for
    /// a volume in the pool of a registered peer (served over NBD/TCP).
    #[arg(long = "disk")]
    disks: Vec<String>,
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Memory: MiB, or with a K/M/G suffix.
    #[arg(long, default_value = "256")]
    memory: String,
    /// Kernel to boot directly (a path on the ferryd host).
    #[arg(long)]
    kernel: Option<String>,
    #[arg(long, requires = "kernel")]
    initrd: Option<String>,
    #[arg(long, requires = "kernel", default_value = "")]
    cmdline: String,
    /// Firmware image for disk boot (SeaBIOS when absent and no --kernel).
    #[arg(long, conflicts_with = "kernel")]
    firmware: Option<String>,
    /// Attach a guest-agent channel (graceful stop through the agent).
    #[arg(long)]
    agent: bool,
    /// QEMU accelerators (`kvm:tcg`, `tcg`); ferryd's default when absent.
    #[arg(long)]
    accel: Option<String>,
    /// Fixed UUID (generated otherwise).
    #[arg(long)]
    uuid: Option<String>,
}

#[derive(Subcommand)]
pub enum VmVerb {
    /// Define a VM whose disks are pool volumes of this host.
    Define(Box<DefineArgs>),
    List,
    /// Definition, state, pid, QEMU status.
    Show {
        vm: String,
    },
    Start {
        vm: String,
    },
    /// Graceful shutdown (guest agent, ACPI); killed after the timeout.
    Stop {
        vm: String,
        /// Seconds before QEMU is killed.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    Pause {
        vm: String,
    },
    Resume {
        vm: String,
    },
    /// Kill QEMU at once (SIGKILL).
    Kill {
        vm: String,
    },
    /// Remove the definition (never the volumes); refused while running.
    Delete {
        vm: String,
    },
    /// Copy a VM to a peer host (from an application-consistent snapshot
    /// if it runs); shows one weighted progress bar with ETA.
    Copy {
        vm: String,
        /// The target: a registered peer's name.
        #[arg(long, value_name = "HOST")]
        to: String,
        /// The copy's name on the target (default `<vm>-copy`).
        #[arg(long)]
        name: Option<String>,
        /// Transfer limit per second (bytes, or with a K/M/G suffix).
        #[arg(long, value_name = "LIMIT")]
        bandwidth: Option<String>,
        /// The VM's host when it is not the one asked (a registered peer):
        /// the host asked coordinates and shows the progress. Default: this
        /// host, or the one peer that has the VM.
        #[arg(long, value_name = "HOST")]
        from: Option<String>,
        /// Print the operation id and return at once.
        #[arg(long)]
        no_wait: bool,
    },
    /// Live-migrate a running VM to a registered peer (a vm.migrate
    /// operation; its progress is followed unless --no-wait).
    Migrate {
        vm: String,
        /// The destination peer (`ferry peer list`).
        #[arg(long)]
        to: String,
        /// ondemand: runs there at once, disks follow; precopy: disks first.
        #[arg(long, value_enum, default_value_t = MigrateModeArg::Ondemand)]
        mode: MigrateModeArg,
        /// Memory bandwidth cap per second (bytes, or K/M/G suffix).
        #[arg(long, value_name = "LIMIT")]
        bandwidth: Option<String>,
        /// Keep the source's volumes after hydration.
        #[arg(long)]
        keep_source: bool,
        /// While the source is down, reads of missing chunks wait or fail.
        #[arg(long, value_enum, default_value_t = OnMissingArg::Wait)]
        on_missing: OnMissingArg,
        /// Print the operation id and return.
        #[arg(long)]
        no_wait: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum MigrateModeArg {
    Ondemand,
    Precopy,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum OnMissingArg {
    Wait,
    Error,
}

fn absolute(p: &str) -> anyhow::Result<String> {
    Ok(std::path::absolute(p)?.display().to_string())
}

fn memory_mib(s: &str) -> anyhow::Result<u64> {
    if let Ok(n) = s.trim().parse::<u64>() {
        return Ok(n);
    }
    Ok(parse_size(s)? >> 20)
}

fn vm_rows(v: &[VmInfo]) -> String {
    table(
        &["name", "state", "pid", "vcpus", "memory", "disks", "uuid"],
        v.iter()
            .map(|v| {
                vec![
                    v.name.clone(),
                    v.state.to_string(),
                    v.pid.map_or("-".into(), |p| p.to_string()),
                    v.definition.vcpus.to_string(),
                    size(v.definition.memory_mib << 20),
                    if v.disks.is_empty() {
                        "-".into()
                    } else {
                        v.disks
                            .iter()
                            .map(|d| {
                                d.volume
                                    .clone()
                                    .or_else(|| d.file.clone())
                                    .unwrap_or_default()
                            })
                            .collect::<Vec<_>>()
                            .join(",")
                    },
                    v.uuid.clone(),
                ]
            })
            .collect(),
    )
}

fn vm_detail(v: &VmInfo) -> String {
    let mut out = format!(
        "name        {}\nuuid        {}\nstate       {}\n",
        v.name, v.uuid, v.state
    );
    if let Some(p) = v.pid {
        out.push_str(&format!("pid         {p}\n"));
    }
    if let Some(s) = &v.qmp_status {
        out.push_str(&format!("qemu status {s}\n"));
    }
    if let Some(n) = &v.note {
        out.push_str(&format!("note        {n}\n"));
    }
    out.push_str(&format!(
        "vcpus       {}\nmemory      {}\naccel       {}\nagent       {}\n",
        v.definition.vcpus,
        size(v.definition.memory_mib << 20),
        v.definition.accel.as_deref().unwrap_or("-"),
        if v.definition.guest_agent {
            "yes"
        } else {
            "no"
        }
    ));
    match &v.definition.boot {
        VmBoot::Kernel {
            kernel,
            initrd,
            cmdline,
        } => out.push_str(&format!(
            "boot        kernel {kernel}{}\ncmdline     {cmdline}\n",
            initrd
                .as_ref()
                .map(|i| format!(" initrd {i}"))
                .unwrap_or_default()
        )),
        VmBoot::Firmware { firmware } => out.push_str(&format!(
            "boot        firmware {}\n",
            firmware.as_deref().unwrap_or("(default)")
        )),
    }
    for d in &v.disks {
        out.push_str(&format!(
            "disk {:<6} {}{}{}\n",
            d.id,
            d.volume
                .as_ref()
                .map(|v| match &d.host {
                    Some(h) => format!("volume {v} on {h}"),
                    None => format!("volume {v}"),
                })
                .or_else(|| d.file.as_ref().map(|f| format!("file {f}")))
                .unwrap_or_default(),
            d.export
                .as_ref()
                .map(|e| format!(" (export {e})"))
                .unwrap_or_default(),
            if d.read_only { " ro" } else { "" }
        ));
    }
    out.push_str(&format!(
        "run dir     {}\nserial log  {}\n",
        v.run_dir, v.serial_log
    ));
    out
}

pub async fn run(c: &Client, j: bool, verb: VmVerb) -> anyhow::Result<i32> {
    match verb {
        VmVerb::Copy {
            vm,
            to,
            name,
            bandwidth,
            from,
            no_wait,
        } => {
            let body = ferry_api::VmCopyRequest {
                to,
                name,
                bandwidth: bandwidth.as_deref().map(parse_size).transpose()?,
                from,
                request: None,
            };
            let started: ferry_api::Started = c
                .post(&format!("/v1/vms/{vm}/copy"), &serde_json::to_value(&body)?)
                .await?;
            return crate::follow(c, j, started, no_wait).await;
        }
        VmVerb::Define(args) => {
            let DefineArgs {
                name,
                from_json,
                disks,
                vcpus,
                memory,
                kernel,
                initrd,
                cmdline,
                firmware,
                agent,
                accel,
                uuid,
            } = *args;
            let def: VmDefinition = match from_json {
                Some(path) => {
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("cannot read {path}"))?;
                    serde_json::from_str(&text)
                        .with_context(|| format!("{path} is not a VM definition"))?
                }
                None => VmDefinition {
                    name: name.context("a VM name is required")?,
                    uuid,
                    vcpus,
                    memory_mib: memory_mib(&memory)?,
                    disks: disks.into_iter().map(disk_arg).collect(),
                    boot: match kernel {
                        Some(k) => VmBoot::Kernel {
                            kernel: absolute(&k)?,
                            initrd: initrd.as_deref().map(absolute).transpose()?,
                            cmdline,
                        },
                        None => VmBoot::Firmware {
                            firmware: firmware.as_deref().map(absolute).transpose()?,
                        },
                    },
                    guest_agent: agent,
                    accel,
                },
            };
            let v: VmInfo = c.post("/v1/vms", &serde_json::to_value(&def)?).await?;
            emit(j, &v, vm_detail);
        }
        VmVerb::List => {
            let v: Vec<VmInfo> = c.get("/v1/vms").await?;
            emit(j, &v, |v| vm_rows(v));
        }
        VmVerb::Show { vm } => {
            let v: VmInfo = c.get(&format!("/v1/vms/{vm}")).await?;
            emit(j, &v, vm_detail);
        }
        VmVerb::Start { vm } => {
            let v: VmInfo = c.post(&format!("/v1/vms/{vm}/start"), &json!({})).await?;
            emit(j, &v, |v| {
                format!("started VM {} (pid {})\n", v.name, v.pid.unwrap_or(0))
            });
        }
        VmVerb::Stop { vm, timeout } => {
            let s: VmStopped = c
                .post(
                    &format!("/v1/vms/{vm}/stop?timeout_s={timeout}"),
                    &json!({}),
                )
                .await?;
            emit(j, &s, |s| {
                format!(
                    "stopped VM {} ({}): {}\n",
                    s.vm.name,
                    s.outcome,
                    s.vm.note.as_deref().unwrap_or("")
                )
            });
        }
        VmVerb::Pause { vm } => {
            let v: VmInfo = c.post(&format!("/v1/vms/{vm}/pause"), &json!({})).await?;
            emit(j, &v, |v| format!("VM {} is {}\n", v.name, v.state));
        }
        VmVerb::Resume { vm } => {
            let v: VmInfo = c.post(&format!("/v1/vms/{vm}/resume"), &json!({})).await?;
            emit(j, &v, |v| format!("VM {} is {}\n", v.name, v.state));
        }
        VmVerb::Kill { vm } => {
            let v: VmInfo = c.post(&format!("/v1/vms/{vm}/kill"), &json!({})).await?;
            emit(j, &v, |v| format!("killed VM {}\n", v.name));
        }
        VmVerb::Migrate {
            vm,
            to,
            mode,
            bandwidth,
            keep_source,
            on_missing,
            no_wait,
        } => {
            let body = json!({
                "to": to,
                "mode": match mode {
                    MigrateModeArg::Ondemand => "ondemand",
                    MigrateModeArg::Precopy => "precopy",
                },
                "bandwidth": bandwidth.as_deref().map(parse_size).transpose()?,
                "keep_source": keep_source,
                "on_missing": match on_missing {
                    OnMissingArg::Wait => "wait",
                    OnMissingArg::Error => "error",
                },
            });
            let s: ferry_api::Started = c.post(&format!("/v1/vms/{vm}/migrate"), &body).await?;
            return crate::follow(c, j, s, no_wait).await;
        }
        VmVerb::Delete { vm } => {
            c.delete(&format!("/v1/vms/{vm}")).await?;
            emit(j, &json!({ "deleted": vm }), |_| {
                format!("deleted VM {vm}\n")
            });
        }
    }
    Ok(0)
}

/// `VOLUME` or `PEER:VOLUME`.
fn disk_arg(a: String) -> VmDisk {
    match a.split_once(':') {
        Some((host, volume)) => VmDisk::Spec(ferry_api::VmDiskSpec {
            volume: Some(volume.to_string()),
            host: Some(host.to_string()),
            ..Default::default()
        }),
        None => VmDisk::Volume(a),
    }
}

#[cfg(test)]
mod tests {
    use super::{VmDisk, disk_arg, memory_mib};

    #[test]
    fn memory_is_mib_or_a_size() {
        assert_eq!(memory_mib("512").unwrap(), 512);
        assert_eq!(memory_mib("1G").unwrap(), 1024);
        assert_eq!(memory_mib("256M").unwrap(), 256);
        assert!(memory_mib("x").is_err());
    }

    #[test]
    fn disks_on_peers() {
        assert_eq!(disk_arg("v".into()), VmDisk::Volume("v".into()));
        let d = disk_arg("host-b:v".into());
        assert_eq!(d.remote(), Some(("host-b", "v")));
        assert_eq!(d.volume(), None);
    }
}
