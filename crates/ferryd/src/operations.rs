//! The kinds of operation this host runs, each a plan of journaled steps.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;

use ferry_ops::{BoxFuture, Manager, Plan, Recovery, Step, StepContext, StepError};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::daemon::App;

pub fn register(m: &Manager<App>) {
    m.register("volume.import", import_plan);
}

/// Parameters of `volume.import`.
#[derive(Debug, Clone, Deserialize)]
pub struct ImportParams {
    pub volume: String,
    /// A raw disk image readable by ferryd.
    pub path: PathBuf,
}

fn import_plan(params: &Value) -> Result<Plan<App>, String> {
    let p: ImportParams = serde_json::from_value(params.clone()).map_err(|e| e.to_string())?;
    let size = std::fs::metadata(&p.path)
        .map_err(|e| format!("cannot read {}: {e}", p.path.display()))?
        .len();
    let data = allocated_bytes(&p.path).unwrap_or(size).max(1);
    Ok(Plan::new(
        &format!("import {} into volume {}", p.path.display(), p.volume),
        vec![
            (Box::new(CreateVolume { p: p.clone(), size }), 0.0),
            (Box::new(CopyData { p }), data as f64),
        ],
    ))
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

/// Copies the image's data into the volume: holes and all-zero blocks are
/// skipped (the volume reads zeroes there). Idempotent, so a crash rolls it
/// forward by copying again.
struct CopyData {
    p: ImportParams,
}

const BLOCK: usize = 1 << 20;

impl Step<App> for CopyData {
    fn name(&self) -> &str {
        "copy data"
    }

    fn recovery(&self) -> Recovery {
        Recovery::Retry
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let vol = cx
                .app
                .pool
                .volume(&self.p.volume)
                .map_err(StepError::failed)?;
            let file = File::open(&self.p.path)
                .map_err(|e| StepError::failed(format!("{}: {e}", self.p.path.display())))?;
            let extents = data_extents(&file).map_err(StepError::failed)?;
            let total: u64 = extents.iter().map(|(s, e)| e - s).sum::<u64>().max(1);
            let mut done = 0u64;
            let mut written = 0u64;
            let mut buf = vec![0u8; BLOCK];
            for (start, end) in extents {
                let mut off = start;
                while off < end {
                    if cx.is_cancelled() {
                        return Err(StepError::Cancelled);
                    }
                    let n = ((end - off) as usize).min(BLOCK);
                    let (f, v) = (&file, &vol);
                    let b = &mut buf[..n];
                    // Short blocking I/O on a page-cache-friendly path;
                    // block_in_place keeps the runtime's other tasks moving.
                    let wrote = tokio::task::block_in_place(|| -> Result<bool, StepError> {
                        f.read_exact_at(b, off).map_err(StepError::failed)?;
                        if b.iter().all(|x| *x == 0) {
                            return Ok(false);
                        }
                        v.write_at(off, b).map_err(StepError::failed)?;
                        Ok(true)
                    })?;
                    if wrote {
                        written += n as u64;
                    }
                    off += n as u64;
                    done += n as u64;
                    cx.set_fraction(done as f64 / total as f64);
                }
            }
            tokio::task::block_in_place(|| vol.flush()).map_err(StepError::failed)?;
            cx.log(format!(
                "copied {written} bytes of data into {}",
                self.p.volume
            ));
            Ok(json!({ "written": written }))
        })
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ferry_pool::Error> + Send + 'static,
) -> Result<T, StepError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(StepError::failed)?
        .map_err(StepError::failed)
}

/// The data extents of a file (SEEK_DATA/SEEK_HOLE), whole file if the
/// file system cannot say.
fn data_extents(f: &File) -> std::io::Result<Vec<(u64, u64)>> {
    let len = f.metadata()?.len();
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut off: i64 = 0;
    while (off as u64) < len {
        // SAFETY: lseek on a file descriptor we own; no memory is touched.
        let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Ok(vec![(0, len)]);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let hole = if hole < 0 { len as i64 } else { hole };
        out.push((data as u64, hole as u64));
        off = hole;
    }
    Ok(out)
}

fn allocated_bytes(path: &std::path::Path) -> Option<u64> {
    let f = File::open(path).ok()?;
    Some(data_extents(&f).ok()?.iter().map(|(s, e)| e - s).sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_of_a_sparse_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let f = File::create(&path).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 4 << 20).unwrap();
        f.sync_all().unwrap();
        let ext = data_extents(&File::open(&path).unwrap()).unwrap();
        let total: u64 = ext.iter().map(|(s, e)| e - s).sum();
        assert!(total < 8 << 20, "{ext:?}");
        assert!(
            ext.iter().any(|(s, e)| *s <= 4 << 20 && *e > 4 << 20),
            "{ext:?}"
        );
    }
}
