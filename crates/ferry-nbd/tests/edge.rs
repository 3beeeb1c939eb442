//! Spec edge cases, driven by a raw socket client that speaks the wire
//! format byte by byte (so it can also break it).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use common::TestServer;
use ferry_nbd::proto::*;
use ferry_nbd::{Export, ExportOptions, MemoryExport, Server};

/// A raw client on a unix socket (the default) or TCP.
struct Raw<S = UnixStream> {
    s: S,
}

impl Raw {
    fn connect(t: &TestServer) -> Raw {
        let s = UnixStream::connect(&t.sock).unwrap();
        // A guard against hangs only: every test expects prompt answers.
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        Raw::greeted(s)
    }
}

impl Raw<TcpStream> {
    fn connect_tcp(t: &TestServer) -> Raw<TcpStream> {
        let s = TcpStream::connect(("127.0.0.1", t.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.set_nodelay(true).unwrap();
        Raw::greeted(s)
    }
}

impl<S: Read + Write> Raw<S> {
    fn greeted(mut s: S) -> Raw<S> {
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        assert_eq!(be64(&g[0..8]), NBDMAGIC);
        assert_eq!(be64(&g[8..16]), IHAVEOPT);
        assert_eq!(be16(&g[16..18]), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        s.write_all(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes())
            .unwrap();
        Raw { s }
    }

    fn opt(&mut self, opt: u32, data: &[u8]) {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&opt.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        self.s.write_all(&v).unwrap();
    }

    fn reply(&mut self, opt: u32) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(be64(&h[0..8]), REPLY_MAGIC);
        assert_eq!(be32(&h[8..12]), opt);
        let mut d = vec![0u8; be32(&h[16..20]) as usize];
        self.s.read_exact(&mut d).unwrap();
        (be32(&h[12..16]), d)
    }

    /// GO; returns the final reply type (ACK or an error).
    fn go(&mut self, name: &str) -> u32 {
        let req = InfoRequest {
            name: name.into(),
            infos: vec![INFO_BLOCK_SIZE],
        };
        self.opt(OPT_GO, &req.encode());
        loop {
            let (k, _) = self.reply(OPT_GO);
            if k != REP_INFO {
                return k;
            }
        }
    }

    fn structured(&mut self) {
        self.opt(OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(self.reply(OPT_STRUCTURED_REPLY).0, REP_ACK);
    }

    fn request(
        &mut self,
        kind: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        let mut v = Vec::new();
        Request {
            flags,
            kind,
            cookie,
            offset,
            length,
        }
        .encode(&mut v);
        v.extend_from_slice(payload);
        self.s.write_all(&v).unwrap();
    }

    /// A simple reply: (error, cookie).
    fn simple(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(be32(&h[0..4]), SIMPLE_REPLY_MAGIC);
        (be32(&h[4..8]), be64(&h[8..16]))
    }

    /// A structured chunk: (flags, type, cookie, payload).
    fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(be32(&h[0..4]), STRUCTURED_REPLY_MAGIC);
        let mut d = vec![0u8; be32(&h[16..20]) as usize];
        self.s.read_exact(&mut d).unwrap();
        (be16(&h[4..6]), be16(&h[6..8]), be64(&h[8..16]), d)
    }

    /// True when the server closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

fn server() -> (TestServer, Arc<MemoryExport>) {
    let s = Server::new();
    let m = Arc::new(MemoryExport::new(1 << 20));
    s.add_export("disk", m.clone(), ExportOptions::default())
        .unwrap();
    s.add_export(
        "ro",
        Arc::new(MemoryExport::new(1 << 20).read_only()),
        ExportOptions::default(),
    )
    .unwrap();
    s.add_export(
        "hidden",
        Arc::new(MemoryExport::new(1 << 20)),
        ExportOptions {
            secret: Some("k3y".into()),
            ..Default::default()
        },
    )
    .unwrap();
    (TestServer::start(s), m)
}

#[test]
fn unknown_option_then_go() {
    let (t, _) = server();
    let mut c = Raw::connect(&t);
    c.opt(0x4242, b"whatever");
    assert_eq!(c.reply(0x4242).0, REP_ERR_UNSUP);
    c.opt(OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(c.reply(OPT_EXTENDED_HEADERS).0, REP_ERR_UNSUP);
    c.opt(OPT_STARTTLS, &[]);
    assert_eq!(c.reply(OPT_STARTTLS).0, REP_ERR_UNSUP);
    c.opt(OPT_LIST, b"junk");
    assert_eq!(c.reply(OPT_LIST).0, REP_ERR_INVALID);
    c.opt(OPT_GO, b"\x00\x00");
    assert_eq!(c.reply(OPT_GO).0, REP_ERR_INVALID);
    // SET_META_CONTEXT before structured replies is refused.
    let m = MetaRequest {
        export: "disk".into(),
        queries: vec![CONTEXT_ALLOCATION.into()],
    };
    c.opt(OPT_SET_META_CONTEXT, &m.encode());
    assert_eq!(c.reply(OPT_SET_META_CONTEXT).0, REP_ERR_INVALID);
    assert_eq!(c.go("disk"), REP_ACK);
    c.request(CMD_READ, 0, 1, 0, 512, &[]);
    assert_eq!(c.simple(), (0, 1));
    let mut d = [1u8; 512];
    c.s.read_exact(&mut d).unwrap();
    assert!(d.iter().all(|b| *b == 0));
}

#[test]
fn export_not_found_and_secrets() {
    let (t, _) = server();
    let mut c = Raw::connect(&t);
    assert_eq!(c.go("nope"), REP_ERR_UNKNOWN);
    assert_eq!(c.go("hidden"), REP_ERR_UNKNOWN);
    assert_eq!(c.go("hidden/wrong"), REP_ERR_UNKNOWN);
    assert_eq!(c.go("hidden/k3y"), REP_ACK);
    let mut c = Raw::connect(&t);
    c.opt(OPT_EXPORT_NAME, b"nope");
    assert!(c.closed());
    let mut c = Raw::connect(&t);
    c.opt(OPT_EXPORT_NAME, b"disk");
    let mut h = [0u8; 10];
    c.s.read_exact(&mut h).unwrap();
    assert_eq!(be64(&h[0..8]), 1 << 20);
    c.opt(OPT_ABORT, &[]);
}

#[test]
fn read_only_write_is_eperm_and_stream_stays_in_sync() {
    let (t, _) = server();
    let mut c = Raw::connect(&t);
    assert_eq!(c.go("ro"), REP_ACK);
    c.request(CMD_WRITE, 0, 5, 0, 4096, &[7u8; 4096]);
    assert_eq!(c.simple(), (EPERM, 5));
    c.request(CMD_TRIM, 0, 6, 0, 4096, &[]);
    assert_eq!(c.simple(), (EPERM, 6));
    c.request(CMD_READ, 0, 7, 0, 16, &[]);
    assert_eq!(c.simple(), (0, 7));
}

#[test]
fn out_of_range_and_bad_flags() {
    let (t, m) = server();
    let mut c = Raw::connect(&t);
    c.structured();
    let q = MetaRequest {
        export: "disk".into(),
        queries: vec![CONTEXT_ALLOCATION.into()],
    };
    c.opt(OPT_SET_META_CONTEXT, &q.encode());
    assert_eq!(c.reply(OPT_SET_META_CONTEXT).0, REP_META_CONTEXT);
    assert_eq!(c.reply(OPT_SET_META_CONTEXT).0, REP_ACK);
    assert_eq!(c.go("disk"), REP_ACK);
    let size = 1u64 << 20;
    c.request(CMD_WRITE, 0, 1, size - 100, 200, &[9u8; 200]);
    assert_eq!(c.simple(), (ENOSPC, 1));
    c.request(CMD_WRITE_ZEROES, 0, 2, size, 1, &[]);
    assert_eq!(c.simple(), (ENOSPC, 2));
    c.request(CMD_READ, 0, 3, size - 1, 2, &[]);
    let (f, ty, cookie, d) = c.chunk();
    assert_eq!(
        (f, ty, cookie, be32(&d[0..4])),
        (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 3, EINVAL)
    );
    c.request(CMD_BLOCK_STATUS, 0, 4, size, 1, &[]);
    let (_, ty, _, d) = c.chunk();
    assert_eq!((ty, be32(&d[0..4])), (REPLY_TYPE_ERROR, EINVAL));
    c.request(CMD_READ, 0x8000, 5, 0, 1, &[]);
    let (_, ty, _, d) = c.chunk();
    assert_eq!((ty, be32(&d[0..4])), (REPLY_TYPE_ERROR, EINVAL));
    // The failed write left nothing behind.
    let mut b = [1u8; 100];
    m.read_at(size - 100, &mut b).unwrap();
    assert!(b.iter().all(|x| *x == 0));
    // FAST_ZERO is honoured by the memory backend; block status answers.
    c.request(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 6, 0, 4096, &[]);
    assert_eq!(c.simple(), (0, 6));
    c.request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 7, 0, 1 << 20, &[]);
    let (f, ty, _, d) = c.chunk();
    assert_eq!(
        (f, ty, d.len()),
        (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 12)
    );
}

#[test]
fn structured_read_sends_hole_and_data_chunks() {
    let (t, m) = server();
    m.write_at(64 << 10, &[0xEE; 64 << 10], false).unwrap();
    let mut c = Raw::connect(&t);
    c.structured();
    assert_eq!(c.go("disk"), REP_ACK);
    c.request(CMD_READ, 0, 9, 0, 256 << 10, &[]);
    let mut got = Vec::new();
    loop {
        let (f, ty, cookie, d) = c.chunk();
        assert_eq!(cookie, 9);
        got.push((ty, be64(&d[0..8]), d.len()));
        if f & REPLY_FLAG_DONE != 0 {
            break;
        }
    }
    assert_eq!(
        got,
        vec![
            (REPLY_TYPE_OFFSET_HOLE, 0, 12),
            (REPLY_TYPE_OFFSET_DATA, 64 << 10, 8 + (64 << 10)),
            (REPLY_TYPE_OFFSET_HOLE, 128 << 10, 12),
        ]
    );
    // A shorter read is answered inline from the same map.
    c.request(CMD_READ, 0, 11, 0, 128 << 10, &[]);
    let (f, ty, _, d) = c.chunk();
    assert_eq!(
        (f, ty, be64(&d[0..8]), be32(&d[8..12])),
        (0, REPLY_TYPE_OFFSET_HOLE, 0, 64 << 10)
    );
    let (f, ty, _, d) = c.chunk();
    assert_eq!(
        (f, ty, be64(&d[0..8])),
        (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 64 << 10)
    );
    assert!(d[8..].iter().all(|b| *b == 0xEE));
    // With DF the same read is one data chunk.
    c.request(CMD_READ, CMD_FLAG_DF, 10, 0, 256 << 10, &[]);
    let (f, ty, _, d) = c.chunk();
    assert_eq!(
        (f, ty, d.len()),
        (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 8 + (256 << 10))
    );
}

#[test]
fn oversize_payload_and_bad_magic_disconnect_only_that_client() {
    let (t, m) = server();
    let mut good = Raw::connect(&t);
    assert_eq!(good.go("disk"), REP_ACK);
    good.request(CMD_WRITE, 0, 1, 0, 4096, &[3u8; 4096]);
    assert_eq!(good.simple(), (0, 1));

    let mut bad = Raw::connect(&t);
    assert_eq!(bad.go("disk"), REP_ACK);
    bad.request(CMD_WRITE, 0, 2, 0, 64 << 20, &[0u8; 4096]);
    assert!(bad.closed());

    let mut bad = Raw::connect(&t);
    assert_eq!(bad.go("disk"), REP_ACK);
    bad.request(CMD_READ, 0, 3, 0, 64 << 20, &[]);
    assert_eq!(bad.simple(), (EOVERFLOW, 3));
    bad.s.write_all(&[0xde; 28]).unwrap();
    assert!(bad.closed());

    // The first client goes on, and its acknowledged write is intact.
    good.request(CMD_READ, 0, 4, 0, 4096, &[]);
    assert_eq!(good.simple(), (0, 4));
    let mut d = vec![0u8; 4096];
    good.s.read_exact(&mut d).unwrap();
    assert!(d.iter().all(|b| *b == 3));
    let mut b = [0u8; 4096];
    m.read_at(0, &mut b).unwrap();
    assert!(b.iter().all(|x| *x == 3));
}

#[test]
fn disconnect_mid_request_loses_nothing_acknowledged() {
    let (t, m) = server();
    let mut c = Raw::connect(&t);
    assert_eq!(c.go("disk"), REP_ACK);
    c.request(CMD_WRITE, 0, 1, 8192, 4096, &[5u8; 4096]);
    assert_eq!(c.simple(), (0, 1));
    // Half a write, then gone.
    c.request(CMD_WRITE, 0, 2, 8192, 4096, &[6u8; 2048]);
    drop(c);
    let mut c = Raw::connect(&t);
    assert_eq!(c.go("disk"), REP_ACK);
    c.request(CMD_FLUSH, 0, 3, 0, 0, &[]);
    assert_eq!(c.simple(), (0, 3));
    let mut b = [0u8; 4096];
    m.read_at(8192, &mut b).unwrap();
    assert!(b.iter().all(|x| *x == 5), "half-sent write must not apply");
    // Half a header, then gone.
    let mut c = Raw::connect(&t);
    assert_eq!(c.go("disk"), REP_ACK);
    c.s.write_all(&REQUEST_MAGIC.to_be_bytes()).unwrap();
    drop(c);
    let mut c = Raw::connect(&t);
    assert_eq!(c.go("disk"), REP_ACK);
    c.request(CMD_DISC, 0, 4, 0, 0, &[]);
    assert!(c.closed());
}

#[test]
fn client_that_never_reads_replies_blocks_only_itself() {
    let (t, _) = server();
    let mut hog = Raw::connect(&t);
    assert_eq!(hog.go("disk"), REP_ACK);
    // Ask for far more reply data (256 MiB) than socket buffers hold, never read.
    hog.s.set_nonblocking(true).unwrap();
    let mut sent = 0;
    let mut v = Vec::new();
    for i in 0..256u64 {
        Request {
            flags: 0,
            kind: CMD_READ,
            cookie: i,
            offset: 0,
            length: 1 << 20,
        }
        .encode(&mut v);
    }
    while sent < v.len() {
        match hog.s.write(&v[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    // Everyone else is served.
    for i in 0..4 {
        let mut c = Raw::connect(&t);
        assert_eq!(c.go("disk"), REP_ACK);
        c.request(CMD_WRITE, 0, i, 0, 512, &[1u8; 512]);
        assert_eq!(c.simple(), (0, i));
        c.request(CMD_READ, 0, 100 + i, 0, 512, &[]);
        assert_eq!(c.simple(), (0, 100 + i));
    }
    drop(hog);
}

/// A fake for a fault a real backend cannot be made to show on demand: a
/// read that blocks (a lazy volume waiting on a network fetch) until the
/// test opens the gate.
/// A backend with quirks: reads at offset 0 that wait for a gate (a slow
/// backend), or inline writes (`try_write_at`) that succeed once, then
/// decline (the write must go to a thread) or fail — to see the pieces of
/// a large write applied as its payload arrives over a unix socket. It
/// also counts the reads it hands out as mapped memory.
struct QuirkyExport<E = MemoryExport> {
    inner: E,
    /// Reads at 0 wait until this opens.
    gate: Option<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    /// Offsets of the inline writes so far, when they are watched.
    inline: Option<std::sync::Mutex<Vec<u64>>>,
    /// Inline writes after the first fail (else they decline).
    fail: bool,
    /// Reads handed out as mapped memory.
    mapped: std::sync::atomic::AtomicUsize,
    /// Pieces of writes taken from the server's pipe.
    spliced: std::sync::atomic::AtomicUsize,
    /// Pieces from the pipe after the first fail (`Some(true)`) or are
    /// declined (`Some(false)`).
    splice_quirk: Option<bool>,
}

impl<E: Export> QuirkyExport<E> {
    fn plain(inner: E) -> Self {
        QuirkyExport {
            inner,
            gate: None,
            inline: None,
            fail: false,
            mapped: Default::default(),
            spliced: Default::default(),
            splice_quirk: None,
        }
    }

    fn mapped(&self) -> usize {
        self.mapped.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn spliced(&self) -> usize {
        self.spliced.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl QuirkyExport {
    fn slow(size: u64) -> Self {
        QuirkyExport {
            gate: Some(Default::default()),
            ..Self::plain(MemoryExport::new(size))
        }
    }

    fn pieces(size: u64, fail: bool) -> Self {
        QuirkyExport {
            inline: Some(Default::default()),
            fail,
            ..Self::plain(MemoryExport::new(size))
        }
    }

    fn open_gate(&self) {
        let (open, cv) = self.gate.as_ref().unwrap();
        *open.lock().unwrap() = true;
        cv.notify_all();
    }
}

impl<E: Export> Export for QuirkyExport<E> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn can_multi_conn(&self) -> bool {
        true
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if let Some((open, cv)) = self.gate.as_ref().filter(|_| offset == 0) {
            let mut open = open.lock().unwrap();
            while !*open {
                open = cv.wait(open).unwrap();
            }
        }
        self.inner.read_at(offset, buf)
    }
    fn try_read_at(&self, offset: u64, buf: &mut [u8]) -> Option<std::io::Result<()>> {
        (self.gate.is_none() || offset != 0).then(|| self.inner.read_at(offset, buf))
    }
    fn try_read_mapped(&self, offset: u64, len: u64) -> Option<ferry_nbd::Mapped> {
        let m = self.inner.try_read_mapped(offset, len)?;
        self.mapped
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(m)
    }
    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> std::io::Result<()> {
        self.inner.write_at(offset, data, fua)
    }
    fn try_write_at(&self, offset: u64, data: &[u8], fua: bool) -> Option<std::io::Result<()>> {
        let Some(seen) = self.inline.as_ref() else {
            return self.inner.try_write_at(offset, data, fua);
        };
        let mut seen = seen.lock().unwrap();
        seen.push(offset);
        match seen.len() {
            1 => Some(self.inner.write_at(offset, data, fua)),
            _ if self.fail => Some(Err(std::io::Error::from_raw_os_error(EIO as i32))),
            _ => None,
        }
    }
    fn splice_writes(&self) -> bool {
        self.inner.splice_writes()
    }
    fn try_write_spliced(
        &self,
        offset: u64,
        len: usize,
        fill: &mut ferry_nbd::Fill<'_>,
    ) -> Option<std::io::Result<()>> {
        let n = self
            .spliced
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match self.splice_quirk {
            Some(true) if n > 0 => Some(Err(std::io::Error::from_raw_os_error(EIO as i32))),
            Some(false) if n > 0 => None,
            _ => self.inner.try_write_spliced(offset, len, fill),
        }
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.trim(offset, len)
    }
    fn write_zeroes(&self, o: u64, l: u64, p: bool, f: bool) -> std::io::Result<()> {
        self.inner.write_zeroes(o, l, p, f)
    }
    fn block_status(&self, c: &str, o: u64, l: u64) -> std::io::Result<Vec<ferry_nbd::Extent>> {
        self.inner.block_status(c, o, l)
    }
}

#[test]
fn slow_backend_replies_out_of_order_without_blocking_others() {
    let slow = Arc::new(QuirkyExport::slow(1 << 20));
    slow.inner.write_at(4096, &[7u8; 512], false).unwrap();
    let t = TestServer::with_export("slow", slow.clone());
    let mut c = Raw::connect(&t);
    assert_eq!(c.go("slow"), REP_ACK);
    // Eight slow reads are stuck on the backend (more than the runtime has
    // worker threads); a fast one after them is answered first.
    for i in 0..8 {
        c.request(CMD_READ, 0, 100 + i, 0, 512, &[]);
    }
    c.request(CMD_READ, 0, 2, 4096, 512, &[]);
    assert_eq!(c.simple(), (0, 2));
    let mut d = [0u8; 512];
    c.s.read_exact(&mut d).unwrap();
    assert!(d.iter().all(|b| *b == 7));
    // Other connections are served meanwhile.
    let mut other = Raw::connect(&t);
    assert_eq!(other.go("slow"), REP_ACK);
    other.request(CMD_WRITE, 0, 3, 8192, 512, &[1u8; 512]);
    assert_eq!(other.simple(), (0, 3));
    // Open the gate: the slow reads complete.
    slow.open_gate();
    let mut seen = Vec::new();
    for _ in 0..8 {
        let (e, cookie) = c.simple();
        assert_eq!(e, 0);
        c.s.read_exact(&mut d).unwrap();
        seen.push(cookie);
    }
    seen.sort();
    assert_eq!(seen, (100..108).collect::<Vec<_>>());
}

/// Large writes are read into buffers of their own and reply buffers are
/// reused: a payload that arrives in pieces with the next requests right
/// behind it, a large read after reads of other content (no stale bytes),
/// and half a large payload before a disconnect (not applied).
#[test]
fn large_payloads_in_pieces_and_reused_buffers_keep_every_byte() {
    let (t, m) = server();
    large_payloads(&t, &m, Raw::connect);
}

/// The same over TCP, where a large payload arrives in many segments.
#[test]
fn large_payloads_over_tcp_keep_every_byte() {
    let (t, m) = server();
    large_payloads(&t, &m, Raw::connect_tcp);
}

fn large_payloads<S: Read + Write>(
    t: &TestServer,
    m: &MemoryExport,
    connect: fn(&TestServer) -> Raw<S>,
) {
    let mut c = connect(t);
    c.structured();
    assert_eq!(c.go("disk"), REP_ACK);
    let big: Vec<u8> = (0..512u32 << 10).map(|i| (i % 251) as u8).collect();
    // Header and 1000 bytes, a pause, then the rest with a read and a
    // second large write behind it in the same send.
    let mut head = Vec::new();
    Request {
        flags: 0,
        kind: CMD_WRITE,
        cookie: 1,
        offset: 0,
        length: big.len() as u32,
    }
    .encode(&mut head);
    head.extend_from_slice(&big[..1000]);
    c.s.write_all(&head).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let mut rest = big[1000..].to_vec();
    for (kind, cookie, offset, length, payload) in [
        (CMD_READ, 2u64, 100u64, 4096u32, Vec::new()),
        (CMD_WRITE, 3, 512 << 10, 256 << 10, vec![0x77u8; 256 << 10]),
    ] {
        Request {
            flags: 0,
            kind,
            cookie,
            offset,
            length,
        }
        .encode(&mut rest);
        rest.extend_from_slice(&payload);
    }
    c.s.write_all(&rest).unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        // Replies may come in any order: simple ones for writes, a
        // structured chunk for the read.
        let mut magic = [0u8; 4];
        c.s.read_exact(&mut magic).unwrap();
        if be32(&magic) == SIMPLE_REPLY_MAGIC {
            let mut r = [0u8; 12];
            c.s.read_exact(&mut r).unwrap();
            assert_eq!(be32(&r[0..4]), 0, "write failed");
            seen.push(be64(&r[4..12]));
        } else {
            assert_eq!(be32(&magic), STRUCTURED_REPLY_MAGIC);
            let mut h = [0u8; 16];
            c.s.read_exact(&mut h).unwrap();
            let mut d = vec![0u8; be32(&h[12..16]) as usize];
            c.s.read_exact(&mut d).unwrap();
            assert_eq!(be64(&h[4..12]), 2);
            assert_eq!(&d[8..], &big[100..100 + 4096]);
            seen.push(2);
        }
    }
    seen.sort();
    assert_eq!(seen, vec![1, 2, 3]);
    // Large reads (answered on blocking threads into reused buffers) of
    // different content, one after the other, each exact.
    for (cookie, off, len) in [
        (4u64, 0u64, 512u32 << 10),
        (5, 256 << 10, 768 << 10),
        (6, 0, 512 << 10),
    ] {
        c.request(CMD_READ, CMD_FLAG_DF, cookie, off, len, &[]);
        let (f, ty, got, d) = c.chunk();
        assert_eq!(
            (f, ty, got),
            (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie)
        );
        let mut want = vec![0u8; len as usize];
        m.read_at(off, &mut want).unwrap();
        assert_eq!(be64(&d[0..8]), off);
        assert!(d[8..] == want[..], "read {cookie} differs");
    }
    assert_eq!(
        &{
            let mut b = vec![0u8; big.len()];
            m.read_at(0, &mut b).unwrap();
            b
        }[..],
        &big[..]
    );
    // Half of a large payload (less than a piece applied as it arrives
    // over a unix socket), then gone: nothing of it is applied.
    c.request(CMD_WRITE, 0, 7, 0, 256 << 10, &[0x55u8; 100 << 10]);
    drop(c);
    let mut c = connect(t);
    assert_eq!(c.go("disk"), REP_ACK);
    c.request(CMD_FLUSH, 0, 8, 0, 0, &[]);
    assert_eq!(c.simple(), (0, 8));
    let mut b = vec![0u8; 256 << 10];
    m.read_at(0, &mut b).unwrap();
    assert!(b[..] == big[..256 << 10], "half-sent write must not apply");
}

/// Sends a 1 MiB write in three parts with pauses (so that the server has
/// whole pieces before the payload is complete) and returns its reply.
fn write_in_parts(c: &mut Raw, cookie: u64, data: &[u8]) -> (u32, u64) {
    let mut head = Vec::new();
    Request {
        flags: 0,
        kind: CMD_WRITE,
        cookie,
        offset: 0,
        length: data.len() as u32,
    }
    .encode(&mut head);
    head.extend_from_slice(&data[..300 << 10]);
    c.s.write_all(&head).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    c.s.write_all(&data[300 << 10..700 << 10]).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    c.s.write_all(&data[700 << 10..]).unwrap();
    c.simple()
}

/// A unix connection to a [`QuirkyExport::pieces`] export (the server
/// must outlive the client).
fn pieces_client(fail: bool) -> (Arc<QuirkyExport>, TestServer, Raw) {
    let e = Arc::new(QuirkyExport::pieces(2 << 20, fail));
    let t = TestServer::with_export("d", e.clone());
    let mut c = Raw::connect(&t);
    assert_eq!(c.go("d"), REP_ACK);
    (e, t, c)
}

#[test]
fn a_large_write_over_unix_is_applied_in_pieces_and_a_declined_piece_goes_to_a_thread() {
    let (e, _t, mut c) = pieces_client(false);
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 253) as u8).collect();
    assert_eq!(write_in_parts(&mut c, 1, &data), (0, 1));
    // The first piece went in while the rest was on its way; the second
    // was declined, and the rest of the write was done on a thread.
    assert_eq!(
        *e.inline.as_ref().unwrap().lock().unwrap(),
        vec![0, 128 << 10]
    );
    let mut got = vec![0u8; data.len()];
    e.inner.read_at(0, &mut got).unwrap();
    assert!(got == data, "every byte written");
    // The connection goes on.
    c.request(CMD_FLUSH, 0, 2, 0, 0, &[]);
    assert_eq!(c.simple(), (0, 2));
}

#[test]
fn a_failed_piece_fails_the_write_and_the_connection_goes_on() {
    let (e, _t, mut c) = pieces_client(true);
    let data = vec![9u8; 1 << 20];
    assert_eq!(write_in_parts(&mut c, 1, &data), (EIO, 1));
    // The second piece failed; none was tried after it.
    assert_eq!(
        *e.inline.as_ref().unwrap().lock().unwrap(),
        vec![0, 128 << 10]
    );
    // The rest of the payload was read, not taken for requests.
    c.request(CMD_READ, 0, 2, 0, 4096, &[]);
    assert_eq!(c.simple(), (0, 2));
    let mut d = [0u8; 4096];
    c.s.read_exact(&mut d).unwrap();
    assert!(d.iter().all(|b| *b == 9), "the first piece was applied");
}

/// A file of `len` bytes of a fixed pseudo-random pattern, served (through
/// [`QuirkyExport`], counting mapped reads and spliced writes, with
/// `splice_quirk`) as export "f" from the test server's directory.
fn mapped_server(
    len: usize,
    splice_quirk: Option<bool>,
) -> (
    TestServer,
    Arc<QuirkyExport<ferry_nbd::FileExport>>,
    Vec<u8>,
    std::path::PathBuf,
) {
    let data = pattern(len, 0x9e37_79b9_7f4a_7c15);
    let s = Server::new();
    let t = TestServer::start(s);
    let path = t.path("f.raw");
    std::fs::write(&path, &data).unwrap();
    let e = Arc::new(QuirkyExport {
        splice_quirk,
        ..QuirkyExport::plain(ferry_nbd::FileExport::open(&path, false).unwrap())
    });
    t.server
        .add_export("f", e.clone(), ExportOptions::default())
        .unwrap();
    (t, e, data, path)
}

/// Sends reads (cookie = index + 1) all at once and checks every reply,
/// in whatever order they come, against `data`.
fn check_reads<S: Read + Write>(
    c: &mut Raw<S>,
    structured: bool,
    reads: &[(u64, u32)],
    data: &[u8],
) {
    for (i, &(off, len)) in reads.iter().enumerate() {
        c.request(CMD_READ, 0, i as u64 + 1, off, len, &[]);
    }
    for _ in reads {
        let (cookie, got) = if structured {
            let (flags, kind, cookie, p) = c.chunk();
            assert_eq!((flags, kind), (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA));
            let off = reads[cookie as usize - 1].0;
            assert_eq!(be64(&p[..8]), off);
            (cookie, p[8..].to_vec())
        } else {
            let (err, cookie) = c.simple();
            assert_eq!(err, 0);
            let mut p = vec![0u8; reads[cookie as usize - 1].1 as usize];
            c.s.read_exact(&mut p).unwrap();
            (cookie, p)
        };
        let (off, len) = reads[cookie as usize - 1];
        let want = &data[off as usize..off as usize + len as usize];
        assert!(got == want, "read {cookie} ({off}+{len}) differs");
    }
}

#[test]
fn large_reads_are_sent_from_the_mapped_file_with_every_byte() {
    let (t, e, data, _) = mapped_server(34 << 20, None);
    // Unaligned, the largest payload (far beyond a socket's buffer: the
    // send waits for the client again and again), and a small read after.
    let reads = [(4097u64, 300_001u32), (1 << 20, 32 << 20), (5, 4096)];
    let mut expect = 0;
    for structured in [true, false] {
        let mut c = Raw::connect(&t);
        if structured {
            c.structured();
        }
        assert_eq!(c.go("f"), REP_ACK);
        check_reads(&mut c, structured, &reads, &data);
        let mut c = Raw::connect_tcp(&t);
        if structured {
            c.structured();
        }
        assert_eq!(c.go("f"), REP_ACK);
        check_reads(&mut c, structured, &reads, &data);
        expect += 4;
    }
    // The two large reads of each connection were sent from the mapping.
    assert_eq!(e.mapped(), expect);
}

#[test]
fn a_read_not_in_memory_is_read_the_ordinary_way() {
    let (t, e, data, path) = mapped_server(4 << 20, None);
    // Written back and dropped from the page cache.
    let f = std::fs::File::open(&path).unwrap();
    f.sync_all().unwrap();
    // SAFETY: fadvise on an open fd; it does not touch our memory.
    let r = unsafe {
        libc::posix_fadvise(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
            0,
            libc::POSIX_FADV_DONTNEED,
        )
    };
    assert_eq!(r, 0);
    let mut c = Raw::connect(&t);
    c.structured();
    assert_eq!(c.go("f"), REP_ACK);
    check_reads(&mut c, true, &[(0, 1 << 20)], &data);
    assert_eq!(
        e.mapped(),
        0,
        "pages not in memory: not sent from the mapping"
    );
    // The ordinary read brought them in.
    check_reads(&mut c, true, &[(0, 1 << 20)], &data);
    assert_eq!(e.mapped(), 1);
}

/// `len` pseudo-random bytes from `seed`.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends writes of `new`'s bytes (cookie = index + 1) and right behind
/// them, in the same stream, a read of each (cookie + 100), then checks
/// every reply: the payloads are taken from the socket byte-exact.
fn check_writes<S: Read + Write>(c: &mut Raw<S>, writes: &[(u64, u32)], new: &[u8]) {
    for (i, &(off, len)) in writes.iter().enumerate() {
        let r = off as usize..off as usize + len as usize;
        c.request(CMD_WRITE, 0, i as u64 + 1, off, len, &new[r]);
    }
    for (i, &(off, len)) in writes.iter().enumerate() {
        c.request(CMD_READ, 0, i as u64 + 101, off, len, &[]);
    }
    let mut seen = Vec::new();
    for _ in writes {
        let (err, cookie) = c.simple();
        assert_eq!(err, 0, "write {cookie}");
        seen.push(cookie);
    }
    seen.sort();
    assert_eq!(seen, (1..=writes.len() as u64).collect::<Vec<_>>());
    for _ in writes {
        let (err, cookie) = c.simple();
        assert_eq!(err, 0);
        let (off, len) = writes[cookie as usize - 101];
        let mut p = vec![0u8; len as usize];
        c.s.read_exact(&mut p).unwrap();
        assert!(
            p[..] == new[off as usize..off as usize + len as usize],
            "read {cookie}"
        );
    }
}

#[test]
fn large_writes_are_spliced_into_the_file_with_every_byte() {
    let (t, e, _, path) = mapped_server(34 << 20, None);
    let new = pattern(34 << 20, 7);
    // Unaligned, the largest payload (far beyond a socket's buffer), and
    // one that ends the file.
    let writes = [
        (4097u64, 300_001u32),
        (1 << 20, 32 << 20),
        ((34 << 20) - (200 << 10), 200 << 10),
    ];
    let mut c = Raw::connect(&t);
    assert_eq!(c.go("f"), REP_ACK);
    check_writes(&mut c, &writes, &new);
    let over_unix = e.spliced();
    assert!(over_unix >= 32, "pieces taken from the pipe: {over_unix}");
    let new = pattern(34 << 20, 8);
    let mut c = Raw::connect_tcp(&t);
    assert_eq!(c.go("f"), REP_ACK);
    check_writes(&mut c, &writes, &new);
    assert!(e.spliced() >= over_unix + 32, "over TCP too");
    // The file holds them (and nothing else changed).
    c.request(CMD_FLUSH, 0, 9, 0, 0, &[]);
    assert_eq!(c.simple(), (0, 9));
    let mut want = pattern(34 << 20, 0x9e37_79b9_7f4a_7c15);
    for &(off, len) in &writes {
        let r = off as usize..off as usize + len as usize;
        want[r.clone()].copy_from_slice(&new[r]);
    }
    assert!(std::fs::read(&path).unwrap() == want, "the file");
}

/// Sends a 4 MiB write at 0 in pieces far apart in time (the server takes
/// each from the pipe alone) and returns its reply.
fn write_slowly<S: Read + Write>(c: &mut Raw<S>, data: &[u8]) -> (u32, u64) {
    c.request(CMD_WRITE, 0, 1, 0, data.len() as u32, &[]);
    for part in data.chunks(512 << 10) {
        std::thread::sleep(Duration::from_millis(20));
        c.s.write_all(part).unwrap();
    }
    c.simple()
}

#[test]
fn a_declined_spliced_piece_sends_the_rest_of_the_write_to_a_thread() {
    let (t, e, _, path) = mapped_server(4 << 20, Some(false));
    let new = pattern(4 << 20, 9);
    let mut c = Raw::connect(&t);
    assert_eq!(c.go("f"), REP_ACK);
    assert_eq!(write_slowly(&mut c, &new), (0, 1));
    assert_eq!(e.spliced(), 2, "one piece written, the next declined");
    c.request(CMD_FLUSH, 0, 2, 0, 0, &[]);
    assert_eq!(c.simple(), (0, 2));
    assert!(std::fs::read(&path).unwrap() == new, "every byte written");
}

#[test]
fn a_failed_spliced_piece_fails_the_write_and_the_connection_goes_on() {
    let (t, e, old, path) = mapped_server(4 << 20, Some(true));
    let new = pattern(4 << 20, 10);
    let mut c = Raw::connect_tcp(&t);
    assert_eq!(c.go("f"), REP_ACK);
    assert_eq!(write_slowly(&mut c, &new), (EIO, 1));
    assert_eq!(e.spliced(), 2, "no piece tried after the failed one");
    // The rest of the payload was dropped, not taken for requests.
    c.request(CMD_READ, 0, 2, 0, 4096, &[]);
    assert_eq!(c.simple(), (0, 2));
    let mut d = [0u8; 4096];
    c.s.read_exact(&mut d).unwrap();
    let file = std::fs::read(&path).unwrap();
    assert!(
        d[..] == new[..4096] && file[..4096] == new[..4096],
        "the first piece applied"
    );
    assert!(
        file[1 << 20..] == old[1 << 20..],
        "nothing after the failed piece"
    );
}

#[test]
fn a_client_gone_mid_payload_leaves_what_arrived_and_the_server_goes_on() {
    let (t, e, old, path) = mapped_server(4 << 20, None);
    let new = pattern(4 << 20, 11);
    let mut c = Raw::connect(&t);
    assert_eq!(c.go("f"), REP_ACK);
    // A short write first: the file backend learns whether the file
    // system takes non-blocking writes, declining that one write, so that
    // the payload bytes that come with the large write's header are
    // written inline, not sent with the rest to a thread.
    c.request(CMD_WRITE, 0, 1, 0, 4096, &old[..4096]);
    assert_eq!(c.simple(), (0, 1));
    c.request(CMD_WRITE, 0, 2, 0, 4 << 20, &new[..3 << 20]);
    drop(c);
    // An unacknowledged write may be torn, as a crash may tear it: what
    // arrived is written (once the server has taken it from the socket),
    // nothing beyond it.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let file = loop {
        let file = std::fs::read(&path).unwrap();
        if file[..3 << 20] == new[..3 << 20] || std::time::Instant::now() > deadline {
            break file;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        file[..3 << 20] == new[..3 << 20],
        "what arrived was written"
    );
    assert!(
        file[3 << 20..] == old[3 << 20..],
        "nothing beyond what was sent"
    );
    assert!(e.spliced() > 0);
    // The server goes on.
    let mut c = Raw::connect(&t);
    assert_eq!(c.go("f"), REP_ACK);
    c.request(CMD_FLUSH, 0, 3, 0, 0, &[]);
    assert_eq!(c.simple(), (0, 3));
}
