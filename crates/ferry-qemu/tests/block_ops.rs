//! Block graph, overlay snapshot + active commit, mirror + pivot / cancel,
//! on a guest-less QEMU (TCG) with real disks: a raw image served by
//! qemu-nbd and a qcow2 file made by qemu-img. Data is written through the
//! guest device (HMP `qemu-io -d`) and checked with qemu-io.

mod common;

use std::time::Duration;

use anyhow::Result;
use common::*;
use ferry_qemu::{
    BlockTarget, ImageFormat, LaunchOptions, NbdServer, VmProcess, block_graph, overlay,
};

const MIB: u64 = 1 << 20;

#[tokio::test]
async fn block_graph_resolves_nbd_exports_and_files() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let base = dir.path().join("base.raw");
    create_image(&base, "raw", "32M")?;
    let nbd = QemuNbd::serve(&base, &dir.path().join("nbd.sock"))?;
    let q = dir.path().join("data.qcow2");
    create_image(&q, "qcow2", "16M")?;
    let spec = spec_with(
        "graph-1",
        vec![
            nbd_disk("vda", nbd.server()),
            file_disk("vdb", &q, ImageFormat::Qcow2),
        ],
    );
    let lo = LaunchOptions {
        paused: true,
        ..Default::default()
    };
    let vm = VmProcess::start(&spec, dir.path().join("run"), lo).await?;
    let g = block_graph(vm.qmp()).await?;
    let vda = g.disk("vda")?;
    assert_eq!(vda.node_names(), vec!["vda-fmt"]);
    assert_eq!(vda.base().protocol.name, "vda-pro");
    assert_eq!(vda.base().node.virtual_size, 32 * MIB);
    assert_eq!(
        vda.base().target,
        BlockTarget::Nbd {
            server: NbdServer::Unix(nbd.socket.clone()),
            export: String::new()
        }
    );
    let vdb = g.disk("vdb")?;
    assert_eq!(vdb.node_names(), vec!["vdb-fmt"]);
    assert_eq!(vdb.base().node.driver, "qcow2");
    assert_eq!(vdb.base().target, BlockTarget::File(q.clone()));
    assert!(g.disk("vdz").is_err());
    Ok(())
}

#[tokio::test]
async fn overlay_snapshot_of_two_disks_then_active_commit_back_to_base() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let base = dir.path().join("base.raw");
    create_image(&base, "raw", "32M")?;
    let nbd = QemuNbd::serve(&base, &dir.path().join("nbd.sock"))?;
    let q = dir.path().join("data.qcow2");
    create_image(&q, "qcow2", "16M")?;
    let ovl_dir = dir.path().join("overlays");
    std::fs::create_dir(&ovl_dir)?;
    let spec = spec_with(
        "overlay-1",
        vec![
            nbd_disk("vda", nbd.server()),
            file_disk("vdb", &q, ImageFormat::Qcow2),
        ],
    );
    let vm = VmProcess::start(&spec, dir.path().join("run"), LaunchOptions::default()).await?;
    device_write(&vm, "vda", 0, MIB, 0x11).await?;
    device_write(&vm, "vdb", 0, MIB, 0x22).await?;

    let prepared = overlay::prepare(vm.qmp(), &["vda", "vdb"], &ovl_dir).await?;
    // Prepared but not switched: the disks still run on their bases.
    let g = block_graph(vm.qmp()).await?;
    assert_eq!(g.disk("vda")?.node_names(), vec!["vda-fmt"]);
    let snap = overlay::snapshot_frozen(prepared, None).await?;
    println!("overlay transaction window (no agent): {:?}", snap.window);
    let set = snap.set;
    let g = block_graph(vm.qmp()).await?;
    assert_eq!(g.disk("vda")?.node_names(), vec!["vda-ov", "vda-fmt"]);
    assert_eq!(g.disk("vdb")?.node_names(), vec!["vdb-ov", "vdb-fmt"]);
    assert!(matches!(
        g.disk("vda")?.base().target,
        BlockTarget::Nbd { .. }
    ));
    assert_eq!(std::fs::read_dir(&ovl_dir)?.count(), 2);

    // New writes land in the overlays, not in the bases.
    device_write(&vm, "vda", MIB, MIB, 0x33).await?;
    device_write(&vm, "vdb", MIB, MIB, 0x44).await?;
    verify_pattern(&nbd.uri(), "raw", MIB, MIB, 0)?;
    let ovl_a = set.overlays[0].path.to_string_lossy().into_owned();
    // The overlay header names its backing file, so it is readable alone.
    verify_pattern(&ovl_a, "qcow2", 0, MIB, 0x11)?;
    verify_pattern(&ovl_a, "qcow2", MIB, MIB, 0x33)?;

    set.commit(T).await?;
    let g = block_graph(vm.qmp()).await?;
    assert_eq!(g.disk("vda")?.node_names(), vec!["vda-fmt"]);
    assert_eq!(g.disk("vdb")?.node_names(), vec!["vdb-fmt"]);
    assert!(!g.nodes.contains_key("vda-ov") && !g.nodes.contains_key("vdb-ov"));
    assert_eq!(
        std::fs::read_dir(&ovl_dir)?.count(),
        0,
        "overlay files left"
    );
    verify_pattern(&nbd.uri(), "raw", 0, MIB, 0x11)?;
    verify_pattern(&nbd.uri(), "raw", MIB, MIB, 0x33)?;
    verify_pattern(&q.to_string_lossy(), "qcow2", MIB, MIB, 0x44)?;

    // A second round works with the same node names.
    let prepared = overlay::prepare(vm.qmp(), &["vda"], &ovl_dir).await?;
    let set = prepared.snapshot().await?;
    device_write(&vm, "vda", 2 * MIB, MIB, 0x55).await?;
    set.commit(T).await?;
    verify_pattern(&nbd.uri(), "raw", 2 * MIB, MIB, 0x55)?;
    Ok(())
}

#[tokio::test]
async fn a_failing_transaction_switches_no_disk_and_leaves_no_overlay() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let a = dir.path().join("a.raw");
    let b = dir.path().join("b.raw");
    create_image(&a, "raw", "8M")?;
    create_image(&b, "raw", "8M")?;
    let ovl_dir = dir.path().join("overlays");
    std::fs::create_dir(&ovl_dir)?;
    let spec = spec_with(
        "overlay-fail",
        vec![
            file_disk("vda", &a, ImageFormat::Raw),
            file_disk("vdb", &b, ImageFormat::Raw),
        ],
    );
    let lo = LaunchOptions {
        paused: true,
        ..Default::default()
    };
    let vm = VmProcess::start(&spec, dir.path().join("run"), lo).await?;
    let prepared = overlay::prepare(vm.qmp(), &["vda", "vdb"], &ovl_dir).await?;
    // Make the second action fail: its overlay node disappears.
    let second = prepared.overlays()[1].node.clone();
    vm.qmp()
        .execute("blockdev-del", serde_json::json!({"node-name": second}))
        .await?;
    let err = prepared.snapshot().await.unwrap_err();
    assert!(err.to_string().contains("transaction"), "{err}");
    let g = block_graph(vm.qmp()).await?;
    assert_eq!(
        g.disk("vda")?.node_names(),
        vec!["vda-fmt"],
        "the transaction was not atomic"
    );
    assert_eq!(g.disk("vdb")?.node_names(), vec!["vdb-fmt"]);
    assert_eq!(
        std::fs::read_dir(&ovl_dir)?.count(),
        0,
        "overlay files left"
    );

    // Unknown device: clear error, nothing created.
    let err = overlay::prepare(vm.qmp(), &["vda", "nope"], &ovl_dir)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
    assert_eq!(std::fs::read_dir(&ovl_dir)?.count(), 0);
    assert!(!block_graph(vm.qmp()).await?.nodes.contains_key("vda-ov"));
    Ok(())
}

#[tokio::test]
async fn mirror_to_an_nbd_target_then_pivot() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let src = dir.path().join("src.raw");
    let dst = dir.path().join("dst.raw");
    create_image(&src, "raw", "32M")?;
    create_image(&dst, "raw", "32M")?;
    let target = QemuNbd::serve(&dst, &dir.path().join("dst.sock"))?;
    let spec = spec_with("mirror-1", vec![file_disk("vda", &src, ImageFormat::Raw)]);
    let vm = VmProcess::start(&spec, dir.path().join("run"), LaunchOptions::default()).await?;
    device_write(&vm, "vda", 0, 8 * MIB, 0x5a).await?;

    let mut job = ferry_qemu::start_mirror(vm.qmp(), "vda", &target.server(), "").await?;
    let mut progress = job.progress(Duration::from_millis(5));
    job.wait_ready(T).await?;
    let mut last = 0.0;
    let mut readings = 0;
    while let Ok(Some(p)) = tokio::time::timeout(Duration::from_millis(200), progress.recv()).await
    {
        assert!(
            p.fraction >= last,
            "progress went back: {} < {last}",
            p.fraction
        );
        last = p.fraction;
        readings += 1;
        if p.ready {
            break;
        }
    }
    assert!(readings > 0, "no progress reported");
    // Written after ready: goes to both sides, then the pivot.
    device_write(&vm, "vda", 8 * MIB, MIB, 0x6b).await?;
    job.pivot(T, true).await?;
    let g = block_graph(vm.qmp()).await?;
    let vda = g.disk("vda")?;
    assert_eq!(
        vda.base().target,
        BlockTarget::Nbd {
            server: target.server(),
            export: String::new()
        }
    );
    assert!(!g.nodes.contains_key("vda-fmt") && !g.nodes.contains_key("vda-pro"));
    device_write(&vm, "vda", 9 * MIB, MIB, 0x7c).await?;
    drop(vm);
    verify_pattern(&target.uri(), "raw", 0, 8 * MIB, 0x5a)?;
    verify_pattern(&target.uri(), "raw", 8 * MIB, MIB, 0x6b)?;
    verify_pattern(&target.uri(), "raw", 9 * MIB, MIB, 0x7c)?;
    // The source saw nothing after the pivot.
    verify_pattern(&src.to_string_lossy(), "raw", 9 * MIB, MIB, 0)?;
    Ok(())
}

#[tokio::test]
async fn mirror_cancel_keeps_the_disk_on_its_source() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let src = dir.path().join("src.raw");
    let dst = dir.path().join("dst.raw");
    create_image(&src, "raw", "16M")?;
    create_image(&dst, "raw", "16M")?;
    let target = QemuNbd::serve(&dst, &dir.path().join("dst.sock"))?;
    let spec = spec_with("mirror-2", vec![file_disk("vda", &src, ImageFormat::Raw)]);
    let vm = VmProcess::start(&spec, dir.path().join("run"), LaunchOptions::default()).await?;
    let mut job = ferry_qemu::start_mirror(vm.qmp(), "vda", &target.server(), "").await?;
    job.wait_ready(T).await?;
    job.cancel(T).await?;
    let g = block_graph(vm.qmp()).await?;
    assert_eq!(g.disk("vda")?.node_names(), vec!["vda-fmt"]);
    assert_eq!(g.disk("vda")?.base().target, BlockTarget::File(src.clone()));
    assert!(!g.nodes.contains_key("vda-mi"));
    assert!(
        ferry_qemu::jobs::query_block_jobs(vm.qmp())
            .await?
            .is_empty()
    );
    Ok(())
}

#[tokio::test]
async fn qemu_killed_during_a_mirror_gives_a_clear_error_and_leaves_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let src = dir.path().join("src.raw");
    let dst = dir.path().join("dst.raw");
    create_image(&src, "raw", "16M")?;
    create_image(&dst, "raw", "16M")?;
    let target = QemuNbd::serve(&dst, &dir.path().join("dst.sock"))?;
    let run = dir.path().join("run");
    let spec = spec_with(
        "mirror-crash",
        vec![file_disk("vda", &src, ImageFormat::Raw)],
    );
    let mut vm = VmProcess::start(&spec, &run, LaunchOptions::default()).await?;
    let job = ferry_qemu::start_mirror(vm.qmp(), "vda", &target.server(), "").await?;
    let pid = vm.pid();
    // SAFETY: kill(2) on the QEMU this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let err = job.pivot(T, false).await.unwrap_err();
    assert!(err.is_closed(), "{err}");
    assert!(err.to_string().contains("mirror-vda"), "{err}");
    assert!(vm.wait_exit(T).await);
    assert!(!alive(pid));
    for f in ["qmp.sock", "qga.sock", "qemu.pid"] {
        assert!(!run.join(f).exists(), "{f} left behind");
    }
    Ok(())
}
