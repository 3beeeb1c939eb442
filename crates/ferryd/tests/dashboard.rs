//! The web dashboard (issue 13) in a real browser: headless Chromium
//! driven through chromedriver (WebDriver) against a real `ferryd` with a
//! running test guest (QEMU, TCG) defined as a VM. A wrong token, and the
//! peer token, are refused with a clear message; signed in, the
//! group-snapshot form refuses bad input, then starts a group snapshot;
//! the operation's bar is watched until 100 %; the group and its pool
//! snapshot are listed; the VM is stopped with its button.
//!
//! A second test holds an import half-way (the test-only pause point of
//! `ferry-ops`) to see a running operation's page and its cancel button.
//!
//! With `FERRY_UPDATE_SCREENSHOTS=1` the test also writes the screenshots
//! of the main views to `docs/screenshots/`.

mod common;

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Host, wait_line};
use fantoccini::key::Key;
use fantoccini::{Client, ClientBuilder, Locator};
use ferry_testkit::console::Console;
use ferry_testkit::{Disk, GuestConfig, GuestImage, NbdServer, Workload, disk};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(300);

const SHOTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/screenshots");

/// Kills, on drop, every process whose command line names `needle` and
/// `program` (QEMU of this test's data directory, this test's Chromium).
struct Reaper {
    program: &'static str,
    needle: PathBuf,
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            if cmd.contains(self.program) && cmd.contains(&*self.needle.to_string_lossy()) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
    }
}

/// A chromedriver on a free local port; stopped (with its Chromium) on drop.
struct Driver {
    child: Child,
    url: String,
    profile: tempfile::TempDir,
    _reaper: Reaper,
}

impl Driver {
    fn start() -> Driver {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("chromedriver")
            .args([format!("--port={port}"), "--log-level=WARNING".into()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver is not installed: run scripts/install-deps.sh");
        let profile = tempfile::tempdir().unwrap();
        let reaper = Reaper {
            program: "chrom",
            needle: profile.path().to_owned(),
        };
        let url = format!("http://127.0.0.1:{port}");
        // Ready when it answers /status.
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen");
            std::thread::sleep(Duration::from_millis(100));
        }
        Driver {
            child,
            url,
            profile,
            _reaper: reaper,
        }
    }

    async fn browser(&self) -> Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--window-size=1366,900",
                    format!("--user-data-dir={}", self.profile.path().display()),
                ],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&self.url)
            .await
            .expect("chromedriver did not open a Chromium session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` until it returns `Some`, for at most `limit`.
async fn until<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The text of the first element matching `css` (None if absent).
async fn text(c: &Client, css: &str) -> Option<String> {
    match c.find(Locator::Css(css)).await {
        Ok(e) => e.text().await.ok(),
        Err(_) => None,
    }
}

async fn attr(c: &Client, css: &str, name: &str) -> Option<String> {
    match c.find(Locator::Css(css)).await {
        Ok(e) => e.attr(name).await.ok().flatten(),
        Err(_) => None,
    }
}

/// Waits until the element `css` shows a text containing `needle`.
async fn wait_text(c: &Client, css: &str, needle: &str) -> String {
    until(&format!("{css} to show {needle:?}"), T, || async {
        text(c, css).await.filter(|t| t.contains(needle))
    })
    .await
}

async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css}: {e}"))
        .click()
        .await
        .unwrap();
}

async fn type_into(c: &Client, css: &str, s: &str) {
    let e = c.find(Locator::Css(css)).await.unwrap();
    e.clear().await.unwrap();
    e.send_keys(s).await.unwrap();
}

/// Opens a section through its navigation link and waits for its content.
async fn open(c: &Client, view: &str, ready_css: &str) {
    click(c, &format!("#nav-{view}")).await;
    until(&format!("view {view}"), T, || async {
        let shown = attr(c, "#view", "data-view").await;
        let ready = c.find(Locator::Css(ready_css)).await.is_ok();
        (shown.as_deref() == Some(view) && ready).then_some(())
    })
    .await;
}

async fn screenshot(c: &Client, name: &str) {
    if std::env::var_os("FERRY_UPDATE_SCREENSHOTS").is_none() {
        return;
    }
    // Let the last refresh paint.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let png = c.screenshot().await.unwrap();
    std::fs::create_dir_all(SHOTS).unwrap();
    std::fs::write(Path::new(SHOTS).join(format!("{name}.png")), png).unwrap();
}

/// Opens the dashboard and signs in with the host's admin token.
async fn sign_in(c: &Client, h: &Host) {
    c.goto(&format!("{}/", h.url)).await.unwrap();
    until("the sign-in form", T, || async {
        c.find(Locator::Css("#token")).await.ok().map(|_| ())
    })
    .await;
    type_into(c, "#token", &h.token).await;
    click(c, "#login-submit").await;
    wait_text(c, "#host-name", "test-host").await;
}

async fn import_ext4(h: &Host, volume: &str) {
    let raw = h.dir.path().join(format!("{volume}.raw"));
    disk::make_ext4_disk(&raw, 64 << 20).unwrap();
    let (s, started) = h
        .post(
            &format!("/v1/volumes/{volume}/import"),
            json!({ "path": raw }),
        )
        .await;
    assert_eq!(s, 202, "{started}");
    let op = h.wait_op(started["operation"].as_str().unwrap()).await;
    assert_eq!(op["state"], "succeeded", "{op}");
    std::fs::remove_file(&raw).unwrap();
}

/// Defines and starts a test-kit guest with its agent, writing records on
/// `volume`; waits for its first record (booted, agent up, disk written).
async fn start_guest(h: &Host, name: &str, volume: &str) {
    import_ext4(h, volume).await;
    let image = GuestImage::get().await.unwrap();
    let mut cfg = GuestConfig::new(name);
    cfg.workload = Workload::records(20.0);
    // Only to make the kit mount /dev/vda; ferryd supplies the disk.
    cfg.disks.push(Disk::Nbd {
        server: NbdServer::Unix("/unused".into()),
        export: volume.into(),
    });
    let def = json!({
        "name": name,
        "vcpus": 1,
        "memory_mib": 256,
        "disks": [volume],
        "boot": {
            "kind": "kernel",
            "kernel": image.kernel(),
            "initrd": image.initramfs(),
            "cmdline": cfg.kernel_cmdline(),
        },
        "guest_agent": true,
        "accel": "tcg",
    });
    let (s, v) = h.post("/v1/vms", def).await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = h.post(&format!("/v1/vms/{name}/start"), json!({})).await;
    assert_eq!(s, 200, "{v}");
    let mut console = Console::new(Path::new(v["serial_log"].as_str().unwrap()));
    let t0 = Instant::now();
    loop {
        console.poll().unwrap();
        if console.events().iter().any(|e| e.name == "record") {
            break;
        }
        if let Some(f) = console.fatal() {
            panic!("{name}: guest failed: {f}\n{}", console.tail(30));
        }
        assert!(t0.elapsed() < T, "{name}: no record: {}", console.tail(30));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("{name}: first record {:?} after start", t0.elapsed());
}

/// The dashboard's files need no token, carry the strict policy, and the
/// API behind them still does need one.
#[tokio::test]
async fn dashboard_files_are_served_without_a_token_under_a_strict_policy() {
    let h = Host::new();
    let http = reqwest::Client::new();
    for (path, mime) in [
        ("/", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/views/operations.js", "text/javascript"),
        ("/ui/style.css", "text/css"),
    ] {
        let r = http.get(format!("{}{path}", h.url)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let hd = r.headers();
        assert!(
            hd["content-type"].to_str().unwrap().starts_with(mime),
            "{path}"
        );
        let csp = hd["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("script-src 'self'"), "{csp}");
        assert!(csp.contains("default-src 'none'"), "{csp}");
        assert!(!csp.contains("unsafe"), "{csp}");
        assert_eq!(hd["x-content-type-options"], "nosniff");
    }
    let r = http
        .get(format!("{}/ui/nope.js", h.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = http.get(format!("{}/v1/host", h.url)).send().await.unwrap();
    assert_eq!(r.status(), 401, "the API still needs the token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_drives_a_group_snapshot_of_a_running_guest() {
    let h = Host::new();
    let _qemu = Reaper {
        program: "qemu-system",
        needle: h.data(),
    };
    start_guest(&h, "web-1", "web-disk").await;

    let driver = Driver::start();
    let c = driver.browser().await;
    c.set_window_size(1366, 900).await.unwrap();
    c.goto(&format!("{}/", h.url)).await.unwrap();

    // A wrong token is refused, with a message saying so.
    until("the sign-in form", T, || async {
        c.find(Locator::Css("#token")).await.ok().map(|_| ())
    })
    .await;
    type_into(&c, "#token", "0123456789abcdef-not-the-token").await;
    click(&c, "#login-submit").await;
    let refused = wait_text(&c, "#login-error", "refused").await;
    println!("wrong token: {refused}");
    assert!(refused.contains("invalid token"), "{refused}");
    let app = c.find(Locator::Css("#app")).await.unwrap();
    assert!(
        !app.is_displayed().await.unwrap(),
        "the app shows without a valid token"
    );
    assert_eq!(
        attr(&c, "#token", "aria-invalid").await.as_deref(),
        Some("true")
    );
    screenshot(&c, "login-refused").await;

    // The peer token opens part of the API, but not the dashboard.
    let peer = std::fs::read_to_string(h.data().join("peer.token")).unwrap();
    type_into(&c, "#token", peer.trim()).await;
    click(&c, "#login-submit").await;
    let refused = wait_text(&c, "#login-error", "peer token").await;
    println!("peer token: {refused}");
    assert!(
        !app.is_displayed().await.unwrap(),
        "the app shows with a peer token"
    );

    // The right one, submitted with the Enter key, opens the host view.
    type_into(&c, "#token", &format!("{}{}", h.token, Key::Enter)).await;
    wait_text(&c, "#host-name", "test-host").await;
    until("the host view", T, || async {
        text(&c, "#pool-used").await.map(|_| ())
    })
    .await;
    // Sections of features this ferryd does not have are hidden.
    let nav = text(&c, "#nav").await.unwrap();
    println!("sections: {}", nav.replace('\n', " | "));
    for absent in ["#nav-backups", "#nav-migrations"] {
        let (s, _) = h
            .get(if absent.ends_with("backups") {
                "/v1/repos"
            } else {
                "/v1/migrations"
            })
            .await;
        let shown = c.find(Locator::Css(absent)).await.is_ok();
        assert_eq!(shown, s != 404, "{absent} shown={shown}, API status {s}");
    }
    screenshot(&c, "host").await;

    // Sections open from the keyboard too: Enter on a focused link, and
    // the focus moves to the new content.
    c.find(Locator::Css("#nav-vms"))
        .await
        .unwrap()
        .send_keys(&Key::Enter.to_string())
        .await
        .unwrap();
    until("the VMs view", T, || async {
        (attr(&c, "#view", "data-view").await.as_deref() == Some("vms")).then_some(())
    })
    .await;
    until("the focus on the content", T, || async {
        let focused = c.active_element().await.ok()?.attr("id").await.ok()??;
        (focused == "main").then_some(())
    })
    .await;
    let vms = wait_text(&c, "#view table", "web-1").await;
    assert!(vms.contains("running"), "{vms}");
    assert!(vms.contains("web-disk"), "{vms}");
    screenshot(&c, "vms").await;

    // The form checks before sending: nothing chosen, then a bad name.
    open(&c, "groups", "#groupsnap-form").await;
    click(&c, "#gs-submit").await;
    wait_text(&c, "#gs-vms-error", "at least one").await;
    click(&c, "input[name=vms][value=web-1]").await;
    type_into(&c, "#gs-name", "not a name!").await;
    click(&c, "#gs-submit").await;
    wait_text(&c, "#gs-name-error", "letters").await;
    let (_, ops) = h.get("/v1/operations").await;
    assert!(
        !ops.as_array()
            .unwrap()
            .iter()
            .any(|o| o["kind"] == "vm-snapshot"),
        "an invalid form was sent: {ops}"
    );
    screenshot(&c, "group-form-invalid").await;

    // A valid one starts the operation and shows it.
    type_into(&c, "#gs-name", "ui-snap-1").await;
    let quiesce = c.find(Locator::Css("#gs-quiesce")).await.unwrap();
    assert!(quiesce.is_selected().await.unwrap());
    click(&c, "#gs-submit").await;
    let op_id = until("the operation page", T, || async {
        let url = c.current_url().await.ok()?;
        let frag = url.fragment()?.to_string();
        frag.strip_prefix("/operations/").map(str::to_string)
    })
    .await;
    println!("operation {op_id}");

    // Watch the bar: it only grows, and ends at 100 % with the operation
    // succeeded.
    let t0 = Instant::now();
    let mut seen: Vec<u32> = Vec::new();
    let deadline = Instant::now() + T;
    let state = loop {
        let v = attr(&c, "#op-overall", "aria-valuenow")
            .await
            .and_then(|v| v.parse::<u32>().ok());
        if let Some(v) = v
            && seen.last() != Some(&v)
        {
            seen.push(v);
        }
        if let Some(state) = attr(&c, "#op-state", "data-state").await
            && ["succeeded", "failed", "cancelled"].contains(&state.as_str())
        {
            break state;
        }
        assert!(Instant::now() < deadline, "operation {op_id} not finished");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (_, op) = h.get(&format!("/v1/operations/{op_id}")).await;
    assert_eq!(state, "succeeded", "{op}");
    let last = attr(&c, "#op-overall", "aria-valuenow").await.unwrap();
    seen.push(last.parse().unwrap());
    println!(
        "bar values seen: {seen:?} over {:?} (state {state})",
        t0.elapsed()
    );
    assert_eq!(last, "100", "the bar of a succeeded operation");
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "the bar went back: {seen:?}"
    );
    assert_eq!(text(&c, "#op-percent").await.unwrap().trim(), "100 %");
    let tree = text(&c, "#op-tree").await.unwrap();
    assert!(tree.contains("100 %"), "{tree}");
    let log = text(&c, "#op-log").await.unwrap_or_default();
    assert!(!log.trim().is_empty(), "the log is empty");
    println!("log:\n{log}");
    let cancel = c.find(Locator::Css("#op-cancel")).await.unwrap();
    assert!(
        !cancel.is_enabled().await.unwrap(),
        "cancel of a finished operation"
    );
    screenshot(&c, "operation").await;

    // The group is listed, quiesced, and so is its pool snapshot.
    open(&c, "groups", "#groups-list table").await;
    let groups = wait_text(&c, "#groups-list", "ui-snap-1").await;
    assert!(groups.contains("quiesced"), "{groups}");
    screenshot(&c, "groups").await;
    open(&c, "snapshots", "#view table").await;
    let snaps = wait_text(&c, "#view table", "ui-snap-1").await;
    assert!(snaps.contains("web-disk"), "{snaps}");
    let (s, g) = h.get("/v1/vm-snapshots/ui-snap-1").await;
    assert_eq!(s, 200, "{g}");
    let snapshot = g["vms"][0]["disks"][0]["snapshot"].as_str().unwrap();
    assert!(snaps.contains(snapshot), "{snapshot} not in {snaps}");
    screenshot(&c, "snapshots").await;

    open(&c, "volumes", "#view table").await;
    wait_text(&c, "#view table", "web-disk").await;
    screenshot(&c, "volumes").await;
    open(&c, "operations", "#view table").await;
    wait_text(&c, "#view table", "vm-snapshot").await;
    screenshot(&c, "operations").await;

    // Stop the VM with its button.
    open(&c, "vms", "#view table").await;
    click(&c, "button[aria-label='Stop web-1']").await;
    until("web-1 stopped", T, || async {
        let (_, vm) = h.get("/v1/vms/web-1").await;
        (vm["state"] == "stopped").then_some(())
    })
    .await;
    wait_text(&c, "#view table", "stopped").await;
    let status = text(&c, "#view .status").await.unwrap_or_default();
    println!("stop: {status}");

    c.close().await.unwrap();
    let (_, vm): (u16, Value) = h.get("/v1/vms/web-1").await;
    assert_eq!(vm["state"], "stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_a_running_operation_and_cancels_it() {
    const POINT: &str = "volume.import:copying";
    let mut h = Host::new();
    h.kill9();
    let rx = h.start_watched(&[("FERRY_OPS_TEST_PAUSE", POINT)]);
    // Not zeros: the copy pauses half-way once it has written data.
    let raw = h.dir.path().join("src.raw");
    std::fs::write(&raw, vec![0xa5u8; 16 << 20]).unwrap();
    let (s, started) = h
        .post("/v1/volumes/held/import", json!({ "path": raw }))
        .await;
    assert_eq!(s, 202, "{started}");
    let id = started["operation"].as_str().unwrap().to_string();
    wait_line(&rx, &format!("FERRY_OPS_TEST_PAUSED {POINT}"), 120);

    let driver = Driver::start();
    let c = driver.browser().await;
    c.set_window_size(1366, 900).await.unwrap();
    sign_in(&c, &h).await;
    open(&c, "operations", "#view table").await;
    wait_text(&c, "#view table", "running").await;
    click(&c, &format!("a[data-key='op-{id}']")).await;

    // Half-way: a partial bar, the step it is in, still running.
    let pct = until("a partial bar", T, || async {
        let v = attr(&c, "#op-overall", "aria-valuenow").await?;
        let v: u32 = v.parse().ok()?;
        (1..100).contains(&v).then_some(v)
    })
    .await;
    assert_eq!(
        attr(&c, "#op-state", "data-state").await.as_deref(),
        Some("running")
    );
    let current = text(&c, "#op-current").await.unwrap();
    let eta = text(&c, "#op-eta").await.unwrap();
    println!("held at {pct} %, current step {current:?}, time left {eta:?}");
    assert!(!current.starts_with('—'), "no current step shown");
    let (_, op) = h.get(&format!("/v1/operations/{id}")).await;
    let api_pct = (op["progress"]["overall"].as_f64().unwrap() * 100.0).round() as u32;
    assert_eq!(pct, api_pct, "the page and the API disagree");
    screenshot(&c, "operation-running").await;

    // Cancel: the request is sent, the page says so and follows the state.
    let cancel = c.find(Locator::Css("#op-cancel")).await.unwrap();
    assert!(cancel.is_enabled().await.unwrap());
    cancel.click().await.unwrap();
    let msg = wait_text(&c, "#op-cancel-status", "Cancel requested").await;
    println!("cancel: {msg}");
    until("the page to show cancelling", T, || async {
        (attr(&c, "#op-state", "data-state").await.as_deref() == Some("cancelling")).then_some(())
    })
    .await;
    let (_, op) = h.get(&format!("/v1/operations/{id}")).await;
    assert_eq!(op["state"], "cancelling", "{op}");
    assert!(!cancel.is_enabled().await.unwrap(), "cancel offered twice");
    c.close().await.unwrap();
}
