//! The runner: starts operations, drives their steps through the journal,
//! cancels them, and after a restart rolls each unfinished one forward or
//! compensates it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::{OpsError, Result, StepError};
use crate::journal::{Journal, OpRecord, OpState, StepDone, StepRecord, StepState};
use crate::progress::ProgressView;
use crate::step::{Plan, ProgressHandle, Recovery, StepContext};

/// Builds an operation's plan from its parameters; registered per kind so
/// that recovery can rebuild the plan of a journaled operation.
pub type PlanBuilder<C> = Arc<dyn Fn(&Value) -> std::result::Result<Plan<C>, String> + Send + Sync>;

struct Live {
    progress: ProgressHandle,
    cancel: CancellationToken,
    finished: watch::Receiver<bool>,
}

/// Runs the operations of one host.
pub struct Manager<C> {
    journal: Arc<Journal>,
    app: Arc<C>,
    kinds: RwLock<HashMap<String, PlanBuilder<C>>>,
    live: Mutex<HashMap<String, Live>>,
}

/// What every step of one execution shares.
struct Run<'a, C> {
    id: &'a str,
    kind: &'a str,
    params: &'a Value,
    plan: &'a Plan<C>,
    progress: &'a ProgressHandle,
    cancel: &'a CancellationToken,
}

/// Where execution starts.
enum Start {
    /// Run steps from this index, with the results of the steps before it.
    At(usize, HashMap<String, Value>),
    /// Undo every journaled step that acted; end in `end` with `reason`.
    Compensate { end: OpState, reason: String },
}

impl<C: Send + Sync + 'static> Manager<C> {
    pub fn new(journal: Arc<Journal>, app: Arc<C>) -> Arc<Self> {
        Arc::new(Manager {
            journal,
            app,
            kinds: RwLock::new(HashMap::new()),
            live: Mutex::new(HashMap::new()),
        })
    }

    pub fn journal(&self) -> &Arc<Journal> {
        &self.journal
    }

    pub fn app(&self) -> &Arc<C> {
        &self.app
    }

    /// Registers how to build the plan of operations of `kind`.
    pub fn register(
        &self,
        kind: &str,
        builder: impl Fn(&Value) -> std::result::Result<Plan<C>, String> + Send + Sync + 'static,
    ) {
        self.kinds
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(kind.to_string(), Arc::new(builder));
    }

    fn plan(&self, id: &str, kind: &str, params: &Value) -> Result<Plan<C>> {
        let builder = self
            .kinds
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(kind)
            .cloned()
            .ok_or_else(|| OpsError::UnknownKind {
                id: id.to_string(),
                kind: kind.to_string(),
            })?;
        builder(params).map_err(|message| OpsError::Plan {
            id: id.to_string(),
            message,
        })
    }

    /// Journals a new operation and starts it in the background; returns
    /// its id. A plan that cannot be built is refused before anything is
    /// journaled.
    pub fn start(self: &Arc<Self>, kind: &str, params: Value) -> Result<String> {
        let id = uuid::Uuid::new_v4().to_string();
        let plan = self.plan(&id, kind, &params)?;
        self.journal
            .create_logged(&id, kind, &params, &format!("{kind} started"))?;
        self.spawn(
            id.clone(),
            kind.to_string(),
            params,
            plan,
            Start::At(0, HashMap::new()),
        );
        Ok(id)
    }

    fn spawn(
        self: &Arc<Self>,
        id: String,
        kind: String,
        params: Value,
        plan: Plan<C>,
        start: Start,
    ) {
        let progress = ProgressHandle::new(plan.progress.clone());
        let cancel = CancellationToken::new();
        let (done_tx, done_rx) = watch::channel(false);
        self.live.lock().unwrap_or_else(|p| p.into_inner()).insert(
            id.clone(),
            Live {
                progress: progress.clone(),
                cancel: cancel.clone(),
                finished: done_rx,
            },
        );
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let run = Run {
                id: &id,
                kind: &kind,
                params: &params,
                plan: &plan,
                progress: &progress,
                cancel: &cancel,
            };
            let end = me.execute(&run, start).await;
            if end != OpState::Succeeded {
                // (A success saved it with its state.)
                let _ = me.journal.save_progress(&id, &view_json(&progress.view()));
            }
            tracing::info!(op = %id, state = %end, "operation finished");
            me.live
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            let _ = done_tx.send(true);
        });
    }

    /// Waits until the operation is finished and returns its record.
    pub async fn wait(&self, id: &str) -> Result<OpRecord> {
        let rx = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(|l| l.finished.clone());
        if let Some(mut rx) = rx {
            let _ = rx.wait_for(|done| *done).await;
        }
        self.journal.get(id)
    }

    /// Asks a running operation to stop; it compensates and ends `cancelled`.
    pub fn cancel(&self, id: &str) -> Result<()> {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        match live.get(id) {
            Some(l) => {
                self.journal.set_state(id, OpState::Cancelling, None)?;
                self.journal.log(id, "info", "cancel requested")?;
                l.cancel.cancel();
                Ok(())
            }
            None => {
                let op = self.journal.get(id)?;
                Err(OpsError::Finished {
                    id: id.to_string(),
                    state: op.state.to_string(),
                })
            }
        }
    }

    /// The progress of an operation: live if it runs, else as last saved.
    pub fn progress(&self, id: &str) -> Result<Option<ProgressView>> {
        if let Some(l) = self.live.lock().unwrap_or_else(|p| p.into_inner()).get(id) {
            return Ok(Some(l.progress.view()));
        }
        Ok(self
            .journal
            .get(id)?
            .progress
            .and_then(|p| serde_json::from_value(p).ok()))
    }

    /// A stream of progress views of a running operation.
    pub fn subscribe(&self, id: &str) -> Option<watch::Receiver<ProgressView>> {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(|l| l.progress.subscribe())
    }

    /// Picks up every operation a crash or restart left unfinished: rolls
    /// it forward or compensates it (the log says which). Returns their ids.
    pub fn recover(self: &Arc<Self>) -> Result<Vec<String>> {
        let mut ids = Vec::new();
        for op in self.journal.unfinished()? {
            let plan = match self.plan(&op.id, &op.kind, &op.params) {
                Ok(p) => p,
                Err(e) => {
                    let msg = format!(
                        "cannot recover after restart: {e}; its steps were left as journaled"
                    );
                    self.journal.log(&op.id, "error", &msg)?;
                    self.journal
                        .set_state(&op.id, OpState::Failed, Some(&msg))?;
                    continue;
                }
            };
            let steps = self.journal.steps(&op.id)?;
            let start = decide(&op, &plan, &steps);
            let msg = match &start {
                Start::At(i, _) if *i < plan.steps.len() => format!(
                    "recovered after restart: rolling forward from step {}",
                    plan.steps[*i].name()
                ),
                Start::At(..) => "recovered after restart: rolling forward to completion".into(),
                Start::Compensate { reason, .. } => {
                    format!("recovered after restart: compensating ({reason})")
                }
            };
            self.journal.log(&op.id, "info", &msg)?;
            let mut plan = plan;
            for s in &steps {
                if s.state == StepState::Done
                    && let Some(node) = plan.nodes.get(s.idx)
                {
                    plan.progress.finish(*node);
                }
            }
            ids.push(op.id.clone());
            self.spawn(op.id, op.kind, op.params, plan, start);
        }
        Ok(ids)
    }

    fn context(
        &self,
        run: &Run<'_, C>,
        idx: usize,
        results: &HashMap<String, Value>,
    ) -> StepContext<C> {
        StepContext {
            op_id: run.id.to_string(),
            params: run.params.clone(),
            app: Arc::clone(&self.app),
            node: run.plan.nodes.get(idx).copied().unwrap_or(0),
            progress: run.progress.clone(),
            journal: Arc::clone(&self.journal),
            cancel: run.cancel.clone(),
            results: results.clone(),
            when_done: Default::default(),
        }
    }

    async fn execute(&self, run: &Run<'_, C>, start: Start) -> OpState {
        let (id, plan, progress) = (run.id, run.plan, run.progress);
        let (from, mut results) = match start {
            Start::At(i, r) => (i, r),
            Start::Compensate { end, reason } => {
                return self.compensate(run, end, &reason).await;
            }
        };
        // The end of a step that a crash has run again
        // ([`Recovery::Retry`]) waits to be journaled with the next step's
        // start (or the operation's end): one sync of the journal between
        // the two instead of two. Until then a crash finds the step
        // started, not done, as a crash just before its end would, and
        // runs it again. Another step's end is journaled at once (a crash
        // after it rolls forward), as is a waiting end before anything
        // else is journaled (compensation, a failure).
        let mut ended: Option<Ended> = None;
        // Writes a step's end still waiting; on failure, the reason to
        // compensate.
        let write_ended = |ended: &mut Option<Ended>| -> std::result::Result<(), String> {
            let Some(e) = ended.take() else {
                return Ok(());
            };
            self.journal
                .step_done_logged(id, &e.record())
                .map_err(|err| format!("step {} done but not journaled: {err}", e.name))?;
            tracing::info!(op = %id, "step {} done", e.name);
            Ok(())
        };
        for idx in from..plan.steps.len() {
            let step = &plan.steps[idx];
            let name = step.name().to_string();
            if run.cancel.is_cancelled() {
                if let Err(reason) = write_ended(&mut ended) {
                    return self.compensate(run, OpState::Failed, &reason).await;
                }
                return self.compensate(run, OpState::Cancelled, "cancelled").await;
            }
            let cx = self.context(run, idx, &results);
            let intent = match step.intent(&cx) {
                Ok(v) => v,
                Err(e) => {
                    let reason = match write_ended(&mut ended) {
                        Ok(()) => format!("step {name} failed before acting: {e}"),
                        Err(reason) => reason,
                    };
                    return self.compensate(run, OpState::Failed, &reason).await;
                }
            };
            // The intent and the log line in one journal write, with the
            // end of the step before if it waits.
            let msg = format!("step {name} started");
            let wrote = match &ended {
                None => self
                    .journal
                    .step_started_logged(id, idx, &name, &intent, &msg)
                    .map_err(|e| format!("step {name} not started: {e}")),
                Some(e) => self
                    .journal
                    .step_done_then_started(id, &e.record(), idx, &name, &intent, &msg)
                    .map_err(|err| format!("step {} done but not journaled: {err}", e.name)),
            };
            if let Err(reason) = wrote {
                return self.compensate(run, OpState::Failed, &reason).await;
            }
            if let Some(e) = ended.take() {
                tracing::info!(op = %id, "step {} done", e.name);
            }
            tracing::info!(op = %id, "{msg}");
            progress.update(|t| t.start(cx.node));
            crate::fault::test_pause(&format!("{}:started:{idx}", run.kind)).await;
            match step.run(&cx).await {
                Ok(result) => {
                    // The result, the log line and the progress with this
                    // step done, journaled together with what comes next.
                    progress.update(|t| t.finish(cx.node));
                    let mut lines = cx.take_when_done();
                    lines.push(format!("step {name} done"));
                    ended = Some(Ended {
                        idx,
                        name: name.clone(),
                        result: result.clone(),
                        lines,
                        view: view_json(&progress.view()),
                    });
                    results.insert(name, result);
                    // Test-only: at this pause point the end is journaled.
                    let point = format!("{}:done:{idx}", run.kind);
                    let armed = crate::fault::test_pause_armed(&point);
                    if armed || step.recovery() != Recovery::Retry {
                        // The step acted but the journal cannot say so: undo
                        // it rather than go on with an unrecorded change.
                        if let Err(reason) = write_ended(&mut ended) {
                            return self.compensate(run, OpState::Failed, &reason).await;
                        }
                    }
                    if armed {
                        crate::fault::test_pause(&point).await;
                    }
                }
                Err(e) => {
                    // Not reached with an end waiting: it was journaled
                    // with this step's start.
                    let cancelled = e == StepError::Cancelled;
                    let said = cx.take_when_done();
                    if !said.is_empty() {
                        let _ = self.journal.log_all(id, "info", &said);
                    }
                    let _ = self.journal.step_finished(
                        id,
                        idx,
                        StepState::Failed,
                        None,
                        Some(&e.to_string()),
                    );
                    let (end, reason) = if cancelled {
                        (OpState::Cancelled, "cancelled".to_string())
                    } else {
                        (OpState::Failed, format!("step {name} failed: {e}"))
                    };
                    return self.compensate(run, end, &reason).await;
                }
            }
        }
        progress.update(|t| t.complete());
        let view = view_json(&progress.view());
        // The last step's end and the operation's in one journal write.
        let wrote = match &ended {
            None => self
                .journal
                .end(id, OpState::Succeeded, None, "succeeded", &view)
                .map_err(|e| e.to_string()),
            Some(e) => self
                .journal
                .step_done_then_end(id, &e.record(), OpState::Succeeded, "succeeded", &view)
                .map_err(|err| {
                    // The step acted but the journal cannot say so.
                    format!("step {} done but not journaled: {err}", e.name)
                }),
        };
        match (wrote, ended.take()) {
            (Ok(()), Some(e)) => tracing::info!(op = %id, "step {} done", e.name),
            (Ok(()), None) => {}
            (Err(reason), Some(_)) => {
                return self.compensate(run, OpState::Failed, &reason).await;
            }
            (Err(e), None) => tracing::warn!(op = %id, "cannot write the journal: {e}"),
        }
        tracing::info!(op = %id, "succeeded");
        OpState::Succeeded
    }

    /// Undoes, newest first, every step the journal says may have acted,
    /// and ends the operation in `end` with a message naming what was
    /// undone and what could not be.
    async fn compensate(&self, run: &Run<'_, C>, end: OpState, reason: &str) -> OpState {
        let (id, plan) = (run.id, run.plan);
        let during = if end == OpState::Cancelled {
            OpState::Cancelling
        } else {
            OpState::Compensating
        };
        let _ = self.journal.set_state(id, during, Some(reason));
        self.log(id, "warn", &format!("{reason}: compensating"));
        let steps = match self.journal.steps(id) {
            Ok(s) => s,
            Err(e) => {
                let msg = format!("{reason}; cannot read the journal to compensate: {e}");
                self.log(id, "error", &msg);
                let _ = self.journal.set_state(id, OpState::Failed, Some(&msg));
                return OpState::Failed;
            }
        };
        let results: HashMap<String, Value> = steps
            .iter()
            .filter(|s| s.state == StepState::Done)
            .filter_map(|s| Some((s.name.clone(), s.result.clone()?)))
            .collect();
        let mut undone = Vec::new();
        let mut stuck = Vec::new();
        for rec in steps.iter().rev() {
            if matches!(rec.state, StepState::Undone) {
                continue;
            }
            let Some(step) = plan.steps.get(rec.idx) else {
                stuck.push(format!("{} (no longer in the plan)", rec.name));
                continue;
            };
            let cx = self.context(run, rec.idx, &results);
            match step.undo(&cx, &rec.intent, rec.result.as_ref()).await {
                Ok(()) => {
                    let _ = self
                        .journal
                        .step_finished(id, rec.idx, StepState::Undone, None, None);
                    self.log(id, "info", &format!("step {} undone", rec.name));
                    undone.push(rec.name.clone());
                }
                Err(e) => {
                    let _ = self.journal.step_finished(
                        id,
                        rec.idx,
                        StepState::UndoFailed,
                        None,
                        Some(&e.to_string()),
                    );
                    self.log(id, "error", &format!("step {} not undone: {e}", rec.name));
                    stuck.push(format!("{} ({e})", rec.name));
                }
            }
        }
        let mut msg = reason.to_string();
        if undone.is_empty() {
            msg.push_str("; nothing had to be undone");
        } else {
            msg.push_str(&format!("; undone: {}", undone.join(", ")));
        }
        let end = if stuck.is_empty() {
            end
        } else {
            msg.push_str(&format!("; NOT undone, left as is: {}", stuck.join(", ")));
            OpState::Failed
        };
        self.log(id, "info", &format!("ended {end}: {msg}"));
        let _ = self.journal.set_state(id, end, Some(&msg));
        end
    }

    fn log(&self, id: &str, level: &str, msg: &str) {
        tracing::info!(op = %id, "{msg}");
        if let Err(e) = self.journal.log(id, level, msg) {
            tracing::warn!(op = %id, "cannot write the journal log: {e}");
        }
    }
}

/// A step's end not journaled yet (see [`Manager::execute`]).
struct Ended {
    idx: usize,
    name: String,
    result: Value,
    /// Its closing log lines, "step <name> done" last.
    lines: Vec<String>,
    /// The operation's progress with the step done.
    view: Value,
}

impl Ended {
    fn record(&self) -> StepDone<'_> {
        StepDone {
            idx: self.idx,
            result: &self.result,
            msgs: &self.lines,
            progress: &self.view,
        }
    }
}

/// Decides how to continue an operation found unfinished at start-up.
fn decide<C>(op: &OpRecord, plan: &Plan<C>, steps: &[StepRecord]) -> Start {
    let prior = op.error.clone().unwrap_or_else(|| "interrupted".into());
    match op.state {
        OpState::Cancelling => {
            return Start::Compensate {
                end: OpState::Cancelled,
                reason: "cancelled".into(),
            };
        }
        OpState::Compensating => {
            return Start::Compensate {
                end: OpState::Failed,
                reason: prior,
            };
        }
        _ => {}
    }
    let done: HashMap<String, Value> = steps
        .iter()
        .filter(|s| s.state == StepState::Done)
        .filter_map(|s| Some((s.name.clone(), s.result.clone()?)))
        .collect();
    match steps.last() {
        None => Start::At(0, done),
        Some(last) if last.state == StepState::Done => Start::At(last.idx + 1, done),
        Some(last) if last.state == StepState::Started => {
            let retry = plan
                .steps
                .get(last.idx)
                .is_some_and(|s| s.recovery() == Recovery::Retry);
            if retry {
                Start::At(last.idx, done)
            } else {
                Start::Compensate {
                    end: OpState::Failed,
                    reason: format!("interrupted by a restart during step {}", last.name),
                }
            }
        }
        Some(last) => Start::Compensate {
            end: OpState::Failed,
            reason: format!("interrupted by a restart after step {} failed", last.name),
        },
    }
}

fn view_json(v: &ProgressView) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}
