//! Backup repositories and backups:
//! `ferry repo init|add|list|info|verify|prune|gc`,
//! `ferry backup VM --repo R` (= `backup create`), `ferry backup list|show|forget`,
//! `ferry restore BACKUP --to HOST [--name NEW] [--instant [--via HOST]]`.
//!
//! Where a repository is optional (`--repo`), a host with one repository
//! uses it, and a backup id is looked up in every repository.

use std::ffi::OsString;

use anyhow::bail;
use clap::{Args, Subcommand};
use ferry_api::{BackupInfo, Operation, RepoEntry, RepoSummary, Started};
use serde_json::json;

use crate::client::Client;
use crate::output::{emit, size, table, time_ms};

#[derive(Subcommand)]
pub enum RepoVerb {
    /// Create a repository: a directory on the ferryd host or
    /// s3://bucket/prefix, and register it with the host.
    Init {
        #[arg(value_name = "LOCATION")]
        location: String,
        /// Name on this host (default: from the location).
        #[arg(long)]
        name: Option<String>,
        /// Encrypt chunks with AES-256-GCM (needs --key-file).
        #[arg(long, requires = "key_file")]
        encrypt: bool,
        /// Key file on the ferryd host; created (mode 0600) if absent. The
        /// key is never stored in the repository.
        #[arg(long)]
        key_file: Option<String>,
    },
    /// Register an existing repository with this host.
    Add {
        #[arg(value_name = "LOCATION")]
        location: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        key_file: Option<String>,
    },
    List,
    /// Counts and sizes.
    Info {
        repo: Option<String>,
    },
    /// Read and check every chunk; names bad chunks and the backups they
    /// affect (exit 1 when any).
    Verify {
        repo: Option<String>,
        #[arg(long)]
        no_wait: bool,
    },
    /// Forget the backups no rule keeps (per VM).
    Prune {
        repo: Option<String>,
        #[arg(long, default_value_t = 0)]
        keep_last: usize,
        #[arg(long, default_value_t = 0)]
        keep_daily: usize,
        #[arg(long, default_value_t = 0)]
        keep_weekly: usize,
        #[arg(long, default_value_t = 0)]
        keep_monthly: usize,
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        no_wait: bool,
    },
    /// Remove chunks no backup references (safe while backups run).
    Gc {
        repo: Option<String>,
        #[arg(long)]
        no_wait: bool,
    },
}

#[derive(Subcommand)]
pub enum BackupVerb {
    /// Back up a VM (`ferry backup VM --repo R` works too).
    Create {
        vm: String,
        #[arg(long)]
        repo: Option<String>,
        /// Do not freeze the guest's file systems (crash-consistent).
        #[arg(long)]
        no_quiesce: bool,
        #[arg(long)]
        no_wait: bool,
    },
    List {
        #[arg(long)]
        repo: Option<String>,
        /// Only the backups of this VM.
        #[arg(long)]
        vm: Option<String>,
    },
    Show {
        id: String,
        #[arg(long)]
        repo: Option<String>,
    },
    /// Forget a backup (its chunks go at the next `repo gc`).
    Forget {
        id: String,
        #[arg(long)]
        repo: Option<String>,
    },
}

/// `ferry restore BACKUP --to HOST [--name NEW] [--instant [--via HOST]]`.
#[derive(Args)]
pub struct RestoreArgs {
    backup: String,
    /// The host to restore to: this host's name, `local`, or a registered
    /// peer (the volumes and the VM are created there).
    #[arg(long)]
    to: String,
    /// The new VM's name (default: `<vm>-restored`).
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    repo: Option<String>,
    #[arg(long)]
    no_wait: bool,
    /// Instant restore: run the VM at once from staging volumes sourced
    /// from the backup, then relocate its disks with no downtime.
    #[arg(long)]
    instant: bool,
    /// Instant restore: the host holding the staging volumes — always the
    /// host holding the repository (the one this command talks to); another
    /// host is refused. With `--to` a peer, the VM runs there from the
    /// staging volumes over NBD/TCP and is relocated into that peer's pool;
    /// the peer must have this host registered (`ferry peer add` there).
    #[arg(long, requires = "instant")]
    via: Option<String>,
}

const VERBS: [&str; 5] = ["create", "list", "show", "forget", "help"];

/// `ferry [flags] backup VM ...` becomes `ferry [flags] backup create VM ...`.
pub fn route_args(mut args: Vec<OsString>) -> Vec<OsString> {
    if let Some(i) = args.iter().position(|a| a == "backup")
        && let Some(next) = args.get(i + 1)
    {
        let n = next.to_string_lossy();
        if !n.starts_with('-') && !VERBS.contains(&n.as_ref()) {
            args.insert(i + 1, "create".into());
        }
    }
    args
}

fn repo_rows(r: &[RepoEntry]) -> String {
    table(
        &["name", "location", "encrypted", "key file", "id"],
        r.iter()
            .map(|r| {
                vec![
                    r.name.clone(),
                    r.location.clone(),
                    if r.encrypted { "yes" } else { "no" }.into(),
                    r.key_file.clone().unwrap_or_else(|| "-".into()),
                    r.id.clone(),
                ]
            })
            .collect(),
    )
}

fn backup_rows(b: &[BackupInfo]) -> String {
    table(
        &[
            "id",
            "repo",
            "vm",
            "time",
            "size",
            "read",
            "new",
            "consistency",
            "parent",
        ],
        b.iter()
            .map(|b| {
                vec![
                    b.id.clone(),
                    b.repo.clone(),
                    b.vm.clone(),
                    time_ms(b.time * 1000),
                    size(b.disks.iter().map(|d| d.size).sum()),
                    size(b.disks.iter().map(|d| d.read_bytes).sum()),
                    size(b.disks.iter().map(|d| d.new_bytes).sum()),
                    b.config["consistency"].as_str().unwrap_or("-").to_string(),
                    b.parent.clone().unwrap_or_else(|| "-".into()),
                ]
            })
            .collect(),
    )
}

fn backup_detail(b: &BackupInfo) -> String {
    let mut out = format!(
        "backup       {}\nrepository   {}\nvm           {}\ntime         {}\nparent       {}\nconsistency  {} ({})\n",
        b.id,
        b.repo,
        b.vm,
        time_ms(b.time * 1000),
        b.parent.as_deref().unwrap_or("-"),
        b.config["consistency"].as_str().unwrap_or("-"),
        b.config["consistency_note"].as_str().unwrap_or(""),
    );
    for n in b.config["notes"].as_array().into_iter().flatten() {
        out.push_str(&format!("note         {}\n", n.as_str().unwrap_or("")));
    }
    out.push('\n');
    out.push_str(&table(
        &[
            "disk",
            "size",
            "mode",
            "data blocks",
            "holes",
            "read",
            "new chunks",
            "new bytes",
            "profile",
        ],
        b.disks
            .iter()
            .map(|d| {
                vec![
                    d.name.clone(),
                    size(d.size),
                    b.config["disks"][&d.name]["mode"]
                        .as_str()
                        .unwrap_or("-")
                        .to_string(),
                    d.data_blocks.to_string(),
                    d.hole_blocks.to_string(),
                    size(d.read_bytes),
                    d.new_chunks.to_string(),
                    size(d.new_bytes),
                    format!("{} ranges", d.read_profile.len()),
                ]
            })
            .collect(),
    ));
    out
}

/// The repository to use when `--repo` is absent: the only one.
async fn one_repo(c: &Client, repo: Option<String>) -> anyhow::Result<String> {
    if let Some(r) = repo {
        return Ok(r);
    }
    let all: Vec<RepoEntry> = c.get("/v1/repos").await?;
    match all.as_slice() {
        [r] => Ok(r.name.clone()),
        [] => bail!("no backup repository on this host: ferry repo init LOCATION"),
        _ => bail!(
            "this host has {} repositories ({}); name one with --repo",
            all.len(),
            all.iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The repository holding backup `id`.
async fn repo_of(c: &Client, repo: Option<String>, id: &str) -> anyhow::Result<String> {
    if let Some(r) = repo {
        return Ok(r);
    }
    let all: Vec<RepoEntry> = c.get("/v1/repos").await?;
    for r in &all {
        if c.get::<BackupInfo>(&format!("/v1/repos/{}/backups/{id}", r.name))
            .await
            .is_ok()
        {
            return Ok(r.name.clone());
        }
    }
    bail!("no backup {id} in any repository of this host")
}

/// Follows an operation, then prints its log (what verify, prune and gc
/// found).
async fn follow_with_log(c: &Client, j: bool, s: Started, no_wait: bool) -> anyhow::Result<i32> {
    let code = crate::follow(c, j, s.clone(), no_wait).await?;
    if !no_wait && !j {
        let op: Operation = c.get(&format!("/v1/operations/{}", s.operation)).await?;
        for l in op.log.iter().skip(1) {
            println!("  {}", l.msg);
        }
    }
    Ok(code)
}

pub async fn run_repo(c: &Client, j: bool, verb: RepoVerb) -> anyhow::Result<i32> {
    match verb {
        RepoVerb::Init {
            location,
            name,
            encrypt,
            key_file,
        } => {
            let key_file = key_file
                .map(|k| std::path::absolute(&k).map(|p| p.display().to_string()))
                .transpose()?;
            let location = absolute_location(&location)?;
            let body = json!({ "location": location, "name": name, "create": true,
                               "encrypt": encrypt, "key_file": key_file });
            let r: RepoEntry = c.post("/v1/repos", &body).await?;
            emit(j, &r, |r| repo_rows(std::slice::from_ref(r)));
        }
        RepoVerb::Add {
            location,
            name,
            key_file,
        } => {
            let key_file = key_file
                .map(|k| std::path::absolute(&k).map(|p| p.display().to_string()))
                .transpose()?;
            let location = absolute_location(&location)?;
            let body = json!({ "location": location, "name": name, "key_file": key_file });
            let r: RepoEntry = c.post("/v1/repos", &body).await?;
            emit(j, &r, |r| repo_rows(std::slice::from_ref(r)));
        }
        RepoVerb::List => {
            let r: Vec<RepoEntry> = c.get("/v1/repos").await?;
            emit(j, &r, |r| repo_rows(r));
        }
        RepoVerb::Info { repo } => {
            let repo = one_repo(c, repo).await?;
            let s: RepoSummary = c.get(&format!("/v1/repos/{repo}")).await?;
            emit(j, &s, |s| {
                format!(
                    "{}\nblock size  {}\nbackups     {}\nchunks      {}\nstored      {}\n",
                    repo_rows(std::slice::from_ref(&s.entry)),
                    size(s.block_size as u64),
                    s.backups,
                    s.chunks,
                    size(s.chunk_bytes)
                )
            });
        }
        RepoVerb::Verify { repo, no_wait } => {
            let repo = one_repo(c, repo).await?;
            let s: Started = c
                .post(&format!("/v1/repos/{repo}/verify"), &json!({}))
                .await?;
            return follow_with_log(c, j, s, no_wait).await;
        }
        RepoVerb::Prune {
            repo,
            keep_last,
            keep_daily,
            keep_weekly,
            keep_monthly,
            dry_run,
            no_wait,
        } => {
            let repo = one_repo(c, repo).await?;
            let body = json!({ "keep_last": keep_last, "keep_daily": keep_daily,
                               "keep_weekly": keep_weekly, "keep_monthly": keep_monthly,
                               "dry_run": dry_run });
            let s: Started = c.post(&format!("/v1/repos/{repo}/prune"), &body).await?;
            return follow_with_log(c, j, s, no_wait).await;
        }
        RepoVerb::Gc { repo, no_wait } => {
            let repo = one_repo(c, repo).await?;
            let s: Started = c.post(&format!("/v1/repos/{repo}/gc"), &json!({})).await?;
            return follow_with_log(c, j, s, no_wait).await;
        }
    }
    Ok(0)
}

/// Directories are made absolute (the daemon needs absolute paths); S3
/// locations are kept.
fn absolute_location(l: &str) -> anyhow::Result<String> {
    if l.contains("://") {
        return Ok(l.to_string());
    }
    Ok(std::path::absolute(l)?.display().to_string())
}

pub async fn run_backup(c: &Client, j: bool, verb: BackupVerb) -> anyhow::Result<i32> {
    match verb {
        BackupVerb::Create {
            vm,
            repo,
            no_quiesce,
            no_wait,
        } => {
            let repo = one_repo(c, repo).await?;
            let body = json!({ "vm": vm, "quiesce": !no_quiesce });
            let s: Started = c.post(&format!("/v1/repos/{repo}/backups"), &body).await?;
            let code = crate::follow(c, j, s.clone(), no_wait).await?;
            if !no_wait && !j {
                let op: Operation = c.get(&format!("/v1/operations/{}", s.operation)).await?;
                for l in op.log.iter().skip(1) {
                    println!("  {}", l.msg);
                }
            }
            return Ok(code);
        }
        BackupVerb::List { repo, vm } => {
            let repos: Vec<String> = match repo {
                Some(r) => vec![r],
                None => c
                    .get::<Vec<RepoEntry>>("/v1/repos")
                    .await?
                    .into_iter()
                    .map(|r| r.name)
                    .collect(),
            };
            let mut all = Vec::new();
            for r in repos {
                let b: Vec<BackupInfo> = c.get(&format!("/v1/repos/{r}/backups")).await?;
                all.extend(
                    b.into_iter()
                        .filter(|b| vm.as_ref().is_none_or(|v| *v == b.vm)),
                );
            }
            emit(j, &all, |b| backup_rows(b));
        }
        BackupVerb::Show { id, repo } => {
            let repo = repo_of(c, repo, &id).await?;
            let b: BackupInfo = c.get(&format!("/v1/repos/{repo}/backups/{id}")).await?;
            emit(j, &b, backup_detail);
        }
        BackupVerb::Forget { id, repo } => {
            let repo = repo_of(c, repo, &id).await?;
            c.delete(&format!("/v1/repos/{repo}/backups/{id}")).await?;
            emit(j, &json!({ "forgotten": id }), |_| {
                format!("forgot backup {id} (its chunks go at the next `ferry repo gc`)\n")
            });
        }
    }
    Ok(0)
}

pub async fn run_restore(c: &Client, j: bool, a: RestoreArgs) -> anyhow::Result<i32> {
    let repo = repo_of(c, a.repo, &a.backup).await?;
    let mut body = json!({ "name": a.name, "to": a.to });
    if a.instant {
        body["instant"] = json!(true);
    }
    if let Some(v) = &a.via {
        body["via"] = json!(v);
    }
    let s: Started = c
        .post(
            &format!("/v1/repos/{repo}/backups/{}/restore", a.backup),
            &body,
        )
        .await?;
    let code = crate::follow(c, j, s.clone(), a.no_wait).await?;
    if code == 0 && !a.no_wait && !j {
        let op: Operation = c.get(&format!("/v1/operations/{}", s.operation)).await?;
        for l in op.log.iter().skip(1) {
            println!("  {}", l.msg);
        }
    }
    Ok(code)
}
