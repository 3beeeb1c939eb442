//! The durable journal: one SQLite database per host.
//!
//! Tables (format version [`FORMAT_VERSION`], kept in `PRAGMA user_version`):
//! - `operations(id, kind, params, state, error, created_ms, updated_ms, progress)`
//! - `steps(op_id, idx, name, state, intent, result, error, started_ms, finished_ms)`
//! - `log(seq, op_id, ts_ms, level, msg)`
//!
//! Every write is its own transaction with `synchronous=FULL` in WAL mode:
//! when a call returns, the fact is on disk. Writes that go together (a
//! step's intent and its "started" line; its result, "done" line and the
//! progress; an operation's end) have combined calls, one transaction and
//! one sync each: each sync costs milliseconds, which a short step felt. The runner writes a step's
//! *intent* (what it will do, with what it needs to undo it) before the step
//! touches the world, so after a `kill -9` the journal always says which
//! step may have acted.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{OpsError, Result};

/// Version of the journal's schema.
pub const FORMAT_VERSION: i64 = 1;

/// An operation's state. `Running`, `Cancelling` and `Compensating` are
/// unfinished: after a restart, recovery picks them up.
pub use ferry_api::OpState;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    /// The intent is journaled; the step may have acted, fully or partly.
    Started,
    Done,
    Failed,
    Undone,
    UndoFailed,
}

impl StepState {
    fn as_str(self) -> &'static str {
        match self {
            StepState::Started => "started",
            StepState::Done => "done",
            StepState::Failed => "failed",
            StepState::Undone => "undone",
            StepState::UndoFailed => "undo_failed",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "started" => StepState::Started,
            "done" => StepState::Done,
            "failed" => StepState::Failed,
            "undone" => StepState::Undone,
            "undo_failed" => StepState::UndoFailed,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OpRecord {
    pub id: String,
    pub kind: String,
    pub params: Value,
    pub state: OpState,
    pub error: Option<String>,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// The last saved progress view (JSON), if any.
    pub progress: Option<Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepRecord {
    pub idx: usize,
    pub name: String,
    pub state: StepState,
    pub intent: Value,
    pub result: Option<Value>,
    pub error: Option<String>,
    pub started_ms: u64,
    pub finished_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LogLine {
    pub ts_ms: u64,
    pub level: String,
    pub msg: String,
}

/// A step's end, for the journal: its index, result, the lines it logs
/// as it ends and the operation's progress with it done.
#[derive(Debug, Clone, Copy)]
pub struct StepDone<'a> {
    pub idx: usize,
    pub result: &'a Value,
    pub msgs: &'a [String],
    pub progress: &'a Value,
}

/// The journal. Cheap to share behind an `Arc`; calls serialise on one
/// connection (each is a short transaction).
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    conn: Mutex<Connection>,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Journal {
    /// Opens (creating if absent) the journal at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Journal> {
        let path = path.as_ref().to_path_buf();
        let err = |source| OpsError::Journal {
            path: path.display().to_string(),
            source,
        };
        let conn = Connection::open(&path).map_err(err)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;",
        )
        .map_err(err)?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(err)?;
        match version {
            0 => {
                conn.execute_batch(
                    "BEGIN;
                     CREATE TABLE operations(
                        id TEXT PRIMARY KEY, kind TEXT NOT NULL, params TEXT NOT NULL,
                        state TEXT NOT NULL, error TEXT,
                        created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL,
                        progress TEXT);
                     CREATE TABLE steps(
                        op_id TEXT NOT NULL REFERENCES operations(id) ON DELETE CASCADE,
                        idx INTEGER NOT NULL, name TEXT NOT NULL, state TEXT NOT NULL,
                        intent TEXT NOT NULL, result TEXT, error TEXT,
                        started_ms INTEGER NOT NULL, finished_ms INTEGER,
                        PRIMARY KEY(op_id, idx));
                     CREATE TABLE log(
                        seq INTEGER PRIMARY KEY AUTOINCREMENT,
                        op_id TEXT NOT NULL REFERENCES operations(id) ON DELETE CASCADE,
                        ts_ms INTEGER NOT NULL, level TEXT NOT NULL, msg TEXT NOT NULL);
                     CREATE INDEX log_op ON log(op_id, seq);
                     PRAGMA user_version = 1;
                     COMMIT;",
                )
                .map_err(err)?;
            }
            FORMAT_VERSION => {}
            found => {
                return Err(OpsError::JournalVersion {
                    path: path.display().to_string(),
                    found,
                    expected: FORMAT_VERSION,
                });
            }
        }
        Ok(Journal {
            path,
            conn: Mutex::new(conn),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&conn).map_err(|source| OpsError::Journal {
            path: self.path.display().to_string(),
            source,
        })
    }

    /// Runs `f` in one transaction: its writes are durable together, for
    /// one sync of the journal instead of one each.
    fn in_tx<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            let v = f(&tx)?;
            tx.commit()?;
            Ok(v)
        })
    }

    pub fn create(&self, id: &str, kind: &str, params: &Value) -> Result<()> {
        self.with(|c| sql::create(c, id, kind, params))
    }

    /// [`Journal::create`] and a first log line, durable together.
    pub fn create_logged(&self, id: &str, kind: &str, params: &Value, msg: &str) -> Result<()> {
        self.in_tx(|c| {
            sql::create(c, id, kind, params)?;
            sql::log(c, id, "info", msg)
        })
    }

    pub fn set_state(&self, id: &str, state: OpState, error: Option<&str>) -> Result<()> {
        self.with(|c| sql::set_state(c, id, state, error))
    }

    /// Ends an operation: its state, a log line and its last progress,
    /// durable together.
    pub fn end(
        &self,
        id: &str,
        state: OpState,
        error: Option<&str>,
        msg: &str,
        progress: &Value,
    ) -> Result<()> {
        self.in_tx(|c| {
            sql::log(c, id, "info", msg)?;
            sql::set_state(c, id, state, error)?;
            sql::save_progress(c, id, progress)
        })
    }

    pub fn save_progress(&self, id: &str, progress: &Value) -> Result<()> {
        self.with(|c| sql::save_progress(c, id, progress))
    }

    /// Records that step `idx` is about to act, with what it needs to be
    /// resumed or undone. Durable when this returns.
    pub fn step_started(&self, id: &str, idx: usize, name: &str, intent: &Value) -> Result<()> {
        self.with(|c| sql::step_started(c, id, idx, name, intent))
    }

    /// [`Journal::step_started`] and a log line, durable together (one
    /// sync of the journal: a short step costs a few milliseconds less).
    pub fn step_started_logged(
        &self,
        id: &str,
        idx: usize,
        name: &str,
        intent: &Value,
        msg: &str,
    ) -> Result<()> {
        self.in_tx(|c| {
            sql::step_started(c, id, idx, name, intent)?;
            sql::log(c, id, "info", msg)
        })
    }

    /// Moves step `idx` to `state`, with its result or error.
    pub fn step_finished(
        &self,
        id: &str,
        idx: usize,
        state: StepState,
        result: Option<&Value>,
        error: Option<&str>,
    ) -> Result<()> {
        self.with(|c| sql::step_finished(c, id, idx, state, result, error))
    }

    /// A step is done: its result, log lines and the operation's
    /// progress, durable together.
    pub fn step_done_logged(&self, id: &str, done: &StepDone<'_>) -> Result<()> {
        self.in_tx(|c| sql::step_done(c, id, done))
    }

    /// A step done ([`Journal::step_done_logged`]) and the next one
    /// started ([`Journal::step_started_logged`]), durable together: one
    /// sync of the journal between two steps instead of two.
    pub fn step_done_then_started(
        &self,
        id: &str,
        done: &StepDone<'_>,
        idx: usize,
        name: &str,
        intent: &Value,
        msg: &str,
    ) -> Result<()> {
        self.in_tx(|c| {
            sql::step_done(c, id, done)?;
            sql::step_started(c, id, idx, name, intent)?;
            sql::log(c, id, "info", msg)
        })
    }

    /// The last step done ([`Journal::step_done_logged`]) and the
    /// operation ended ([`Journal::end`]), durable together.
    pub fn step_done_then_end(
        &self,
        id: &str,
        done: &StepDone<'_>,
        state: OpState,
        msg: &str,
        progress: &Value,
    ) -> Result<()> {
        self.in_tx(|c| {
            sql::step_done(c, id, done)?;
            sql::log(c, id, "info", msg)?;
            sql::set_state(c, id, state, None)?;
            sql::save_progress(c, id, progress)
        })
    }

    pub fn log(&self, id: &str, level: &str, msg: &str) -> Result<()> {
        self.with(|c| sql::log(c, id, level, msg))
    }

    /// Several log lines, durable together (one sync of the journal).
    pub fn log_all(&self, id: &str, level: &str, msgs: &[String]) -> Result<()> {
        self.in_tx(|c| msgs.iter().try_for_each(|m| sql::log(c, id, level, m)))
    }

    pub fn get(&self, id: &str) -> Result<OpRecord> {
        let row = self.with(|c| {
            c.query_row(
                "SELECT id, kind, params, state, error, created_ms, updated_ms, progress
                 FROM operations WHERE id = ?1",
                params![id],
                raw_op,
            )
            .optional()
        })?;
        match row {
            Some(r) => op_from_raw(r),
            None => Err(OpsError::NotFound(id.to_string())),
        }
    }

    /// All operations, newest first.
    pub fn list(&self) -> Result<Vec<OpRecord>> {
        self.query_ops("ORDER BY created_ms DESC, id")
    }

    /// Operations a crash or restart left unfinished, oldest first.
    pub fn unfinished(&self) -> Result<Vec<OpRecord>> {
        self.query_ops(
            "WHERE state IN ('running', 'cancelling', 'compensating') ORDER BY created_ms, id",
        )
    }

    fn query_ops(&self, tail: &str) -> Result<Vec<OpRecord>> {
        let sql = format!(
            "SELECT id, kind, params, state, error, created_ms, updated_ms, progress
             FROM operations {tail}"
        );
        let rows = self.with(|c| {
            let mut st = c.prepare(&sql)?;
            st.query_map([], raw_op)?
                .collect::<rusqlite::Result<Vec<_>>>()
        })?;
        rows.into_iter().map(op_from_raw).collect()
    }

    pub fn steps(&self, id: &str) -> Result<Vec<StepRecord>> {
        let rows = self.with(|c| {
            let mut st = c.prepare(
                "SELECT idx, name, state, intent, result, error, started_ms, finished_ms
                 FROM steps WHERE op_id = ?1 ORDER BY idx",
            )?;
            st.query_map(params![id], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, Option<String>>(5)?,
                    r.get::<_, i64>(6)?,
                    r.get::<_, Option<i64>>(7)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
        })?;
        let corrupt = |m: String| OpsError::Corrupt {
            id: id.to_string(),
            message: m,
        };
        rows.into_iter()
            .map(|(idx, name, state, intent, result, error, s, f)| {
                Ok(StepRecord {
                    idx: idx as usize,
                    state: StepState::parse(&state)
                        .ok_or_else(|| corrupt(format!("step {name}: state {state}")))?,
                    intent: serde_json::from_str(&intent)
                        .map_err(|e| corrupt(format!("step {name}: intent: {e}")))?,
                    result: result
                        .map(|r| serde_json::from_str(&r))
                        .transpose()
                        .map_err(|e| corrupt(format!("step {name}: result: {e}")))?,
                    name,
                    error,
                    started_ms: s as u64,
                    finished_ms: f.map(|f| f as u64),
                })
            })
            .collect()
    }

    pub fn logs(&self, id: &str) -> Result<Vec<LogLine>> {
        self.with(|c| {
            let mut st =
                c.prepare("SELECT ts_ms, level, msg FROM log WHERE op_id = ?1 ORDER BY seq")?;
            st.query_map(params![id], |r| {
                Ok(LogLine {
                    ts_ms: r.get::<_, i64>(0)? as u64,
                    level: r.get(1)?,
                    msg: r.get(2)?,
                })
            })?
            .collect()
        })
    }
}

type RawOp = (
    String,
    String,
    String,
    String,
    Option<String>,
    i64,
    i64,
    Option<String>,
);

fn raw_op(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawOp> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
    ))
}

fn op_from_raw(r: RawOp) -> Result<OpRecord> {
    let (id, kind, params, state, error, created, updated, progress) = r;
    let corrupt = |m: String| OpsError::Corrupt {
        id: id.clone(),
        message: m,
    };
    Ok(OpRecord {
        params: serde_json::from_str(&params).map_err(|e| corrupt(format!("params: {e}")))?,
        state: OpState::parse(&state).ok_or_else(|| corrupt(format!("state {state}")))?,
        progress: progress
            .map(|p| serde_json::from_str(&p))
            .transpose()
            .map_err(|e| corrupt(format!("progress: {e}")))?,
        id,
        kind,
        error,
        created_ms: created as u64,
        updated_ms: updated as u64,
    })
}

/// The journal's writes, each on a connection or inside a transaction.
mod sql {
    use rusqlite::{Connection, Result, params};
    use serde_json::Value;

    use super::{OpState, StepState, now_ms};

    pub(super) fn create(c: &Connection, id: &str, kind: &str, params: &Value) -> Result<()> {
        let now = now_ms() as i64;
        c.execute(
            "INSERT INTO operations(id, kind, params, state, created_ms, updated_ms)
             VALUES (?1, ?2, ?3, 'running', ?4, ?4)",
            params![id, kind, params.to_string(), now],
        )
        .map(drop)
    }

    pub(super) fn set_state(
        c: &Connection,
        id: &str,
        state: OpState,
        error: Option<&str>,
    ) -> Result<()> {
        let now = now_ms() as i64;
        c.execute(
            "UPDATE operations SET state = ?2, error = COALESCE(?3, error), updated_ms = ?4
             WHERE id = ?1",
            params![id, state.as_str(), error, now],
        )
        .map(drop)
    }

    pub(super) fn save_progress(c: &Connection, id: &str, progress: &Value) -> Result<()> {
        c.execute(
            "UPDATE operations SET progress = ?2 WHERE id = ?1",
            params![id, progress.to_string()],
        )
        .map(drop)
    }

    pub(super) fn step_started(
        c: &Connection,
        id: &str,
        idx: usize,
        name: &str,
        intent: &Value,
    ) -> Result<()> {
        let now = now_ms() as i64;
        c.execute(
            "INSERT INTO steps(op_id, idx, name, state, intent, started_ms)
             VALUES (?1, ?2, ?3, 'started', ?4, ?5)
             ON CONFLICT(op_id, idx) DO UPDATE SET
                state = 'started', intent = ?4, result = NULL, error = NULL,
                started_ms = ?5, finished_ms = NULL",
            params![id, idx as i64, name, intent.to_string(), now],
        )
        .map(drop)
    }

    pub(super) fn step_finished(
        c: &Connection,
        id: &str,
        idx: usize,
        state: StepState,
        result: Option<&Value>,
        error: Option<&str>,
    ) -> Result<()> {
        let now = now_ms() as i64;
        let result = result.map(|r| r.to_string());
        c.execute(
            "UPDATE steps SET state = ?3, result = COALESCE(?4, result), error = ?5,
                finished_ms = ?6
             WHERE op_id = ?1 AND idx = ?2",
            params![id, idx as i64, state.as_str(), result, error, now],
        )
        .map(drop)
    }

    /// A step's end as [`super::Journal::step_done_logged`] writes it.
    pub(super) fn step_done(c: &Connection, id: &str, d: &super::StepDone<'_>) -> Result<()> {
        step_finished(c, id, d.idx, StepState::Done, Some(d.result), None)?;
        d.msgs.iter().try_for_each(|m| log(c, id, "info", m))?;
        save_progress(c, id, d.progress)
    }

    pub(super) fn log(c: &Connection, id: &str, level: &str, msg: &str) -> Result<()> {
        let now = now_ms() as i64;
        c.execute(
            "INSERT INTO log(op_id, ts_ms, level, msg) VALUES (?1, ?2, ?3, ?4)",
            params![id, now, level, msg],
        )
        .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.db");
        {
            let j = Journal::open(&path).unwrap();
            j.create("op1", "demo", &json!({"vm": "web-1"})).unwrap();
            j.step_started("op1", 0, "freeze", &json!({"vm": "web-1"}))
                .unwrap();
            j.log("op1", "info", "freezing web-1").unwrap();
        }
        let j = Journal::open(&path).unwrap();
        let op = j.get("op1").unwrap();
        assert_eq!(op.state, OpState::Running);
        assert_eq!(op.params["vm"], "web-1");
        let steps = j.steps("op1").unwrap();
        assert_eq!(steps.len(), 1);
        assert_eq!(steps[0].state, StepState::Started);
        assert_eq!(j.unfinished().unwrap().len(), 1);
        j.step_finished("op1", 0, StepState::Done, Some(&json!(1)), None)
            .unwrap();
        j.set_state("op1", OpState::Succeeded, None).unwrap();
        assert!(j.unfinished().unwrap().is_empty());
        assert_eq!(j.steps("op1").unwrap()[0].result, Some(json!(1)));
        assert_eq!(j.logs("op1").unwrap()[0].msg, "freezing web-1");
    }

    /// The log lines of operation `id`, in order.
    fn messages(j: &Journal, id: &str) -> Vec<String> {
        j.logs(id).unwrap().into_iter().map(|l| l.msg).collect()
    }

    #[test]
    fn combined_writes_land_together() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.db");
        {
            let j = Journal::open(&path).unwrap();
            j.create_logged("op1", "demo", &json!({}), "demo started")
                .unwrap();
            j.step_started_logged("op1", 0, "freeze", &json!({"vm": 1}), "step freeze started")
                .unwrap();
            let said = ["froze 1 guest".to_string(), "step freeze done".to_string()];
            let done = StepDone {
                idx: 0,
                result: &json!("frozen"),
                msgs: &said,
                progress: &json!({"overall": 0.5}),
            };
            j.step_done_logged("op1", &done).unwrap();
        }
        let j = Journal::open(&path).unwrap();
        let steps = j.steps("op1").unwrap();
        assert_eq!(steps[0].state, StepState::Done);
        assert_eq!(steps[0].intent, json!({"vm": 1}));
        assert_eq!(steps[0].result, Some(json!("frozen")));
        assert_eq!(
            j.get("op1").unwrap().progress,
            Some(json!({"overall": 0.5}))
        );
        j.end(
            "op1",
            OpState::Succeeded,
            None,
            "succeeded",
            &json!({"overall": 1.0}),
        )
        .unwrap();
        let op = j.get("op1").unwrap();
        assert_eq!(op.state, OpState::Succeeded);
        assert_eq!(op.progress, Some(json!({"overall": 1.0})));
        let msgs = messages(&j, "op1");
        assert_eq!(
            msgs,
            [
                "demo started",
                "step freeze started",
                "froze 1 guest",
                "step freeze done",
                "succeeded"
            ]
        );
    }

    #[test]
    fn a_step_end_lands_with_the_next_start_or_the_operations_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.db");
        let lines = |v: &[&str]| v.iter().map(|l| l.to_string()).collect::<Vec<_>>();
        {
            let j = Journal::open(&path).unwrap();
            j.create_logged("op1", "demo", &json!({}), "demo started")
                .unwrap();
            j.step_started_logged("op1", 0, "look", &json!({}), "step look started")
                .unwrap();
            let said = lines(&["looked", "step look done"]);
            let done = StepDone {
                idx: 0,
                result: &json!({"seen": 2}),
                msgs: &said,
                progress: &json!({"overall": 0.4}),
            };
            j.step_done_then_started("op1", &done, 1, "act", &json!({"n": 2}), "step act started")
                .unwrap();
        }
        let j = Journal::open(&path).unwrap();
        let steps = j.steps("op1").unwrap();
        assert_eq!(steps[0].state, StepState::Done);
        assert_eq!(steps[0].result, Some(json!({"seen": 2})));
        assert_eq!(steps[1].state, StepState::Started);
        assert_eq!(steps[1].intent, json!({"n": 2}));
        assert_eq!(
            j.get("op1").unwrap().progress,
            Some(json!({"overall": 0.4}))
        );
        let said = lines(&["step act done"]);
        let done = StepDone {
            idx: 1,
            result: &json!("acted"),
            msgs: &said,
            progress: &json!({"overall": 0.9}),
        };
        j.step_done_then_end(
            "op1",
            &done,
            OpState::Succeeded,
            "succeeded",
            &json!({"overall": 1.0}),
        )
        .unwrap();
        drop(j);
        let j = Journal::open(&path).unwrap();
        let steps = j.steps("op1").unwrap();
        assert_eq!(steps[1].state, StepState::Done);
        assert_eq!(steps[1].result, Some(json!("acted")));
        let op = j.get("op1").unwrap();
        assert_eq!(op.state, OpState::Succeeded);
        assert_eq!(op.progress, Some(json!({"overall": 1.0})));
        let msgs = messages(&j, "op1");
        assert_eq!(
            msgs,
            [
                "demo started",
                "step look started",
                "looked",
                "step look done",
                "step act started",
                "step act done",
                "succeeded"
            ]
        );
    }

    #[test]
    fn unknown_operation_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path().join("j.db")).unwrap();
        assert!(matches!(j.get("nope"), Err(OpsError::NotFound(_))));
    }

    #[test]
    fn newer_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        drop(Journal::open(&path).unwrap());
        Connection::open(&path)
            .unwrap()
            .execute_batch("PRAGMA user_version = 99")
            .unwrap();
        let e = Journal::open(&path).unwrap_err();
        assert!(e.to_string().contains("format version 99"), "{e}");
    }
}
