//! A test process killed outright (SIGKILL) cannot drop its guests: the kit
//! detects what it left (`registry::orphans`) and can reap it.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ferry_testkit::{TestGuest, registry};

const CHILD_ENV: &str = "FERRY_KIT_ORPHAN_CHILD";

/// Not a test on its own: the body the child process runs when
/// `FERRY_KIT_ORPHAN_CHILD` is set (start a guest, report, wait to be
/// killed); without the variable it returns at once.
#[tokio::test]
async fn child_process_body() -> Result<()> {
    if std::env::var_os(CHILD_ENV).is_none() {
        return Ok(());
    }
    let g = TestGuest::builder("orphan").agent(false).spawn().await?;
    println!(
        "STARTED {} {}",
        g.pid().context("pid")?,
        g.run_dir().display()
    );
    tokio::time::sleep(Duration::from_secs(600)).await;
    Ok(())
}

#[test]
fn a_killed_test_process_leaves_an_orphan_the_kit_reports_and_reaps() -> Result<()> {
    let mut child = Command::new(std::env::current_exe()?)
        .args([
            "child_process_body",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut line = String::new();
    let mut reader = BufReader::new(stdout);
    let (qemu, run_dir) = loop {
        line.clear();
        ensure!(
            reader.read_line(&mut line)? > 0,
            "child exited before starting a guest"
        );
        // The harness prints `test child_process_body ... ` before it.
        if let Some(at) = line.find("STARTED ") {
            let rest = line[at + "STARTED ".len()..].trim();
            let (pid, dir) = rest.split_once(' ').context("STARTED line")?;
            break (pid.parse::<u32>()?, std::path::PathBuf::from(dir));
        }
    };
    child.kill()?;
    child.wait()?;

    ensure!(
        registry::qemu_alive(qemu),
        "QEMU {qemu} died with its test process"
    );
    let orphans = registry::orphans();
    ensure!(
        orphans.iter().any(|o| o.contains(&format!("QEMU {qemu}")) && o.contains(&*run_dir.to_string_lossy())),
        "orphan not reported: {orphans:?}"
    );
    let reaped = registry::reap_orphan(&run_dir);
    ensure!(
        !registry::qemu_alive(qemu),
        "QEMU {qemu} survived reaping: {reaped:?}"
    );
    ensure!(!run_dir.exists(), "{} survived reaping", run_dir.display());
    let left = registry::orphans();
    ensure!(
        !left.iter().any(|o| o.contains(&*run_dir.to_string_lossy())),
        "still reported: {left:?}"
    );
    Ok(())
}
