//! `ferryd init` creates a data directory; `ferryd run` serves it.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferryd::config::{Config, DataDir, write_atomic};
use ferryd::daemon::{Daemon, init};

#[derive(Parser)]
#[command(name = "ferryd", version, about = "Ferry host daemon")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a data directory: pool, journal, admin token, configuration.
    Init {
        #[arg(long, env = "FERRYD_DATA_DIR")]
        data_dir: PathBuf,
        /// This host's name (default: the machine's host name).
        #[arg(long)]
        name: Option<String>,
        /// HTTP API listener.
        #[arg(long, default_value = "127.0.0.1:7450")]
        listen: SocketAddr,
        /// NBD TCP listener.
        #[arg(long, default_value = "127.0.0.1:10809")]
        nbd_listen: SocketAddr,
        /// QEMU accelerator for VMs: kvm:tcg on real hosts; tcg where KVM is unusable.
        #[arg(long, default_value = "kvm:tcg")]
        accel: String,
        /// Pool chunk size in bytes (a power of two, at least 4096).
        #[arg(long, default_value_t = 64 * 1024)]
        chunk_size: u32,
        /// Where to write the CLI's configuration (URL + token).
        #[arg(long)]
        cli_config: Option<PathBuf>,
        /// Do not write the CLI's configuration.
        #[arg(long)]
        no_cli_config: bool,
    },
    /// Serve a data directory.
    Run {
        #[arg(long, env = "FERRYD_DATA_DIR")]
        data_dir: PathBuf,
        /// Override the configured HTTP listener (port 0 picks a free port).
        #[arg(long, env = "FERRYD_LISTEN")]
        listen: Option<SocketAddr>,
        /// Override the configured QEMU accelerator.
        #[arg(long, env = "FERRYD_ACCEL")]
        accel: Option<String>,
        /// Override the configured NBD TCP listener (port 0 picks a free port).
        #[arg(long, env = "FERRYD_NBD_LISTEN")]
        nbd_listen: Option<SocketAddr>,
    },
    /// Print the OpenAPI document of the HTTP API (kept in docs/openapi.json).
    Openapi,
}

fn default_cli_config() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("ferry").join("config.toml"))
}

fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRYD_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.cmd {
        Cmd::Openapi => {
            let text = serde_json::to_string_pretty(&ferryd::openapi::document())?;
            println!("{text}");
            Ok(())
        }
        Cmd::Init {
            data_dir,
            name,
            listen,
            nbd_listen,
            accel,
            chunk_size,
            cli_config,
            no_cli_config,
        } => {
            let dir = DataDir::new(&data_dir);
            let mut cfg = Config::new(name.unwrap_or_else(host_name), listen);
            cfg.accel = accel;
            cfg.nbd_listen = nbd_listen;
            let token = init(&dir, &cfg, chunk_size)?;
            println!("created ferryd data directory {}", data_dir.display());
            println!("admin token: {}", dir.token().display());
            if !no_cli_config && let Some(path) = cli_config.or_else(default_cli_config) {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                let text = format!("url = \"http://{listen}\"\ntoken = \"{token}\"\n");
                write_atomic(&path, text.as_bytes(), 0o600)?;
                println!("CLI configuration: {}", path.display());
            }
            Ok(())
        }
        Cmd::Run {
            data_dir,
            listen,
            accel,
            nbd_listen,
        } => {
            let dir = DataDir::new(&data_dir);
            let mut cfg = Config::load(&data_dir)?;
            if let Some(l) = listen {
                cfg.listen = l;
            }
            if let Some(a) = accel {
                cfg.accel = a;
            }
            if let Some(n) = nbd_listen {
                cfg.nbd_listen = n;
            }
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(serve(dir, cfg))
        }
    }
}

async fn serve(dir: DataDir, cfg: Config) -> anyhow::Result<()> {
    let listen = cfg.listen;
    let daemon = Daemon::open(dir, cfg)?;
    serve_nbd(&daemon).await?;
    // After NBD is up: re-attached VMs reconnect their disks to it.
    daemon.vms.reattach_all().await;
    // After the re-attach: a resumed step that stops or deletes a VM must
    // see the QEMU that outlived the previous ferryd.
    let recovered = daemon.ops.recover()?;
    if !recovered.is_empty() {
        tracing::info!("recovering {} unfinished operation(s)", recovered.len());
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let self_ip = if addr.ip().is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        addr.ip()
    };
    let _ = daemon.batches.self_url.set(format!(
        "http://{}",
        std::net::SocketAddr::new(self_ip, addr.port())
    ));
    // Scripts and tests read this line to learn the port.
    eprintln!("ferryd {} listening on http://{addr}", daemon.cfg.name);
    let app = ferryd::api::router(daemon.clone());
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    let left = daemon.vms.detach_all();
    if left > 0 {
        tracing::info!("leaving {left} VM(s) running; they are re-attached at the next start");
    }
    daemon.flush()?;
    tracing::info!("ferryd stopped; pool flushed");
    Ok(())
}

/// Starts the NBD listeners: the local unix socket and TCP.
async fn serve_nbd(d: &Daemon) -> anyhow::Result<()> {
    let path = d.dir.nbd_socket();
    // A socket left by a killed ferryd: nobody listens on it any more.
    let _ = std::fs::remove_file(&path);
    let unix = tokio::net::UnixListener::bind(&path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    let tcp = tokio::net::TcpListener::bind(d.cfg.nbd_listen)
        .await
        .with_context(|| format!("cannot listen for NBD on {}", d.cfg.nbd_listen))?;
    let addr = tcp.local_addr()?;
    *d.exports.tcp_addr.lock().unwrap_or_else(|p| p.into_inner()) = Some(addr);
    eprintln!(
        "ferryd {} serving NBD on nbd://{addr} and {}",
        d.cfg.name,
        path.display()
    );
    let (u, t) = (d.exports.unix.clone(), d.exports.tcp.clone());
    tokio::spawn(async move {
        if let Err(e) = u.serve_unix(unix).await {
            tracing::error!("NBD unix listener stopped: {e}");
        }
    });
    tokio::spawn(async move {
        if let Err(e) = t.serve_tcp(tcp).await {
            tracing::error!("NBD TCP listener stopped: {e}");
        }
    });
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
