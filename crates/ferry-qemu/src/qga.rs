//! Asynchronous guest-agent (qemu-ga) client over the unix socket of the
//! virtio-serial chardev.
//!
//! The agent protocol is one request, one reply, no ids. A stale reply from
//! an earlier timed-out call, or garbage left in the serial line, would be
//! read as the answer to the next call, so every connection (and every
//! connection after a timeout) starts with the sync handshake: send `0xFF`
//! (the agent drops any partial request), then `guest-sync-delimited` with a
//! random id; the agent answers with `0xFF` followed by the reply; every
//! byte before the `0xFF` and every reply with another id is discarded.
//!
//! An agent that is absent (no qemu-ga in the guest, guest not booted) does
//! not answer: the handshake fails with [`ErrorKind::Timeout`].
//!
//! [`FreezeGuard`] makes sure a freeze is always followed by a thaw.

use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::Mutex;

use crate::error::{Error, ErrorKind, Result};

/// Default time an agent call may take.
pub const DEFAULT_AGENT_TIMEOUT: Duration = Duration::from_secs(10);

/// The output of a command run in the guest with [`QgaClient::exec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit code (`None` when killed by a signal).
    pub exit_code: Option<i32>,
    /// Signal that ended the process, if any.
    pub signal: Option<i32>,
    /// Captured standard output.
    pub stdout: Vec<u8>,
    /// Captured standard error.
    pub stderr: Vec<u8>,
}

impl ExecOutput {
    /// True when the command exited with status 0.
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }
}

/// The guest's file-system freeze state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreezeStatus {
    /// File systems are thawed.
    Thawed,
    /// File systems are frozen.
    Frozen,
    /// A state this client does not know.
    Other,
}

/// Guest-agent information (`guest-info`).
#[derive(Debug, Clone, Deserialize)]
pub struct AgentInfo {
    /// The agent's version.
    pub version: String,
    /// The commands the agent supports (unknown fields ignored).
    #[serde(default)]
    pub supported_commands: Vec<AgentCommand>,
}

/// One entry of `guest-info`'s command list.
#[derive(Debug, Clone, Deserialize)]
pub struct AgentCommand {
    /// Command name.
    pub name: String,
    /// Whether it is enabled.
    #[serde(default)]
    pub enabled: bool,
}

struct Conn {
    stream: Option<BufReader<UnixStream>>,
}

/// A guest-agent client. Cheap to clone: clones share one connection, and
/// calls are serialised.
#[derive(Clone)]
pub struct QgaClient {
    path: PathBuf,
    conn: Arc<Mutex<Conn>>,
    timeout: Duration,
}

impl std::fmt::Debug for QgaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QgaClient")
            .field("path", &self.path)
            .finish()
    }
}

fn random_id() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    // Keep it within what JSON numbers carry exactly everywhere.
    h.finish() & ((1 << 52) - 1)
}

impl QgaClient {
    /// A client for the agent socket at `path`. Nothing is connected yet:
    /// the first call connects and runs the sync handshake.
    pub fn new(path: impl AsRef<Path>) -> Self {
        Self {
            path: path.as_ref().to_path_buf(),
            conn: Arc::new(Mutex::new(Conn { stream: None })),
            timeout: DEFAULT_AGENT_TIMEOUT,
        }
    }

    /// The same client with another default timeout for every call.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The agent socket.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn ctx(&self, command: &str) -> String {
        format!("guest agent command {command} on {}", self.path.display())
    }

    /// Connects (if needed) and runs the sync handshake. Calls do this on
    /// their own; call it to check that an agent answers.
    pub async fn sync(&self, timeout: Duration) -> Result<()> {
        let mut conn = self.conn.lock().await;
        let ctx = self.ctx("guest-sync-delimited");
        match tokio::time::timeout(timeout, Self::handshake(&self.path, &mut conn, &ctx)).await {
            Ok(r) => r,
            Err(_) => {
                conn.stream = None;
                Err(Error::new(ErrorKind::Timeout(timeout), ctx))
            }
        }
    }

    async fn handshake(path: &Path, conn: &mut Conn, ctx: &str) -> Result<()> {
        conn.stream = None;
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| Error::io(e, ctx.to_string()))?;
        let mut stream = BufReader::new(stream);
        let id = random_id();
        let mut req = vec![0xFFu8];
        req.extend_from_slice(
            json!({"execute": "guest-sync-delimited", "arguments": {"id": id}})
                .to_string()
                .as_bytes(),
        );
        req.push(b'\n');
        stream
            .get_mut()
            .write_all(&req)
            .await
            .map_err(|e| Error::io(e, ctx.to_string()))?;
        loop {
            // Discard everything up to and including the 0xFF delimiter.
            loop {
                let b = stream.read_u8().await.map_err(|e| closed_or_io(e, ctx))?;
                if b == 0xFF {
                    break;
                }
            }
            let mut line = Vec::new();
            let n = stream
                .read_until(b'\n', &mut line)
                .await
                .map_err(|e| Error::io(e, ctx.to_string()))?;
            if n == 0 {
                return Err(Error::new(ErrorKind::Closed, ctx.to_string()));
            }
            // A 0xFF inside the line means another delimited reply follows.
            let text = match line.iter().rposition(|&b| b == 0xFF) {
                Some(p) => &line[p + 1..],
                None => &line[..],
            };
            if let Ok(v) = serde_json::from_slice::<Value>(text)
                && v.get("return").and_then(Value::as_u64) == Some(id)
            {
                conn.stream = Some(stream);
                return Ok(());
            }
        }
    }

    /// Runs an agent command with the client's timeout; returns `return`.
    pub async fn execute(&self, command: &str, arguments: Value) -> Result<Value> {
        self.execute_with_timeout(command, arguments, self.timeout)
            .await
    }

    /// Runs an agent command; returns its `return`. On timeout the
    /// connection is dropped and the next call re-synchronises.
    pub async fn execute_with_timeout(
        &self,
        command: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Value> {
        let ctx = self.ctx(command);
        let mut conn = self.conn.lock().await;
        let syncing = std::sync::atomic::AtomicBool::new(false);
        let fut = async {
            if conn.stream.is_none() {
                syncing.store(true, std::sync::atomic::Ordering::Relaxed);
                Self::handshake(&self.path, &mut conn, &ctx).await?;
                syncing.store(false, std::sync::atomic::Ordering::Relaxed);
            }
            let mut msg = json!({ "execute": command });
            if !arguments.is_null() {
                msg["arguments"] = arguments;
            }
            let mut line = msg.to_string().into_bytes();
            line.push(b'\n');
            let Some(stream) = conn.stream.as_mut() else {
                return Err(Error::new(ErrorKind::Closed, ctx.clone()));
            };
            stream
                .get_mut()
                .write_all(&line)
                .await
                .map_err(|e| closed_or_io(e, &ctx))?;
            loop {
                let mut buf = Vec::new();
                let n = stream
                    .read_until(b'\n', &mut buf)
                    .await
                    .map_err(|e| Error::io(e, ctx.clone()))?;
                if n == 0 {
                    return Err(Error::new(ErrorKind::Closed, ctx.clone()));
                }
                let text: Vec<u8> = buf.into_iter().filter(|&b| b != 0xFF).collect();
                let Ok(v) = serde_json::from_slice::<Value>(&text) else {
                    continue;
                };
                if let Some(err) = v.get("error") {
                    return Err(Error::new(
                        ErrorKind::Agent {
                            class: err["class"].as_str().unwrap_or("?").to_string(),
                            desc: err["desc"].as_str().unwrap_or("").to_string(),
                        },
                        ctx.clone(),
                    ));
                }
                if let Some(r) = v.get("return") {
                    return Ok(r.clone());
                }
            }
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if !matches!(e.kind, ErrorKind::Agent { .. }) {
                    conn.stream = None;
                }
                Err(e)
            }
            Err(_) => {
                conn.stream = None;
                let ctx = if syncing.load(std::sync::atomic::Ordering::Relaxed) {
                    format!(
                        "{ctx}: no answer to guest-sync-delimited (is qemu-ga running in the guest?)"
                    )
                } else {
                    ctx
                };
                Err(Error::new(ErrorKind::Timeout(timeout), ctx))
            }
        }
    }

    /// `guest-ping`.
    pub async fn ping(&self) -> Result<()> {
        self.execute("guest-ping", Value::Null).await.map(drop)
    }

    /// `guest-info`.
    pub async fn info(&self) -> Result<AgentInfo> {
        let v = self.execute("guest-info", Value::Null).await?;
        serde_json::from_value(v).map_err(|e| {
            Error::new(
                ErrorKind::Protocol(format!("unexpected guest-info reply: {e}")),
                self.ctx("guest-info"),
            )
        })
    }

    /// Runs `path args...` in the guest, captures its output and waits for
    /// it to exit, for at most `timeout`.
    pub async fn exec(&self, path: &str, args: &[&str], timeout: Duration) -> Result<ExecOutput> {
        let ctx = format!("{} ({path})", self.ctx("guest-exec"));
        let started = tokio::time::Instant::now();
        let v = self
            .execute_with_timeout(
                "guest-exec",
                json!({"path": path, "arg": args, "capture-output": true}),
                timeout,
            )
            .await?;
        let Some(pid) = v["pid"].as_i64() else {
            return Err(Error::new(
                ErrorKind::Protocol(format!("guest-exec reply without pid: {v}")),
                ctx,
            ));
        };
        let mut delay = Duration::from_millis(10);
        loop {
            let left = timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Err(Error::new(
                    ErrorKind::Timeout(timeout),
                    format!("{ctx}: guest process {pid} still running"),
                ));
            }
            let st = self
                .execute_with_timeout("guest-exec-status", json!({"pid": pid}), left)
                .await?;
            if st["exited"].as_bool() == Some(true) {
                let decode = |k: &str| -> Result<Vec<u8>> {
                    match st[k].as_str() {
                        None => Ok(Vec::new()),
                        Some(s) => {
                            base64::engine::general_purpose::STANDARD
                                .decode(s)
                                .map_err(|e| {
                                    Error::new(
                                        ErrorKind::Protocol(format!("bad base64 in {k}: {e}")),
                                        ctx.clone(),
                                    )
                                })
                        }
                    }
                };
                return Ok(ExecOutput {
                    exit_code: st["exitcode"].as_i64().map(|c| c as i32),
                    signal: st["signal"].as_i64().map(|c| c as i32),
                    stdout: decode("out-data")?,
                    stderr: decode("err-data")?,
                });
            }
            tokio::time::sleep(delay.min(left)).await;
            delay = (delay * 2).min(Duration::from_millis(200));
        }
    }

    /// `guest-fsfreeze-freeze` without a guard. Prefer [`Self::freeze`].
    pub async fn fsfreeze_freeze(&self) -> Result<u64> {
        let v = self.execute("guest-fsfreeze-freeze", Value::Null).await?;
        Ok(v.as_u64().unwrap_or(0))
    }

    /// `guest-fsfreeze-thaw`: returns the number of file systems thawed.
    pub async fn fsfreeze_thaw(&self) -> Result<u64> {
        let v = self.execute("guest-fsfreeze-thaw", Value::Null).await?;
        Ok(v.as_u64().unwrap_or(0))
    }

    /// `guest-fsfreeze-status`.
    pub async fn fsfreeze_status(&self) -> Result<FreezeStatus> {
        let v = self.execute("guest-fsfreeze-status", Value::Null).await?;
        Ok(match v.as_str() {
            Some("thawed") => FreezeStatus::Thawed,
            Some("frozen") => FreezeStatus::Frozen,
            _ => FreezeStatus::Other,
        })
    }

    /// Freezes the guest's file systems and returns a guard that thaws them:
    /// call [`FreezeGuard::thaw`]; if the guard is dropped unthawed (an
    /// error or a panic between), a thaw is spawned on the runtime.
    ///
    /// If the freeze call itself fails (for example a timeout while the
    /// agent was freezing), a thaw is sent before returning the error, since
    /// the guest may be frozen anyway.
    pub async fn freeze(&self) -> Result<FreezeGuard> {
        match self.fsfreeze_freeze().await {
            Ok(count) => Ok(FreezeGuard {
                client: self.clone(),
                count,
                thawed: false,
            }),
            Err(e) => {
                if let Err(te) = self.fsfreeze_thaw().await {
                    tracing::warn!(error = %te, "thaw after failed freeze failed");
                }
                Err(e)
            }
        }
    }

    /// `guest-shutdown` (`powerdown`, `halt` or `reboot`). The agent sends
    /// no reply on success, so this only waits for the request to be
    /// written; the connection is dropped afterwards.
    pub async fn shutdown(&self, mode: &str) -> Result<()> {
        let ctx = self.ctx("guest-shutdown");
        let mut conn = self.conn.lock().await;
        let fut = async {
            Self::handshake(&self.path, &mut conn, &ctx).await?;
            let msg = json!({"execute": "guest-shutdown", "arguments": {"mode": mode}});
            let mut line = msg.to_string().into_bytes();
            line.push(b'\n');
            let Some(stream) = conn.stream.as_mut() else {
                return Err(Error::new(ErrorKind::Closed, ctx.clone()));
            };
            stream
                .get_mut()
                .write_all(&line)
                .await
                .map_err(|e| closed_or_io(e, &ctx))
        };
        let r = tokio::time::timeout(self.timeout, fut).await;
        conn.stream = None;
        match r {
            Ok(r) => r,
            Err(_) => Err(Error::new(ErrorKind::Timeout(self.timeout), ctx)),
        }
    }
}

fn closed_or_io(e: std::io::Error, ctx: &str) -> Error {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof
        | std::io::ErrorKind::BrokenPipe
        | std::io::ErrorKind::ConnectionReset => Error::new(ErrorKind::Closed, ctx.to_string()),
        _ => Error::io(e, ctx.to_string()),
    }
}

/// Proof that the guest's file systems are frozen. Thaw it with
/// [`FreezeGuard::thaw`]; dropping it unthawed spawns a thaw.
#[must_use = "dropping the guard thaws the guest in the background; call thaw()"]
pub struct FreezeGuard {
    client: QgaClient,
    count: u64,
    thawed: bool,
}

impl std::fmt::Debug for FreezeGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FreezeGuard")
            .field("agent", &self.client.path)
            .field("count", &self.count)
            .finish()
    }
}

impl FreezeGuard {
    /// Number of file systems the agent froze.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Thaws the guest. Returns the number of file systems thawed.
    pub async fn thaw(mut self) -> Result<u64> {
        self.thawed = true;
        self.client.fsfreeze_thaw().await
    }
}

impl Drop for FreezeGuard {
    fn drop(&mut self) {
        if self.thawed {
            return;
        }
        let client = self.client.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    if let Err(e) = client.fsfreeze_thaw().await {
                        tracing::error!(error = %e, "thaw of a dropped freeze guard failed");
                    }
                });
            }
            Err(_) => {
                // No runtime: thaw on a private one, in a thread so that we
                // never block inside someone else's executor.
                let _ = std::thread::spawn(move || {
                    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                        Ok(rt) => {
                            if let Err(e) = rt.block_on(client.fsfreeze_thaw()) {
                                tracing::error!(error = %e, "thaw of a dropped freeze guard failed");
                            }
                        }
                        Err(e) => tracing::error!(error = %e, "no runtime to thaw a dropped freeze guard"),
                    }
                })
                .join();
            }
        }
    }
}
