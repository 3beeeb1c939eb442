//! A process-wide record of every QEMU process and every file the kit
//! created for a guest, so tests can assert that nothing is left behind.
//!
//! Each guest registers its QEMU process id and its run directory (which
//! holds the QMP and guest-agent sockets and the console log) when it
//! starts, and marks them released when it is dropped. [`leftovers`] checks
//! the released ones: a released process must be gone (reaped) and a
//! released path must not exist. Guests still alive in other tests of the
//! same binary are not leftovers.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, ErrorKind, Result};

#[derive(Debug)]
struct Entry {
    id: u64,
    name: String,
    pid: Option<u32>,
    paths: Vec<PathBuf>,
    released: bool,
}

static REGISTRY: Mutex<Vec<Entry>> = Mutex::new(Vec::new());
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn lock() -> std::sync::MutexGuard<'static, Vec<Entry>> {
    // A test that panicked while holding the lock leaves valid data.
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner())
}

/// Registers the resources of a guest (or any process the kit starts);
/// returns its registry id.
pub fn register(name: &str, paths: Vec<PathBuf>) -> u64 {
    let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    lock().push(Entry {
        id,
        name: name.to_owned(),
        pid: None,
        paths,
        released: false,
    });
    id
}

/// Records the QEMU process id of guest `id`.
pub fn set_pid(id: u64, pid: u32) {
    if let Some(e) = lock().iter_mut().find(|e| e.id == id) {
        e.pid = Some(pid);
    }
}

/// Adds a path created for guest `id`.
pub fn add_path(id: u64, path: &Path) {
    if let Some(e) = lock().iter_mut().find(|e| e.id == id) {
        e.paths.push(path.to_owned());
    }
}

/// Marks guest `id` as released (its `Drop` ran).
pub fn release(id: u64) {
    if let Some(e) = lock().iter_mut().find(|e| e.id == id) {
        e.released = true;
    }
}

/// Whether process `pid` still exists and runs QEMU (a reused pid running
/// something else does not count).
pub fn qemu_alive(pid: u32) -> bool {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    match std::fs::read(proc_dir.join("cmdline")) {
        Ok(cmd) => String::from_utf8_lossy(&cmd).contains("qemu"),
        Err(_) => false,
    }
}

/// QEMU processes whose parent is this process (started by this test
/// binary), whoever started them.
pub fn child_qemu_pids() -> Vec<u32> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
            let Some((head, rest)) = stat.rsplit_once(')') else {
                return false;
            };
            let ppid = rest
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u32>().ok());
            ppid == Some(me) && head.contains("qemu")
        })
        .collect()
}

/// What released guests of this process, and guests of processes that are
/// gone ([`orphans`]), left behind, one line per thing; empty when clean.
pub fn leftovers() -> Vec<String> {
    let entries = lock();
    let mut out = Vec::new();
    let live_pids: Vec<u32> = entries
        .iter()
        .filter(|e| !e.released)
        .filter_map(|e| e.pid)
        .collect();
    for e in entries.iter().filter(|e| e.released) {
        if let Some(pid) = e.pid
            && qemu_alive(pid)
        {
            out.push(format!(
                "guest {}: QEMU process {pid} is still running",
                e.name
            ));
        }
        for p in &e.paths {
            if p.symlink_metadata().is_ok() {
                out.push(format!("guest {}: {} still exists", e.name, p.display()));
            }
        }
    }
    out.extend(orphans());
    for pid in child_qemu_pids() {
        if !live_pids.contains(&pid) && !entries.iter().any(|e| e.pid == Some(pid) && e.released) {
            out.push(format!(
                "QEMU process {pid} started by this process is not a kit guest"
            ));
        }
    }
    out
}

/// The file in a guest's run directory naming the process that owns it.
pub const OWNER_FILE: &str = "owner.pid";

/// The prefix of guest run directories in the system temporary directory.
pub const RUN_DIR_PREFIX: &str = "ferry-guest-";

/// Kit guests left behind by *any* process, e.g. a test binary killed
/// before it could drop its guests: run directories in the temporary
/// directory whose owner process is gone, with the QEMU still running from
/// them, one line each. Guests of live processes are not reported.
pub fn orphans() -> Vec<String> {
    let tmp = std::env::temp_dir();
    let Ok(entries) = std::fs::read_dir(&tmp) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.filter_map(|e| e.ok()) {
        if !e.file_name().to_string_lossy().starts_with(RUN_DIR_PREFIX) {
            continue;
        }
        let dir = e.path();
        let owner = std::fs::read_to_string(dir.join(OWNER_FILE))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        let owner_alive = owner.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if owner_alive {
            continue;
        }
        let qemu = std::fs::read_to_string(dir.join("qemu.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .filter(|&p| qemu_alive(p));
        match (owner, qemu) {
            // Created but not yet owned: a guest being started right now.
            (None, None) => {}
            (_, Some(pid)) => out.push(format!(
                "QEMU {pid} still runs from {} (its test process {owner:?} is gone)",
                dir.display()
            )),
            (Some(p), None) => out.push(format!("{} was left by test process {p}", dir.display())),
        }
    }
    out
}

/// Kills the QEMU processes and removes the run directories that
/// [`orphans`] reports; returns what it removed.
pub fn reap_orphans() -> Vec<String> {
    let tmp = std::env::temp_dir();
    let Ok(entries) = std::fs::read_dir(&tmp) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(RUN_DIR_PREFIX))
        .flat_map(|e| reap_orphan(&e.path()))
        .collect()
}

/// Reaps one run directory if its owner process is gone: kills the QEMU
/// running from it and removes it. Returns what it did.
pub fn reap_orphan(dir: &Path) -> Vec<String> {
    let mut done = Vec::new();
    let Some(owner) = std::fs::read_to_string(dir.join(OWNER_FILE))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
    else {
        return done;
    };
    if Path::new(&format!("/proc/{owner}")).exists() {
        return done;
    }
    if let Some(pid) = std::fs::read_to_string(dir.join("qemu.pid"))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&*dir.to_string_lossy()) {
            // SAFETY: kill(2) on a pid whose command line names this run
            // directory (an orphaned kit QEMU); no memory is involved.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while qemu_alive(pid as u32) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            done.push(format!("killed QEMU {pid}"));
        }
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => done.push(format!("removed {}", dir.display())),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "removing an orphaned run directory failed")
        }
    }
    done
}

/// Fails, listing them, if released guests left a QEMU process or a file.
pub fn assert_no_leftovers() -> Result<()> {
    let left = leftovers();
    if left.is_empty() {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::Guest,
            format!("left behind: {}", left.join("; ")),
        ))
    }
}

/// Number of guests registered so far and how many of them are released.
pub fn counts() -> (usize, usize) {
    let entries = lock();
    (entries.len(), entries.iter().filter(|e| e.released).count())
}
