//! The client against our server, qemu-nbd and nbdkit; the pool's
//! reconnection; the blocking facade.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{TestServer, random_file};
use ferry_nbd::client::{Address, list_exports};
use ferry_nbd::proto::{CONTEXT_ALLOCATION, STATE_CHANGED, STATE_HOLE, STATE_ZERO};
use ferry_nbd::{
    BlockingClient, Client, ClientConfig, ErrorKind, Export, Extent, MemoryExport, Pool,
};

const MIB: u64 = 1 << 20;

fn cfg(export: &str, contexts: &[&str]) -> ClientConfig {
    ClientConfig {
        export: export.into(),
        meta_contexts: contexts.iter().map(|s| s.to_string()).collect(),
        tls: None,
    }
}

struct Peer(Child);
impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a peer server and waits until its socket accepts connections.
fn start_peer(cmd: &mut Command, sock: &Path) -> Peer {
    let mut p = Peer(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(p.0.try_wait().unwrap().is_none(), "peer exited early");
        assert!(t0.elapsed() < Duration::from_secs(30), "peer did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    p
}

/// Waits up to 5 s for the server to have `n` connections open.
fn wait_connections(t: &TestServer, n: usize) {
    let t0 = Instant::now();
    while t.server.connections() != n {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{} connections open, expected {n}",
            t.server.connections()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_dropped_client_closes_its_connection() {
    // It used to stay open (the reply reader held the socket) with the
    // server's buffers and the export, once per connection of every copy.
    let t = TestServer::with_export("d", Arc::new(MemoryExport::new(4 * MIB)));
    let addr = Address::Unix(t.sock.clone());
    let c =
        t.rt.block_on(Client::connect(&addr, &cfg("d", &[])))
            .unwrap();
    t.rt.block_on(c.write_at(0, &[7u8; 4096], false)).unwrap();
    wait_connections(&t, 1);
    drop(c);
    wait_connections(&t, 0);
    let p =
        t.rt.block_on(Pool::connect(addr, cfg("d", &[]), 3))
            .unwrap();
    assert_eq!(p.connections(), 3);
    wait_connections(&t, 3);
    drop(p);
    wait_connections(&t, 0);
}

#[test]
fn own_client_against_own_server() {
    let m = Arc::new(MemoryExport::new(16 * MIB));
    m.snapshot("s1");
    let t = TestServer::with_export("d", m.clone());
    let addr = Address::Unix(t.sock.clone());
    t.rt.block_on(async {
        let c = Arc::new(
            Client::connect(&addr, &cfg("d", &[CONTEXT_ALLOCATION, "ferry:changed:s1"]))
                .await
                .unwrap(),
        );
        assert_eq!(c.size(), 16 * MIB);
        assert!(c.can_multi_conn() && c.structured() && c.contexts().len() == 2);
        // 64 requests in flight at once, each checked.
        let mut tasks = Vec::new();
        for i in 0..64u64 {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                let data = vec![i as u8 + 1; 4096 + i as usize];
                c.write_at(i * 65536, &data, i % 7 == 0).await.unwrap();
                assert_eq!(c.read(i * 65536, data.len() as u32).await.unwrap(), data);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        c.flush().await.unwrap();
        let a = c
            .block_status(CONTEXT_ALLOCATION, 0, 8 * MIB as u32)
            .await
            .unwrap();
        assert_eq!(
            a[0],
            Extent {
                length: 64 * 65536,
                flags: 0
            }
        );
        assert_eq!(a[1].flags, STATE_HOLE | STATE_ZERO);
        let ch = c
            .block_status("ferry:changed:s1", 0, 8 * MIB as u32)
            .await
            .unwrap();
        assert_eq!(
            ch[0],
            Extent {
                length: 64 * 65536,
                flags: STATE_CHANGED
            }
        );
        c.trim(0, 65536).await.unwrap();
        c.write_zeroes(65536, 65536, true).await.unwrap();
        assert!(c.read(0, 131072).await.unwrap().iter().all(|b| *b == 0));
        // Errors come back with their NBD number.
        let e = c.read(16 * MIB - 1, 2).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid);
        let names = list_exports(&addr, &ClientConfig::default()).await.unwrap();
        assert_eq!(names, vec!["d".to_string()]);
        let e = Client::connect(&addr, &cfg("nope", &[]))
            .await
            .err()
            .unwrap();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        c.disconnect().await.unwrap();
    });
    let mut b = [0u8; 4096];
    m.read_at(2 * 65536, &mut b).unwrap();
    assert!(b.iter().all(|x| *x == 3));
}

#[test]
fn own_client_against_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("q.img");
    let sock = dir.path().join("q.sock");
    let data = random_file(&img, 8 * MIB as usize, 3);
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(16 * MIB).unwrap(); // the second half is a hole
    drop(f);
    let _p = start_peer(
        Command::new("qemu-nbd")
            .args(["-f", "raw", "-t", "-e", "4", "-x", "q", "-k"])
            .arg(&sock)
            .arg(&img),
        &sock,
    );
    let b = BlockingClient::connect(Address::Unix(sock.clone()), cfg("q", &[]), 2).unwrap();
    assert_eq!(b.size(), 16 * MIB);
    let mut buf = vec![0u8; 8 * MIB as usize];
    b.read_at(0, &mut buf).unwrap();
    assert!(buf == data);
    let alloc = b.allocation(0, 16 * MIB).unwrap();
    assert_eq!(alloc.iter().map(|e| e.length).sum::<u64>(), 16 * MIB);
    assert_eq!(
        alloc.last().unwrap().flags & STATE_ZERO,
        STATE_ZERO,
        "{alloc:?}"
    );
    assert_eq!(alloc[0].flags, 0, "{alloc:?}");
    b.write_at(MIB, &[0x42; 4096], true).unwrap();
    b.flush().unwrap();
    let mut back = [0u8; 4096];
    b.read_at(MIB, &mut back).unwrap();
    assert!(back.iter().all(|x| *x == 0x42));
    drop(b);
    let on_disk = std::fs::read(&img).unwrap();
    assert!(
        on_disk[MIB as usize..MIB as usize + 4096]
            .iter()
            .all(|x| *x == 0x42)
    );
}

#[test]
fn own_client_against_nbdkit() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("k.sock");
    let _p = start_peer(
        Command::new("nbdkit")
            .args(["-f", "-U"])
            .arg(&sock)
            .args(["memory", "size=8M"]),
        &sock,
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let pool = Pool::connect(
            Address::Unix(sock.clone()),
            cfg("", &[CONTEXT_ALLOCATION]),
            3,
        )
        .await
        .unwrap();
        assert_eq!(pool.size(), 8 * MIB);
        let data: Vec<u8> = (0..(1 << 20)).map(|i| (i * 7 % 251) as u8).collect();
        pool.write_at(2 * MIB, &data, false).await.unwrap();
        pool.flush().await.unwrap();
        let mut back = vec![0u8; data.len()];
        pool.read_at(2 * MIB, &mut back).await.unwrap();
        assert!(back == data);
        let a = pool
            .block_status(CONTEXT_ALLOCATION, 0, 8 * MIB as u32)
            .await
            .unwrap();
        assert!(a.iter().any(|e| e.flags & STATE_HOLE != 0), "{a:?}");
    });
}

#[test]
fn pool_reconnects_after_the_server_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("r.sock");
    let m = Arc::new(MemoryExport::new(4 * MIB));
    m.write_at(0, &[9u8; 4096], false).unwrap();
    let start = |sock: std::path::PathBuf, m: Arc<MemoryExport>| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let _ = std::fs::remove_file(&sock);
        let l = {
            let _g = rt.enter();
            tokio::net::UnixListener::bind(&sock).unwrap()
        };
        let s = ferry_nbd::Server::new();
        s.add_export("x", m, Default::default()).unwrap();
        rt.spawn(async move { s.serve_unix(l).await });
        rt
    };
    let rt = start(sock.clone(), m.clone());
    let b = BlockingClient::connect(Address::Unix(sock.clone()), cfg("x", &[]), 2).unwrap();
    let mut buf = [0u8; 4096];
    b.read_at(0, &mut buf).unwrap();
    assert!(buf.iter().all(|x| *x == 9));
    // The server goes away (its connections die with its runtime) and
    // comes back on the same socket while the client is already retrying.
    rt.shutdown_background();
    let _ = std::fs::remove_file(&sock);
    let (s2, m2) = (sock.clone(), m.clone());
    let restart = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        start(s2, m2)
    });
    buf.fill(0);
    b.read_at(0, &mut buf).unwrap();
    assert!(buf.iter().all(|x| *x == 9));
    let _rt2 = restart.join().unwrap();
    for _ in 0..4 {
        buf.fill(0);
        b.read_at(0, &mut buf).unwrap();
        assert!(buf.iter().all(|x| *x == 9));
    }
}
