//! Ferry's QEMU driver: VM definitions, QEMU processes, QMP, the guest
//! agent, block jobs and live migration.
//!
//! # Design
//!
//! **What is on disk.** Each running VM has a *run directory* (see
//! [`launch`]): `qmp.sock` and `qga.sock` (unix sockets QEMU listens on),
//! `qemu.pid` (written by QEMU), `serial.log`, `qemu.log` and `vm.json` (the
//! [`VmSpec`] it was started from). Nothing else is kept by this crate: the
//! state of a VM is QEMU's, asked for over QMP.
//!
//! **What is on the wire.** QMP is line-delimited JSON over `qmp.sock`:
//! a greeting, `qmp_capabilities`, then commands carrying a numeric `id`
//! and asynchronous events ([`qmp`]). The guest agent speaks id-less JSON
//! over the virtio-serial chardev, so every connection begins with the
//! `0xFF` + `guest-sync-delimited` handshake that discards stale bytes
//! ([`qga`]). Disks are `-blockdev` node pairs `<id>-pro` (nbd or file) under
//! `<id>-fmt` (raw or qcow2), used by a `virtio-blk-pci` device `<id>`;
//! NBD nodes get `reconnect-delay` and, from QEMU 7.0, `open-timeout`.
//!
//! **What a crash can leave, and how it is recovered.** If the managing
//! process dies, QEMU keeps running (its own process group, output to
//! `qemu.log`): [`VmProcess::find_running`] lists the run directories whose
//! pid is alive and whose command line names that directory's QMP socket,
//! and [`VmProcess::reattach`] reconnects. If QEMU dies, every QMP command in
//! flight fails with [`ErrorKind::Closed`] naming the command, and stale
//! sockets are removed on the next start in that directory. A
//! [`VmProcess`] kills its QEMU (SIGKILL), reaps it and removes its sockets
//! when dropped, also during a panic, unless [`VmProcess::detach`]ed. A
//! guest freeze is held by a [`FreezeGuard`] that thaws on drop, so an
//! error between freeze and thaw never leaves a frozen guest.
//!
//! # Using it (quick reference)
//!
//! ```no_run
//! # async fn demo() -> ferry_qemu::Result<()> {
//! use ferry_qemu::{Boot, LaunchOptions, VmProcess, VmSpec};
//! use std::time::Duration;
//! let mut spec = VmSpec::new("test-1");          // 1 vCPU, 256 MiB, accel kvm:tcg
//! spec.accel = "tcg".into();                      // tests here: TCG only
//! spec.guest_agent = true;
//! spec.boot = Boot::Kernel { kernel: "/k".into(), initrd: Some("/i".into()), cmdline: "console=ttyS0".into() };
//! let opts = LaunchOptions { extra_args: vec!["-cpu".into(), "max".into()], ..Default::default() };
//! let vm = VmProcess::start(&spec, "/tmp/run/test-1", opts).await?;
//! let status = vm.qmp().query_status().await?;     // typed
//! let raw = vm.qmp().execute("query-block", serde_json::Value::Null).await?; // any command
//! let mut events = vm.qmp().events();             // subscribe before acting
//! vm.pause().await?;
//! events.wait_for("STOP", |_| true, Duration::from_secs(5)).await?;
//! let qga = vm.qga()?;                             // guest agent client
//! qga.ping().await?;
//! let out = qga.exec("/bin/sh", &["-c", "echo hi"], Duration::from_secs(10)).await?;
//! let frozen = qga.freeze().await?;               // guard
//! frozen.thaw().await?;
//! drop(vm);                                        // QEMU killed, sockets removed
//! # Ok(()) }
//! ```
//!
//! Block jobs and migration (each module documents its steps and what a
//! crash leaves):
//!
//! ```no_run
//! # async fn demo(vm: &ferry_qemu::VmProcess, dest: &ferry_qemu::VmProcess) -> ferry_qemu::Result<()> {
//! use ferry_qemu::{block_graph, migration, overlay, NbdServer};
//! use std::time::Duration;
//! let t = Duration::from_secs(60);
//! let g = block_graph(vm.qmp()).await?;           // per disk: layers + NBD/file target
//! let base = &g.disk("vda")?.base().target;
//! let prepared = overlay::prepare(vm.qmp(), &["vda", "vdb"], "/var/lib/ovl".as_ref()).await?;
//! let snap = overlay::snapshot_frozen(prepared, Some(&vm.qga()?)).await?; // freeze, 1 transaction, thaw
//! println!("stun {:?}", snap.window);
//! snap.set.commit(t).await?;                      // active commit, pivot, overlays removed
//! let mut m = ferry_qemu::start_mirror(vm.qmp(), "vda", &NbdServer::Unix("/run/n.sock".into()), "vol").await?;
//! let mut progress = m.progress(Duration::from_millis(200)); // fraction never goes back
//! m.pivot(t, true).await?;                        // or m.cancel(t)
//! // dest started with LaunchOptions { incoming: Some("defer".into()), .. }
//! migration::listen(dest.qmp(), "unix:/run/mig.sock", false).await?;
//! let stats = migration::migrate(vm.qmp(), "unix:/run/mig.sock", &Default::default(), None).await?;
//! println!("{:?} ms total, {:?} ms downtime", stats.total_time_ms, stats.downtime_ms);
//! # Ok(()) }
//! ```
//!
//! Paths of a process: [`VmProcess::serial_log_path`],
//! [`VmProcess::qga_path`], [`VmProcess::run_dir`], [`VmProcess::pid`].
//! [`LaunchOptions`] carries the binary, `-incoming`, `-S` and raw extra
//! arguments.

pub mod block;
pub mod error;
pub mod jobs;
pub mod launch;
pub mod migration;
pub mod mirror;
pub mod overlay;
pub mod process;
pub mod qga;
pub mod qmp;
pub mod spec;

pub use block::{BlockGraph, BlockNode, BlockTarget, DiskChain, Layer, block_graph};
pub use error::{Error, ErrorKind, Result};
pub use jobs::{JobEnd, JobProgress, MonotonicProgress};
pub use launch::{LaunchOptions, RunPaths};
pub use migration::{MigrationParams, MigrationProgress, MigrationStats};
pub use mirror::{MirrorJob, start_mirror};
pub use overlay::{FrozenSnapshot, Overlay, OverlaySet, Prepared};
pub use process::{StopOutcome, VmProcess};
pub use qga::{ExecOutput, FreezeGuard, FreezeStatus, QgaClient};
pub use qmp::{EventStream, QemuVersion, QmpClient, QmpEvent, RunState, StatusInfo};
pub use spec::{Boot, DiskSource, DiskSpec, ImageFormat, NbdServer, VmSpec};
