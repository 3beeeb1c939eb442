//! Round trip, incremental, dedup, encryption, corruption, prune and gc on
//! a directory repository, with real pool volumes and snapshots.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};

use common::*;
use ferry_backup::{
    BackupOptions, DiskInput, DiskReader, ErrorKind, InitOptions, Key, Repository, SnapshotSource,
    VolumeTarget,
};
use ferry_pool::ChunkSource;
use serde_json::json;

fn full(repo: &Repository, vm: &str, disk: &str, src: &SnapshotSource) -> ferry_backup::Manifest {
    let opts = BackupOptions::new(vm, json!({"name": vm, "memory_mib": 512}));
    let d = DiskInput {
        name: disk.into(),
        source: src,
        changed: None,
        read_profile: vec![0..65536, 4 * MIB..4 * MIB + 65536],
    };
    repo.backup(&opts, &[d], None).unwrap()
}

#[test]
fn round_trip_restores_identical_volume() {
    let t = tempfile::tempdir().unwrap();
    let pool = new_pool(&t.path().join("pool"));
    let vol = pool.create_volume("vm1-disk0", 24 * MIB + 12345).unwrap();
    fill_mixed(&vol, 1, b"MARKER");
    pool.snapshot("vm1-disk0", "s1").unwrap();
    let want = vol_digest(&vol);
    // The guest keeps writing after the snapshot: the backup must not see it.
    vol.write_at(0, &[0xEE; 4096]).unwrap();

    let repo = Repository::init(t.path().join("repo").to_str().unwrap(), None).unwrap();
    let src = SnapshotSource::new(pool.open_snapshot("s1").unwrap());
    let done = AtomicU64::new(0);
    let opts = BackupOptions::new("vm1", json!({"name": "vm1"}));
    let progress = |n: u64, total: u64| {
        assert!(n <= total);
        done.fetch_max(n, Ordering::Relaxed);
    };
    let d = DiskInput {
        name: "disk0".into(),
        source: &src,
        changed: None,
        read_profile: vec![0..65536, MIB..MIB + 4096],
    };
    let m = repo.backup(&opts, &[d], Some(&progress)).unwrap();
    assert_eq!(done.load(Ordering::Relaxed), vol.size());
    assert_eq!(m.disks[0].read_profile, vec![0..65536, MIB..MIB + 4096]);
    assert_eq!(m.config, json!({"name": "vm1"}));
    // Zero regions (written and never written, and the unwritten partial
    // last block) are holes, not chunks.
    assert_eq!(m.disks[0].hole_blocks, 13);
    assert_eq!(m.disks[0].data_blocks, 12);
    assert_eq!(repo.show(&m.id).unwrap(), m);
    assert_eq!(repo.list().unwrap().len(), 1);

    // Full restore, parallel fetch, into a fresh volume.
    let dst = pool.create_volume("restored", m.disks[0].size).unwrap();
    let st = repo
        .restore_disk(&m.id, "disk0", &VolumeTarget(dst.clone()), 4, false, None)
        .unwrap();
    assert_eq!(st.chunks_fetched, 12);
    assert_eq!(vol_digest(&dst), want);

    // Random access and as a lazy volume's source (instant restore).
    let r: DiskReader = repo.open_disk(&m.id, "disk0").unwrap();
    let mut a = vec![0u8; 300_000];
    let mut b = vec![0u8; 300_000];
    for off in [0, 1_000_000, 5 * MIB - 7, 24 * MIB + 12345 - 300_000] {
        r.read_at(off, &mut a).unwrap();
        src.read_at_for_test(off, &mut b);
        assert_eq!(a, b, "read at {off}");
    }
    let holes = r.allocation(0, r.size()).unwrap();
    assert!(holes.iter().any(|e| e.kind == ferry_pool::ExtentKind::Hole));
    let lazy = pool.create_lazy("instant", std::sync::Arc::new(r)).unwrap();
    assert_eq!(vol_digest(&lazy), want);

    let info = repo.info().unwrap();
    assert_eq!((info.backups, info.chunks), (1, 12));
    assert!(repo.verify(2).unwrap().ok());
}

trait ReadForTest {
    fn read_at_for_test(&self, off: u64, buf: &mut [u8]);
}
impl ReadForTest for SnapshotSource {
    fn read_at_for_test(&self, off: u64, buf: &mut [u8]) {
        ferry_backup::DiskSource::read_at(self, off, buf).unwrap()
    }
}

#[test]
fn incremental_reads_and_uploads_only_changed_blocks() {
    let t = tempfile::tempdir().unwrap();
    let pool = new_pool(&t.path().join("pool"));
    let size = 64 * MIB;
    let vol = pool.create_volume("d", size).unwrap();
    fill_mixed(&vol, 2, b"X");
    pool.snapshot("d", "s1").unwrap();
    let repo = Repository::init(t.path().join("repo").to_str().unwrap(), None).unwrap();
    let s1 = SnapshotSource::new(pool.open_snapshot("s1").unwrap());
    let m1 = full(&repo, "vm", "disk0", &s1);
    assert_eq!(s1.bytes_read(), size);

    // Change ~1 %: ten 64 KiB writes of fresh data in eight 1 MiB blocks.
    let mut g = Gen::new(99);
    let mut touched = HashSet::new();
    for off in [
        0,
        65536,
        5 * MIB + 3 * 65536,
        9 * MIB,
        9 * MIB + 65536,
        17 * MIB + 7 * 65536,
        30 * MIB,
        42 * MIB + 2 * 65536,
        51 * MIB,
        63 * MIB + 15 * 65536,
    ] {
        let mut b = vec![0u8; 65536];
        g.fill(&mut b);
        vol.write_at(off, &b).unwrap();
        touched.insert(off / MIB);
    }
    vol.flush().unwrap();
    pool.snapshot("d", "s2").unwrap();
    let changed = pool.changed_between("d", "s1", Some("s2")).unwrap();
    let changed_bytes: u64 = changed.iter().map(|r| r.end - r.start).sum();
    assert_eq!(changed_bytes, 10 * 65536);

    let chunks_before = repo.info().unwrap().chunks;
    let s2 = SnapshotSource::new(pool.open_snapshot("s2").unwrap());
    let opts = BackupOptions::new("vm", json!({})).parent(m1.id.clone());
    let d = DiskInput {
        name: "disk0".into(),
        source: &s2,
        changed: Some(changed),
        read_profile: vec![],
    };
    let m2 = repo.backup(&opts, &[d], None).unwrap();
    // Only the touched blocks were read, and each gave one new chunk.
    assert_eq!(s2.bytes_read(), touched.len() as u64 * MIB);
    assert_eq!(m2.disks[0].read_bytes, touched.len() as u64 * MIB);
    assert_eq!(m2.disks[0].new_chunks, touched.len() as u64);
    assert_eq!(repo.info().unwrap().chunks, chunks_before + touched.len());
    assert_eq!(m2.parent.as_deref(), Some(m1.id.as_str()));

    for (m, snap) in [(&m2, "s2"), (&m1, "s1")] {
        let dst = pool.create_volume(&format!("r-{snap}"), size).unwrap();
        repo.restore_disk(&m.id, "disk0", &VolumeTarget(dst.clone()), 3, false, None)
            .unwrap();
        let s = pool.open_snapshot(snap).unwrap();
        assert_eq!(
            vol_digest(&dst),
            digest(size, |o, b| s.read_at(o, b).unwrap()),
            "restore of {snap}"
        );
    }
    // The live volume equals the last backup.
    let dst = pool.volume("r-s2").unwrap();
    assert_eq!(vol_digest(&dst), vol_digest(&vol));
}

#[test]
fn clones_of_one_image_share_chunks() {
    let t = tempfile::tempdir().unwrap();
    let pool = new_pool(&t.path().join("pool"));
    let base = pool.create_volume("base", 32 * MIB).unwrap();
    fill_mixed(&base, 3, b"BASE");
    pool.snapshot("base", "golden").unwrap();
    let repo = Repository::init(t.path().join("repo").to_str().unwrap(), None).unwrap();
    let mut growth = Vec::new();
    for (i, vm) in ["vm-a", "vm-b", "vm-c"].iter().enumerate() {
        let v = pool
            .clone_snapshot("golden", &format!("{vm}-disk"))
            .unwrap();
        // Each VM changes one block of its own.
        let mut b = vec![0u8; 65536];
        Gen::new(1000 + i as u64).fill(&mut b);
        v.write_at(3 * MIB, &b).unwrap();
        v.flush().unwrap();
        pool.snapshot(&format!("{vm}-disk"), &format!("{vm}-b1"))
            .unwrap();
        let src = SnapshotSource::new(pool.open_snapshot(&format!("{vm}-b1")).unwrap());
        let before = repo.info().unwrap().chunk_bytes;
        let m = full(&repo, vm, "disk0", &src);
        growth.push(repo.info().unwrap().chunk_bytes - before);
        if i > 0 {
            assert_eq!(m.disks[0].new_chunks, 1, "{vm}: only its own block is new");
        }
    }
    // Second and third VM: the repository grows by one block each (< 1/10
    // of the first).
    assert!(growth[1] * 10 < growth[0], "growth {growth:?}");
    assert!(growth[2] * 10 < growth[0], "growth {growth:?}");
    assert_eq!(repo.list().unwrap().len(), 3);
}

#[test]
fn encrypted_repository_needs_its_key_and_stores_no_plaintext() {
    let t = tempfile::tempdir().unwrap();
    let pool = new_pool(&t.path().join("pool"));
    let vol = pool.create_volume("d", 8 * MIB).unwrap();
    let marker = b"FERRY-PLAINTEXT-CANARY-7d1e";
    fill_mixed(&vol, 4, marker);
    pool.snapshot("d", "s1").unwrap();
    let key_file = t.path().join("key");
    let mut raw = [0u8; 32];
    Gen::new(77).fill(&mut raw);
    let key = Key::from_bytes(raw);
    key.save(&key_file).unwrap();
    let loc = t.path().join("repo");
    let loc = loc.to_str().unwrap();
    let repo = Repository::init(loc, Some(Key::load(&key_file).unwrap())).unwrap();
    let src = SnapshotSource::new(pool.open_snapshot("s1").unwrap());
    let m = full(&repo, "secret-vm", "disk0", &src);

    // No plaintext anywhere: not the canary, not the VM name.
    for f in files(std::path::Path::new(loc)) {
        let data = std::fs::read(&f).unwrap();
        for needle in [&marker[..], b"secret-vm", b"memory_mib"] {
            assert!(
                !data.windows(needle.len()).any(|w| w == needle),
                "{} holds plaintext",
                f.display()
            );
        }
    }
    // The key is not stored either.
    let hex = key.to_hex();
    for f in files(std::path::Path::new(loc)) {
        let data = std::fs::read(&f).unwrap();
        assert!(!data.windows(64).any(|w| w == hex.as_bytes()));
        assert!(!data.windows(32).any(|w| w == raw));
    }

    let e = Repository::open(loc, Some(Key::generate())).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WrongKey);
    assert!(
        e.to_string()
            .contains(&format!("wrong key for repository {loc}")),
        "{e}"
    );
    let e = Repository::open(loc, None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WrongKey);

    let repo = Repository::open(loc, Some(Key::load(&key_file).unwrap())).unwrap();
    let dst = pool.create_volume("r", 8 * MIB).unwrap();
    repo.restore_disk(&m.id, "disk0", &VolumeTarget(dst.clone()), 2, false, None)
        .unwrap();
    assert_eq!(vol_digest(&dst), vol_digest(&vol));
    assert!(repo.verify(2).unwrap().ok());
}

#[test]
fn corrupt_chunk_is_named_with_affected_backups() {
    let t = tempfile::tempdir().unwrap();
    let pool = new_pool(&t.path().join("pool"));
    let a = pool.create_volume("a", 8 * MIB).unwrap();
    fill_mixed(&a, 5, b"A");
    pool.snapshot("a", "a1").unwrap();
    let b = pool.create_volume("b", 8 * MIB).unwrap();
    fill_mixed(&b, 6, b"B");
    pool.snapshot("b", "b1").unwrap();
    let loc = t.path().join("repo");
    let repo = Repository::init(loc.to_str().unwrap(), None).unwrap();
    let sa = SnapshotSource::new(pool.open_snapshot("a1").unwrap());
    let sb = SnapshotSource::new(pool.open_snapshot("b1").unwrap());
    let ma1 = full(&repo, "a", "disk0", &sa);
    let ma2 = full(&repo, "a", "disk0", &sa);
    let mb = full(&repo, "b", "disk0", &sb);

    // Flip one byte in the middle of a chunk of A's (block 1, binary data).
    let ra = repo.open_disk(&ma1.id, "disk0").unwrap();
    let victim = ra.index().chunks[1];
    let path = loc.join(victim.key());
    let mut data = std::fs::read(&path).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0x40;
    std::fs::write(&path, &data).unwrap();

    let rep = repo.verify(2).unwrap();
    assert!(!rep.ok());
    assert_eq!(rep.bad_chunks.len(), 1);
    assert_eq!(rep.bad_chunks[0].id, victim.to_string());
    let mut want = vec![ma1.id.clone(), ma2.id.clone()];
    want.sort();
    assert_eq!(rep.bad_chunks[0].backups, want);
    assert_eq!(rep.affected_backups, want);
    assert!(!rep.affected_backups.contains(&mb.id));

    let dst = pool.create_volume("r", 8 * MIB).unwrap();
    let e = repo
        .restore_disk(&ma2.id, "disk0", &VolumeTarget(dst), 2, false, None)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    let msg = format!(
        "{e}: {}",
        std::error::Error::source(&e)
            .map(|s| s.to_string())
            .unwrap_or_default()
    );
    assert!(msg.contains(&ma2.id), "{msg}");
    // Reading through the reader fails too, rather than returning garbage.
    let mut buf = vec![0u8; 4096];
    assert!(ra.read_at(MIB + 100, &mut buf).is_err());
    // B is untouched.
    let dst = pool.create_volume("rb", 8 * MIB).unwrap();
    repo.restore_disk(&mb.id, "disk0", &VolumeTarget(dst.clone()), 2, false, None)
        .unwrap();
    assert_eq!(vol_digest(&dst), vol_digest(&b));
}

#[test]
fn unknown_config_version_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let loc = t.path().join("repo");
    Repository::init(loc.to_str().unwrap(), None).unwrap();
    let e = Repository::init(loc.to_str().unwrap(), None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    let p = loc.join("config");
    let mut d = std::fs::read(&p).unwrap();
    d[8] = 9;
    std::fs::write(&p, &d).unwrap();
    let e = Repository::open(loc.to_str().unwrap(), None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::UnknownVersion);
    assert!(e.to_string().contains("version 9"), "{e}");
    let e = Repository::open(t.path().join("nothing").to_str().unwrap(), None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    let e = Repository::init_with(
        t.path().join("r2").to_str().unwrap(),
        None,
        InitOptions { block_size: 1000 },
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
}
