//! Acceptance (issue 2): boot the guest from a raw disk made with
//! `mkfs.ext4`, write records with fsync, reboot (clean, then a hard
//! reset), verify every acknowledged record in the guest after each boot,
//! shut down and verify again on the host from the image.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ferry_testkit::{TestGuest, Workload, disk, registry};

const T: Duration = Duration::from_secs(60);

fn max_acked(g: &TestGuest) -> Option<u64> {
    g.events()
        .iter()
        .filter(|e| e.name == "record")
        .filter_map(|e| e.u64("seq"))
        .max()
}

#[tokio::test]
async fn records_survive_reboot_and_reset_and_verify_on_host() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("data.raw");
    disk::make_ext4_disk(&image, 64 << 20)?;

    let mut g = TestGuest::builder("records")
        .raw_disk(&image)
        .workload(Workload::records(50.0))
        .start()
        .await?;
    println!(
        "guest boot time: {:?} (guest kernel uptime at ready: {:?} ms)",
        g.boot_time().context("no boot time")?,
        g.guest_uptime_ms()
    );
    let w = g.wait_event(|e| e.name == "writer", T).await?;
    assert_eq!(w.u64("next_seq"), Some(0), "fresh disk: {w:?}");
    // About two seconds of records at 50/s.
    g.wait_event(|e| e.name == "record" && e.u64("seq") >= Some(99), T)
        .await?;

    for (round, hard) in [(1, false), (2, true)] {
        g.poll_events()?;
        let acked_before = max_acked(&g).context("no record acknowledged")?;
        let boot = if hard {
            g.reset().await?
        } else {
            g.reboot().await?
        };
        println!(
            "round {round}: {} boot time {boot:?} (guest kernel uptime at ready: {:?} ms)",
            if hard { "reset" } else { "reboot" },
            g.guest_uptime_ms()
        );
        // Whatever the writer acknowledged up to the reboot is in the log now.
        let acked = max_acked(&g).context("no record acknowledged")?;
        ensure!(acked >= acked_before);

        // init verifies the file before it starts the writer again.
        let v = g.wait_event(|e| e.name == "verify", T).await?;
        println!("round {round}: in-guest verify after boot: {:?}", v.fields);
        assert_eq!(v.bool("ok"), Some(true), "{v:?}");
        let records = v.u64("records").context("records")?;
        assert!(
            records > acked,
            "round {round}: {records} records survive but seq {acked} was acknowledged"
        );
        let w = g.wait_event(|e| e.name == "writer", T).await?;
        assert_eq!(
            w.u64("next_seq"),
            Some(records),
            "writer resumes after the last valid record"
        );
        g.wait_event(
            |e| e.name == "record" && e.u64("seq") >= Some(records + 20),
            T,
        )
        .await?;
    }

    // Verify through the guest agent as well (guest-exec).
    let out = g
        .exec(
            "/bin/ferry-guest",
            &["verify", "--file", "/mnt/data/records"],
            T,
        )
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.trim())
        .with_context(|| format!("guest-exec output {out:?}"))?;
    assert!(out.success(), "{out:?}");
    assert_eq!(report["ok"], true);

    g.shutdown(T).await?;
    g.poll_events()?;
    let acked = max_acked(&g).context("no record acknowledged")?;
    let mut host = disk::verify_records_on_image(&image)?;
    host.expect_min_records(acked + 1);
    println!(
        "host verify: {} records, last acknowledged seq {acked}, ok={}",
        host.records, host.ok
    );
    assert!(host.ok, "{:?}", host.errors);

    drop(g);
    registry::assert_no_leftovers()?;
    Ok(())
}
