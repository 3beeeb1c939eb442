//! A release `ferryd` for benchmarks that measure Ferry as deployed:
//! built on demand, started on a scratch data directory, called over its
//! HTTP API, killed on drop with every QEMU it started.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

/// Builds the release `ferryd` (a no-op when current) and returns its path.
pub(crate) fn ferryd_exe() -> anyhow::Result<PathBuf> {
    crate::suites::build_release("ferryd", "ferryd")
}

/// A ferryd process, killed on drop, with every QEMU it started.
pub(crate) struct Daemon {
    child: Child,
    pub url: String,
    token: String,
    data: PathBuf,
    http: reqwest::Client,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let needle = self.data.to_string_lossy().into_owned();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            if cmd.contains("qemu-system") && cmd.contains(&needle) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
    }
}

impl Daemon {
    /// `ferryd init` + `ferryd run` on `data` (HTTP on a free port).
    pub(crate) fn start(exe: &Path, data: &Path) -> anyhow::Result<Daemon> {
        Self::start_with(exe, data, &[])
    }

    /// Like [`Daemon::start`], with extra `ferryd run` arguments.
    pub(crate) fn start_with(exe: &Path, data: &Path, extra: &[&str]) -> anyhow::Result<Daemon> {
        Self::start_named(exe, data, "bench", extra)
    }

    /// Like [`Daemon::start_with`], for a host named `name`.
    pub(crate) fn start_named(
        exe: &Path,
        data: &Path,
        name: &str,
        extra: &[&str],
    ) -> anyhow::Result<Daemon> {
        let out = Command::new(exe)
            .args(["init", "--no-cli-config", "--name", name, "--data-dir"])
            .arg(data)
            .output()?;
        if !out.status.success() {
            bail!("ferryd init: {}", String::from_utf8_lossy(&out.stderr));
        }
        let token = std::fs::read_to_string(data.join("admin.token"))?
            .trim()
            .to_string();
        // A free NBD port unless asked otherwise: another ferryd (a test,
        // another suite) may hold the default one.
        let nbd: &[&str] = if extra.contains(&"--nbd-listen") {
            &[]
        } else {
            &["--nbd-listen", "127.0.0.1:0"]
        };
        let mut child = Command::new(exe)
            .args(["run", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data)
            .args(nbd)
            .args(extra)
            .env("FERRYD_LOG", "warn")
            .stderr(Stdio::piped())
            .spawn()?;
        let mut lines = BufReader::new(child.stderr.take().context("stderr")?).lines();
        let mut said = Vec::new();
        let url = loop {
            let Some(line) = lines.next() else {
                bail!(
                    "ferryd ({}) exited before listening: {}",
                    data.display(),
                    said.join("\n")
                );
            };
            let line = line?;
            if let Some((_, url)) = line.split_once(" listening on ") {
                break url.to_string();
            }
            said.push(line);
        };
        std::thread::spawn(move || for _ in lines {});
        Ok(Daemon {
            child,
            url,
            token,
            data: data.to_path_buf(),
            http: reqwest::Client::new(),
        })
    }

    /// CPU time (user + system, all threads, in seconds) the process used
    /// so far; clock-tick resolution (10 ms on common kernels).
    pub(crate) fn cpu_secs(&self) -> anyhow::Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        // The fields after the command name (in parentheses, which may
        // hold spaces): utime and stime are the 14th and 15th of the line.
        let rest = stat.rsplit_once(')').context("malformed /proc stat")?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = f
            .get(11..13)
            .context("short /proc stat")?
            .iter()
            .map(|v| v.parse::<f64>())
            .sum::<Result<f64, _>>()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        Ok(ticks / hz.max(1) as f64)
    }

    pub(crate) async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> anyhow::Result<Value> {
        let mut rb = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token);
        if !body.is_null() {
            rb = rb.json(&body);
        }
        let r = rb.send().await?;
        let status = r.status();
        let text = r.text().await?;
        if !status.is_success() {
            bail!("{path}: {status}: {text}");
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub(crate) async fn wait_op(&self, id: &str) -> anyhow::Result<Value> {
        loop {
            // A long poll: answered as the operation finishes, so a suite
            // that times an operation gets its end exactly (as a peer's
            // time is its process's exit).
            let op = self.get(&format!("/v1/operations/{id}?wait_s=60")).await?;
            let state = op["state"].as_str().unwrap_or("");
            if ["succeeded", "failed", "cancelled"].contains(&state) {
                return Ok(op);
            }
            // Not finished after the wait, or not running (yet) where the
            // long poll can wait for it: ask again shortly.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(crate) async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(reqwest::Method::GET, path, Value::Null).await
    }

    pub(crate) async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.call(reqwest::Method::POST, path, body).await
    }

    /// Waits for operation `id`; an error unless it succeeded.
    pub(crate) async fn wait_ok(&self, id: &str) -> anyhow::Result<Value> {
        let op = self.wait_op(id).await?;
        if op["state"] != "succeeded" {
            bail!("operation {id} {}: {}", op["state"], op["error"]);
        }
        Ok(op)
    }

    /// Imports raw image `raw` into a new volume, then removes the file.
    pub(crate) async fn import(&self, volume: &str, raw: &Path) -> anyhow::Result<()> {
        let s = self
            .post(
                &format!("/v1/volumes/{volume}/import"),
                serde_json::json!({ "path": raw }),
            )
            .await?;
        self.wait_ok(s["operation"].as_str().context("operation id")?)
            .await?;
        std::fs::remove_file(raw)?;
        Ok(())
    }
}
