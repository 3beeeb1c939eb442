//! `ferry <noun> <verb>`: the CLI of ferryd's HTTP API.
//!
//! Exit codes: 0 success, 1 the request or the operation failed, 2 usage.

mod backup;
mod client;
mod migrate;
mod output;
mod peer;
mod vm;
mod vmsnap;
mod watch;

use clap::{CommandFactory, Parser, Subcommand};
use ferry_api::{
    ExportInfo, HostInfo, OpState, Operation, PoolInfo, SnapshotInfo, Started, VolumeInfo,
};
use serde_json::json;

use client::{Client, parse_size};
use output::{emit, size, table, time_ms};

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Move and protect the storage of running VMs"
)]
struct Cli {
    /// ferryd's URL (default: FERRY_URL, then the CLI configuration file).
    #[arg(long, global = true)]
    url: Option<String>,
    /// API token (default: FERRY_TOKEN, then the CLI configuration file).
    #[arg(long, global = true)]
    token: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    noun: Noun,
}

#[derive(Subcommand)]
enum Noun {
    /// This host.
    Host {
        #[command(subcommand)]
        verb: HostVerb,
    },
    /// The host's block pool.
    Pool {
        #[command(subcommand)]
        verb: PoolVerb,
    },
    /// Volumes of the pool.
    Volume {
        #[command(subcommand)]
        verb: VolumeVerb,
    },
    /// Snapshots and group snapshots.
    Snapshot {
        #[command(subcommand)]
        verb: SnapshotVerb,
    },
    /// NBD exports of volumes and snapshots.
    Export {
        #[command(subcommand)]
        verb: ExportVerb,
    },
    /// Operations: long, journaled work with progress.
    Op {
        #[command(subcommand)]
        verb: OpVerb,
    },
    /// Other hosts this host works with (migrations, copies).
    Peer {
        #[command(subcommand)]
        verb: peer::PeerVerb,
    },
    /// Virtual machines of this host.
    Vm {
        #[command(subcommand)]
        verb: vm::VmVerb,
    },
    /// Batch migration of many VMs to one host: batch, status, recover, list.
    Migrate {
        #[command(subcommand)]
        verb: migrate::MigrateVerb,
    },
    /// Group snapshots of running VMs (`snapshot create --vm ...` too).
    VmSnapshot {
        #[command(subcommand)]
        verb: vmsnap::VmSnapVerb,
    },
    /// Backup repositories (directory or S3).
    Repo {
        #[command(subcommand)]
        verb: backup::RepoVerb,
    },
    /// Backups of VMs: `ferry backup VM --repo R`, list, show, forget.
    Backup {
        #[command(subcommand)]
        verb: backup::BackupVerb,
    },
    /// Restore a backup into new volumes and a new VM.
    Restore(backup::RestoreArgs),
    /// Print shell completions.
    Completions { shell: clap_complete::Shell },
}

#[derive(Subcommand)]
enum HostVerb {
    /// Name, version, data directory, listeners.
    Info,
}

#[derive(Subcommand)]
enum PoolVerb {
    /// Chunk size, space used, counts.
    Info,
}

#[derive(Subcommand)]
enum VolumeVerb {
    List,
    Show {
        name: String,
    },
    /// Create a thin volume (SIZE in bytes or with K/M/G/T).
    Create {
        name: String,
        size: String,
    },
    Grow {
        name: String,
        size: String,
    },
    Delete {
        name: String,
    },
    /// Import a disk image (a path on the ferryd host; raw, qcow2 or another
    /// format qemu-img reads) into a new volume.
    Import {
        name: String,
        path: String,
        /// The image's format (detected when absent).
        #[arg(long)]
        format: Option<String>,
        /// Return the operation id at once instead of showing its progress.
        #[arg(long)]
        no_wait: bool,
    },
    /// Export a volume (one consistent point in time) to a new image file on
    /// the ferryd host.
    Export {
        name: String,
        path: String,
        #[arg(long, default_value = "qcow2", value_parser = ["qcow2", "raw"])]
        format: String,
        /// Return the operation id at once instead of showing its progress.
        #[arg(long)]
        no_wait: bool,
    },
    /// A writable volume sharing the chunks of a snapshot.
    Clone {
        snapshot: String,
        name: String,
    },
}

#[derive(Subcommand)]
enum SnapshotVerb {
    List,
    /// Snapshot one volume, or several at one atomic point in time.
    Create {
        name: String,
        #[arg(long = "volume", required = true)]
        volumes: Vec<String>,
    },
    Delete {
        name: String,
    },
}

#[derive(Subcommand)]
enum ExportVerb {
    List,
    Show {
        name: String,
    },
    /// Export a volume (read-write) or a snapshot (read-only) over NBD.
    Create {
        #[arg(
            long,
            conflicts_with = "snapshot",
            required_unless_present = "snapshot"
        )]
        volume: Option<String>,
        #[arg(long)]
        snapshot: Option<String>,
        /// Export name (default: the volume's or snapshot's name).
        #[arg(long)]
        name: Option<String>,
        /// Writes of 256 KiB or more bypass the page cache (O_DIRECT): for
        /// a volume a bulk copy fills. A volume's export only.
        #[arg(long, conflicts_with = "snapshot")]
        direct: bool,
        /// Each write starts going to the disk at once: for a volume a
        /// bulk copy fills and flushes at its end. A volume's export only.
        #[arg(long, conflicts_with = "snapshot")]
        write_out: bool,
    },
    Delete {
        name: String,
    },
}

#[derive(Subcommand)]
enum OpVerb {
    List,
    /// The operation with its progress tree, steps and log.
    Show {
        id: String,
    },
    /// Follow an operation's progress until it ends.
    Watch {
        id: String,
    },
    Cancel {
        id: String,
    },
}

fn main() {
    let cli = Cli::parse_from(backup::route_args(vmsnap::route_args(
        std::env::args_os().collect(),
    )));
    if let Noun::Completions { shell } = cli.noun {
        clap_complete::generate(shell, &mut Cli::command(), "ferry", &mut std::io::stdout());
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn volume_rows(v: &[VolumeInfo]) -> String {
    table(
        &["name", "size", "exclusive", "shared", "parent", "lazy"],
        v.iter()
            .map(|v| {
                vec![
                    v.name.clone(),
                    size(v.size),
                    size(v.exclusive_bytes),
                    size(v.shared_bytes),
                    v.parent_snapshot.clone().unwrap_or_else(|| "-".into()),
                    if v.lazy { "yes" } else { "no" }.into(),
                ]
            })
            .collect(),
    )
}

fn snapshot_rows(s: &[SnapshotInfo]) -> String {
    table(
        &["name", "volume", "size", "group", "created"],
        s.iter()
            .map(|s| {
                vec![
                    s.name.clone(),
                    s.volume.clone(),
                    size(s.size),
                    s.group.clone().unwrap_or_else(|| "-".into()),
                    time_ms(s.created * 1000),
                ]
            })
            .collect(),
    )
}

fn export_rows(e: &[ExportInfo]) -> String {
    table(
        &["name", "of", "mode", "local uri"],
        e.iter()
            .map(|e| {
                vec![
                    e.name.clone(),
                    e.volume
                        .as_ref()
                        .map(|v| format!("volume {v}"))
                        .or_else(|| e.snapshot.as_ref().map(|s| format!("snapshot {s}")))
                        .unwrap_or_default(),
                    if e.read_only {
                        "ro".to_string()
                    } else {
                        let mut mode = vec!["rw"];
                        if e.direct {
                            mode.push("direct");
                        }
                        if e.write_out {
                            mode.push("write-out");
                        }
                        mode.join(", ")
                    },
                    e.unix_uri.clone(),
                ]
            })
            .collect(),
    )
}

fn op_rows(ops: &[Operation]) -> String {
    table(
        &["id", "kind", "state", "progress", "created"],
        ops.iter()
            .map(|o| {
                vec![
                    o.id.clone(),
                    o.kind.clone(),
                    o.state.to_string(),
                    o.progress
                        .as_ref()
                        .map_or("-".into(), |p| format!("{:.1}%", p.overall * 100.0)),
                    time_ms(o.created_ms),
                ]
            })
            .collect(),
    )
}

fn op_detail(o: &Operation) -> String {
    let mut out = format!(
        "operation {}\nkind      {}\nstate     {}\n",
        o.id, o.kind, o.state
    );
    if let Some(e) = &o.error {
        out.push_str(&format!("error     {e}\n"));
    }
    if let Some(p) = &o.progress {
        out.push_str(&format!(
            "progress  {:.1}%\n\nprogress tree (weight, done):\n",
            p.overall * 100.0
        ));
        fn walk(p: &ferry_api::ProgressView, id: usize, depth: usize, out: &mut String) {
            let n = &p.nodes[id];
            out.push_str(&format!(
                "{:indent$}{}  (w {:.3}, {:.1}%)\n",
                "",
                n.name,
                n.weight,
                n.fraction * 100.0,
                indent = 2 + depth * 2
            ));
            for c in &n.children {
                walk(p, *c, depth + 1, out);
            }
        }
        if !p.nodes.is_empty() {
            walk(p, 0, 0, &mut out);
        }
    }
    if !o.steps.is_empty() {
        out.push_str("\nsteps:\n");
        for s in &o.steps {
            out.push_str(&format!("  {:<24} {}", s.name, s.state));
            if let Some(e) = &s.error {
                out.push_str(&format!(" ({e})"));
            }
            out.push('\n');
        }
    }
    if !o.log.is_empty() {
        out.push_str("\nlog:\n");
        for l in &o.log {
            out.push_str(&format!(
                "  {} {:<5} {}\n",
                time_ms(l.ts_ms),
                l.level,
                l.msg
            ));
        }
    }
    out
}

/// Follows a started operation (or prints its id with `--no-wait`); the
/// exit code says whether it succeeded.
async fn follow(c: &Client, json: bool, started: Started, no_wait: bool) -> anyhow::Result<i32> {
    if no_wait {
        emit(json, &started, |s| format!("{}\n", s.operation));
        return Ok(0);
    }
    let op = watch::watch(c, &started.operation, json).await?;
    if !json {
        match op.state {
            OpState::Succeeded => println!("operation {} succeeded", op.id),
            s => eprintln!(
                "operation {} {s}: {}",
                op.id,
                op.error.as_deref().unwrap_or("no reason given")
            ),
        }
    }
    Ok(if op.state == OpState::Succeeded { 0 } else { 1 })
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    let c = Client::from_env(cli.url, cli.token)?;
    let j = cli.json;
    match cli.noun {
        Noun::Completions { .. } => unreachable!("handled before connecting"),
        Noun::Host {
            verb: HostVerb::Info,
        } => {
            let h: HostInfo = c.get("/v1/host").await?;
            emit(j, &h, |h| {
                format!(
                    "name      {}\nversion   {}\ndata dir  {}\naccel     {}\nuptime    {}s\n",
                    h.name, h.version, h.data_dir, h.accel, h.uptime_s
                )
            });
        }
        Noun::Pool {
            verb: PoolVerb::Info,
        } => {
            let p: PoolInfo = c.get("/v1/pool").await?;
            emit(j, &p, |p| {
                format!(
                    "chunk size  {}\nused        {}\nlimit       {}\nvolumes     {}\nsnapshots   {}\n",
                    size(p.chunk_size),
                    size(p.used_bytes),
                    p.limit_bytes.map_or("none".into(), size),
                    p.volumes,
                    p.snapshots
                )
            });
        }
        Noun::Volume { verb } => match verb {
            VolumeVerb::List => {
                let v: Vec<VolumeInfo> = c.get("/v1/volumes").await?;
                emit(j, &v, |v| volume_rows(v));
            }
            VolumeVerb::Show { name } => {
                let v: VolumeInfo = c.get(&format!("/v1/volumes/{name}")).await?;
                emit(j, &v, |v| volume_rows(std::slice::from_ref(v)));
            }
            VolumeVerb::Create { name, size: s } => {
                let body = json!({ "name": name, "size": parse_size(&s)? });
                let v: VolumeInfo = c.post("/v1/volumes", &body).await?;
                emit(j, &v, |v| volume_rows(std::slice::from_ref(v)));
            }
            VolumeVerb::Grow { name, size: s } => {
                let body = json!({ "size": parse_size(&s)? });
                let v: VolumeInfo = c.post(&format!("/v1/volumes/{name}/grow"), &body).await?;
                emit(j, &v, |v| volume_rows(std::slice::from_ref(v)));
            }
            VolumeVerb::Delete { name } => {
                c.delete(&format!("/v1/volumes/{name}")).await?;
                emit(j, &json!({ "deleted": name }), |_| {
                    format!("deleted volume {name}\n")
                });
            }
            VolumeVerb::Import {
                name,
                path,
                format,
                no_wait,
            } => {
                let path = std::path::absolute(&path)?;
                let body = json!({ "path": path, "format": format });
                let s: Started = c.post(&format!("/v1/volumes/{name}/import"), &body).await?;
                return follow(&c, j, s, no_wait).await;
            }
            VolumeVerb::Export {
                name,
                path,
                format,
                no_wait,
            } => {
                let path = std::path::absolute(&path)?;
                let body = json!({ "path": path, "format": format });
                let s: Started = c.post(&format!("/v1/volumes/{name}/export"), &body).await?;
                return follow(&c, j, s, no_wait).await;
            }
            VolumeVerb::Clone { snapshot, name } => {
                let body = json!({ "snapshot": snapshot, "name": name });
                let v: VolumeInfo = c.post("/v1/clones", &body).await?;
                emit(j, &v, |v| volume_rows(std::slice::from_ref(v)));
            }
        },
        Noun::Snapshot { verb } => match verb {
            SnapshotVerb::List => {
                let s: Vec<SnapshotInfo> = c.get("/v1/snapshots").await?;
                emit(j, &s, |s| snapshot_rows(s));
            }
            SnapshotVerb::Create { name, volumes } => {
                let body = json!({ "name": name, "volumes": volumes });
                let s: Vec<SnapshotInfo> = c.post("/v1/snapshots", &body).await?;
                emit(j, &s, |s| snapshot_rows(s));
            }
            SnapshotVerb::Delete { name } => {
                c.delete(&format!("/v1/snapshots/{name}")).await?;
                emit(j, &json!({ "deleted": name }), |_| {
                    format!("deleted snapshot {name}\n")
                });
            }
        },
        Noun::Export { verb } => match verb {
            ExportVerb::List => {
                let e: Vec<ExportInfo> = c.get("/v1/exports").await?;
                emit(j, &e, |e| export_rows(e));
            }
            ExportVerb::Show { name } => {
                let e: ExportInfo = c.get(&format!("/v1/exports/{name}")).await?;
                emit(j, &e, |e| {
                    format!(
                        "{}tcp uri (holds the export's secret): {}\n",
                        export_rows(std::slice::from_ref(e)),
                        e.tcp_uri.as_deref().unwrap_or("-")
                    )
                });
            }
            ExportVerb::Create {
                volume,
                snapshot,
                name,
                direct,
                write_out,
            } => {
                let body = json!({
                    "volume": volume,
                    "snapshot": snapshot,
                    "name": name,
                    "direct": direct,
                    "write_out": write_out,
                });
                let e: ExportInfo = c.post("/v1/exports", &body).await?;
                emit(j, &e, |e| export_rows(std::slice::from_ref(e)));
            }
            ExportVerb::Delete { name } => {
                c.delete(&format!("/v1/exports/{name}")).await?;
                emit(j, &json!({ "deleted": name }), |_| {
                    format!("deleted export {name}\n")
                });
            }
        },
        Noun::Peer { verb } => peer::run(&c, j, verb).await?,
        Noun::Vm { verb } => return vm::run(&c, j, verb).await,
        Noun::Migrate { verb } => return migrate::run(&c, j, verb).await,
        Noun::VmSnapshot { verb } => return vmsnap::run(&c, j, verb).await,
        Noun::Repo { verb } => return backup::run_repo(&c, j, verb).await,
        Noun::Backup { verb } => return backup::run_backup(&c, j, verb).await,
        Noun::Restore(a) => return backup::run_restore(&c, j, a).await,
        Noun::Op { verb } => match verb {
            OpVerb::List => {
                let ops: Vec<Operation> = c.get("/v1/operations").await?;
                emit(j, &ops, |o| op_rows(o));
            }
            OpVerb::Show { id } => {
                let op: Operation = c.get(&format!("/v1/operations/{id}")).await?;
                emit(j, &op, op_detail);
            }
            OpVerb::Watch { id } => {
                let s = Started { operation: id };
                return follow(&c, j, s, false).await;
            }
            OpVerb::Cancel { id } => {
                c.post::<serde_json::Value>(&format!("/v1/operations/{id}/cancel"), &json!({}))
                    .await?;
                emit(j, &json!({ "cancelled": id }), |_| {
                    format!("cancel requested for operation {id}\n")
                });
            }
        },
    }
    Ok(0)
}
