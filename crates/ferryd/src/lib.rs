//! ferryd: one per host. Owns the host's pool and its operations journal,
//! serves the HTTP API (`/v1`, bearer-token auth) that the `ferry` CLI and
//! peers use.
//!
//! # Data directory
//! `ferryd init --data-dir D` creates:
//! - `D/pool/` — the thin block pool (format documented in `ferry-pool`);
//! - `D/journal.db` — the SQLite operations journal (`ferry-ops`);
//! - `D/admin.token` — the admin API token (mode 0600);
//! - `D/peer.token` — the token other hosts use; it opens only `/v1/peer/`;
//! - `D/peers.json` — registered peers: URL + their peer token (mode 0600);
//! - `D/run/` — sockets and run files (`run/nbd.sock`: the local NBD listener);
//! - `D/vms/<uuid>.json` — VM definitions; `D/run/vms/<uuid>/` their QEMU run
//!   directories (see [`vms`]);
//! - `D/migrate-in.json` — lazy volumes of VMs migrating here and where
//!   their chunks come from (mode 0600: export secrets; see [`migrate`]);
//! - `D/migrations/<batch>.json` — durable records of batch migrations
//!   to this host (see [`migrate::records`], [`batch`]);
//! - `D/exports.json` — the NBD exports and their secrets (mode 0600);
//! - `D/ferryd.toml` — the configuration, written last: its presence marks
//!   a complete data directory.
//!
//! # Crash behaviour
//! After `kill -9` and a restart, the pool recovers to its last flush
//! (every write acknowledged after a flush survives) and every unfinished
//! operation is rolled forward or compensated (its log says which).

pub mod api;
pub mod auth;
pub mod backups;
pub mod batch;
pub mod body;
pub mod config;
pub mod daemon;
pub mod exports;
pub mod groupsnap;
pub mod migrate;
pub mod nbd_export;
pub mod openapi;
pub mod operations;
pub mod peers;
pub mod remote_source;
pub mod ui;
pub mod vmcopy;
pub mod vms;
