//! Acceptance (issue 2): guest-agent ping, and `guest-fsfreeze-freeze`
//! really holds a writer in the guest until the thaw.

use std::time::Duration;

use anyhow::{Context, Result};
use ferry_qemu::FreezeStatus;
use ferry_testkit::{TestGuest, Workload, disk, registry};

const T: Duration = Duration::from_secs(60);

fn records_after(g: &TestGuest, from: usize) -> Vec<u64> {
    g.events()[from..]
        .iter()
        .filter(|e| e.name == "record")
        .filter_map(|e| e.u64("seq"))
        .collect()
}

#[tokio::test]
async fn freeze_holds_the_writer_until_thaw() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("data.raw");
    disk::make_ext4_disk(&image, 64 << 20)?;
    let mut g = TestGuest::builder("freeze")
        .raw_disk(&image)
        .workload(Workload::records(20.0))
        .start()
        .await?;
    println!(
        "guest boot time: {:?}",
        g.boot_time().context("no boot time")?
    );

    let agent = g.agent()?.clone();
    agent.ping().await?;
    assert_eq!(agent.fsfreeze_status().await?, FreezeStatus::Thawed);
    g.wait_event(|e| e.name == "record" && e.u64("seq") >= Some(10), T)
        .await?;

    let frozen = agent.freeze().await?;
    assert!(frozen.count() >= 1, "froze {} filesystems", frozen.count());
    assert_eq!(agent.fsfreeze_status().await?, FreezeStatus::Frozen);
    let at_freeze = g.poll_events()?.len();

    // Let events of records acknowledged before the freeze returned reach
    // the console log (the serial line lags the writer a little).
    tokio::time::sleep(Duration::from_millis(1000)).await;
    g.poll_events()?;
    let settled = g.events().len();
    let straggling = records_after(&g, at_freeze);
    let last_before = records_after(&g, 0)
        .into_iter()
        .max()
        .context("no records")?;
    assert!(straggling.len() <= 2, "writer not held: {straggling:?}");

    // At 20 records/s a free writer would acknowledge ~30 records in this
    // window; a held one none.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    g.poll_events()?;
    let during = records_after(&g, settled);
    println!(
        "records acknowledged while frozen: {during:?} (last before: {last_before}, \
         straggling events right after the freeze: {straggling:?})"
    );
    assert!(during.is_empty(), "writer not held: {during:?}");
    assert_eq!(agent.fsfreeze_status().await?, FreezeStatus::Frozen);

    // The writer is alive and blocked, not dead: it resumes after the thaw.
    let thawed = frozen.thaw().await?;
    assert!(thawed >= 1, "thawed {thawed} filesystems");
    assert_eq!(agent.fsfreeze_status().await?, FreezeStatus::Thawed);
    let target = last_before + 5;
    g.wait_event(|e| e.name == "record" && e.u64("seq") >= Some(target), T)
        .await?;
    let seqs = records_after(&g, 0);
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "record events are not contiguous: {seqs:?}"
    );

    g.shutdown(T).await?;
    g.poll_events()?;
    let acked = records_after(&g, 0)
        .into_iter()
        .max()
        .context("no records")?;
    let mut host = disk::verify_records_on_image(&image)?;
    host.expect_min_records(acked + 1);
    assert!(host.ok, "{:?}", host.errors);
    drop(g);
    registry::assert_no_leftovers()?;
    Ok(())
}
