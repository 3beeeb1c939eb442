//! Shared by the integration tests: an in-process server on a unix socket
//! and a TCP port of its own, and helpers to run the real peers.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use ferry_nbd::{Export, ExportOptions, Server};

pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
    pub port: u16,
    pub server: Server,
    pub rt: tokio::runtime::Runtime,
}

impl TestServer {
    pub fn start(server: Server) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let ul = {
            let _g = rt.enter();
            tokio::net::UnixListener::bind(&sock).unwrap()
        };
        let tl = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = tl.local_addr().unwrap().port();
        let (s1, s2) = (server.clone(), server.clone());
        rt.spawn(async move { s1.serve_unix(ul).await });
        rt.spawn(async move { s2.serve_tcp(tl).await });
        TestServer {
            dir,
            sock,
            port,
            server,
            rt,
        }
    }

    /// A server with one export `name`.
    pub fn with_export(name: &str, e: Arc<dyn Export>) -> TestServer {
        let s = Server::new();
        s.add_export(name, e, ExportOptions::default()).unwrap();
        Self::start(s)
    }

    pub fn unix_uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.sock.display())
    }

    pub fn tcp_uri(&self, name: &str) -> String {
        format!("nbd://127.0.0.1:{}/{name}", self.port)
    }

    pub fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }
}

/// Runs a program, returns its output; panics with stderr if it could not start.
pub fn run(prog: &str, args: &[&str]) -> Output {
    Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"))
}

/// Runs a program that must succeed; returns stdout.
pub fn ok(prog: &str, args: &[&str]) -> String {
    let o = run(prog, args);
    assert!(
        o.status.success(),
        "{prog} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A file of `len` pseudo-random bytes.
pub fn random_file(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = vec![0u8; len];
    for w in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        w.copy_from_slice(&b[..w.len()]);
    }
    std::fs::write(path, &v).unwrap();
    v
}
