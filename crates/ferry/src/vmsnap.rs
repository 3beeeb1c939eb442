//! Group snapshots of running VMs:
//! `ferry snapshot create --vm A --vm B [--name N] [--mode overlay|direct] [--no-quiesce]`
//! (the `--vm` form of `snapshot create`), and
//! `ferry vm-snapshot create|list|show|delete|revert|clone`.
//!
//! `ferry snapshot create NAME --volume V ...` stays the volume snapshot:
//! only a `snapshot create` that names `--vm` is routed here
//! ([`route_args`]).

use std::ffi::OsString;

use clap::{Subcommand, ValueEnum};
use ferry_api::{RevertedVm, Started, VmInfo, VmSnapshotGroup};
use serde_json::json;

use crate::client::Client;
use crate::output::{emit, size, table, time_ms};

#[derive(Clone, Copy, ValueEnum)]
pub enum Mode {
    /// Freeze → QEMU overlay → thaw per VM; pool group snapshot; merge.
    Overlay,
    /// Freeze every VM → pool group snapshot → thaw.
    Direct,
}

#[derive(Subcommand)]
pub enum VmSnapVerb {
    /// Snapshot running VMs as one group (application-consistent when
    /// their guest agent answers, crash-consistent otherwise).
    Create {
        /// Group name (generated when absent). A positional name works too.
        #[arg(long)]
        name: Option<String>,
        #[arg(hide = true, conflicts_with = "name")]
        positional_name: Option<String>,
        /// A running VM of this host (repeat for each VM).
        #[arg(long = "vm", required = true)]
        vms: Vec<String>,
        #[arg(long, value_enum, default_value = "overlay")]
        mode: Mode,
        /// Do not freeze the guests' file systems (crash-consistent).
        #[arg(long)]
        no_quiesce: bool,
        /// Print the operation id and return at once.
        #[arg(long)]
        no_wait: bool,
    },
    List,
    /// Per VM and disk: host, pool, volume, snapshot, consistency.
    Show {
        name: String,
    },
    /// Delete the group and its pool snapshots.
    Delete {
        name: String,
    },
    /// Rewrite the disks of stopped VMs with their content in the group.
    Revert {
        name: String,
        /// VMs of the group to revert (default: all).
        #[arg(long = "vm")]
        vms: Vec<String>,
    },
    /// Define a new VM whose disks are clones of a VM's snapshots.
    Clone {
        name: String,
        /// The VM of the group to clone.
        #[arg(long)]
        vm: Option<String>,
        /// The new VM's name.
        #[arg(long = "as")]
        new_name: String,
        #[arg(long)]
        start: bool,
    },
}

/// `ferry [global flags] snapshot create ... --vm X ...` becomes
/// `ferry [global flags] vm-snapshot create ...`; everything else is
/// returned unchanged.
pub fn route_args(mut args: Vec<OsString>) -> Vec<OsString> {
    let pos = args.iter().position(|a| a == "snapshot");
    if let Some(i) = pos
        && args.get(i + 1).is_some_and(|a| a == "create")
        && args[i + 2..]
            .iter()
            .any(|a| a == "--vm" || a.to_string_lossy().starts_with("--vm="))
    {
        args[i] = "vm-snapshot".into();
    }
    args
}

fn group_rows(groups: &[VmSnapshotGroup]) -> String {
    table(
        &["name", "mode", "vms", "disks", "consistency", "created"],
        groups
            .iter()
            .map(|g| {
                let quiesced = g
                    .vms
                    .iter()
                    .filter(|v| v.consistency == ferry_api::Consistency::Quiesced)
                    .count();
                vec![
                    g.name.clone(),
                    g.mode.to_string(),
                    g.vms
                        .iter()
                        .map(|v| v.name.as_str())
                        .collect::<Vec<_>>()
                        .join(","),
                    g.vms
                        .iter()
                        .map(|v| v.disks.len())
                        .sum::<usize>()
                        .to_string(),
                    format!("{quiesced}/{} quiesced", g.vms.len()),
                    time_ms(g.created * 1000),
                ]
            })
            .collect(),
    )
}

fn group_detail(g: &VmSnapshotGroup) -> String {
    let mut out = format!(
        "group      {}\nmode       {}\noperation  {}\ntotal      {:.0} ms (pool snapshot {:.1} ms)\n\n",
        g.name, g.mode, g.operation, g.total_ms, g.storage_ms
    );
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.1} ms"));
    out.push_str(&table(
        &["vm", "consistency", "frozen", "pause", "note"],
        g.vms
            .iter()
            .map(|v| {
                vec![
                    v.name.clone(),
                    v.consistency.to_string(),
                    ms(v.frozen_ms),
                    ms(v.pause_ms),
                    v.note.clone(),
                ]
            })
            .collect(),
    ));
    out.push('\n');
    out.push_str(&table(
        &["vm", "disk", "host", "pool", "volume", "snapshot", "size"],
        g.vms
            .iter()
            .flat_map(|v| {
                v.disks.iter().map(|d| {
                    vec![
                        v.name.clone(),
                        d.device.clone(),
                        d.host.clone(),
                        d.pool.clone(),
                        d.volume.clone(),
                        d.snapshot.clone(),
                        size(d.size),
                    ]
                })
            })
            .collect(),
    ));
    out
}

pub async fn run(c: &Client, j: bool, verb: VmSnapVerb) -> anyhow::Result<i32> {
    match verb {
        VmSnapVerb::Create {
            name,
            positional_name,
            vms,
            mode,
            no_quiesce,
            no_wait,
        } => {
            let mode = match mode {
                Mode::Overlay => "overlay",
                Mode::Direct => "direct",
            };
            let body = json!({
                "vms": vms,
                "name": name.or(positional_name),
                "mode": mode,
                "quiesce": !no_quiesce,
            });
            let s: Started = c.post("/v1/vm-snapshots", &body).await?;
            let code = crate::follow(c, j, s.clone(), no_wait).await?;
            if code == 0 && !no_wait && !j {
                let op: ferry_api::Operation =
                    c.get(&format!("/v1/operations/{}", s.operation)).await?;
                if let Some(n) = op.params["name"].as_str() {
                    let g: VmSnapshotGroup = c.get(&format!("/v1/vm-snapshots/{n}")).await?;
                    print!("{}", group_detail(&g));
                }
            }
            return Ok(code);
        }
        VmSnapVerb::List => {
            let g: Vec<VmSnapshotGroup> = c.get("/v1/vm-snapshots").await?;
            emit(j, &g, |g| group_rows(g));
        }
        VmSnapVerb::Show { name } => {
            let g: VmSnapshotGroup = c.get(&format!("/v1/vm-snapshots/{name}")).await?;
            emit(j, &g, group_detail);
        }
        VmSnapVerb::Delete { name } => {
            c.delete(&format!("/v1/vm-snapshots/{name}")).await?;
            emit(j, &json!({ "deleted": name }), |_| {
                format!("deleted snapshot group {name} and its pool snapshots\n")
            });
        }
        VmSnapVerb::Revert { name, vms } => {
            let r: Vec<RevertedVm> = c
                .post(
                    &format!("/v1/vm-snapshots/{name}/revert"),
                    &json!({ "vms": vms }),
                )
                .await?;
            emit(j, &r, |r| {
                r.iter()
                    .map(|v| format!("reverted VM {} ({} rewritten)\n", v.name, size(v.bytes)))
                    .collect()
            });
        }
        VmSnapVerb::Clone {
            name,
            vm,
            new_name,
            start,
        } => {
            let v: VmInfo = c
                .post(
                    &format!("/v1/vm-snapshots/{name}/clone"),
                    &json!({ "vm": vm, "name": new_name, "start": start }),
                )
                .await?;
            emit(j, &v, |v| {
                format!(
                    "defined VM {} ({}), {}, disks: {}\n",
                    v.name,
                    v.uuid,
                    v.state,
                    v.disks
                        .iter()
                        .filter_map(|d| d.volume.clone())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            });
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    #[test]
    fn only_snapshot_create_with_vm_is_routed() {
        assert_eq!(
            route_args(v(&["ferry", "--json", "snapshot", "create", "--vm", "a"])),
            v(&["ferry", "--json", "vm-snapshot", "create", "--vm", "a"])
        );
        assert_eq!(
            route_args(v(&["ferry", "snapshot", "create", "s1", "--volume", "x"])),
            v(&["ferry", "snapshot", "create", "s1", "--volume", "x"])
        );
        assert_eq!(
            route_args(v(&["ferry", "snapshot", "list"])),
            v(&["ferry", "snapshot", "list"])
        );
    }
}
