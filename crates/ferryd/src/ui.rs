//! The web dashboard: hand-written HTML, CSS and JavaScript modules from
//! `crates/ferryd/ui/`, embedded in the binary and served at `/` and
//! `/ui/...` without a token. The page holds no data: every data call goes
//! to the `/v1` API with the token the user typed (kept in the browser's
//! `sessionStorage`).
//!
//! Every answer carries a strict Content-Security-Policy: scripts, styles
//! and connections only from this origin, no inline scripts or styles, no
//! frames, no form posts.

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// The policy sent with every dashboard answer.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
frame-ancestors 'none'";

/// One embedded file: its path under `/ui/`, media type and bytes.
struct Asset {
    path: &'static str,
    mime: &'static str,
    body: &'static str,
}

macro_rules! asset {
    ($path:literal, $mime:expr) => {
        Asset {
            path: $path,
            mime: $mime,
            body: include_str!(concat!("../ui/", $path)),
        }
    };
}

const JS: &str = "text/javascript; charset=utf-8";

/// Every file of the dashboard. A new view is one more `views/*.js` here
/// and one import line in `app.js`.
static ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("style.css", "text/css; charset=utf-8"),
    asset!("app.js", JS),
    asset!("api.js", JS),
    asset!("dom.js", JS),
    asset!("format.js", JS),
    asset!("progress.js", JS),
    asset!("views/host.js", JS),
    asset!("views/peers.js", JS),
    asset!("views/vms.js", JS),
    asset!("views/volumes.js", JS),
    asset!("views/snapshots.js", JS),
    asset!("views/groups.js", JS),
    asset!("views/operations.js", JS),
    asset!("views/generic.js", JS),
];

/// The dashboard's routes; merged into the API router by `api::router`.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { serve("index.html") }))
        .route("/ui", get(|| async { serve("index.html") }))
        .route("/ui/", get(|| async { serve("index.html") }))
        .route(
            "/ui/{*path}",
            get(|Path(path): Path<String>| async move { serve(&path) }),
        )
}

fn serve(path: &str) -> Response {
    let mut resp = match ASSETS.iter().find(|a| a.path == path) {
        Some(a) => ([(header::CONTENT_TYPE, a.mime)], a.body).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "no such dashboard file\n",
        )
            .into_response(),
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // Small files from the binary: always revalidate, so an upgraded
    // ferryd never runs with a stale module in the browser's cache.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `./x.js` or `/ui/x` a file names is an embedded asset: a
    /// module forgotten in `ASSETS` would break the page only in a browser.
    #[test]
    fn every_referenced_file_is_embedded() {
        for a in ASSETS {
            let dir = a.path.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
            for quote in ['"', '\''] {
                for part in a.body.split(quote).skip(1).step_by(2) {
                    let target = if let Some(p) = part.strip_prefix("/ui/") {
                        p.to_string()
                    } else if let Some(p) = part.strip_prefix("./") {
                        if dir.is_empty() {
                            p.to_string()
                        } else {
                            format!("{dir}/{p}")
                        }
                    } else if let Some(p) = part.strip_prefix("../") {
                        p.to_string()
                    } else {
                        continue;
                    };
                    if !(target.ends_with(".js") || target.ends_with(".css")) {
                        continue;
                    }
                    assert!(
                        ASSETS.iter().any(|x| x.path == target),
                        "{} names {part}, which is not embedded",
                        a.path
                    );
                }
            }
        }
    }

    /// The policy forbids inline code: the HTML must not need it.
    #[test]
    fn the_page_has_no_inline_script_or_style() {
        let html = ASSETS[0].body;
        assert!(!html.contains("<script>"), "inline script");
        assert!(!html.contains("style="), "inline style attribute");
        assert!(!html.contains("<style"), "inline style element");
        assert!(!has_event_attribute(html), "inline event handler");
        for a in ASSETS {
            assert!(!a.body.contains("http://"), "{} names http://", a.path);
            assert!(!a.body.contains("https://"), "{} names https://", a.path);
            assert!(!a.body.contains("innerHTML"), "{} uses innerHTML", a.path);
        }
    }

    /// ` onclick=`, ` onload=`, ...: an attribute the policy would block.
    fn has_event_attribute(html: &str) -> bool {
        html.match_indices(" on").any(|(i, _)| {
            let rest = &html[i + 3..];
            let name_len = rest.chars().take_while(|c| c.is_ascii_lowercase()).count();
            name_len > 0 && rest[name_len..].starts_with('=')
        })
    }

    #[test]
    fn unknown_and_traversing_paths_are_not_found() {
        assert_eq!(serve("nope.js").status(), StatusCode::NOT_FOUND);
        assert_eq!(serve("../Cargo.toml").status(), StatusCode::NOT_FOUND);
        let r = serve("app.js");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[header::CONTENT_SECURITY_POLICY], CSP);
    }
}
