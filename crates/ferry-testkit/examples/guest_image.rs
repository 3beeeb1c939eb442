//! Builds the test guest image (once per target directory) and prints its
//! files as shell assignments, for scripts that define VMs with it:
//! `eval "$(guest_image)"` sets `KERNEL`, `INITRD` and `GUEST_TOOL`.

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let img = ferry_testkit::GuestImage::get().await?;
    println!("KERNEL='{}'", img.kernel().display());
    println!("INITRD='{}'", img.initramfs().display());
    println!("GUEST_TOOL='{}'", img.guest_tool().display());
    Ok(())
}
