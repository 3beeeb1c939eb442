//! Asynchronous QMP client over a unix socket.
//!
//! One task reads the socket and routes every line: a message with `event`
//! goes to a broadcast channel (never blocks, so a slow event consumer never
//! holds up a command reply), a message with an `id` completes the command
//! waiting for it. Commands are written under a lock, one JSON line each, with
//! a numeric `id`. When the socket closes (QEMU exited or crashed) every
//! waiting command fails with [`ErrorKind::Closed`] naming the command, and
//! event streams end.
//!
//! Unknown fields and enum values are tolerated everywhere: replies are
//! `serde_json::Value`, typed views ignore what they do not know.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{broadcast, oneshot, watch};

use crate::error::{Error, ErrorKind, Result};

/// Default time a command may take before it fails with a timeout.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// One asynchronous event sent by QEMU (`STOP`, `RESUME`, `BLOCK_JOB_READY`, ...).
#[derive(Debug, Clone)]
pub struct QmpEvent {
    /// The event name.
    pub name: String,
    /// The event's `data` member (`Value::Null` when absent).
    pub data: Value,
    /// QEMU's timestamp in microseconds since the epoch (0 when absent).
    pub timestamp_us: u64,
}

/// The QEMU version announced in the QMP greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct QemuVersion {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro version.
    pub micro: u32,
}

/// The run state reported by `query-status`. Unknown states map to `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// Running.
    Running,
    /// Paused by `stop` (or `-S`).
    Paused,
    /// Waiting for an incoming migration.
    Inmigrate,
    /// Migration finished on the source.
    Postmigrate,
    /// Paused before the final migration step.
    FinishMigrate,
    /// Started with `-S`, never run yet.
    #[serde(rename = "prelaunch")]
    PreLaunch,
    /// Guest shut down (with `-no-shutdown`).
    Shutdown,
    /// The guest panicked.
    GuestPanicked,
    /// An I/O error paused the guest.
    IoError,
    /// Internal error.
    InternalError,
    /// Suspended.
    Suspended,
    /// Restoring a snapshot.
    RestoreVm,
    /// Saving a snapshot.
    SaveVm,
    /// Watchdog fired.
    Watchdog,
    /// Debug.
    Debug,
    /// Colo.
    Colo,
    /// A state this version does not know.
    #[serde(other)]
    Other,
}

/// The reply of `query-status`.
#[derive(Debug, Clone, Deserialize)]
pub struct StatusInfo {
    /// True when the vCPUs run.
    pub running: bool,
    /// The run state.
    pub status: RunState,
}

struct Pending {
    closed: bool,
    waiting: HashMap<u64, (String, oneshot::Sender<Value>)>,
}

struct Inner {
    path: PathBuf,
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Mutex<Pending>,
    next_id: AtomicU64,
    events: broadcast::Sender<QmpEvent>,
    closed: watch::Receiver<bool>,
    version: QemuVersion,
    greeting: Value,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A connected QMP client. Cheap to clone: clones share one connection.
#[derive(Clone)]
pub struct QmpClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpClient")
            .field("path", &self.inner.path)
            .field("version", &self.inner.version)
            .finish()
    }
}

/// A subscription to QMP events, created by [`QmpClient::events`].
pub struct EventStream {
    rx: broadcast::Receiver<QmpEvent>,
    closed: watch::Receiver<bool>,
    path: PathBuf,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream")
            .field("path", &self.path)
            .finish()
    }
}

impl EventStream {
    /// The next event, or [`ErrorKind::Closed`] once the connection closed
    /// and every event received before was delivered.
    pub async fn next(&mut self) -> Result<QmpEvent> {
        loop {
            match self.rx.try_recv() {
                Ok(ev) => return Ok(ev),
                Err(broadcast::error::TryRecvError::Lagged(n)) => {
                    tracing::warn!(lost = n, path = %self.path.display(), "QMP event consumer lagged");
                    continue;
                }
                Err(broadcast::error::TryRecvError::Closed) => return Err(self.closed_error()),
                Err(broadcast::error::TryRecvError::Empty) => {}
            }
            if *self.closed.borrow() {
                return Err(self.closed_error());
            }
            tokio::select! {
                r = self.rx.recv() => match r {
                    Ok(ev) => return Ok(ev),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(lost = n, path = %self.path.display(), "QMP event consumer lagged");
                    }
                    Err(broadcast::error::RecvError::Closed) => return Err(self.closed_error()),
                },
                _ = self.closed.changed() => {}
            }
        }
    }

    /// Waits for the first event named `name` whose data satisfies `pred`,
    /// discarding the others, for at most `timeout`.
    pub async fn wait_for(
        &mut self,
        name: &str,
        mut pred: impl FnMut(&Value) -> bool,
        timeout: Duration,
    ) -> Result<QmpEvent> {
        let ctx = format!("waiting for QMP event {name} on {}", self.path.display());
        let fut = async {
            loop {
                let ev: QmpEvent = self.next().await?;
                if ev.name == name && pred(&ev.data) {
                    return Ok::<QmpEvent, Error>(ev);
                }
            }
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r.map_err(|e| Error::new(e.kind, ctx)),
            Err(_) => Err(Error::new(ErrorKind::Timeout(timeout), ctx)),
        }
    }

    fn closed_error(&self) -> Error {
        Error::new(
            ErrorKind::Closed,
            format!("QMP event stream of {}", self.path.display()),
        )
    }
}

impl QmpClient {
    /// Connects to a QMP unix socket, reads the greeting and negotiates
    /// capabilities. `timeout` bounds the whole handshake.
    pub async fn connect(path: impl AsRef<Path>, timeout: Duration) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let ctx = format!("QMP handshake on {}", path.display());
        match tokio::time::timeout(timeout, Self::connect_inner(path)).await {
            Ok(r) => r,
            Err(_) => Err(Error::new(ErrorKind::Timeout(timeout), ctx)),
        }
    }

    async fn connect_inner(path: PathBuf) -> Result<Self> {
        let ctx = || format!("QMP handshake on {}", path.display());
        let stream = UnixStream::connect(&path)
            .await
            .map_err(|e| Error::io(e, ctx()))?;
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let greeting = match lines.next_line().await.map_err(|e| Error::io(e, ctx()))? {
            Some(line) => serde_json::from_str::<Value>(&line).map_err(|e| {
                Error::new(ErrorKind::Protocol(format!("bad greeting: {e}")), ctx())
            })?,
            None => return Err(Error::new(ErrorKind::Closed, ctx())),
        };
        let Some(qmp) = greeting.get("QMP") else {
            return Err(Error::new(
                ErrorKind::Protocol(format!("greeting without QMP member: {greeting}")),
                ctx(),
            ));
        };
        let v = &qmp["version"]["qemu"];
        let num = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0) as u32;
        let version = QemuVersion {
            major: num("major"),
            minor: num("minor"),
            micro: num("micro"),
        };

        let (events, _) = broadcast::channel(4096);
        let (closed_tx, closed_rx) = watch::channel(false);
        // The reader task reaches the pending commands through a weak
        // reference, so dropping the last client ends it.
        let inner = Arc::new_cyclic(|weak: &std::sync::Weak<Inner>| {
            let weak = weak.clone();
            let events_tx = events.clone();
            let reader_path = path.clone();
            let reader = tokio::spawn(async move {
                loop {
                    let line = match lines.next_line().await {
                        Ok(Some(line)) => line,
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(path = %reader_path.display(), error = %e, "QMP read failed");
                            break;
                        }
                    };
                    let msg: Value = match serde_json::from_str(&line) {
                        Ok(v) => v,
                        Err(e) => {
                            tracing::warn!(path = %reader_path.display(), error = %e, "QMP: unparsable line ignored");
                            continue;
                        }
                    };
                    if let Some(name) = msg.get("event").and_then(Value::as_str) {
                        let ts = &msg["timestamp"];
                        let timestamp_us = ts["seconds"].as_u64().unwrap_or(0) * 1_000_000
                            + ts["microseconds"].as_u64().unwrap_or(0);
                        let _ = events_tx.send(QmpEvent {
                            name: name.to_string(),
                            data: msg.get("data").cloned().unwrap_or(Value::Null),
                            timestamp_us,
                        });
                        continue;
                    }
                    let Some(inner) = weak.upgrade() else { break };
                    match msg.get("id").and_then(Value::as_u64) {
                        Some(id) => {
                            let waiter = inner.pending.lock().map(|mut p| p.waiting.remove(&id));
                            if let Ok(Some((_, tx))) = waiter {
                                let _ = tx.send(msg);
                            }
                        }
                        None => {
                            tracing::warn!(path = %reader_path.display(), %msg, "QMP: reply without id ignored");
                        }
                    }
                }
                if let Some(inner) = weak.upgrade()
                    && let Ok(mut p) = inner.pending.lock()
                {
                    p.closed = true;
                    // Dropping the senders wakes every waiting command.
                    p.waiting.clear();
                }
                let _ = closed_tx.send(true);
            });
            Inner {
                path: path.clone(),
                writer: tokio::sync::Mutex::new(write),
                pending: Mutex::new(Pending {
                    closed: false,
                    waiting: HashMap::new(),
                }),
                next_id: AtomicU64::new(1),
                events,
                closed: closed_rx,
                version,
                greeting: greeting.clone(),
                reader,
            }
        });
        let client = QmpClient { inner };
        client
            .execute_with_timeout("qmp_capabilities", json!({}), DEFAULT_COMMAND_TIMEOUT)
            .await?;
        Ok(client)
    }

    /// The socket this client is connected to.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The QEMU version from the greeting.
    pub fn version(&self) -> QemuVersion {
        self.inner.version
    }

    /// The raw greeting message.
    pub fn greeting(&self) -> &Value {
        &self.inner.greeting
    }

    /// True once the socket closed.
    pub fn is_closed(&self) -> bool {
        *self.inner.closed.borrow()
    }

    /// Subscribes to events. Only events sent after this call are seen, so
    /// subscribe before issuing the command that triggers them.
    pub fn events(&self) -> EventStream {
        EventStream {
            rx: self.inner.events.subscribe(),
            closed: self.inner.closed.clone(),
            path: self.inner.path.clone(),
        }
    }

    /// Runs a command with the default timeout and returns its `return`.
    pub async fn execute(&self, command: &str, arguments: Value) -> Result<Value> {
        self.execute_with_timeout(command, arguments, DEFAULT_COMMAND_TIMEOUT)
            .await
    }

    /// Runs a command and returns its `return`; QEMU errors become
    /// [`ErrorKind::Qmp`].
    pub async fn execute_with_timeout(
        &self,
        command: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Value> {
        let mut msg = json!({ "execute": command });
        let has_args = match &arguments {
            Value::Null => false,
            Value::Object(m) => !m.is_empty(),
            _ => true,
        };
        if has_args {
            msg["arguments"] = arguments;
        }
        let reply = self.execute_raw(msg, timeout).await?;
        self.reply_to_result(command, reply)
    }

    /// Runs a command and deserialises its `return` into `T`.
    pub async fn execute_as<T: serde::de::DeserializeOwned>(
        &self,
        command: &str,
        arguments: Value,
    ) -> Result<T> {
        let v = self.execute(command, arguments).await?;
        serde_json::from_value(v).map_err(|e| {
            Error::new(
                ErrorKind::Protocol(format!("unexpected reply shape: {e}")),
                self.context(command),
            )
        })
    }

    /// Raw escape hatch: sends `message` (an object with `execute` and
    /// optional `arguments`; an `id` is added) and returns the whole reply
    /// object, `return` or `error` included, without interpreting it.
    pub async fn execute_raw(&self, mut message: Value, timeout: Duration) -> Result<Value> {
        let command = message
            .get("execute")
            .or_else(|| message.get("exec-oob"))
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string();
        let ctx = self.context(&command);
        let Some(obj) = message.as_object_mut() else {
            return Err(Error::invalid("a QMP message must be a JSON object", ctx));
        };
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        obj.insert("id".into(), Value::from(id));
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self
                .inner
                .pending
                .lock()
                .map_err(|_| Error::new(ErrorKind::Closed, ctx.clone()))?;
            if p.closed {
                return Err(Error::new(ErrorKind::Closed, ctx));
            }
            p.waiting.insert(id, (command.clone(), tx));
        }
        let mut line = serde_json::to_vec(&message)
            .map_err(|e| Error::new(ErrorKind::Protocol(e.to_string()), ctx.clone()))?;
        line.push(b'\n');
        let send_and_wait = async {
            {
                let mut w = self.inner.writer.lock().await;
                if let Err(e) = w.write_all(&line).await {
                    return Err(match e.kind() {
                        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
                            Error::new(ErrorKind::Closed, ctx.clone())
                        }
                        _ => Error::io(e, ctx.clone()),
                    });
                }
            }
            rx.await
                .map_err(|_| Error::new(ErrorKind::Closed, ctx.clone()))
        };
        let result = tokio::time::timeout(timeout, send_and_wait).await;
        match result {
            Ok(r) => {
                if r.is_err() {
                    self.forget(id);
                }
                r
            }
            Err(_) => {
                self.forget(id);
                Err(Error::new(ErrorKind::Timeout(timeout), ctx))
            }
        }
    }

    fn forget(&self, id: u64) {
        if let Ok(mut p) = self.inner.pending.lock() {
            p.waiting.remove(&id);
        }
    }

    fn context(&self, command: &str) -> String {
        format!("QMP command {command} on {}", self.inner.path.display())
    }

    fn reply_to_result(&self, command: &str, mut reply: Value) -> Result<Value> {
        if let Some(err) = reply.get("error") {
            return Err(Error::new(
                ErrorKind::Qmp {
                    class: err["class"].as_str().unwrap_or("?").to_string(),
                    desc: err["desc"].as_str().unwrap_or("").to_string(),
                },
                self.context(command),
            ));
        }
        match reply.get_mut("return") {
            Some(v) => Ok(v.take()),
            None => Err(Error::new(
                ErrorKind::Protocol(format!("reply without return or error: {reply}")),
                self.context(command),
            )),
        }
    }

    /// `query-status`.
    pub async fn query_status(&self) -> Result<StatusInfo> {
        self.execute_as("query-status", Value::Null).await
    }

    /// `stop`: pauses the vCPUs.
    pub async fn stop(&self) -> Result<()> {
        self.execute("stop", Value::Null).await.map(drop)
    }

    /// `cont`: resumes the vCPUs.
    pub async fn cont(&self) -> Result<()> {
        self.execute("cont", Value::Null).await.map(drop)
    }

    /// `system_powerdown`: sends an ACPI power button press.
    pub async fn system_powerdown(&self) -> Result<()> {
        self.execute("system_powerdown", Value::Null)
            .await
            .map(drop)
    }

    /// `quit`: QEMU exits at once. The socket may close before the reply,
    /// which counts as success.
    pub async fn quit(&self) -> Result<()> {
        match self.execute("quit", Value::Null).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_closed() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `query-commands`: the names of the commands this QEMU knows.
    pub async fn command_names(&self) -> Result<Vec<String>> {
        let v = self.execute("query-commands", Value::Null).await?;
        Ok(v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c["name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default())
    }
}
