//! The guest-agent client against a real qemu-ga (the test kit's guest,
//! started directly as a `VmProcess`), and a graceful stop through it.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use ferry_qemu::{ErrorKind, LaunchOptions, StopOutcome, VmProcess};
use ferry_testkit::{GuestConfig, GuestImage};

#[tokio::test]
async fn agent_info_exec_errors_resync_and_graceful_stop() -> Result<()> {
    let image = GuestImage::get().await?;
    let mut config = GuestConfig::new("agent-stop");
    config.accel = "tcg".into();
    let spec = config.to_spec(&image.kernel(), &image.initramfs())?;
    assert!(spec.guest_agent);
    let dir = tempfile::tempdir()?;
    let run = dir.path().join("run");
    let mut vm = VmProcess::start(&spec, &run, LaunchOptions::default()).await?;
    let qga = vm.qga()?.with_timeout(Duration::from_secs(10));

    // The agent answers once the guest has booted.
    let t0 = Instant::now();
    loop {
        match qga.sync(Duration::from_secs(1)).await {
            Ok(()) => break,
            Err(e) if e.is_timeout() && t0.elapsed() < Duration::from_secs(90) => {}
            Err(e) => bail!("agent never answered: {e}"),
        }
    }
    println!("agent answered {:?} after QEMU start", t0.elapsed());
    qga.ping().await?;
    let info = qga.info().await?;
    assert!(!info.version.is_empty());
    assert!(
        info.supported_commands
            .iter()
            .any(|c| c.name == "guest-exec" && c.enabled)
    );

    let out = qga
        .exec(
            "/bin/sh",
            &["-c", "echo out; echo err >&2; exit 3"],
            Duration::from_secs(30),
        )
        .await?;
    assert_eq!(out.exit_code, Some(3));
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    assert!(!out.success());
    let big = qga
        .exec(
            "/bin/sh",
            &["-c", "head -c 100000 /dev/zero | tr '\\0' x"],
            Duration::from_secs(30),
        )
        .await?;
    assert!(big.success());
    assert_eq!(big.stdout.len(), 100_000);

    // An agent error is typed and names the command.
    let err = qga
        .execute("guest-no-such-command", serde_json::Value::Null)
        .await
        .unwrap_err();
    assert!(matches!(err.kind, ErrorKind::Agent { .. }), "{err}");
    assert!(err.to_string().contains("guest-no-such-command"), "{err}");

    // A command that outlives its timeout fails clearly, and the next call
    // re-synchronises instead of reading a stale reply.
    let err = qga
        .exec("/bin/sleep", &["30"], Duration::from_millis(800))
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    let echo = qga
        .exec("/bin/echo", &["after"], Duration::from_secs(30))
        .await?;
    assert_eq!(echo.stdout, b"after\n");

    let t1 = Instant::now();
    qga.sync(Duration::from_secs(30)).await?;
    println!("re-sync on a new connection took {:?}", t1.elapsed());
    let pid = vm.pid();
    let how = vm.stop(Duration::from_secs(60)).await?;
    let log = std::fs::read_to_string(run.join("serial.log")).unwrap_or_default();
    let tail: String = log
        .lines()
        .rev()
        .take(15)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(how, StopOutcome::GuestAgent, "console ends with:\n{tail}");
    assert!(!common::alive(pid));
    for f in ["qmp.sock", "qga.sock", "qemu.pid"] {
        assert!(!run.join(f).exists(), "{f} left behind");
    }
    Ok(())
}
