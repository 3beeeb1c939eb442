//! Reads handed out as places in the mapped data file: their bytes, when
//! they are refused, and freed chunks kept from reuse while being sent.

use ferry_pool::{MappedRead, Pool, PoolOptions};

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

/// The bytes under a mapped read. Only a test may look at them from Rust:
/// nothing writes the pool meanwhile.
fn bytes(m: &MappedRead) -> Vec<u8> {
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
