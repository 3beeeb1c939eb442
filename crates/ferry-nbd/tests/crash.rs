//! `kill -9` of a real `ferry-nbd-serve` process (file backend) under a
//! multi-connection client: what the server acknowledged must be in the
//! file afterwards, and a FLUSH on one connection must cover the writes
//! acknowledged on the others (the meaning of CAN_MULTI_CONN). After a
//! restart the data is read back through other connections, by our client
//! and by nbdcopy.
//!
//! What this can catch: a server that acknowledges a write before the
//! backend has it, answers a FLUSH before writes acknowledged on another
//! connection have reached the file, or keeps acknowledged data in its
//! own memory. What it cannot catch: a missing `fdatasync` (the page cache
//! survives the death of the process; only a power cut would show that).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::ok;
use ferry_nbd::client::Address;
use ferry_nbd::{Client, ClientConfig};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

/// A `ferry-nbd-serve` child process; killed with SIGKILL on drop.
struct Serve(Child);

impl Serve {
    fn start(file: &Path, sock: &Path) -> Serve {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferry-nbd-serve"))
            .arg("--file")
            .arg(file)
            .arg("--unix")
            .arg(sock)
            .args(["--name", "d"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start ferry-nbd-serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("ready "), "ferry-nbd-serve said {line:?}");
        Serve(child)
    }

    /// SIGKILL, and wait until the process is gone.
    fn kill9(mut self) {
        self.0.kill().unwrap();
        let st = self.0.wait().unwrap();
        assert!(!st.success(), "server exited by itself: {st}");
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn cfg() -> ClientConfig {
    ClientConfig {
        export: "d".into(),
        meta_contexts: Vec::new(),
        tls: None,
    }
}

/// Content of write `n` of connection `conn` (distinct for every pair).
fn pattern(conn: u64, n: u64, len: usize) -> Vec<u8> {
    let mut x = (conn << 32 | n).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = vec![0u8; len];
    for w in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
    }
    v
}

/// Slot `n` of connection `conn`: its own range, 4 KiB for most writes
/// (answered inline from the page cache) and 256 KiB for every fifth (a
/// blocking-pool write), so both server paths are covered.
fn slot(conn: u64, n: u64) -> (u64, usize) {
    let len = if n % 5 == 4 { 256 << 10 } else { 4 << 10 };
    // Connection c owns [c * 16 MiB, (c + 1) * 16 MiB); 256 KiB per slot.
    (conn * 16 * MIB + n * (256 << 10), len)
}

fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.raw");
    std::fs::File::create(&file).unwrap().set_len(SIZE).unwrap();
    let sock = dir.path().join("nbd.sock");
    (dir, file, sock)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Writes acknowledged (without FUA) on two connections, then one FLUSH on
/// a third: the server is killed right after the flush reply, restarted,
/// and every write is read back through fresh connections.
#[test]
fn flush_on_one_connection_covers_writes_acknowledged_on_others_across_kill_9() {
    let (dir, file, sock) = setup();
    let server = Serve::start(&file, &sock);
    let uri = format!("nbd+unix:///d?socket={}", sock.display());
    // A real peer sees the flag: nbdinfo exits 0 only if it is advertised.
    let st = Command::new("nbdinfo")
        .args(["--can", "multi-conn", &uri])
        .status()
        .expect("cannot run nbdinfo");
    assert!(st.success(), "CAN_MULTI_CONN not advertised");

    let addr = Address::Unix(sock.clone());
    let rt = runtime();
    const WRITES: u64 = 60;
    rt.block_on(async {
        let a = Client::connect(&addr, &cfg()).await.unwrap();
        assert!(a.can_multi_conn());
        let writers = [
            Arc::new(Client::connect(&addr, &cfg()).await.unwrap()),
            Arc::new(Client::connect(&addr, &cfg()).await.unwrap()),
        ];
        // All writes of both connections in flight at once.
        let mut tasks = Vec::new();
        for (conn, c) in writers.iter().enumerate() {
            for n in 0..WRITES {
                let c = c.clone();
                tasks.push(tokio::spawn(async move {
                    let (off, len) = slot(conn as u64, n);
                    c.write_at(off, &pattern(conn as u64, n, len), false).await
                }));
            }
        }
        for t in tasks {
            t.await.unwrap().expect("write not acknowledged");
        }
        // The flush goes over the connection that wrote nothing.
        a.flush().await.unwrap();
    });
    // Dead at once: no disconnect, no chance to write anything more.
    server.kill9();
    drop(rt);

    let server = Serve::start(&file, &sock);
    let rt = runtime();
    rt.block_on(async {
        let c = Client::connect(&addr, &cfg()).await.unwrap();
        for conn in 0..2u64 {
            for n in 0..WRITES {
                let (off, len) = slot(conn, n);
                let got = c.read(off, len as u32).await.unwrap();
                assert!(
                    got == pattern(conn, n, len),
                    "write {n} of connection {conn} ({len} bytes at {off}) lost"
                );
            }
        }
    });
    // And a real client over several connections sees the same image.
    let copy = dir.path().join("copy.raw");
    ok(
        "nbdcopy",
        &["--connections=4", &uri, copy.to_str().unwrap()],
    );
    server.kill9();
    let (want, got) = (std::fs::read(&file).unwrap(), std::fs::read(&copy).unwrap());
    assert_eq!(want.len(), got.len());
    assert!(
        want == got,
        "nbdcopy read something else than the file holds"
    );
}

/// Two connections write continuously, some with FUA, while the server is
/// killed in the middle; every write that was acknowledged before the kill
/// is in the file after a restart.
#[test]
fn kill_9_mid_stream_loses_no_acknowledged_write() {
    let (_dir, file, sock) = setup();
    let server = Serve::start(&file, &sock);
    let addr = Address::Unix(sock.clone());
    let rt = runtime();
    let stop = Arc::new(AtomicBool::new(false));
    // Each writer keeps 8 writes in flight and reports what was acknowledged.
    let mut writers = Vec::new();
    for conn in 0..2u64 {
        let c = rt
            .block_on(Client::connect(&addr, &cfg()))
            .map(Arc::new)
            .unwrap();
        let stop = stop.clone();
        writers.push(rt.spawn(async move {
            let mut acked: Vec<u64> = Vec::new();
            let mut next = 0u64;
            let mut inflight = tokio::task::JoinSet::new();
            loop {
                while inflight.len() < 8 && next < 64 && !stop.load(Ordering::SeqCst) {
                    let (c, n) = (c.clone(), next);
                    inflight.spawn(async move {
                        let (off, len) = slot(conn, n);
                        let fua = n % 3 == 0;
                        (n, c.write_at(off, &pattern(conn, n, len), fua).await)
                    });
                    next += 1;
                }
                match inflight.join_next().await {
                    Some(r) => match r.unwrap() {
                        (n, Ok(())) => acked.push(n),
                        (_, Err(_)) => {} // in flight at the kill
                    },
                    None if next >= 64 => next = 0, // round again: same slots, same data
                    None => break,
                }
            }
            acked
        }));
    }
    // Let them run until some writes are acknowledged, then kill.
    std::thread::sleep(Duration::from_millis(300));
    server.kill9();
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::SeqCst);
    let acked: Vec<Vec<u64>> = writers
        .into_iter()
        .map(|w| rt.block_on(w).unwrap())
        .collect();
    drop(rt);
    let total: usize = acked.iter().map(Vec::len).sum();
    println!("writes acknowledged before the kill: {total}");
    assert!(total > 0, "nothing was acknowledged before the kill");

    let server = Serve::start(&file, &sock);
    let rt = runtime();
    rt.block_on(async {
        let c = Client::connect(&addr, &cfg()).await.unwrap();
        for (conn, ns) in acked.iter().enumerate() {
            for &n in ns {
                let (off, len) = slot(conn as u64, n);
                let got = c.read(off, len as u32).await.unwrap();
                assert!(
                    got == pattern(conn as u64, n, len),
                    "acknowledged write {n} of connection {conn} lost"
                );
            }
        }
    });
    server.kill9();
}
