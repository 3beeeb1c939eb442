//! Peers: the other ferryd hosts this host may talk to, each registered by
//! URL and that host's *peer token*, persisted in `peers.json` (mode 0600:
//! it holds tokens). [`PeerClient`] is how this host calls a peer's
//! `/v1/peer/` endpoints.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry_api::{Operation, PeerHello, PeerInfo};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::config::write_atomic;

/// How long a peer call may take before it counts as unreachable.
const PEER_TIMEOUT: Duration = Duration::from_secs(10);

/// One registered peer as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerRecord {
    pub url: String,
    pub token: String,
    pub host_name: String,
    pub version: String,
    pub nbd: Option<String>,
    pub added: u64,
}

impl PeerRecord {
    pub fn info(&self, name: &str) -> PeerInfo {
        PeerInfo {
            name: name.to_string(),
            url: self.url.clone(),
            host_name: self.host_name.clone(),
            version: self.version.clone(),
            nbd: self.nbd.clone(),
            added: self.added,
            pool: None,
            reachable: None,
            latency_ms: None,
            error: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("no peer named {0}")]
    NotFound(String),
    #[error("a peer named {0} is already registered; remove it first")]
    Exists(String),
    #[error(
        "peer at {url} rejected the token (HTTP {status}); use that host's peer token (`ferry peer token` there)"
    )]
    Rejected { url: String, status: u16 },
    #[error(
        "that is the admin token of the host at {url}; give its *peer* token (`ferry peer token` there): a peer must never hold another host's admin token"
    )]
    AdminToken { url: String },
    #[error("cannot reach the peer at {url}: {detail}")]
    Unreachable { url: String, detail: String },
    #[error("the peer at {url} answered {status}: {detail}")]
    Failed {
        url: String,
        status: u16,
        detail: String,
    },
    #[error("saving {path}: {detail}")]
    Store { path: PathBuf, detail: String },
}

/// Calls one peer's `/v1/peer/` endpoints with its peer token.
#[derive(Clone)]
pub struct PeerClient {
    url: String,
    token: String,
    http: reqwest::Client,
}

/// The HTTP client every [`PeerClient`] of this process shares: its
/// connections to a peer stay open from one call to the next, and it is
/// built once. Building one reads the system's root certificates (reqwest
/// is built with TLS for the backup repository's object stores): when each
/// call built its own, a VM copy of an empty disk spent 34 ms in its fixed
/// steps, 4-6 ms per step that calls the peer; 17 ms with this one.
fn shared_http() -> reqwest::Client {
    static HTTP: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    HTTP.get_or_init(|| {
        reqwest::Client::builder()
            .timeout(PEER_TIMEOUT)
            .build()
            .unwrap_or_default()
    })
    .clone()
}

impl PeerClient {
    pub fn new(url: &str, token: &str) -> PeerClient {
        PeerClient {
            url: url.trim_end_matches('/').to_string(),
            token: token.to_string(),
            http: shared_http(),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// `GET /v1/peer/hello`: proves the URL and token, returns who answered.
    pub async fn hello(&self) -> Result<PeerHello, PeerError> {
        self.get("/v1/peer/hello").await
    }

    /// `GET path` on the peer (any path its peer token opens, see
    /// [`crate::auth::peer_may_call`]), decoding the JSON answer.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, PeerError> {
        self.call(Method::GET, path, None::<&()>).await
    }

    /// `POST path` with a JSON body.
    pub async fn post<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, PeerError> {
        self.call(Method::POST, path, Some(body)).await
    }

    /// Creates volume `volume` of `size` bytes on the peer, then a
    /// read-write export `export` of it, whose writes start going to the
    /// disk at once with `write_out` (see [`ferry_api::CreateExport`]).
    /// Returns the export's TCP URI:
    /// `None` when the peer serves NBD on no TCP address (it cannot then
    /// receive data from another host).
    pub async fn create_exported_volume(
        &self,
        volume: &str,
        export: &str,
        size: u64,
        write_out: bool,
    ) -> Result<Option<String>, PeerError> {
        let _: ferry_api::VolumeInfo = self
            .post(
                "/v1/volumes",
                &ferry_api::CreateVolume {
                    name: volume.to_string(),
                    size,
                },
            )
            .await?;
        let info: ferry_api::ExportInfo = self
            .post(
                "/v1/exports",
                &ferry_api::CreateExport {
                    name: Some(export.to_string()),
                    volume: Some(volume.to_string()),
                    snapshot: None,
                    direct: false,
                    write_out,
                },
            )
            .await?;
        Ok(info.tcp_uri)
    }

    /// `DELETE path`; the answer body is ignored.
    pub async fn delete(&self, path: &str) -> Result<(), PeerError> {
        self.call::<(), serde::de::IgnoredAny>(Method::DELETE, path, None)
            .await
            .map(|_| ())
    }

    /// One call to the peer. Any 2xx answer is decoded as `T`; 401/403 is
    /// [`PeerError::Rejected`]; other answers are [`PeerError::Failed`]
    /// carrying the status and the peer's error message.
    pub async fn call<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, PeerError> {
        let unreachable = |e: reqwest::Error| PeerError::Unreachable {
            url: self.url.clone(),
            detail: e.to_string(),
        };
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let r = req.send().await.map_err(unreachable)?;
        let status = r.status().as_u16();
        if status == 401 || status == 403 {
            return Err(PeerError::Rejected {
                url: self.url.clone(),
                status,
            });
        }
        let text = r.text().await.map_err(unreachable)?;
        if !(200..300).contains(&status) {
            // The peer's ApiError message when it sent one, else the body.
            let detail = serde_json::from_str::<ferry_api::ApiError>(&text)
                .map(|e| e.error)
                .unwrap_or(text);
            return Err(PeerError::Failed {
                url: self.url.clone(),
                status,
                detail,
            });
        }
        let text = if text.is_empty() { "null".into() } else { text };
        serde_json::from_str(&text).map_err(|e| PeerError::Failed {
            url: self.url.clone(),
            status,
            detail: format!("unexpected answer ({e}): {text}"),
        })
    }

    /// Polls operation `id` on the peer until it finishes, calling
    /// `progress` with each view (for relaying its progress into a local
    /// tree); returns the final operation. A failed or cancelled
    /// operation is returned, not turned into an error: the caller says
    /// what it means. Unreachable peers are retried for `patience`.
    pub async fn wait_operation(
        &self,
        id: &str,
        patience: Duration,
        mut progress: impl FnMut(&Operation),
    ) -> Result<Operation, PeerError> {
        let path = format!("/v1/operations/{id}");
        let mut down_since: Option<Instant> = None;
        let mut pause = Duration::from_millis(20);
        loop {
            match self.get::<Operation>(&path).await {
                Ok(op) => {
                    down_since = None;
                    progress(&op);
                    if op.state.is_finished() {
                        return Ok(op);
                    }
                }
                Err(e @ PeerError::Unreachable { .. }) => {
                    let since = *down_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > patience {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(250));
        }
    }
}

/// The registered peers.
pub struct Peers {
    file: PathBuf,
    map: Mutex<BTreeMap<String, PeerRecord>>,
}

impl Peers {
    pub fn load(file: PathBuf) -> anyhow::Result<Peers> {
        let map = match std::fs::read(&file) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| anyhow::anyhow!("{} is damaged: {e}", file.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => anyhow::bail!("cannot read {}: {e}", file.display()),
        };
        Ok(Peers {
            file,
            map: Mutex::new(map),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, PeerRecord>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn list(&self) -> Vec<PeerInfo> {
        self.lock().iter().map(|(n, r)| r.info(n)).collect()
    }

    pub fn get(&self, name: &str) -> Result<PeerRecord, PeerError> {
        self.lock()
            .get(name)
            .cloned()
            .ok_or_else(|| PeerError::NotFound(name.to_string()))
    }

    /// A client for a registered peer.
    pub fn client(&self, name: &str) -> Result<PeerClient, PeerError> {
        let r = self.get(name)?;
        Ok(PeerClient::new(&r.url, &r.token))
    }

    /// Verifies the peer answers with this token, then records it.
    pub async fn add(
        &self,
        name: Option<String>,
        url: &str,
        token: &str,
    ) -> Result<PeerInfo, PeerError> {
        let c = PeerClient::new(url, token);
        let hello = c.hello().await?;
        if hello.caller != "peer" {
            return Err(PeerError::AdminToken {
                url: c.url().to_string(),
            });
        }
        let name = name.unwrap_or_else(|| hello.name.clone());
        let rec = PeerRecord {
            url: c.url().to_string(),
            token: token.to_string(),
            host_name: hello.name,
            version: hello.version,
            nbd: hello.nbd,
            added: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        let mut map = self.lock();
        if map.contains_key(&name) {
            return Err(PeerError::Exists(name));
        }
        map.insert(name.clone(), rec.clone());
        if let Err(e) = self.save(&map) {
            map.remove(&name);
            return Err(e);
        }
        Ok(rec.info(&name))
    }

    pub fn remove(&self, name: &str) -> Result<(), PeerError> {
        let mut map = self.lock();
        let old = map
            .remove(name)
            .ok_or_else(|| PeerError::NotFound(name.to_string()))?;
        if let Err(e) = self.save(&map) {
            map.insert(name.to_string(), old);
            return Err(e);
        }
        Ok(())
    }

    /// The record plus a live check: reachable, latency, what failed.
    pub async fn check(&self, name: &str) -> Result<PeerInfo, PeerError> {
        let rec = self.get(name)?;
        let mut info = rec.info(name);
        let t = Instant::now();
        let c = PeerClient::new(&rec.url, &rec.token);
        match c.hello().await {
            Ok(h) => {
                info.reachable = Some(true);
                info.latency_ms = Some(t.elapsed().as_secs_f64() * 1000.0);
                info.host_name = h.name;
                info.version = h.version;
                info.nbd = h.nbd;
                match c.get::<ferry_api::PoolInfo>("/v1/pool").await {
                    Ok(p) => info.pool = Some(p),
                    Err(e) => info.error = Some(format!("pool usage: {e}")),
                }
            }
            Err(e) => {
                info.reachable = Some(false);
                info.error = Some(e.to_string());
            }
        }
        Ok(info)
    }

    fn save(&self, map: &BTreeMap<String, PeerRecord>) -> Result<(), PeerError> {
        let text = serde_json::to_vec_pretty(map).map_err(|e| PeerError::Store {
            path: self.file.clone(),
            detail: e.to_string(),
        })?;
        write_atomic(&self.file, &text, 0o600).map_err(|e| PeerError::Store {
            path: self.file.clone(),
            detail: format!("{e:#}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_peer_is_refused_and_nothing_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let peers = Peers::load(dir.path().join("peers.json")).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // Port 1 on loopback: nothing listens there.
        let e = rt
            .block_on(peers.add(Some("x".into()), "http://127.0.0.1:1", "t"))
            .unwrap_err();
        assert!(matches!(e, PeerError::Unreachable { .. }), "{e}");
        assert!(peers.list().is_empty());
        assert!(!dir.path().join("peers.json").exists());
    }

    #[test]
    fn a_damaged_file_is_an_error_not_an_empty_list() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("peers.json"), b"{not json").unwrap();
        let e = Peers::load(dir.path().join("peers.json"))
            .err()
            .expect("a damaged peers.json must not load");
        assert!(e.to_string().contains("damaged"), "{e}");
    }
}
