//! The round trip, an incremental backup, verify and gc against a real
//! S3-compatible server: moto, started by the test on a free port.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use ferry_backup::{
    BackupOptions, DiskInput, ErrorKind, Key, Repository, SnapshotSource, VolumeTarget,
};
use serde_json::json;

struct Moto(Child);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_moto() -> (Moto, u16) {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("moto_server not found: run scripts/install-deps.sh (pip install 'moto[server]')");
    let moto = Moto(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "moto_server did not listen on port {port}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (moto, port)
}

/// Create a bucket with a plain HTTP request (moto does not check auth).
fn create_bucket(port: u16, bucket: &str) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "create bucket: {resp}");
}

#[test]
fn s3_round_trip_incremental_verify_gc() {
    let (_moto, port) = start_moto();
    create_bucket(port, "ferry-test");
    // SAFETY: set before any other thread of this test binary exists (one
    // test in this file), so nothing reads the environment concurrently.
    unsafe {
        std::env::set_var("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"));
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
        std::env::set_var("AWS_REGION", "us-east-1");
    }

    let t = tempfile::tempdir().unwrap();
    let pool = new_pool(&t.path().join("pool"));
    let vol = pool.create_volume("d", 12 * MIB).unwrap();
    fill_mixed(&vol, 41, b"S3");
    pool.snapshot("d", "s1").unwrap();

    let key = Key::generate();
    let loc = "s3://ferry-test/repos/one";
    let repo = Repository::init(loc, Some(key.clone())).unwrap();
    assert_eq!(
        Repository::init(loc, Some(key.clone())).unwrap_err().kind(),
        ErrorKind::AlreadyExists
    );
    let e = Repository::open(loc, Some(Key::generate())).unwrap_err();
    assert!(
        e.to_string()
            .contains("wrong key for repository s3://ferry-test/repos/one"),
        "{e}"
    );

    let s1 = SnapshotSource::new(pool.open_snapshot("s1").unwrap());
    let opts = BackupOptions::new("vm", json!({"disks": 1}));
    let d = DiskInput {
        name: "disk0".into(),
        source: &s1,
        changed: None,
        read_profile: vec![0..4096, 8192..12288],
    };
    let m1 = repo.backup(&opts, &[d], None).unwrap();
    assert_eq!(m1.disks[0].hole_blocks, 6);

    // Incremental: one 64 KiB write.
    vol.write_at(5 * MIB, &[0x5a; 65536]).unwrap();
    vol.flush().unwrap();
    pool.snapshot("d", "s2").unwrap();
    let s2 = SnapshotSource::new(pool.open_snapshot("s2").unwrap());
    let d = DiskInput {
        name: "disk0".into(),
        source: &s2,
        changed: Some(pool.changed_between("d", "s1", Some("s2")).unwrap()),
        read_profile: vec![],
    };
    let m2 = repo
        .backup(&opts.clone().parent(m1.id.clone()), &[d], None)
        .unwrap();
    assert_eq!(s2.bytes_read(), MIB);
    assert_eq!(m2.disks[0].new_chunks, 1);

    let repo = Repository::open(loc, Some(key)).unwrap();
    assert_eq!(repo.list().unwrap().len(), 2);
    let dst = pool.create_volume("r", 12 * MIB).unwrap();
    repo.restore_disk(&m2.id, "disk0", &VolumeTarget(dst.clone()), 4, false, None)
        .unwrap();
    assert_eq!(vol_digest(&dst), vol_digest(&vol));
    assert!(repo.verify(2).unwrap().ok());

    // Forget the first backup; gc keeps everything the second needs, and
    // its one unreferenced chunk is younger than the object-store grace.
    repo.forget(&m1.id).unwrap();
    let st = repo.gc().unwrap();
    assert_eq!(
        (st.removed, st.kept_recent, st.removed_indexes),
        (0, 1, 1),
        "{st:?}"
    );
    assert!(repo.verify(2).unwrap().ok());
    let info = repo.info().unwrap();
    assert_eq!(info.backups, 1);
    assert!(info.encrypted);
}
