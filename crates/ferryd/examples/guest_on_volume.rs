//! Boots the test guest with its data disk on a volume that a running
//! ferryd exports over NBD, lets it write verifiable records for a few
//! seconds, shuts it down cleanly and verifies the records in the guest.
//! Used by `make demo`.
//!
//! `guest_on_volume SOCKET EXPORT [SECONDS]`

use std::time::Duration;

use anyhow::{Context, ensure};
use ferry_testkit::{Disk, NbdServer, TestGuest, Workload};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let socket = args
        .next()
        .context("usage: guest_on_volume SOCKET EXPORT [SECONDS]")?;
    let export = args
        .next()
        .context("usage: guest_on_volume SOCKET EXPORT [SECONDS]")?;
    let seconds: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(3);
    let t = Duration::from_secs(120);
    let mut g = TestGuest::builder("demo-on-volume")
        .disk(Disk::Nbd {
            server: NbdServer::Unix(socket.into()),
            export: export.clone(),
        })
        .workload(Workload::records(25.0))
        .start()
        .await?;
    println!(
        "guest booted from export {export} (pool volume over NBD) in {:.1}s",
        g.boot_time().context("no boot time")?.as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let events = g.poll_events()?;
    let last = events
        .iter()
        .filter(|e| e.name == "record")
        .filter_map(|e| e.u64("seq"))
        .max();
    println!("records acknowledged (fsync returned) up to seq {last:?}");
    let out = g
        .exec(
            "/bin/ferry-guest",
            &["verify", "--file", "/mnt/data/records"],
            t,
        )
        .await?;
    ensure!(out.success(), "in-guest verify failed: {out:?}");
    println!(
        "in-guest verify: {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    g.shutdown(t).await?;
    println!("guest shut down; its writes are on the volume");
    Ok(())
}
