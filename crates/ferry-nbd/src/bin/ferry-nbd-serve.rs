//! `ferry-nbd-serve`: serves one raw file or an in-memory disk over NBD.
//!
//! ```text
//! ferry-nbd-serve (--file PATH | --memory BYTES) (--unix PATH | --tcp ADDR)
//!                 [--name NAME] [--read-only] [--secret S] [--threads N]
//!                 [--tls-cert PEM --tls-key PEM [--tls-ca PEM] [--tls-required]]
//! ```
//! Prints `ready <address>` on stdout once it listens.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use ferry_nbd::{Export, ExportOptions, FileExport, MemoryExport, Server, TlsMode};

#[derive(Default)]
struct Args {
    file: Option<PathBuf>,
    memory: Option<u64>,
    unix: Option<PathBuf>,
    tcp: Option<String>,
    name: String,
    read_only: bool,
    secret: Option<String>,
    threads: usize,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    tls_required: bool,
}

fn parse() -> anyhow::Result<Args> {
    let mut a = Args {
        threads: 2,
        ..Args::default()
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().with_context(|| format!("{k} needs a value"));
        match k.as_str() {
            "--file" => a.file = Some(v()?.into()),
            "--memory" => a.memory = Some(v()?.parse()?),
            "--unix" => a.unix = Some(v()?.into()),
            "--tcp" => a.tcp = Some(v()?),
            "--name" => a.name = v()?,
            "--read-only" => a.read_only = true,
            "--secret" => a.secret = Some(v()?),
            "--threads" => a.threads = v()?.parse()?,
            "--tls-cert" => a.tls_cert = Some(v()?.into()),
            "--tls-key" => a.tls_key = Some(v()?.into()),
            "--tls-ca" => a.tls_ca = Some(v()?.into()),
            "--tls-required" => a.tls_required = true,
            "-h" | "--help" => {
                println!(
                    "ferry-nbd-serve (--file PATH | --memory BYTES) (--unix PATH | --tcp ADDR) \
                     [--name NAME] [--read-only] [--secret S] [--threads N] \
                     [--tls-cert PEM --tls-key PEM [--tls-ca PEM] [--tls-required]]"
                );
                std::process::exit(0);
            }
            _ => bail!("unknown argument {k}"),
        }
    }
    Ok(a)
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber_init();
    let a = parse()?;
    let export: Arc<dyn Export> = match (&a.file, a.memory) {
        (Some(p), None) => Arc::new(
            FileExport::open(p, a.read_only).with_context(|| format!("opening {}", p.display()))?,
        ),
        (None, Some(n)) => {
            let m = MemoryExport::new(n);
            Arc::new(if a.read_only { m.read_only() } else { m })
        }
        _ => bail!("give exactly one of --file and --memory"),
    };
    let server = match (&a.tls_cert, &a.tls_key) {
        (Some(c), Some(k)) => {
            let cfg = ferry_nbd::tls::server_config(c, k, a.tls_ca.as_deref())?;
            let mode = if a.tls_required {
                TlsMode::Required
            } else {
                TlsMode::Optional
            };
            Server::with_tls(cfg, mode)
        }
        (None, None) => Server::new(),
        _ => bail!("--tls-cert and --tls-key go together"),
    };
    server.add_export(
        &a.name,
        export,
        ExportOptions {
            description: "served by ferry-nbd-serve".into(),
            allow_tls_clients: a.tls_ca.is_some(),
            secret: a.secret.clone(),
        },
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(a.threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match (&a.unix, &a.tcp) {
            (Some(p), None) => {
                let _ = std::fs::remove_file(p);
                let l = tokio::net::UnixListener::bind(p)
                    .with_context(|| format!("binding {}", p.display()))?;
                ready(&p.display().to_string())?;
                server.serve_unix(l).await?;
            }
            (None, Some(addr)) => {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding {addr}"))?;
                ready(&l.local_addr()?.to_string())?;
                server.serve_tcp(l).await?;
            }
            _ => bail!("give exactly one of --unix and --tcp"),
        }
        Ok(())
    })
}

fn ready(addr: &str) -> anyhow::Result<()> {
    let mut o = std::io::stdout().lock();
    writeln!(o, "ready {addr}")?;
    o.flush()?;
    Ok(())
}

fn tracing_subscriber_init() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
}
