//! Damaged metadata: random and corrupted bytes fed to every decoder of
//! what the pool reads from disk, and damaged pools opened, must give a
//! clean error (or a consistent pool), never a panic.

use std::path::Path;

use ferry_pool::format::{HEADER_FILE, Header};
use ferry_pool::{ErrorKind, META_FILE, Pool, PoolOptions, decode};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

const CS: u64 = 4096;

const VOLUME: &[u8] =
    br#"{"id":2,"name":"clone","size":1048576,"epoch":3,"parent":[1,1],"lazy":false}"#;
const SNAPSHOT: &[u8] =
    br#"{"name":"s1","volume":1,"epoch":1,"size":1048576,"group":"g","created":1700000000}"#;
const PROFILE: &[u8] = b"[3,1,4,15,9,2,6]";

fn valid_header() -> Vec<u8> {
    Header {
        version: ferry_pool::format::FORMAT_VERSION,
        chunk_size: 65536,
        created: 1_700_000_000,
    }
    .encode()
    .to_vec()
}

/// A mutation of `base`: byte flips, a truncation, an insertion.
fn mutate(base: &[u8], seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut b = base.to_vec();
    for _ in 0..rng.random_range(1..4) {
        match rng.random_range(0..4) {
            0 if !b.is_empty() => {
                let i = rng.random_range(0..b.len());
                b[i] ^= 1 << rng.random_range(0..8);
            }
            1 if !b.is_empty() => {
                let i = rng.random_range(0..b.len());
                b[i] = rng.random();
            }
            2 => {
                let n = rng.random_range(0..=b.len());
                b.truncate(n);
            }
            _ => {
                let i = rng.random_range(0..=b.len());
                let c = *b"0123456789-:,[]{}\"e.9"
                    .get(rng.random_range(0..21usize))
                    .unwrap_or(&b'0');
                b.insert(i, c);
            }
        }
    }
    b
}

#[test]
fn valid_records_decode() {
    decode::header(&valid_header()).unwrap();
    decode::volume_record(2, VOLUME).unwrap();
    decode::snapshot_record("s1", SNAPSHOT).unwrap();
    decode::profile(1, PROFILE).unwrap();
    let parent = br#"{"id":1,"name":"base","size":1048576,"epoch":2,"parent":null,"lazy":false}"#;
    decode::catalog(&[parent, VOLUME], &[SNAPSHOT], 3).unwrap();
}

#[test]
fn inconsistent_records_are_refused() {
    let e = |r: ferry_pool::Result<()>| r.unwrap_err().kind();
    // Wrong key, self-parent (an endless clone chain), epoch 0, bad name.
    assert_eq!(e(decode::volume_record(3, VOLUME)), ErrorKind::Metadata);
    let own_parent = br#"{"id":2,"name":"c","size":1,"epoch":1,"parent":[2,1],"lazy":false}"#;
    assert_eq!(e(decode::volume_record(2, own_parent)), ErrorKind::Metadata);
    let epoch0 = br#"{"id":2,"name":"c","size":1,"epoch":0,"parent":null,"lazy":false}"#;
    assert_eq!(e(decode::volume_record(2, epoch0)), ErrorKind::Metadata);
    let noname = br#"{"id":2,"name":"","size":1,"epoch":1,"parent":null,"lazy":false}"#;
    assert_eq!(e(decode::volume_record(2, noname)), ErrorKind::Metadata);
    assert_eq!(
        e(decode::snapshot_record("other", SNAPSHOT)),
        ErrorKind::Metadata
    );
    assert_eq!(e(decode::profile(1, b"[1,2,1]")), ErrorKind::Metadata);
    assert_eq!(e(decode::profile(1, b"[1,-2]")), ErrorKind::Metadata);
    // A clone whose snapshot is missing; a snapshot of a missing volume;
    // a snapshot not older than its volume; an id at the next id.
    let parent = br#"{"id":1,"name":"base","size":1048576,"epoch":2,"parent":null,"lazy":false}"#;
    assert_eq!(
        e(decode::catalog(&[parent, VOLUME], &[], 3)),
        ErrorKind::Metadata
    );
    assert_eq!(e(decode::catalog(&[], &[SNAPSHOT], 3)), ErrorKind::Metadata);
    let young = br#"{"id":1,"name":"base","size":1048576,"epoch":1,"parent":null,"lazy":false}"#;
    assert_eq!(
        e(decode::catalog(&[young], &[SNAPSHOT], 3)),
        ErrorKind::Metadata
    );
    assert_eq!(
        e(decode::catalog(&[parent, VOLUME], &[SNAPSHOT], 2)),
        ErrorKind::Metadata
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
        decode::any(&data);
        let _ = decode::header(&data);
        let _ = decode::volume_record(1, &data);
        let _ = decode::snapshot_record("s", &data);
        let _ = decode::profile(1, &data);
    }

    #[test]
    fn corrupted_records_give_clean_errors(seed in any::<u64>()) {
        let h = mutate(&valid_header(), seed);
        if let Err(e) = decode::header(&h) {
            prop_assert!(matches!(e.kind(), ErrorKind::BadHeader | ErrorKind::UnknownVersion));
        }
        for r in [
            decode::volume_record(2, &mutate(VOLUME, seed)),
            decode::snapshot_record("s1", &mutate(SNAPSHOT, seed)),
            decode::profile(1, &mutate(PROFILE, seed)),
        ] {
            if let Err(e) = r {
                prop_assert_eq!(e.kind(), ErrorKind::Metadata);
                prop_assert!(!e.to_string().is_empty());
            }
        }
    }
}

/// A pool with volumes, snapshots, a clone, a read profile and data.
fn make_pool(dir: &Path) {
    let pool = Pool::create(
        dir,
        PoolOptions {
            chunk_size: CS as u32,
            limit_bytes: None,
        },
    )
    .unwrap();
    let a = pool.create_volume("a", 256 * CS).unwrap();
    let b = pool.create_volume("b", 64 * CS).unwrap();
    for i in 0..40u64 {
        a.write_at(i * 3 * CS, &[i as u8 + 1; CS as usize]).unwrap();
        b.write_at((i % 64) * CS, &[i as u8; 100]).unwrap();
    }
    pool.snapshot("a", "a1").unwrap();
    a.write_at(0, &[9; 3 * CS as usize]).unwrap();
    pool.group_snapshot("g", &[("a", "a2"), ("b", "b1")])
        .unwrap();
    let c = pool.clone_snapshot("a1", "c").unwrap();
    c.write_at(CS, &[7; 10]).unwrap();
    b.start_read_profile(ferry_pool::ProfileLimit::Reads(100));
    let mut buf = [0u8; 10];
    b.read_at(5 * CS, &mut buf).unwrap();
    pool.flush().unwrap();
    pool.verify_clean().unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Open a damaged pool: a clean error, or a pool whose volumes can be read
/// and verified (the damage hit unused bytes) — never a panic.
fn open_damaged(dir: &Path) -> Option<ErrorKind> {
    match Pool::open(dir) {
        Err(e) => {
            assert!(!e.context().is_empty());
            Some(e.kind())
        }
        Ok(pool) => {
            for v in pool.volumes() {
                if let Ok(vol) = pool.volume(&v.name) {
                    let mut buf = vec![0u8; vol.size().min(1 << 20) as usize];
                    let _ = vol.read_at(0, &mut buf);
                }
            }
            let _ = pool.verify();
            None
        }
    }
}

/// Where the last panic of this process was raised.
static PANIC_AT: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// [`open_damaged`], except that a panic of one of redb's consistency
/// checks in a build with debug assertions counts as an error: `None`.
/// `Pool::open` and `Pool::verify` turn panics inside the store into
/// Metadata errors (some damage makes redb panic in release builds too), so
/// such a panic can only come from elsewhere; any other panic fails the test.
fn open_without_redb_debug_asserts(dir: &Path) -> Option<Option<ErrorKind>> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let at = info.location().map(|l| l.file().to_string());
            let in_redb = at.as_deref().is_some_and(|f| f.contains("/redb-"));
            *PANIC_AT.lock().unwrap_or_else(|e| e.into_inner()) = at;
            if !in_redb {
                default(info);
            }
        }));
    });
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| open_damaged(dir))) {
        Ok(r) => Some(r),
        Err(p) => {
            let at = PANIC_AT.lock().unwrap_or_else(|e| e.into_inner()).take();
            let in_redb = at.as_deref().is_some_and(|f| f.contains("/redb-"));
            if in_redb && cfg!(debug_assertions) {
                None
            } else {
                std::panic::resume_unwind(p)
            }
        }
    }
}

#[test]
fn damaged_metadata_file_gives_clean_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    make_pool(&good);
    let meta = std::fs::read(good.join(META_FILE)).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xfe77);
    let (mut errors, mut opened, mut redb_asserts) = (0, 0, 0);
    for trial in 0..60 {
        let d = dir.path().join(format!("t{trial}"));
        copy_dir(&good, &d);
        let mut m = meta.clone();
        match trial % 3 {
            0 => {
                // Flip a few bytes anywhere.
                for _ in 0..rng.random_range(1..8) {
                    let i = rng.random_range(0..m.len());
                    m[i] ^= rng.random_range(1..=255u8);
                }
            }
            1 => {
                // Zero a 4 KiB page (a torn or lost page).
                let pages = m.len() / 4096;
                let p = rng.random_range(0..pages.max(1));
                let end = ((p + 1) * 4096).min(m.len());
                m[p * 4096..end].fill(0);
            }
            _ => m.truncate(rng.random_range(0..m.len())),
        }
        std::fs::write(d.join(META_FILE), &m).unwrap();
        match open_without_redb_debug_asserts(&d) {
            Some(Some(_)) => errors += 1,
            Some(None) => opened += 1,
            None => redb_asserts += 1,
        }
        std::fs::remove_dir_all(&d).unwrap();
    }
    println!(
        "damaged metadata: {errors} clean errors, {opened} opened, {redb_asserts} redb debug assertions"
    );
}

#[test]
fn damaged_header_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    make_pool(&good);
    let hdr = std::fs::read(good.join(HEADER_FILE)).unwrap();
    for seed in 0..50u64 {
        let d = dir.path().join(format!("h{seed}"));
        copy_dir(&good, &d);
        let m = mutate(&hdr, seed);
        std::fs::write(d.join(HEADER_FILE), &m).unwrap();
        match Pool::open(&d) {
            Ok(_) => assert_eq!(m, hdr, "a changed header was accepted"),
            Err(e) => assert!(
                matches!(
                    e.kind(),
                    ErrorKind::BadHeader | ErrorKind::UnknownVersion | ErrorKind::Io
                ),
                "{e}"
            ),
        }
        std::fs::remove_dir_all(&d).unwrap();
    }
}

/// Well-formed redb, wrong content: records a crash cannot produce.
#[test]
fn inconsistent_metadata_is_refused_on_open() {
    const VOLUMES: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("volumes");
    const MAP: redb::TableDefinition<(u64, u64, u64), u64> = redb::TableDefinition::new("map");
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    make_pool(&good);
    type Edit = Box<dyn Fn(&redb::WriteTransaction)>;
    let edits: Vec<(&str, Edit)> = vec![
        (
            "clone that is its own parent",
            Box::new(|txn| {
                let rec =
                    br#"{"id":1,"name":"a","size":1048576,"epoch":3,"parent":[1,2],"lazy":false}"#;
                txn.open_table(VOLUMES)
                    .unwrap()
                    .insert(1, rec.as_slice())
                    .unwrap();
            }),
        ),
        (
            "volume record that is not JSON",
            Box::new(|txn| {
                txn.open_table(VOLUMES)
                    .unwrap()
                    .insert(2, b"\x00garbage".as_slice())
                    .unwrap();
            }),
        ),
        (
            "map entry far past the data file",
            Box::new(|txn| {
                txn.open_table(MAP)
                    .unwrap()
                    .insert((1, 5, 1), 1u64 << 60)
                    .unwrap();
            }),
        ),
    ];
    for (i, (what, edit)) in edits.iter().enumerate() {
        let d = dir.path().join(format!("e{i}"));
        copy_dir(&good, &d);
        {
            let db = redb::Database::open(d.join(META_FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            edit(&txn);
            txn.commit().unwrap();
        }
        let e = Pool::open(&d).expect_err(what);
        assert_eq!(e.kind(), ErrorKind::Metadata, "{what}: {e}");
        println!("{what}: {e}");
    }
}
