//! The OpenAPI document in the repository (`docs/openapi.json`) is current,
//! and lists exactly the routes the running router serves: every documented
//! (method, path) is answered by a handler, every other method on those
//! paths is 405, and every route in the router's source is documented.

mod common;

use std::collections::BTreeSet;

use common::{Host, send};
use serde_json::Value;

const DOC_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json");

fn committed() -> Value {
    let text = std::fs::read_to_string(DOC_FILE).expect("docs/openapi.json is missing");
    serde_json::from_str(&text).expect("docs/openapi.json is not JSON")
}

fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let mut set = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            set.insert((method.to_uppercase(), path.clone()));
        }
    }
    set
}

#[test]
fn the_committed_document_is_current() {
    let generated = ferryd::openapi::document();
    assert!(
        committed() == generated,
        "docs/openapi.json is stale: run `cargo run -p ferryd -- openapi > docs/openapi.json`"
    );
    // Every $ref points at a schema that exists.
    let text = generated.to_string();
    let schemas = generated["components"]["schemas"].as_object().unwrap();
    for part in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = &part[..part.find('"').unwrap()];
        assert!(schemas.contains_key(name), "dangling $ref {name}");
    }
}

#[test]
fn every_route_in_the_router_source_is_documented() {
    let src = include_str!("../src/api/mod.rs");
    let routed: BTreeSet<String> = src
        .split(".route(")
        .skip(1)
        .map(|s| {
            let s = s
                .trim_start()
                .strip_prefix('"')
                .expect("a route path literal");
            s[..s.find('"').unwrap()].to_string()
        })
        .collect();
    let paths: BTreeSet<String> = documented(&committed())
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    assert_eq!(routed, paths, "router paths (left) vs documented paths");
}

#[tokio::test]
async fn the_running_router_serves_exactly_the_documented_methods() {
    let h = Host::new();
    let doc = committed();
    let want = documented(&doc);
    let paths: BTreeSet<&String> = want.iter().map(|(_, p)| p).collect();
    for path in paths {
        // Placeholders name objects that do not exist: handlers answer
        // 404/400, never act.
        let concrete = path
            .split('/')
            .map(|s| {
                if s.starts_with('{') {
                    "no-such-object"
                } else {
                    s
                }
            })
            .collect::<Vec<_>>()
            .join("/");
        for method in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
            let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
            let rb = h.req(m, &concrete);
            let rb = if method == "GET" || method == "DELETE" {
                rb
            } else {
                rb.header("content-type", "application/json").body("{}")
            };
            // Streams (SSE) answer 404 here too: the operation is unknown.
            let (status, body) = send(rb).await;
            let served = want.contains(&(method.to_string(), path.clone()));
            if served {
                assert_ne!(status, 405, "{method} {path} is documented but not routed");
                assert!(
                    !body.to_string().contains("no such API path"),
                    "{method} {path} is documented but fell through to the fallback"
                );
                let responses = &doc["paths"][path][method.to_lowercase()]["responses"];
                assert!(
                    responses.get(status.to_string()).is_some() || status == 415,
                    "{method} {concrete} answered {status}, which the document does not list: {body}"
                );
            } else {
                assert_eq!(
                    status, 405,
                    "{method} {path} is routed but not documented: {body}"
                );
            }
        }
    }
}
