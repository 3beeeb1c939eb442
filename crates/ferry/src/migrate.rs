//! `ferry migrate …`: batch migration of many VMs to one host, its status
//! (decided from the destination's durable records) and its recovery.

use clap::Subcommand;
use ferry_api::{BatchStarted, BatchStatus, BatchSummary, Started};
use serde_json::json;

use crate::client::{Client, parse_size};
use crate::output::{emit, table};

#[derive(Subcommand)]
pub enum MigrateVerb {
    /// Migrate VMs (on this host or its peers) to HOST, `--parallel` at a
    /// time; goes on past a VM that fails.
    Batch {
        /// A VM (name or UUID); repeat for each.
        #[arg(long = "vm", required = true)]
        vms: Vec<String>,
        /// The destination host (a peer, or this host).
        #[arg(long)]
        to: String,
        /// The batch id (default: generated). Re-running a batch skips the
        /// VMs it migrated.
        #[arg(long)]
        name: Option<String>,
        /// VMs migrated at a time (default 2).
        #[arg(long)]
        parallel: Option<u32>,
        /// Bandwidth cap per VM, per second (bytes, or K/M/G suffix).
        #[arg(long, value_name = "LIMIT")]
        bandwidth: Option<String>,
        /// Print the batch and operation ids and return.
        #[arg(long)]
        no_wait: bool,
    },
    /// Per VM: not started / in progress / migrated / failed, with the
    /// evidence and the live state of both sides.
    Status {
        batch: String,
        /// Ask this destination host for the batch's members (when this
        /// host lost or never had the batch's journal).
        #[arg(long)]
        dest: Option<String>,
    },
    /// Finish the VMs past switchover, roll back the others.
    Recover {
        batch: String,
        #[arg(long)]
        dest: Option<String>,
        #[arg(long)]
        no_wait: bool,
    },
    /// Batches this host coordinates or holds records of.
    List,
}

fn query(dest: &Option<String>) -> String {
    dest.as_ref()
        .map(|d| format!("?dest={d}"))
        .unwrap_or_default()
}

fn status_rows(s: &BatchStatus) -> String {
    let mut out = format!(
        "batch {} → {}{} (members from the {})\n",
        s.batch,
        s.to,
        match (&s.operation, &s.operation_state) {
            (Some(o), Some(st)) => format!(", operation {o} {st}"),
            _ => String::new(),
        },
        s.from
    );
    out.push_str(&table(
        &[
            "VM", "STATE", "ON", "EVIDENCE", "SOURCE", "DEST", "RECOVER", "WHY",
        ],
        s.vms
            .iter()
            .map(|v| {
                vec![
                    v.name.clone(),
                    v.state.to_string(),
                    v.side.clone(),
                    if v.evidence.is_empty() {
                        "-".into()
                    } else {
                        v.evidence.join(",")
                    },
                    format!("{}: {}", v.source.host, v.source.state),
                    format!("{}: {}", v.destination.host, v.destination.state),
                    v.action.clone(),
                    v.reason.clone(),
                ]
            })
            .collect(),
    ));
    out
}

pub async fn run(c: &Client, j: bool, verb: MigrateVerb) -> anyhow::Result<i32> {
    match verb {
        MigrateVerb::Batch {
            vms,
            to,
            name,
            parallel,
            bandwidth,
            no_wait,
        } => {
            let body = json!({
                "vms": vms,
                "to": to,
                "name": name,
                "parallel": parallel,
                "bandwidth": bandwidth.as_deref().map(parse_size).transpose()?,
            });
            let s: BatchStarted = c.post("/v1/migrations/batches", &body).await?;
            if !j {
                println!("batch {} (operation {})", s.batch, s.operation);
            }
            let code = crate::follow(
                c,
                j,
                Started {
                    operation: s.operation,
                },
                no_wait,
            )
            .await?;
            if !j && !no_wait {
                let st: BatchStatus = c
                    .get(&format!("/v1/migrations/batches/{}", s.batch))
                    .await?;
                print!("{}", status_rows(&st));
            }
            return Ok(code);
        }
        MigrateVerb::Status { batch, dest } => {
            let s: BatchStatus = c
                .get(&format!("/v1/migrations/batches/{batch}{}", query(&dest)))
                .await?;
            emit(j, &s, status_rows);
        }
        MigrateVerb::Recover {
            batch,
            dest,
            no_wait,
        } => {
            let s: Started = c
                .post(
                    &format!("/v1/migrations/batches/{batch}/recover{}", query(&dest)),
                    &json!({}),
                )
                .await?;
            let code = crate::follow(c, j, s, no_wait).await?;
            if !j && !no_wait {
                let st: BatchStatus = c
                    .get(&format!("/v1/migrations/batches/{batch}{}", query(&dest)))
                    .await?;
                print!("{}", status_rows(&st));
            }
            return Ok(code);
        }
        MigrateVerb::List => {
            let l: Vec<BatchSummary> = c.get("/v1/migrations/batches").await?;
            emit(j, &l, |l| {
                table(
                    &["BATCH", "TO", "VMS", "ROLE", "OPERATION", "STATE"],
                    l.iter()
                        .map(|b| {
                            vec![
                                b.batch.clone(),
                                b.to.clone(),
                                b.vms.to_string(),
                                b.role.clone(),
                                b.operation.clone().unwrap_or_else(|| "-".into()),
                                b.operation_state.clone().unwrap_or_else(|| "-".into()),
                            ]
                        })
                        .collect(),
                )
            });
        }
    }
    Ok(0)
}
