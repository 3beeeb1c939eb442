//! Boots the test guest on a fresh ext4 disk, lets it write records for a
//! few seconds, prints its events and boot time, shuts it down and verifies
//! the records on the host.
//!
//! `cargo run -p ferry-testkit --example boot [-- SECONDS]`

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use ferry_testkit::{GuestImage, TestGuest, Workload, disk, registry};

#[tokio::main]
async fn main() -> Result<()> {
    let seconds: f64 = match std::env::args().nth(1) {
        Some(s) => s.parse().context("SECONDS must be a number")?,
        None => 3.0,
    };
    let t = Instant::now();
    let image = GuestImage::get().await?;
    println!(
        "guest image: kernel {} + initramfs in {} ({:.1}s)",
        image.kernel_version(),
        image.dir().display(),
        t.elapsed().as_secs_f64()
    );

    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data.raw");
    disk::make_ext4_disk(&data, 64 << 20)?;
    println!("disk: {} (64 MiB, mkfs.ext4)", data.display());

    let mut g = TestGuest::builder("demo")
        .raw_disk(&data)
        .workload(Workload::records(25.0))
        .start()
        .await?;
    println!(
        "booted under {}: boot time {:.2}s (guest kernel uptime at ready {} ms)",
        g.config().accel,
        g.boot_time().context("no boot time")?.as_secs_f64(),
        g.guest_uptime_ms().unwrap_or(0)
    );
    let info = g.agent()?.info().await?;
    println!("guest agent {} answers", info.version);

    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let mut shown = 0;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let events = g.poll_events()?;
        let mut seqs = Vec::new();
        for e in &events[shown..] {
            match e.u64("seq") {
                Some(seq) if e.name == "record" => seqs.push(seq),
                _ => println!("  event {}", serde_json::Value::Object(e.fields.clone())),
            }
        }
        if let (Some(first), Some(last)) = (seqs.first(), seqs.last()) {
            println!("  event record: seq {first}..={last} acknowledged (fsync returned)");
        }
        shown = events.len();
    }
    let t = Instant::now();
    g.shutdown(Duration::from_secs(60)).await?;
    println!("guest shut down in {:.2}s", t.elapsed().as_secs_f64());
    let acked = g
        .poll_events()?
        .iter()
        .filter(|e| e.name == "record")
        .filter_map(|e| e.u64("seq"))
        .max()
        .context("the guest acknowledged no record")?;
    println!("last acknowledged record: seq {acked}");

    let mut report = disk::verify_records_on_image(&data)?;
    report.expect_min_records(acked + 1);
    println!(
        "host verification of {}: ok={} records={} last_seq={:?} torn_tail_bytes={}",
        data.display(),
        report.ok,
        report.records,
        report.last_seq,
        report.torn_tail_bytes
    );
    ensure!(report.ok, "verification failed: {:?}", report.errors);
    drop(g);
    registry::assert_no_leftovers()?;
    println!("no QEMU process or socket left");
    Ok(())
}
