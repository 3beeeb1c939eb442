//! Batch migration under faults (issue 10), CI subset: one trial per fault
//! kind at an interesting phase, run by the engine the `faults` bench suite
//! runs in full (`ferry_bench::faults`). Each trial: two TCG guests writing
//! records on host-a, a batch to host-b coordinated by host-c, held at the
//! phase, the fault injected, status compared with the ground truth, then
//! recover; every VM must run on exactly one host with its records intact
//! and nothing left behind.

use std::path::Path;

use ferry_bench::faults::{Fault, Phase, run_trial};

/// One trial at a time: each boots two guests and three daemons.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn trial(phase: Phase, fault: Fault) {
    let _one = ONE_AT_A_TIME.lock().await;
    let t = run_trial(Path::new(env!("CARGO_BIN_EXE_ferryd")), phase, fault).await;
    println!(
        "{} × {}: {:.0} s, wrong {} lost {} duplicated {} orphans {} bad records {}",
        phase.name(),
        fault.name(),
        t.seconds,
        t.wrong_status,
        t.lost,
        t.duplicated,
        t.orphans,
        t.bad_records
    );
    for n in &t.notes {
        println!("  {n}");
    }
    assert!(t.error.is_none(), "trial failed to run: {:?}", t.error);
    assert!(t.clean(), "{t:#?}");
}

#[tokio::test]
async fn coordinator_killed_during_memory_transfer() {
    trial(Phase::DuringMemory, Fault::KillCoordinator).await;
}

#[tokio::test]
async fn source_ferryd_killed_after_the_placeholder() {
    trial(Phase::AfterPlaceholder, Fault::KillSource).await;
}

#[tokio::test]
async fn destination_ferryd_killed_after_switchover_before_the_event() {
    trial(Phase::AfterSwitchover, Fault::KillDestination).await;
}

#[tokio::test]
async fn source_qemu_killed_after_the_record() {
    trial(Phase::AfterRecord, Fault::KillSourceQemu).await;
}

#[tokio::test]
async fn coordinator_database_lost_after_the_event() {
    trial(Phase::AfterEvent, Fault::LoseCoordinator).await;
}

#[tokio::test]
async fn network_cut_between_the_sites_during_memory_transfer() {
    trial(Phase::DuringMemory, Fault::NetCut).await;
}

/// The source ferryd killed while it releases the VM: at its restart it
/// must re-attach to the source QEMU before the release resumes, so that
/// the QEMU is stopped with its definition (an orphan QEMU before).
#[tokio::test]
async fn source_ferryd_killed_after_the_event() {
    trial(Phase::AfterEvent, Fault::KillSource).await;
}
