//! Operations: list, show (progress tree, steps, log), watch as a
//! server-sent event stream, cancel.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use ferry_api::{LogLine, Operation, StepInfo};
use ferry_ops::OpRecord;
use futures::Stream;
use serde::Deserialize;

use super::{ApiResult, Failure, bad_field};
use crate::daemon::Daemon;

fn operation(d: &Daemon, r: OpRecord, detail: bool) -> Operation {
    let progress = d.ops.progress(&r.id).ok().flatten();
    let (steps, log) = if detail {
        let steps = d.ops.journal().steps(&r.id).unwrap_or_default();
        let log = d.ops.journal().logs(&r.id).unwrap_or_default();
        (
            steps
                .into_iter()
                .map(|s| StepInfo {
                    name: s.name,
                    state: format!("{:?}", s.state).to_lowercase(),
                    error: s.error,
                    started_ms: s.started_ms,
                    finished_ms: s.finished_ms,
                })
                .collect(),
            log.into_iter()
                .map(|l| LogLine {
                    ts_ms: l.ts_ms,
                    level: l.level,
                    msg: l.msg,
                })
                .collect(),
        )
    } else {
        (Vec::new(), Vec::new())
    };
    Operation {
        id: r.id,
        kind: r.kind,
        state: r.state,
        error: r.error,
        params: r.params,
        created_ms: r.created_ms,
        updated_ms: r.updated_ms,
        progress,
        steps,
        log,
    }
}

pub async fn list(State(d): State<Arc<Daemon>>) -> ApiResult<Vec<Operation>> {
    let ops = d.ops.journal().list()?;
    Ok(Json(
        ops.into_iter().map(|r| operation(&d, r, false)).collect(),
    ))
}

/// Longest `wait_s` of [`show`].
const MAX_WAIT_S: u64 = 300;

#[derive(Debug, Deserialize)]
pub struct ShowParams {
    /// Seconds to wait for the operation to finish before answering (a
    /// long poll: no need to ask again and again). Answers at once when it
    /// is finished or does not run on this host.
    pub wait_s: Option<u64>,
}

pub async fn show(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
    Query(q): Query<ShowParams>,
) -> ApiResult<Operation> {
    let wait = q.wait_s.unwrap_or(0);
    if wait > MAX_WAIT_S {
        return Err(bad_field(
            "wait_s",
            &format!("wait_s is within 0..={MAX_WAIT_S}"),
        ));
    }
    let mut r = d.ops.journal().get(&id)?;
    if wait > 0 && !r.state.is_finished() {
        // Answers with what is known when the time is up, finished or not.
        if let Ok(done) = tokio::time::timeout(Duration::from_secs(wait), d.ops.wait(&id)).await {
            r = done?;
        } else {
            r = d.ops.journal().get(&id)?;
        }
    }
    Ok(Json(operation(&d, r, true)))
}

pub async fn cancel(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
) -> Result<StatusCode, Failure> {
    d.ops.cancel(&id)?;
    Ok(StatusCode::ACCEPTED)
}

/// `progress` events carry the operation (with its progress tree) each
/// time the tree changes (at most every 100 ms); the stream ends with one
/// `end` event once the operation is finished.
pub async fn events(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, Failure> {
    d.ops.journal().get(&id)?;
    let rx = d.ops.subscribe(&id);
    let stream = futures::stream::unfold((d, id, rx, false), |(d, id, mut rx, ended)| async move {
        if ended {
            return None;
        }
        if let Some(r) = rx.as_mut() {
            let changed = r.changed().await.is_ok();
            if changed {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if let Ok(rec) = d.ops.journal().get(&id)
                    && !rec.state.is_finished()
                {
                    let op = operation(&d, rec, false);
                    let ev = Event::default().event("progress").json_data(op).ok()?;
                    return Some((Ok(ev), (d, id, rx, false)));
                }
            }
        }
        // Finished (or not running here): one final event with details.
        // The runner may still be writing its last journal lines.
        let mut rec = d.ops.journal().get(&id).ok()?;
        for _ in 0..50 {
            if rec.state.is_finished() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            rec = d.ops.journal().get(&id).ok()?;
        }
        let op = operation(&d, rec, true);
        let ev = Event::default().event("end").json_data(op).ok()?;
        Some((Ok(ev), (d, id, None, true)))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
