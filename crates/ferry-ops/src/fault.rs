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
//!
//! A hold can be released: when [`RELEASE_VAR`] names a file, a paused
//! task polls for it and goes on once it exists (printing
//! `FERRY_OPS_TEST_RELEASED <point>`), so a test can hold an operation at a
//! point, inject a fault elsewhere (a killed QEMU, a cut network) and let it
//! continue. Every task reaching the point while the file is absent waits.

use std::sync::OnceLock;

/// The environment variable naming the point to pause at.
pub const PAUSE_VAR: &str = "FERRY_OPS_TEST_PAUSE";
/// The environment variable naming the file whose existence releases the
/// tasks held at the pause point.
pub const RELEASE_VAR: &str = "FERRY_OPS_TEST_RELEASE";

fn release_file() -> Option<&'static str> {
    static FILE: OnceLock<Option<String>> = OnceLock::new();
    FILE.get_or_init(|| std::env::var(RELEASE_VAR).ok().filter(|s| !s.is_empty()))
        .as_deref()
}

fn armed() -> Option<&'static str> {
    static POINT: OnceLock<Option<String>> = OnceLock::new();
    POINT
        .get_or_init(|| std::env::var(PAUSE_VAR).ok().filter(|s| !s.is_empty()))
        .as_deref()
}

/// Whether `point` is the armed pause point: a step that must prepare
/// for a pause (make its work so far durable) does so only then.
pub fn test_pause_armed(point: &str) -> bool {
    armed() == Some(point)
}

/// Waits if `point` is the armed pause point — forever, or until the
/// [`RELEASE_VAR`] file exists; returns at once otherwise (always, unless
/// [`PAUSE_VAR`] is set).
pub async fn test_pause(point: &str) {
    if armed() == Some(point) {
        match release_file() {
            Some(f) => {
                let f = std::path::Path::new(f);
                if f.exists() {
                    return;
                }
                eprintln!("FERRY_OPS_TEST_PAUSED {point}");
                while !f.exists() {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                eprintln!("FERRY_OPS_TEST_RELEASED {point}");
            }
            None => {
                eprintln!("FERRY_OPS_TEST_PAUSED {point}");
                std::future::pending::<()>().await;
            }
        }
    }
}
