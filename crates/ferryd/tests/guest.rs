//! The whole guest I/O path: a QEMU guest (test kit, TCG) boots with its
//! data disk on a pool volume served by ferryd's NBD server, writes
//! verifiable records with fsync, and every acknowledged record is on the
//! volume afterwards — in the guest, and on the host through a snapshot
//! export read by qemu-img.

mod common;

use std::process::Command;
use std::time::Duration;

use common::Host;
use ferry_testkit::{Disk, NbdServer, TestGuest, Workload, disk, registry};
use serde_json::json;

const T: Duration = Duration::from_secs(90);

#[tokio::test]
async fn guest_writes_records_to_a_pool_volume_over_nbd() -> anyhow::Result<()> {
    let h = Host::new();
    // An ext4 disk image, imported as a volume.
    let raw = h.dir.path().join("data.raw");
    disk::make_ext4_disk(&raw, 64 << 20)?;
    let (s, started) = h
        .post("/v1/volumes/data/import", json!({ "path": raw }))
        .await;
    assert_eq!(s, 202, "{started}");
    let op = h.wait_op(started["operation"].as_str().unwrap()).await;
    assert_eq!(op["state"], "succeeded", "{op}");
    let (s, e) = h.post("/v1/exports", json!({ "volume": "data" })).await;
    assert_eq!(s, 201, "{e}");

    let mut g = TestGuest::builder("on-pool")
        .disk(Disk::Nbd {
            server: NbdServer::Unix(h.data().join("run/nbd.sock")),
            export: "data".into(),
        })
        .workload(Workload::Records {
            rate: 0.0,
            count: Some(40),
            size: 4096,
        })
        .start()
        .await?;
    println!("guest on a pool volume booted in {:?}", g.boot_time());
    let done = g.wait_event(|e| e.name == "write-done", T).await?;
    let acked = done.u64("next_seq").unwrap_or(0);
    assert!(acked >= 40, "{done:?}");
    let out = g
        .exec(
            "/bin/ferry-guest",
            &["verify", "--file", "/mnt/data/records"],
            T,
        )
        .await?;
    assert!(out.success(), "in-guest verify: {out:?}");
    g.shutdown(T).await?;
    drop(g);

    // On the host: snapshot the volume, read the snapshot over NBD into a
    // raw file, verify every record.
    let (s, _) = h
        .post(
            "/v1/snapshots",
            json!({ "name": "after", "volumes": ["data"] }),
        )
        .await;
    assert_eq!(s, 201);
    let (s, e) = h.post("/v1/exports", json!({ "snapshot": "after" })).await;
    assert_eq!(s, 201, "{e}");
    let copy = h.dir.path().join("copy.raw");
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(e["unix_uri"].as_str().unwrap())
        .arg(&copy)
        .status()?;
    assert!(st.success());
    let report = disk::verify_records_on_image(&copy)?;
    assert!(report.ok, "{report:?}");
    assert!(report.records >= acked, "{report:?} < {acked} acknowledged");
    registry::assert_no_leftovers()?;
    Ok(())
}
