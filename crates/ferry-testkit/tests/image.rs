//! The guest image: built once, holding what the guest needs.

use std::process::Command;

use anyhow::{Result, ensure};
use ferry_testkit::GuestImage;

#[tokio::test]
async fn image_holds_kernel_modules_agent_and_workload_tool() -> Result<()> {
    let image = GuestImage::get().await?;
    ensure!(
        image.kernel().is_file(),
        "no kernel at {}",
        image.kernel().display()
    );
    let again = GuestImage::get().await?;
    assert_eq!(image.dir(), again.dir());

    let list = Command::new("sh")
        .arg("-c")
        .arg("gzip -dc \"$1\" | cpio -t --quiet")
        .arg("list")
        .arg(image.initramfs())
        .output()?;
    ensure!(list.status.success(), "cpio -t failed: {list:?}");
    let entries = String::from_utf8(list.stdout)?;
    let has = |p: &str| entries.lines().any(|l| l == p);
    for p in [
        "init",
        "sbin/shutdown",
        "bin/busybox",
        "bin/sh",
        "bin/insmod",
        "bin/ferry-guest",
        "usr/bin/qemu-ga",
        "lib/modules/virtio_blk.ko",
        "lib/modules/virtio_console.ko",
        "lib64/ld-linux-x86-64.so.2",
        "lib/x86_64-linux-gnu/libglib-2.0.so.0",
    ] {
        assert!(has(p), "{p} missing from the initramfs");
    }
    for m in ferry_testkit::image::MODULES {
        assert!(has(&format!("lib/modules/{m}.ko")), "module {m} missing");
    }

    // The workload tool the guest runs works on the host too.
    let out = Command::new(image.guest_tool()).arg("--help").output()?;
    assert!(out.status.success());
    Ok(())
}
