//! Real QEMU (TCG, no guest image): QMP commands and events, process
//! lifecycle, cleanup on drop, re-attach, failure paths.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use ferry_qemu::{ErrorKind, LaunchOptions, RunState, VmProcess, VmSpec};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(20);

fn spec(name: &str) -> VmSpec {
    let mut s = VmSpec::new(name);
    s.accel = "tcg".into();
    s.memory_mib = 64;
    s
}

fn alive(pid: i32) -> bool {
    // A zombie has an empty cmdline; a reaped process has no /proc entry.
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
}

fn leftovers(dir: &Path) -> Vec<String> {
    ["qmp.sock", "qga.sock", "qemu.pid"]
        .iter()
        .filter(|f| dir.join(f).exists())
        .map(|f| f.to_string())
        .collect()
}

#[tokio::test]
async fn qmp_status_stop_cont_events_and_errors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let vm = VmProcess::start(
        &spec("qmp-1"),
        dir.path().join("run"),
        LaunchOptions::default(),
    )
    .await?;
    assert!(vm.version().major >= 7, "version {:?}", vm.version());
    let st = vm.status().await?;
    assert!(st.running);
    assert_eq!(st.status, RunState::Running);

    let mut events = vm.qmp().events();
    vm.pause().await?;
    let ev = events.wait_for("STOP", |_| true, T).await?;
    assert!(ev.timestamp_us > 0);
    let st = vm.status().await?;
    assert!(!st.running);
    assert_eq!(st.status, RunState::Paused);
    vm.resume().await?;
    events.wait_for("RESUME", |_| true, T).await?;
    assert!(vm.status().await?.running);

    // Raw escape hatch: the whole reply comes back.
    let raw = vm
        .qmp()
        .execute_raw(json!({"execute": "query-version"}), T)
        .await?;
    assert!(raw["return"]["qemu"]["major"].as_u64().is_some(), "{raw}");
    assert!(raw.get("id").is_some());

    // Errors from QEMU are typed and name the command.
    let err = vm
        .qmp()
        .execute("no-such-command", Value::Null)
        .await
        .unwrap_err();
    assert_eq!(err.qmp_class(), Some("CommandNotFound"), "{err}");
    assert!(err.to_string().contains("no-such-command"), "{err}");

    // Many commands in flight at once each get their own reply.
    let q = vm.qmp().clone();
    let replies = futures_like_join(
        (0..20)
            .map(|_| {
                let q = q.clone();
                tokio::spawn(async move { q.execute("query-name", Value::Null).await })
            })
            .collect(),
    )
    .await;
    for r in replies {
        assert_eq!(r?["name"], json!("qmp-1"));
    }
    let names = vm.qmp().command_names().await?;
    assert!(names.iter().any(|n| n == "blockdev-mirror"));
    Ok(())
}

async fn futures_like_join<T>(handles: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task panicked"));
    }
    out
}

#[tokio::test]
async fn drop_kills_qemu_and_removes_sockets_even_on_panic() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let run = dir.path().join("run");
    let vm = VmProcess::start(&spec("drop-1"), &run, LaunchOptions::default()).await?;
    let pid = vm.pid();
    assert!(alive(pid));
    assert_eq!(leftovers(&run), vec!["qmp.sock", "qemu.pid"]);
    drop(vm);
    assert!(!alive(pid), "QEMU {pid} survived the drop");
    assert!(leftovers(&run).is_empty(), "{:?}", leftovers(&run));
    assert!(run.join("qemu.log").exists() && run.join("vm.json").exists());

    // A task that panics while owning the VM still kills it.
    let run2 = dir.path().join("run2");
    let (tx, rx) = tokio::sync::oneshot::channel();
    let r2 = run2.clone();
    let task = tokio::spawn(async move {
        let mut s = spec("drop-2");
        s.guest_agent = true;
        let vm = VmProcess::start(&s, &r2, LaunchOptions::default())
            .await
            .expect("start");
        tx.send(vm.pid()).expect("send");
        panic!("test panic while owning a VM");
    });
    let pid2 = rx.await?;
    assert!(task.await.unwrap_err().is_panic());
    assert!(!alive(pid2), "QEMU {pid2} survived a panic");
    assert!(leftovers(&run2).is_empty(), "{:?}", leftovers(&run2));
    Ok(())
}

#[tokio::test]
async fn qemu_killed_fails_commands_with_a_clear_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let run = dir.path().join("run");
    let lo = LaunchOptions {
        paused: true,
        ..Default::default()
    };
    let mut vm = VmProcess::start(&spec("crash-1"), &run, lo).await?;
    let mut events = vm.qmp().events();
    // SAFETY: kill(2) on the pid of the QEMU this test just started.
    assert_eq!(unsafe { libc::kill(vm.pid(), libc::SIGKILL) }, 0);
    let err = vm
        .qmp()
        .execute("query-status", Value::Null)
        .await
        .unwrap_err();
    assert!(matches!(err.kind, ErrorKind::Closed), "{err}");
    assert!(err.to_string().contains("query-status"), "{err}");
    let err = events.next().await.unwrap_err();
    assert!(err.is_closed(), "{err}");
    assert!(vm.wait_exit(T).await);
    assert!(leftovers(&run).is_empty(), "{:?}", leftovers(&run));
    Ok(())
}

#[tokio::test]
async fn detach_then_reattach_finds_the_running_qemu() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let parent = dir.path().join("vms");
    let run = parent.join("vm-a");
    let lo = LaunchOptions {
        paused: true,
        ..Default::default()
    };
    let vm = VmProcess::start(&spec("reattach-1"), &run, lo).await?;
    let pid = vm.pid();
    let detached = vm.detach();
    assert!(alive(pid), "detach must leave QEMU running");
    assert_eq!(VmProcess::find_running(&parent)?, vec![detached.clone()]);

    let mut vm = VmProcess::reattach(&detached, T).await?;
    assert_eq!(vm.pid(), pid);
    assert_eq!(vm.spec().name, "reattach-1");
    assert_eq!(vm.status().await?.status, RunState::PreLaunch);
    vm.resume().await?;
    assert!(vm.status().await?.running);
    vm.kill()?;
    assert!(!alive(pid));
    assert!(VmProcess::find_running(&parent)?.is_empty());
    assert!(leftovers(&run).is_empty());
    // Nothing left to re-attach to.
    let err = VmProcess::reattach(&run, T).await.unwrap_err();
    assert!(matches!(err.kind, ErrorKind::NotFound(_)), "{err}");
    Ok(())
}

#[tokio::test]
async fn a_bad_command_line_fails_with_qemus_message_and_leaves_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let run = dir.path().join("run");
    let lo = LaunchOptions {
        extra_args: vec!["-no-such-option".into()],
        ..Default::default()
    };
    let err = VmProcess::start(&spec("bad-1"), &run, lo)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err.kind, ErrorKind::Process(_)), "{text}");
    assert!(
        text.contains("no-such-option") && text.contains("bad-1"),
        "{text}"
    );
    assert!(leftovers(&run).is_empty());
    Ok(())
}

#[tokio::test]
async fn absent_guest_agent_times_out_clearly_and_stop_falls_back() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let run = dir.path().join("run");
    let mut s = spec("noagent-1");
    s.guest_agent = true;
    let mut vm = VmProcess::start(&s, &run, LaunchOptions::default()).await?;
    let qga = vm.qga()?.with_timeout(Duration::from_millis(500));
    let err = qga.ping().await.unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert!(err.to_string().contains("guest-sync-delimited"), "{err}");
    let err = match qga.freeze().await {
        Ok(_) => panic!("a freeze without an agent succeeded"),
        Err(e) => e,
    };
    assert!(err.is_timeout(), "{err}");
    // No guest: neither the agent nor ACPI can stop it, so it is killed.
    let pid = vm.pid();
    let how = vm.stop(Duration::from_secs(2)).await?;
    assert_eq!(how, ferry_qemu::StopOutcome::Killed);
    assert!(!alive(pid));
    assert!(leftovers(&run).is_empty(), "{:?}", leftovers(&run));
    Ok(())
}
