//! Records acknowledged by the guest survive `kill -9` of QEMU: verified on
//! the host from the image (the ext4 journal is replayed on a copy), then in
//! the guest booted again from the same disk.

use std::time::Duration;

use anyhow::{Context, Result};
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
async fn acknowledged_records_survive_kill_9_of_qemu() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("data.raw");
    disk::make_ext4_disk(&image, 64 << 20)?;
    let before = std::fs::read(&image)?.len();

    let mut g = TestGuest::builder("kill9")
        .raw_disk(&image)
        .agent(false)
        .workload(Workload::records(0.0))
        .start()
        .await?;
    println!(
        "guest boot time: {:?}",
        g.boot_time().context("no boot time")?
    );
    g.wait_event(|e| e.name == "record" && e.u64("seq") >= Some(200), T)
        .await?;
    g.kill()?;
    g.poll_events()?;
    let acked = max_acked(&g).context("no record acknowledged")?;
    drop(g);

    let mut host = disk::verify_records_on_image(&image)?;
    host.expect_min_records(acked + 1);
    println!(
        "after kill -9: {} records on the image, {} acknowledged, torn tail {} bytes",
        host.records,
        acked + 1,
        host.torn_tail_bytes
    );
    assert!(host.ok, "{:?}", host.errors);
    assert_eq!(
        std::fs::read(&image)?.len(),
        before,
        "host verification changed the image size"
    );

    // The guest replays its journal, verifies and continues the sequence.
    let mut g = TestGuest::builder("kill9-again")
        .raw_disk(&image)
        .agent(false)
        .workload(Workload::Records {
            rate: 0.0,
            count: Some(10),
            size: 512,
        })
        .start()
        .await?;
    let v = g.wait_event(|e| e.name == "verify", T).await?;
    assert_eq!(v.bool("ok"), Some(true), "{v:?}");
    assert!(v.u64("records") > Some(acked), "{v:?}");
    let done = g.wait_event(|e| e.name == "write-done", T).await?;
    assert_eq!(done.u64("next_seq"), Some(v.u64("records").unwrap() + 10));
    drop(g);
    registry::assert_no_leftovers()?;
    Ok(())
}
