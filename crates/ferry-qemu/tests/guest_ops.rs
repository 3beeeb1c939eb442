//! Block operations and live migration with a real guest (the test kit's
//! kernel + busybox initramfs, under TCG) appending fsync'd records to an
//! ext4 disk the whole time. Afterwards every acknowledged record must be
//! on the disk the VM ended on.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use common::QemuNbd;
use ferry_qemu::migration::{self, MigrationParams};
use ferry_qemu::{FreezeStatus, NbdServer, RunState, block_graph, overlay};
use ferry_testkit::{Disk, TestGuest, Workload, disk};

const T: Duration = Duration::from_secs(120);
const DISK: u64 = 64 << 20;

fn last_seq(g: &mut TestGuest) -> Result<Option<u64>> {
    Ok(g.poll_events()?
        .iter()
        .filter(|e| e.name == "record")
        .filter_map(|e| e.u64("seq"))
        .max())
}

/// Waits until the guest acknowledged `more` records beyond the last one
/// seen so far; returns the new last sequence number.
async fn records_advance(g: &mut TestGuest, more: u64) -> Result<u64> {
    let from = last_seq(g)?.unwrap_or(0);
    let ev = g
        .wait_event(
            |e| e.name == "record" && e.u64("seq") >= Some(from + more),
            T,
        )
        .await
        .with_context(|| format!("guest {} stopped writing records after {from}", g.name()))?;
    ev.u64("seq").context("record without seq")
}

/// Drops the guest and checks that its QEMU is gone and its run directory
/// removed. (The kit's process-wide `registry::assert_no_leftovers` also
/// sees other tests running in parallel, so each test checks its own.)
fn drop_and_check_gone(g: TestGuest, pid: Option<u32>) {
    let run = g.run_dir().to_path_buf();
    drop(g);
    if let Some(pid) = pid {
        assert!(!common::alive(pid as i32), "QEMU {pid} left running");
    }
    assert!(!run.exists(), "run directory {} left behind", run.display());
}

/// Shuts the guest down and checks that every acknowledged record is in
/// the ext4 image at `image`.
async fn shutdown_and_verify(mut g: TestGuest, image: &std::path::Path) -> Result<u64> {
    let pid = g.pid();
    g.shutdown(T).await?;
    let acked = last_seq(&mut g)?.context("no records acknowledged")?;
    drop_and_check_gone(g, pid);
    let mut report = disk::verify_records_on_image(image)?;
    report.expect_min_records(acked + 1);
    assert!(report.ok, "records lost: {:?}", report.errors);
    Ok(acked)
}

#[tokio::test]
async fn overlay_snapshot_and_commit_while_the_guest_writes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("data.raw");
    disk::make_ext4_disk(&image, DISK)?;
    let nbd = QemuNbd::serve(&image, &dir.path().join("nbd.sock"))?;
    let ovl_dir = dir.path().join("overlays");
    std::fs::create_dir(&ovl_dir)?;
    let mut g = TestGuest::builder("ovl-live")
        .disk(Disk::Nbd {
            server: nbd.server(),
            export: String::new(),
        })
        .workload(Workload::records(50.0))
        .start()
        .await?;
    records_advance(&mut g, 10).await?;
    let qmp = g.qmp()?.clone();
    let agent = g.agent()?.clone();

    let prepared = overlay::prepare(&qmp, &["vda"], &ovl_dir).await?;
    let snap = overlay::snapshot_frozen(prepared, Some(&agent)).await?;
    println!("overlay snapshot freeze->thaw window: {:?}", snap.window);
    assert_eq!(agent.fsfreeze_status().await?, FreezeStatus::Thawed);
    let graph = block_graph(&qmp).await?;
    assert_eq!(graph.disk("vda")?.node_names(), vec!["vda-ov", "vda-fmt"]);

    // The guest keeps writing, into the overlay now.
    records_advance(&mut g, 20).await?;
    let ovl_size = std::fs::metadata(&snap.set.overlays[0].path)?.len();
    assert!(
        ovl_size > 256 << 10,
        "overlay holds no data ({ovl_size} bytes)"
    );

    let t0 = Instant::now();
    snap.set.commit(T).await?;
    println!("active commit while writing: {:?}", t0.elapsed());
    let graph = block_graph(&qmp).await?;
    assert_eq!(graph.disk("vda")?.node_names(), vec!["vda-fmt"]);
    assert_eq!(
        std::fs::read_dir(&ovl_dir)?.count(),
        0,
        "overlay files left"
    );
    records_advance(&mut g, 10).await?;

    let acked = shutdown_and_verify(g, &image).await?;
    println!("{} records verified on the base image", acked + 1);
    drop(nbd);
    Ok(())
}

#[tokio::test]
async fn a_thaw_is_sent_when_the_overlay_transaction_fails() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("data.raw");
    disk::make_ext4_disk(&image, DISK)?;
    let ovl_dir = dir.path().join("overlays");
    std::fs::create_dir(&ovl_dir)?;
    let mut g = TestGuest::builder("ovl-fail")
        .raw_disk(&image)
        .workload(Workload::records(50.0))
        .start()
        .await?;
    records_advance(&mut g, 5).await?;
    let qmp = g.qmp()?.clone();
    let agent = g.agent()?.clone();
    let prepared = overlay::prepare(&qmp, &["vda"], &ovl_dir).await?;
    // Sabotage the step between freeze and thaw.
    let node = prepared.overlays()[0].node.clone();
    qmp.execute("blockdev-del", serde_json::json!({"node-name": node}))
        .await?;
    let err = overlay::snapshot_frozen(prepared, Some(&agent))
        .await
        .unwrap_err();
    println!("expected failure: {err}");
    assert_eq!(agent.fsfreeze_status().await?, FreezeStatus::Thawed);
    assert_eq!(
        block_graph(&qmp).await?.disk("vda")?.node_names(),
        vec!["vda-fmt"]
    );
    assert_eq!(std::fs::read_dir(&ovl_dir)?.count(), 0);
    // The writer was released.
    records_advance(&mut g, 10).await?;

    // A guard dropped on an error path thaws too.
    {
        let _frozen = agent.freeze().await?;
        assert_eq!(agent.fsfreeze_status().await?, FreezeStatus::Frozen);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.fsfreeze_status().await? != FreezeStatus::Thawed {
        assert!(Instant::now() < deadline, "dropped guard did not thaw");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    records_advance(&mut g, 5).await?;
    shutdown_and_verify(g, &image).await?;
    Ok(())
}

#[tokio::test]
async fn mirror_and_pivot_while_the_guest_writes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("src.raw");
    disk::make_ext4_disk(&image, DISK)?;
    let target_image = dir.path().join("dst.raw");
    std::fs::File::create(&target_image)?.set_len(DISK)?;
    let target = QemuNbd::serve(&target_image, &dir.path().join("dst.sock"))?;
    let mut g = TestGuest::builder("mirror-live")
        .raw_disk(&image)
        .workload(Workload::records(50.0))
        .start()
        .await?;
    records_advance(&mut g, 10).await?;
    let qmp = g.qmp()?.clone();

    let t0 = Instant::now();
    let mut job = ferry_qemu::start_mirror(&qmp, "vda", &target.server(), "").await?;
    let mut progress = job.progress(Duration::from_millis(20));
    job.wait_ready(T).await?;
    let mut last = 0.0;
    while let Ok(Some(p)) = tokio::time::timeout(Duration::from_millis(300), progress.recv()).await
    {
        assert!(p.fraction >= last, "progress went back");
        last = p.fraction;
        if p.ready {
            break;
        }
    }
    records_advance(&mut g, 10).await?;
    job.pivot(T, true).await?;
    println!("mirror to ready + pivot while writing: {:?}", t0.elapsed());
    let graph = block_graph(&qmp).await?;
    assert_eq!(
        graph.disk("vda")?.base().target,
        ferry_qemu::BlockTarget::Nbd {
            server: target.server(),
            export: String::new()
        }
    );
    records_advance(&mut g, 20).await?;
    let acked = shutdown_and_verify(g, &target_image).await?;
    println!("{} records verified on the mirror target", acked + 1);
    drop(target);
    Ok(())
}

/// Kernel messages of a guest whose memory did not survive the migration.
const GUEST_CRASH: [&str; 6] = [
    "BUG",
    "Oops",
    "soft lockup",
    "Kernel panic",
    "invalid opcode",
    "general protection",
];
/// Fresh source/destination pairs tried before the test fails.
const ATTEMPTS: u32 = 5;

/// Migrates a writing guest; see [`migrate_guest_once`]. Under TCG only, a
/// destination guest whose *kernel* crashes right after the switch-over
/// (the QEMU 7.2 TCG defect described below) is reported loudly and the
/// whole migration is tried again on a fresh pair, [`ATTEMPTS`] at most.
/// Every other failure — of Ferry's migration driver, its progress, the
/// source's final state, a lost record — fails at once.
///
/// `qemu`: the binary for both sides (`None`: the system's, 7.2 here). With
/// another binary there is no retry: a crash fails the test.
async fn migrate_guest(name: &str, postcopy: bool, qemu: Option<PathBuf>) -> Result<()> {
    let tcg = std::env::var("FERRY_TEST_ACCEL").map_or(true, |a| a.starts_with("tcg"));
    let mut attempt = 1;
    loop {
        match migrate_guest_once(name, postcopy, qemu.clone()).await {
            Err(e)
                if tcg
                    && qemu.is_none()
                    && attempt < ATTEMPTS
                    && format!("{e:#}").contains(&format!("guest {name}-dst"))
                    && GUEST_CRASH.iter().any(|m| format!("{e:#}").contains(m)) =>
            {
                eprintln!(
                    "WARNING: attempt {attempt}: the destination guest's kernel crashed after \
                     the switch-over (known QEMU 7.2 TCG migration defect, not Ferry's); \
                     trying a fresh pair:\n{e:#}"
                );
                attempt += 1;
            }
            r => return r,
        }
    }
}

async fn migrate_guest_once(name: &str, postcopy: bool, qemu: Option<PathBuf>) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("data.raw");
    disk::make_ext4_disk(&image, DISK)?;
    // One export, two clients (source and destination) during migration.
    let nbd = QemuNbd::serve(&image, &dir.path().join("nbd.sock"))?;
    let shared = Disk::Nbd {
        server: NbdServer::Unix(nbd.socket.clone()),
        export: String::new(),
    };
    // Under TCG the guest's TSC does not survive a migration intact: with
    // the default `tsc` clocksource the guest hung on the destination in
    // about one pre-copy run in four (soft lockups, once a panic); `hpet`
    // passed 7 runs in a row, but not the longer series below. KVM
    // migrates the TSC properly.
    //
    // With `hpet`, multi-threaded TCG (QEMU 7.2's default) still broke the
    // destination guest after a pre-copy migration in 4 of 17 runs: a soft
    // lockup in jbd2, or an oops calling through a kernel function pointer
    // that read as 0 or 1 — guest memory that did not arrive intact. With
    // `thread=single` (vCPUs round-robin on one thread): 1 failure in 13
    // here, but twice in a row in one run on a heavily loaded machine.
    // The source guest, the migration statistics and the driver's progress
    // were right every time; the defect is in TCG's dirty tracking under
    // migration, which KVM replaces with its own dirty log. Hence
    // `thread=single` plus the retry in `migrate_guest`; FERRY_TEST_ACCEL
    // overrides.
    //
    // QEMU 10 (`qemu` = `newer_qemu()`) runs with its default
    // multi-threaded TCG and no retry.
    let default_accel = if qemu.is_some() {
        "tcg"
    } else {
        "tcg,thread=single"
    };
    let accel = std::env::var("FERRY_TEST_ACCEL").unwrap_or_else(|_| default_accel.into());
    let builder = |side: &str| {
        let b = TestGuest::builder(&format!("{name}-{side}"));
        match &qemu {
            Some(q) => b.qemu_binary(q),
            None => b,
        }
    };
    let mut src = builder("src")
        .accel(&accel)
        .cmdline("clocksource=hpet")
        .disk(shared.clone())
        .workload(Workload::records(50.0))
        .start()
        .await?;
    records_advance(&mut src, 10).await?;
    let mut dst = builder("dst")
        .accel(&accel)
        .cmdline("clocksource=hpet")
        .disk(shared)
        .workload(Workload::records(50.0))
        .incoming("defer")
        .spawn()
        .await?;
    let uri = format!("unix:{}", dir.path().join("migrate.sock").display());
    migration::listen(dst.qmp()?, &uri, postcopy).await?;
    let params = MigrationParams {
        postcopy,
        // Post-copy: switch over once 8 MiB were sent, so the destination
        // runs while most of the RAM is still on the source.
        postcopy_after_bytes: Some(8 << 20),
        max_bandwidth: postcopy.then_some(64 << 20),
        downtime_limit_ms: Some(100),
        timeout: T,
        ..Default::default()
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel(4096);
    let collect = tokio::spawn(async move {
        let mut v = Vec::new();
        while let Some(p) = rx.recv().await {
            v.push(p);
        }
        v
    });
    let stats = migration::migrate(src.qmp()?, &uri, &params, Some(tx)).await?;
    migration::wait_running(dst.qmp()?, T).await?;
    let readings = collect.await?;
    let mut lastf = 0.0;
    for r in &readings {
        assert!(r.fraction >= lastf, "migration progress went back");
        lastf = r.fraction;
    }
    if postcopy {
        assert!(
            readings.iter().any(|r| r.stats.status == "postcopy-active"),
            "never went post-copy"
        );
    }
    println!(
        "{} with a writing guest: total {} ms, downtime {} ms, {} MiB sent",
        if postcopy { "post-copy" } else { "pre-copy" },
        stats.total_time_ms.unwrap_or(0),
        stats.downtime_ms.unwrap_or(0),
        stats.transferred >> 20
    );
    assert_eq!(
        src.qmp()?.query_status().await?.status,
        RunState::Postmigrate
    );
    let src_last = last_seq(&mut src)?.unwrap_or(0);
    // The guest carries on at the destination; its console now goes to the
    // destination's serial log.
    let ev = dst
        .wait_event(
            |e| e.name == "record" && e.u64("seq") >= Some(src_last + 20),
            T,
        )
        .await?;
    println!(
        "destination acknowledged record {}",
        ev.u64("seq").unwrap_or(0)
    );
    let pid = src.pid();
    src.kill()?;
    drop_and_check_gone(src, pid);
    let acked = shutdown_and_verify(dst, &image).await?;
    println!("{} records verified after migration", acked + 1);
    drop(nbd);
    Ok(())
}

/// Pre-copy of a writing guest on QEMU 10 (unpacked beside the system's
/// 7.2 by `scripts/install-qemu-new.sh`): no retry, any crash fails.
#[tokio::test]
async fn precopy_migration_of_a_writing_guest() -> Result<()> {
    let qemu = ferry_testkit::newer_qemu()?;
    migrate_guest("mig-pre10", false, Some(qemu)).await
}

/// The same on the system's QEMU 7.2. Out of `make test`: under TCG the
/// destination guest broke in up to half of the runs on this machine — its
/// memory did not arrive intact (see `migrate_guest_once`); the driver's
/// part passed every run, and the same test passes on QEMU 10 above. Run it
/// with `cargo test -p ferry-qemu --test guest_ops -- --ignored`, or on KVM
/// with FERRY_TEST_ACCEL=kvm.
#[tokio::test]
#[ignore = "QEMU 7.2 TCG: the destination guest's memory is sometimes damaged by a pre-copy migration (passes on QEMU 10: precopy_migration_of_a_writing_guest)"]
async fn precopy_migration_on_qemu_7_2() -> Result<()> {
    migrate_guest("mig-pre", false, None).await
}

#[tokio::test]
async fn postcopy_migration_of_a_writing_guest() -> Result<()> {
    migrate_guest("mig-post", true, None).await
}

#[tokio::test]
async fn postcopy_migration_on_qemu_10() -> Result<()> {
    let qemu = ferry_testkit::newer_qemu()?;
    migrate_guest("mig-post10", true, Some(qemu)).await
}
