//! Acceptance (issue 2): a dropped guest leaves no QEMU process and no
//! socket or file, also when the test using it panics.

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, ensure};
use ferry_testkit::{TestGuest, registry};

#[tokio::test]
async fn dropped_and_panicking_guests_leave_nothing() -> Result<()> {
    // Started and dropped.
    let g = TestGuest::builder("dropped").start().await?;
    println!("guest boot time: {:?}", g.boot_time());
    let pid = g.pid().context("no pid")?;
    let run_dir = g.run_dir().to_owned();
    let sockets: Vec<_> = std::fs::read_dir(&run_dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .collect();
    ensure!(
        sockets
            .iter()
            .any(|p| p.extension().is_some_and(|x| x == "sock")),
        "no sockets in {}: {sockets:?}",
        run_dir.display()
    );
    ensure!(registry::qemu_alive(pid));
    drop(g);
    ensure!(!registry::qemu_alive(pid), "QEMU {pid} survived the drop");
    for p in &sockets {
        ensure!(!p.exists(), "{} survived the drop", p.display());
    }
    ensure!(!run_dir.exists());
    registry::assert_no_leftovers()?;

    // A test that panics while its guest runs.
    let seen = Arc::new(Mutex::new(None));
    let seen_in_task = seen.clone();
    let task = tokio::spawn(async move {
        let g = TestGuest::builder("panics").spawn().await.expect("spawn");
        let pid = g.pid().expect("pid");
        *seen_in_task.lock().unwrap() = Some((pid, g.run_dir().to_owned()));
        panic!("test panics with guest {pid} running");
    });
    let err = task.await.expect_err("the task panicked");
    ensure!(err.is_panic());
    let (pid, run_dir) = seen
        .lock()
        .unwrap()
        .clone()
        .context("the task saw no guest")?;
    ensure!(
        !run_dir.exists(),
        "{} survived the panic",
        run_dir.display()
    );
    ensure!(!registry::qemu_alive(pid), "QEMU {pid} survived the panic");
    registry::assert_no_leftovers()?;
    let (started, released) = registry::counts();
    assert_eq!((started, released), (2, 2));
    assert!(registry::child_qemu_pids().is_empty());
    // Nor did any earlier test process of this run.
    let orphans = registry::orphans();
    assert!(orphans.is_empty(), "left behind: {orphans:#?}");
    Ok(())
}
