//! Peers: register other hosts (admin), and what a peer may ask of this
//! host (`/v1/peer/`, peer token or admin token).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use ferry_api::{AddPeer, PeerHello, PeerInfo, PeerToken};

use super::{ApiResult, Failure, error_response};
use crate::auth::Role;
use crate::body::Body;
use crate::daemon::Daemon;
use crate::peers::PeerError;

impl From<PeerError> for Failure {
    fn from(e: PeerError) -> Self {
        let (status, field) = match &e {
            PeerError::NotFound(_) => (StatusCode::NOT_FOUND, None),
            PeerError::Exists(_) => (StatusCode::CONFLICT, Some("name")),
            PeerError::Rejected { .. } | PeerError::AdminToken { .. } => {
                (StatusCode::BAD_REQUEST, Some("token"))
            }
            PeerError::Unreachable { .. } | PeerError::Failed { .. } => {
                (StatusCode::BAD_GATEWAY, Some("url"))
            }
            PeerError::Store { .. } => (StatusCode::INTERNAL_SERVER_ERROR, None),
        };
        error_response(status, &e.to_string(), field)
    }
}

/// `GET /v1/peer/hello`: who this host is, for a peer checking its token.
pub async fn hello(
    State(d): State<Arc<Daemon>>,
    Extension(role): Extension<Role>,
) -> ApiResult<PeerHello> {
    let nbd = (*d.exports.tcp_addr.lock().unwrap_or_else(|p| p.into_inner()))
        .map(|a| format!("nbd://{a}"));
    Ok(Json(PeerHello {
        name: d.cfg.name.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        nbd,
        caller: match role {
            Role::Admin => "admin",
            Role::Peer => "peer",
        }
        .to_string(),
    }))
}

/// `GET /v1/peer/peers`: the hosts this host knows (names, URLs; never
/// tokens), so that a peer can find the name this host has for it.
pub async fn peer_list(State(d): State<Arc<Daemon>>) -> ApiResult<Vec<PeerInfo>> {
    Ok(Json(d.peers.list()))
}

/// `GET /v1/host/peer-token` (admin): the token to give other hosts.
pub async fn token(State(d): State<Arc<Daemon>>) -> ApiResult<PeerToken> {
    Ok(Json(PeerToken {
        token: d.peer_token.clone(),
    }))
}

pub async fn list(State(d): State<Arc<Daemon>>) -> ApiResult<Vec<PeerInfo>> {
    Ok(Json(d.peers.list()))
}

pub async fn show(State(d): State<Arc<Daemon>>, Path(name): Path<String>) -> ApiResult<PeerInfo> {
    Ok(Json(d.peers.check(&name).await?))
}

pub async fn add(
    State(d): State<Arc<Daemon>>,
    Body(req): Body<AddPeer>,
) -> Result<(StatusCode, Json<PeerInfo>), Failure> {
    if let Some(n) = &req.name {
        super::volumes::check_name("name", n)?;
    }
    let url = req.url.trim();
    if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() < 10 {
        return Err(error_response(
            StatusCode::BAD_REQUEST,
            &format!("url must be the peer's API URL, like http://host:7450 (got {url:?})"),
            Some("url"),
        ));
    }
    if req.token.trim().is_empty() {
        return Err(error_response(
            StatusCode::BAD_REQUEST,
            "token must be the peer's peer token (`ferry peer token` on that host)",
            Some("token"),
        ));
    }
    if req.token.trim() == d.admin_token {
        return Err(error_response(
            StatusCode::BAD_REQUEST,
            "that is this host's admin token; give the peer's *peer* token",
            Some("token"),
        ));
    }
    let info = d.peers.add(req.name, url, req.token.trim()).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

pub async fn delete(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
) -> Result<StatusCode, Failure> {
    d.peers.remove(&name)?;
    Ok(StatusCode::NO_CONTENT)
}
