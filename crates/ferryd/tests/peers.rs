//! Peers against two real ferryd processes: registration checks the URL
//! and the peer token, a peer token opens only `/v1/peer/`, registrations
//! survive a restart.

mod common;

use common::{Host, send};
use serde_json::json;

async fn peer_token(h: &Host) -> String {
    let (s, t) = h.get("/v1/host/peer-token").await;
    assert_eq!(s, 200, "{t}");
    t["token"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn hosts_register_each_other_with_peer_tokens() {
    let mut a = Host::named("host-a");
    let b = Host::named("host-b");
    let b_token = peer_token(&b).await;
    assert_ne!(b_token, b.token, "peer and admin tokens must differ");

    // Register b at a; the name defaults to what b reports.
    let (s, p) = a
        .post("/v1/peers", json!({ "url": b.url, "token": b_token }))
        .await;
    assert_eq!(s, 201, "{p}");
    assert_eq!(p["name"], "host-b");
    assert_eq!(p["host_name"], "host-b");
    assert!(p["nbd"].as_str().unwrap().starts_with("nbd://"), "{p}");
    assert!(
        p.get("token").is_none(),
        "a listing must never show a token"
    );

    let (s, l) = a.get("/v1/peers").await;
    assert_eq!(s, 200);
    assert_eq!(l.as_array().unwrap().len(), 1);
    let (s, p) = a.get("/v1/peers/host-b").await;
    assert_eq!(s, 200, "{p}");
    assert_eq!(p["reachable"], true, "{p}");
    // The live check carries the peer's pool usage (b has no volumes yet).
    assert_eq!(p["pool"]["volumes"], 0, "{p}");
    assert!(p["pool"]["chunk_size"].as_u64().unwrap() > 0, "{p}");

    // Twice under one name: 409.
    let (s, e) = a
        .post("/v1/peers", json!({ "url": b.url, "token": b_token }))
        .await;
    assert_eq!((s, e["field"].as_str()), (409, Some("name")), "{e}");

    // The registration is durable, and the token file is private.
    a.kill9();
    a.start();
    let (_, l) = a.get("/v1/peers").await;
    assert_eq!(l[0]["name"], "host-b", "{l}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(a.data().join("peers.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "peers.json holds tokens: mode {mode:o}");

    // b goes away: show says so, list still has it.
    drop(b);
    let (s, p) = a.get("/v1/peers/host-b").await;
    assert_eq!(s, 200, "{p}");
    assert_eq!(p["reachable"], false, "{p}");
    assert!(p["error"].as_str().unwrap().contains("cannot reach"), "{p}");

    let (s, _) = a.delete("/v1/peers/host-b").await;
    assert_eq!(s, 204);
    let (s, e) = a.delete("/v1/peers/host-b").await;
    assert_eq!(s, 404, "{e}");
    assert!(e["error"].as_str().unwrap().contains("host-b"), "{e}");
}

#[tokio::test]
async fn a_peer_token_cannot_do_admin_calls() {
    let h = Host::new();
    let pt = peer_token(&h).await;
    let client = reqwest::Client::new();
    let call = |m: reqwest::Method, p: &str, t: &str| {
        client
            .request(m, format!("{}{p}", h.url))
            .bearer_auth(t.to_string())
    };
    // What a peer may call.
    let (s, hello) = send(call(reqwest::Method::GET, "/v1/peer/hello", &pt)).await;
    assert_eq!(s, 200, "{hello}");
    assert_eq!(hello["name"], "test-host");
    // Resource calls a peer needs to move VMs here.
    let (s, v) = send(call(reqwest::Method::GET, "/v1/volumes", &pt)).await;
    assert_eq!((s, v), (200, json!([])));
    // Admin calls with a peer token: 403, and nothing happens.
    for (m, p) in [
        (reqwest::Method::GET, "/v1/host/peer-token"),
        (reqwest::Method::GET, "/v1/peers"),
        (reqwest::Method::POST, "/v1/peers"),
        (reqwest::Method::DELETE, "/v1/peers/x"),
        (reqwest::Method::GET, "/metrics"),
    ] {
        let (s, e) =
            send(call(m.clone(), p, &pt).json(&json!({ "name": "sneaky", "size": 1048576 }))).await;
        assert_eq!(s, 403, "{m} {p}: {e}");
        assert!(e["error"].as_str().unwrap().contains("admin token"), "{e}");
    }
    let (_, v) = h.get("/v1/volumes").await;
    assert_eq!(v, json!([]), "a peer token created something");
    // Unknown tokens: 401 on both kinds of path.
    for p in ["/v1/peer/hello", "/v1/volumes"] {
        let (s, _) = send(call(reqwest::Method::GET, p, "not-a-token")).await;
        assert_eq!(s, 401, "{p}");
    }
}

#[tokio::test]
async fn bad_registrations_are_refused_and_nothing_is_stored() {
    let a = Host::named("host-a");
    let b = Host::named("host-b");
    // A wrong token.
    let (s, e) = a
        .post("/v1/peers", json!({ "url": b.url, "token": "wrong" }))
        .await;
    assert_eq!((s, e["field"].as_str()), (400, Some("token")), "{e}");
    // b's admin token works on b, but is refused: a peer must never hold
    // another host's admin token.
    let (s, e) = a
        .post("/v1/peers", json!({ "url": b.url, "token": b.token }))
        .await;
    assert_eq!((s, e["field"].as_str()), (400, Some("token")), "{e}");
    assert!(e["error"].as_str().unwrap().contains("admin token"), "{e}");
    // This host's own admin token is never sent anywhere.
    let (s, e) = a
        .post("/v1/peers", json!({ "url": b.url, "token": a.token }))
        .await;
    assert_eq!((s, e["field"].as_str()), (400, Some("token")), "{e}");
    // Nothing listens: 502 naming the url.
    let (s, e) = a
        .post(
            "/v1/peers",
            json!({ "url": "http://127.0.0.1:1", "token": "t" }),
        )
        .await;
    assert_eq!((s, e["field"].as_str()), (502, Some("url")), "{e}");
    // Not a URL, missing field: 400 naming it.
    let (s, e) = a
        .post("/v1/peers", json!({ "url": "host-b:7450", "token": "t" }))
        .await;
    assert_eq!((s, e["field"].as_str()), (400, Some("url")), "{e}");
    let (s, e) = a.post("/v1/peers", json!({ "url": b.url })).await;
    assert_eq!((s, e["field"].as_str()), (400, Some("token")), "{e}");
    let (_, l) = a.get("/v1/peers").await;
    assert_eq!(l, json!([]));
    assert!(!a.data().join("peers.json").exists());
}
