//! Backup repositories and backups: register (`repo init` / add), list,
//! info; verify, prune and gc as operations; back up a VM and restore a
//! backup as operations; list, show and forget backups.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use ferry_api::{
    AddRepo, BackupInfo, CreateBackup, PruneRepo, RepoEntry, RepoSummary, RestoreBackup, Started,
};

use super::{ApiResult, Failure, bad_field, error_response};
use crate::backups::{self, BackupError, BackupParams, RepoOpParams, RestoreParams};
use crate::body::Body;
use crate::daemon::Daemon;

impl From<BackupError> for Failure {
    fn from(e: BackupError) -> Self {
        let msg = e.to_string();
        let status = match e {
            BackupError::NotFound(_) => StatusCode::NOT_FOUND,
            BackupError::Invalid(_) => StatusCode::BAD_REQUEST,
            BackupError::Conflict(_) => StatusCode::CONFLICT,
            BackupError::Other(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        error_response(status, &msg, None)
    }
}

/// Runs a blocking backup-layer call off the async runtime.
async fn run<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BackupError> + Send + 'static,
) -> Result<T, Failure> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(Failure::from),
        Err(e) => Err(error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("backup call panicked: {e}"),
            None,
        )),
    }
}

fn start(
    d: &Daemon,
    kind: &str,
    params: impl serde::Serialize,
) -> Result<(StatusCode, Json<Started>), Failure> {
    let v = serde_json::to_value(params)
        .map_err(|e| error_response(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string(), None))?;
    let id = d.ops.start(kind, v)?;
    Ok((StatusCode::ACCEPTED, Json(Started { operation: id })))
}

pub async fn list_repos(State(d): State<Arc<Daemon>>) -> ApiResult<Vec<RepoEntry>> {
    let b = d.backups.clone();
    Ok(Json(run(move || b.repos()).await?))
}

pub async fn add_repo(
    State(d): State<Arc<Daemon>>,
    Body(req): Body<AddRepo>,
) -> Result<(StatusCode, Json<RepoEntry>), Failure> {
    let b = d.backups.clone();
    Ok((StatusCode::CREATED, Json(run(move || b.add(&req)).await?)))
}

pub async fn show_repo(
    State(d): State<Arc<Daemon>>,
    Path(repo): Path<String>,
) -> ApiResult<RepoSummary> {
    let b = d.backups.clone();
    Ok(Json(run(move || b.summary(&repo)).await?))
}

async fn repo_op(
    d: &Daemon,
    kind: &str,
    mut p: RepoOpParams,
) -> Result<(StatusCode, Json<Started>), Failure> {
    let b = d.backups.clone();
    let name = p.repo.clone();
    p.repo = run(move || b.entry(&name)).await?.name;
    start(d, kind, p)
}

pub async fn verify(
    State(d): State<Arc<Daemon>>,
    Path(repo): Path<String>,
) -> Result<(StatusCode, Json<Started>), Failure> {
    repo_op(
        &d,
        backups::VERIFY,
        RepoOpParams {
            repo,
            ..Default::default()
        },
    )
    .await
}

pub async fn gc(
    State(d): State<Arc<Daemon>>,
    Path(repo): Path<String>,
) -> Result<(StatusCode, Json<Started>), Failure> {
    repo_op(
        &d,
        backups::GC,
        RepoOpParams {
            repo,
            ..Default::default()
        },
    )
    .await
}

pub async fn prune(
    State(d): State<Arc<Daemon>>,
    Path(repo): Path<String>,
    Body(req): Body<PruneRepo>,
) -> Result<(StatusCode, Json<Started>), Failure> {
    if req.keep_last + req.keep_daily + req.keep_weekly + req.keep_monthly == 0 {
        return Err(bad_field(
            "keep_last",
            "give at least one keep rule; a prune without one would forget every backup",
        ));
    }
    let p = RepoOpParams {
        repo,
        keep_last: req.keep_last,
        keep_daily: req.keep_daily,
        keep_weekly: req.keep_weekly,
        keep_monthly: req.keep_monthly,
        dry_run: req.dry_run,
    };
    repo_op(&d, backups::PRUNE, p).await
}

pub async fn list_backups(
    State(d): State<Arc<Daemon>>,
    Path(repo): Path<String>,
) -> ApiResult<Vec<BackupInfo>> {
    let b = d.backups.clone();
    Ok(Json(run(move || b.list(&repo)).await?))
}

pub async fn show_backup(
    State(d): State<Arc<Daemon>>,
    Path((repo, id)): Path<(String, String)>,
) -> ApiResult<BackupInfo> {
    let b = d.backups.clone();
    Ok(Json(run(move || b.show(&repo, &id)).await?))
}

pub async fn forget_backup(
    State(d): State<Arc<Daemon>>,
    Path((repo, id)): Path<(String, String)>,
) -> Result<StatusCode, Failure> {
    let b = d.backups.clone();
    run(move || b.forget(&repo, &id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Starts a `vm.backup` operation.
pub async fn create_backup(
    State(d): State<Arc<Daemon>>,
    Path(repo): Path<String>,
    Body(req): Body<CreateBackup>,
) -> Result<(StatusCode, Json<Started>), Failure> {
    let b = d.backups.clone();
    let name = repo.clone();
    let entry = run(move || b.entry(&name)).await?;
    let vm = d.vms.find(&req.vm)?;
    let def = vm.definition();
    let mut bytes = 0;
    for (i, disk) in def.disks.iter().enumerate() {
        match disk.volume() {
            Some(v) => bytes += d.pool().volume(v)?.size(),
            None => {
                return Err(error_response(
                    StatusCode::CONFLICT,
                    &format!(
                        "VM {}: disk vd{} is a file, not a pool volume; nothing was backed up",
                        vm.name,
                        char::from(b'a' + i as u8)
                    ),
                    None,
                ));
            }
        }
    }
    for op in d.ops.journal().unfinished()? {
        if op.kind == backups::BACKUP && op.params["uuid"] == vm.uuid.to_string().as_str() {
            return Err(error_response(
                StatusCode::CONFLICT,
                &format!(
                    "VM {} is in backup operation {} already; nothing was started",
                    vm.name, op.id
                ),
                None,
            ));
        }
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let uuid = vm.uuid.to_string();
    let p = BackupParams {
        repo: entry.name,
        vm: vm.name.clone(),
        group: format!("backup-{}-{now}", &uuid[..8]),
        uuid,
        quiesce: req.quiesce,
        bytes,
    };
    start(&d, backups::BACKUP, p)
}

/// Starts a `backup.restore` operation.
pub async fn restore(
    State(d): State<Arc<Daemon>>,
    Path((repo, id)): Path<(String, String)>,
    Body(req): Body<RestoreBackup>,
) -> Result<(StatusCode, Json<Started>), Failure> {
    // Another host: a registered peer, which gets the volumes and the VM.
    let to = match &req.to {
        Some(to) if *to != d.cfg.name && to != "local" => {
            if d.peers.get(to).is_err() {
                return Err(bad_field(
                    "to",
                    &format!(
                        "restore to host {to}: no peer named {to} is registered on this host (`ferry peer add`); nothing was restored"
                    ),
                ));
            }
            Some(to.clone())
        }
        _ => None,
    };
    // Instant restore: staging is always on this host, which reads the
    // repository (the key never leaves it).
    if let Some(via) = &req.via
        && *via != d.cfg.name
        && via != "local"
    {
        return Err(bad_field(
            "via",
            &format!(
                "staging on host {via}: the staging host is the host holding the repository, this one ({}); send the restore to {via} if it holds one, or leave out via; nothing was restored",
                d.cfg.name
            ),
        ));
    }
    if req.via.is_some() && !req.instant {
        return Err(bad_field("via", "via applies to an instant restore only"));
    }
    let b = d.backups.clone();
    let repo2 = repo.clone();
    let info = run(move || b.show(&repo2, &id)).await?;
    let name = req.name.unwrap_or_else(|| format!("{}-restored", info.vm));
    if !req.instant && to.is_none() && d.vms.find(&name).is_ok() {
        return Err(error_response(
            StatusCode::CONFLICT,
            &format!("a VM named {name} exists already; nothing was restored"),
            Some("name"),
        ));
    }
    let definition: ferry_api::VmDefinition =
        serde_json::from_value(info.config["definition"].clone()).map_err(|e| {
            error_response(
                StatusCode::CONFLICT,
                &format!(
                    "backup {} holds no VM definition ({e}); nothing was restored",
                    info.id
                ),
                None,
            )
        })?;
    if req.instant
        && let Some(to) = &to
    {
        let b = d.backups.clone();
        let entry = run(move || b.entry(&repo)).await?;
        let mut p = instant_params(entry, &info, &name, definition, req.prefetch_profile);
        let me = name_on_peer(&d, to).await?;
        p.to = Some(to.clone());
        p.staging_host = Some(me.clone());
        check_instant_onto_peer(&d, &p, to, &me).await?;
        backups::instant::remote_definition(&p, &me).map_err(|e| bad_field("name", &e))?;
        return start(&d, backups::instant::INSTANT_RESTORE, p);
    }
    if req.instant {
        let b = d.backups.clone();
        let entry = run(move || b.entry(&repo)).await?;
        let p = instant_params(entry, &info, &name, definition, req.prefetch_profile);
        // The same restore run again after a failed relocation resumes it:
        // the VM runs on (some of) its staging volumes.
        let resume = match d.vms.find(&name) {
            Ok(vm) => {
                let def = vm.definition();
                let mine = def.disks.len() == p.disks.len()
                    && def.disks.iter().zip(&p.disks).all(|(v, x)| {
                        v.volume() == Some(x.staging.as_str())
                            || v.volume() == Some(x.target.as_str())
                    });
                if !mine {
                    return Err(error_response(
                        StatusCode::CONFLICT,
                        &format!("a VM named {name} exists already; nothing was restored"),
                        Some("name"),
                    ));
                }
                true
            }
            Err(_) => false,
        };
        for x in &p.disks {
            for vol in [&x.staging, &x.target] {
                if !resume && d.pool().volume(vol).is_ok() {
                    return Err(error_response(
                        StatusCode::CONFLICT,
                        &format!("volume {vol} exists already; nothing was restored"),
                        Some("name"),
                    ));
                }
            }
        }
        backups::instant::definition(&p, |x| x.staging.clone())
            .map_err(|e| bad_field("name", &e))?;
        return start(&d, backups::instant::INSTANT_RESTORE, p);
    }
    let mut disks = Vec::new();
    for disk in &info.disks {
        let vol = format!("{name}-{}", disk.name);
        if to.is_none() && d.pool().volume(&vol).is_ok() {
            return Err(error_response(
                StatusCode::CONFLICT,
                &format!("volume {vol} exists already; nothing was restored"),
                Some("name"),
            ));
        }
        disks.push((disk.name.clone(), vol, disk.size));
    }
    let p = RestoreParams {
        repo: info.repo,
        backup: info.id,
        name,
        disks,
        definition,
        to,
    };
    backups::restore::new_definition(&p).map_err(|e| bad_field("name", &e))?;
    start(&d, backups::RESTORE, p)
}

fn instant_params(
    entry: ferry_api::RepoEntry,
    info: &ferry_api::BackupInfo,
    name: &str,
    definition: ferry_api::VmDefinition,
    prefetch_profile: Option<bool>,
) -> backups::instant::InstantParams {
    backups::instant::InstantParams {
        repo: entry.name,
        location: entry.location,
        repo_id: entry.id,
        key_file: entry.key_file,
        backup: info.id.clone(),
        name: name.to_string(),
        disks: info
            .disks
            .iter()
            .map(|x| backups::instant::InstantDisk {
                device: x.name.clone(),
                staging: format!("{name}-{}-staging", x.name),
                target: format!("{name}-{}", x.name),
                size: x.size,
                profile: x.read_profile.clone(),
            })
            .collect(),
        definition,
        prefetch_profile: prefetch_profile.unwrap_or(true),
        to: None,
        staging_host: None,
    }
}

/// The name peer `to` has for this host (its peer whose reported name is
/// this host's): the VM there reaches the staging volumes through it.
async fn name_on_peer(d: &Daemon, to: &str) -> Result<String, Failure> {
    let peer = d
        .peers
        .client(to)
        .map_err(|e| bad_field("to", &e.to_string()))?;
    let known: Vec<ferry_api::PeerInfo> = peer.get("/v1/peer/peers").await.map_err(|e| {
        error_response(
            StatusCode::BAD_GATEWAY,
            &format!("host {to} did not list its peers: {e}; nothing was restored"),
            Some("to"),
        )
    })?;
    let me = &d.cfg.name;
    let mut found: Vec<&ferry_api::PeerInfo> =
        known.iter().filter(|p| p.host_name == *me).collect();
    found.sort_by_key(|p| p.name != *me);
    match found.first() {
        Some(p) => Ok(p.name.clone()),
        None => Err(bad_field(
            "to",
            &format!(
                "instant restore onto host {to}: {to} does not know this host ({me}), whose staging volumes its VM would read; register it there first (`ferry peer add <URL of {me}> --peer-token <{me}'s peer token>` on {to}); nothing was restored"
            ),
        )),
    }
}

/// Nothing of the restore exists yet on this host or on `to`, unless the
/// VM there is this restore's (running it again resumes it).
async fn check_instant_onto_peer(
    d: &Daemon,
    p: &backups::instant::InstantParams,
    to: &str,
    me: &str,
) -> Result<(), Failure> {
    use crate::peers::PeerError;
    let peer = d
        .peers
        .client(to)
        .map_err(|e| bad_field("to", &e.to_string()))?;
    let unreachable = |e: PeerError| {
        error_response(
            StatusCode::BAD_GATEWAY,
            &format!("host {to}: {e}; nothing was restored"),
            Some("to"),
        )
    };
    let resume = match peer
        .get::<ferry_api::VmInfo>(&format!("/v1/vms/{}", p.name))
        .await
    {
        Ok(info) => {
            let mine = info.definition.disks.len() == p.disks.len()
                && info.definition.disks.iter().zip(&p.disks).all(|(v, x)| {
                    v.remote() == Some((me, x.staging.as_str()))
                        || v.volume() == Some(x.target.as_str())
                });
            if !mine {
                return Err(error_response(
                    StatusCode::CONFLICT,
                    &format!(
                        "a VM named {} exists already on {to}; nothing was restored",
                        p.name
                    ),
                    Some("name"),
                ));
            }
            true
        }
        Err(PeerError::Failed { status: 404, .. }) => false,
        Err(e) => return Err(unreachable(e)),
    };
    if resume {
        return Ok(());
    }
    for x in &p.disks {
        if d.pool().volume(&x.staging).is_ok() {
            return Err(error_response(
                StatusCode::CONFLICT,
                &format!("volume {} exists already; nothing was restored", x.staging),
                Some("name"),
            ));
        }
        match peer
            .get::<ferry_api::VolumeInfo>(&format!("/v1/volumes/{}", x.target))
            .await
        {
            Ok(_) => {
                return Err(error_response(
                    StatusCode::CONFLICT,
                    &format!(
                        "volume {} exists already on {to}; nothing was restored",
                        x.target
                    ),
                    Some("name"),
                ));
            }
            Err(PeerError::Failed { status: 404, .. }) => {}
            Err(e) => return Err(unreachable(e)),
        }
    }
    Ok(())
}
