//! `ferry repo ...`, `ferry backup ...` and `ferry restore ...` against a
//! real `ferryd`: a stopped VM on a volume of random data is backed up
//! twice (full, then incremental), listed, shown, restored (the restored
//! volume equals the source), verified, pruned (dry run, then for real),
//! collected; bad input gets exit code 1 and a clear message.

mod common;

use std::io::{Read, Write};
use std::process::Command;

use common::daemon;
use serde_json::Value;

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Reads a volume through a read-only export into bytes.
fn read_volume(d: &common::Daemon, volume: &str) -> Vec<u8> {
    let e = d.json(&[
        "export",
        "create",
        "--volume",
        volume,
        "--name",
        &format!("x-{volume}"),
    ]);
    let out = d.img_dir().join(format!("{volume}.out"));
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(e["unix_uri"].as_str().unwrap())
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    d.json(&["export", "delete", &format!("x-{volume}")]);
    std::fs::read(out).unwrap()
}

#[test]
fn repo_backup_restore_verify_prune_gc() {
    let d = daemon();
    // A volume of 8 MiB random data and 8 MiB zeroes, and a stopped VM on it.
    let raw = d.img_dir().join("d.raw");
    let mut data = vec![0u8; 8 << 20];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut data)
        .unwrap();
    let mut f = std::fs::File::create(&raw).unwrap();
    f.write_all(&data).unwrap();
    f.set_len(16 << 20).unwrap();
    let o = d.ferry(&[
        "volume",
        "import",
        "disk-1",
        raw.to_str().unwrap(),
        "--format",
        "raw",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let o = d.ferry(&[
        "vm", "define", "vm-1", "--disk", "disk-1", "--memory", "64M", "--accel", "tcg",
    ]);
    assert!(o.status.success(), "{}", text(&o));

    let loc = d.img_dir().join("repo");
    let key = d.img_dir().join("k");
    let r = d.json(&[
        "repo",
        "init",
        loc.to_str().unwrap(),
        "--name",
        "main",
        "--encrypt",
        "--key-file",
        key.to_str().unwrap(),
    ]);
    assert_eq!(r["name"], "main");
    assert_eq!(r["encrypted"], true);
    // Encryption without a key file is a usage error.
    let o = d.ferry(&["repo", "init", "/tmp/x", "--encrypt"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let list = d.json(&["repo", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 1);

    // `ferry backup VM --repo R`; with one repository --repo may be left out.
    let o = d.ferry(&["backup", "vm-1", "--repo", "main"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("committed (full)"), "{}", text(&o));
    let o = d.ferry(&["backup", "vm-1"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("committed (incremental)"), "{}", text(&o));
    let list = d.json(&["backup", "list", "--vm", "vm-1"]);
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[1]["parent"], list[0]["id"]);
    assert_eq!(list[1]["disks"][0]["read_bytes"], 0, "nothing changed");
    let id = list[0]["id"].as_str().unwrap();
    let shown: Value = d.json(&["backup", "show", id]);
    assert_eq!(shown["config"]["consistency"], "stopped");
    let table = text(&d.ferry(&["backup", "show", id]));
    assert!(table.contains("vda") && table.contains("full"), "{table}");
    let info = d.json(&["repo", "info"]);
    assert_eq!(info["backups"], 2);
    assert_eq!(info["chunks"], 8);

    // Restore to this host as a new VM.
    let host = d.json(&["host", "info"]);
    let o = d.ferry(&[
        "restore",
        id,
        "--to",
        host["name"].as_str().unwrap(),
        "--name",
        "vm-2",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(read_volume(&d, "vm-2-vda") == read_volume(&d, "disk-1"));
    let vm = d.json(&["vm", "show", "vm-2"]);
    assert_eq!(vm["state"], "defined");
    // A host that is not a registered peer is refused.
    let o = d.ferry(&["restore", id, "--to", "elsewhere", "--name", "vm-3"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("no peer named elsewhere"), "{}", text(&o));

    let o = d.ferry(&["repo", "verify", "main"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("checked 2 backups, 8 chunks"),
        "{}",
        text(&o)
    );

    let o = d.ferry(&["repo", "prune", "--keep-last", "1", "--dry-run"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("would forget {id}")),
        "{}",
        text(&o)
    );
    assert_eq!(d.json(&["backup", "list"]).as_array().unwrap().len(), 2);
    let o = d.ferry(&["repo", "prune", "--keep-last", "1"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(d.json(&["backup", "list"]).as_array().unwrap().len(), 1);
    let o = d.ferry(&["repo", "prune"]);
    assert_eq!(o.status.code(), Some(1), "no rule: refused");
    let o = d.ferry(&["repo", "gc"]);
    assert!(o.status.success(), "{}", text(&o));
    let last = d.json(&["backup", "list"])[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let o = d.ferry(&["backup", "forget", &last]);
    assert!(o.status.success(), "{}", text(&o));
    let o = d.ferry(&["backup", "show", &last]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains(&format!("no backup {last}")),
        "{}",
        text(&o)
    );
    let o = d.ferry(&["backup", "nope", "--repo", "main"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("nope"), "{}", text(&o));
}
