//! Block jobs (commit, mirror): waiting for their events, cancelling them,
//! and their progress as a stream that never goes backwards.
//!
//! QEMU reports a job's progress as `offset` of `len` bytes, but `len` grows
//! while the guest keeps writing (every write to an area already copied
//! adds work), so `offset / len` can fall. [`MonotonicProgress`] is the one
//! place where a fraction is clamped so that reported progress only moves
//! forward; the migration progress uses it too.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::error::{Error, ErrorKind, Result};
use crate::qmp::{EventStream, QmpClient};

/// Turns raw `(done, total)` pairs into a fraction in `[0, 1]` that never
/// decreases.
#[derive(Debug, Clone, Copy, Default)]
pub struct MonotonicProgress {
    last: f64,
}

impl MonotonicProgress {
    /// A fresh progress at 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds a new raw reading; returns the clamped fraction.
    pub fn update(&mut self, done: u64, total: u64) -> f64 {
        let raw = if total == 0 {
            0.0
        } else {
            (done as f64 / total as f64).clamp(0.0, 1.0)
        };
        if raw > self.last {
            self.last = raw;
        }
        self.last
    }

    /// Marks the work as finished (fraction 1).
    pub fn finish(&mut self) -> f64 {
        self.last = 1.0;
        1.0
    }

    /// The last reported fraction.
    pub fn fraction(&self) -> f64 {
        self.last
    }
}

/// One row of `query-block-jobs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockJobInfo {
    /// Job id.
    pub id: String,
    /// Job type (`commit`, `mirror`, ...).
    pub job_type: String,
    /// Bytes done.
    pub offset: u64,
    /// Bytes of work known so far (grows while the guest writes).
    pub len: u64,
    /// True once the job may be completed (mirror, active commit).
    pub ready: bool,
    /// QEMU's job status (`running`, `ready`, `concluded`, ...).
    pub status: String,
}

/// One progress reading of a job.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JobProgress {
    /// Bytes done (raw).
    pub offset: u64,
    /// Bytes known so far (raw).
    pub len: u64,
    /// Clamped fraction in `[0, 1]`, never smaller than the one before.
    pub fraction: f64,
    /// True once the job is ready to complete.
    pub ready: bool,
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobEnd {
    /// Completed (for mirror and active commit: after the pivot).
    Completed,
    /// Cancelled.
    Cancelled,
}

/// `query-block-jobs`.
pub async fn query_block_jobs(qmp: &QmpClient) -> Result<Vec<BlockJobInfo>> {
    let v = qmp.execute("query-block-jobs", Value::Null).await?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .map(|j| BlockJobInfo {
            id: j["device"].as_str().unwrap_or("").to_string(),
            job_type: j["type"].as_str().unwrap_or("").to_string(),
            offset: j["offset"].as_u64().unwrap_or(0),
            len: j["len"].as_u64().unwrap_or(0),
            ready: j["ready"].as_bool().unwrap_or(false),
            status: j["status"].as_str().unwrap_or("").to_string(),
        })
        .collect())
}

fn job_ctx(job: &str) -> String {
    format!("block job {job}")
}

fn event_job(ev: &Value) -> Option<&str> {
    ev["device"].as_str().or_else(|| ev["id"].as_str())
}

/// Waits until job `job` is ready (`BLOCK_JOB_READY`). A job that ends
/// before (error or cancel) or a QEMU that goes away is an error.
pub async fn wait_ready(events: &mut EventStream, job: &str, timeout: Duration) -> Result<()> {
    let fut = async {
        // The side that failed, from BLOCK_JOB_ERROR; the reason comes with
        // the BLOCK_JOB_COMPLETED that follows when the action is `report`.
        let mut failed: Option<String> = None;
        loop {
            let ev = events.next().await?;
            if event_job(&ev.data) != Some(job) {
                continue;
            }
            match ev.name.as_str() {
                "BLOCK_JOB_READY" => return Ok(()),
                "BLOCK_JOB_ERROR" => {
                    let side = match ev.data["operation"].as_str() {
                        Some("read") => "reading its source failed".to_string(),
                        Some("write") => "writing its target failed".to_string(),
                        other => format!("{} failed", other.unwrap_or("an I/O")),
                    };
                    match ev.data["action"].as_str() {
                        // The job goes on (ignore) or ends next (report).
                        Some("ignore") | Some("report") => failed = Some(side),
                        _ => {
                            let why = format!("{side} (job paused)");
                            return Err(Error::new(ErrorKind::Job(why), job_ctx(job)));
                        }
                    }
                }
                "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED" => {
                    let reason = ev.data["error"].as_str().map(str::to_string);
                    let why = match (&failed, reason) {
                        (Some(side), Some(r)) => format!("{side}: {r}"),
                        (Some(side), None) => side.clone(),
                        (None, Some(r)) => r,
                        (None, None) => format!("{} before ready", ev.name),
                    };
                    return Err(Error::new(ErrorKind::Job(why), job_ctx(job)));
                }
                _ => {}
            }
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => {
            r.map_err(|e| Error::new(e.kind, format!("{}: waiting until ready", job_ctx(job))))
        }
        Err(_) => Err(Error::new(
            ErrorKind::Timeout(timeout),
            format!("{}: waiting until ready", job_ctx(job)),
        )),
    }
}

/// Waits until job `job` ends. `BLOCK_JOB_COMPLETED` carrying an `error`
/// is an error.
pub async fn wait_end(events: &mut EventStream, job: &str, timeout: Duration) -> Result<JobEnd> {
    let fut = async {
        loop {
            let ev = events.next().await?;
            if event_job(&ev.data) != Some(job) {
                continue;
            }
            match ev.name.as_str() {
                "BLOCK_JOB_COMPLETED" => {
                    if let Some(err) = ev.data["error"].as_str() {
                        return Err(Error::new(ErrorKind::Job(err.to_string()), job_ctx(job)));
                    }
                    return Ok(JobEnd::Completed);
                }
                "BLOCK_JOB_CANCELLED" => return Ok(JobEnd::Cancelled),
                _ => {}
            }
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => {
            r.map_err(|e| Error::new(e.kind, format!("{}: waiting for its end", job_ctx(job))))
        }
        Err(_) => Err(Error::new(
            ErrorKind::Timeout(timeout),
            format!("{}: waiting for its end", job_ctx(job)),
        )),
    }
}

/// `block-job-complete`: pivots a ready mirror or active commit.
pub async fn complete(qmp: &QmpClient, job: &str) -> Result<()> {
    qmp.execute("block-job-complete", json!({"device": job}))
        .await
        .map(drop)
}

/// `block-job-cancel` (with `force`, a ready mirror is abandoned without
/// pivoting and ends as cancelled).
pub async fn cancel(qmp: &QmpClient, job: &str, force: bool) -> Result<()> {
    qmp.execute("block-job-cancel", json!({"device": job, "force": force}))
        .await
        .map(drop)
}

/// Polls job `job` every `interval` and sends its progress, clamped so it
/// never goes backwards. The stream ends when the job is gone (the last
/// item then has fraction 1 if the job was ready) or QEMU went away.
pub fn progress_stream(
    qmp: &QmpClient,
    job: &str,
    interval: Duration,
) -> mpsc::Receiver<JobProgress> {
    let (tx, rx) = mpsc::channel(64);
    let qmp = qmp.clone();
    let job = job.to_string();
    tokio::spawn(async move {
        let mut p = MonotonicProgress::new();
        let mut seen = false;
        loop {
            let jobs = match query_block_jobs(&qmp).await {
                Ok(j) => j,
                Err(_) => return,
            };
            match jobs.into_iter().find(|j| j.id == job) {
                Some(j) => {
                    seen = true;
                    let fraction = p.update(j.offset, j.len);
                    let item = JobProgress {
                        offset: j.offset,
                        len: j.len,
                        fraction,
                        ready: j.ready,
                    };
                    if tx.send(item).await.is_err() {
                        return;
                    }
                }
                None => {
                    if seen {
                        return;
                    }
                }
            }
            tokio::time::sleep(interval).await;
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_never_goes_backwards_when_len_grows() {
        let mut p = MonotonicProgress::new();
        assert_eq!(p.update(0, 0), 0.0);
        assert_eq!(p.update(50, 100), 0.5);
        // The guest wrote: len grew faster than offset.
        assert_eq!(p.update(60, 200), 0.5);
        assert_eq!(p.update(150, 200), 0.75);
        assert_eq!(p.update(500, 200), 1.0);
        assert_eq!(p.update(10, 200), 1.0);
    }
}
