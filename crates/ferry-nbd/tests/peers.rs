//! The server against real peers: qemu-img, qemu-io, nbdinfo, nbdcopy, fio.

mod common;

use std::sync::Arc;

use common::{TestServer, ok, random_file, run};
use ferry_nbd::{Export, ExportOptions, FileExport, MemoryExport, Server};

const MIB: usize = 1 << 20;

#[test]
fn qemu_img_info_convert_compare_over_unix_and_tcp() {
    let t = TestServer::with_export("disk", Arc::new(MemoryExport::new(16 * MIB as u64)));
    let src = t.path("src.img");
    random_file(&src, 16 * MIB, 7);
    let info = ok("qemu-img", &["info", &t.unix_uri("disk")]);
    assert!(info.contains("virtual size: 16 MiB"), "{info}");
    // Into the export, then out of it into a qcow2, over TCP.
    ok(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            &t.unix_uri("disk"),
        ],
    );
    let out = t.path("out.qcow2");
    ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            &t.tcp_uri("disk"),
            out.to_str().unwrap(),
        ],
    );
    ok(
        "qemu-img",
        &["compare", src.to_str().unwrap(), out.to_str().unwrap()],
    );
    ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            src.to_str().unwrap(),
            &t.tcp_uri("disk"),
        ],
    );
    // A one-byte difference is seen.
    ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x11 5M 1", &t.unix_uri("disk")],
    );
    let o = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            src.to_str().unwrap(),
            &t.unix_uri("disk"),
        ],
    );
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
}

#[test]
fn qemu_io_patterns_on_a_file_export() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("f.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 * MIB as u64)
        .unwrap();
    let t = TestServer::with_export("f", Arc::new(FileExport::open(&img, false).unwrap()));
    let u = t.unix_uri("f");
    let out = ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 1M",
            "-c",
            "write -P 0xa5 3M 64k",
            "-c",
            "write -z 8M 1M",
            "-c",
            "write -P 0x33 31M 1M",
            "-c",
            "flush",
            "-c",
            "aio_write -P 0x77 20M 4k",
            "-c",
            "aio_write -P 0x78 21M 4k",
            "-c",
            "aio_flush",
            "-c",
            "read -P 0x5a 0 1M",
            "-c",
            "read -P 0xa5 3M 64k",
            "-c",
            "read -P 0 8M 1M",
            "-c",
            "read -P 0x33 31M 1M",
            "-c",
            "read -P 0x77 20M 4k",
            "-c",
            "read -P 0x78 21M 4k",
            "-c",
            "discard 31M 1M",
            "-c",
            "read -P 0 31M 1M",
            &u,
        ],
    );
    assert!(!out.contains("fail"), "{out}");
    assert_eq!(out.matches("read ").count(), 7, "{out}");
    // The data is in the file itself, durably after the flush.
    let data = std::fs::read(&img).unwrap();
    assert!(data[..MIB].iter().all(|b| *b == 0x5a));
    assert!(data[3 * MIB..3 * MIB + 65536].iter().all(|b| *b == 0xa5));
    // Writes beyond the end fail, and the failed write left nothing.
    let o = run("qemu-io", &["-f", "raw", "-c", "write -P 1 32M 4k", &u]);
    let s = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        s.contains("error")
            || s.contains("Input/output")
            || s.contains("out of bounds")
            || !o.status.success(),
        "{s}"
    );
}

#[test]
fn read_only_export_refuses_writes() {
    let s = Server::new();
    let m = Arc::new(MemoryExport::new(4 * MIB as u64).read_only());
    s.add_export("ro", m, ExportOptions::default()).unwrap();
    let t = TestServer::start(s);
    let info = ok("nbdinfo", &[&t.unix_uri("ro")]);
    assert!(info.contains("is_read_only: true"), "{info}");
    let o = run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 0 4k", &t.unix_uri("ro")],
    );
    let s = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(!s.contains("wrote 4096"), "{s}");
}

#[test]
fn nbdinfo_list_map_and_change_tracking() {
    let s = Server::new();
    let m = Arc::new(MemoryExport::new(8 * MIB as u64));
    m.write_at(MIB as u64, &vec![1u8; MIB], false).unwrap();
    m.snapshot("s1");
    s.add_export(
        "a",
        m.clone(),
        ExportOptions {
            description: "first".into(),
            ..Default::default()
        },
    )
    .unwrap();
    s.add_export(
        "b",
        Arc::new(MemoryExport::new(MIB as u64)),
        ExportOptions::default(),
    )
    .unwrap();
    s.add_export(
        "hidden",
        Arc::new(MemoryExport::new(MIB as u64)),
        ExportOptions {
            secret: Some("k3y".into()),
            ..Default::default()
        },
    )
    .unwrap();
    let t = TestServer::start(s);
    let list = ok("nbdinfo", &["--list", &t.unix_uri("")]);
    assert!(
        list.contains("export=\"a\"") && list.contains("export=\"b\""),
        "{list}"
    );
    assert!(list.contains("first"), "{list}");
    assert!(!list.contains("hidden"), "{list}");

    let map = ok("nbdinfo", &["--map", &t.unix_uri("a")]);
    let lines: Vec<&str> = map.lines().collect();
    assert_eq!(lines.len(), 3, "{map}");
    assert!(
        lines[0].contains("hole,zero") && lines[1].contains("data"),
        "{map}"
    );
    assert!(
        lines[1].trim_start().starts_with("1048576") && lines[1].contains("1048576"),
        "{map}"
    );

    // Nothing changed since s1 yet; then a write shows up in the context.
    let ctx = "--map=ferry:changed:s1";
    let before = ok("nbdinfo", &[ctx, &t.unix_uri("a")]);
    assert_eq!(before.lines().count(), 1, "{before}");
    ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 9 4M 128k", &t.unix_uri("a")],
    );
    let after = ok("nbdinfo", &[ctx, &t.unix_uri("a")]);
    let l: Vec<&str> = after.lines().collect();
    assert_eq!(l.len(), 3, "{after}");
    assert!(l[1].split_whitespace().next() == Some("4194304"), "{after}");
    assert!(l[1].split_whitespace().nth(1) == Some("131072"), "{after}");
    assert!(l[1].split_whitespace().nth(2) == Some("1"), "{after}");
    // The meta contexts are listed.
    let info = ok("nbdinfo", &[&t.unix_uri("a")]);
    assert!(
        info.contains("ferry:changed:s1") && info.contains("base:allocation"),
        "{info}"
    );
}

#[test]
fn nbdcopy_round_trip_with_several_connections() {
    let t = TestServer::with_export("c", Arc::new(MemoryExport::new(32 * MIB as u64)));
    let src = t.path("src.img");
    let back = t.path("back.img");
    let data = random_file(&src, 32 * MIB, 99);
    ok(
        "nbdcopy",
        &[
            "-C",
            "4",
            "-R",
            "8",
            src.to_str().unwrap(),
            &t.unix_uri("c"),
        ],
    );
    ok(
        "nbdcopy",
        &[
            "-C",
            "4",
            "-R",
            "8",
            &t.tcp_uri("c"),
            back.to_str().unwrap(),
        ],
    );
    assert!(std::fs::read(&back).unwrap() == data, "round trip differs");
}

#[test]
fn fio_nbd_engine_verifies_crc32c() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fio.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 * MIB as u64)
        .unwrap();
    let t = TestServer::with_export("", Arc::new(FileExport::open(&img, false).unwrap()));
    for (rw, bs) in [("randwrite", "4k"), ("write", "256k")] {
        let out = ok(
            "fio",
            &[
                "--name=verify",
                "--ioengine=nbd",
                &format!("--uri={}", t.unix_uri("")),
                &format!("--rw={rw}"),
                &format!("--bs={bs}"),
                "--size=32M",
                "--iodepth=16",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--verify_state_save=0",
                "--output-format=json",
            ],
        );
        assert!(out.contains("\"error\" : 0"), "{out}");
    }
}
