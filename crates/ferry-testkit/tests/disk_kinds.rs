//! The guest's disk can be a qcow2 image or an NBD export (here served by
//! `qemu-nbd` over a unix socket; later issues use Ferry's NBD server).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ferry_testkit::{Disk, NbdServer, TestGuest, Workload, disk, registry};

const T: Duration = Duration::from_secs(60);

/// A `qemu-nbd` process, killed on drop.
struct QemuNbd(Child);

impl QemuNbd {
    fn serve(image: &Path, socket: &Path, export: &str) -> Result<QemuNbd> {
        let child = Command::new("qemu-nbd")
            .args(["--format=raw", "--persistent", "--cache=writeback"])
            .arg(format!("--export-name={export}"))
            .arg(format!("--socket={}", socket.display()))
            .arg(image)
            .stdout(Stdio::null())
            .spawn()
            .context("starting qemu-nbd")?;
        let nbd = QemuNbd(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if Instant::now() > deadline {
                bail!("qemu-nbd did not create {}", socket.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(nbd)
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn write_and_verify(name: &str, d: Disk) -> Result<u64> {
    let mut g = TestGuest::builder(name)
        .disk(d)
        .workload(Workload::Records {
            rate: 0.0,
            count: Some(30),
            size: 4096,
        })
        .start()
        .await?;
    println!(
        "{name}: boot time {:?}",
        g.boot_time().context("no boot time")?
    );
    let done = g.wait_event(|e| e.name == "write-done", T).await?;
    let out = g
        .exec(
            "/bin/ferry-guest",
            &["verify", "--file", "/mnt/data/records"],
            T,
        )
        .await?;
    ensure!(out.success(), "in-guest verify: {out:?}");
    g.shutdown(T).await?;
    done.u64("next_seq").context("next_seq")
}

#[tokio::test]
async fn boots_from_qcow2_and_from_an_nbd_export() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let raw = dir.path().join("data.raw");
    disk::make_ext4_disk(&raw, 64 << 20)?;

    // qcow2: convert the ext4 disk, write in the guest, convert back.
    let qcow2 = dir.path().join("data.qcow2");
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow2)
        .status()?;
    ensure!(st.success(), "qemu-img convert to qcow2");
    let n = write_and_verify("qcow2", Disk::Qcow2(qcow2.clone())).await?;
    let back = dir.path().join("back.raw");
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(&qcow2)
        .arg(&back)
        .status()?;
    ensure!(st.success(), "qemu-img convert to raw");
    let mut r = disk::verify_records_on_image(&back)?;
    r.expect_min_records(n);
    assert!(r.ok && r.records == 30, "{r:?}");

    // NBD: the raw disk exported by qemu-nbd on a unix socket.
    let socket = dir.path().join("nbd.sock");
    let nbd = QemuNbd::serve(&raw, &socket, "data")?;
    let n = write_and_verify(
        "nbd",
        Disk::Nbd {
            server: NbdServer::Unix(socket.clone()),
            export: "data".into(),
        },
    )
    .await?;
    drop(nbd);
    let mut r = disk::verify_records_on_image(&raw)?;
    r.expect_min_records(n);
    assert!(r.ok && r.records == 30, "{r:?}");

    registry::assert_no_leftovers()?;
    Ok(())
}
