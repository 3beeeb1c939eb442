//! A real `ferryd` process for tests: its own data directory, a free
//! port, killed on drop.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A `ferryd` with its own data directory, killed on drop.
pub struct Host {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    pub url: String,
    pub token: String,
    /// The NBD TCP address (`host:port`) of the running ferryd.
    pub nbd: String,
    /// Addresses for the next start (`127.0.0.1:0` unless pinned).
    listen: (String, String),
    /// The network namespace ferryd (and so its QEMU processes) runs in.
    netns: Option<String>,
}

fn ferryd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferryd"))
}

impl Host {
    pub fn new() -> Host {
        Host::named("test-host")
    }

    /// A host whose configured name is `name` (several hosts in one test).
    pub fn named(name: &str) -> Host {
        Host::named_at(name, None, "127.0.0.1")
    }

    /// A host named `name` whose ferryd runs in network namespace `netns`
    /// (`ip netns exec`), listening on `ip` (an address of that namespace).
    pub fn in_netns(name: &str, netns: &str, ip: &str) -> Host {
        Host::named_at(name, Some(netns.to_string()), ip)
    }

    fn named_at(name: &str, netns: Option<String>, ip: &str) -> Host {
        let dir = tempfile::tempdir().unwrap();
        let out = ferryd()
            .args(["init", "--no-cli-config", "--name", name, "--data-dir"])
            .arg(dir.path().join("data"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token = std::fs::read_to_string(dir.path().join("data/admin.token"))
            .unwrap()
            .trim()
            .to_string();
        let mut h = Host {
            dir,
            child: None,
            url: String::new(),
            token,
            nbd: String::new(),
            listen: (format!("{ip}:0"), format!("{ip}:0")),
            netns,
        };
        h.start();
        h
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn start(&mut self) {
        self.start_with_env(&[]);
    }

    /// Like [`Host::start`], with extra environment variables (test-only
    /// fault injection).
    pub fn start_with_env(&mut self, env: &[(&str, &str)]) {
        // Nobody listens: the lines are drained and dropped, so ferryd
        // never blocks on a full pipe.
        drop(self.start_watched(env));
    }

    /// Makes later starts listen on the ports this run has (a peer or a
    /// lazy volume elsewhere keeps the addresses it was given).
    pub fn pin_ports(&mut self) {
        let http = self.url.trim_start_matches("http://").to_string();
        self.listen = (http, self.nbd.clone());
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM: a clean shutdown; waits until ferryd exited.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let st = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status()
                .unwrap();
            assert!(st.success());
            let status = c.wait().unwrap();
            assert!(status.success(), "ferryd exited with {status} on SIGTERM");
        }
    }

    pub fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        reqwest::Client::new()
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        send(self.req(reqwest::Method::GET, path)).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        send(self.req(reqwest::Method::POST, path).json(&body)).await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        send(self.req(reqwest::Method::DELETE, path)).await
    }

    /// Waits for an operation to finish (polling `show`).
    pub async fn wait_op(&self, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // A long poll: answered as the operation finishes (at once when
            // it does not run here, say while a restarted daemon recovers).
            let left = deadline.saturating_duration_since(Instant::now()).as_secs();
            let (s, op) = self
                .get(&format!("/v1/operations/{id}?wait_s={}", left.max(1)))
                .await;
            assert_eq!(s, 200, "{op}");
            let state = op["state"].as_str().unwrap();
            if ["succeeded", "failed", "cancelled"].contains(&state) {
                return op;
            }
            assert!(Instant::now() < deadline, "operation {id} still {state}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub async fn send(rb: reqwest::RequestBuilder) -> (u16, Value) {
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

impl Host {
    /// Starts ferryd like [`Host::start`] with extra environment variables
    /// (e.g. the test-only `FERRY_OPS_TEST_PAUSE`); every stderr line is
    /// sent to the returned channel.
    pub fn start_watched(&mut self, env: &[(&str, &str)]) -> std::sync::mpsc::Receiver<String> {
        let mut cmd = match &self.netns {
            // `ip netns exec` execs ferryd: the child's pid is ferryd's.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns])
                    .arg(env!("CARGO_BIN_EXE_ferryd"));
                c
            }
            None => ferryd(),
        };
        cmd.args([
            "run",
            "--listen",
            &self.listen.0,
            "--nbd-listen",
            &self.listen.1,
            "--data-dir",
        ])
        .arg(self.data())
        .env("FERRYD_LOG", "warn")
        .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let url = loop {
            let line = lines
                .next()
                .expect("ferryd exited before listening")
                .unwrap();
            if let Some((_, rest)) = line.split_once(" serving NBD on nbd://")
                && let Some((addr, _)) = rest.split_once(' ')
            {
                self.nbd = addr.to_string();
            }
            if let Some((_, url)) = line.split_once(" listening on ") {
                break url.to_string();
            }
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        self.url = url;
        self.child = Some(child);
        rx
    }
}

/// Waits for a stderr line containing `needle`; panics after `secs`.
pub fn wait_line(rx: &std::sync::mpsc::Receiver<String>, needle: &str, secs: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.contains(needle) => return l,
            Ok(_) => {}
            Err(e) => panic!("no line with {needle:?} from ferryd within {secs} s: {e}"),
        }
    }
}

/// Pids of live processes named `name` whose command line mentions
/// `needle` (e.g. a data directory).
pub fn processes(name: &str, needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_name = args
            .first()
            .is_some_and(|a| a.rsplit('/').next() == Some(name));
        // A zombie has an empty command line: it is not running.
        if is_name && args.iter().any(|a| a.contains(needle)) {
            out.push(pid);
        }
    }
    out
}
