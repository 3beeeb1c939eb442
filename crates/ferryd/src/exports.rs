//! NBD exports of this host's volumes and snapshots.
//!
//! Every export is served on two listeners: the local unix socket
//! (`<data-dir>/run/nbd.sock`, reachable only by root through the file
//! system) under its bare name, and TCP, where it is reachable only as
//! `<name>/<secret>`. Exports are persisted in `<data-dir>/exports.json`
//! (mode 0600: it holds the secrets) and restored at start, so QEMU
//! processes reconnect to the same names after a ferryd restart.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ferry_api::ExportInfo;
use ferry_nbd::server::{ExportOptions, Server};
use ferry_pool::Pool;
use serde::{Deserialize, Serialize};

use crate::auth::new_token;
use crate::config::write_atomic;
use crate::nbd_export::{SnapshotExport, VolumeExport};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportRecord {
    pub name: String,
    pub volume: Option<String>,
    pub snapshot: Option<String>,
    pub secret: String,
    /// How it writes (kept as the record's own fields `direct` and
    /// `write_out`).
    #[serde(flatten)]
    pub writes: WriteOptions,
}

/// How a volume's export writes (neither applies to a snapshot's
/// export, which is read-only).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct WriteOptions {
    /// Large writes bypass the page cache (see [`VolumeExport::direct`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub direct: bool,
    /// Writes start going to the disk at once (see
    /// [`VolumeExport::write_out`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub write_out: bool,
}

pub struct Exports {
    pub unix: Server,
    pub tcp: Server,
    pub unix_path: PathBuf,
    pub tcp_addr: Mutex<Option<SocketAddr>>,
    file: PathBuf,
    records: Mutex<BTreeMap<String, ExportRecord>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("export {0} already exists")]
    Exists(String),
    #[error("no export {0}")]
    NotFound(String),
    #[error("name exactly one of volume or snapshot")]
    Target,
    #[error("{0} is for volume exports (a snapshot's export is read-only)")]
    ReadOnly(&'static str),
    #[error(transparent)]
    Pool(#[from] ferry_pool::Error),
    #[error("export {name}: {msg}")]
    Other { name: String, msg: String },
}

impl Exports {
    /// Loads the persisted exports and serves each again.
    pub fn load(pool: &Pool, file: PathBuf, unix_path: PathBuf) -> anyhow::Result<Exports> {
        let records: BTreeMap<String, ExportRecord> = match std::fs::read(&file) {
            Ok(b) => serde_json::from_slice(&b)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e.into()),
        };
        let me = Exports {
            unix: Server::new(),
            tcp: Server::new(),
            unix_path,
            tcp_addr: Mutex::new(None),
            file,
            records: Mutex::new(BTreeMap::new()),
        };
        for rec in records.into_values() {
            let name = rec.name.clone();
            if let Err(e) = me.serve(pool, &rec) {
                tracing::warn!("export {name} not restored: {e}");
                continue;
            }
            me.records
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name, rec);
        }
        Ok(me)
    }

    fn serve(&self, pool: &Pool, rec: &ExportRecord) -> Result<(), ExportError> {
        let export: Arc<dyn ferry_nbd::export::Export> = match (&rec.volume, &rec.snapshot) {
            (Some(v), None) => {
                Arc::new(VolumeExport::new(pool.clone(), pool.volume(v)?, rec.writes))
            }
            (None, Some(_)) if rec.writes.direct => return Err(ExportError::ReadOnly("direct")),
            (None, Some(_)) if rec.writes.write_out => {
                return Err(ExportError::ReadOnly("write_out"));
            }
            (None, Some(s)) => Arc::new(SnapshotExport {
                snapshot: pool.open_snapshot(s)?,
            }),
            _ => return Err(ExportError::Target),
        };
        let other = |e: ferry_nbd::error::Error| ExportError::Other {
            name: rec.name.clone(),
            msg: e.to_string(),
        };
        let description = rec
            .volume
            .as_ref()
            .map(|v| format!("volume {v}"))
            .or_else(|| rec.snapshot.as_ref().map(|s| format!("snapshot {s}")))
            .unwrap_or_default();
        self.unix
            .add_export(
                &rec.name,
                export.clone(),
                ExportOptions {
                    description: description.clone(),
                    ..ExportOptions::default()
                },
            )
            .map_err(other)?;
        self.tcp
            .add_export(
                &rec.name,
                export,
                ExportOptions {
                    description,
                    secret: Some(rec.secret.clone()),
                    allow_tls_clients: false,
                },
            )
            .map_err(other)?;
        Ok(())
    }

    fn persist(&self, records: &BTreeMap<String, ExportRecord>) -> Result<(), ExportError> {
        let data = serde_json::to_vec_pretty(records).map_err(|e| ExportError::Other {
            name: "*".into(),
            msg: e.to_string(),
        })?;
        write_atomic(&self.file, &data, 0o600).map_err(|e| ExportError::Other {
            name: "*".into(),
            msg: format!("cannot save {}: {e:#}", self.file.display()),
        })
    }

    pub fn add(
        &self,
        pool: &Pool,
        name: &str,
        volume: Option<String>,
        snapshot: Option<String>,
        writes: WriteOptions,
    ) -> Result<ExportInfo, ExportError> {
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        if records.contains_key(name) {
            return Err(ExportError::Exists(name.to_string()));
        }
        let rec = ExportRecord {
            name: name.to_string(),
            volume,
            snapshot,
            secret: new_token(),
            writes,
        };
        self.serve(pool, &rec)?;
        records.insert(name.to_string(), rec.clone());
        if let Err(e) = self.persist(&records) {
            records.remove(name);
            self.unix.remove_export(name);
            self.tcp.remove_export(name);
            return Err(e);
        }
        Ok(self.info(&rec))
    }

    pub fn remove(&self, name: &str) -> Result<(), ExportError> {
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        let rec = records
            .remove(name)
            .ok_or_else(|| ExportError::NotFound(name.to_string()))?;
        if let Err(e) = self.persist(&records) {
            records.insert(name.to_string(), rec);
            return Err(e);
        }
        self.unix.remove_export(name);
        self.tcp.remove_export(name);
        Ok(())
    }

    pub fn list(&self) -> Vec<ExportInfo> {
        let records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        records.values().map(|r| self.info(r)).collect()
    }

    pub fn get(&self, name: &str) -> Option<ExportInfo> {
        let records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        records.get(name).map(|r| self.info(r))
    }

    /// The export that serves volume or snapshot `object`, if any.
    pub fn user_of(&self, object: &str) -> Option<String> {
        let records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        records
            .values()
            .find(|r| r.volume.as_deref() == Some(object) || r.snapshot.as_deref() == Some(object))
            .map(|r| r.name.clone())
    }

    fn info(&self, r: &ExportRecord) -> ExportInfo {
        let tcp = *self.tcp_addr.lock().unwrap_or_else(|p| p.into_inner());
        ExportInfo {
            name: r.name.clone(),
            volume: r.volume.clone(),
            snapshot: r.snapshot.clone(),
            read_only: r.snapshot.is_some(),
            direct: r.writes.direct,
            write_out: r.writes.write_out,
            unix_uri: format!("nbd+unix:///{}?socket={}", r.name, self.unix_path.display()),
            tcp_uri: tcp.map(|a| format!("nbd://{a}/{}/{}", r.name, r.secret)),
        }
    }
}
