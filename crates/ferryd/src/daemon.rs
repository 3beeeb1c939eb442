//! The daemon's state and life cycle: open the data directory, recover
//! unfinished operations, serve the API, shut down cleanly.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use ferry_ops::{Journal, Manager};
use ferry_pool::{Pool, PoolOptions};

use crate::auth::new_token;
use crate::config::{Config, DataDir, write_atomic};
use crate::exports::Exports;
use crate::peers::Peers;
use crate::vms::Vms;

/// What operations' steps act on.
pub struct App {
    pub pool: Pool,
    pub dir: DataDir,
}

/// One running ferryd.
pub struct Daemon {
    pub cfg: Config,
    pub dir: DataDir,
    pub ops: Arc<Manager<App>>,
    pub exports: Arc<Exports>,
    /// The VMs of this host; processes are re-attached by `Vms::reattach_all`.
    pub vms: Arc<Vms>,
    pub admin_token: String,
    /// Opens only `/v1/peer/`; other hosts hold it.
    pub peer_token: String,
    pub peers: Arc<Peers>,
    /// Lazy volumes of VMs migrating here (see [`crate::migrate`]).
    pub inbound: Arc<crate::migrate::Inbound>,
    /// Backup repositories and the backup operations.
    pub backups: Arc<crate::backups::Backups>,
    /// Batch migrations: coordinator and destination records.
    pub batches: Arc<crate::batch::Env>,
    pub started: Instant,
}

impl Daemon {
    pub fn pool(&self) -> &Pool {
        &self.ops.app().pool
    }

    /// Opens the data directory made by [`init`] and recovers unfinished
    /// operations.
    pub fn open(dir: DataDir, cfg: Config) -> anyhow::Result<Arc<Daemon>> {
        let pool = Pool::open(dir.pool())
            .with_context(|| format!("cannot open the pool in {}", dir.pool().display()))?;
        let rec = pool.recovery();
        if rec.replayed > 0 {
            tracing::info!(
                "pool: replayed {} staged change(s) of writes acknowledged before the previous ferryd ended without a flush",
                rec.replayed
            );
        }
        for d in &rec.dropped {
            tracing::warn!("pool: stage log not replayed: {d}");
        }
        let journal = Arc::new(Journal::open(dir.journal())?);
        let admin_token = std::fs::read_to_string(dir.token())
            .with_context(|| format!("cannot read {}", dir.token().display()))?
            .trim()
            .to_string();
        // Data directories made before peers existed get their peer token now.
        let peer_token = read_or_create_token(&dir.peer_token())?;
        let peers = Arc::new(Peers::load(dir.peers())?);
        std::fs::create_dir_all(dir.run())?;
        let inbound = Arc::new(crate::migrate::Inbound::load(
            pool.clone(),
            dir.root.join("migrate-in.json"),
        )?);
        let exports = Arc::new(Exports::load(&pool, dir.exports(), dir.nbd_socket())?);
        let vms = Arc::new(Vms::load(
            &dir,
            &cfg.accel,
            pool.clone(),
            exports.clone(),
            peers.clone(),
        )?);
        let ops = Manager::new(
            journal,
            Arc::new(App {
                pool,
                dir: dir.clone(),
            }),
        );
        crate::operations::register(&ops);
        crate::vms::relocate_op::register(&ops, vms.clone());
        crate::groupsnap::register(&ops, &vms, &exports, &peers, &cfg.name, &dir.root);
        crate::migrate::register(
            &ops,
            Arc::new(crate::migrate::Env {
                vms: vms.clone(),
                exports: exports.clone(),
                peers: peers.clone(),
                inbound: inbound.clone(),
                host: cfg.name.clone(),
            }),
        );
        let backups = crate::backups::register(
            &ops,
            std::sync::Arc::new(crate::groupsnap::Env {
                vms: vms.clone(),
                exports: exports.clone(),
                peers: peers.clone(),
                host: cfg.name.clone(),
                root: dir.root.clone(),
            }),
        )?;
        crate::vmcopy::register(
            &ops,
            crate::vmcopy::Env {
                vms: vms.clone(),
                exports: exports.clone(),
                peers: peers.clone(),
                host: cfg.name.clone(),
                root: dir.root.clone(),
                ops: Arc::downgrade(&ops),
                rates: Default::default(),
            },
        );
        crate::vmcopy::relay::register(
            &ops,
            crate::vmcopy::relay::Env {
                peers: peers.clone(),
            },
        );
        let batches = Arc::new(crate::batch::Env {
            peers: peers.clone(),
            host: cfg.name.clone(),
            records: Arc::new(crate::migrate::records::Records::open(
                dir.root.join("migrations"),
            )?),
            peer_token: peer_token.clone(),
            self_url: std::sync::OnceLock::new(),
        });
        crate::batch::register(&ops, batches.clone());
        Ok(Arc::new(Daemon {
            cfg,
            dir,
            ops,
            exports,
            vms,
            admin_token,
            peer_token,
            peers,
            inbound,
            backups,
            batches,
            started: Instant::now(),
        }))
    }

    /// Makes every acknowledged write durable (at shutdown).
    pub fn flush(&self) -> anyhow::Result<()> {
        self.pool().flush().context("flushing the pool")
    }
}

/// Creates a data directory: pool, journal, admin token, configuration.
/// Refuses to touch a directory that already holds a ferryd.
pub fn init(dir: &DataDir, cfg: &Config, chunk_size: u32) -> anyhow::Result<String> {
    if dir.root.join(crate::config::CONFIG_FILE).exists() {
        anyhow::bail!(
            "{} already holds a ferryd (ferryd.toml exists); nothing was changed",
            dir.root.display()
        );
    }
    std::fs::create_dir_all(&dir.root)
        .with_context(|| format!("cannot create {}", dir.root.display()))?;
    std::fs::create_dir_all(dir.run())?;
    Pool::create(
        dir.pool(),
        PoolOptions {
            chunk_size,
            ..PoolOptions::default()
        },
    )
    .with_context(|| format!("cannot create the pool in {}", dir.pool().display()))?;
    Journal::open(dir.journal())?;
    let token = new_token();
    write_atomic(&dir.token(), format!("{token}\n").as_bytes(), 0o600)?;
    read_or_create_token(&dir.peer_token())?;
    // The configuration last: its presence marks a complete data directory.
    cfg.save(&dir.root)?;
    Ok(token)
}

/// Reads a token file, creating it (mode 0600) with a new token if absent.
fn read_or_create_token(path: &std::path::Path) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
        Ok(_) => anyhow::bail!("{} is empty; remove it to make a new token", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let t = new_token();
            write_atomic(path, format!("{t}\n").as_bytes(), 0o600)?;
            Ok(t)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}
