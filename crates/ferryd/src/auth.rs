//! Bearer-token authentication. Two tokens, made by `ferryd init`:
//! - the **admin** token opens every call;
//! - the **peer** token, given to other hosts, opens only `/v1/peer/`
//!   (what hosts ask of each other); anything else answers 403.
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
    let peer_path = req.uri().path().starts_with(PEER_PREFIX);
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
                    "a peer token opens only /v1/peer/ endpoints; this call needs the admin token",
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
}
