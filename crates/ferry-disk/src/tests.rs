//! Tables made by util-linux `sfdisk` on sparse files, read back and
//! compared with what `sfdisk --json` says; then damaged on purpose.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};

use proptest::prelude::*;

use super::*;

const MIB: u64 = 1 << 20;

/// A sparse file of `size` bytes partitioned by `sfdisk` with `script`.
fn sfdisk(dir: &Path, name: &str, size: u64, script: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    File::create(&path).unwrap().set_len(size).unwrap();
    let mut child = Command::new("sfdisk")
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(&path)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("sfdisk (util-linux) is installed");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.replace('@', path.to_str().unwrap()).as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "sfdisk failed");
    path
}

/// (number, start, len, type) of each partition as `sfdisk --json` lists it,
/// extended containers left out.
fn sfdisk_json(path: &Path) -> (String, Vec<(u32, u64, u64, String)>) {
    let out = Command::new("sfdisk")
        .arg("--json")
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let t = &v["partitiontable"];
    let ss = t["sectorsize"].as_u64().unwrap_or(512);
    let node_prefix = path.to_str().unwrap();
    let mut parts = Vec::new();
    for p in t["partitions"].as_array().unwrap() {
        let kind = p["type"].as_str().unwrap().to_string();
        if matches!(kind.as_str(), "5" | "f" | "85") {
            continue;
        }
        let number = p["node"].as_str().unwrap()[node_prefix.len()..]
            .parse()
            .unwrap();
        parts.push((
            number,
            p["start"].as_u64().unwrap() * ss,
            p["size"].as_u64().unwrap() * ss,
            kind,
        ));
    }
    (t["label"].as_str().unwrap().to_string(), parts)
}

fn layout(path: &Path) -> Result<Option<Layout>, Error> {
    let f = File::open(path).unwrap();
    let size = f.metadata().unwrap().len();
    read_layout(&f, size)
}

fn ours(l: &Layout) -> Vec<(u32, u64, u64)> {
    l.partitions
        .iter()
        .map(|p| (p.number, p.start, p.len))
        .collect()
}

fn theirs(path: &Path) -> Vec<(u32, u64, u64)> {
    let mut v: Vec<_> = sfdisk_json(path)
        .1
        .into_iter()
        .map(|(n, s, l, _)| (n, s, l))
        .collect();
    v.sort_by_key(|p| p.1);
    v
}

/// The outside ranges are exactly the complement of the partitions.
fn check_complement(l: &Layout, size: u64) {
    let mut edges: Vec<Range<u64>> = l.partitions.iter().map(|p| p.range()).collect();
    edges.extend(l.outside.iter().cloned());
    edges.sort_by_key(|r| r.start);
    let mut at = 0;
    for r in edges {
        assert_eq!(r.start, at, "gap or overlap at {at}");
        assert!(r.end > r.start);
        at = r.end;
    }
    assert_eq!(at, size);
}

const GPT_SCRIPT: &str = "label: gpt\n\
    start=2048, size=16384, type=linux, name=boot\n\
    size=40960, type=linux, name=root\n\
    type=swap, name=swap\n";

/// `@` stands for the image's path: logical partitions are named by number.
const MBR_SCRIPT: &str = "label: dos\n\
    @1: start=2048, size=20480, type=83\n\
    @2: size=61440, type=5\n\
    @5: size=20480, type=83\n\
    @6: size=30720, type=82\n";

fn corrupt(path: &Path, offset: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    FileExt::read_exact_at(&f, &mut b, offset).unwrap();
    b[0] ^= 0x5a;
    f.write_all_at(&b, offset).unwrap();
}

#[test]
fn gpt_three_partitions_match_sfdisk() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let p = sfdisk(dir.path(), "gpt.img", size, GPT_SCRIPT);
    let l = layout(&p).unwrap().expect("a table");
    assert_eq!(l.scheme, Scheme::Gpt { backup: false });
    assert_eq!(l.sector_size, 512);
    assert_eq!(ours(&l), theirs(&p));
    assert_eq!(l.partitions.len(), 3);
    let (_, json) = sfdisk_json(&p);
    for (mine, (_, _, _, kind)) in l.partitions.iter().zip(&json) {
        assert_eq!(&mine.kind, kind);
    }
    assert_eq!(l.partitions[0].name.as_deref(), Some("boot"));
    assert_eq!(l.partitions[2].name.as_deref(), Some("swap"));
    // Outside: the protective MBR + primary GPT before 1 MiB, and the
    // backup GPT after the last partition.
    assert_eq!(l.outside.first(), Some(&(0..MIB)));
    assert_eq!(l.outside.last().unwrap().end, size);
    check_complement(&l, size);
}

#[test]
fn mbr_with_extended_and_two_logicals_matches_sfdisk() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let p = sfdisk(dir.path(), "mbr.img", size, MBR_SCRIPT);
    let l = layout(&p).unwrap().expect("a table");
    assert_eq!(l.scheme, Scheme::Mbr);
    assert_eq!(ours(&l), theirs(&p));
    let numbers: Vec<u32> = l.partitions.iter().map(|p| p.number).collect();
    assert_eq!(numbers, [1, 5, 6]);
    assert_eq!(l.partitions[2].kind, "0x82");
    let ext = l.extended.clone().unwrap();
    assert_eq!(ext, (22528 * 512)..((22528 + 61440) * 512));
    // The EBR in front of each logical partition is outside them.
    assert!(l.outside.iter().any(|r| r.start == ext.start));
    check_complement(&l, size);
}

#[test]
fn primary_mbr_partitions_only() {
    let dir = tempfile::tempdir().unwrap();
    let p = sfdisk(
        dir.path(),
        "dos.img",
        32 * MIB,
        "label: dos\nstart=2048, size=4096, type=83\nstart=8192, size=4096, type=c\n",
    );
    let l = layout(&p).unwrap().unwrap();
    assert_eq!(ours(&l), theirs(&p));
    assert_eq!(l.extended, None);
    check_complement(&l, 32 * MIB);
}

#[test]
fn blank_disk_has_no_table() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blank.img");
    File::create(&path).unwrap().set_len(8 * MIB).unwrap();
    assert!(layout(&path).unwrap().is_none());
    assert!(read_layout(&[0u8; 100][..], 100).unwrap().is_none());
}

#[test]
fn damaged_primary_gpt_header_falls_back_to_backup() {
    let dir = tempfile::tempdir().unwrap();
    let p = sfdisk(dir.path(), "gpt.img", 64 * MIB, GPT_SCRIPT);
    let want = theirs(&p);
    corrupt(&p, 512 + 40); // first usable LBA, under the header CRC
    let l = layout(&p).unwrap().unwrap();
    assert_eq!(l.scheme, Scheme::Gpt { backup: true });
    assert_eq!(ours(&l), want);
}

#[test]
fn damaged_primary_entry_array_falls_back_to_backup() {
    let dir = tempfile::tempdir().unwrap();
    let p = sfdisk(dir.path(), "gpt.img", 64 * MIB, GPT_SCRIPT);
    let want = theirs(&p);
    corrupt(&p, 1024 + 128 + 32); // second entry's first LBA
    let l = layout(&p).unwrap().unwrap();
    assert_eq!(l.scheme, Scheme::Gpt { backup: true });
    assert_eq!(ours(&l), want);
}

#[test]
fn wiped_primary_gpt_behind_protective_mbr_uses_backup() {
    let dir = tempfile::tempdir().unwrap();
    let p = sfdisk(dir.path(), "gpt.img", 64 * MIB, GPT_SCRIPT);
    let want = theirs(&p);
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(&[0u8; 512 * 33], 512).unwrap();
    let l = layout(&p).unwrap().unwrap();
    assert_eq!(l.scheme, Scheme::Gpt { backup: true });
    assert_eq!(ours(&l), want);
}

#[test]
fn both_gpt_copies_damaged_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let p = sfdisk(dir.path(), "gpt.img", size, GPT_SCRIPT);
    corrupt(&p, 512 + 40);
    corrupt(&p, size - 512 + 40);
    let e = layout(&p).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Gpt { .. }), "{msg}");
    assert!(msg.contains("header CRC mismatch"), "{msg}");
}

#[test]
fn protective_mbr_without_any_gpt_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let p = sfdisk(dir.path(), "gpt.img", size, GPT_SCRIPT);
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(&[0u8; 512], 512).unwrap();
    f.write_all_at(&[0u8; 512], size - 512).unwrap();
    let e = layout(&p).unwrap_err();
    assert!(e.to_string().contains("protective MBR"), "{e}");
}

#[test]
fn looping_ebr_chain_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = sfdisk(dir.path(), "mbr.img", 64 * MIB, MBR_SCRIPT);
    let l = layout(&p).unwrap().unwrap();
    let ext_lba = l.extended.unwrap().start / 512;
    // The second EBR's link points back at the first EBR.
    let first = ext_lba * 512;
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    let mut ebr = [0u8; 512];
    FileExt::read_exact_at(&f, &mut ebr, first).unwrap();
    let second = (ext_lba + le32(&ebr, 446 + 16 + 8) as u64) * 512;
    let mut link = [0u8; 16];
    link.copy_from_slice(&ebr[446 + 16..446 + 32]);
    link[8..12].copy_from_slice(&0u32.to_le_bytes());
    f.write_all_at(&link, second + 446 + 16).unwrap();
    let e = layout(&p).unwrap_err();
    assert!(e.to_string().contains("loops"), "{e}");
}

#[test]
fn partition_beyond_the_disk_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = sfdisk(dir.path(), "mbr.img", 64 * MIB, MBR_SCRIPT);
    File::options()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let e = layout(&p).unwrap_err();
    assert!(e.to_string().contains("outside"), "{e}");
}

#[test]
fn bad_mbr_status_byte_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = sfdisk(dir.path(), "mbr.img", 64 * MIB, MBR_SCRIPT);
    corrupt(&p, 446);
    let e = layout(&p).unwrap_err();
    assert!(matches!(e, Error::Mbr(_)), "{e}");
}

#[test]
fn overlapping_mbr_partitions_are_an_error() {
    let mut disk = vec![0u8; 4 * MIB as usize];
    disk[510] = 0x55;
    disk[511] = 0xAA;
    for (i, start) in [2048u32, 3000].into_iter().enumerate() {
        let e = &mut disk[446 + 16 * i..446 + 16 * (i + 1)];
        e[4] = 0x83;
        e[8..12].copy_from_slice(&start.to_le_bytes());
        e[12..16].copy_from_slice(&2048u32.to_le_bytes());
    }
    let e = read_layout(&disk[..], disk.len() as u64).unwrap_err();
    assert!(matches!(e, Error::Layout(_)), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Random damage to a real GPT or MBR disk's first and last sectors
    /// never panics, and whatever is returned is a consistent layout.
    #[test]
    fn damaged_tables_never_panic(
        gpt in any::<bool>(),
        flips in proptest::collection::vec((0usize..(40 * 512), any::<u8>()), 1..40),
    ) {
        let disk = template(gpt);
        let mut disk = disk.clone();
        let n = disk.len();
        for (at, v) in flips {
            // Damage the head (MBR, primary GPT, first EBR) and the tail.
            let pos = if at % 2 == 0 { at } else { n - 1 - at % (34 * 512) };
            disk[pos] ^= v;
        }
        if let Ok(Some(l)) = read_layout(&disk[..], n as u64) {
            check_complement(&l, n as u64);
        }
    }
}

fn template(gpt: bool) -> &'static Vec<u8> {
    use std::sync::OnceLock;
    static G: OnceLock<Vec<u8>> = OnceLock::new();
    static M: OnceLock<Vec<u8>> = OnceLock::new();
    let (cell, script) = if gpt {
        (&G, GPT_SCRIPT)
    } else {
        (&M, MBR_SCRIPT)
    };
    cell.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let p = sfdisk(dir.path(), "t.img", 64 * MIB, script);
        std::fs::read(p).unwrap()
    })
}
