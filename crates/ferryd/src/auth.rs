//! Bearer-token authentication. Two tokens, made by `ferryd init`:
//! - the **admin** token opens every call;
//! - the **peer** token, given to other hosts, opens `/v1/peer/` (what hosts
//!   ask of each other) and the resource calls a host needs on another to
//!   move VMs and data there ([`PEER_DELEGATED`]: host and pool info,
//!   volumes, snapshots, clones, exports, VMs, VM snapshots, operations).
//!   Peer management, the peer token itself and metrics need the admin
//!   token; a peer token there answers 403.
//!
//! No token or an unknown one answers 401.

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::api::error_response;
use crate::daemon::Daemon;
use std::sync::Arc;

/// Generates a new random token (256 bits, hex).
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares in time independent of where the strings differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// Paths a peer token may call.
pub const PEER_PREFIX: &str = "/v1/peer/";

/// Resource paths a peer token opens besides [`PEER_PREFIX`]: each entry
/// matches the path itself and everything below it.
pub const PEER_DELEGATED: &[&str] = &[
    "/v1/pool",
    "/v1/volumes",
    "/v1/snapshots",
    "/v1/clones",
    "/v1/exports",
    "/v1/vms",
    "/v1/vm-snapshots",
    "/v1/operations",
];

/// Whether a peer token opens `path`.
pub fn peer_may_call(path: &str) -> bool {
    path.starts_with(PEER_PREFIX)
        || path == "/v1/host"
        || PEER_DELEGATED.iter().any(|p| {
            path.strip_prefix(p)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
}

/// Which token opened a request (a request extension for handlers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    Peer,
}

pub async fn require_token(State(d): State<Arc<Daemon>>, mut req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let peer_path = peer_may_call(req.uri().path());
    match given {
        Some(t) if same(t, &d.admin_token) => {
            req.extensions_mut().insert(Role::Admin);
            next.run(req).await
        }
        Some(t) if same(t, &d.peer_token) => {
            if peer_path {
                req.extensions_mut().insert(Role::Peer);
                next.run(req).await
            } else {
                error_response(
                    StatusCode::FORBIDDEN,
                    "a peer token opens only /v1/peer/ and resource endpoints (not peers, tokens or metrics); this call needs the admin token",
                    None,
                )
                .into_response()
            }
        }
        Some(_) => error_response(StatusCode::UNAUTHORIZED, "invalid token", None).into_response(),
        None => error_response(
            StatusCode::UNAUTHORIZED,
            "missing bearer token (Authorization: Bearer <token>; see `ferryd init`)",
            None,
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_and_distinct() {
        let a = new_token();
        assert_eq!(a.len(), 64);
        assert_ne!(a, new_token());
        assert!(same(&a, &a.clone()));
        assert!(!same(&a, &new_token()));
        assert!(!same("ab", "abc"));
    }

    #[test]
    fn peer_paths() {
        for p in [
            "/v1/peer/hello",
            "/v1/host",
            "/v1/volumes",
            "/v1/volumes/a/grow",
            "/v1/vms/x/start",
            "/v1/operations/7",
        ] {
            assert!(peer_may_call(p), "{p}");
        }
        for p in [
            "/v1/peers",
            "/v1/peers/b",
            "/v1/host/peer-token",
            "/metrics",
            "/v1/volumesx",
            "/v1/vmsx/1",
        ] {
            assert!(!peer_may_call(p), "{p}");
        }
    }
}
