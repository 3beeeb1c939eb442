//! Where a repository's objects live: one [`Storage`] trait with a local
//! directory implementation ([`DirStore`]) and an S3-compatible one
//! ([`crate::s3::S3Store`]).
//!
//! Keys are relative, `/`-separated paths (`chunks/ab/ab12…`). A put is
//! atomic: readers see the old object (or none) or the whole new one. In a
//! directory that is a write to a temporary file in the same directory, an
//! `fsync` of it, then a `rename`; [`Storage::sync`] makes every rename
//! (and removal) durable and is called before every commit point (a
//! manifest), so a durable manifest never names a chunk that a crash can
//! take away. It fsyncs the directories whose entries changed since the
//! last sync, in parallel, rather than the whole filesystem (`syncfs`
//! would also write back whatever other programs left dirty on it, which
//! made a small incremental backup wait for unrelated writes).

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{ErrorKind as IoKind, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use crate::error::{Ctx, Error, ErrorKind, Result};

/// An object as listed: its key, size and last modification time.
#[derive(Debug, Clone)]
pub struct ObjectMeta {
    /// The object's key.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// Last modification (or last touch).
    pub modified: SystemTime,
}

/// The operations a repository needs from its storage.
pub trait Storage: Send + Sync {
    /// Where it is, for messages (`/srv/backup`, `s3://bucket/prefix`).
    fn describe(&self) -> String;
    /// The object's bytes, `None` when it does not exist.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// Store an object atomically (all or nothing), replacing any old one.
    fn put(&self, key: &str, data: &[u8]) -> Result<()>;
    /// Whether the object exists.
    fn exists(&self, key: &str) -> Result<bool>;
    /// Refresh the modification time of an existing object to now (the
    /// garbage collector never sweeps an object touched after it started).
    /// `data` is the object's content, for stores that can only touch by
    /// rewriting. Returns false when the object does not exist.
    fn touch(&self, key: &str, data: &dyn Fn() -> Result<Vec<u8>>) -> Result<bool>;
    /// Every object whose key starts with `prefix`.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>>;
    /// Remove an object (absent is not an error).
    fn delete(&self, key: &str) -> Result<()>;
    /// Remove the object only if it was not modified (or touched) at or
    /// after `cutoff`; returns whether it was removed.
    fn delete_if_older(&self, key: &str, cutoff: SystemTime) -> Result<bool>;
    /// Whether [`Storage::delete_if_older`] is atomic against a concurrent
    /// [`Storage::touch`]. When it is not, the garbage collector does not
    /// sweep while a backup is running.
    fn atomic_conditional_delete(&self) -> bool;
    /// Make every completed put durable.
    fn sync(&self) -> Result<()>;
}

/// A repository in a local directory.
pub struct DirStore {
    root: PathBuf,
    tmp_seq: AtomicU64,
    /// Directories whose entries changed since the last [`Storage::sync`].
    dirty: Mutex<HashSet<PathBuf>>,
}

/// Threads fsyncing directories in [`Storage::sync`] (ext4 and xfs commit
/// concurrent fsyncs together).
const SYNC_THREADS: usize = 8;

impl DirStore {
    /// A store rooted at `root` (which must exist for anything but init).
    pub fn new(root: impl Into<PathBuf>) -> DirStore {
        DirStore {
            root: root.into(),
            tmp_seq: AtomicU64::new(0),
            dirty: Mutex::new(HashSet::new()),
        }
    }

    /// Note that the directory holding `path` changed (entry added,
    /// renamed or removed).
    fn changed(&self, path: &Path) {
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        self.dirty
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(dir);
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    fn tmp_name(&self, dest: &Path) -> PathBuf {
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let name = dest
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        dest.with_file_name(format!(".tmp-{}-{n}-{name}", std::process::id()))
    }
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Storage for DirStore {
    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        match fs::read(self.path(key)) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.kind() == IoKind::NotFound => Ok(None),
            Err(e) => Err(Error::with_source(
                ErrorKind::Storage,
                format!("read {key} in repository {}", self.describe()),
                e,
            )),
        }
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        let dest = self.path(key);
        let ctx = || format!("write {key} in repository {}", self.describe());
        let parent = dest.parent().unwrap_or(&self.root).to_path_buf();
        if !parent.exists() {
            fs::create_dir_all(&parent).ctx(ErrorKind::Storage, ctx)?;
            if let Some(pp) = parent.parent() {
                fsync_dir(pp).ctx(ErrorKind::Storage, ctx)?;
            }
        }
        let tmp = self.tmp_name(&dest);
        let res = (|| -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_data()?;
            fs::rename(&tmp, &dest)
        })();
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(Error::with_source(ErrorKind::Storage, ctx(), e));
        }
        self.changed(&dest);
        Ok(())
    }

    fn exists(&self, key: &str) -> Result<bool> {
        match fs::symlink_metadata(self.path(key)) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == IoKind::NotFound => Ok(false),
            Err(e) => Err(Error::with_source(
                ErrorKind::Storage,
                format!("stat {key} in repository {}", self.describe()),
                e,
            )),
        }
    }

    fn touch(&self, key: &str, _data: &dyn Fn() -> Result<Vec<u8>>) -> Result<bool> {
        let path = self.path(key);
        let f = match File::options().write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == IoKind::NotFound => return Ok(false),
            Err(e) => {
                return Err(Error::with_source(
                    ErrorKind::Storage,
                    format!("touch {key} in repository {}", self.describe()),
                    e,
                ));
            }
        };
        let now = [
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_NOW,
            },
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_NOW,
            },
        ];
        // SAFETY: `f` is an open file descriptor for the whole call and `now`
        // is a valid array of two timespecs.
        let rc = unsafe { libc::futimens(f.as_raw_fd(), now.as_ptr()) };
        if rc != 0 {
            return Err(Error::with_source(
                ErrorKind::Storage,
                format!("touch {key} in repository {}", self.describe()),
                std::io::Error::last_os_error(),
            ));
        }
        // Another writer may have renamed it into place without syncing
        // yet: the next sync makes its directory entry durable too, before
        // a manifest of ours names it.
        self.changed(&path);
        Ok(true)
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let mut out = Vec::new();
        let ctx = || format!("list {prefix} in repository {}", self.describe());
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let rd = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == IoKind::NotFound => continue,
                Err(e) => return Err(Error::with_source(ErrorKind::Storage, ctx(), e)),
            };
            for ent in rd {
                let ent = ent.ctx(ErrorKind::Storage, ctx)?;
                let path = ent.path();
                let rel = path
                    .strip_prefix(&self.root)
                    .unwrap_or(&path)
                    .to_string_lossy()
                    .into_owned();
                let name = ent.file_name();
                if name.to_string_lossy().starts_with(".tmp-") {
                    continue;
                }
                let meta = match ent.metadata() {
                    Ok(m) => m,
                    Err(e) if e.kind() == IoKind::NotFound => continue,
                    Err(e) => return Err(Error::with_source(ErrorKind::Storage, ctx(), e)),
                };
                if meta.is_dir() {
                    // Descend only where the prefix can match.
                    let relslash = format!("{rel}/");
                    if prefix.starts_with(&relslash) || relslash.starts_with(prefix) {
                        stack.push(path);
                    }
                } else if rel.starts_with(prefix) {
                    out.push(ObjectMeta {
                        key: rel,
                        size: meta.len(),
                        modified: meta.modified().ctx(ErrorKind::Storage, ctx)?,
                    });
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key);
        match fs::remove_file(&path) {
            Ok(()) => {
                self.changed(&path);
                Ok(())
            }
            Err(e) if e.kind() == IoKind::NotFound => Ok(()),
            Err(e) => Err(Error::with_source(
                ErrorKind::Storage,
                format!("delete {key} in repository {}", self.describe()),
                e,
            )),
        }
    }

    /// Rename the object aside first, then look at its time: a touch either
    /// happened before the rename (its time is seen and the object is put
    /// back) or after it (it finds no object and the writer uploads it
    /// again). So a touched object is never lost.
    fn delete_if_older(&self, key: &str, cutoff: SystemTime) -> Result<bool> {
        let ctx = || format!("sweep {key} in repository {}", self.describe());
        let path = self.path(key);
        let aside = path.with_file_name(format!(
            ".tmp-gc-{}",
            path.file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        match fs::metadata(&path) {
            Ok(m) if m.modified().ctx(ErrorKind::Storage, ctx)? >= cutoff => return Ok(false),
            Ok(_) => {}
            Err(e) if e.kind() == IoKind::NotFound => return Ok(false),
            Err(e) => return Err(Error::with_source(ErrorKind::Storage, ctx(), e)),
        }
        match fs::rename(&path, &aside) {
            Ok(()) => self.changed(&path),
            Err(e) if e.kind() == IoKind::NotFound => return Ok(false),
            Err(e) => return Err(Error::with_source(ErrorKind::Storage, ctx(), e)),
        }
        let m = fs::metadata(&aside).ctx(ErrorKind::Storage, ctx)?;
        if m.modified().ctx(ErrorKind::Storage, ctx)? >= cutoff {
            // Touched meanwhile: put it back unless a writer already
            // uploaded it again.
            if fs::hard_link(&aside, &path).is_err() && !path.exists() {
                fs::rename(&aside, &path).ctx(ErrorKind::Storage, ctx)?;
                return Ok(false);
            }
            fs::remove_file(&aside).ctx(ErrorKind::Storage, ctx)?;
            return Ok(false);
        }
        fs::remove_file(&aside).ctx(ErrorKind::Storage, ctx)?;
        Ok(true)
    }

    fn atomic_conditional_delete(&self) -> bool {
        true
    }

    fn sync(&self) -> Result<()> {
        let dirs: Vec<PathBuf> =
            std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|e| e.into_inner()))
                .into_iter()
                .collect();
        let failed: Mutex<Option<Error>> = Mutex::new(None);
        let next = AtomicU64::new(0);
        let work = || {
            while let Some(d) = dirs.get(next.fetch_add(1, Ordering::Relaxed) as usize) {
                if let Err(e) = fsync_dir(d) {
                    failed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert(Error::with_source(
                            ErrorKind::Storage,
                            format!("sync repository {}: fsync {}", self.describe(), d.display()),
                            e,
                        ));
                }
            }
        };
        if dirs.len() <= 1 {
            work();
        } else {
            std::thread::scope(|s| {
                for _ in 0..SYNC_THREADS.min(dirs.len()) {
                    s.spawn(work);
                }
            });
        }
        match failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(e) => {
                // Not known durable: sync them again next time.
                self.dirty
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend(dirs);
                Err(e)
            }
            None => Ok(()),
        }
    }
}
