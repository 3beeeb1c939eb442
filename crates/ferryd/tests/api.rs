//! The HTTP API against a real `ferryd` process: auth, volumes, snapshots,
//! clones, bad input, and an import operation that survives `kill -9`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::Host;
use serde_json::{Value, json};

#[tokio::test]
async fn auth_is_required_except_for_health() {
    let h = Host::new();
    let c = reqwest::Client::new();
    let health = c.get(format!("{}/v1/health", h.url)).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let none = c.get(format!("{}/v1/volumes", h.url)).send().await.unwrap();
    assert_eq!(none.status(), 401);
    let wrong = c
        .get(format!("{}/v1/volumes", h.url))
        .bearer_auth("0".repeat(64))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let body: Value = wrong.json().await.unwrap();
    assert_eq!(body["error"], "invalid token");
    let (s, host) = h.get("/v1/host").await;
    assert_eq!(s, 200);
    assert_eq!(host["name"], "test-host");
    let (s, _) = h.get("/v1/nothing-here").await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn volumes_snapshots_and_clones() {
    let h = Host::new();
    let (s, v) = h
        .post("/v1/volumes", json!({"name": "web-1", "size": 64 << 20}))
        .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["size"], 64 << 20);
    h.post("/v1/volumes", json!({"name": "db-1", "size": 32 << 20}))
        .await;
    h.post("/v1/volumes", json!({"name": "other", "size": 1 << 20}))
        .await;
    let (s, dup) = h
        .post("/v1/volumes", json!({"name": "web-1", "size": 1 << 20}))
        .await;
    assert_eq!(s, 409, "{dup}");

    // One atomic group snapshot of exactly two volumes.
    let (s, snaps) = h
        .post(
            "/v1/snapshots",
            json!({"name": "g1", "volumes": ["web-1", "db-1"]}),
        )
        .await;
    assert_eq!(s, 201, "{snaps}");
    let (_, all) = h.get("/v1/snapshots").await;
    let all = all.as_array().unwrap();
    assert_eq!(all.len(), 2);
    assert!(all.iter().all(|s| s["group"] == "g1"));
    assert!(all.iter().all(|s| s["volume"] != "other"));

    let (s, clone) = h
        .post(
            "/v1/clones",
            json!({"snapshot": "g1@web-1", "name": "web-2"}),
        )
        .await;
    assert_eq!(s, 201, "{clone}");
    assert_eq!(clone["parent_snapshot"], "g1@web-1");
    // The snapshot is needed by the clone.
    let (s, e) = h.delete("/v1/snapshots/g1@web-1").await;
    assert_eq!(s, 409, "{e}");
    assert!(e["error"].as_str().unwrap().contains("g1@web-1"), "{e}");

    let (s, grown) = h
        .post("/v1/volumes/web-1/grow", json!({"size": 128 << 20}))
        .await;
    assert_eq!(s, 200, "{grown}");
    assert_eq!(grown["size"], 128 << 20);

    let (s, _) = h.delete("/v1/volumes/web-2").await;
    assert_eq!(s, 204);
    let (s, _) = h.delete("/v1/snapshots/g1@web-1").await;
    assert_eq!(s, 204);
    let (_, vols) = h.get("/v1/volumes").await;
    let names: Vec<&str> = vols
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["db-1", "other", "web-1"]);
}

#[tokio::test]
async fn bad_input_names_the_field_or_object() {
    let h = Host::new();
    let (s, e) = h.post("/v1/volumes", json!({"name": "x"})).await;
    assert_eq!(s, 400, "{e}");
    assert_eq!(e["field"], "size");
    let (s, e) = h
        .post("/v1/volumes", json!({"name": "x", "size": "big"}))
        .await;
    assert_eq!(s, 400, "{e}");
    assert_eq!(e["field"], "size");
    let (s, e) = h
        .post("/v1/volumes", json!({"name": "../etc", "size": 1}))
        .await;
    assert_eq!(s, 400, "{e}");
    assert_eq!(e["field"], "name");
    let (s, e) = h.post("/v1/volumes", json!({"name": "x", "size": 0})).await;
    assert_eq!(s, 400, "{e}");
    let (s, e) = h.get("/v1/volumes/ghost").await;
    assert_eq!(s, 404, "{e}");
    assert!(e["error"].as_str().unwrap().contains("ghost"), "{e}");
    let (s, e) = h.delete("/v1/volumes/ghost").await;
    assert_eq!(s, 404, "{e}");
    let (s, e) = h.get("/v1/operations/nope").await;
    assert_eq!(s, 404, "{e}");
    let (s, e) = h.get("/v1/operations/nope?wait_s=5").await;
    assert_eq!(s, 404, "{e}");
    let (s, e) = h.get("/v1/operations/nope?wait_s=301").await;
    assert_eq!(s, 400, "{e}");
    assert_eq!(e["field"], "wait_s");
    let (s, e) = h
        .post(
            "/v1/volumes/imp/import",
            json!({"path": "/nonexistent/disk.raw"}),
        )
        .await;
    assert_eq!(s, 400, "{e}");
    assert_eq!(e["field"], "path");
}

/// A raw image with data at known places and holes elsewhere.
fn make_image(path: &Path, size: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut off = 0;
    let mut i = 0u8;
    while off < size {
        f.write_all_at(&[i.wrapping_add(1); 1 << 20], off).unwrap();
        off += 3 << 20;
        i = i.wrapping_add(1);
    }
}

#[tokio::test]
async fn import_runs_as_an_operation_with_progress() {
    let h = Host::new();
    let img = h.dir.path().join("disk.raw");
    make_image(&img, 64 << 20);
    let (s, started) = h
        .post("/v1/volumes/disk0/import", json!({"path": img}))
        .await;
    assert_eq!(s, 202, "{started}");
    let id = started["operation"].as_str().unwrap().to_string();
    // A long poll answers once the import is done (asked right after it
    // started, the same call without wait_s sees it running).
    let (s, op) = h.get(&format!("/v1/operations/{id}?wait_s=60")).await;
    assert_eq!(s, 200, "{op}");
    assert_eq!(op["state"], "succeeded", "{op}");
    assert_eq!(op["progress"]["overall"], 1.0, "{op}");
    let op = h.wait_op(&id).await;
    assert_eq!(op["state"], "succeeded", "{op}");
    let steps: Vec<&str> = op["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["state"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["done", "done"]);
    let (_, vol) = h.get("/v1/volumes/disk0").await;
    assert_eq!(vol["size"], 64 << 20);
    // 22 blocks of 1 MiB were written, holes were not.
    assert_eq!(vol["exclusive_bytes"], 22 << 20, "{vol}");
    let (_, list) = h.get("/v1/operations").await;
    assert_eq!(list.as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn kill_9_mid_import_then_restart_finishes_or_compensates() {
    let mut h = Host::new();
    let img = h.dir.path().join("big.raw");
    make_image(&img, 512 << 20);
    let (s, started) = h.post("/v1/volumes/big/import", json!({"path": img})).await;
    assert_eq!(s, 202, "{started}");
    let id = started["operation"].as_str().unwrap().to_string();
    // Kill once the copy has visibly started.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, op) = h.get(&format!("/v1/operations/{id}")).await;
        let overall = op["progress"]["overall"].as_f64().unwrap_or(0.0);
        if overall > 0.05 || op["state"] != "running" {
            break;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    h.kill9();
    h.start();
    let op = h.wait_op(&id).await;
    let log: Vec<&str> = op["log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["msg"].as_str().unwrap())
        .collect();
    let log_text = log.join("\n");
    match op["state"].as_str().unwrap() {
        "succeeded" => {
            // The copy step is idempotent: rolled forward.
            assert!(
                log_text.contains("recovered after restart: rolling forward"),
                "{log_text}"
            );
            let (s, vol) = h.get("/v1/volumes/big").await;
            assert_eq!(s, 200);
            assert_eq!(vol["exclusive_bytes"], 171 << 20, "{vol}");
        }
        "failed" => {
            // Killed while creating the volume: compensated, no volume left.
            assert!(log_text.contains("compensating"), "{log_text}");
            let (s, _) = h.get("/v1/volumes/big").await;
            assert_eq!(s, 404);
        }
        other => panic!("unexpected end state {other}: {op}"),
    }
}
