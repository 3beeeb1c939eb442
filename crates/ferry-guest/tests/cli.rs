//! The `ferry-guest` binary on the host: writing, verifying a file, and
//! verifying a file inside a real ext4 image made by `mkfs.ext4 -d`.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, ensure};
use ferry_guest::event;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry-guest"))
}

fn write_records(file: &Path, count: u64) -> Result<Vec<u64>> {
    let out = bin()
        .args(["write", "--rate", "0", "--size", "256", "--count"])
        .arg(count.to_string())
        .arg("--file")
        .arg(file)
        .output()?;
    ensure!(out.status.success(), "write failed: {out:?}");
    let stdout = String::from_utf8(out.stdout)?;
    Ok(stdout
        .lines()
        .filter_map(event::parse)
        .filter(|e| e.name == "record")
        .filter_map(|e| e.u64("seq"))
        .collect())
}

fn verify(args: &[&str], target: &Path) -> Result<(i32, serde_json::Value)> {
    let out = bin().arg("verify").args(args).arg(target).output()?;
    let code = out.status.code().context("killed")?;
    let stdout = String::from_utf8(out.stdout)?;
    let report = serde_json::from_str(stdout.trim()).with_context(|| {
        format!(
            "report {stdout:?}, stderr {:?}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok((code, report))
}

#[test]
fn write_resume_and_verify_a_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("records");
    assert_eq!(write_records(&file, 5)?, vec![0, 1, 2, 3, 4]);
    assert_eq!(write_records(&file, 3)?, vec![5, 6, 7]);
    let (code, report) = verify(&["--file"], &file)?;
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["records"], 8);
    assert_eq!(report["last_seq"], 7);

    // Demand more than survive: data loss is reported.
    let (code, report) = verify(&["--expect-min-records", "9", "--file"], &file)?;
    assert_eq!(code, 1);
    assert_eq!(report["ok"], false);

    // Damage a middle record.
    let mut data = std::fs::read(&file)?;
    data[256 * 2 + 100] ^= 0x10;
    std::fs::write(&file, &data)?;
    let (code, report) = verify(&["--file"], &file)?;
    assert_eq!(code, 1, "{report}");
    assert_eq!(report["records"], 2);
    assert!(report["errors"][0].as_str().unwrap().contains("offset 512"));

    // The writer refuses to append to it and leaves it alone.
    let out = bin()
        .args(["write", "--count", "1", "--file"])
        .arg(&file)
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("damaged"));
    assert_eq!(std::fs::read(&file)?, data);
    Ok(())
}

#[test]
fn verify_inside_an_ext4_image() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("root");
    std::fs::create_dir(&root)?;
    write_records(&root.join("records"), 20)?;
    let image = dir.path().join("disk.raw");
    std::fs::File::create(&image)?.set_len(16 << 20)?;
    let st = Command::new(ferry_guest::image::sbin("mkfs.ext4"))
        .args(["-F", "-q", "-d"])
        .arg(&root)
        .arg(&image)
        .status()?;
    ensure!(st.success(), "mkfs.ext4 failed");
    let before = std::fs::read(&image)?;

    let (code, report) = verify(&["--image"], &image)?;
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["records"], 20);
    assert_eq!(report["last_seq"], 19);
    assert_eq!(
        std::fs::read(&image)?,
        before,
        "verification changed the image"
    );

    let lib = ferry_guest::image::verify_image(&image, "/records")?;
    assert!(lib.ok && lib.records == 20);

    let err = ferry_guest::image::verify_image(&image, "/missing").unwrap_err();
    assert!(err.to_string().contains("/missing not found"), "{err}");
    Ok(())
}

#[test]
fn corruption_inside_an_ext4_image_is_reported() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("root");
    std::fs::create_dir(&root)?;
    let file = root.join("records");
    write_records(&file, 20)?;
    let mut data = std::fs::read(&file)?;
    data[256 * 7 + 50] ^= 0x01;
    std::fs::write(&file, &data)?;
    let image = dir.path().join("disk.raw");
    std::fs::File::create(&image)?.set_len(16 << 20)?;
    let st = Command::new(ferry_guest::image::sbin("mkfs.ext4"))
        .args(["-F", "-q", "-d"])
        .arg(&root)
        .arg(&image)
        .status()?;
    ensure!(st.success(), "mkfs.ext4 failed");
    let (code, report) = verify(&["--image"], &image)?;
    assert_eq!(code, 1, "{report}");
    assert_eq!(report["records"], 7);
    assert!(
        report["errors"][0]
            .as_str()
            .unwrap()
            .contains("valid record seq 8"),
        "{report}"
    );
    Ok(())
}
