//! A running QEMU process and its run directory.
//!
//! [`VmProcess`] owns the process: dropping it (also while a test panics)
//! kills QEMU with SIGKILL, reaps it and removes the sockets and the pid file
//! of the run directory; logs and `vm.json` stay for post-mortems. A manager
//! that must leave the VM running calls [`VmProcess::detach`], and after a
//! restart finds it again with [`VmProcess::reattach`] (pid file + a check
//! that the pid's command line names this run directory's QMP socket, then a
//! new QMP connection).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, ErrorKind, Result};
use crate::launch::{LaunchOptions, RunPaths, binary_version, qemu_args};
use crate::qga::QgaClient;
use crate::qmp::{QemuVersion, QmpClient, StatusInfo};
use crate::spec::VmSpec;

/// Default time QEMU has to bring up its QMP socket.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(30);

/// How [`VmProcess::stop`] ended the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// The guest agent's shutdown powered the guest off.
    GuestAgent,
    /// The ACPI power button powered the guest off.
    Acpi,
    /// Neither worked in time: the process was killed.
    Killed,
    /// The process had already exited.
    AlreadyExited,
}

/// A QEMU process started or re-attached by this crate.
pub struct VmProcess {
    spec: VmSpec,
    paths: RunPaths,
    pid: i32,
    child: Option<Child>,
    qmp: QmpClient,
    qga: Option<QgaClient>,
    finished: bool,
}

impl std::fmt::Debug for VmProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmProcess")
            .field("name", &self.spec.name)
            .field("pid", &self.pid)
            .field("run_dir", &self.paths.dir)
            .finish()
    }
}

/// The command line of a live process, NUL-separated arguments joined by
/// spaces; `None` when the process does not exist.
fn cmdline_of(pid: i32) -> Option<String> {
    let mut s = Vec::new();
    std::fs::File::open(format!("/proc/{pid}/cmdline"))
        .ok()?
        .read_to_end(&mut s)
        .ok()?;
    if s.is_empty() {
        // A zombie has an empty command line.
        return None;
    }
    Some(String::from_utf8_lossy(&s).replace('\0', " "))
}

/// True when `pid` is a live QEMU of the run directory `paths`.
fn is_our_qemu(pid: i32, paths: &RunPaths) -> bool {
    cmdline_of(pid).is_some_and(|c| c.contains(&*paths.qmp.to_string_lossy()))
}

fn read_pid(paths: &RunPaths) -> Option<i32> {
    std::fs::read_to_string(&paths.pid)
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(2000);
    String::from_utf8_lossy(&text[start..]).trim().to_string()
}

fn remove_if_exists(path: &Path) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "could not remove");
    }
}

impl VmProcess {
    /// Starts QEMU for `spec` in `run_dir` (created if missing) and connects
    /// to its QMP socket.
    pub async fn start(
        spec: &VmSpec,
        run_dir: impl AsRef<Path>,
        opts: LaunchOptions,
    ) -> Result<Self> {
        Self::start_with_timeout(spec, run_dir, opts, DEFAULT_START_TIMEOUT).await
    }

    /// [`Self::start`] with an explicit bound on the time to the QMP greeting.
    pub async fn start_with_timeout(
        spec: &VmSpec,
        run_dir: impl AsRef<Path>,
        opts: LaunchOptions,
        timeout: Duration,
    ) -> Result<Self> {
        spec.validate()?;
        let paths = RunPaths::new(run_dir);
        paths.check()?;
        let ctx = format!(
            "starting QEMU for VM {} in {}",
            spec.name,
            paths.dir.display()
        );
        std::fs::create_dir_all(&paths.dir).map_err(|e| Error::io(e, &ctx))?;
        if let Some(pid) = read_pid(&paths)
            && is_our_qemu(pid, &paths)
        {
            return Err(Error::new(
                ErrorKind::Process(format!(
                    "a QEMU (pid {pid}) already runs from this run directory"
                )),
                ctx,
            ));
        }
        for p in [&paths.qmp, &paths.qga, &paths.pid] {
            remove_if_exists(p);
        }
        let tmp = paths.spec.with_extension("json.tmp");
        std::fs::write(&tmp, spec.to_json()).map_err(|e| Error::io(e, &ctx))?;
        std::fs::rename(&tmp, &paths.spec).map_err(|e| Error::io(e, &ctx))?;

        let version = binary_version(&opts.binary)?;
        let args = qemu_args(spec, &paths, &opts, version);
        tracing::debug!(binary = %opts.binary.display(), ?args, "starting QEMU");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&paths.log)
            .map_err(|e| Error::io(e, &ctx))?;
        let log2 = log.try_clone().map_err(|e| Error::io(e, &ctx))?;
        let child = {
            use std::os::unix::process::CommandExt;
            Command::new(&opts.binary)
                .args(&args)
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log2)
                // Its own process group: a Ctrl-C meant for the manager does
                // not take the VMs with it.
                .process_group(0)
                .spawn()
                .map_err(|e| Error::io(e, &ctx))?
        };
        let pid = child.id() as i32;
        // From here on, `guard` kills the child if we return early.
        let mut guard = Starting {
            child: Some(child),
            paths: &paths,
            armed: true,
        };
        let deadline = Instant::now() + timeout;
        let qmp = loop {
            if let Some(child) = guard.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                guard.child = None;
                return Err(Error::new(
                    ErrorKind::Process(format!(
                        "exited with {status} before its QMP socket came up: {}",
                        log_tail(&paths.log)
                    )),
                    ctx,
                ));
            }
            if paths.qmp.exists() {
                let left = deadline.saturating_duration_since(Instant::now());
                match QmpClient::connect(&paths.qmp, left.min(Duration::from_secs(10))).await {
                    Ok(c) => break c,
                    Err(e) => tracing::debug!(error = %e, "QMP not ready yet"),
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::new(
                    ErrorKind::Timeout(timeout),
                    format!("{ctx}: no QMP greeting"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let child = guard.child.take();
        guard.armed = false;
        drop(guard);
        Ok(Self {
            qga: spec.guest_agent.then(|| QgaClient::new(&paths.qga)),
            spec: spec.clone(),
            paths,
            pid,
            child,
            qmp,
            finished: false,
        })
    }

    /// Finds a QEMU started earlier from `run_dir` (by this or a previous
    /// manager process) and connects to it.
    pub async fn reattach(run_dir: impl AsRef<Path>, timeout: Duration) -> Result<Self> {
        let paths = RunPaths::new(run_dir);
        let ctx = format!("re-attaching to the QEMU of {}", paths.dir.display());
        let text = std::fs::read_to_string(&paths.spec).map_err(|e| Error::io(e, &ctx))?;
        let spec: VmSpec = serde_json::from_str(&text)
            .map_err(|e| Error::invalid(format!("vm.json: {e}"), &ctx))?;
        let Some(pid) = read_pid(&paths) else {
            return Err(Error::new(
                ErrorKind::NotFound("no readable pid file".into()),
                ctx,
            ));
        };
        if !is_our_qemu(pid, &paths) {
            return Err(Error::new(
                ErrorKind::NotFound(format!("pid {pid} is not a QEMU of this run directory")),
                ctx,
            ));
        }
        let qmp = QmpClient::connect(&paths.qmp, timeout)
            .await
            .map_err(|e| Error::new(e.kind, format!("{ctx}: {}", e.context)))?;
        Ok(Self {
            qga: spec.guest_agent.then(|| QgaClient::new(&paths.qga)),
            spec,
            paths,
            pid,
            child: None,
            qmp,
            finished: false,
        })
    }

    /// Lists the run directories under `parent` whose QEMU is alive.
    /// The pid of the live QEMU of run directory `dir`, if one runs there
    /// (attached to or not).
    pub fn running_pid(dir: impl AsRef<Path>) -> Option<i32> {
        let paths = RunPaths::new(dir.as_ref());
        read_pid(&paths).filter(|pid| is_our_qemu(*pid, &paths))
    }

    pub fn find_running(parent: impl AsRef<Path>) -> Result<Vec<PathBuf>> {
        let parent = parent.as_ref();
        let ctx = format!("looking for QEMU run directories in {}", parent.display());
        let mut out = Vec::new();
        for entry in std::fs::read_dir(parent).map_err(|e| Error::io(e, &ctx))? {
            let entry = entry.map_err(|e| Error::io(e, &ctx))?;
            let paths = RunPaths::new(entry.path());
            if let Some(pid) = read_pid(&paths)
                && is_our_qemu(pid, &paths)
            {
                out.push(paths.dir);
            }
        }
        out.sort();
        Ok(out)
    }

    /// The VM definition.
    pub fn spec(&self) -> &VmSpec {
        &self.spec
    }

    /// The QMP client.
    pub fn qmp(&self) -> &QmpClient {
        &self.qmp
    }

    /// The QEMU version (from the QMP greeting).
    pub fn version(&self) -> QemuVersion {
        self.qmp.version()
    }

    /// The run directory's paths.
    pub fn paths(&self) -> &RunPaths {
        &self.paths
    }

    /// The run directory.
    pub fn run_dir(&self) -> &Path {
        &self.paths.dir
    }

    /// The guest-agent socket (present only when the spec enables the agent).
    pub fn qga_path(&self) -> &Path {
        &self.paths.qga
    }

    /// The VM's guest-agent client, or an error when the VM has no agent
    /// channel. QEMU serves one connection at a time on the agent socket,
    /// so every clone returned here shares one connection (and calls are
    /// serialised); a second `QgaClient::new` on the same socket would wait
    /// until this one disconnects.
    pub fn qga(&self) -> Result<QgaClient> {
        self.qga.clone().ok_or_else(|| {
            Error::invalid(
                "guest_agent is off in its definition",
                format!("guest agent of VM {}", self.spec.name),
            )
        })
    }

    /// The serial console log.
    pub fn serial_log_path(&self) -> &Path {
        &self.paths.serial
    }

    /// QEMU's own stdout/stderr log.
    pub fn qemu_log_path(&self) -> &Path {
        &self.paths.log
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Pauses the vCPUs.
    pub async fn pause(&self) -> Result<()> {
        self.qmp.stop().await
    }

    /// Resumes the vCPUs.
    pub async fn resume(&self) -> Result<()> {
        self.qmp.cont().await
    }

    /// `query-status`.
    pub async fn status(&self) -> Result<StatusInfo> {
        self.qmp.query_status().await
    }

    /// True once the process exited (it is reaped if it is our child).
    pub fn has_exited(&mut self) -> bool {
        if self.finished {
            return true;
        }
        let exited = match self.child.as_mut() {
            Some(c) => !matches!(c.try_wait(), Ok(None)),
            None => !is_our_qemu(self.pid, &self.paths),
        };
        if exited {
            self.finished = true;
            self.cleanup_files();
        }
        exited
    }

    /// Waits up to `timeout` for the process to exit; true if it did.
    pub async fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.has_exited() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Stops the VM gracefully: guest-agent shutdown (when the agent is on),
    /// then the ACPI power button, each given half of `timeout`, then kill.
    pub async fn stop(&mut self, timeout: Duration) -> Result<StopOutcome> {
        if self.has_exited() {
            return Ok(StopOutcome::AlreadyExited);
        }
        let half = timeout / 2;
        // The shared client: a second connection to the agent socket would
        // wait behind any connection a caller holds open.
        if let Some(qga) = self.qga.clone() {
            let qga = qga.with_timeout(half.min(Duration::from_secs(5)));
            match qga.shutdown("powerdown").await {
                Ok(()) => {
                    if self.wait_exit(half).await {
                        return Ok(StopOutcome::GuestAgent);
                    }
                }
                Err(e) => {
                    tracing::info!(vm = %self.spec.name, error = %e, "guest agent shutdown failed; trying ACPI")
                }
            }
        }
        match self.qmp.system_powerdown().await {
            Ok(()) => {
                if self.wait_exit(half).await {
                    return Ok(StopOutcome::Acpi);
                }
            }
            Err(e) => {
                tracing::info!(vm = %self.spec.name, error = %e, "system_powerdown failed; killing")
            }
        }
        self.kill()?;
        Ok(StopOutcome::Killed)
    }

    /// Kills QEMU at once (SIGKILL), reaps it and removes its sockets.
    pub fn kill(&mut self) -> Result<()> {
        if self.finished {
            return Ok(());
        }
        let ctx = format!("killing QEMU of VM {} (pid {})", self.spec.name, self.pid);
        match self.child.as_mut() {
            Some(c) => {
                if let Err(e) = c.kill()
                    && e.kind() != std::io::ErrorKind::InvalidInput
                {
                    return Err(Error::io(e, ctx));
                }
                c.wait().map_err(|e| Error::io(e, &ctx))?;
            }
            None => {
                if is_our_qemu(self.pid, &self.paths) {
                    // SAFETY: kill(2) with a pid we just checked belongs to
                    // this run directory's QEMU; no memory is involved.
                    let rc = unsafe { libc::kill(self.pid, libc::SIGKILL) };
                    if rc != 0 {
                        let e = std::io::Error::last_os_error();
                        if e.raw_os_error() != Some(libc::ESRCH) {
                            return Err(Error::io(e, ctx));
                        }
                    }
                    // Not our child: init reaps it; wait until it is gone.
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while is_our_qemu(self.pid, &self.paths) && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        }
        self.finished = true;
        self.cleanup_files();
        Ok(())
    }

    /// Gives up ownership without killing: the process keeps running and can
    /// be found again with [`Self::reattach`]. Returns the run directory.
    pub fn detach(mut self) -> PathBuf {
        self.finished = true;
        // Dropping a std Child neither kills nor waits for it.
        self.child = None;
        self.paths.dir.clone()
    }

    fn cleanup_files(&self) {
        for p in [&self.paths.qmp, &self.paths.qga, &self.paths.pid] {
            remove_if_exists(p);
        }
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if let Err(e) = self.kill() {
            tracing::error!(error = %e, "could not kill QEMU on drop");
        }
    }
}

/// Kills a child that has not yet become a [`VmProcess`] (start failed).
struct Starting<'a> {
    child: Option<Child>,
    paths: &'a RunPaths,
    armed: bool,
}

impl Drop for Starting<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for p in [&self.paths.qmp, &self.paths.qga, &self.paths.pid] {
            remove_if_exists(p);
        }
    }
}
