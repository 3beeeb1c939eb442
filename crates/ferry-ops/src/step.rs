//! Steps, plans and what a running step can see.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::StepError;
use crate::journal::Journal;
use crate::progress::{NodeId, ProgressTree, ProgressView};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What recovery does with a step that a crash interrupted (its intent is
/// journaled, its result is not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// The step is idempotent: run it again and go on (roll forward).
    Retry,
    /// Undo the step and every step before it (compensate).
    Compensate,
}

/// One named step of an operation. `C` is the application state the steps
/// act on (a pool, QEMU processes, peers).
pub trait Step<C>: Send + Sync {
    fn name(&self) -> &str;

    /// What to do with this step after a crash interrupted it.
    fn recovery(&self) -> Recovery {
        Recovery::Compensate
    }

    /// What the step is about to do, with everything its undo needs; written
    /// to the journal before [`Step::run`] acts on the world.
    fn intent(&self, cx: &StepContext<C>) -> Result<Value, StepError> {
        let _ = cx;
        Ok(Value::Null)
    }

    /// Acts. Long steps poll [`StepContext::is_cancelled`] and report
    /// progress on [`StepContext::node`].
    fn run<'a>(&'a self, cx: &'a StepContext<C>) -> BoxFuture<'a, Result<Value, StepError>>;

    /// Reverses the step from its journaled intent (and its result, when it
    /// finished). Must succeed on a step that acted only partly or not at
    /// all.
    fn undo<'a>(
        &'a self,
        cx: &'a StepContext<C>,
        intent: &'a Value,
        result: Option<&'a Value>,
    ) -> BoxFuture<'a, Result<(), StepError>> {
        let _ = (cx, intent, result);
        Box::pin(async { Ok(()) })
    }
}

/// An operation's plan: its steps in order and its progress tree, rebuilt
/// from the journaled kind and parameters after a restart.
pub struct Plan<C> {
    pub steps: Vec<Box<dyn Step<C>>>,
    pub progress: ProgressTree,
    /// The progress node of each step (same order as `steps`).
    pub nodes: Vec<NodeId>,
}

impl<C> Plan<C> {
    /// A plan whose progress tree has one node per step with the given
    /// weight (e.g. the expected seconds of the step).
    pub fn new(title: &str, steps: Vec<(Box<dyn Step<C>>, f64)>) -> Self {
        let mut progress = ProgressTree::new(title);
        let mut nodes = Vec::new();
        let mut out = Vec::new();
        for (s, w) in steps {
            nodes.push(progress.add(ProgressTree::ROOT, s.name().to_string(), w));
            out.push(s);
        }
        Plan {
            steps: out,
            progress,
            nodes,
        }
    }
}

/// Shared progress of a live operation: the tree plus a channel that
/// watchers (the API's event stream, the CLI's bar) subscribe to.
#[derive(Clone)]
pub struct ProgressHandle {
    tree: Arc<Mutex<ProgressTree>>,
    tx: Arc<watch::Sender<ProgressView>>,
}

impl ProgressHandle {
    pub(crate) fn new(tree: ProgressTree) -> Self {
        let view = tree.view();
        ProgressHandle {
            tree: Arc::new(Mutex::new(tree)),
            tx: Arc::new(watch::channel(view).0),
        }
    }

    /// Changes the tree and publishes the new view.
    pub fn update<T>(&self, f: impl FnOnce(&mut ProgressTree) -> T) -> T {
        let mut tree = self.tree.lock().unwrap_or_else(|p| p.into_inner());
        let out = f(&mut tree);
        self.tx.send_replace(tree.view());
        out
    }

    pub fn view(&self) -> ProgressView {
        self.tree.lock().unwrap_or_else(|p| p.into_inner()).view()
    }

    pub fn subscribe(&self) -> watch::Receiver<ProgressView> {
        self.tx.subscribe()
    }
}

/// The log level of [`StepContext::checkpoint`] lines.
pub const CHECKPOINT: &str = "checkpoint";

/// What a step sees while it runs or is undone.
pub struct StepContext<C> {
    pub op_id: String,
    pub params: Value,
    pub app: Arc<C>,
    /// The step's own node in the progress tree.
    pub node: NodeId,
    pub progress: ProgressHandle,
    pub(crate) journal: Arc<Journal>,
    pub(crate) cancel: CancellationToken,
    pub(crate) results: HashMap<String, Value>,
    /// Lines [`StepContext::log_when_done`] keeps for the journal write
    /// that records the step's end.
    pub(crate) when_done: std::sync::Mutex<Vec<String>>,
}

impl<C> StepContext<C> {
    /// The result of an earlier, finished step of this operation.
    pub fn result_of(&self, step: &str) -> Option<&Value> {
        self.results.get(step)
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Resolves when the operation is cancelled (for `select!`).
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await
    }

    /// Sets the fraction done of this step's own node.
    pub fn set_fraction(&self, f: f64) {
        let node = self.node;
        self.progress.update(|t| t.set_fraction(node, f));
    }

    /// Durably records how far a long step got (e.g. the ranges a copy has
    /// written), so that a run after a crash can skip what is done. Kept in
    /// the operation's log with level `checkpoint`; durable when this
    /// returns.
    pub fn checkpoint(&self, msg: impl AsRef<str>) -> Result<(), StepError> {
        self.journal
            .log(&self.op_id, CHECKPOINT, msg.as_ref())
            .map_err(StepError::failed)
    }

    /// Several checkpoints at once (one journal write).
    pub fn checkpoint_all(&self, msgs: &[String]) -> Result<(), StepError> {
        self.journal
            .log_all(&self.op_id, CHECKPOINT, msgs)
            .map_err(StepError::failed)
    }

    /// The checkpoints this operation recorded, oldest first (across runs).
    pub fn checkpoints(&self) -> Result<Vec<String>, StepError> {
        Ok(self
            .journal
            .logs(&self.op_id)
            .map_err(StepError::failed)?
            .into_iter()
            .filter(|l| l.level == CHECKPOINT)
            .map(|l| l.msg)
            .collect())
    }

    /// Writes several lines to the operation's durable log at once (one
    /// journal write instead of one per line).
    pub fn log_all(&self, msgs: &[String]) {
        for m in msgs {
            tracing::info!(op = %self.op_id, "{m}");
        }
        if let Err(e) = self.journal.log_all(&self.op_id, "info", msgs) {
            tracing::warn!(op = %self.op_id, "cannot write the journal log: {e}");
        }
    }

    /// A line for the operation's durable log, written with the record
    /// of the step's end (done or failed) instead of a journal write of
    /// its own: for what a step says as it finishes. Lost if the daemon
    /// dies before the step ends, as the step's end is.
    pub fn log_when_done(&self, msg: impl Into<String>) {
        let msg = msg.into();
        tracing::info!(op = %self.op_id, "{msg}");
        self.when_done
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(msg);
    }

    /// The lines [`StepContext::log_when_done`] kept, taken.
    pub(crate) fn take_when_done(&self) -> Vec<String> {
        std::mem::take(&mut self.when_done.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Writes a line to the operation's durable log.
    pub fn log(&self, msg: impl AsRef<str>) {
        let msg = msg.as_ref();
        tracing::info!(op = %self.op_id, "{msg}");
        if let Err(e) = self.journal.log(&self.op_id, "info", msg) {
            tracing::warn!(op = %self.op_id, "cannot write the journal log: {e}");
        }
    }
}
