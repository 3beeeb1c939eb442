//! A real `ferryd` for the CLI's tests: its own data directory, a free
//! port, killed on drop together with any VM it left running.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;

pub struct Daemon {
    pub dir: tempfile::TempDir,
    child: Child,
    pub url: String,
    pub token: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // ferryd leaves VMs running by design; a failed test must not.
        for pid in qemus_of(self.dir.path()) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

pub fn qemus_of(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("qemu-system") && cmd.contains(&needle) {
            out.push(pid);
        }
    }
    out
}

fn ferryd_bin() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_ferry")).with_file_name("ferryd");
    assert!(
        p.exists(),
        "{} is not built: cargo build -p ferryd first",
        p.display()
    );
    p
}

pub fn daemon() -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let st = Command::new(ferryd_bin())
        .args(["init", "--no-cli-config", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let token = std::fs::read_to_string(data.join("admin.token"))
        .unwrap()
        .trim()
        .to_string();
    let mut child = Command::new(ferryd_bin())
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--nbd-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(&data)
        .env("FERRYD_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().expect("ferryd exited").unwrap();
        if let Some((_, u)) = line.split_once(" listening on ") {
            break u.to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Daemon {
        dir,
        child,
        url,
        token,
    }
}

impl Daemon {
    /// A scratch directory for the test's files (removed with the daemon).
    pub fn img_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn ferry(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(args)
            .env("FERRY_URL", &self.url)
            .env("FERRY_TOKEN", &self.token)
            .env("FERRY_CONFIG", "/nonexistent")
            .output()
            .unwrap()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.ferry(&a);
        assert!(
            out.status.success(),
            "ferry {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}
