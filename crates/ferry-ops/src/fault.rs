//! **Test-only fault injection.** Never active unless the environment
//! variable [`PAUSE_VAR`] is set.
//!
//! Crash tests need to stop a daemon at an exact point of an operation and
//! `kill -9` it there. When `FERRY_OPS_TEST_PAUSE` names a point, the task
//! that reaches it prints `FERRY_OPS_TEST_PAUSED <point>` to stderr and waits
//! forever; the rest of the process keeps serving.
//!
//! Points the runner passes: `<kind>:started:<idx>` (step `idx`'s intent is
//! journaled, it has not acted) and `<kind>:done:<idx>` (its result is
//! journaled, the next step has not started). Steps may add their own, e.g.
//! `volume.import:copying` in the middle of a copy.

use std::sync::OnceLock;

/// The environment variable naming the point to pause at.
pub const PAUSE_VAR: &str = "FERRY_OPS_TEST_PAUSE";

fn armed() -> Option<&'static str> {
    static POINT: OnceLock<Option<String>> = OnceLock::new();
    POINT
        .get_or_init(|| std::env::var(PAUSE_VAR).ok().filter(|s| !s.is_empty()))
        .as_deref()
}

/// Waits forever if `point` is the armed pause point; returns at once
/// otherwise (always, unless [`PAUSE_VAR`] is set).
pub async fn test_pause(point: &str) {
    if armed() == Some(point) {
        eprintln!("FERRY_OPS_TEST_PAUSED {point}");
        std::future::pending::<()>().await;
    }
}
