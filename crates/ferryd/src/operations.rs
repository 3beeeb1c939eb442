//! The kinds of operation this host runs, each a plan of journaled steps.
//!
//! - `volume.import`: create volume → copy data (from any image qemu reads,
//!   through a private `qemu-nbd`, skipping holes and zeroes).
//! - `volume.export`: snapshot the volume → create the target image →
//!   copy data (from the snapshot, through `qemu-nbd` on the target) →
//!   delete the snapshot. Compensation removes the partial file and the
//!   snapshot.
//!
//! What a `kill -9` at each step leaves and how recovery handles it is
//! tested by `tests/restart.rs`.

mod transfer;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_nbd::client::Address;
use ferry_nbd::proto::{CONTEXT_ALLOCATION, STATE_ZERO};
use ferry_nbd::{Client, ClientConfig};
use ferry_ops::{BoxFuture, Manager, Plan, Recovery, Step, StepContext, StepError, test_pause};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};

pub use transfer::{EXPORT_FORMATS, IMPORT_FORMATS, ImageError, ImageInfo, inspect};
use transfer::{QemuNbd, create_image, sync_file_and_dir};

use crate::daemon::App;

pub fn register(m: &Manager<App>) {
    m.register("volume.import", import_plan);
    m.register("volume.export", export_plan);
}

/// Copy unit of import and export.
const BLOCK: u64 = 1 << 20;
/// Blocks in flight at once.
const IN_FLIGHT: usize = 4;

/// Parameters of `volume.import`. `format` and `size` are measured when
/// the request is accepted; operations journaled before they existed are
/// measured again when their plan is built.
#[derive(Debug, Clone, Deserialize)]
pub struct ImportParams {
    pub volume: String,
    /// A disk image readable by ferryd.
    pub path: PathBuf,
    #[serde(default)]
    pub format: Option<String>,
    /// The image's virtual size: the new volume's size.
    #[serde(default)]
    pub size: Option<u64>,
    /// The image's allocation on the host (the copy step's weight).
    #[serde(default)]
    pub allocated: Option<u64>,
}

fn import_plan(params: &Value) -> Result<Plan<App>, String> {
    let mut p: ImportParams = serde_json::from_value(params.clone()).map_err(|e| e.to_string())?;
    if p.format.is_none() || p.size.is_none() {
        let info = inspect(&p.path, p.format.as_deref()).map_err(|e| e.message)?;
        p.format = Some(info.format);
        p.size = Some(info.virtual_size);
        p.allocated = Some(info.actual_size);
    }
    let size = p.size.unwrap_or_default();
    let data = p.allocated.unwrap_or(size).max(1);
    Ok(Plan::new(
        &format!("import {} into volume {}", p.path.display(), p.volume),
        vec![
            (Box::new(CreateVolume { p: p.clone(), size }), 0.0),
            (Box::new(CopyIn { p }), data as f64),
        ],
    ))
}

/// A private unix socket for this operation's qemu-nbd (short: socket
/// paths are limited to 107 bytes).
fn socket_for(cx: &StepContext<App>, what: &str) -> PathBuf {
    let short: String = cx.op_id.chars().filter(|c| *c != '-').take(12).collect();
    cx.app.dir.run().join(format!("{what}-{short}.sock"))
}

async fn start_qemu_nbd(
    image: &Path,
    format: &str,
    read_only: bool,
    socket: PathBuf,
) -> Result<QemuNbd, StepError> {
    let (image, format) = (image.to_path_buf(), format.to_string());
    tokio::task::spawn_blocking(move || QemuNbd::start(&image, &format, read_only, &socket))
        .await
        .map_err(StepError::failed)?
        .map_err(StepError::failed)
}

async fn connect(nbd: &QemuNbd, contexts: &[&str]) -> Result<Client, StepError> {
    let cfg = ClientConfig {
        export: String::new(),
        meta_contexts: contexts.iter().map(|c| c.to_string()).collect(),
        tls: None,
    };
    // qemu-nbd creates its socket file at bind(), a moment before
    // listen(): a connection in between is refused. It accepts only one
    // client (it exits when that one leaves), so no probing connection
    // may be made; the real one is retried for a short while instead.
    let addr = Address::Unix(nbd.socket().to_path_buf());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match Client::connect(&addr, &cfg).await {
            Ok(c) => return Ok(c),
            Err(e) if std::time::Instant::now() < deadline => {
                tracing::debug!("qemu-nbd not accepting yet: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => return Err(StepError::failed(format!("connecting to qemu-nbd: {e}"))),
        }
    }
}

/// Splits ranges into blocks of at most [`BLOCK`] bytes.
fn blocks(ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(start, end) in ranges {
        let mut off = start;
        while off < end {
            let n = (end - off).min(BLOCK);
            out.push((off, n));
            off += n;
        }
    }
    out
}

/// Counts copied bytes, reports the step's fraction, and reaches the
/// test-only pause point `<kind>:copying` once, half-way.
struct Meter<'a> {
    cx: &'a StepContext<App>,
    total: u64,
    done: u64,
    written: u64,
    paused: bool,
    point: &'static str,
}

impl Meter<'_> {
    async fn add(&mut self, n: u64, wrote: bool) {
        self.done += n;
        if wrote {
            self.written += n;
        }
        self.cx
            .set_fraction(self.done as f64 / self.total.max(1) as f64);
        if !self.paused && self.written > 0 && self.done * 2 >= self.total {
            self.paused = true;
            test_pause(self.point).await;
        }
    }
}

struct CreateVolume {
    p: ImportParams,
    size: u64,
}

impl Step<App> for CreateVolume {
    fn name(&self) -> &str {
        "create volume"
    }

    fn intent(&self, _cx: &StepContext<App>) -> Result<Value, StepError> {
        Ok(json!({ "volume": self.p.volume, "size": self.size }))
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let pool = cx.app.pool.clone();
            let (name, size) = (self.p.volume.clone(), self.size);
            blocking(move || pool.create_volume(&name, size).map(drop)).await?;
            cx.log(format!(
                "created volume {} of {} bytes",
                self.p.volume, self.size
            ));
            Ok(json!({ "size": self.size }))
        })
    }

    fn undo<'a>(
        &'a self,
        cx: &'a StepContext<App>,
        intent: &'a Value,
        _result: Option<&'a Value>,
    ) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let pool = cx.app.pool.clone();
            let name = intent["volume"].as_str().unwrap_or_default().to_string();
            blocking(move || match pool.delete_volume(&name) {
                Err(e) if e.kind() == ferry_pool::ErrorKind::NotFound => Ok(()),
                r => r,
            })
            .await
        })
    }
}

/// Copies the image's data into the volume through a private read-only
/// `qemu-nbd`: extents the image reports as zero (holes, unallocated or
/// zero clusters) and all-zero blocks are skipped, so the volume stays
/// thin. Idempotent (the same data lands at the same places), so a crash
/// rolls it forward by copying again with a fresh `qemu-nbd`.
struct CopyIn {
    p: ImportParams,
}

impl Step<App> for CopyIn {
    fn name(&self) -> &str {
        "copy data"
    }

    fn recovery(&self) -> Recovery {
        Recovery::Retry
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let path = self.p.path.display();
            let vol = cx
                .app
                .pool
                .volume(&self.p.volume)
                .map_err(StepError::failed)?;
            let format = self.p.format.as_deref().unwrap_or("raw");
            let nbd = start_qemu_nbd(&self.p.path, format, true, socket_for(cx, "import")).await?;
            let client = connect(&nbd, &[CONTEXT_ALLOCATION]).await?;
            let size = client.size();
            if size != vol.size() {
                return Err(StepError::failed(format!(
                    "{path} is now {size} bytes but volume {} is {}: the image changed after the import started",
                    self.p.volume,
                    vol.size()
                )));
            }
            let ranges = data_ranges(&client, size)
                .await
                .map_err(|e| StepError::failed(format!("block status of {path}: {e}")))?;
            let mut meter = Meter {
                cx,
                total: span_bytes(&ranges),
                done: 0,
                written: 0,
                paused: false,
                point: "volume.import:copying",
            };
            let c = &client;
            let mut reads = futures::stream::iter(blocks(&ranges))
                .map(|(off, n)| async move { c.read(off, n as u32).await.map(|b| (off, b)) })
                .buffered(IN_FLIGHT);
            while let Some(r) = reads.next().await {
                if cx.is_cancelled() {
                    return Err(StepError::Cancelled);
                }
                let (off, buf) =
                    r.map_err(|e| StepError::failed(format!("reading {path}: {e}")))?;
                let wrote = !buf.iter().all(|b| *b == 0);
                if wrote {
                    tokio::task::block_in_place(|| vol.write_at(off, &buf))
                        .map_err(StepError::failed)?;
                }
                meter.add(buf.len() as u64, wrote).await;
            }
            drop(reads);
            tokio::task::block_in_place(|| vol.flush()).map_err(StepError::failed)?;
            let _ = client.disconnect().await;
            drop(nbd);
            cx.log(format!(
                "copied {} bytes of data from {path} ({format}) into {}",
                meter.written, self.p.volume
            ));
            Ok(json!({ "written": meter.written, "format": format }))
        })
    }
}

/// The ranges of an NBD export that may hold non-zero data
/// (`base:allocation` extents without the zero flag), merged.
async fn data_ranges(c: &Client, size: u64) -> ferry_nbd::Result<Vec<(u64, u64)>> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let n = (size - pos).min(1 << 30) as u32;
        let extents = c.block_status(CONTEXT_ALLOCATION, pos, n).await?;
        let mut got = 0u64;
        for x in extents {
            let len = x.length.min(size - pos - got);
            let start = pos + got;
            if x.flags & STATE_ZERO == 0 && len > 0 {
                push_range(&mut out, start, start + len);
            }
            got += len;
            if pos + got >= size {
                break;
            }
        }
        if got == 0 {
            return Err(ferry_nbd::Error::new(
                ferry_nbd::ErrorKind::Protocol,
                "empty block status reply",
            ));
        }
        pos += got;
    }
    Ok(out)
}

fn push_range(out: &mut Vec<(u64, u64)>, start: u64, end: u64) {
    match out.last_mut() {
        Some(last) if last.1 >= start => last.1 = last.1.max(end),
        _ => out.push((start, end)),
    }
}

/// Parameters of `volume.export`.
#[derive(Debug, Clone, Deserialize)]
pub struct ExportParams {
    pub volume: String,
    /// The image file to create; it must not exist when the export starts.
    pub path: PathBuf,
    /// `raw` or `qcow2`.
    pub format: String,
    /// Allocated bytes of the volume when the export was accepted (the copy
    /// step's weight).
    #[serde(default)]
    pub bytes: u64,
}

fn export_plan(params: &Value) -> Result<Plan<App>, String> {
    let p: ExportParams = serde_json::from_value(params.clone()).map_err(|e| e.to_string())?;
    if !EXPORT_FORMATS.contains(&p.format.as_str()) {
        return Err(format!(
            "format {:?} is not supported; use one of {}",
            p.format,
            EXPORT_FORMATS.join(", ")
        ));
    }
    let weight = p.bytes.max(1) as f64;
    Ok(Plan::new(
        &format!(
            "export volume {} to {} ({})",
            p.volume,
            p.path.display(),
            p.format
        ),
        vec![
            (Box::new(SnapshotVolume { p: p.clone() }), 0.0),
            (Box::new(CreateTarget { p: p.clone() }), 0.0),
            (Box::new(CopyOut { p: p.clone() }), weight),
            (Box::new(DeleteSnapshot), 0.0),
        ],
    ))
}

/// The temporary snapshot of an export. Names starting with `.` cannot be
/// made through the API, so it cannot collide with a user's snapshot.
fn temp_snapshot(op_id: &str) -> String {
    format!(".export-{op_id}")
}

async fn delete_snapshot_if_present(cx: &StepContext<App>, name: &str) -> Result<bool, StepError> {
    let pool = cx.app.pool.clone();
    let name = name.to_string();
    blocking(move || match pool.delete_snapshot(&name) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ferry_pool::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    })
    .await
}

/// A snapshot of the volume, so that the export is one point in time while
/// a VM keeps writing. Idempotent: a snapshot the interrupted run made is
/// taken as is.
struct SnapshotVolume {
    p: ExportParams,
}

impl Step<App> for SnapshotVolume {
    fn name(&self) -> &str {
        "snapshot volume"
    }

    fn recovery(&self) -> Recovery {
        Recovery::Retry
    }

    fn intent(&self, cx: &StepContext<App>) -> Result<Value, StepError> {
        Ok(json!({ "volume": self.p.volume, "snapshot": temp_snapshot(&cx.op_id) }))
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let snap = temp_snapshot(&cx.op_id);
            let pool = cx.app.pool.clone();
            let (volume, name) = (self.p.volume.clone(), snap.clone());
            let size = blocking(move || {
                if let Some(s) = pool.snapshots().into_iter().find(|s| s.name == name) {
                    return Ok(s.size);
                }
                pool.snapshot(&volume, &name).map(|s| s.size)
            })
            .await?;
            cx.log(format!(
                "temporary snapshot {snap} of volume {} ({size} bytes)",
                self.p.volume
            ));
            Ok(json!({ "snapshot": snap, "size": size }))
        })
    }

    fn undo<'a>(
        &'a self,
        cx: &'a StepContext<App>,
        intent: &'a Value,
        _result: Option<&'a Value>,
    ) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let name = intent["snapshot"].as_str().unwrap_or_default();
            if delete_snapshot_if_present(cx, name).await? {
                cx.log(format!("deleted temporary snapshot {name}"));
            }
            Ok(())
        })
    }
}

fn snapshot_of(cx: &StepContext<App>) -> Result<(String, u64), StepError> {
    let r = cx
        .result_of("snapshot volume")
        .ok_or_else(|| StepError::failed("no result of step snapshot volume"))?;
    match (r["snapshot"].as_str(), r["size"].as_u64()) {
        (Some(s), Some(n)) => Ok((s.to_string(), n)),
        _ => Err(StepError::failed(format!(
            "malformed result of step snapshot volume: {r}"
        ))),
    }
}

/// Creates the empty target image. The path was free when the export was
/// accepted; from then on it belongs to the operation, so a retry after a
/// crash replaces what an interrupted run left there.
struct CreateTarget {
    p: ExportParams,
}

impl Step<App> for CreateTarget {
    fn name(&self) -> &str {
        "create target"
    }

    fn recovery(&self) -> Recovery {
        Recovery::Retry
    }

    fn intent(&self, _cx: &StepContext<App>) -> Result<Value, StepError> {
        Ok(json!({ "path": self.p.path, "format": self.p.format }))
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let (_, size) = snapshot_of(cx)?;
            let (path, format) = (self.p.path.clone(), self.p.format.clone());
            tokio::task::spawn_blocking(move || create_image(&path, &format, size))
                .await
                .map_err(StepError::failed)?
                .map_err(StepError::failed)?;
            cx.log(format!(
                "created {} image {} of {size} bytes",
                self.p.format,
                self.p.path.display()
            ));
            Ok(json!({ "size": size }))
        })
    }

    fn undo<'a>(
        &'a self,
        cx: &'a StepContext<App>,
        intent: &'a Value,
        _result: Option<&'a Value>,
    ) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let Some(path) = intent["path"].as_str().map(PathBuf::from) else {
                return Err(StepError::failed(format!("malformed intent: {intent}")));
            };
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    if let Some(dir) = path.parent() {
                        let _ = File::open(dir).and_then(|d| d.sync_all());
                    }
                    cx.log(format!("removed partial export {}", path.display()));
                    Ok(())
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(StepError::failed(format!(
                    "cannot remove {}: {e}",
                    path.display()
                ))),
            }
        })
    }
}

/// Copies the snapshot's data into the target through a private
/// `qemu-nbd` on it (which writes the image format), then flushes and lets
/// `qemu-nbd` close the image cleanly. Idempotent: the snapshot is frozen.
struct CopyOut {
    p: ExportParams,
}

impl Step<App> for CopyOut {
    fn name(&self) -> &str {
        "copy data"
    }

    fn recovery(&self) -> Recovery {
        Recovery::Retry
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let (snap_name, size) = snapshot_of(cx)?;
            let target = self.p.path.display();
            let pool = cx.app.pool.clone();
            let (volume, name) = (self.p.volume.clone(), snap_name.clone());
            let (snap, ranges) = blocking(move || {
                let snap = pool.open_snapshot(&name)?;
                let ranges = snapshot_data_ranges(&pool, &volume, &name, size)?;
                Ok((snap, ranges))
            })
            .await?;
            let nbd = start_qemu_nbd(
                &self.p.path,
                &self.p.format,
                false,
                socket_for(cx, "export"),
            )
            .await?;
            let client = connect(&nbd, &[]).await?;
            if client.size() < size {
                return Err(StepError::failed(format!(
                    "{target} holds {} bytes, less than the {size} of snapshot {snap_name}",
                    client.size()
                )));
            }
            let mut meter = Meter {
                cx,
                total: span_bytes(&ranges),
                done: 0,
                written: 0,
                paused: false,
                point: "volume.export:copying",
            };
            let (c, s, sn, tg) = (&client, &snap, &snap_name, &target);
            let mut writes = futures::stream::iter(blocks(&ranges))
                .map(|(off, n)| async move {
                    let mut buf = vec![0u8; n as usize];
                    tokio::task::block_in_place(|| s.read_at(off, &mut buf)).map_err(|e| {
                        StepError::failed(format!("reading snapshot {sn} at {off}: {e}"))
                    })?;
                    if buf.iter().all(|b| *b == 0) {
                        return Ok((n, false));
                    }
                    c.write_at(off, &buf, false)
                        .await
                        .map_err(|e| StepError::failed(format!("writing {tg} at {off}: {e}")))?;
                    Ok::<_, StepError>((n, true))
                })
                .buffered(IN_FLIGHT);
            while let Some(r) = writes.next().await {
                if cx.is_cancelled() {
                    return Err(StepError::Cancelled);
                }
                let (n, wrote) = r?;
                meter.add(n, wrote).await;
            }
            drop(writes);
            client
                .flush()
                .await
                .map_err(|e| StepError::failed(format!("flushing {target}: {e}")))?;
            let _ = client.disconnect().await;
            drop(client);
            let path = self.p.path.clone();
            tokio::task::spawn_blocking(move || {
                nbd.wait_exit(Duration::from_secs(60))?;
                sync_file_and_dir(&path)
            })
            .await
            .map_err(StepError::failed)?
            .map_err(StepError::failed)?;
            cx.log(format!(
                "copied {} bytes of data from snapshot {snap_name} into {target}",
                meter.written
            ));
            Ok(json!({ "written": meter.written }))
        })
    }
}

/// The ranges of a snapshot that may hold data: what the live volume has
/// allocated, plus every chunk written (or trimmed) since the snapshot —
/// for the other chunks the live mapping is the snapshot's.
pub(crate) fn snapshot_data_ranges(
    pool: &ferry_pool::Pool,
    volume: &str,
    snapshot: &str,
    size: u64,
) -> ferry_pool::Result<Vec<(u64, u64)>> {
    let vol = pool.volume(volume)?;
    let mut all: Vec<(u64, u64)> = vol
        .allocation(0, size.min(vol.size()))?
        .into_iter()
        .filter(|x| x.kind == ferry_pool::ExtentKind::Data)
        .map(|x| (x.offset, x.offset + x.length))
        .collect();
    for r in pool.changed_between(volume, snapshot, None)? {
        if r.start < size {
            all.push((r.start, r.end.min(size)));
        }
    }
    all.sort_unstable();
    let mut out = Vec::new();
    for (s, e) in all {
        push_range(&mut out, s, e);
    }
    Ok(out)
}

/// Deletes the temporary snapshot. A snapshot that cannot be deleted (say,
/// someone exported it over NBD meanwhile) does not undo a complete export:
/// the log names it for the operator.
struct DeleteSnapshot;

impl Step<App> for DeleteSnapshot {
    fn name(&self) -> &str {
        "delete snapshot"
    }

    fn recovery(&self) -> Recovery {
        Recovery::Retry
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let (snap, _) = snapshot_of(cx)?;
            match delete_snapshot_if_present(cx, &snap).await {
                Ok(_) => {
                    cx.log(format!("deleted temporary snapshot {snap}"));
                    Ok(json!({ "deleted": snap }))
                }
                Err(e) => {
                    cx.log(format!(
                        "temporary snapshot {snap} NOT deleted ({e}); the export is complete; delete the snapshot by hand"
                    ));
                    Ok(json!({ "left": snap }))
                }
            }
        })
    }
}

/// Runs a pool call off the async runtime inside a step.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ferry_pool::Error> + Send + 'static,
) -> Result<T, StepError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(StepError::failed)?
        .map_err(StepError::failed)
}

/// Bytes covered by `[start, end)` ranges.
pub(crate) fn span_bytes(ranges: &[(u64, u64)]) -> u64 {
    ranges.iter().map(|(s, e)| e - s).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_split_ranges() {
        let b = blocks(&[(0, BLOCK + 5), (10 * BLOCK, 10 * BLOCK + 1)]);
        assert_eq!(b, [(0, BLOCK), (BLOCK, 5), (10 * BLOCK, 1)]);
    }

    #[test]
    fn ranges_merge_when_they_touch_or_overlap() {
        let mut v = Vec::new();
        push_range(&mut v, 0, 10);
        push_range(&mut v, 10, 20);
        push_range(&mut v, 15, 18);
        push_range(&mut v, 30, 40);
        assert_eq!(v, [(0, 20), (30, 40)]);
    }
}
