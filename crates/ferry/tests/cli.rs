//! The CLI against a real `ferryd`: `--json` output, tables, exit codes,
//! progress of an import.

mod common;

use common::daemon;
use serde_json::Value;
use std::process::Command;

#[test]
fn volumes_and_snapshots_in_json_and_tables() {
    let d = daemon();
    let v = d.json(&["volume", "create", "web-1", "64M"]);
    assert_eq!(v["size"], 64 << 20);
    d.json(&["volume", "create", "db-1", "1G"]);
    let snaps = d.json(&[
        "snapshot", "create", "g", "--volume", "web-1", "--volume", "db-1",
    ]);
    assert_eq!(snaps.as_array().unwrap().len(), 2);
    let c = d.json(&["volume", "clone", "g@web-1", "web-2"]);
    assert_eq!(c["parent_snapshot"], "g@web-1");
    let list = d.json(&["volume", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 3);

    let table = d.ferry(&["volume", "list"]);
    let text = String::from_utf8(table.stdout).unwrap();
    assert!(text.starts_with("NAME"), "{text}");
    assert!(text.contains("db-1") && text.contains("1.0 GiB"), "{text}");

    let e = d.json(&["export", "create", "--volume", "web-1"]);
    assert_eq!(e["name"], "web-1");
    assert!(
        e["unix_uri"]
            .as_str()
            .unwrap()
            .starts_with("nbd+unix:///web-1?socket=")
    );
    let ro = d.json(&[
        "export",
        "create",
        "--snapshot",
        "g@db-1",
        "--name",
        "db-ro",
    ]);
    assert_eq!(ro["read_only"], true);
    assert_eq!(d.json(&["export", "list"]).as_array().unwrap().len(), 2);
    let busy = d.ferry(&["volume", "delete", "web-1"]);
    assert_eq!(busy.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&busy.stderr).contains("in use by NBD export web-1"));
    d.json(&["export", "delete", "db-ro"]);

    let pool = d.json(&["pool", "info"]);
    assert_eq!(pool["volumes"], 3);
    assert_eq!(pool["snapshots"], 2);
    let host = d.json(&["host", "info"]);
    assert!(host["version"].is_string());
}

#[test]
fn exit_codes_scripts_can_trust() {
    let d = daemon();
    let missing = d.ferry(&["volume", "show", "ghost"]);
    assert_eq!(missing.status.code(), Some(1));
    let err = String::from_utf8(missing.stderr).unwrap();
    assert!(err.contains("volume ghost") && err.contains("404"), "{err}");
    let usage = d.ferry(&["volume", "frobnicate"]);
    assert_eq!(usage.status.code(), Some(2));
    let bad_size = d.ferry(&["volume", "create", "x", "12Q"]);
    assert_eq!(bad_size.status.code(), Some(1));
    let no_server = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["volume", "list"])
        .env("FERRY_URL", "http://127.0.0.1:1")
        .env("FERRY_TOKEN", "x")
        .env("FERRY_CONFIG", "/nonexistent")
        .output()
        .unwrap();
    assert_eq!(no_server.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&no_server.stderr).contains("cannot reach ferryd"));
    let wrong_token = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["volume", "list"])
        .env("FERRY_URL", &d.url)
        .env("FERRY_TOKEN", "wrong")
        .env("FERRY_CONFIG", "/nonexistent")
        .output()
        .unwrap();
    assert_eq!(wrong_token.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&wrong_token.stderr).contains("401"));
}

#[test]
fn import_shows_progress_and_operation_details() {
    use std::os::unix::fs::FileExt;
    let d = daemon();
    let img = d.img_dir().join("disk.raw");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(32 << 20).unwrap();
    f.write_all_at(&[7u8; 1 << 20], 5 << 20).unwrap();
    drop(f);
    let out = d.ferry(&["volume", "import", "disk0", img.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("succeeded"));
    let ops = d.json(&["op", "list"]);
    let id = ops[0]["id"].as_str().unwrap().to_string();
    assert_eq!(ops[0]["state"], "succeeded");
    let op = d.json(&["op", "show", &id]);
    assert_eq!(op["progress"]["overall"], 1.0);
    let human = String::from_utf8(d.ferry(&["op", "show", &id]).stdout).unwrap();
    assert!(
        human.contains("copy data") && human.contains("100.0%"),
        "{human}"
    );
    // Watching a finished operation prints its end and exits 0.
    let lines = d.ferry(&["op", "watch", &id, "--json"]);
    assert!(lines.status.success());
    let last: Value = serde_json::from_str(
        String::from_utf8(lines.stdout)
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(last["state"], "succeeded");
    // A second import onto the same name is refused and changes nothing.
    let again = d.ferry(&["volume", "import", "disk0", img.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(1));
}

#[test]
fn completions_are_printed() {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("ferry"));
}

#[test]
fn peers_are_registered_with_the_other_hosts_peer_token() {
    let a = daemon();
    let b = daemon();
    let t = b.json(&["peer", "token"]);
    let token = t["token"].as_str().unwrap().to_string();
    assert_ne!(token, b.token);
    let p = a.json(&["peer", "add", &b.url, "--peer-token", &token, "--name", "b"]);
    assert_eq!(p["name"], "b");
    let list = a.json(&["peer", "list"]);
    assert_eq!(list[0]["url"], b.url.as_str());
    let show = a.json(&["peer", "show", "b"]);
    assert_eq!(show["reachable"], true, "{show}");
    let table = String::from_utf8(a.ferry(&["peer", "list"]).stdout).unwrap();
    assert!(
        table.starts_with("NAME") && table.contains(&b.url),
        "{table}"
    );
    // A wrong token: refused, exit 1, the message says what to do.
    let out = a.ferry(&["peer", "add", &b.url, "--peer-token", "nope", "--name", "c"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ferry peer token"), "{err}");
    a.json(&["peer", "remove", "b"]);
    assert_eq!(a.json(&["peer", "list"]), serde_json::json!([]));
}
