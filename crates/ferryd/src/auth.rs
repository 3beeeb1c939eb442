//! Bearer-token authentication: every API call needs the admin token
//! (401 otherwise). Peer tokens come with the peers feature.

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

pub async fn require_token(State(d): State<Arc<Daemon>>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if same(t, &d.admin_token) => next.run(req).await,
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
