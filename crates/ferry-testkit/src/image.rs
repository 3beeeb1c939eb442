//! The test guest's boot files: the installed Debian cloud kernel and an
//! initramfs built from busybox-static, the virtio modules, `qemu-ga`, the
//! `ferry-guest` workload tool and the shared libraries `ldd` lists.
//!
//! Built once per cargo target directory into
//! `<target>/ferry-testkit/guest-<hash>/` where the hash covers every input
//! (kernel, modules, programs, libraries, scripts). A build happens in a
//! private temporary directory that is renamed into place, so test
//! processes that build at the same time never see a half-built image: the
//! first rename wins and the others use its result.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use tokio::sync::OnceCell;

use crate::error::{Error, ErrorKind, Result};

/// The modules the guest loads, in this order.
pub const MODULES: [&str; 7] = [
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
];

/// Bumped whenever the layout of the image changes.
const BUILDER_VERSION: u32 = 1;

const INIT: &str = include_str!("init.sh");
const SHUTDOWN: &str = include_str!("shutdown.sh");

/// The boot files of the test guest.
#[derive(Debug, Clone)]
pub struct GuestImage {
    dir: PathBuf,
    kernel_version: String,
    guest_tool: PathBuf,
}

static IMAGE: OnceCell<GuestImage> = OnceCell::const_new();

impl GuestImage {
    /// The guest image of this target directory, built on first use.
    pub async fn get() -> Result<GuestImage> {
        IMAGE
            .get_or_try_init(|| async {
                tokio::task::spawn_blocking(build).await.map_err(|e| {
                    Error::with_source(ErrorKind::Image, "image builder panicked", e)
                })?
            })
            .await
            .cloned()
    }

    /// The kernel (`bzImage`).
    pub fn kernel(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }

    /// The initramfs (gzip-compressed newc cpio).
    pub fn initramfs(&self) -> PathBuf {
        self.dir.join("initramfs.cpio.gz")
    }

    /// The kernel's release string, e.g. `6.1.0-56-cloud-amd64`.
    pub fn kernel_version(&self) -> &str {
        &self.kernel_version
    }

    /// The `ferry-guest` binary on the host (the same one the guest runs).
    pub fn guest_tool(&self) -> &Path {
        &self.guest_tool
    }

    /// The directory holding the image files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// The cargo target directory this process was built into (the first
/// ancestor of the executable holding `CACHEDIR.TAG`), else
/// `$CARGO_TARGET_DIR`, else the system's temporary directory.
pub fn target_dir() -> PathBuf {
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.ancestors().find(|d| d.join("CACHEDIR.TAG").is_file())
    {
        return dir.to_owned();
    }
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => PathBuf::from(d),
        None => std::env::temp_dir(),
    }
}

/// The kit's own directory inside the target directory.
pub fn kit_dir() -> PathBuf {
    target_dir().join("ferry-testkit")
}

fn image_err(what: impl Into<String>) -> Error {
    Error::new(ErrorKind::Image, what)
}

fn build() -> Result<GuestImage> {
    let kit = kit_dir();
    std::fs::create_dir_all(&kit).map_err(|e| Error::io("creating", &kit, e))?;
    let guest_tool = build_guest_tool(&kit)?;
    let (kernel_version, vmlinuz, modules_dir) = find_kernel()?;

    // Everything that goes into the initramfs: destination -> source.
    let mut files: BTreeMap<String, PathBuf> = BTreeMap::new();
    let busybox = which("busybox")?;
    files.insert("bin/busybox".into(), busybox.clone());
    let qemu_ga = ["/usr/sbin/qemu-ga", "/usr/bin/qemu-ga"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| image_err("qemu-ga not found (install qemu-guest-agent)"))?;
    files.insert("usr/bin/qemu-ga".into(), qemu_ga.clone());
    files.insert("bin/ferry-guest".into(), guest_tool.clone());
    for program in [&qemu_ga, &guest_tool] {
        for lib in ldd(program)? {
            let dest = lib.to_string_lossy().trim_start_matches('/').to_owned();
            files.insert(dest, lib);
        }
    }
    for m in MODULES {
        files.insert(format!("lib/modules/{m}.ko"), module_file(&modules_dir, m)?);
    }

    let mut h = DefaultHasher::new();
    (BUILDER_VERSION, &kernel_version, INIT, SHUTDOWN).hash(&mut h);
    hash_file_meta(&vmlinuz, &mut h)?;
    for (dest, src) in &files {
        dest.hash(&mut h);
        hash_file_meta(src, &mut h)?;
    }
    // The workload tool is rebuilt in place: hash its content.
    std::fs::read(&guest_tool)
        .map_err(|e| Error::io("reading", &guest_tool, e))?
        .hash(&mut h);
    let dir = kit.join(format!("guest-{:016x}", h.finish()));
    let image = GuestImage {
        dir: dir.clone(),
        kernel_version: kernel_version.clone(),
        guest_tool,
    };
    if dir.join("initramfs.cpio.gz").is_file() {
        return Ok(image);
    }

    let tmp = tempfile::Builder::new()
        .prefix(".guest-build-")
        .tempdir_in(&kit)
        .map_err(|e| Error::io("creating a build directory in", &kit, e))?;
    let root = tmp.path().join("root");
    assemble(&root, &files, &busybox)?;
    let initramfs = tmp.path().join("initramfs.cpio.gz");
    pack(&root, &initramfs)?;
    copy(&vmlinuz, &tmp.path().join("vmlinuz"))?;
    std::fs::remove_dir_all(&root).map_err(|e| Error::io("removing", &root, e))?;
    let built = tmp.keep();
    match std::fs::rename(&built, &dir) {
        Ok(()) => {}
        // Another process finished first: use its image.
        Err(_) if dir.join("initramfs.cpio.gz").is_file() => {
            let _ = std::fs::remove_dir_all(&built);
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&built);
            return Err(Error::io("moving the built image to", &dir, e));
        }
    }
    tracing::info!(dir = %dir.display(), "built the test guest image");
    prune(&kit, &dir);
    Ok(image)
}

/// Removes images of older inputs and abandoned builds, once they are an
/// hour old (a test process that started with them is long done).
fn prune(kit: &Path, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(kit) else {
        return;
    };
    for e in entries.filter_map(|e| e.ok()) {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        let ours = name.starts_with("guest-") || name.starts_with(".guest-build-");
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > std::time::Duration::from_secs(3600));
        if ours
            && old
            && path != keep
            && let Err(err) = std::fs::remove_dir_all(&path)
        {
            tracing::warn!(dir = %path.display(), error = %err, "removing an old guest image failed");
        }
    }
}

/// Builds the `ferry-guest` binary (stripped) with cargo into the kit's
/// own target directory, or takes `$FERRY_GUEST_BIN`.
///
/// If cargo cannot build it (e.g. another crate of the workspace does not
/// compile at the moment), the binary the enclosing `cargo test
/// --workspace` built into this target directory is used, when there is
/// one, with a warning on stderr.
fn build_guest_tool(kit: &Path) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("FERRY_GUEST_BIN") {
        return Ok(PathBuf::from(p));
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
    let target = kit.join("cargo");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(&cargo)
        .args([
            "build",
            "--quiet",
            "-p",
            "ferry-guest",
            "--bin",
            "ferry-guest",
        ])
        .args([
            "--config",
            "profile.dev.strip=true",
            "--config",
            "profile.dev.debug=0",
        ])
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target)
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .map_err(|e| {
            Error::with_source(
                ErrorKind::Image,
                "building ferry-guest: cannot run cargo",
                e,
            )
        })?;
    if out.status.success() {
        return Ok(target.join("debug/ferry-guest"));
    }
    let why = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    let outer = ["debug", "release"]
        .iter()
        .map(|p| target_dir().join(p).join("ferry-guest"))
        .find(|p| p.is_file());
    match outer {
        Some(p) => {
            eprintln!(
                "ferry-testkit: cargo could not build ferry-guest ({why}); using {}",
                p.display()
            );
            Ok(p)
        }
        None => Err(image_err(format!(
            "building ferry-guest with cargo failed ({}): {why}",
            out.status
        ))),
    }
}

/// The newest installed `/boot/vmlinuz-*-cloud-amd64` that has modules.
fn find_kernel() -> Result<(String, PathBuf, PathBuf)> {
    let boot = Path::new("/boot");
    let mut found: Vec<String> = std::fs::read_dir(boot)
        .map_err(|e| Error::io("listing", boot, e))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let ver = name.strip_prefix("vmlinuz-")?.to_owned();
            (ver.ends_with("-cloud-amd64") && Path::new("/lib/modules").join(&ver).is_dir())
                .then_some(ver)
        })
        .collect();
    found.sort_by_key(|v| version_key(v));
    let ver = found.pop().ok_or_else(|| {
        image_err("no /boot/vmlinuz-*-cloud-amd64 with modules (install linux-image-cloud-amd64)")
    })?;
    let vmlinuz = boot.join(format!("vmlinuz-{ver}"));
    let modules = Path::new("/lib/modules").join(&ver);
    Ok((ver, vmlinuz, modules))
}

/// Sort key for kernel releases: the numbers in order.
fn version_key(v: &str) -> Vec<u64> {
    v.split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// The (uncompressed) file of module `name`, from `modules.dep`.
fn module_file(modules_dir: &Path, name: &str) -> Result<PathBuf> {
    let dep = modules_dir.join("modules.dep");
    let text = std::fs::read_to_string(&dep).map_err(|e| Error::io("reading", &dep, e))?;
    let rel = text
        .lines()
        .filter_map(|l| l.split(':').next())
        .find(|p| {
            let file = p.rsplit('/').next().unwrap_or(p);
            [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
                .iter()
                .any(|ext| file.strip_suffix(ext) == Some(name))
        })
        .ok_or_else(|| image_err(format!("module {name} not in {}", dep.display())))?;
    let path = modules_dir.join(rel);
    if rel.ends_with(".ko") {
        return Ok(path);
    }
    // Compressed: busybox insmod wants the plain object.
    let plain = kit_dir().join(format!(
        "modules-{}",
        modules_dir.display().to_string().replace('/', "_")
    ));
    std::fs::create_dir_all(&plain).map_err(|e| Error::io("creating", &plain, e))?;
    let out = plain.join(format!("{name}.ko"));
    if !out.is_file() {
        let tool = match rel.rsplit('.').next() {
            Some("xz") => "xz",
            Some("zst") => "zstd",
            _ => "gzip",
        };
        let data = Command::new(tool)
            .args(["-d", "-c"])
            .arg(&path)
            .output()
            .map_err(|e| Error::with_source(ErrorKind::Image, format!("running {tool}"), e))?;
        if !data.status.success() {
            return Err(image_err(format!("{tool} -d {} failed", path.display())));
        }
        let tmp = out.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, &data.stdout).map_err(|e| Error::io("writing", &tmp, e))?;
        std::fs::rename(&tmp, &out).map_err(|e| Error::io("renaming", &out, e))?;
    }
    Ok(out)
}

/// The shared libraries and dynamic loader `ldd` lists for `program`.
fn ldd(program: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(program)
        .output()
        .map_err(|e| Error::with_source(ErrorKind::Image, "running ldd", e))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // A static binary: nothing to copy.
        if text.contains("not a dynamic executable") || out.stderr.is_empty() {
            return Ok(Vec::new());
        }
        return Err(image_err(format!(
            "ldd {} failed: {}",
            program.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("not found") {
            return Err(image_err(format!(
                "{}: library missing: {line}",
                program.display()
            )));
        }
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.trim(),
            None => line,
        };
        let path = path.split(" (").next().unwrap_or("").trim();
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

fn which(program: &str) -> Result<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain(["/usr/bin", "/bin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .ok_or_else(|| image_err(format!("{program} not found (install busybox-static)")))
}

fn hash_file_meta(path: &Path, h: &mut DefaultHasher) -> Result<()> {
    let m = std::fs::metadata(path).map_err(|e| Error::io("inspecting", path, e))?;
    (path, m.len(), m.mtime(), m.mtime_nsec()).hash(h);
    Ok(())
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| Error::io(&format!("copying {} to", from.display()), to, e))
}

fn write_exec(path: &Path, content: &str) -> Result<()> {
    std::fs::write(path, content).map_err(|e| Error::io("writing", path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| Error::io("setting the mode of", path, e))
}

/// Lays out the initramfs tree under `root`.
fn assemble(root: &Path, files: &BTreeMap<String, PathBuf>, busybox: &Path) -> Result<()> {
    for d in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "lib/modules",
        "dev",
        "proc",
        "sys",
        "run",
        "var",
        "tmp",
        "mnt/data",
        "etc",
        "root",
    ] {
        let p = root.join(d);
        std::fs::create_dir_all(&p).map_err(|e| Error::io("creating", &p, e))?;
    }
    for (dest, src) in files {
        let to = root.join(dest);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io("creating", parent, e))?;
        }
        copy(src, &to)?;
    }
    // One link per busybox applet, in /bin.
    let list = Command::new(busybox)
        .arg("--list")
        .output()
        .map_err(|e| Error::with_source(ErrorKind::Image, "running busybox --list", e))?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        let link = root.join("bin").join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", &link)
                .map_err(|e| Error::io("linking", &link, e))?;
        }
    }
    let var_run = root.join("var/run");
    std::os::unix::fs::symlink("../run", &var_run)
        .map_err(|e| Error::io("linking", &var_run, e))?;
    let init = INIT.replace("@MODULES@", &MODULES.join(" "));
    write_exec(&root.join("init"), &init)?;
    write_exec(&root.join("sbin/shutdown"), SHUTDOWN)?;
    let passwd = root.join("etc/passwd");
    std::fs::write(&passwd, "root:x:0:0:root:/root:/bin/sh\n")
        .map_err(|e| Error::io("writing", &passwd, e))?;
    Ok(())
}

/// Packs `root` into a gzip-compressed newc cpio archive owned by root.
fn pack(root: &Path, out: &Path) -> Result<()> {
    let script = "find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 | gzip -1 > \"$1\"";
    let st = Command::new("sh")
        .args(["-c", script, "pack"])
        .arg(out)
        .current_dir(root)
        .output()
        .map_err(|e| Error::with_source(ErrorKind::Image, "running cpio", e))?;
    if !st.status.success() {
        return Err(image_err(format!(
            "packing the initramfs with cpio failed: {}",
            String::from_utf8_lossy(&st.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_sort_numerically() {
        let mut v = [
            "6.1.0-9-cloud-amd64",
            "6.1.0-56-cloud-amd64",
            "5.10.0-1-cloud-amd64",
        ];
        v.sort_by_key(|s| version_key(s));
        assert_eq!(v.last(), Some(&"6.1.0-56-cloud-amd64"));
    }

    #[test]
    fn ldd_lists_the_loader_and_libc() {
        let libs = ldd(Path::new("/usr/sbin/qemu-ga")).unwrap();
        assert!(
            libs.iter()
                .any(|l| l.to_string_lossy().contains("ld-linux")),
            "{libs:?}"
        );
        assert!(
            libs.iter().any(|l| l.to_string_lossy().contains("libc.so")),
            "{libs:?}"
        );
        assert!(
            libs.iter().any(|l| l.to_string_lossy().contains("libglib")),
            "{libs:?}"
        );
    }
}
