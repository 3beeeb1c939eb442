//! ferryd's NBD exports of pool volumes and snapshots, used by real NBD
//! clients (qemu-io, qemu-img, nbdinfo), including across a `kill -9` of
//! ferryd.

mod common;

use std::process::Command;

use common::Host;
use serde_json::{Value, json};

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    qemu_io_opts(uri, &[], cmds)
}

fn qemu_io_opts(uri: &str, opts: &[&str], cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]).args(opts);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c.arg(uri).output().expect("qemu-io is installed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "qemu-io {cmds:?} on {uri}: {text}");
    text
}

fn tool(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Snapshot `name` of `volume`.
async fn snapshot(h: &Host, name: &str, volume: &str) {
    let (s, snaps) = h
        .post("/v1/snapshots", json!({"name": name, "volumes": [volume]}))
        .await;
    assert_eq!(s, 201, "{snaps}");
}

async fn export(h: &Host, body: Value) -> Value {
    let (s, e) = h.post("/v1/exports", body).await;
    assert_eq!(s, 201, "{e}");
    e
}

#[tokio::test]
async fn volume_export_serves_qemu_io_and_survives_kill_9() {
    let mut h = Host::new();
    h.post("/v1/volumes", json!({"name": "disk0", "size": 16 << 20}))
        .await;
    let e = export(&h, json!({"volume": "disk0"})).await;
    let unix = e["unix_uri"].as_str().unwrap().to_string();
    let tcp = e["tcp_uri"].as_str().unwrap().to_string();
    assert!(!e["read_only"].as_bool().unwrap());

    // qemu-io flushes before it exits: these writes are acknowledged.
    qemu_io(&unix, &["write -P 0xab 1M 64k", "write -P 0xcd 5000 3000"]);
    qemu_io(&unix, &["read -P 0xab 1M 64k", "read -P 0xcd 5000 3000"]);
    // A large write that allocates, then one over it in place (taken from
    // the socket through the server's pipe), over both transports.
    qemu_io(&unix, &["write -P 0x11 8M 8M", "write -P 0x22 8M 8M"]);
    qemu_io(&tcp, &["read -P 0x22 8M 8M", "write -P 0x33 9M 4M"]);
    qemu_io(
        &unix,
        &[
            "read -P 0x22 8M 1M",
            "read -P 0x33 9M 4M",
            "read -P 0x22 13M 3M",
        ],
    );

    // /metrics counts the I/O served.
    let (s, m) = h.get("/metrics").await;
    assert_eq!(s, 200);
    let m = m.as_str().unwrap().to_string();
    let value = |line: &str| -> u64 {
        m.lines()
            .find_map(|l| l.strip_prefix(line))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {line} in\n{m}"))
    };
    assert!(value("ferry_nbd_bytes_total{direction=\"write\"}") >= 65536 + 3000);
    assert!(value("ferry_nbd_bytes_total{direction=\"read\"}") >= 65536 + 3000);
    assert!(value("ferry_nbd_requests_total{kind=\"flush\"}") >= 1);
    assert_eq!(value("ferry_lazy_volumes"), 0);

    // Over TCP the export needs its secret.
    let (ok, text) = tool("qemu-img", &["info", "--output=json", &tcp]);
    assert!(ok, "{text}");
    assert!(text.contains("\"virtual-size\": 16777216"), "{text}");
    let bare = tcp.rsplit_once('/').unwrap().0;
    let (ok, _) = tool("qemu-img", &["info", bare]);
    assert!(!ok, "export reachable over TCP without its secret");

    // The allocation map shows the written chunks only.
    let (ok, map) = tool("nbdinfo", &["--map", &unix]);
    assert!(ok, "{map}");
    assert!(map.contains("data") && map.contains("hole"), "{map}");

    // An exported volume cannot be deleted.
    let (s, err) = h.delete("/v1/volumes/disk0").await;
    assert_eq!(s, 409, "{err}");
    assert!(
        err["error"].as_str().unwrap().contains("export disk0"),
        "{err}"
    );

    // kill -9: acknowledged writes and the export itself survive.
    h.kill9();
    h.start();
    let (s, list) = h.get("/v1/exports").await;
    assert_eq!(s, 200);
    assert_eq!(list[0]["name"], "disk0");
    qemu_io(&unix, &["read -P 0xab 1M 64k", "read -P 0xcd 5000 3000"]);
    qemu_io(
        &unix,
        &[
            "read -P 0x22 8M 1M",
            "read -P 0x33 9M 4M",
            "read -P 0x22 13M 3M",
        ],
    );

    let (s, _) = h.delete("/v1/exports/disk0").await;
    assert_eq!(s, 204);
    let (s, _) = h.delete("/v1/volumes/disk0").await;
    assert_eq!(s, 204);
}

/// Bytes of `file` in the page cache (`fincore`, util-linux).
fn cached(file: &std::path::Path) -> u64 {
    let (ok, out) = tool(
        "fincore",
        &[
            "--bytes",
            "--noheadings",
            "--output",
            "RES",
            file.to_str().unwrap(),
        ],
    );
    assert!(ok, "fincore: {out}");
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("fincore said {out:?}"))
}

#[tokio::test]
async fn direct_export_writes_around_the_page_cache_and_survives_kill_9() {
    let mut h = Host::new();
    h.post("/v1/volumes", json!({"name": "fill", "size": 32 << 20}))
        .await;
    let e = export(&h, json!({"volume": "fill", "direct": true})).await;
    assert_eq!(e["direct"], true, "{e}");
    let unix = e["unix_uri"].as_str().unwrap().to_string();
    let tcp = e["tcp_uri"].as_str().unwrap().to_string();
    let data = h.data().join("pool/data");

    // Whole chunks into new space over TCP: written straight to the disk,
    // so the data file's cached pages do not grow by the 8 MiB written.
    let before = cached(&data);
    qemu_io(&tcp, &["write -P 0x11 8M 8M"]);
    let grew = cached(&data).saturating_sub(before);
    assert!(
        grew < 2 << 20,
        "8 MiB of direct writes left {grew} bytes cached"
    );

    // Unaligned and small writes (partial chunks go the ordinary way),
    // over both transports, some over the direct data.
    qemu_io(
        &unix,
        &[
            "write -P 0x22 5000 1M",
            "write -P 0x33 9M 3000",
            "write -P 0x44 20M 4M",
        ],
    );
    qemu_io(&tcp, &["write -P 0x55 10M 2M"]);
    let check = [
        "read -P 0 0 5000",
        "read -P 0x22 5000 1M",
        "read -P 0x11 8M 1M",
        "read -P 0x33 9M 3000",
        "read -P 0x11 9440184 1045576",
        "read -P 0x55 10M 2M",
        "read -P 0x11 12M 4M",
        "read -P 0x44 20M 4M",
    ];
    qemu_io(&unix, &check);

    // A snapshot's export is read-only: no direct writes there.
    snapshot(&h, "fill-s", "fill").await;
    let (s, err) = h
        .post("/v1/exports", json!({"snapshot": "fill-s", "direct": true}))
        .await;
    assert_eq!(s, 400, "{err}");
    assert!(err["error"].as_str().unwrap().contains("direct"), "{err}");

    // kill -9: the acknowledged writes and the export's mode survive.
    h.kill9();
    h.start();
    let (s, got) = h.get("/v1/exports/fill").await;
    assert_eq!(s, 200);
    assert_eq!(got["direct"], true, "{got}");
    qemu_io(got["tcp_uri"].as_str().unwrap(), &check);
}

/// NBD requests of `kind` this host served so far (its metrics).
async fn served(h: &Host, kind: &str) -> u64 {
    let text = h
        .req(reqwest::Method::GET, "/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let key = format!("ferry_nbd_requests_total{{kind=\"{kind}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in the metrics"))
}

#[tokio::test]
async fn write_out_export_writes_go_to_the_disk_without_a_flush() {
    let mut h = Host::new();
    h.post("/v1/volumes", json!({"name": "out", "size": 32 << 20}))
        .await;
    let e = export(&h, json!({"volume": "out", "write_out": true})).await;
    assert_eq!(e["write_out"], true, "{e}");
    let uri = e["tcp_uri"].as_str().unwrap().to_string();
    let data = h.data().join("pool/data");
    // nbdcopy flushes only when asked (`--flush`). Each write was sent to
    // the disk before it was answered: no page is left dirty (the kernel
    // on its own waits 30 s, unless much of the machine's memory is dirty).
    let src = h.data().join("src.raw");
    let mut bytes = vec![0x61u8; 8 << 20];
    bytes.extend(vec![0x62u8; 1 << 20]);
    std::fs::write(&src, &bytes).unwrap();
    let (ok, out) = tool("nbdcopy", &[src.to_str().unwrap(), &uri]);
    assert!(ok, "nbdcopy: {out}");
    assert_eq!(served(&h, "flush").await, 0);
    assert!(served(&h, "write").await > 0);
    let s = ferry_testkit::disk::page_states(&data).expect("cachestat");
    assert_eq!(s.dirty, 0, "{s:?}");
    assert!(s.cached >= 2048, "{s:?}");

    // A snapshot's export is read-only: no write-out there.
    snapshot(&h, "out-s", "out").await;
    let (st, err) = h
        .post(
            "/v1/exports",
            json!({"snapshot": "out-s", "write_out": true}),
        )
        .await;
    assert_eq!(st, 400, "{err}");
    assert!(
        err["error"].as_str().unwrap().contains("write_out"),
        "{err}"
    );

    // Durable after a flush, as any write; kill -9 keeps the writes and
    // the export's mode.
    qemu_io(&uri, &["write -P 0x63 12345 6789", "flush"]);
    h.kill9();
    h.start();
    let (st, got) = h.get("/v1/exports/out").await;
    assert_eq!(st, 200);
    assert_eq!(got["write_out"], true, "{got}");
    qemu_io(
        got["tcp_uri"].as_str().unwrap(),
        &[
            "read -P 0x61 0 12345",
            "read -P 0x63 12345 6789",
            "read -P 0x61 19134 8369474",
            "read -P 0x62 8M 1M",
            "read -P 0 9M 1M",
        ],
    );
}

#[tokio::test]
async fn snapshot_exports_are_read_only_and_changes_are_tracked() {
    let h = Host::new();
    h.post("/v1/volumes", json!({"name": "vol", "size": 8 << 20}))
        .await;
    let v = export(&h, json!({"volume": "vol"})).await;
    let vol_uri = v["unix_uri"].as_str().unwrap().to_string();
    qemu_io(&vol_uri, &["write -P 0x11 0 1M"]);
    snapshot(&h, "before", "vol").await;
    qemu_io(&vol_uri, &["write -P 0x22 4M 64k"]);

    let snap = export(&h, json!({"snapshot": "before", "name": "before-ro"})).await;
    assert!(snap["read_only"].as_bool().unwrap());
    let snap_uri = snap["unix_uri"].as_str().unwrap().to_string();
    // The snapshot still holds the old content; the volume the new one.
    qemu_io_opts(
        &snap_uri,
        &["-r"],
        &["read -P 0x11 0 1M", "read -P 0 4M 64k"],
    );
    qemu_io(&vol_uri, &["read -P 0x22 4M 64k"]);
    let (ok, text) = tool(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x33 0 4k", &snap_uri],
    );
    assert!(
        !ok || text.contains("Operation not permitted") || text.contains("read-only"),
        "write to a snapshot export succeeded: {text}"
    );
    qemu_io_opts(&snap_uri, &["-r"], &["read -P 0x11 0 4k"]);

    // Change tracking over NBD: exactly the chunk written after the snapshot.
    let (ok, map) = tool("nbdinfo", &["--map=ferry:changed:before", &vol_uri]);
    assert!(ok, "{map}");
    let changed: Vec<&str> = map
        .lines()
        .filter(|l| !l.trim_end().ends_with(" 0"))
        .collect();
    assert!(
        map.lines()
            .any(|l| l.split_whitespace().take(2).collect::<Vec<_>>() == ["4194304", "65536"]),
        "{map}"
    );
    assert!(!changed.is_empty(), "{map}");
}
