//! Volumes, snapshots, group snapshots, clones, change tracking, space,
//! allocation map, read profiles, reads handed out from the mapped data
//! file (pinned chunks not reused) and the on-disk format check.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ferry_pool::format::{HEADER_FILE, Header};
use ferry_pool::{ErrorKind, ExtentKind, Pool, PoolOptions, ProfileLimit, Volume};
use ferry_testkit::disk::page_states;

const CS: u64 = 4096;

fn pool(dir: &tempfile::TempDir) -> Pool {
    Pool::create(
        dir.path().join("p"),
        PoolOptions {
            chunk_size: CS as u32,
            limit_bytes: None,
        },
    )
    .unwrap()
}

fn read(v: &ferry_pool::Volume, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    v.read_at(off, &mut b).unwrap();
    b
}

#[test]
fn unknown_format_version_is_refused_and_untouched() {
    let dir = tempfile::tempdir().unwrap();
    drop(pool(&dir));
    let hdr_path = dir.path().join("p").join(HEADER_FILE);
    let h = Header::read(&dir.path().join("p")).unwrap();
    let newer = Header {
        version: h.version + 1,
        ..h
    }
    .encode();
    std::fs::write(&hdr_path, newer).unwrap();
    let err = Pool::open(dir.path().join("p")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::UnknownVersion);
    assert!(err.to_string().contains("format version 2"), "{err}");
    assert_eq!(std::fs::read(&hdr_path).unwrap(), newer);
    std::fs::write(&hdr_path, b"not a pool header at all, nope!!").unwrap();
    assert_eq!(
        Pool::open(dir.path().join("p")).unwrap_err().kind(),
        ErrorKind::BadHeader
    );
}

#[test]
fn thousand_snapshots_keep_their_content_and_free_space_on_delete() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(&dir);
    let v = p.create_volume("v", 16 * CS).unwrap();
    for i in 0..1000u64 {
        // Chunk i % 16 gets the value of snapshot i.
        v.write_at((i % 16) * CS + 100, &i.to_le_bytes()).unwrap();
        p.snapshot("v", &format!("s{i}")).unwrap();
    }
    for i in [0u64, 1, 15, 16, 500, 998, 999] {
        let s = p.open_snapshot(&format!("s{i}")).unwrap();
        let mut b = [0u8; 8];
        s.read_at((i % 16) * CS + 100, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), i, "snapshot s{i}");
    }
    assert!(p.verify().unwrap().is_empty());
    for i in (0..1000).step_by(2) {
        p.delete_snapshot(&format!("s{i}")).unwrap();
    }
    assert_eq!(p.verify().unwrap(), Vec::<String>::new());
    drop(v);
    drop(p);
    let p = Pool::open(dir.path().join("p")).unwrap();
    assert_eq!(p.verify().unwrap(), Vec::<String>::new());
    let s = p.open_snapshot("s501").unwrap();
    let mut b = [0u8; 8];
    s.read_at((501 % 16) * CS + 100, &mut b).unwrap();
    assert_eq!(u64::from_le_bytes(b), 501);
    for i in (1..1000).step_by(2) {
        p.delete_snapshot(&format!("s{i}")).unwrap();
    }
    assert_eq!(p.verify().unwrap(), Vec::<String>::new());
    // Only the live volume's 16 chunks remain.
    assert_eq!(p.usage().used_bytes, 16 * CS);
    let v = p.volume("v").unwrap();
    let mut b = [0u8; 8];
    v.read_at(7 * CS + 100, &mut b).unwrap();
    assert_eq!(u64::from_le_bytes(b), 999);
}

#[test]
fn clones_of_clones_share_and_diverge() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(&dir);
    let v = p.create_volume("base", 8 * CS).unwrap();
    v.write_at(0, &vec![1u8; (8 * CS) as usize]).unwrap();
    p.snapshot("base", "b1").unwrap();
    let c1 = p.clone_snapshot("b1", "c1").unwrap();
    assert_eq!(p.usage().used_bytes, 8 * CS, "a clone shares every chunk");
    c1.write_at(CS + 10, &[2u8; 100]).unwrap();
    p.snapshot("c1", "c1s").unwrap();
    let c2 = p.clone_snapshot("c1s", "c2").unwrap();
    c2.write_at(2 * CS, &[3u8; 10]).unwrap();
    v.write_at(0, &[9u8; 10]).unwrap();
    assert_eq!(read(&c2, CS + 10, 100), vec![2u8; 100]);
    assert_eq!(read(&c2, 2 * CS, 11), [vec![3u8; 10], vec![1u8]].concat());
    assert_eq!(read(&c2, 0, 10), vec![1u8; 10]);
    assert_eq!(read(&c1, 2 * CS, 10), vec![1u8; 10]);
    assert_eq!(read(&v, 0, 11), [vec![9u8; 10], vec![1u8]].concat());
    let err = p.delete_snapshot("b1").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InUse);
    assert!(err.to_string().contains("c1"), "{err}");
    assert_eq!(p.delete_volume("c1").unwrap_err().kind(), ErrorKind::InUse);
    assert_eq!(p.verify().unwrap(), Vec::<String>::new());
    drop((v, c1, c2));
    drop(p);
    let p = Pool::open(dir.path().join("p")).unwrap();
    assert_eq!(p.verify().unwrap(), Vec::<String>::new());
    assert_eq!(read(&p.volume("c2").unwrap(), CS + 10, 100), vec![2u8; 100]);
    p.delete_volume("c2").unwrap();
    p.delete_snapshot("c1s").unwrap();
    p.delete_volume("c1").unwrap();
    p.delete_snapshot("b1").unwrap();
    assert_eq!(p.verify().unwrap(), Vec::<String>::new());
    assert_eq!(p.usage().used_bytes, 8 * CS);
}

#[test]
fn changed_ranges_between_snapshots_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(&dir);
    let v = p.create_volume("v", 32 * CS).unwrap();
    v.write_at(0, &vec![1u8; (32 * CS) as usize]).unwrap();
    p.snapshot("v", "a").unwrap();
    v.write_at(3 * CS + 5, &[2u8; 10]).unwrap();
    v.write_at(4 * CS, &[2u8; 10]).unwrap();
    v.trim(10 * CS, CS).unwrap();
    p.snapshot("v", "b").unwrap();
    v.write_at(20 * CS + 1, &[3u8; 1]).unwrap();
    assert_eq!(
        p.changed_between("v", "a", Some("b")).unwrap(),
        vec![3 * CS..5 * CS, 10 * CS..11 * CS]
    );
    assert_eq!(v.changed_since(&p, "b").unwrap(), vec![20 * CS..21 * CS]);
    assert_eq!(
        v.changed_since(&p, "a").unwrap(),
        vec![3 * CS..5 * CS, 10 * CS..11 * CS, 20 * CS..21 * CS]
    );
    drop(v);
    drop(p);
    let p = Pool::open(dir.path().join("p")).unwrap();
    assert_eq!(
        p.changed_between("v", "a", Some("b")).unwrap(),
        vec![3 * CS..5 * CS, 10 * CS..11 * CS]
    );
    assert_eq!(
        p.changed_between("v", "b", None).unwrap(),
        vec![20 * CS..21 * CS]
    );
    assert_eq!(
        p.changed_between("v", "b", Some("a")).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
}

#[test]
fn no_space_is_a_clear_error_and_recovers_after_freeing() {
    let dir = tempfile::tempdir().unwrap();
    let p = Pool::create(
        dir.path().join("p"),
        PoolOptions {
            chunk_size: CS as u32,
            limit_bytes: Some(8 * CS),
        },
    )
    .unwrap();
    let v = p.create_volume("v", 64 * CS).unwrap();
    let mut written = 0;
    let err = loop {
        match v.write_at(written * CS, &vec![written as u8 + 1; CS as usize]) {
            Ok(()) => written += 1,
            Err(e) => break e,
        }
    };
    assert_eq!(err.kind(), ErrorKind::NoSpace);
    assert_eq!(written, 8);
    assert!(err.to_string().contains("volume v"), "{err}");
    // Overwrites in place still work, data is intact.
    v.write_at(0, &[7u8; 10]).unwrap();
    for i in 1..8u64 {
        assert_eq!(
            read(&v, i * CS, CS as usize),
            vec![i as u8 + 1; CS as usize]
        );
    }
    assert_eq!(read(&v, 8 * CS, 10), vec![0u8; 10]);
    v.trim(2 * CS, 2 * CS).unwrap();
    v.flush().unwrap();
    v.write_at(8 * CS, &[5u8; 100]).unwrap();
    assert_eq!(read(&v, 8 * CS, 100), vec![5u8; 100]);
    assert_eq!(read(&v, 2 * CS, 100), vec![0u8; 100]);
    assert_eq!(p.verify().unwrap(), Vec::<String>::new());
    p.set_limit(None).unwrap();
    v.write_at(30 * CS, &vec![1u8; (4 * CS) as usize]).unwrap();
}

#[test]
fn space_accounting_and_allocation_map() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(&dir);
    let v = p.create_volume("v", 10 * CS).unwrap();
    v.write_at(0, &vec![1u8; (4 * CS) as usize]).unwrap();
    let s = p.volume_space("v").unwrap();
    assert_eq!(
        (s.exclusive_bytes, s.shared_bytes, s.snapshot_only_bytes),
        (4 * CS, 0, 0)
    );
    p.snapshot("v", "s").unwrap();
    v.write_at(0, &[2u8; 1]).unwrap(); // copy on write of chunk 0
    let s = p.volume_space("v").unwrap();
    assert_eq!(
        (s.exclusive_bytes, s.shared_bytes, s.snapshot_only_bytes),
        (CS, 3 * CS, CS)
    );
    assert_eq!(p.usage().used_bytes, 5 * CS);
    v.trim(CS, CS).unwrap();
    v.write_zeroes(2 * CS, CS, true).unwrap();
    let ext = v.allocation(0, 10 * CS).unwrap();
    let kinds: Vec<(u64, u64, ExtentKind)> =
        ext.iter().map(|e| (e.offset, e.length, e.kind)).collect();
    assert_eq!(
        kinds,
        vec![
            (0, CS, ExtentKind::Data),
            (CS, CS, ExtentKind::Zero),
            (2 * CS, 2 * CS, ExtentKind::Data),
            (4 * CS, 6 * CS, ExtentKind::Hole)
        ]
    );
    assert_eq!(read(&v, CS, 10), vec![0u8; 10]);
    assert_eq!(read(&v, 2 * CS, 10), vec![0u8; 10]);
    p.delete_snapshot("s").unwrap();
    assert_eq!(p.verify().unwrap(), Vec::<String>::new());
}

#[test]
fn read_profile_records_first_reads_and_persists() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(&dir);
    let v = p.create_volume("v", 64 * CS).unwrap();
    read(&v, 0, 1);
    v.start_read_profile(ProfileLimit::Reads(6));
    for c in [5u64, 6, 7, 2, 6, 30, 40, 41] {
        read(&v, c * CS, 10);
    }
    assert!(!v.read_profile_active() || v.read_profile().len() == 4);
    assert_eq!(v.read_profile(), vec![5..8, 2..3, 30..31]);
    v.flush().unwrap();
    drop(v);
    drop(p);
    let p = Pool::open(dir.path().join("p")).unwrap();
    assert_eq!(
        p.volume("v").unwrap().read_profile(),
        vec![5..8, 2..3, 30..31]
    );
}

#[test]
fn a_set_read_profile_replaces_recording_and_persists() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(&dir);
    let v = p.create_volume("v", 64 * CS).unwrap();
    v.start_read_profile(ProfileLimit::Reads(100));
    read(&v, 9 * CS, 1);
    // Order kept; repeats and chunks past the end dropped; recording stops.
    v.set_read_profile(&[12..14, 3..4, 13..15, 63..70]);
    assert!(!v.read_profile_active());
    read(&v, 20 * CS, 1);
    assert_eq!(v.read_profile(), vec![12..14, 3..4, 14..15, 63..64]);
    v.flush().unwrap();
    drop(v);
    drop(p);
    let p = Pool::open(dir.path().join("p")).unwrap();
    assert_eq!(
        p.volume("v").unwrap().read_profile(),
        vec![12..14, 3..4, 14..15, 63..64]
    );
}

#[test]
fn group_snapshot_is_atomic_under_concurrent_writes() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(&dir);
    let a = p.create_volume("a", 4 * CS).unwrap();
    let b = p.create_volume("b", 4 * CS).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (a, b, stop) = (a.clone(), b.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 1u64;
            while !stop.load(Ordering::Relaxed) {
                a.write_at(0, &i.to_le_bytes()).unwrap();
                b.write_at(CS, &i.to_le_bytes()).unwrap();
                i += 1;
            }
        })
    };
    for g in 0..40 {
        p.group_snapshot(
            &format!("g{g}"),
            &[("a", &format!("a{g}")), ("b", &format!("b{g}"))],
        )
        .unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    for g in 0..40 {
        let mut x = [0u8; 8];
        let mut y = [0u8; 8];
        p.open_snapshot(&format!("a{g}"))
            .unwrap()
            .read_at(0, &mut x)
            .unwrap();
        p.open_snapshot(&format!("b{g}"))
            .unwrap()
            .read_at(CS, &mut y)
            .unwrap();
        let (x, y) = (u64::from_le_bytes(x), u64::from_le_bytes(y));
        assert!(x == y || x == y + 1, "group g{g}: a={x} b={y}");
    }
    assert_eq!(
        p.snapshots()
            .iter()
            .filter(|s| s.group.as_deref() == Some("g3"))
            .count(),
        2
    );
    assert_eq!(p.verify().unwrap(), Vec::<String>::new());
}

#[test]
fn many_threads_read_and_write_while_snapshots_come_and_go() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(&dir);
    let v = p.create_volume("v", 256 * CS).unwrap();
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let v = v.clone();
            std::thread::spawn(move || {
                // Thread t owns chunks t, t+4, ... and writes unaligned pieces.
                for round in 0..40u64 {
                    for c in (t..256).step_by(4).take(16) {
                        let val = (round * 7 + t) as u8;
                        v.write_at(c * CS + 123, &[val; 2000]).unwrap();
                        let mut b = vec![0u8; 2000];
                        v.read_at(c * CS + 123, &mut b).unwrap();
                        assert_eq!(b, vec![val; 2000]);
                    }
                    if round % 10 == 0 {
                        v.flush().unwrap();
                    }
                }
            })
        })
        .collect();
    for i in 0..20 {
        p.snapshot("v", &format!("s{i}")).unwrap();
        if i >= 2 {
            p.delete_snapshot(&format!("s{}", i - 2)).unwrap();
        }
    }
    for t in threads {
        t.join().unwrap();
    }
    for t in 0..4u64 {
        for c in (t..256).step_by(4).take(16) {
            assert_eq!(read(&v, c * CS + 123, 2000), vec![(39 * 7 + t) as u8; 2000]);
        }
    }
    assert_eq!(p.verify().unwrap(), Vec::<String>::new());
}

/// `len` bytes of a pattern that differs per call (`seed`), starting at a
/// `DIRECT_ALIGN`-aligned address of the returned vector (plus `skew`).
fn aligned(len: usize, seed: u64, skew: usize) -> (Vec<u8>, usize) {
    let mut mem = vec![0u8; len + 2 * ferry_pool::DIRECT_ALIGN];
    let at = mem.as_ptr().align_offset(ferry_pool::DIRECT_ALIGN) + skew;
    let mut x = seed | 1;
    for b in &mut mem[at..at + len] {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    (mem, at)
}

#[test]
fn direct_writes_read_back_keep_snapshots_and_survive_reopen() {
    const C: u64 = 64 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p");
    let p = Pool::create(&path, PoolOptions::default()).unwrap();
    let v = p.create_volume("v", 1024 * C).unwrap();
    let mut expect = vec![0u8; 1024 * C as usize];
    let put = |expect: &mut Vec<u8>, v: &ferry_pool::Volume, off: u64, data: &[u8]| {
        v.write_direct(off, data).unwrap();
        expect[off as usize..off as usize + data.len()].copy_from_slice(data);
    };
    // New chunks, in runs longer than one direct write.
    let (m, at) = aligned(300 * C as usize, 1, 0);
    put(&mut expect, &v, 0, &m[at..at + 300 * C as usize]);
    // Unaligned buffer and partial chunks: the ordinary path.
    let (m, at) = aligned(40 * C as usize, 2, 1);
    put(&mut expect, &v, 400 * C, &m[at..at + 40 * C as usize]);
    let (m, at) = aligned(5000, 3, 0);
    put(&mut expect, &v, 500 * C + 300, &m[at..at + 5000]);
    // Overwrite in place chunks whose pages the page cache holds (read
    // just before): the read after the direct write sees the new data.
    assert_eq!(
        read(&v, 10 * C, 20 * C as usize),
        expect[10 * C as usize..30 * C as usize]
    );
    let (m, at) = aligned(20 * C as usize, 4, 0);
    put(&mut expect, &v, 10 * C, &m[at..at + 20 * C as usize]);
    assert_eq!(read(&v, 0, 1024 * C as usize), expect);
    // After a snapshot, direct writes copy on write; the snapshot keeps
    // the old content.
    p.snapshot("v", "s").unwrap();
    let before = expect.clone();
    let (m, at) = aligned(64 * C as usize, 5, 0);
    put(&mut expect, &v, 0, &m[at..at + 64 * C as usize]);
    let snap = p.open_snapshot("s").unwrap();
    let mut b = vec![0u8; 1024 * C as usize];
    snap.read_at(0, &mut b).unwrap();
    assert_eq!(b, before);
    assert_eq!(read(&v, 0, 1024 * C as usize), expect);
    v.flush().unwrap();
    assert_eq!(p.verify().unwrap(), Vec::<String>::new());
    drop((v, snap, p));
    let p = Pool::open(&path).unwrap();
    let v = p.volume("v").unwrap();
    assert_eq!(read(&v, 0, 1024 * C as usize), expect);
    assert_eq!(p.verify().unwrap(), Vec::<String>::new());
}

/// `try_write_at` writes only overwrites in place that wait for nothing;
/// everything else is left (untouched) to `write_at`. Large buffered
/// writes (written to the data file in pieces) read back whole.
/// An overwrite in place that waits for nothing, made with `try_write_at`
/// or (`spliced`) with `try_write_spliced`, whose runs are written here
/// from `data` as a server's pipe would write them: in order, `fill` never
/// called when the write is declined.
fn try_write(v: &Volume, off: u64, data: &[u8], spliced: bool) -> Option<ferry_pool::Result<()>> {
    if !spliced {
        return v.try_write_at(off, data);
    }
    let mut done = 0usize;
    let mut fill = |fd: std::os::fd::BorrowedFd<'_>, at: u64, n: usize| {
        let f = std::fs::File::from(fd.try_clone_to_owned()?);
        std::os::unix::fs::FileExt::write_all_at(&f, &data[done..done + n], at)?;
        done += n;
        Ok(())
    };
    let r = v.try_write_spliced(off, data.len(), &mut fill);
    match &r {
        Some(Ok(())) => assert_eq!(done, data.len(), "every byte handed to fill"),
        None => assert_eq!(done, 0, "declined: fill not called"),
        Some(Err(_)) => {}
    }
    r
}

#[test]
fn try_write_writes_only_in_place_and_leaves_the_rest_untouched() {
    try_write_in_place(false);
}

#[test]
fn a_spliced_write_writes_only_in_place_and_leaves_the_rest_untouched() {
    try_write_in_place(true);
}

fn try_write_in_place(spliced: bool) {
    const C: u64 = 64 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p");
    let p = Pool::create(&path, PoolOptions::default()).unwrap();
    let v = p.create_volume("v", 64 * C).unwrap();
    // Unallocated: declined, nothing written.
    assert!(try_write(&v, 0, &[1u8; 4096], spliced).is_none());
    assert_eq!(read(&v, 0, 4096), vec![0u8; 4096]);
    // A large buffered write (more than one data-file piece), then
    // overwrites in place, unaligned and across chunks.
    let big: Vec<u8> = (0..32 * C as usize).map(|i| (i % 253) as u8).collect();
    v.write_at(0, &big).unwrap();
    let mut expect = big.clone();
    expect.resize(64 * C as usize, 0);
    assert_eq!(read(&v, 0, 64 * C as usize), expect);
    for (off, len, byte) in [
        (100u64, 4096usize, 7u8),
        (C - 10, 30, 8),
        (3 * C, 2 * C as usize, 9),
    ] {
        try_write(&v, off, &vec![byte; len], spliced)
            .expect("in place")
            .unwrap();
        expect[off as usize..off as usize + len].fill(byte);
    }
    assert_eq!(read(&v, 0, 64 * C as usize), expect);
    // Beyond the end: an error, not a decline.
    assert!(
        try_write(&v, 64 * C - 10, &[1u8; 20], spliced)
            .unwrap()
            .is_err()
    );
    // Partly unallocated: declined, the allocated part untouched too.
    assert!(try_write(&v, 32 * C - 100, &[5u8; 200], spliced).is_none());
    // After a snapshot the chunks are shared: declined; the blocking write
    // copies on write and the snapshot keeps the old content.
    p.snapshot("v", "s").unwrap();
    assert!(try_write(&v, 100, &[6u8; 10], spliced).is_none());
    v.write_at(100, &[6u8; 10]).unwrap();
    let before = expect.clone();
    expect[100..110].fill(6);
    // The copied chunk is the volume's own now: in place again.
    try_write(&v, 200, &[4u8; 10], spliced)
        .expect("in place")
        .unwrap();
    expect[200..210].fill(4);
    // Chunks copied in reverse order lie in the data file the other way
    // round: a write across them is not one run of the file.
    v.write_at(2 * C + 1, &[2u8; 3]).unwrap();
    v.write_at(C + 1, &[1u8; 3]).unwrap();
    expect[2 * C as usize + 1..2 * C as usize + 4].fill(2);
    expect[C as usize + 1..C as usize + 4].fill(1);
    try_write(&v, 2 * C - 50, &[3u8; 100], spliced)
        .expect("in place")
        .unwrap();
    expect[2 * C as usize - 50..2 * C as usize + 50].fill(3);
    let snap = p.open_snapshot("s").unwrap();
    let mut b = vec![0u8; 64 * C as usize];
    snap.read_at(0, &mut b).unwrap();
    assert_eq!(b, before);
    assert_eq!(read(&v, 0, 64 * C as usize), expect);
    drop(snap);
    durable(p, v, &path, &expect);
}

/// Flushes `v`, verifies the pool, and reads `v` back as `expect` after
/// reopening the pool.
fn durable(p: Pool, v: Volume, path: &std::path::Path, expect: &[u8]) {
    v.flush().unwrap();
    assert_eq!(p.verify().unwrap(), Vec::<String>::new());
    drop((v, p));
    let p = Pool::open(path).unwrap();
    assert_eq!(read(&p.volume("v").unwrap(), 0, expect.len()), expect);
}

#[test]
fn whole_chunks_are_written_into_new_space_without_blocking() {
    const C: u64 = 64 * 1024;
    for spliced in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p");
        let opts = PoolOptions {
            limit_bytes: Some(8 * C),
            ..PoolOptions::default()
        };
        let p = Pool::create(&path, opts).unwrap();
        let v = p.create_volume("v", 64 * C).unwrap();
        // Whole chunks and a partial one after them: declined (the partial
        // one needs new space and a copy), nothing written or allocated.
        assert!(try_write(&v, 0, &pattern(3 * C as usize + 10, 1), spliced).is_none());
        assert_eq!(p.usage().used_bytes, 0);
        // Whole chunks: written into new space.
        let a = pattern(3 * C as usize, 2);
        try_write(&v, C, &a, spliced).expect("new space").unwrap();
        assert_eq!(p.usage().used_bytes, 3 * C);
        let mut expect = vec![0u8; 64 * C as usize];
        expect[C as usize..4 * C as usize].copy_from_slice(&a);
        // Over a snapshot: whole chunks go to new space, the snapshot keeps
        // the old ones; a partial chunk it holds is copied on a thread.
        p.snapshot("v", "s").unwrap();
        let before = expect.clone();
        let b = pattern(2 * C as usize, 3);
        try_write(&v, 2 * C, &b, spliced)
            .expect("new space")
            .unwrap();
        expect[2 * C as usize..4 * C as usize].copy_from_slice(&b);
        assert!(try_write(&v, C + 5, &[1u8; 10], spliced).is_none());
        // More than the pool has room for (5 of 8 chunks used): declined,
        // nothing allocated.
        assert!(try_write(&v, 10 * C, &pattern(4 * C as usize, 4), spliced).is_none());
        assert_eq!(p.usage().used_bytes, 5 * C);
        assert_eq!(read(&v, 0, 64 * C as usize), expect);
        let snap = p.open_snapshot("s").unwrap();
        let mut got = vec![0u8; 64 * C as usize];
        snap.read_at(0, &mut got).unwrap();
        assert_eq!(got, before);
        let mut data: Vec<(u64, u64)> = Vec::new();
        for e in v.allocation(0, 64 * C).unwrap() {
            match data.last_mut() {
                Some(d) if e.kind == ExtentKind::Data && d.0 + d.1 == e.offset => d.1 += e.length,
                _ if e.kind == ExtentKind::Data => data.push((e.offset, e.length)),
                _ => {}
            }
        }
        assert_eq!(data, vec![(C, 3 * C)]);
        // Durable after a flush, like any write.
        drop(snap);
        durable(p, v, &path, &expect);
    }
}

#[test]
fn a_failed_write_into_new_space_gives_the_space_back() {
    const C: u64 = 64 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let p = Pool::create(dir.path().join("p"), PoolOptions::default()).unwrap();
    let v = p.create_volume("v", 64 * C).unwrap();
    // In place first, then new space: both runs' chunks stay as they were.
    v.write_at(0, &pattern(C as usize, 5)).unwrap();
    let used = p.usage().used_bytes;
    let mut calls = 0;
    let mut fill = |_: std::os::fd::BorrowedFd<'_>, _: u64, _: usize| {
        calls += 1;
        Err(std::io::Error::other("the pipe broke"))
    };
    let r = v
        .try_write_spliced(0, 4 * C as usize, &mut fill)
        .expect("tried");
    assert!(r.is_err());
    assert_eq!(calls, 1, "nothing written after the failed run");
    assert_eq!(p.usage().used_bytes, used, "the new chunks given back");
    let mut expect = pattern(C as usize, 5);
    expect.resize(4 * C as usize, 0);
    assert_eq!(read(&v, 0, 4 * C as usize), expect);
    v.flush().unwrap();
    assert_eq!(p.verify().unwrap(), Vec::<String>::new());
}

// Reads handed out as places in the mapped data file: their bytes, when
// they are refused, and freed chunks kept from reuse while being sent.

/// The bytes under a mapped read. Only a test may look at them from Rust:
/// nothing writes the pool meanwhile.
fn bytes(m: &ferry_pool::MappedRead) -> Vec<u8> {
    let mut v = Vec::new();
    for &(addr, len) in m.ranges() {
        // SAFETY: the range is inside the pool's mapping, which `m` keeps
        // mapped, and inside the data file (data chunks only); no thread
        // writes the file during this test's call.
        v.extend_from_slice(unsafe { std::slice::from_raw_parts(addr as *const u8, len) });
    }
    v
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
}

/// Bytes of `file` in the page cache (`fincore`, util-linux).
fn cached(file: &std::path::Path) -> u64 {
    let out = std::process::Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(file)
        .output()
        .expect("fincore (util-linux) is installed");
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("fincore said {text:?}"))
}

#[test]
fn released_pages_leave_the_page_cache_and_nothing_else_changes() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(&dir);
    let data_file = dir.path().join("p").join(ferry_pool::DATA_FILE);
    let v = p.create_volume("v", 4096 * CS).unwrap();
    // 8 MiB of data, then a hole, then 4 MiB more; another volume's chunks
    // written in between (its pages must stay).
    let a = pattern(2048 * CS as usize, 0x11);
    v.write_at(0, &a).unwrap();
    let w = p.create_volume("w", 1024 * CS).unwrap();
    let b = pattern(1024 * CS as usize, 0x22);
    w.write_at(0, &b).unwrap();
    let c = pattern(1024 * CS as usize, 0x33);
    v.write_at(3072 * CS, &c).unwrap();
    v.flush().unwrap();
    let before = cached(&data_file);
    assert!(
        before >= 16 << 20,
        "{before} bytes cached after writing 16 MiB"
    );
    // Released: v's pages (out of range and holes are no matter) go; w's stay.
    v.release_cached(0, 4096 * CS);
    v.release_cached(4096 * CS, CS);
    let after = cached(&data_file);
    assert!(
        (3 << 20..=5 << 20).contains(&after),
        "{after} bytes cached after releasing 12 of 16 MiB"
    );
    // The data reads back the same; the released pages come back with it.
    assert_eq!(read(&v, 0, a.len()), a);
    assert_eq!(read(&v, 3072 * CS, c.len()), c);
    assert_eq!(read(&w, 0, b.len()), b);
    // Pages not written out yet are not dropped: nothing is lost.
    let d = pattern(256 * CS as usize, 0x44);
    v.write_at(1024 * CS, &d).unwrap();
    v.release_cached(0, 4096 * CS);
    assert_eq!(read(&v, 1024 * CS, d.len()), d);
    v.flush().unwrap();
    drop((v, w, p));
    let p = Pool::open(dir.path().join("p")).unwrap();
    let v = p.volume("v").unwrap();
    assert_eq!(read(&v, 1024 * CS, d.len()), d);
    assert_eq!(read(&v, 0, 1024 * CS as usize), a[..1024 * CS as usize]);
    assert_eq!(p.verify().unwrap(), Vec::<String>::new());
}

#[test]
fn written_behind_pages_leave_the_page_cache_without_a_flush() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(&dir);
    let data_file = dir.path().join("p").join(ferry_pool::DATA_FILE);
    let v = p.create_volume("v", 8192 * CS).unwrap();
    // Six pieces of 4 MiB, each written behind once written, no flush:
    // all but the last few MiB are written out and their pages let go.
    let pieces: Vec<Vec<u8>> = (0..6)
        .map(|i| pattern(1024 * CS as usize, 0x50 + i))
        .collect();
    for (i, piece) in pieces.iter().enumerate() {
        let at = i as u64 * 1024 * CS;
        v.write_at(at, piece).unwrap();
        v.write_behind(&[(at, 1024 * CS)]);
    }
    let left = cached(&data_file);
    assert!(
        left <= 9 << 20,
        "{left} bytes cached after writing 24 MiB behind (at most 8 MiB are left being written)"
    );
    // The data reads back; a flush and a reopen keep it.
    for (i, piece) in pieces.iter().enumerate() {
        assert_eq!(&read(&v, i as u64 * 1024 * CS, piece.len()), piece);
    }
    // Out of range or holes: nothing to write out, no error.
    v.write_behind(&[(8192 * CS, CS), (7000 * CS, CS)]);
    v.flush().unwrap();
    drop((v, p));
    let p = Pool::open(dir.path().join("p")).unwrap();
    let v = p.volume("v").unwrap();
    for (i, piece) in pieces.iter().enumerate() {
        assert_eq!(&read(&v, i as u64 * 1024 * CS, piece.len()), piece);
    }
    assert_eq!(p.verify().unwrap(), Vec::<String>::new());
}

#[test]
fn started_writeback_leaves_no_page_dirty_and_keeps_them_cached() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(&dir);
    let data_file = dir.path().join("p").join(ferry_pool::DATA_FILE);
    let v = p.create_volume("v", 4096 * CS).unwrap();
    let a = pattern(1024 * CS as usize, 0x61);
    let b = pattern(1024 * CS as usize, 0x62);
    v.write_at(0, &a).unwrap();
    v.write_at(2048 * CS, &b).unwrap();
    // The kernel writes dirty pages out after 30 s, or at once when much
    // of the machine's memory is dirty: most are dirty now, unless so.
    let before = page_states(&data_file).unwrap();
    v.start_writeback(0, 1024 * CS);
    v.start_writeback(2048 * CS, 1024 * CS);
    // Out of range or a hole: nothing to write out, no error.
    v.start_writeback(8192 * CS, CS);
    v.start_writeback(1500 * CS, CS);
    // Every page was sent to the disk (written or being written): none
    // is dirty, with no flush; unlike a write behind, all stay cached.
    let after = page_states(&data_file).unwrap();
    assert_eq!(after.dirty, 0, "{before:?} before, {after:?} after");
    assert!(after.cached >= 2048, "{after:?}");
    assert_eq!(read(&v, 0, a.len()), a);
    assert_eq!(read(&v, 2048 * CS, b.len()), b);
    // Durable after a flush, as any write.
    v.flush().unwrap();
    drop((v, p));
    let p = Pool::open(dir.path().join("p")).unwrap();
    let v = p.volume("v").unwrap();
    assert_eq!(read(&v, 0, a.len()), a);
    assert_eq!(read(&v, 2048 * CS, b.len()), b);
    assert_eq!(p.verify().unwrap(), Vec::<String>::new());
}

#[test]
fn a_mapped_read_holds_the_volumes_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(&dir);
    let v = p.create_volume("v", 64 * CS).unwrap();
    let data = pattern(40 * CS as usize, 0x5a);
    v.write_at(3 * CS, &data).unwrap();
    // Another volume's chunks in between, so the read spans several runs.
    let w = p.create_volume("w", 64 * CS).unwrap();
    w.write_at(0, &pattern(CS as usize, 1)).unwrap();
    v.write_at(60 * CS, &pattern(2 * CS as usize, 2)).unwrap();
    let m = v.try_read_mapped(3 * CS + 100, 30 * CS).unwrap();
    assert_eq!(bytes(&m), data[100..100 + 30 * CS as usize]);
    let mut got = vec![0u8; 30 * CS as usize];
    m.read_into(&mut got).unwrap();
    assert_eq!(got, data[100..100 + 30 * CS as usize]);
    // Before the flush too: the data file holds acknowledged writes.
    let m2 = v.try_read_mapped(60 * CS + 1, CS).unwrap();
    assert_eq!(bytes(&m2), pattern(2 * CS as usize, 2)[1..1 + CS as usize]);
    p.flush().unwrap();
    assert_eq!(bytes(&m), data[100..100 + 30 * CS as usize]);
}

#[test]
fn holes_zeroes_and_bad_ranges_are_read_the_ordinary_way() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(&dir);
    let v = p.create_volume("v", 16 * CS).unwrap();
    v.write_at(0, &pattern(4 * CS as usize, 3)).unwrap();
    v.write_zeroes(2 * CS, CS, false).unwrap();
    assert!(v.try_read_mapped(0, 2 * CS).is_some());
    assert!(v.try_read_mapped(CS, 2 * CS).is_none(), "a zeroed chunk");
    assert!(v.try_read_mapped(3 * CS, 2 * CS).is_none(), "a hole");
    assert!(v.try_read_mapped(0, 0).is_none());
    assert!(
        v.try_read_mapped(15 * CS, 2 * CS).is_none(),
        "beyond the end"
    );
    p.delete_volume("v").unwrap();
    assert!(v.try_read_mapped(0, CS).is_none(), "a deleted volume");
    p.verify_clean().unwrap();
}

#[test]
fn a_freed_chunk_being_sent_is_not_reused_until_the_send_ends() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(&dir);
    let a = p.create_volume("a", 4 * CS).unwrap();
    a.write_at(0, &vec![0xaa; CS as usize]).unwrap();
    p.flush().unwrap();
    let m = a.try_read_mapped(0, CS).unwrap();
    let at = m.ranges()[0].0;
    // Freed and committed while the read is being sent: in limbo.
    a.trim(0, CS).unwrap();
    p.flush().unwrap();
    p.verify_clean().unwrap();
    let b = p.create_volume("b", 4 * CS).unwrap();
    b.write_at(0, &vec![0xbb; CS as usize]).unwrap();
    p.flush().unwrap();
    let mb = b.try_read_mapped(0, CS).unwrap();
    assert_ne!(mb.ranges()[0].0, at, "the pinned chunk was reused");
    // The chunk was punched out; never the other volume's bytes.
    assert!(bytes(&m).iter().all(|&x| x == 0xaa || x == 0));
    let a2 = p.create_volume("a2", 4 * CS).unwrap();
    drop(m);
    p.verify_clean().unwrap();
    // Free again: the next new chunk is that one (the lowest free).
    a2.write_at(0, &vec![0xcc; CS as usize]).unwrap();
    let mc = a2.try_read_mapped(0, CS).unwrap();
    assert_eq!(mc.ranges()[0].0, at);
    assert_eq!(bytes(&mc), vec![0xcc; CS as usize]);
    drop((mb, mc));
    p.flush().unwrap();
    p.verify_clean().unwrap();
}

#[test]
fn a_chunk_pinned_twice_is_free_after_the_second_unpin() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(&dir);
    let a = p.create_volume("a", 4 * CS).unwrap();
    a.write_at(0, &vec![0xaa; CS as usize]).unwrap();
    let m1 = a.try_read_mapped(0, CS).unwrap();
    let m2 = a.try_read_mapped(0, CS).unwrap();
    let at = m1.ranges()[0].0;
    p.delete_volume("a").unwrap();
    let b = p.create_volume("b", 4 * CS).unwrap();
    drop(m1);
    b.write_at(0, &vec![0xbb; CS as usize]).unwrap();
    assert_ne!(b.try_read_mapped(0, CS).unwrap().ranges()[0].0, at);
    drop(m2);
    b.write_at(CS, &vec![0xbb; CS as usize]).unwrap();
    assert_eq!(b.try_read_mapped(CS, CS).unwrap().ranges()[0].0, at);
    p.verify_clean().unwrap();
}

/// A snapshot's mapped read, as a copy hashes and sends it in place.
fn in_place(s: &ferry_pool::Snapshot, off: u64, len: u64) -> Option<Vec<u8>> {
    let c = s.try_read_mapped(off, len)?.into_cached().ok()?;
    Some(c.pieces().flatten().copied().collect())
}

#[test]
fn a_snapshots_cached_read_holds_its_frozen_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(&dir);
    let v = p.create_volume("v", 64 * CS).unwrap();
    let old = pattern(8 * CS as usize, 0x21);
    v.write_at(2 * CS, &old).unwrap();
    v.write_at(30 * CS, &pattern(CS as usize, 0x30)).unwrap();
    p.snapshot("v", "s").unwrap();
    let s = p.open_snapshot("s").unwrap();
    let m = in_place(&s, 2 * CS + 7, 6 * CS).expect("cached after the write");
    // The volume moves on; the snapshot's bytes, read in place, do not.
    v.write_at(2 * CS, &pattern(8 * CS as usize, 0x77)).unwrap();
    p.flush().unwrap();
    assert_eq!(m, old[7..7 + 6 * CS as usize]);
    assert_eq!(in_place(&s, 2 * CS + 7, 6 * CS).unwrap(), m);
    let mut buf = vec![0u8; 6 * CS as usize];
    s.read_at(2 * CS + 7, &mut buf).unwrap();
    assert_eq!(buf, m);
    // Read with pread from the places it found, as when not cached.
    let mut got = vec![0u8; 6 * CS as usize];
    s.try_read_mapped(2 * CS + 7, 6 * CS)
        .unwrap()
        .read_into(&mut got)
        .unwrap();
    assert_eq!(got, m);
    // Holes, zeroes and bad ranges are read the ordinary way.
    assert!(s.try_read_mapped(CS, 2 * CS).is_none(), "a hole");
    assert!(s.try_read_mapped(0, 0).is_none());
    assert!(
        s.try_read_mapped(63 * CS, 2 * CS).is_none(),
        "beyond the end"
    );
    v.write_zeroes(20 * CS, CS, false).unwrap();
    p.snapshot("v", "z").unwrap();
    let z = p.open_snapshot("z").unwrap();
    assert!(z.try_read_mapped(20 * CS, CS).is_none(), "a zeroed chunk");
    // A volume's own read may change under the reader: never in place.
    assert!(
        v.try_read_mapped(2 * CS, CS)
            .unwrap()
            .into_cached()
            .is_err()
    );
    p.delete_snapshot("s").unwrap();
    assert!(
        s.try_read_mapped(2 * CS, CS).is_none(),
        "a deleted snapshot"
    );
    // Chunks the volume never overwrote are the new snapshot's too; the
    // old handle still refuses them.
    assert!(
        p.open_snapshot("z")
            .unwrap()
            .try_read_mapped(30 * CS, CS)
            .is_some()
    );
    p.snapshot("v", "s").unwrap();
    assert!(
        s.try_read_mapped(30 * CS, CS).is_none(),
        "a new snapshot of the same name"
    );
    p.verify_clean().unwrap();
}

#[test]
fn a_deleted_snapshots_chunks_being_read_are_not_reused_until_the_read_ends() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(&dir);
    let v = p.create_volume("v", 4 * CS).unwrap();
    v.write_at(0, &vec![0xaa; CS as usize]).unwrap();
    p.snapshot("v", "s").unwrap();
    // The volume's next write goes to a new chunk: the old one is the
    // snapshot's alone, freed when it is deleted.
    v.write_at(0, &vec![0xab; CS as usize]).unwrap();
    p.flush().unwrap();
    let s = p.open_snapshot("s").unwrap();
    let c = s
        .try_read_mapped(0, CS)
        .unwrap()
        .into_cached()
        .expect("cached");
    p.delete_snapshot("s").unwrap();
    p.flush().unwrap();
    let w = p.create_volume("w", 4 * CS).unwrap();
    w.write_at(0, &vec![0xbb; CS as usize]).unwrap();
    p.flush().unwrap();
    // Never another volume's bytes under the reader (punched: zeroes).
    let seen: Vec<u8> = c.pieces().flatten().copied().collect();
    assert!(seen.iter().all(|&x| x == 0xaa || x == 0));
    drop(c);
    p.verify_clean().unwrap();
}
