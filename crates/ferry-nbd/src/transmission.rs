//! The transmission phase of one connection.
//!
//! One task per connection reads requests in batches into a buffer and
//! answers them. Reads and writes the backend can serve without blocking
//! (page cache, memory) run right there and their replies collect in one
//! output buffer, written every `REPLY_BATCH` (4) replies (or 256 KiB) and
//! once the batch is parsed: the client starts on the first answers while
//! the rest of the batch is served, instead of both sides taking turns.
//! Everything else runs on tokio's blocking pool and its reply comes back
//! through a channel, so replies go out of order and a slow backend never
//! blocks the runtime. At most [`MAX_INFLIGHT`] requests are outstanding
//! per connection; past that the task stops reading, which bounds memory.
//!
//! Large transfers avoid copies the kernel already makes: a large write's
//! payload is read from the socket into a buffer of its own, and the
//! buffers of replies and payloads are kept per connection and then by
//! the server ([`crate::buffers`]) and reused, so a large read overwrites
//! an earlier reply's bytes in place instead of faulting in and zeroing a
//! fresh buffer.
//!
//! A large write is applied in pieces while the rest of its payload
//! arrives: over plain TCP and unix sockets, to a backend with a file,
//! each piece goes from the socket through a pipe into the file
//! ([`receive_spliced`]), so its bytes are copied once; otherwise, over a
//! unix socket, from the payload's buffer ([`Streamed`]). The client can
//! queue little over a unix socket, and would otherwise wait while the
//! whole payload is written.
//!
//! A client that breaks the protocol is disconnected; replies already
//! written and writes already acknowledged are unaffected.

use std::io;
use std::os::fd::BorrowedFd;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::buffers::{Reserve, SPARE_IDLE, SPARE_IDLE_BYTES, Spares};
use crate::error::{Error, ErrorKind, Result};
use crate::export::{Export, Mapped, nbd_errno};
use crate::handshake::Session;
use crate::proto::*;
use crate::wire::{Pipe, Wire, send_mapped};

/// Requests on the blocking pool per connection before reading pauses.
pub const MAX_INFLIGHT: usize = 64;
/// Reads at least this long, with structured replies, are split into data
/// and hole chunks from the allocation map.
const SPARSE_READ_MIN: u32 = 64 << 10;
/// Write payloads at least this long that are not in the input buffer yet
/// are read into a buffer of their own.
const OWN_PAYLOAD_MIN: usize = 128 << 10;
/// Reads at least this long are sent from the backend's mapped file when
/// it has one (see [`crate::wire`]).
const MAPPED_READ_MIN: u32 = 256 << 10;
/// Reads at least this long always run on a blocking thread.
const PARALLEL_READ_MIN: u32 = 256 << 10;
/// Output collected beyond this is written before more requests are handled.
const FLUSH_AT: usize = 256 << 10;
/// Inline replies collected before they are written, so that the client
/// works on the first answers of a batch while the rest are served.
const REPLY_BATCH: usize = 4;
const KNOWN_FLAGS: u16 =
    CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO;

struct Ctx {
    export: Arc<dyn Export>,
    size: u64,
    read_only: bool,
    structured: bool,
    contexts: Vec<(u32, String)>,
    spares: Spares,
}

/// A write's data: in the connection's input buffer, or read into a
/// buffer of its own.
enum Payload<'a> {
    Borrowed(&'a [u8]),
    Owned(Vec<u8>),
}

impl Payload<'_> {
    fn as_slice(&self) -> &[u8] {
        match self {
            Payload::Borrowed(b) => b,
            Payload::Owned(v) => v,
        }
    }

    /// An owned buffer for a blocking thread (a copy of a borrowed one).
    fn into_vec(self, spares: &Spares) -> Vec<u8> {
        match self {
            Payload::Borrowed(b) => spares.copy_of(b),
            Payload::Owned(v) => v,
        }
    }
}

enum Handled {
    Inline,
    Spawned,
    Disconnect,
}

pub(crate) async fn serve<S: Wire>(
    mut s: S,
    session: Session,
    reserve: Arc<Reserve>,
    stream_writes: bool,
) -> Result<()> {
    let export = session.entry.export.clone();
    let ctx = Arc::new(Ctx {
        size: export.size(),
        read_only: session.flags & TF_READ_ONLY != 0,
        export,
        structured: session.structured,
        contexts: session.contexts,
        spares: Spares::new(reserve),
    });
    let name = session.entry.name.clone();
    let err = |what: &str, e: io::Error| Error::io(format!("export {name}: {what}"), e);

    let mut inbuf: Vec<u8> = Vec::with_capacity(256 << 10);
    let mut start = 0usize;
    let mut out: Vec<u8> = Vec::with_capacity(256 << 10);
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let mut done: Vec<Vec<u8>> = Vec::new();
    let mut inflight = 0usize;
    let mut closing = false;
    let mut eof = false;
    // Large writes go through a pipe when the socket and the backend can.
    let mut pipe = (s.raw().is_some() && ctx.export.splice_writes())
        .then(Pipe::new)
        .and_then(|p| {
            p.map_err(|e| tracing::debug!(export = %name, "no pipe for writes: {e}"))
                .ok()
        });

    loop {
        let mut since_flush = 0usize;
        // Answer every complete request in the buffer.
        while !closing && inflight < MAX_INFLIGHT {
            let avail = &inbuf[start..];
            if avail.len() < REQUEST_LEN {
                break;
            }
            let req = Request::parse(avail).map_err(|e| {
                Error::new(ErrorKind::Protocol, format!("export {name}: request: {e}"))
            })?;
            if req.kind == CMD_WRITE && req.length > MAX_PAYLOAD {
                return Err(Error::new(
                    ErrorKind::Protocol,
                    format!("export {name}: write of {} bytes", req.length),
                ));
            }
            let plen = req.payload_len() as usize;
            let need = REQUEST_LEN + plen;
            let handled = if let Some(m) = mapped_read(&ctx, &req, s.raw().is_some()) {
                // Sent from the backend's mapped file, after what waits.
                start += REQUEST_LEN;
                data_reply_header(&ctx, &req, &mut out);
                write_out(&mut s, &mut out)
                    .await
                    .map_err(|e| err("writing replies", e))?;
                since_flush = 0;
                if let Some(sock) = s.raw() {
                    // The header is out: a failure now can only end the
                    // connection.
                    send_mapped(sock, &m)
                        .await
                        .map_err(|e| err("sending a read from the mapped file", e))?;
                }
                Handled::Inline
            } else if avail.len() >= need {
                let payload = &inbuf[start + REQUEST_LEN..start + need];
                let h = handle(&ctx, &req, Payload::Borrowed(payload), &mut out, &tx);
                start += need;
                h
            } else if let Some(pipe) = pipe
                .as_mut()
                .filter(|_| plen >= OWN_PAYLOAD_MIN && streamable(&ctx, &req))
            {
                // The rest of a large write goes from the socket through
                // the pipe into the backend's file.
                let head_len = avail.len() - REQUEST_LEN;
                if !out.is_empty() {
                    write_out(&mut s, &mut out)
                        .await
                        .map_err(|e| err("writing replies", e))?;
                    since_flush = 0;
                }
                let head = start + REQUEST_LEN..start + REQUEST_LEN + head_len;
                let r = receive_spliced(&mut s, pipe, &ctx, &req, &mut inbuf, head)
                    .await
                    .map_err(|e| err("receiving a write through the pipe", e))?;
                start = 0;
                match r {
                    Spliced::Done(errno) => {
                        simple_reply(&mut out, errno, req.cookie);
                        Handled::Inline
                    }
                    Spliced::Closed => {
                        tracing::debug!(export = %name, "client closed mid-request");
                        eof = true;
                        break;
                    }
                    Spliced::Rest { applied, p } => spawn_rest(&ctx, &tx, &req, applied, p),
                }
            } else if plen >= OWN_PAYLOAD_MIN {
                // A large write's payload is read from the socket straight
                // into a buffer of its own, not copied out of `inbuf`.
                let mut p = ctx.spares.take(plen);
                p.extend_from_slice(&avail[REQUEST_LEN..]);
                inbuf.clear();
                start = 0;
                if !out.is_empty() {
                    write_out(&mut s, &mut out)
                        .await
                        .map_err(|e| err("writing replies", e))?;
                    since_flush = 0;
                }
                let mut st = (stream_writes && streamable(&ctx, &req)).then(Streamed::default);
                let p = receive_payload(&mut s, &ctx, p, plen, &mut inbuf, |p| {
                    if let Some(st) = st.as_mut() {
                        st.apply(&ctx, &req, p);
                    }
                })
                .await
                .map_err(|e| err("reading requests", e))?;
                let Some(p) = p else {
                    tracing::debug!(export = %name, "client closed mid-request");
                    eof = true;
                    break;
                };
                match st {
                    Some(mut st) => {
                        st.apply(&ctx, &req, &p);
                        st.finish(&ctx, &req, p, &mut out, &tx)
                    }
                    None => handle(&ctx, &req, Payload::Owned(p), &mut out, &tx),
                }
            } else {
                inbuf.reserve(need - avail.len());
                break;
            };
            match handled {
                Handled::Inline => since_flush += 1,
                Handled::Spawned => inflight += 1,
                Handled::Disconnect => closing = true,
            }
            // Large replies go out as soon as they are ready, so the client
            // works on them while the next requests are read.
            if out.len() >= FLUSH_AT || since_flush >= REPLY_BATCH {
                write_out(&mut s, &mut out)
                    .await
                    .map_err(|e| err("writing replies", e))?;
                since_flush = 0;
            }
        }
        if start == inbuf.len() {
            inbuf.clear();
            start = 0;
            // A 32 MiB write grew the buffer; do not keep it per connection.
            if inbuf.capacity() > 4 << 20 {
                inbuf = Vec::with_capacity(256 << 10);
            }
        } else if start > 0
            && (start > inbuf.capacity() / 2 || inbuf.capacity() - inbuf.len() < 4096)
        {
            inbuf.drain(..start);
            start = 0;
        }
        while let Ok(r) = rx.try_recv() {
            inflight -= 1;
            done.push(r);
        }
        if !out.is_empty() {
            write_out(&mut s, &mut out)
                .await
                .map_err(|e| err("writing replies", e))?;
            if out.capacity() > 64 << 20 {
                out.shrink_to(256 << 10);
            }
        }
        for r in done.drain(..) {
            s.write_all(&r)
                .await
                .map_err(|e| err("writing replies", e))?;
            ctx.spares.give(r);
        }
        if (closing || eof) && inflight == 0 {
            let _ = s.flush().await;
            return Ok(());
        }
        let complete = inbuf.len() - start >= REQUEST_LEN && {
            let r = Request::parse(&inbuf[start..]);
            r.map(|r| inbuf.len() - start >= REQUEST_LEN + r.payload_len() as usize)
                .unwrap_or(true)
        };
        if complete && !closing && inflight < MAX_INFLIGHT {
            continue;
        }
        s.flush().await.map_err(|e| err("writing replies", e))?;
        let can_read = !closing && !eof && inflight < MAX_INFLIGHT;
        if inbuf.capacity() - inbuf.len() < 64 << 10 {
            inbuf.reserve(256 << 10);
        }
        // A nap only when it matters: select! builds every branch's future.
        let idle = can_read && inflight == 0 && ctx.spares.held() > SPARE_IDLE_BYTES;
        let nap = idle.then(|| tokio::time::sleep(SPARE_IDLE));
        tokio::select! {
            biased;
            r = rx.recv(), if inflight > 0 => {
                if let Some(r) = r {
                    inflight -= 1;
                    done.push(r);
                }
            }
            () = async { if let Some(n) = nap { n.await } }, if idle => {
                ctx.spares.trim(SPARE_IDLE_BYTES);
            }
            n = s.read_buf(&mut inbuf), if can_read => {
                let n = n.map_err(|e| err("reading requests", e))?;
                if n == 0 {
                    if inbuf.len() > start {
                        tracing::debug!(export = %name, "client closed mid-request");
                    }
                    eof = true;
                }
            }
        }
    }
}

/// Writes the replies collected in `out` and empties it.
async fn write_out<S: Wire>(s: &mut S, out: &mut Vec<u8>) -> io::Result<()> {
    s.write_all(out).await?;
    out.clear();
    Ok(())
}

/// Reads from `s` into `p` until it holds `len` bytes, calling `each`
/// with what it holds after every read; what came after those bytes (the
/// next requests) goes to `inbuf`. `None` (the buffer given back) when
/// the client closed first.
async fn receive_payload<S: Wire>(
    s: &mut S,
    ctx: &Ctx,
    mut p: Vec<u8>,
    len: usize,
    inbuf: &mut Vec<u8>,
    mut each: impl FnMut(&[u8]),
) -> io::Result<Option<Vec<u8>>> {
    while p.len() < len {
        if s.read_buf(&mut p).await? == 0 {
            ctx.spares.give(p);
            return Ok(None);
        }
        each(&p);
    }
    inbuf.extend_from_slice(&p[len..]);
    p.truncate(len);
    Ok(Some(p))
}

/// A read to send straight from the backend's mapped file: large, valid,
/// on a socket that can send from memory, with every page in memory.
fn mapped_read(ctx: &Ctx, req: &Request, raw: bool) -> Option<Mapped> {
    if !raw
        || req.kind != CMD_READ
        || req.length < MAPPED_READ_MIN
        || req.length > MAX_PAYLOAD
        || req.flags & !KNOWN_FLAGS != 0
        || !in_range(ctx, req)
    {
        return None;
    }
    let m = ctx.export.try_read_mapped(req.offset, req.length.into())?;
    (m.len() == req.length as usize).then_some(m)
}

/// The header of a read's reply whose data follows in one piece: one data
/// chunk (structured replies) or a simple reply.
fn data_reply_header(ctx: &Ctx, req: &Request, out: &mut Vec<u8>) {
    if ctx.structured {
        chunk_header(
            out,
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            req.cookie,
            req.length + 8,
        );
        out.extend_from_slice(&req.offset.to_be_bytes());
    } else {
        simple_reply(out, 0, req.cookie);
    }
}

fn error_reply(ctx: &Ctx, req: &Request, errno: u32, msg: &str, out: &mut Vec<u8>) {
    if ctx.structured && (req.kind == CMD_READ || req.kind == CMD_BLOCK_STATUS) {
        error_chunk(out, req.cookie, errno, msg);
    } else {
        simple_reply(out, errno, req.cookie);
    }
}

fn spawn(
    ctx: &Arc<Ctx>,
    tx: &mpsc::UnboundedSender<Vec<u8>>,
    req: Request,
    payload: Option<Vec<u8>>,
) {
    let ctx = ctx.clone();
    let tx = tx.clone();
    tokio::task::spawn_blocking(move || {
        // A read's reply is sized in place over a kept buffer; any other
        // is a few bytes.
        let mut out = if req.kind == CMD_READ {
            ctx.spares.take_used(req.length as usize + 64)
        } else {
            Vec::with_capacity(64)
        };
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
            run_blocking(&ctx, &req, payload.as_deref().unwrap_or(&[]), &mut out)
        }));
        if r.is_err() {
            out.clear();
            error_reply(&ctx, &req, EIO, "backend panicked", &mut out);
        }
        if let Some(p) = payload {
            ctx.spares.give(p);
        }
        let _ = tx.send(out);
    });
}

/// Whether a write may be applied piece by piece as its payload arrives
/// (see [`Streamed`]): a buffered write the checks of [`handle`] would let
/// through. FUA writes wait for their whole payload.
fn streamable(ctx: &Ctx, req: &Request) -> bool {
    req.kind == CMD_WRITE
        && !ctx.read_only
        && req.flags & !KNOWN_FLAGS == 0
        && req.flags & CMD_FLAG_FUA == 0
        && in_range(ctx, req)
}

/// Whether a request's range lies within the export.
fn in_range(ctx: &Ctx, req: &Request) -> bool {
    req.offset
        .checked_add(req.length.into())
        .is_some_and(|e| e <= ctx.size)
}

/// A large write applied [`WRITE_PIECE`] by [`WRITE_PIECE`] while the
/// rest of its payload arrives, on connections whose client can queue
/// little (unix sockets: the sender may queue only its own send buffer,
/// 208 KiB by default, which the server cannot raise). Writing a whole
/// 1 MiB payload into the page cache before reading on left the client
/// blocked for that long, each side waiting on the other; applying pieces
/// as they come lets it send the next ones meanwhile (1 MiB writes over
/// unix: 2.0 GB/s whole, 2.3–2.5 in pieces, about nbdkit's rate; over TCP,
/// where the client queues megabytes, pieces were 3–5 % slower, so TCP
/// connections wait for the whole payload).
///
/// A piece the backend will not write without blocking (allocation, copy
/// on write, throttled) sends the rest of the write to a blocking thread;
/// a piece that fails ends the write with its error. A client gone
/// mid-payload leaves the pieces that arrived applied: an unacknowledged
/// write may be torn, as a crash may tear it.
#[derive(Default)]
struct Streamed {
    /// Payload bytes written so far.
    applied: usize,
    /// The error of the piece that failed.
    errno: Option<u32>,
    /// The backend declined a piece.
    declined: bool,
}

impl Streamed {
    /// Writes the whole pieces of `p` (the payload received so far, maybe
    /// followed by the next requests) not written yet, and the rest of the
    /// payload too once it is all there.
    fn apply(&mut self, ctx: &Ctx, req: &Request, p: &[u8]) {
        let plen = req.length as usize;
        let have = p.len().min(plen);
        while self.errno.is_none() && !self.declined && self.applied < have {
            let end = (self.applied + WRITE_PIECE).min(have);
            if end - self.applied < WRITE_PIECE && end < plen {
                return;
            }
            match ctx.export.try_write_at(
                req.offset + self.applied as u64,
                &p[self.applied..end],
                false,
            ) {
                Some(Ok(())) => self.applied = end,
                Some(Err(e)) => self.errno = Some(nbd_errno(&e)),
                None => self.declined = true,
            }
        }
    }

    /// Answers the write once its payload (`p`) is all there.
    fn finish(
        self,
        ctx: &Arc<Ctx>,
        req: &Request,
        mut p: Vec<u8>,
        out: &mut Vec<u8>,
        tx: &mpsc::UnboundedSender<Vec<u8>>,
    ) -> Handled {
        if let Some(errno) = self.errno {
            simple_reply(out, errno, req.cookie);
        } else if self.applied < p.len() {
            // The backend declined a piece: the rest goes to a thread.
            p.drain(..self.applied);
            return spawn_rest(ctx, tx, req, self.applied, p);
        } else {
            simple_reply(out, 0, req.cookie);
        }
        ctx.spares.give(p);
        Handled::Inline
    }
}

/// Piece of a large write applied as its payload arrives ([`Streamed`]).
const WRITE_PIECE: usize = 128 << 10;

/// Sends the rest of write `req`, from payload byte `applied` on (`p`), to
/// a blocking thread.
fn spawn_rest(
    ctx: &Arc<Ctx>,
    tx: &mpsc::UnboundedSender<Vec<u8>>,
    req: &Request,
    applied: usize,
    p: Vec<u8>,
) -> Handled {
    let rest = Request {
        offset: req.offset + applied as u64,
        length: p.len() as u32,
        ..*req
    };
    spawn(ctx, tx, rest, Some(p));
    Handled::Spawned
}

/// Largest piece of a write spliced at once.
const SPLICE_PIECE: usize = 1 << 20;

/// What became of a write received through the pipe.
enum Spliced {
    /// All of it arrived; its error number (0: written).
    Done(u32),
    /// The backend declined the piece at payload byte `applied`: `p` holds
    /// the rest of the payload, received, for a blocking thread.
    Rest { applied: usize, p: Vec<u8> },
    /// The client closed mid-payload.
    Closed,
}

/// Receives write `req` (a [`streamable`] one), whose payload starts with
/// the bytes `head` of `inbuf`, the rest still in the socket: each piece
/// that arrives is spliced into the pipe and handed to the backend
/// ([`Export::try_write_spliced`]), which has the kernel move it into its
/// file, the one copy of these bytes on this side. A piece that fails
/// sets the write's error and the rest of the payload is read and dropped.
/// As with [`Streamed`], a client gone mid-payload leaves the pieces that
/// arrived applied. `inbuf` is emptied; what followed the payload (the
/// next requests) is put there.
async fn receive_spliced<S: Wire>(
    s: &mut S,
    pipe: &mut Pipe,
    ctx: &Ctx,
    req: &Request,
    inbuf: &mut Vec<u8>,
    head: std::ops::Range<usize>,
) -> io::Result<Spliced> {
    let plen = req.length as usize;
    let (applied, p) = 'declined: {
        let head_bytes = &inbuf[head.clone()];
        let copy = |b: &[u8]| {
            let mut p = ctx.spares.take(plen);
            p.extend_from_slice(b);
            p
        };
        let Some(sock) = s.raw() else {
            break 'declined (0, copy(head_bytes));
        };
        let mut errno = 0;
        if !head_bytes.is_empty() {
            match ctx.export.try_write_at(req.offset, head_bytes, false) {
                Some(Ok(())) => {}
                Some(Err(e)) => errno = nbd_errno(&e),
                None => break 'declined (0, copy(head_bytes)),
            }
        }
        inbuf.clear();
        let mut applied = head.len();
        while applied < plen {
            let n = pipe
                .receive(sock, (plen - applied).min(SPLICE_PIECE))
                .await?;
            if n == 0 {
                return Ok(Spliced::Closed);
            }
            if errno == 0 {
                let at = req.offset + applied as u64;
                let r = {
                    let mut fill = |fd: BorrowedFd<'_>, file_at: u64, len: usize| {
                        pipe.write_to(fd, file_at, len)
                    };
                    ctx.export.try_write_spliced(at, n, &mut fill)
                };
                match r {
                    Some(Ok(())) if pipe.held() == 0 => {}
                    Some(Ok(())) => errno = EIO, // the backend left bytes unwritten
                    Some(Err(e)) => errno = nbd_errno(&e),
                    None => {
                        let mut p = ctx.spares.take(plen - applied);
                        pipe.read_into(&mut p, n)?;
                        break 'declined (applied, p);
                    }
                }
            }
            // What a failed write left in the pipe, or a piece after it.
            pipe.discard()?;
            applied += n;
        }
        return Ok(Spliced::Done(errno));
    };
    inbuf.clear();
    let rest = receive_payload(s, ctx, p, plen - applied, inbuf, |_| {}).await?;
    Ok(rest.map_or(Spliced::Closed, |p| Spliced::Rest { applied, p }))
}

/// Checks a request and answers it inline when it can.
fn handle(
    ctx: &Arc<Ctx>,
    req: &Request,
    payload: Payload<'_>,
    out: &mut Vec<u8>,
    tx: &mpsc::UnboundedSender<Vec<u8>>,
) -> Handled {
    if req.flags & !KNOWN_FLAGS != 0 {
        error_reply(ctx, req, EINVAL, "unknown command flags", out);
        return Handled::Inline;
    }
    let in_range = in_range(ctx, req);
    match req.kind {
        CMD_DISC => Handled::Disconnect,
        CMD_READ => {
            if req.length > MAX_PAYLOAD {
                error_reply(ctx, req, EOVERFLOW, "read too large", out);
                return Handled::Inline;
            }
            if !in_range {
                error_reply(ctx, req, EINVAL, "read beyond the end", out);
                return Handled::Inline;
            }
            // Large reads copy on a blocking thread, in parallel with the
            // task writing earlier replies to the socket.
            if req.length >= PARALLEL_READ_MIN {
                spawn(ctx, tx, *req, None);
                return Handled::Spawned;
            }
            // With structured replies, holes go out as hole chunks: exactly
            // from a map the backend answers without blocking; otherwise a
            // read that comes back all zeroes is sent as one hole chunk, and
            // the blocking path splits by the allocation map.
            let sparse =
                ctx.structured && req.length >= SPARSE_READ_MIN && req.flags & CMD_FLAG_DF == 0;
            if sparse
                && let Some(Ok(extents)) =
                    ctx.export
                        .try_block_status(CONTEXT_ALLOCATION, req.offset, req.length.into())
            {
                let mark = out.len();
                let pieces = pieces(req, Some(extents));
                return match encode_read(ctx, req, &pieces, out) {
                    Some(()) => Handled::Inline,
                    None => {
                        out.truncate(mark);
                        spawn(ctx, tx, *req, None);
                        Handled::Spawned
                    }
                };
            }
            let mark = out.len();
            if ctx.structured && req.length == 0 {
                chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.cookie, 0);
                return Handled::Inline;
            }
            data_reply_header(ctx, req, out);
            let data_at = out.len();
            out.resize(data_at + req.length as usize, 0);
            match ctx.export.try_read_at(req.offset, &mut out[data_at..]) {
                Some(Ok(())) => {
                    if sparse && out[data_at..].iter().all(|b| *b == 0) {
                        out.truncate(mark);
                        chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, req.cookie, 12);
                        out.extend_from_slice(&req.offset.to_be_bytes());
                        out.extend_from_slice(&req.length.to_be_bytes());
                    }
                    Handled::Inline
                }
                Some(Err(e)) => {
                    out.truncate(mark);
                    error_reply(ctx, req, nbd_errno(&e), "read failed", out);
                    Handled::Inline
                }
                None => {
                    out.truncate(mark);
                    spawn(ctx, tx, *req, None);
                    Handled::Spawned
                }
            }
        }
        CMD_WRITE => {
            if ctx.read_only {
                error_reply(ctx, req, EPERM, "read-only export", out);
                return Handled::Inline;
            }
            if !in_range {
                error_reply(ctx, req, ENOSPC, "write beyond the end", out);
                return Handled::Inline;
            }
            let fua = req.flags & CMD_FLAG_FUA != 0;
            match ctx.export.try_write_at(req.offset, payload.as_slice(), fua) {
                Some(r) => {
                    let errno = r.as_ref().map_or_else(nbd_errno, |_| 0);
                    simple_reply(out, errno, req.cookie);
                    if let Payload::Owned(v) = payload {
                        ctx.spares.give(v);
                    }
                    Handled::Inline
                }
                None => {
                    spawn(ctx, tx, *req, Some(payload.into_vec(&ctx.spares)));
                    Handled::Spawned
                }
            }
        }
        CMD_FLUSH => {
            spawn(ctx, tx, *req, None);
            Handled::Spawned
        }
        CMD_TRIM | CMD_WRITE_ZEROES => {
            if ctx.read_only {
                error_reply(ctx, req, EPERM, "read-only export", out);
                return Handled::Inline;
            }
            if !in_range {
                error_reply(ctx, req, ENOSPC, "beyond the end", out);
                return Handled::Inline;
            }
            if req.kind == CMD_WRITE_ZEROES
                && req.flags & CMD_FLAG_FAST_ZERO != 0
                && !ctx.export.can_fast_zero()
            {
                error_reply(ctx, req, ENOTSUP, "zeroes cannot be fast", out);
                return Handled::Inline;
            }
            spawn(ctx, tx, *req, None);
            Handled::Spawned
        }
        CMD_BLOCK_STATUS => {
            if !ctx.structured || ctx.contexts.is_empty() {
                error_reply(ctx, req, EINVAL, "no metadata context selected", out);
                return Handled::Inline;
            }
            if req.length == 0 || !in_range {
                error_reply(ctx, req, EINVAL, "block status beyond the end", out);
                return Handled::Inline;
            }
            spawn(ctx, tx, *req, None);
            Handled::Spawned
        }
        _ => {
            error_reply(ctx, req, EINVAL, "unknown command", out);
            Handled::Inline
        }
    }
}

/// A request on a blocking thread; appends its whole reply to `out`.
fn run_blocking(ctx: &Ctx, req: &Request, payload: &[u8], out: &mut Vec<u8>) {
    let e = &*ctx.export;
    let r: io::Result<()> = match req.kind {
        CMD_READ => return read_blocking(ctx, req, out),
        CMD_WRITE => e.write_at(req.offset, payload, req.flags & CMD_FLAG_FUA != 0),
        CMD_FLUSH => e.flush(),
        CMD_TRIM => e.trim(req.offset, req.length.into()).and_then(|()| {
            if req.flags & CMD_FLAG_FUA != 0 {
                e.flush()
            } else {
                Ok(())
            }
        }),
        CMD_WRITE_ZEROES => e
            .write_zeroes(
                req.offset,
                req.length.into(),
                req.flags & CMD_FLAG_NO_HOLE == 0,
                req.flags & CMD_FLAG_FAST_ZERO != 0,
            )
            .and_then(|()| {
                if req.flags & CMD_FLAG_FUA != 0 {
                    e.flush()
                } else {
                    Ok(())
                }
            }),
        CMD_BLOCK_STATUS => return block_status(ctx, req, out),
        _ => Err(io::ErrorKind::InvalidInput.into()),
    };
    let errno = r.as_ref().map_or_else(nbd_errno, |_| 0);
    simple_reply(out, errno, req.cookie);
}

/// A read on a blocking thread. `out` is a reused buffer holding earlier
/// bytes of no meaning: the whole reply replaces them.
fn read_blocking(ctx: &Ctx, req: &Request, out: &mut Vec<u8>) {
    let e = &*ctx.export;
    let len = u64::from(req.length);
    if !ctx.structured || len == 0 {
        out.clear();
        if ctx.structured {
            chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.cookie, 0);
            return;
        }
        simple_reply(out, 0, req.cookie);
        let at = out.len();
        out.resize(at + len as usize, 0);
        if let Err(err) = e.read_at(req.offset, &mut out[at..]) {
            out.clear();
            simple_reply(out, nbd_errno(&err), req.cookie);
        }
        return;
    }
    let extents = if req.flags & CMD_FLAG_DF == 0 {
        e.block_status(CONTEXT_ALLOCATION, req.offset, len).ok()
    } else {
        None
    };
    let pieces = pieces(req, extents);
    read_in_place(ctx, req, &pieces, out);
}

/// The chunks of a structured read written over `out`, which is first
/// sized to the reply: bytes a reused buffer already holds are overwritten
/// by the reads instead of being zeroed first (zeroing a 1 MiB reply cost
/// a sixth of the server's time in large reads). A failed read replaces
/// the reply by an error chunk.
fn read_in_place(ctx: &Ctx, req: &Request, pieces: &[(u64, u64, bool)], out: &mut Vec<u8>) {
    let total: usize = pieces
        .iter()
        .map(|&(_, n, hole)| CHUNK_HEADER_LEN + if hole { 12 } else { 8 + n as usize })
        .sum();
    out.resize(total, 0);
    let mut head = Vec::with_capacity(CHUNK_HEADER_LEN + 12);
    let mut pos = 0;
    for (i, &(off, n, hole)) in pieces.iter().enumerate() {
        head.clear();
        piece_header(&mut head, req, pieces, i);
        out[pos..pos + head.len()].copy_from_slice(&head);
        pos += head.len();
        if hole {
            continue;
        }
        if let Err(err) = ctx.export.read_at(off, &mut out[pos..pos + n as usize]) {
            out.clear();
            error_chunk(out, req.cookie, nbd_errno(&err), "read failed");
            return;
        }
        pos += n as usize;
    }
    debug_assert_eq!(pos, total);
}

/// Splits a read into (offset, length, hole) pieces by an allocation map
/// (one data piece without a map).
fn pieces(req: &Request, extents: Option<Vec<crate::export::Extent>>) -> Vec<(u64, u64, bool)> {
    let len = u64::from(req.length);
    let end = req.offset + len;
    let mut pieces: Vec<(u64, u64, bool)> = Vec::new();
    let mut pos = req.offset;
    for x in extents.unwrap_or_default() {
        let n = x.length.min(end - pos);
        if n == 0 {
            break;
        }
        let hole = x.flags & STATE_ZERO != 0;
        match pieces.last_mut() {
            Some(last) if last.2 == hole => last.1 += n,
            _ => pieces.push((pos, n, hole)),
        }
        pos += n;
    }
    if pos < end {
        match pieces.last_mut() {
            Some(last) if !last.2 => last.1 += end - pos,
            _ => pieces.push((pos, end - pos, false)),
        }
    }
    pieces
}

/// Appends the chunk header of piece `i` of a structured read: a hole
/// chunk whole, a data chunk up to its data. The last piece carries DONE.
fn piece_header(out: &mut Vec<u8>, req: &Request, pieces: &[(u64, u64, bool)], i: usize) {
    let (off, n, hole) = pieces[i];
    let flags = if i + 1 == pieces.len() {
        REPLY_FLAG_DONE
    } else {
        0
    };
    if hole {
        chunk_header(out, flags, REPLY_TYPE_OFFSET_HOLE, req.cookie, 12);
        out.extend_from_slice(&off.to_be_bytes());
        out.extend_from_slice(&(n as u32).to_be_bytes());
    } else {
        chunk_header(out, flags, REPLY_TYPE_OFFSET_DATA, req.cookie, n as u32 + 8);
        out.extend_from_slice(&off.to_be_bytes());
    }
}

/// Appends the chunks of a structured read, using only `try_read_at`:
/// `None` (the caller truncates `out`) when the backend would block. A
/// failed read replaces the reply by an error chunk.
fn encode_read(
    ctx: &Ctx,
    req: &Request,
    pieces: &[(u64, u64, bool)],
    out: &mut Vec<u8>,
) -> Option<()> {
    let e = &*ctx.export;
    let mark = out.len();
    for (i, &(off, n, hole)) in pieces.iter().enumerate() {
        piece_header(out, req, pieces, i);
        if hole {
            continue;
        }
        let at = out.len();
        out.resize(at + n as usize, 0);
        if let Err(err) = e.try_read_at(off, &mut out[at..])? {
            out.truncate(mark);
            error_chunk(out, req.cookie, nbd_errno(&err), "read failed");
            return Some(());
        }
    }
    Some(())
}

fn block_status(ctx: &Ctx, req: &Request, out: &mut Vec<u8>) {
    let len = u64::from(req.length);
    let n = ctx.contexts.len();
    for (i, (id, name)) in ctx.contexts.iter().enumerate() {
        let extents = match ctx.export.block_status(name, req.offset, len) {
            Ok(x) if !x.is_empty() => x,
            Ok(_) => {
                out.clear();
                error_chunk(out, req.cookie, EIO, "backend returned no extents");
                return;
            }
            Err(err) => {
                out.clear();
                error_chunk(out, req.cookie, nbd_errno(&err), "block status failed");
                return;
            }
        };
        let mut descs: Vec<(u32, u32)> = Vec::with_capacity(extents.len());
        let mut pos = 0u64;
        for x in extents {
            let l = x.length.min(len - pos);
            if l == 0 {
                break;
            }
            descs.push((l as u32, x.flags));
            pos += l;
            if req.flags & CMD_FLAG_REQ_ONE != 0 {
                break;
            }
        }
        let flags = if i + 1 == n { REPLY_FLAG_DONE } else { 0 };
        chunk_header(
            out,
            flags,
            REPLY_TYPE_BLOCK_STATUS,
            req.cookie,
            4 + 8 * descs.len() as u32,
        );
        out.extend_from_slice(&id.to_be_bytes());
        for (l, f) in descs {
            out.extend_from_slice(&l.to_be_bytes());
            out.extend_from_slice(&f.to_be_bytes());
        }
    }
}
