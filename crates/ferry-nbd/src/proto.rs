//! The NBD wire format: magic numbers, flags, and the pure parsers of what
//! a peer sends (option payloads, request headers). Nothing here does I/O,
//! so the fuzz target drives these functions directly.
//!
//! All integers on the wire are big-endian.

/// `NBDMAGIC`, the first 8 bytes a server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation, and the prefix of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Prefix of every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1;
pub const CLIENT_NO_ZEROES: u32 = 2;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

// Information types of INFO / GO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured replies.
pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

// Error numbers.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

// base:allocation flags.
pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;
/// Flag of the change-tracking context: the extent changed since the snapshot.
pub const STATE_CHANGED: u32 = 1;

/// The allocation context every export has.
pub const CONTEXT_ALLOCATION: &str = "base:allocation";
/// Prefix of the change-tracking contexts (`ferry:changed:<snapshot>`).
pub const CONTEXT_CHANGED_PREFIX: &str = "ferry:changed:";

/// Largest payload of a read or write (32 MiB).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option payload the server reads (names are at most 4 KiB).
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Size of a request header.
pub const REQUEST_LEN: usize = 28;
/// Size of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Size of a simple reply.
pub const SIMPLE_REPLY_LEN: usize = 16;

/// Why a peer's bytes could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    BadMagic(u64),
    Truncated,
    TooLong,
    TrailingBytes,
    NotUtf8,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParseError::BadMagic(m) => write!(f, "bad magic {m:#x}"),
            ParseError::Truncated => write!(f, "truncated"),
            ParseError::TooLong => write!(f, "length over the limit"),
            ParseError::TrailingBytes => write!(f, "trailing bytes"),
            ParseError::NotUtf8 => write!(f, "string is not UTF-8"),
        }
    }
}

/// A transmission-phase request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    /// Parses the 28-byte header; only the magic is checked here.
    pub fn parse(b: &[u8]) -> Result<Request, ParseError> {
        if b.len() < REQUEST_LEN {
            return Err(ParseError::Truncated);
        }
        let magic = be32(&b[0..4]);
        if magic != REQUEST_MAGIC {
            return Err(ParseError::BadMagic(magic.into()));
        }
        Ok(Request {
            flags: be16(&b[4..6]),
            kind: be16(&b[6..8]),
            cookie: be64(&b[8..16]),
            offset: be64(&b[16..24]),
            length: be32(&b[24..28]),
        })
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.kind.to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        out.extend_from_slice(&self.length.to_be_bytes());
    }

    /// How many payload bytes follow the header on the wire.
    pub fn payload_len(&self) -> u32 {
        if self.kind == CMD_WRITE {
            self.length
        } else {
            0
        }
    }
}

/// A cursor over an option payload.
pub struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(b: &'a [u8]) -> Self {
        Reader { b }
    }
    pub fn u16(&mut self) -> Result<u16, ParseError> {
        Ok(be16(self.take(2)?))
    }
    pub fn u32(&mut self) -> Result<u32, ParseError> {
        Ok(be32(self.take(4)?))
    }
    pub fn u64(&mut self) -> Result<u64, ParseError> {
        Ok(be64(self.take(8)?))
    }
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], ParseError> {
        if self.b.len() < n {
            return Err(ParseError::Truncated);
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    /// A string preceded by its u32 length, at most 4 KiB as the spec says.
    pub fn string(&mut self) -> Result<String, ParseError> {
        let n = self.u32()?;
        if n > 4096 {
            return Err(ParseError::TooLong);
        }
        let s = self.take(n as usize)?;
        String::from_utf8(s.to_vec()).map_err(|_| ParseError::NotUtf8)
    }
    pub fn rest(&self) -> &'a [u8] {
        self.b
    }
    pub fn finish(&self) -> Result<(), ParseError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(ParseError::TrailingBytes)
        }
    }
}

/// The payload of `NBD_OPT_INFO` / `NBD_OPT_GO`: an export name and the
/// information types the client asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub infos: Vec<u16>,
}

impl InfoRequest {
    pub fn parse(b: &[u8]) -> Result<Self, ParseError> {
        let mut r = Reader::new(b);
        let name = r.string()?;
        let n = r.u16()?;
        let mut infos = Vec::with_capacity(n.min(16) as usize);
        for _ in 0..n {
            infos.push(r.u16()?);
        }
        r.finish()?;
        Ok(InfoRequest { name, infos })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        put_string(&mut v, &self.name);
        v.extend_from_slice(&(self.infos.len() as u16).to_be_bytes());
        for i in &self.infos {
            v.extend_from_slice(&i.to_be_bytes());
        }
        v
    }
}

/// The payload of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    pub export: String,
    pub queries: Vec<String>,
}

impl MetaRequest {
    pub fn parse(b: &[u8]) -> Result<Self, ParseError> {
        let mut r = Reader::new(b);
        let export = r.string()?;
        let n = r.u32()?;
        if n > 1024 {
            return Err(ParseError::TooLong);
        }
        let mut queries = Vec::with_capacity(n as usize);
        for _ in 0..n {
            queries.push(r.string()?);
        }
        r.finish()?;
        Ok(MetaRequest { export, queries })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        put_string(&mut v, &self.export);
        v.extend_from_slice(&(self.queries.len() as u32).to_be_bytes());
        for q in &self.queries {
            put_string(&mut v, q);
        }
        v
    }
}

pub fn put_string(v: &mut Vec<u8>, s: &str) {
    v.extend_from_slice(&(s.len() as u32).to_be_bytes());
    v.extend_from_slice(s.as_bytes());
}

/// Appends a simple reply header.
pub fn simple_reply(out: &mut Vec<u8>, error: u32, cookie: u64) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// Appends a structured reply chunk header.
pub fn chunk_header(out: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, len: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Appends a structured error chunk (with DONE).
pub fn error_chunk(out: &mut Vec<u8>, cookie: u64, error: u32, msg: &str) {
    let msg = &msg.as_bytes()[..msg.len().min(1024)];
    chunk_header(
        out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + msg.len() as u32,
    );
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
}

pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
pub fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            cookie: 7,
            offset: 4096,
            length: 512,
        };
        let mut v = Vec::new();
        r.encode(&mut v);
        assert_eq!(v.len(), REQUEST_LEN);
        assert_eq!(Request::parse(&v).unwrap(), r);
        v[0] ^= 1;
        assert!(matches!(Request::parse(&v), Err(ParseError::BadMagic(_))));
        assert_eq!(Request::parse(&v[..27]), Err(ParseError::Truncated));
    }

    #[test]
    fn info_and_meta_round_trip() {
        let i = InfoRequest {
            name: "disk".into(),
            infos: vec![INFO_BLOCK_SIZE, INFO_NAME],
        };
        assert_eq!(InfoRequest::parse(&i.encode()).unwrap(), i);
        let mut bad = i.encode();
        bad.push(0);
        assert_eq!(InfoRequest::parse(&bad), Err(ParseError::TrailingBytes));
        let m = MetaRequest {
            export: "disk".into(),
            queries: vec![CONTEXT_ALLOCATION.into(), "ferry:changed:s1".into()],
        };
        assert_eq!(MetaRequest::parse(&m.encode()).unwrap(), m);
        let e = m.encode();
        assert_eq!(
            MetaRequest::parse(&e[..e.len() - 1]),
            Err(ParseError::Truncated)
        );
    }

    #[test]
    fn string_length_is_bounded() {
        let mut v = Vec::new();
        v.extend_from_slice(&5000u32.to_be_bytes());
        v.extend(std::iter::repeat_n(b'a', 5000));
        assert_eq!(Reader::new(&v).string(), Err(ParseError::TooLong));
    }
}
