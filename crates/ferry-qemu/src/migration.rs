//! Live migration between two QEMU processes: pre-copy, post-copy, progress,
//! reported downtime, cancel before switchover.
//!
//! The destination is started with `-incoming defer` (see
//! [`crate::LaunchOptions::incoming`]), so capabilities can be set before it
//! listens; [`listen`] sets them and runs `migrate-incoming`. The source then
//! runs [`migrate`]: parameters (`downtime-limit`, `max-bandwidth`),
//! capabilities (`postcopy-ram` on both sides for post-copy), `migrate`, and
//! a poll of `query-migrate` until `completed`, `failed` or `cancelled`.
//! In post-copy mode, `migrate-start-postcopy` is sent once the first pass
//! over RAM is done; from then on the destination runs and fetches missing
//! pages from the source on demand.
//!
//! What a crash leaves: before switchover, the source still runs the VM
//! and a failed or cancelled migration resumes it; the destination QEMU
//! exits. After a post-copy switchover, the guest's memory is split between
//! both processes: losing either loses the VM — the reason post-copy is a
//! choice, not the default.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::error::{Error, ErrorKind, Result};
use crate::jobs::MonotonicProgress;
use crate::qmp::{QmpClient, RunState};

/// How to migrate.
#[derive(Debug, Clone)]
pub struct MigrationParams {
    /// Longest acceptable pause at switchover (`downtime-limit`), ms.
    pub downtime_limit_ms: Option<u64>,
    /// Bandwidth cap (`max-bandwidth`), bytes per second.
    pub max_bandwidth: Option<u64>,
    /// Switch to post-copy after the first pass over RAM.
    pub postcopy: bool,
    /// Switch to post-copy earlier, once this many bytes were sent.
    pub postcopy_after_bytes: Option<u64>,
    /// How often progress is polled.
    pub poll_interval: Duration,
    /// Bound on the whole migration.
    pub timeout: Duration,
}

impl Default for MigrationParams {
    fn default() -> Self {
        Self {
            downtime_limit_ms: Some(300),
            max_bandwidth: None,
            postcopy: false,
            postcopy_after_bytes: None,
            poll_interval: Duration::from_millis(50),
            timeout: Duration::from_secs(600),
        }
    }
}

/// A reading of `query-migrate`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MigrationStats {
    /// QEMU's status (`setup`, `active`, `postcopy-active`, `completed`, ...).
    pub status: String,
    /// RAM bytes transferred so far.
    pub transferred: u64,
    /// RAM bytes still to send.
    pub remaining: u64,
    /// Guest RAM size.
    pub total: u64,
    /// Passes over RAM started so far.
    pub dirty_sync_count: u64,
    /// Total time of the migration (ms), as QEMU reports it.
    pub total_time_ms: Option<u64>,
    /// Time the guest was paused at switchover (ms), once completed.
    pub downtime_ms: Option<u64>,
    /// Expected downtime while active (ms).
    pub expected_downtime_ms: Option<u64>,
    /// Pages the destination requested in post-copy.
    pub postcopy_requests: Option<u64>,
    /// QEMU's error description when failed.
    pub error: Option<String>,
}

/// Progress of a migration, never going backwards.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationProgress {
    /// The raw reading.
    pub stats: MigrationStats,
    /// `transferred / (transferred + remaining)`, clamped monotonic.
    pub fraction: f64,
}

/// `query-migrate`.
pub async fn query_migrate(qmp: &QmpClient) -> Result<MigrationStats> {
    let v = qmp.execute("query-migrate", Value::Null).await?;
    let ram = &v["ram"];
    Ok(MigrationStats {
        status: v["status"].as_str().unwrap_or("none").to_string(),
        transferred: ram["transferred"].as_u64().unwrap_or(0),
        remaining: ram["remaining"].as_u64().unwrap_or(0),
        total: ram["total"].as_u64().unwrap_or(0),
        dirty_sync_count: ram["dirty-sync-count"].as_u64().unwrap_or(0),
        total_time_ms: v["total-time"].as_u64(),
        downtime_ms: v["downtime"].as_u64(),
        expected_downtime_ms: v["expected-downtime"].as_u64(),
        postcopy_requests: ram["postcopy-requests"].as_u64(),
        error: v["error-desc"].as_str().map(str::to_string),
    })
}

async fn set_postcopy(qmp: &QmpClient, on: bool) -> Result<()> {
    qmp.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "postcopy-ram", "state": on}]}),
    )
    .await
    .map(drop)
}

/// On a destination started with `-incoming defer`: enables post-copy if
/// asked, then listens on `uri` (`unix:/path` or `tcp:host:port`).
pub async fn listen(dest: &QmpClient, uri: &str, postcopy: bool) -> Result<()> {
    let ctx = format!(
        "preparing the migration destination {}",
        dest.path().display()
    );
    let wrap = |e: Error| Error::new(e.kind, format!("{ctx}: {}", e.context));
    if postcopy {
        set_postcopy(dest, true).await.map_err(wrap)?;
    }
    dest.execute("migrate-incoming", json!({"uri": uri}))
        .await
        .map_err(wrap)?;
    Ok(())
}

/// Migrates the source to a destination listening on `uri`; returns the
/// final statistics (total time, downtime). Progress readings go to
/// `progress` when given. On failure or timeout the migration is cancelled
/// and the source keeps (or resumes) running.
pub async fn migrate(
    src: &QmpClient,
    uri: &str,
    params: &MigrationParams,
    progress: Option<mpsc::Sender<MigrationProgress>>,
) -> Result<MigrationStats> {
    let ctx = format!("migration of {} to {uri}", src.path().display());
    let wrap = |e: Error| Error::new(e.kind, format!("{ctx}: {}", e.context));
    let mut p = json!({});
    if let Some(d) = params.downtime_limit_ms {
        p["downtime-limit"] = json!(d);
    }
    if let Some(b) = params.max_bandwidth {
        p["max-bandwidth"] = json!(b);
    }
    if p.as_object().is_some_and(|o| !o.is_empty()) {
        src.execute("migrate-set-parameters", p)
            .await
            .map_err(wrap)?;
    }
    set_postcopy(src, params.postcopy).await.map_err(wrap)?;
    src.execute("migrate", json!({"uri": uri}))
        .await
        .map_err(wrap)?;
    let started = Instant::now();
    let mut clamp = MonotonicProgress::new();
    let mut postcopy_started = false;
    loop {
        let st = query_migrate(src).await.map_err(wrap)?;
        let fraction = if st.status == "completed" {
            clamp.finish()
        } else {
            clamp.update(st.transferred, st.transferred + st.remaining)
        };
        if let Some(tx) = &progress {
            let _ = tx
                .send(MigrationProgress {
                    stats: st.clone(),
                    fraction,
                })
                .await;
        }
        match st.status.as_str() {
            "completed" => return Ok(st),
            "failed" => {
                return Err(Error::new(
                    ErrorKind::Job(format!(
                        "migration failed: {}",
                        st.error.as_deref().unwrap_or("no reason given")
                    )),
                    ctx,
                ));
            }
            "cancelled" => {
                return Err(Error::new(
                    ErrorKind::Job("migration cancelled".into()),
                    ctx,
                ));
            }
            "active"
                if params.postcopy
                    && !postcopy_started
                    && (st.dirty_sync_count >= 2
                        || params
                            .postcopy_after_bytes
                            .is_some_and(|b| st.transferred >= b)) =>
            {
                src.execute("migrate-start-postcopy", Value::Null)
                    .await
                    .map_err(wrap)?;
                postcopy_started = true;
            }
            _ => {}
        }
        if started.elapsed() > params.timeout {
            if !postcopy_started {
                let _ = cancel(src, Duration::from_secs(30)).await;
            }
            return Err(Error::new(ErrorKind::Timeout(params.timeout), ctx));
        }
        tokio::time::sleep(params.poll_interval).await;
    }
}

/// Cancels a migration that has not switched over yet and waits until the
/// source reports `cancelled` (it then runs again as before).
pub async fn cancel(src: &QmpClient, timeout: Duration) -> Result<MigrationStats> {
    let ctx = format!("cancelling the migration of {}", src.path().display());
    src.execute("migrate_cancel", Value::Null).await?;
    let deadline = Instant::now() + timeout;
    loop {
        let st = query_migrate(src).await?;
        match st.status.as_str() {
            "cancelled" => return Ok(st),
            "completed" | "postcopy-active" => {
                return Err(Error::new(
                    ErrorKind::Job(format!("too late: migration is {}", st.status)),
                    ctx,
                ));
            }
            _ => {}
        }
        if Instant::now() > deadline {
            return Err(Error::new(ErrorKind::Timeout(timeout), ctx));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the destination's vCPUs run (after switchover).
pub async fn wait_running(dest: &QmpClient, timeout: Duration) -> Result<()> {
    let ctx = format!(
        "waiting for the migrated VM to run on {}",
        dest.path().display()
    );
    let deadline = Instant::now() + timeout;
    loop {
        let st = dest
            .query_status()
            .await
            .map_err(|e| Error::new(e.kind, format!("{ctx}: {}", e.context)))?;
        if st.running {
            return Ok(());
        }
        if matches!(st.status, RunState::InternalError | RunState::Shutdown) {
            return Err(Error::new(
                ErrorKind::Job(format!("destination is in state {:?}", st.status)),
                ctx,
            ));
        }
        if Instant::now() > deadline {
            return Err(Error::new(ErrorKind::Timeout(timeout), ctx));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
