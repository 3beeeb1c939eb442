//! Lazy volumes and the hydrator against a real in-memory image source and
//! three fault-injecting sources (fakes for faults a real source cannot be
//! made to produce on demand): a slow one, a failing one, a flapping one.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_pool::workload::Rng;
use ferry_pool::{
    ChunkSource, ErrorKind, Extent, ExtentKind, Hydrator, HydratorOptions, Pool, PoolOptions,
};

const CS: u64 = 4096;

/// An image held in memory, counting reads per chunk and logging their order.
struct ImageSource {
    data: Vec<u8>,
    reads: Mutex<Vec<u64>>,
}

impl ImageSource {
    fn new(chunks: u64, seed: u64) -> Arc<ImageSource> {
        let mut data = vec![0u8; (chunks * CS) as usize];
        Rng(seed).fill(&mut data);
        // Chunks 3 and 4 are a hole in the source.
        data[(3 * CS) as usize..(5 * CS) as usize].fill(0);
        Arc::new(ImageSource {
            data,
            reads: Mutex::new(Vec::new()),
        })
    }
    fn reads_of(&self, c: u64) -> usize {
        self.reads
            .lock()
            .unwrap()
            .iter()
            .filter(|x| **x == c)
            .count()
    }
}

impl ChunkSource for ImageSource {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.reads.lock().unwrap().push(off / CS);
        buf.copy_from_slice(&self.data[off as usize..off as usize + buf.len()]);
        Ok(())
    }
    fn allocation(&self, off: u64, len: u64) -> Option<Vec<Extent>> {
        let hole = (3 * CS..5 * CS).contains(&off) && off + len <= 5 * CS;
        Some(vec![Extent {
            offset: off,
            length: len,
            kind: if hole {
                ExtentKind::Hole
            } else {
                ExtentKind::Data
            },
        }])
    }
}

/// Fake: every read sleeps (a slow WAN link).
struct SlowSource(Arc<ImageSource>, Duration);
impl ChunkSource for SlowSource {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        std::thread::sleep(self.1);
        self.0.read_at(off, buf)
    }
    fn allocation(&self, off: u64, len: u64) -> Option<Vec<Extent>> {
        self.0.allocation(off, len)
    }
}

/// Fake: fails every read while `broken` is set (a dead peer).
struct FailingSource(Arc<ImageSource>, AtomicBool);
impl ChunkSource for FailingSource {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        if self.1.load(Ordering::Relaxed) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "peer is down",
            ));
        }
        self.0.read_at(off, buf)
    }
}

/// Fake: fails two reads out of three (a flapping link).
struct FlappingSource(Arc<ImageSource>, AtomicU64);
impl ChunkSource for FlappingSource {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        if !self.1.fetch_add(1, Ordering::Relaxed).is_multiple_of(3) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "link flapped",
            ));
        }
        self.0.read_at(off, buf)
    }
}

fn pool_at(dir: &std::path::Path) -> Pool {
    Pool::create(
        dir,
        PoolOptions {
            chunk_size: CS as u32,
            limit_bytes: None,
        },
    )
    .unwrap()
}

fn whole(v: &ferry_pool::Volume) -> Vec<u8> {
    let mut b = vec![0u8; v.size() as usize];
    v.read_at(0, &mut b).unwrap();
    b
}

#[test]
fn concurrent_readers_fetch_a_chunk_once_and_writes_win() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool_at(&dir.path().join("p"));
    let src = ImageSource::new(32, 1);
    let slow = Arc::new(SlowSource(src.clone(), Duration::from_millis(20)));
    let v = p.create_lazy("l", slow).unwrap();
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let v = v.clone();
            std::thread::spawn(move || {
                let mut b = vec![0u8; 100];
                v.read_at(5 * CS + 7, &mut b).unwrap();
                b
            })
        })
        .collect();
    for r in readers {
        assert_eq!(
            r.join().unwrap(),
            src.data[(5 * CS + 7) as usize..(5 * CS + 107) as usize]
        );
    }
    assert_eq!(src.reads_of(5), 1);
    // A hole of the source is not fetched.
    let mut b = vec![1u8; 10];
    v.read_at(3 * CS, &mut b).unwrap();
    assert_eq!(b, vec![0u8; 10]);
    assert_eq!(src.reads_of(3), 0);
    // A partial write to a missing chunk keeps the source's other bytes.
    v.write_at(9 * CS + 10, &[0xee; 5]).unwrap();
    let mut want = src.data[(9 * CS) as usize..(10 * CS) as usize].to_vec();
    want[10..15].fill(0xee);
    let mut got = vec![0u8; CS as usize];
    v.read_at(9 * CS, &mut got).unwrap();
    assert_eq!(got, want);
    // A whole-chunk write is never replaced by a later fetch.
    v.write_at(11 * CS, &vec![0x77; CS as usize]).unwrap();
    let h = Hydrator::start(&v, HydratorOptions::default());
    h.wait().unwrap();
    assert!(!v.is_lazy());
    assert_eq!(src.reads_of(11), 0);
    let mut expect = src.data.clone();
    expect[(9 * CS + 10) as usize..(9 * CS + 15) as usize].fill(0xee);
    expect[(11 * CS) as usize..(12 * CS) as usize].fill(0x77);
    assert_eq!(whole(&v), expect);
    for c in 0..32 {
        assert!(
            src.reads_of(c) <= 1,
            "chunk {c} fetched {} times",
            src.reads_of(c)
        );
    }
    assert_eq!(p.verify().unwrap(), Vec::<String>::new());
    // Hydrated: snapshots work now.
    p.snapshot("l", "after").unwrap();
}

#[test]
fn failing_source_names_the_chunk_and_never_poisons_the_volume() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool_at(&dir.path().join("p"));
    let src = ImageSource::new(16, 2);
    let failing = Arc::new(FailingSource(src.clone(), AtomicBool::new(false)));
    let v = p.create_lazy("l", failing.clone()).unwrap();
    let mut b = vec![0u8; 10];
    v.read_at(0, &mut b).unwrap();
    failing.1.store(true, Ordering::Relaxed);
    let err = v.read_at(6 * CS, &mut b).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Source);
    assert!(err.to_string().contains("chunk 6"), "{err}");
    // Present chunks and writes keep working.
    v.read_at(0, &mut b).unwrap();
    assert_eq!(b, src.data[..10]);
    v.write_at(7 * CS, &vec![1u8; CS as usize]).unwrap();
    assert_eq!(p.snapshot("l", "s").unwrap_err().kind(), ErrorKind::Lazy);
    let h = Hydrator::start(&v, HydratorOptions::default());
    while h.progress().last_error.is_none() {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(!h.progress().done);
    failing.1.store(false, Ordering::Relaxed);
    h.wait().unwrap();
    assert!(!v.is_lazy());
    let mut expect = src.data.clone();
    expect[(7 * CS) as usize..(8 * CS) as usize].fill(1);
    assert_eq!(whole(&v), expect);
    assert_eq!(p.verify().unwrap(), Vec::<String>::new());
}

#[test]
fn flapping_source_is_retried_until_hydrated() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool_at(&dir.path().join("p"));
    let src = ImageSource::new(24, 3);
    let v = p
        .create_lazy(
            "l",
            Arc::new(FlappingSource(src.clone(), AtomicU64::new(0))),
        )
        .unwrap();
    let mut head = vec![0u8; (2 * CS) as usize];
    v.read_at(0, &mut head).unwrap();
    assert_eq!(head, src.data[..(2 * CS) as usize]);
    let h = Hydrator::start(
        &v,
        HydratorOptions {
            priority: vec![20..22, 10..11],
            ..HydratorOptions::default()
        },
    );
    h.wait().unwrap();
    assert!(!v.is_lazy());
    assert_eq!(whole(&v), src.data);
    // The priority chunks were fetched first (after the ones read above).
    let order: Vec<u64> = src.reads.lock().unwrap().clone();
    let first: Vec<u64> = order.iter().copied().filter(|c| *c >= 2).take(3).collect();
    assert_eq!(first, vec![20, 21, 10]);
    assert_eq!(p.verify().unwrap(), Vec::<String>::new());
}

#[test]
fn restart_mid_hydration_resumes_without_refetching() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p");
    let src = ImageSource::new(64, 4);
    {
        let p = pool_at(&path);
        let v = p
            .create_lazy(
                "l",
                Arc::new(SlowSource(src.clone(), Duration::from_millis(2))),
            )
            .unwrap();
        v.write_at(63 * CS, &[9u8; 10]).unwrap();
        v.flush().unwrap();
        let h = Hydrator::start(
            &v,
            HydratorOptions {
                commit_every: 4,
                ..HydratorOptions::default()
            },
        );
        h.pause();
        h.resume();
        while h.progress().present_chunks < 20 {
            std::thread::sleep(Duration::from_millis(2));
        }
        h.stop().unwrap();
        assert!(v.is_lazy());
    }
    let fetched_before: Vec<u64> = src.reads.lock().unwrap().clone();
    let p = Pool::open(&path).unwrap();
    let v = p.volume("l").unwrap();
    assert!(v.is_lazy());
    let (present, total) = v.presence();
    assert!(present >= 20 && present < total, "{present}/{total}");
    let missing = (0..64u64)
        .find(|c| !fetched_before.contains(c) && *c != 63 && *c != 3 && *c != 4)
        .unwrap();
    let mut b = [0u8; 1];
    assert_eq!(
        v.read_at(missing * CS, &mut b).unwrap_err().kind(),
        ErrorKind::SourceDetached
    );
    v.attach_source(src.clone()).unwrap();
    let h = Hydrator::start(&v, HydratorOptions::default());
    h.wait().unwrap();
    for c in 0..64 {
        assert!(
            src.reads_of(c) <= 1,
            "chunk {c} fetched {} times",
            src.reads_of(c)
        );
    }
    let mut expect = src.data.clone();
    expect[(63 * CS) as usize..(63 * CS + 10) as usize].fill(9);
    assert_eq!(whole(&v), expect);
    assert!(!v.is_lazy());
    drop(v);
    drop(p);
    let p = Pool::open(&path).unwrap();
    assert!(!p.volume("l").unwrap().is_lazy());
    assert_eq!(p.verify().unwrap(), Vec::<String>::new());
}

#[test]
fn chain_of_three_lazy_volumes() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool_at(&dir.path().join("p"));
    let q = pool_at(&dir.path().join("q"));
    let src = ImageSource::new(32, 5);
    let a = p.create_lazy("a", src.clone()).unwrap();
    let b = q.create_lazy("b", Arc::new(a.clone())).unwrap();
    let c = p.create_lazy("c", Arc::new(b.clone())).unwrap();
    a.write_at(CS, &[1u8; 10]).unwrap();
    let mut expect = src.data.clone();
    expect[CS as usize..CS as usize + 10].fill(1);
    let mut buf = vec![0u8; CS as usize];
    c.read_at(2 * CS, &mut buf).unwrap();
    assert_eq!(buf, expect[(2 * CS) as usize..(3 * CS) as usize]);
    let hb = Hydrator::start(
        &b,
        HydratorOptions {
            rate_limit: Some(64 * CS),
            ..HydratorOptions::default()
        },
    );
    let hc = Hydrator::start(&c, HydratorOptions::default());
    hc.wait().unwrap();
    assert_eq!(whole(&c), expect);
    hb.wait().unwrap();
    assert_eq!(whole(&b), expect);
    assert!(a.is_lazy() && !b.is_lazy() && !c.is_lazy());
    for c in 0..32 {
        assert!(src.reads_of(c) <= 1);
    }
    assert_eq!(p.verify().unwrap(), Vec::<String>::new());
    assert_eq!(q.verify().unwrap(), Vec::<String>::new());
}

/// A sparse image whose allocation map is exact and not chunk-aligned:
/// data extents, holes, and zero extents next to holes.
struct SparseSource {
    image: ImageSource,
    map: Vec<Extent>,
}

impl ChunkSource for SparseSource {
    fn size(&self) -> u64 {
        self.image.size()
    }
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.image.read_at(off, buf)
    }
    fn allocation(&self, off: u64, len: u64) -> Option<Vec<Extent>> {
        let end = off + len;
        Some(
            self.map
                .iter()
                .filter(|e| e.offset < end && e.offset + e.length > off)
                .map(|e| {
                    let s = e.offset.max(off);
                    Extent {
                        offset: s,
                        length: (e.offset + e.length).min(end) - s,
                        kind: e.kind,
                    }
                })
                .collect(),
        )
    }
}

/// The hydrator settles the source's holes in bulk without reading them,
/// never over a local write racing with it, and the result reads back the
/// same after a reopen.
#[test]
fn holes_are_settled_in_bulk_without_reads_and_writes_win() {
    let chunks = 3000u64; // several lock windows, the last one partial
    let mut rng = Rng(77);
    let mut data = vec![0u8; (chunks * CS) as usize];
    let mut map = Vec::new();
    let mut off = 0u64;
    let mut k = 0u64;
    while off < data.len() as u64 {
        // Unaligned extent lengths: 0.3 to 40 chunks.
        let len = (CS * 3 / 10 + rng.below(40 * CS)).min(data.len() as u64 - off);
        let kind = match k % 3 {
            0 => ExtentKind::Data,
            1 => ExtentKind::Hole,
            _ => ExtentKind::Zero,
        };
        if kind == ExtentKind::Data {
            rng.fill(&mut data[off as usize..(off + len) as usize]);
        }
        map.push(Extent {
            offset: off,
            length: len,
            kind,
        });
        off += len;
        k += 1;
    }
    // Chunks wholly inside holes/zeroes: never to be read.
    let hole_chunk = |c: u64| {
        let (s, e) = (c * CS, (c + 1) * CS);
        let mut covered = s;
        for x in map.iter().filter(|x| x.kind != ExtentKind::Data) {
            if x.offset <= covered && x.offset + x.length > covered {
                covered = x.offset + x.length;
            }
        }
        covered >= e
    };
    let holes: Vec<u64> = (0..chunks).filter(|c| hole_chunk(*c)).collect();
    assert!(holes.len() > 500, "{} hole chunks", holes.len());
    let src = Arc::new(SparseSource {
        image: ImageSource {
            data: data.clone(),
            reads: Mutex::new(Vec::new()),
        },
        map,
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p");
    let p = pool_at(&path);
    let v = p.create_lazy("l", src.clone()).unwrap();
    let mut expect = data.clone();
    let h = Hydrator::start(&v, HydratorOptions::default());
    // Writes into hole chunks while the hydrator settles them.
    let mut w = Rng(78);
    for i in 0..400u64 {
        let c = holes[w.below(holes.len() as u64) as usize];
        let at = c * CS + w.below(CS - 100);
        let buf = [(i % 250 + 1) as u8; 100];
        v.write_at(at, &buf).unwrap();
        expect[at as usize..at as usize + 100].copy_from_slice(&buf);
    }
    h.wait().unwrap();
    assert!(!v.is_lazy());
    let reads = src.image.reads.lock().unwrap().clone();
    for c in &holes {
        assert!(
            !reads.contains(c),
            "hole chunk {c} was read from the source"
        );
    }
    assert_eq!(whole(&v), expect);
    drop(v);
    drop(p);
    let p = Pool::open(&path).unwrap();
    assert_eq!(whole(&p.volume("l").unwrap()), expect);
    assert_eq!(p.verify().unwrap(), Vec::<String>::new());
}
