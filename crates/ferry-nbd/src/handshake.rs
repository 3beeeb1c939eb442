//! The server side of the fixed newstyle handshake: the greeting and the
//! option haggling up to `NBD_OPT_GO` / `NBD_OPT_EXPORT_NAME`.
//!
//! State reset after STARTTLS: [`negotiate`] is called afresh on the TLS
//! stream with empty state, so nothing negotiated in clear text survives.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::{Error, ErrorKind, Result};
use crate::proto::*;
use crate::server::{ExportEntry, Peer, Shared, TlsMode};

pub(crate) enum Outcome {
    Abort,
    StartTls,
    Go(Session),
}

/// What the transmission phase needs from the handshake.
pub(crate) struct Session {
    pub entry: Arc<ExportEntry>,
    pub structured: bool,
    /// Selected metadata contexts: (id, name).
    pub contexts: Vec<(u32, String)>,
    pub flags: u16,
}

/// Sends the greeting and reads the client flags; returns NO_ZEROES.
pub(crate) async fn greet<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<bool> {
    let mut g = Vec::with_capacity(18);
    g.extend_from_slice(&NBDMAGIC.to_be_bytes());
    g.extend_from_slice(&IHAVEOPT.to_be_bytes());
    g.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&g)
        .await
        .map_err(|e| Error::io("greeting", e))?;
    s.flush().await.map_err(|e| Error::io("greeting", e))?;
    let flags = s
        .read_u32()
        .await
        .map_err(|e| Error::io("reading client flags", e))?;
    if flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0
        || flags & CLIENT_FIXED_NEWSTYLE == 0
    {
        return Err(Error::new(
            ErrorKind::Protocol,
            format!("client flags {flags:#x}"),
        ));
    }
    Ok(flags & CLIENT_NO_ZEROES != 0)
}

async fn reply<S: AsyncWrite + Unpin>(s: &mut S, opt: u32, kind: u32, data: &[u8]) -> Result<()> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    s.write_all(&v)
        .await
        .map_err(|e| Error::io("option reply", e))?;
    Ok(())
}

/// The transmission flags of an export for this session.
fn transmission_flags(entry: &ExportEntry, structured: bool) -> u16 {
    let e = &entry.export;
    let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA;
    if e.read_only() {
        f |= TF_READ_ONLY;
    } else {
        f |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES;
        if e.can_fast_zero() {
            f |= TF_SEND_FAST_ZERO;
        }
    }
    if structured {
        f |= TF_SEND_DF;
    }
    if e.can_multi_conn() {
        f |= TF_CAN_MULTI_CONN;
    }
    f
}

/// Contexts of an export with their ids (ids are positions, stable while
/// the export lives: base:allocation is 1).
fn contexts_of(entry: &ExportEntry) -> Vec<(u32, String)> {
    let mut v = vec![(1, CONTEXT_ALLOCATION.to_string())];
    for (i, c) in entry.export.meta_contexts().into_iter().enumerate() {
        v.push((i as u32 + 2, c));
    }
    v
}

fn query_matches(query: &str, name: &str, list: bool) -> bool {
    if query == name {
        return true;
    }
    // LIST accepts a namespace ("base:") or a leaf prefix ending in ':'.
    list && query.ends_with(':') && name.starts_with(query)
}

/// Haggles options until the client picks an export, aborts, or asks for TLS.
pub(crate) async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    shared: &Shared,
    peer: Peer,
    no_zeroes: bool,
) -> Result<Outcome> {
    let mut structured = false;
    // (export name it was set for, selection)
    let mut selection: Option<(String, Vec<(u32, String)>)> = None;
    loop {
        s.flush().await.map_err(|e| Error::io("option reply", e))?;
        let mut h = [0u8; 16];
        s.read_exact(&mut h)
            .await
            .map_err(|e| Error::io("reading option", e))?;
        let magic = be64(&h[0..8]);
        if magic != IHAVEOPT {
            return Err(Error::new(
                ErrorKind::Protocol,
                format!("option magic {magic:#x}"),
            ));
        }
        let opt = be32(&h[8..12]);
        let len = be32(&h[12..16]);
        if len > MAX_OPTION_LEN {
            if len > 16 << 20 {
                return Err(Error::new(
                    ErrorKind::Protocol,
                    format!("option of {len} bytes"),
                ));
            }
            let mut sink = tokio::io::sink();
            tokio::io::copy(&mut (&mut *s).take(len.into()), &mut sink)
                .await
                .map_err(|e| Error::io("skipping option", e))?;
            reply(s, opt, REP_ERR_TOO_BIG, b"option too long").await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)
            .await
            .map_err(|e| Error::io("reading option data", e))?;

        if shared.tls_mode == TlsMode::Required
            && !peer.tls
            && opt != OPT_STARTTLS
            && opt != OPT_ABORT
        {
            if opt == OPT_EXPORT_NAME {
                return Err(Error::new(
                    ErrorKind::Refused,
                    "EXPORT_NAME before STARTTLS",
                ));
            }
            reply(s, opt, REP_ERR_TLS_REQD, b"TLS required").await?;
            continue;
        }

        match opt {
            OPT_ABORT => {
                // The client may already be gone; the ACK is a courtesy.
                let _ = reply(s, opt, REP_ACK, &[]).await;
                let _ = s.flush().await;
                return Ok(Outcome::Abort);
            }
            OPT_STARTTLS => {
                if shared.tls.is_none() || shared.tls_mode == TlsMode::Off {
                    reply(s, opt, REP_ERR_UNSUP, b"TLS not configured").await?;
                } else if peer.tls {
                    reply(s, opt, REP_ERR_INVALID, b"TLS already on").await?;
                } else if !data.is_empty() {
                    reply(s, opt, REP_ERR_INVALID, b"STARTTLS takes no data").await?;
                } else {
                    reply(s, opt, REP_ACK, &[]).await?;
                    s.flush().await.map_err(|e| Error::io("starttls", e))?;
                    return Ok(Outcome::StartTls);
                }
            }
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(entry) = shared.lookup(&name, peer) else {
                    return Err(Error::new(ErrorKind::NotFound, format!("export {name:?}")));
                };
                let flags = transmission_flags(&entry, structured);
                let mut v = Vec::with_capacity(134);
                v.extend_from_slice(&entry.export.size().to_be_bytes());
                v.extend_from_slice(&flags.to_be_bytes());
                if !no_zeroes {
                    v.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&v)
                    .await
                    .map_err(|e| Error::io("export reply", e))?;
                s.flush().await.map_err(|e| Error::io("export reply", e))?;
                let contexts = take_selection(&mut selection, &name);
                return Ok(Outcome::Go(Session {
                    entry,
                    structured,
                    contexts,
                    flags,
                }));
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply(s, opt, REP_ERR_INVALID, b"LIST takes no data").await?;
                    continue;
                }
                for (name, desc) in shared.listed() {
                    let mut v = Vec::new();
                    put_string(&mut v, &name);
                    v.extend_from_slice(desc.as_bytes());
                    reply(s, opt, REP_SERVER, &v).await?;
                }
                reply(s, opt, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                let req = match InfoRequest::parse(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        reply(s, opt, REP_ERR_INVALID, e.to_string().as_bytes()).await?;
                        continue;
                    }
                };
                let Some(entry) = shared.lookup(&req.name, peer) else {
                    reply(s, opt, REP_ERR_UNKNOWN, b"no such export").await?;
                    continue;
                };
                let flags = transmission_flags(&entry, structured);
                let mut v = Vec::with_capacity(12);
                v.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                v.extend_from_slice(&entry.export.size().to_be_bytes());
                v.extend_from_slice(&flags.to_be_bytes());
                reply(s, opt, REP_INFO, &v).await?;
                if req.infos.contains(&INFO_NAME) {
                    let mut v = INFO_NAME.to_be_bytes().to_vec();
                    v.extend_from_slice(entry.name.as_bytes());
                    reply(s, opt, REP_INFO, &v).await?;
                }
                if req.infos.contains(&INFO_DESCRIPTION) && !entry.options.description.is_empty() {
                    let mut v = INFO_DESCRIPTION.to_be_bytes().to_vec();
                    v.extend_from_slice(entry.options.description.as_bytes());
                    reply(s, opt, REP_INFO, &v).await?;
                }
                let bs = entry.export.block_size();
                let mut v = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                v.extend_from_slice(&bs.minimum.to_be_bytes());
                v.extend_from_slice(&bs.preferred.to_be_bytes());
                v.extend_from_slice(&bs.maximum.to_be_bytes());
                reply(s, opt, REP_INFO, &v).await?;
                reply(s, opt, REP_ACK, &[]).await?;
                if opt == OPT_GO {
                    s.flush().await.map_err(|e| Error::io("go reply", e))?;
                    let contexts = take_selection(&mut selection, &req.name);
                    return Ok(Outcome::Go(Session {
                        entry,
                        structured,
                        contexts,
                        flags,
                    }));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply(s, opt, REP_ERR_INVALID, b"takes no data").await?;
                } else {
                    structured = true;
                    reply(s, opt, REP_ACK, &[]).await?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = opt == OPT_SET_META_CONTEXT;
                if set && !structured {
                    reply(s, opt, REP_ERR_INVALID, b"structured replies first").await?;
                    continue;
                }
                let req = match MetaRequest::parse(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        reply(s, opt, REP_ERR_INVALID, e.to_string().as_bytes()).await?;
                        continue;
                    }
                };
                let Some(entry) = shared.lookup(&req.export, peer) else {
                    reply(s, opt, REP_ERR_UNKNOWN, b"no such export").await?;
                    continue;
                };
                let all = contexts_of(&entry);
                let chosen: Vec<(u32, String)> = if !set && req.queries.is_empty() {
                    all
                } else {
                    all.into_iter()
                        .filter(|(_, n)| req.queries.iter().any(|q| query_matches(q, n, !set)))
                        .collect()
                };
                for (id, name) in &chosen {
                    let mut v = id.to_be_bytes().to_vec();
                    v.extend_from_slice(name.as_bytes());
                    reply(s, opt, REP_META_CONTEXT, &v).await?;
                }
                reply(s, opt, REP_ACK, &[]).await?;
                if set {
                    selection = Some((req.export, chosen));
                }
            }
            OPT_EXTENDED_HEADERS => {
                reply(s, opt, REP_ERR_UNSUP, b"extended headers not supported").await?;
            }
            _ => {
                reply(s, opt, REP_ERR_UNSUP, b"unknown option").await?;
            }
        }
    }
}

/// The meta contexts selected for `name`, if SET_META_CONTEXT named it.
fn take_selection(
    sel: &mut Option<(String, Vec<(u32, String)>)>,
    name: &str,
) -> Vec<(u32, String)> {
    match sel.take() {
        Some((n, v)) if n == name => v,
        _ => Vec::new(),
    }
}
