//! Ferry's NBD server and client.
//!
//! NBD is Ferry's wire: QEMU reads and writes pool volumes through it and
//! hosts pull chunks from each other with it. This crate speaks the
//! protocol of the NetworkBlockDevice project's `doc/proto.md`:
//!
//! - **On the wire**: the fixed newstyle handshake (`NBDMAGIC`, `IHAVEOPT`,
//!   NO_ZEROES), option haggling (EXPORT_NAME, ABORT, LIST, INFO, GO,
//!   STRUCTURED_REPLY, LIST/SET_META_CONTEXT, STARTTLS; anything else is
//!   answered ERR_UNSUP, extended headers included), then 28-byte requests
//!   answered by simple or structured replies, out of order. See
//!   [`proto`] for every number.
//! - **Backends**: a server serves [`Export`]s, a synchronous byte-range
//!   trait (read, write with FUA, flush, trim, zeroes, block status per
//!   metadata context). `base:allocation` is every export's; a backend may
//!   add `ferry:changed:<snapshot>` contexts, whose flag 1 marks blocks
//!   changed since the snapshot (as `qemu:dirty-bitmap:` does). Two
//!   backends live here: [`FileExport`] and [`MemoryExport`].
//! - **Access**: an export with a secret is reachable only as
//!   `<name>/<secret>` (compared in constant time, hidden from LIST,
//!   unknown and forbidden answered alike), or by its bare name from a
//!   TLS client whose certificate the server's client CA verified, if the
//!   export allows it. [`TlsMode::Required`] answers every option before
//!   STARTTLS with ERR_TLS_REQD; after STARTTLS the option state starts
//!   afresh.
//! - **What a crash can leave**: the server keeps no state of its own.
//!   A write is acknowledged only after the backend returned from it; with
//!   FUA, or after a FLUSH (which covers every write acknowledged on any
//!   connection when CAN_MULTI_CONN is advertised), after it is durable. A
//!   `kill -9` of the server therefore loses at most writes that were never
//!   flushed, which NBD allows; a client reconnects and goes on. A write
//!   never acknowledged (the client gone mid-payload, a crash) may be
//!   partly applied, as on any disk.
//! - **Hostile clients**: bad magic, oversize payloads (over 32 MiB),
//!   unknown commands and flags get an error or a disconnect of that
//!   connection only; each connection has at most
//!   [`transmission::MAX_INFLIGHT`] requests outstanding, so a client that
//!   never reads its replies stalls only itself.
//!
//! The [`client`] module holds the async client (GO, structured replies,
//! block status, several connections, reconnect with back-off) and a
//! blocking facade for synchronous callers.

pub mod backend;
pub mod buffers;
pub mod client;
pub mod error;
pub mod export;
#[doc(hidden)]
pub mod fuzzing;
mod handshake;
pub mod proto;
pub mod server;
pub mod tls;
pub mod transmission;
pub mod wire;

pub use backend::{FileExport, MemoryExport};
pub use client::{BlockingClient, Client, ClientConfig, Pool};
pub use error::{Error, ErrorKind, Result};
pub use export::{BlockSize, Export, Extent, Fill, InlineWrites, Mapped, ReadOnly};
pub use server::{ExportOptions, Server, TlsMode};
