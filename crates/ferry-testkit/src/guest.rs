//! A test guest: QEMU running the kit's image, its console events, its
//! guest agent and QMP, and a `Drop` that always kills it and removes its
//! files.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_guest::event::Event;
use ferry_qemu::{ExecOutput, LaunchOptions, QgaClient, QmpClient, VmProcess};
use serde_json::Value;

use crate::config::{Disk, GuestConfig, Workload};
use crate::console::Console;
use crate::error::{Error, ErrorKind, Result};
use crate::image::GuestImage;
use crate::registry;

/// How often the console log is polled while waiting.
const POLL: Duration = Duration::from_millis(25);

/// Builds a [`TestGuest`]; see [`GuestConfig`] for the defaults.
#[derive(Debug, Clone)]
pub struct GuestBuilder {
    config: GuestConfig,
}

impl GuestBuilder {
    /// Adds a disk (the first is `/dev/vda`).
    pub fn disk(mut self, disk: Disk) -> Self {
        self.config.disks.push(disk);
        self
    }

    /// Adds a local raw disk image.
    pub fn raw_disk(self, path: impl Into<PathBuf>) -> Self {
        self.disk(Disk::Raw(path.into()))
    }

    /// Memory in MiB.
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.config.memory_mib = mib;
        self
    }

    /// Number of virtual CPUs.
    pub fn vcpus(mut self, n: u32) -> Self {
        self.config.vcpus = n;
        self
    }

    /// QEMU accelerator (overrides `$FERRY_TEST_ACCEL`).
    pub fn accel(mut self, accel: &str) -> Self {
        self.config.accel = accel.to_owned();
        self
    }

    /// The QEMU binary (overrides `$FERRY_TEST_QEMU`).
    pub fn qemu_binary(mut self, binary: impl Into<PathBuf>) -> Self {
        self.config.qemu_binary = binary.into();
        self
    }

    /// QEMU machine type (`q35`, `pc`).
    pub fn machine(mut self, machine: &str) -> Self {
        self.config.machine = Some(machine.to_owned());
        self
    }

    /// Guest agent on or off.
    pub fn agent(mut self, on: bool) -> Self {
        self.config.agent = on;
        self
    }

    /// The device mounted at `/mnt/data` (`none` to mount nothing).
    pub fn mount(mut self, device: &str) -> Self {
        self.config.mount = Some(device.to_owned());
        self
    }

    /// What the guest runs once ready.
    pub fn workload(mut self, w: Workload) -> Self {
        self.config.workload = w;
        self
    }

    /// An extra kernel command-line argument.
    pub fn cmdline(mut self, arg: &str) -> Self {
        self.config.cmdline.push(arg.to_owned());
        self
    }

    /// Start as a migration destination (`-incoming URI`): use
    /// [`spawn`](Self::spawn), not `start`.
    pub fn incoming(mut self, uri: &str) -> Self {
        self.config.incoming = Some(uri.to_owned());
        self
    }

    /// Extra QEMU arguments.
    pub fn qemu_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config
            .qemu_args
            .extend(args.into_iter().map(Into::into));
        self
    }

    /// How long [`start`](Self::start) waits for the guest to be ready.
    pub fn ready_timeout(mut self, t: Duration) -> Self {
        self.config.ready_timeout = t;
        self
    }

    /// The configuration built so far.
    pub fn config(&self) -> &GuestConfig {
        &self.config
    }

    /// Starts QEMU without waiting for the guest (e.g. an `-incoming`
    /// destination); wait with [`TestGuest::wait_ready`].
    pub async fn spawn(self) -> Result<TestGuest> {
        TestGuest::spawn(self.config).await
    }

    /// Starts QEMU and waits until the guest is ready (and its agent
    /// answers, when it has one).
    pub async fn start(self) -> Result<TestGuest> {
        let timeout = self.config.ready_timeout;
        let mut g = TestGuest::spawn(self.config).await?;
        g.wait_ready(timeout).await?;
        Ok(g)
    }
}

/// A running test guest.
#[derive(Debug)]
pub struct TestGuest {
    config: GuestConfig,
    image: GuestImage,
    vm: Option<VmProcess>,
    qga: Option<QgaClient>,
    run_dir: Option<tempfile::TempDir>,
    run_path: PathBuf,
    console: Console,
    cursor: usize,
    registry_id: u64,
    spawned_at: Instant,
    boot_time: Option<Duration>,
    uptime_ms: Option<u64>,
}

impl TestGuest {
    /// A builder with the defaults of [`GuestConfig::new`].
    pub fn builder(name: &str) -> GuestBuilder {
        GuestBuilder {
            config: GuestConfig::new(name),
        }
    }

    async fn spawn(config: GuestConfig) -> Result<TestGuest> {
        let image = GuestImage::get().await?;
        let spec = config.to_spec(&image.kernel(), &image.initramfs())?;
        let run_dir = tempfile::Builder::new()
            .prefix(&format!("{}{}-", registry::RUN_DIR_PREFIX, config.name))
            .tempdir()
            .map_err(|e| {
                Error::io(
                    "creating a run directory for guest",
                    Path::new(&config.name),
                    e,
                )
            })?;
        let run_path = run_dir.path().to_owned();
        let owner = run_path.join(registry::OWNER_FILE);
        std::fs::write(&owner, std::process::id().to_string())
            .map_err(|e| Error::io("writing", &owner, e))?;
        let registry_id = registry::register(&config.name, vec![run_path.clone()]);
        let opts = LaunchOptions {
            binary: config.qemu_binary.clone(),
            incoming: config.incoming.clone(),
            extra_args: config.qemu_args.clone(),
            ..LaunchOptions::default()
        };
        let spawned_at = Instant::now();
        let vm = VmProcess::start(&spec, &run_path, opts)
            .await
            .map_err(|e| {
                Error::with_source(
                    ErrorKind::Qemu,
                    format!("guest {}: starting QEMU", config.name),
                    e,
                )
            })?;
        registry::set_pid(registry_id, vm.pid() as u32);
        for p in [vm.paths().qmp.clone(), vm.paths().qga.clone()] {
            registry::add_path(registry_id, &p);
        }
        let qga = match config.agent {
            true => Some(
                vm.qga()
                    .map_err(|e| qemu_error(&config.name, "guest agent", e))?,
            ),
            false => None,
        };
        Ok(TestGuest {
            console: Console::new(vm.serial_log_path()),
            config,
            image,
            vm: Some(vm),
            qga,
            run_dir: Some(run_dir),
            run_path,
            cursor: 0,
            registry_id,
            spawned_at,
            boot_time: None,
            uptime_ms: None,
        })
    }

    /// The guest's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The configuration it was started with.
    pub fn config(&self) -> &GuestConfig {
        &self.config
    }

    /// The image it boots.
    pub fn image(&self) -> &GuestImage {
        &self.image
    }

    /// The run directory (sockets, console log).
    pub fn run_dir(&self) -> &Path {
        &self.run_path
    }

    /// The console log file.
    pub fn console_log(&self) -> &Path {
        self.console.path()
    }

    /// QEMU's process id.
    pub fn pid(&self) -> Option<u32> {
        self.vm.as_ref().map(|v| v.pid() as u32)
    }

    /// Host time from starting QEMU (or the last reboot) to the ready event.
    pub fn boot_time(&self) -> Option<Duration> {
        self.boot_time
    }

    /// The guest kernel's uptime when it reported ready.
    pub fn guest_uptime_ms(&self) -> Option<u64> {
        self.uptime_ms
    }

    /// Reads new console output; fails if the guest hit a fatal error.
    pub fn poll_events(&mut self) -> Result<&[Event]> {
        self.console.poll()?;
        if let Some(line) = self.console.fatal() {
            let line = line.to_owned();
            return Err(self
                .console
                .guest_failed(&self.config.name, &format!("fatal: {line}")));
        }
        Ok(self.console.events())
    }

    /// Every event the guest reported so far.
    pub fn events(&self) -> &[Event] {
        self.console.events()
    }

    /// Moves the cursor past every event read so far: the next
    /// [`wait_event`](Self::wait_event) only sees newer ones.
    pub fn skip_events(&mut self) -> Result<()> {
        self.poll_events()?;
        self.cursor = self.console.events().len();
        Ok(())
    }

    /// Waits for the next event (after the cursor) that `pred` accepts and
    /// moves the cursor past it.
    pub async fn wait_event(
        &mut self,
        mut pred: impl FnMut(&Event) -> bool,
        timeout: Duration,
    ) -> Result<Event> {
        let deadline = Instant::now() + timeout;
        loop {
            self.poll_events()?;
            if let Some(i) = self.console.find(self.cursor, &mut pred) {
                self.cursor = i + 1;
                return Ok(self.console.events()[i].clone());
            }
            if let Some(vm) = self.vm.as_mut()
                && vm.has_exited()
            {
                let log = vm.qemu_log_path().display().to_string();
                self.console.poll()?;
                return Err(self.console.guest_failed(
                    &self.config.name,
                    &format!("QEMU exited while waiting for an event (QEMU log {log})"),
                ));
            }
            if Instant::now() >= deadline {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "guest {}: no matching event within {timeout:?}; console log {} ends with:\n{}",
                        self.config.name,
                        self.console.path().display(),
                        self.console.excerpt(20)
                    ),
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits for the next `ready` event, then (with an agent) until the
    /// agent answers; returns and records the boot time.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<Duration> {
        let ev = self.wait_event(|e| e.name == "ready", timeout).await?;
        let boot = self.spawned_at.elapsed();
        self.boot_time = Some(boot);
        self.uptime_ms = ev.u64("uptime_ms");
        if let Some(qga) = &self.qga {
            // The agent starts just before the ready line; a request sent
            // before it listens is lost, so retry the handshake.
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match qga.sync(Duration::from_secs(2)).await {
                    Ok(()) => break,
                    Err(e) if Instant::now() >= deadline => {
                        return Err(qemu_error(
                            &self.config.name,
                            "ready but its agent does not answer",
                            e,
                        ));
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
        tracing::info!(guest = %self.config.name, ?boot, uptime_ms = ?self.uptime_ms, "guest ready");
        Ok(boot)
    }

    fn vm_ref(&self) -> Result<&VmProcess> {
        self.vm.as_ref().ok_or_else(|| {
            Error::new(
                ErrorKind::Qemu,
                format!("guest {}: QEMU is not running", self.config.name),
            )
        })
    }

    /// The QEMU process.
    pub fn process(&self) -> Result<&VmProcess> {
        self.vm_ref()
    }

    /// The QMP client.
    pub fn qmp(&self) -> Result<&QmpClient> {
        Ok(self.vm_ref()?.qmp())
    }

    /// The guest-agent client (an error if the guest has no agent).
    pub fn agent(&self) -> Result<&QgaClient> {
        self.qga.as_ref().ok_or_else(|| {
            Error::new(
                ErrorKind::Agent,
                format!("guest {}: started without a guest agent", self.config.name),
            )
        })
    }

    /// Runs `path args...` in the guest (guest-exec) and waits for it.
    pub async fn exec(&self, path: &str, args: &[&str], timeout: Duration) -> Result<ExecOutput> {
        self.agent()?
            .exec(path, args, timeout)
            .await
            .map_err(|e| qemu_error(&self.config.name, &format!("running {path} {args:?}"), e))
    }

    async fn qmp_run(&self, command: &str) -> Result<Value> {
        self.qmp()?
            .execute(command, Value::Null)
            .await
            .map_err(|e| qemu_error(&self.config.name, &format!("QMP {command}"), e))
    }

    /// Reboots the guest (through the agent, which syncs first; without an
    /// agent, a QMP `system_reset`) and waits until it is ready again.
    pub async fn reboot(&mut self) -> Result<Duration> {
        self.skip_events()?;
        match &self.qga {
            Some(qga) => qga
                .shutdown("reboot")
                .await
                .map_err(|e| qemu_error(&self.config.name, "agent reboot", e))?,
            None => {
                self.qmp_run("system_reset").await?;
            }
        }
        self.spawned_at = Instant::now();
        self.wait_ready(self.config.ready_timeout).await
    }

    /// Resets the virtual machine (QMP `system_reset`: no sync, like a
    /// power cycle) and waits until the guest is ready again.
    pub async fn reset(&mut self) -> Result<Duration> {
        self.skip_events()?;
        self.qmp_run("system_reset").await?;
        self.spawned_at = Instant::now();
        self.wait_ready(self.config.ready_timeout).await
    }

    /// Shuts the guest down cleanly (agent `guest-shutdown`: the writer is
    /// stopped and the data filesystem unmounted) and waits for QEMU to
    /// exit; without an agent, QMP `quit`. If QEMU is still running after
    /// `timeout` it is killed and an error returned.
    pub async fn shutdown(&mut self, timeout: Duration) -> Result<()> {
        let name = self.config.name.clone();
        match &self.qga {
            Some(qga) => qga
                .shutdown("powerdown")
                .await
                .map_err(|e| qemu_error(&name, "agent shutdown", e))?,
            None => self
                .qmp()?
                .quit()
                .await
                .map_err(|e| qemu_error(&name, "QMP quit", e))?,
        }
        let vm = self.vm.as_mut().ok_or_else(|| {
            Error::new(
                ErrorKind::Qemu,
                format!("guest {name}: QEMU is not running"),
            )
        })?;
        if !vm.wait_exit(timeout).await {
            vm.kill()
                .map_err(|e| qemu_error(&name, "killing QEMU", e))?;
            return Err(Error::new(
                ErrorKind::Timeout,
                format!("guest {name}: did not power off within {timeout:?}; QEMU was killed"),
            ));
        }
        self.vm = None;
        Ok(())
    }

    /// Kills QEMU (SIGKILL) and reaps it: a power cut.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut vm) = self.vm.take() {
            vm.kill()
                .map_err(|e| qemu_error(&self.config.name, "killing QEMU", e))?;
        }
        Ok(())
    }

    /// Workload description for messages.
    pub fn workload(&self) -> &Workload {
        &self.config.workload
    }
}

impl Drop for TestGuest {
    fn drop(&mut self) {
        // Dropping the process kills and reaps QEMU and removes its sockets.
        self.vm = None;
        if let Some(dir) = self.run_dir.take() {
            let path = dir.path().to_owned();
            if let Err(e) = dir.close() {
                tracing::warn!(dir = %path.display(), error = %e, "removing a guest run directory failed");
            }
        }
        registry::release(self.registry_id);
    }
}

fn qemu_error(guest: &str, what: &str, e: ferry_qemu::Error) -> Error {
    let kind = match &e.kind {
        ferry_qemu::ErrorKind::Timeout(_) => ErrorKind::Timeout,
        ferry_qemu::ErrorKind::Agent { .. } => ErrorKind::Agent,
        _ => ErrorKind::Qemu,
    };
    Error::with_source(kind, format!("guest {guest}: {what}"), e)
}
