//! ferryd's configuration: `<data-dir>/ferryd.toml`, written by `ferryd init`,
//! overridden by flags and `FERRYD_*` environment variables.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

pub const CONFIG_FILE: &str = "ferryd.toml";
pub const TOKEN_FILE: &str = "admin.token";
pub const PEER_TOKEN_FILE: &str = "peer.token";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This host's name, as peers and the CLI see it.
    pub name: String,
    /// HTTP API listener.
    pub listen: SocketAddr,
    /// NBD TCP listener (exports need their secret there).
    #[serde(default = "default_nbd_listen")]
    pub nbd_listen: SocketAddr,
    /// QEMU accelerator for VMs started here: `kvm:tcg` on real hosts,
    /// `tcg` where KVM is unusable.
    #[serde(default = "default_accel")]
    pub accel: String,
}

fn default_nbd_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 10809))
}

fn default_accel() -> String {
    "kvm:tcg".into()
}

impl Config {
    pub fn new(name: String, listen: SocketAddr) -> Self {
        Config {
            name,
            listen,
            nbd_listen: default_nbd_listen(),
            accel: default_accel(),
        }
    }

    pub fn load(data_dir: &Path) -> anyhow::Result<Config> {
        let path = data_dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read {}: is {} a ferryd data directory (made by `ferryd init`)?",
                path.display(),
                data_dir.display()
            )
        })?;
        let cfg: Config =
            toml::from_str(&text).with_context(|| format!("invalid {}", path.display()))?;
        if cfg.accel.is_empty() {
            bail!("{}: accel must not be empty", path.display());
        }
        Ok(cfg)
    }

    pub fn save(&self, data_dir: &Path) -> anyhow::Result<()> {
        let path = data_dir.join(CONFIG_FILE);
        write_atomic(&path, toml::to_string_pretty(self)?.as_bytes(), 0o644)
    }
}

/// The layout of a data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    pub root: PathBuf,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DataDir { root: root.into() }
    }
    pub fn pool(&self) -> PathBuf {
        self.root.join("pool")
    }
    pub fn journal(&self) -> PathBuf {
        self.root.join("journal.db")
    }
    pub fn run(&self) -> PathBuf {
        self.root.join("run")
    }
    pub fn token(&self) -> PathBuf {
        self.root.join(TOKEN_FILE)
    }
    pub fn peer_token(&self) -> PathBuf {
        self.root.join(PEER_TOKEN_FILE)
    }
    pub fn peers(&self) -> PathBuf {
        self.root.join("peers.json")
    }
    pub fn exports(&self) -> PathBuf {
        self.root.join("exports.json")
    }
    pub fn nbd_socket(&self) -> PathBuf {
        self.run().join("nbd.sock")
    }
}

/// Writes a file so that a crash leaves either the old or the new content.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_unknown_fields_refused() {
        let dir = tempfile::tempdir().unwrap();
        let c = Config::new("h1".into(), "127.0.0.1:7450".parse().unwrap());
        c.save(dir.path()).unwrap();
        assert_eq!(Config::load(dir.path()).unwrap(), c);
        std::fs::write(
            dir.path().join(CONFIG_FILE),
            "name='x'\nlisten='127.0.0.1:1'\nbogus=1\n",
        )
        .unwrap();
        let e = Config::load(dir.path()).unwrap_err();
        assert!(format!("{e:#}").contains("bogus"), "{e:#}");
    }

    #[test]
    fn missing_config_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let e = Config::load(dir.path()).unwrap_err();
        assert!(e.to_string().contains("ferryd init"), "{e}");
    }
}
