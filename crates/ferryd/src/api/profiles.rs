//! Read profiles of volumes: which chunks a volume reads first (a VM's
//! boot), recorded by the pool; backups store them and restores give them
//! back to the new volumes.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use ferry_api::{ReadProfile, SetReadProfile};
use ferry_pool::ProfileLimit;

use super::{ApiResult, bad_field, blocking};
use crate::body::Body;
use crate::daemon::Daemon;

fn profile_of(v: &ferry_pool::Volume) -> ReadProfile {
    let cs = v.chunk_size();
    ReadProfile {
        volume: v.name().to_string(),
        recording: v.read_profile_active(),
        ranges: v
            .read_profile()
            .into_iter()
            .map(|r| [r.start * cs, (r.end * cs).min(v.size())])
            .collect(),
    }
}

/// `GET /v1/volumes/{name}/read-profile`.
pub async fn show(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
) -> ApiResult<ReadProfile> {
    let pool = d.pool().clone();
    blocking(move || Ok(profile_of(&pool.volume(&name)?)))
        .await
        .map(Json)
}

/// `POST /v1/volumes/{name}/read-profile`: start recording, or set it.
pub async fn set(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
    Body(req): Body<SetReadProfile>,
) -> ApiResult<ReadProfile> {
    let given = [
        req.reads.is_some(),
        req.seconds.is_some(),
        req.ranges.is_some(),
    ];
    if given.iter().filter(|x| **x).count() != 1 {
        return Err(bad_field(
            "reads",
            "give exactly one of reads, seconds (start recording) or ranges (set the profile)",
        ));
    }
    if let Some(r) = req
        .ranges
        .as_ref()
        .and_then(|r| r.iter().find(|r| r[0] >= r[1]))
    {
        return Err(bad_field(
            "ranges",
            &format!("range [{}, {}] is empty or reversed", r[0], r[1]),
        ));
    }
    let pool = d.pool().clone();
    blocking(move || {
        let v = pool.volume(&name)?;
        let cs = v.chunk_size();
        match (req.reads, req.seconds, req.ranges) {
            (Some(n), _, _) => v.start_read_profile(ProfileLimit::Reads(n)),
            (_, Some(s), _) => v.start_read_profile(ProfileLimit::Duration(Duration::from_secs(s))),
            (_, _, Some(r)) => {
                let chunks: Vec<_> = r.iter().map(|r| r[0] / cs..r[1].div_ceil(cs)).collect();
                v.set_read_profile(&chunks);
            }
            _ => {}
        }
        v.flush()?;
        Ok(profile_of(&v))
    })
    .await
    .map(Json)
}
