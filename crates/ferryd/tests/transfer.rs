//! Import of raw and qcow2 images into volumes and export of volumes to
//! raw and qcow2 files, against a real `ferryd` with real qemu-img and
//! qemu-nbd.

mod common;

use std::path::Path;
use std::process::Command;

use common::{Host, processes};
use serde_json::{Value, json};

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qemu_img_info(path: &Path) -> Value {
    serde_json::from_str(&sh(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(path)))
    .unwrap()
}

/// `qemu-img compare` of two images (formats detected); true when equal.
fn images_equal(a: &Path, b: &Path) -> bool {
    let out = Command::new("qemu-img")
        .arg("compare")
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!(
            "qemu-img compare {} {}: {}",
            a.display(),
            b.display(),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

async fn run_op(h: &Host, path: &str, body: Value) -> Value {
    let (s, started) = h.post(path, body).await;
    assert_eq!(s, 202, "{started}");
    let op = h.wait_op(started["operation"].as_str().unwrap()).await;
    assert_eq!(op["state"], "succeeded", "{op}");
    assert_eq!(op["progress"]["overall"], 1.0, "{op}");
    op
}

fn assert_no_leftovers(h: &Host) {
    let data = h.data();
    let left = processes("qemu-nbd", &data.to_string_lossy());
    assert!(left.is_empty(), "qemu-nbd left running: {left:?}");
}

#[tokio::test]
async fn qcow2_of_the_test_kit_disk_imports_and_exports_identical() {
    let image = ferry_testkit::GuestImage::get().await.unwrap();
    let h = Host::new();
    let dir = h.dir.path();
    // An ext4 disk holding the test kit's guest files, made a qcow2.
    let raw = dir.join("kit.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(96 << 20)
        .unwrap();
    sh(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(image.dir())
        .arg(&raw));
    let qcow = dir.join("kit.qcow2");
    sh(Command::new("qemu-img")
        .args(["convert", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow));

    let op = run_op(&h, "/v1/volumes/kit/import", json!({ "path": qcow })).await;
    let log = op["log"].to_string();
    assert!(log.contains("(qcow2)"), "format not detected: {log}");
    let (_, vol) = h.get("/v1/volumes/kit").await;
    assert_eq!(vol["size"], 96 << 20, "{vol}");

    let out_q = dir.join("out.qcow2");
    let op = run_op(
        &h,
        "/v1/volumes/kit/export",
        json!({ "path": out_q, "format": "qcow2" }),
    )
    .await;
    let steps: Vec<&str> = op["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        [
            "snapshot volume",
            "create target",
            "copy data",
            "delete snapshot"
        ]
    );
    assert_eq!(qemu_img_info(&out_q)["format"], "qcow2");
    assert!(
        images_equal(&qcow, &out_q),
        "export differs from the source"
    );
    assert!(images_equal(&raw, &out_q));

    let out_r = dir.join("out.raw");
    run_op(
        &h,
        "/v1/volumes/kit/export",
        json!({ "path": out_r, "format": "raw" }),
    )
    .await;
    assert_eq!(qemu_img_info(&out_r)["format"], "raw");
    assert!(images_equal(&raw, &out_r));
    // fsck of the exported file system: the content is a working disk.
    sh(Command::new("e2fsck").args(["-n", "-f"]).arg(&out_r));

    let (_, snaps) = h.get("/v1/snapshots").await;
    assert_eq!(snaps, json!([]), "temporary snapshots left");
    assert_no_leftovers(&h);
}

#[tokio::test]
async fn sparse_qcow2_import_keeps_the_volume_thin() {
    let h = Host::new();
    let dir = h.dir.path();
    let qcow = dir.join("sparse.qcow2");
    sh(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&qcow)
        .arg("1G"));
    // 2 MiB of data, 4 MiB of zero clusters, the rest never written.
    sh(Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .args(["-c", "write -P 0xab 0 1M"])
        .args(["-c", "write -P 0xcd 700M 1M"])
        .args(["-c", "write -z 300M 4M"])
        .arg(&qcow));
    let (_, before) = h.get("/v1/pool").await;
    run_op(
        &h,
        "/v1/volumes/sparse/import",
        json!({ "path": qcow, "format": "qcow2" }),
    )
    .await;
    let (_, vol) = h.get("/v1/volumes/sparse").await;
    assert_eq!(vol["size"], 1u64 << 30, "{vol}");
    assert_eq!(vol["exclusive_bytes"], 2 << 20, "{vol}");
    let (_, after) = h.get("/v1/pool").await;
    println!("pool before {before}\npool after {after}");

    let out = dir.join("back.qcow2");
    run_op(
        &h,
        "/v1/volumes/sparse/export",
        json!({ "path": out, "format": "qcow2" }),
    )
    .await;
    assert!(images_equal(&qcow, &out));
    let actual = qemu_img_info(&out)["actual-size"].as_u64().unwrap();
    println!("exported sparse qcow2: actual size {actual} bytes of 1 GiB");
    assert!(actual < 16 << 20, "export is not thin: {actual}");
    assert_no_leftovers(&h);
}

#[tokio::test]
async fn bad_input_names_path_or_format_and_existing_target_is_409() {
    let h = Host::new();
    let dir = h.dir.path();
    let raw = dir.join("a.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let field = |e: &Value| e["field"].as_str().unwrap_or_default().to_string();

    let (s, e) = h
        .post(
            "/v1/volumes/v/import",
            json!({ "path": raw, "format": "vhdz" }),
        )
        .await;
    assert_eq!((s, field(&e)), (400, "format".into()), "{e}");
    let (s, e) = h
        .post(
            "/v1/volumes/v/import",
            json!({ "path": raw, "format": "qcow2" }),
        )
        .await;
    assert_eq!((s, field(&e)), (400, "format".into()), "{e}");
    assert!(e["error"].as_str().unwrap().contains("not a qcow2"), "{e}");
    let (s, e) = h
        .post("/v1/volumes/v/import", json!({ "path": dir.join("none") }))
        .await;
    assert_eq!((s, field(&e)), (400, "path".into()), "{e}");
    let (s, e) = h
        .post("/v1/volumes/v/import", json!({ "path": "a.raw" }))
        .await;
    assert_eq!((s, field(&e)), (400, "path".into()), "{e}");
    // A qcow2 whose backing file ferryd would have to open: refused.
    let base = dir.join("base.qcow2");
    sh(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("4M"));
    let top = dir.join("top.qcow2");
    sh(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&base)
        .arg(&top));
    let (s, e) = h.post("/v1/volumes/v/import", json!({ "path": top })).await;
    assert_eq!((s, field(&e)), (400, "path".into()), "{e}");
    assert!(e["error"].as_str().unwrap().contains("backing"), "{e}");
    let (_, vols) = h.get("/v1/volumes").await;
    assert_eq!(vols, json!([]));

    run_op(&h, "/v1/volumes/v/import", json!({ "path": raw })).await;
    let (s, e) = h.post("/v1/volumes/v/import", json!({ "path": raw })).await;
    assert_eq!(s, 409, "{e}");

    // Export: the target must not exist, its directory must.
    let (s, e) = h.post("/v1/volumes/v/export", json!({ "path": raw })).await;
    assert_eq!(s, 409, "{e}");
    assert!(
        e["error"].as_str().unwrap().contains("already exists"),
        "{e}"
    );
    let (s, e) = h
        .post(
            "/v1/volumes/v/export",
            json!({ "path": dir.join("no/such/dir/x.qcow2") }),
        )
        .await;
    assert_eq!((s, field(&e)), (400, "path".into()), "{e}");
    let (s, e) = h
        .post(
            "/v1/volumes/v/export",
            json!({ "path": dir.join("x.img"), "format": "vmdk" }),
        )
        .await;
    assert_eq!((s, field(&e)), (400, "format".into()), "{e}");
    let (s, e) = h
        .post(
            "/v1/volumes/ghost/export",
            json!({ "path": dir.join("g.qcow2") }),
        )
        .await;
    assert_eq!(s, 404, "{e}");
    assert!(!dir.join("g.qcow2").exists());
    let (_, ops) = h.get("/v1/operations").await;
    assert_eq!(ops.as_array().unwrap().len(), 1, "{ops}");
}
