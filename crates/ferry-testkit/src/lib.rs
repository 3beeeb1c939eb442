//! Ferry's test kit (dev-only): a real guest under QEMU for integration
//! tests.
//!
//! # What is on disk
//! - `<target>/ferry-testkit/guest-<hash>/{vmlinuz,initramfs.cpio.gz}`: the
//!   guest image ([`GuestImage`]), built once per cargo target directory
//!   from the installed Debian cloud kernel, busybox-static, the virtio
//!   modules, `qemu-ga` and the `ferry-guest` workload tool (built by cargo
//!   into `<target>/ferry-testkit/cargo`). A build goes to a private
//!   temporary directory renamed into place, so a crash or a concurrent
//!   build never leaves a half-built image under the final name.
//! - Per guest, a temporary run directory with the QMP and guest-agent
//!   sockets and the serial console log, removed when the guest is dropped.
//! - Test disks are ordinary files ([`disk`]); the guest mounts `/dev/vda`
//!   (ext4) at `/mnt/data` and the records workload writes
//!   `/mnt/data/records` (format: `ferry_guest::record`).
//!
//! # On the wire
//! The guest reports over its serial console, one `FERRY {json}` line per
//! event (`ready`, `mount`, `writer`, `record`, `verify`, `shutdown`, ...;
//! see `ferry_guest::event`); the kit tails the log ([`console`]).
//!
//! # What a crash can leave, and how it is recovered
//! QEMU runs as a `ferry_qemu::VmProcess` in the guest's run directory.
//! Dropping a [`TestGuest`] (also while a test panics) kills QEMU with
//! SIGKILL, reaps it, and removes the run directory with its sockets and
//! logs; the [`registry`] remembers every QEMU process and path of the
//! test process so a test can assert that nothing was left
//! ([`registry::assert_no_leftovers`]). A test process killed outright
//! (SIGKILL) cannot run `Drop`: its QEMU keeps running in its own process
//! group and its run directory (`$TMPDIR/ferry-guest-<name>-*`, holding an
//! `owner.pid` file) stays. [`registry::orphans`] reports such guests of
//! dead owners (every leftover check includes it) and
//! [`registry::reap_orphans`] kills and removes them. An interrupted image
//! build leaves only a `.guest-build-*` directory, pruned after an hour.
//!
//! The guest's own crash semantics are the point of the records workload:
//! every record acknowledged by the guest (a `record` event, printed after
//! `fdatasync` returned) must survive a reboot, a hard reset or a `kill -9`
//! of QEMU, and be verifiable in the guest (init verifies the file at every
//! boot before it appends) and on the host from the image
//! ([`disk::verify_records_on_image`]).
//!
//! # Using it
//! ```no_run
//! # async fn demo() -> ferry_testkit::Result<()> {
//! use ferry_testkit::{TestGuest, Workload, disk};
//! use std::time::Duration;
//! let image = std::path::Path::new("/tmp/data.raw");
//! disk::make_ext4_disk(image, 64 << 20)?;
//! let mut g = TestGuest::builder("t1")
//!     .raw_disk(image)
//!     .workload(Workload::records(50.0))
//!     .start()
//!     .await?;                                   // waits for `ready` + agent
//! println!("boot {:?}", g.boot_time());
//! let ev = g.wait_event(|e| e.name == "record", Duration::from_secs(30)).await?;
//! g.agent()?.ping().await.ok();
//! g.shutdown(Duration::from_secs(30)).await?;
//! let report = disk::verify_records_on_image(image)?;
//! # Ok(()) }
//! ```

pub mod config;
pub mod console;
pub mod disk;
pub mod error;
pub mod guest;
pub mod image;
pub mod registry;

pub use config::{Disk, GuestConfig, Workload, newer_qemu, newer_qemu_dir};
pub use error::{Error, ErrorKind, Result};
pub use ferry_qemu::{ExecOutput, NbdServer, QgaClient, QmpClient};
pub use guest::{GuestBuilder, TestGuest};
pub use image::GuestImage;
