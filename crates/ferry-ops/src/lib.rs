//! Ferry's operations layer: every long action (snapshot, copy, migrate,
//! backup, restore) is an *operation* — a named sequence of steps that is
//! journaled, resumable, cancellable and carries one honest progress figure.
//!
//! # Durability
//! The journal ([`Journal`], one SQLite file per host, `synchronous=FULL`)
//! holds each operation's kind and parameters, and for each step its
//! *intent* — what it is about to do and what its undo needs — written
//! **before** the step acts, then its result or error. So after a `kill -9`
//! at any point the journal names every step that may have acted. The end
//! of a step that is run again after a crash ([`Recovery::Retry`]) is
//! written with the next step's intent (or the operation's end), in one
//! transaction: a crash in between finds it started, not done, and runs
//! it again, as after a crash just before its end. Any other step's end is
//! written before the next step is considered, so a crash after it rolls
//! forward.
//!
//! # Recovery
//! At start-up [`Manager::recover`] rebuilds each unfinished operation's plan
//! from its kind and parameters and:
//! - continues after the last finished step (roll forward);
//! - re-runs a step the crash interrupted if the step says it is idempotent
//!   ([`Recovery::Retry`]), or else undoes it and every step before it,
//!   newest first ([`Recovery::Compensate`]);
//! - finishes a compensation or a cancellation that was under way.
//!
//! The operation's log says which, and an operation whose undo failed ends
//! `failed` with a message naming what was left.
//!
//! # Progress
//! [`ProgressTree`] is the one place where overall completion is computed:
//! weighted from measured properties, never backwards, 100 % only when done.

pub mod error;
pub mod fault;
pub mod journal;
pub mod manager;
pub mod progress;
pub mod step;

pub use error::{OpsError, Result, StepError};
pub use fault::{test_pause, test_pause_armed};
pub use journal::{Journal, LogLine, OpRecord, OpState, StepRecord, StepState};
pub use manager::Manager;
pub use progress::{Node, NodeId, ProgressTree, ProgressView};
pub use step::{BoxFuture, Plan, ProgressHandle, Recovery, Step, StepContext};
