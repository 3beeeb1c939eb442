//! Live migration between two real QEMU processes (TCG, no guest OS): the
//! guest RAM is a private mapping of a file of random bytes, so there are
//! 64 MiB of incompressible pages to move. Pre-copy, post-copy, progress,
//! reported downtime, cancel before switchover.

mod common;

use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use common::*;
use ferry_qemu::migration::{self, MigrationParams, MigrationProgress};
use ferry_qemu::{LaunchOptions, RunState, VmProcess};

const RAM_MIB: u64 = 64;

fn random_ram(path: &Path) -> Result<()> {
    let mut buf = vec![0u8; (RAM_MIB << 20) as usize];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    std::fs::write(path, &buf)?;
    Ok(())
}

/// Guest RAM as backend `ram0`: a private mapping of `file` (random bytes),
/// or anonymous memory when `file` is `None` (post-copy needs anonymous
/// memory on the destination: userfaultfd refuses private file mappings).
fn ram_args(file: Option<&Path>) -> Vec<String> {
    let backend = match file {
        Some(f) => format!(
            "memory-backend-file,id=ram0,size={RAM_MIB}M,mem-path={},share=off",
            f.display()
        ),
        None => format!("memory-backend-ram,id=ram0,size={RAM_MIB}M"),
    };
    vec![
        "-object".into(),
        backend,
        "-machine".into(),
        "memory-backend=ram0".into(),
    ]
}

struct Pair {
    src: VmProcess,
    dst: VmProcess,
    uri: String,
    _dir: tempfile::TempDir,
}

async fn pair(name: &str, postcopy: bool) -> Result<Pair> {
    pair_on(name, postcopy, None).await
}

/// Like [`pair`]; with `tcp`, the destination listens on that TCP URI.
async fn pair_on(name: &str, postcopy: bool, tcp: Option<String>) -> Result<Pair> {
    let dir = tempfile::tempdir()?;
    let src_ram = dir.path().join("src.ram");
    random_ram(&src_ram)?;
    let mut spec = spec_with(name, vec![]);
    spec.memory_mib = RAM_MIB;
    let src = VmProcess::start(
        &spec,
        dir.path().join("src"),
        LaunchOptions {
            extra_args: ram_args(Some(&src_ram)),
            ..Default::default()
        },
    )
    .await?;
    let dst = VmProcess::start(
        &spec,
        dir.path().join("dst"),
        LaunchOptions {
            incoming: Some("defer".into()),
            extra_args: ram_args(None),
            ..Default::default()
        },
    )
    .await?;
    assert_eq!(dst.status().await?.status, RunState::Inmigrate);
    let uri = tcp.unwrap_or_else(|| {
        format!(
            "unix:{}",
            dir.path().join("dst").join("migrate.sock").display()
        )
    });
    migration::listen(dst.qmp(), &uri, postcopy).await?;
    Ok(Pair {
        src,
        dst,
        uri,
        _dir: dir,
    })
}

fn check_monotonic(readings: &[MigrationProgress]) {
    assert!(!readings.is_empty(), "no progress reported");
    let mut last = 0.0;
    for r in readings {
        assert!(
            r.fraction >= last,
            "progress went back: {} < {last}",
            r.fraction
        );
        last = r.fraction;
    }
    assert_eq!(last, 1.0);
}

async fn run_migration(
    p: &Pair,
    params: MigrationParams,
) -> Result<(ferry_qemu::MigrationStats, Vec<MigrationProgress>, Duration)> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    let collector = tokio::spawn(async move {
        let mut v = Vec::new();
        while let Some(r) = rx.recv().await {
            v.push(r);
        }
        v
    });
    let t0 = Instant::now();
    let stats = migration::migrate(p.src.qmp(), &p.uri, &params, Some(tx)).await?;
    migration::wait_running(p.dst.qmp(), T).await?;
    let wall = t0.elapsed();
    Ok((stats, collector.await?, wall))
}

#[tokio::test]
async fn precopy_moves_a_running_vm_and_reports_downtime() -> Result<()> {
    let p = pair("mig-pre", false).await?;
    let params = MigrationParams {
        downtime_limit_ms: Some(100),
        timeout: Duration::from_secs(120),
        ..Default::default()
    };
    let (stats, readings, wall) = run_migration(&p, params).await?;
    assert_eq!(stats.status, "completed");
    assert!(
        stats.transferred >= (RAM_MIB << 20) / 2,
        "only {} bytes sent",
        stats.transferred
    );
    let downtime = stats.downtime_ms.expect("downtime reported");
    println!(
        "pre-copy: total {} ms (wall {:?}), downtime {downtime} ms, {} MiB sent",
        stats.total_time_ms.unwrap_or(0),
        wall,
        stats.transferred >> 20
    );
    check_monotonic(&readings);
    assert!(p.dst.status().await?.running);
    assert_eq!(p.src.status().await?.status, RunState::Postmigrate);
    Ok(())
}

#[tokio::test]
async fn postcopy_switches_over_before_ram_is_copied() -> Result<()> {
    let p = pair("mig-post", true).await?;
    let params = MigrationParams {
        postcopy: true,
        // Switch once a quarter of the RAM is there; the rest is pulled.
        postcopy_after_bytes: Some((RAM_MIB << 20) / 4),
        max_bandwidth: Some(64 << 20),
        timeout: Duration::from_secs(120),
        ..Default::default()
    };
    let (stats, readings, wall) = run_migration(&p, params).await?;
    assert_eq!(stats.status, "completed");
    assert!(
        readings.iter().any(|r| r.stats.status == "postcopy-active"),
        "never went post-copy"
    );
    println!(
        "post-copy: total {} ms (wall {:?}), downtime {} ms, {} MiB sent, {} page requests",
        stats.total_time_ms.unwrap_or(0),
        wall,
        stats.downtime_ms.unwrap_or(0),
        stats.transferred >> 20,
        stats.postcopy_requests.unwrap_or(0)
    );
    assert!(stats.downtime_ms.is_some());
    check_monotonic(&readings);
    assert!(p.dst.status().await?.running);
    assert_eq!(p.src.status().await?.status, RunState::Postmigrate);
    Ok(())
}

#[tokio::test]
async fn cancel_before_switchover_keeps_the_source_running() -> Result<()> {
    // Over TCP this time (a port the kernel just handed out).
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut p = pair_on("mig-cancel", false, Some(format!("tcp:127.0.0.1:{port}"))).await?;
    let params = MigrationParams {
        // 64 MiB at 2 MiB/s: half a minute, far more than the test needs.
        max_bandwidth: Some(2 << 20),
        ..Default::default()
    };
    let src_qmp = p.src.qmp().clone();
    let uri = p.uri.clone();
    let task = tokio::spawn(async move { migration::migrate(&src_qmp, &uri, &params, None).await });
    // Wait until pages flow.
    loop {
        let st = migration::query_migrate(p.src.qmp()).await?;
        if st.status == "active" && st.transferred > 0 {
            break;
        }
        assert!(!task.is_finished(), "migration ended early");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let st = migration::cancel(p.src.qmp(), T).await?;
    assert_eq!(st.status, "cancelled");
    let err = task.await?.unwrap_err();
    assert!(err.to_string().contains("cancelled"), "{err}");
    let s = p.src.status().await?;
    assert!(s.running, "source not running after cancel: {s:?}");
    // The destination gives up on its incoming migration and exits.
    assert!(p.dst.wait_exit(T).await, "destination still running");
    Ok(())
}
