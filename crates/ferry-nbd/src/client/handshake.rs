//! The client side of the fixed newstyle handshake.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{BoxIo, ClientConfig};
use crate::error::{Error, ErrorKind, Result};
use crate::proto::*;

/// What GO told us about the export.
pub(crate) struct Negotiated {
    pub io: BoxIo,
    pub size: u64,
    pub flags: u16,
    pub structured: bool,
    pub contexts: Vec<(u32, String)>,
}

pub(crate) async fn send_option(io: &mut BoxIo, opt: u32, data: &[u8]) -> Result<()> {
    let mut v = Vec::with_capacity(16 + data.len());
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    io.write_all(&v)
        .await
        .map_err(|e| Error::io("sending option", e))?;
    io.flush().await.map_err(|e| Error::io("sending option", e))
}

/// Reads one option reply: (reply type, data).
pub(crate) async fn read_reply(io: &mut BoxIo, opt: u32) -> Result<(u32, Vec<u8>)> {
    let mut h = [0u8; 20];
    io.read_exact(&mut h)
        .await
        .map_err(|e| Error::io("reading option reply", e))?;
    if be64(&h[0..8]) != REPLY_MAGIC || be32(&h[8..12]) != opt {
        return Err(Error::new(
            ErrorKind::Protocol,
            format!("reply to option {opt}"),
        ));
    }
    let kind = be32(&h[12..16]);
    let len = be32(&h[16..20]);
    if len > MAX_OPTION_LEN {
        return Err(Error::new(
            ErrorKind::Protocol,
            format!("option reply of {len} bytes"),
        ));
    }
    let mut data = vec![0u8; len as usize];
    io.read_exact(&mut data)
        .await
        .map_err(|e| Error::io("reading option reply", e))?;
    Ok((kind, data))
}

fn refused(what: &str, kind: u32, data: &[u8]) -> Error {
    let msg = String::from_utf8_lossy(data);
    let k = match kind {
        REP_ERR_UNKNOWN => ErrorKind::NotFound,
        REP_ERR_TLS_REQD => ErrorKind::Refused,
        _ => ErrorKind::Refused,
    };
    Error::new(k, format!("{what}: reply {kind:#x} {msg}"))
}

/// Reads the greeting and sends our flags; returns the stream.
pub(crate) async fn greet(mut io: BoxIo) -> Result<BoxIo> {
    let mut g = [0u8; 18];
    io.read_exact(&mut g)
        .await
        .map_err(|e| Error::io("reading greeting", e))?;
    if be64(&g[0..8]) != NBDMAGIC || be64(&g[8..16]) != IHAVEOPT {
        return Err(Error::new(ErrorKind::Protocol, "not a newstyle NBD server"));
    }
    let sflags = be16(&g[16..18]);
    if sflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(Error::new(
            ErrorKind::Protocol,
            "server is not fixed newstyle",
        ));
    }
    // Without NO_ZEROES, EXPORT_NAME would add 124 bytes; we only use GO.
    let cflags = CLIENT_FIXED_NEWSTYLE | (u32::from(sflags & FLAG_NO_ZEROES) & CLIENT_NO_ZEROES);
    io.write_all(&cflags.to_be_bytes())
        .await
        .map_err(|e| Error::io("sending client flags", e))?;
    Ok(io)
}

/// Upgrades to TLS if configured.
pub(crate) async fn starttls(mut io: BoxIo, cfg: &ClientConfig) -> Result<BoxIo> {
    let Some((tls, host)) = &cfg.tls else {
        return Ok(io);
    };
    send_option(&mut io, OPT_STARTTLS, &[]).await?;
    let (kind, data) = read_reply(&mut io, OPT_STARTTLS).await?;
    if kind != REP_ACK {
        return Err(refused("starttls", kind, &data));
    }
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(tls));
    let name = crate::tls::server_name(host)?;
    let s = connector
        .connect(name, io)
        .await
        .map_err(|e| Error::with_source(ErrorKind::Tls, format!("tls handshake with {host}"), e))?;
    Ok(Box::new(s))
}

/// Asks for the export list.
pub(crate) async fn list(io: &mut BoxIo) -> Result<Vec<String>> {
    send_option(io, OPT_LIST, &[]).await?;
    let mut names = Vec::new();
    loop {
        let (kind, data) = read_reply(io, OPT_LIST).await?;
        match kind {
            REP_ACK => return Ok(names),
            REP_SERVER => {
                let mut r = Reader::new(&data);
                let n = r
                    .u32()
                    .map_err(|e| Error::new(ErrorKind::Protocol, format!("list: {e}")))?;
                let s = r
                    .take(n as usize)
                    .map_err(|e| Error::new(ErrorKind::Protocol, format!("list: {e}")))?;
                names.push(String::from_utf8_lossy(s).into_owned());
            }
            k => return Err(refused("list", k, &data)),
        }
    }
}

/// Structured replies, meta contexts, then GO.
pub(crate) async fn go(mut io: BoxIo, cfg: &ClientConfig) -> Result<Negotiated> {
    send_option(&mut io, OPT_STRUCTURED_REPLY, &[]).await?;
    let (kind, data) = read_reply(&mut io, OPT_STRUCTURED_REPLY).await?;
    let structured = match kind {
        REP_ACK => true,
        REP_ERR_UNSUP => false,
        k => return Err(refused("structured replies", k, &data)),
    };
    let mut contexts = Vec::new();
    if structured && !cfg.meta_contexts.is_empty() {
        let req = MetaRequest {
            export: cfg.export.clone(),
            queries: cfg.meta_contexts.clone(),
        };
        send_option(&mut io, OPT_SET_META_CONTEXT, &req.encode()).await?;
        loop {
            let (kind, data) = read_reply(&mut io, OPT_SET_META_CONTEXT).await?;
            match kind {
                REP_ACK => break,
                REP_META_CONTEXT if data.len() >= 4 => {
                    let id = be32(&data[0..4]);
                    contexts.push((id, String::from_utf8_lossy(&data[4..]).into_owned()));
                }
                k => return Err(refused("set meta context", k, &data)),
            }
        }
    }
    let req = InfoRequest {
        name: cfg.export.clone(),
        infos: vec![INFO_BLOCK_SIZE],
    };
    send_option(&mut io, OPT_GO, &req.encode()).await?;
    let mut export = None;
    loop {
        let (kind, data) = read_reply(&mut io, OPT_GO).await?;
        match kind {
            REP_ACK => break,
            REP_INFO if data.len() >= 2 => {
                if be16(&data[0..2]) == INFO_EXPORT && data.len() == 12 {
                    export = Some((be64(&data[2..10]), be16(&data[10..12])));
                }
            }
            REP_INFO => return Err(Error::new(ErrorKind::Protocol, "short info reply")),
            k => return Err(refused(&format!("export {:?}", cfg.export), k, &data)),
        }
    }
    let (size, flags) =
        export.ok_or_else(|| Error::new(ErrorKind::Protocol, "GO without INFO_EXPORT"))?;
    Ok(Negotiated {
        io,
        size,
        flags,
        structured,
        contexts,
    })
}
