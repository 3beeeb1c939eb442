//! Host info, pool usage, metrics.

use std::fmt::Write;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use ferry_api::{HostInfo, OpState, PoolInfo};

use super::ApiResult;
use crate::daemon::Daemon;

pub async fn info(State(d): State<Arc<Daemon>>) -> ApiResult<HostInfo> {
    Ok(Json(HostInfo {
        name: d.cfg.name.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        data_dir: d.dir.root.display().to_string(),
        nbd: {
            let mut v = vec![format!(
                "nbd+unix:///?socket={}",
                d.dir.nbd_socket().display()
            )];
            if let Some(a) = *d.exports.tcp_addr.lock().unwrap_or_else(|p| p.into_inner()) {
                v.push(format!("nbd://{a}"));
            }
            v
        },
        accel: d.cfg.accel.clone(),
        uptime_s: d.started.elapsed().as_secs(),
    }))
}

pub async fn pool(State(d): State<Arc<Daemon>>) -> ApiResult<PoolInfo> {
    Ok(Json(pool_info(&d)))
}

fn pool_info(d: &Daemon) -> PoolInfo {
    let p = d.pool();
    let u = p.usage();
    PoolInfo {
        chunk_size: u.chunk_size,
        used_bytes: u.used_bytes,
        limit_bytes: u.limit_bytes,
        volumes: p.volumes().len(),
        snapshots: p.snapshots().len(),
    }
}

/// Prometheus text format.
pub async fn metrics(State(d): State<Arc<Daemon>>) -> String {
    let p = pool_info(&d);
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, v: f64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    };
    gauge(
        "ferry_pool_used_bytes",
        "Bytes of pool chunks in use.",
        p.used_bytes as f64,
    );
    gauge(
        "ferry_pool_volumes",
        "Volumes in the pool.",
        p.volumes as f64,
    );
    gauge(
        "ferry_pool_snapshots",
        "Snapshots in the pool.",
        p.snapshots as f64,
    );
    gauge(
        "ferry_uptime_seconds",
        "Seconds since ferryd started.",
        d.started.elapsed().as_secs_f64(),
    );
    let lazy = d.pool().volumes().iter().filter(|v| v.lazy).count();
    gauge(
        "ferry_lazy_volumes",
        "Volumes still hydrating (chunks fetched from a source on demand).",
        lazy as f64,
    );
    {
        use crate::nbd_export::IO;
        use std::sync::atomic::Ordering::Relaxed;
        let _ = writeln!(
            out,
            "# HELP ferry_nbd_requests_total NBD requests served, by kind.\n# TYPE ferry_nbd_requests_total counter"
        );
        for (kind, c) in [
            ("read", &IO.read_ops),
            ("write", &IO.write_ops),
            ("flush", &IO.flush_ops),
            ("trim", &IO.trim_ops),
            ("write_zeroes", &IO.zero_ops),
        ] {
            let _ = writeln!(
                out,
                "ferry_nbd_requests_total{{kind=\"{kind}\"}} {}",
                c.load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP ferry_nbd_bytes_total NBD payload bytes served, by direction.\n# TYPE ferry_nbd_bytes_total counter"
        );
        let _ = writeln!(
            out,
            "ferry_nbd_bytes_total{{direction=\"read\"}} {}",
            IO.read_bytes.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "ferry_nbd_bytes_total{{direction=\"write\"}} {}",
            IO.write_bytes.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP ferry_nbd_errors_total NBD requests that failed.\n# TYPE ferry_nbd_errors_total counter\nferry_nbd_errors_total {}",
            IO.errors.load(Relaxed)
        );
    }
    let ops = d.ops.journal().list().unwrap_or_default();
    let _ = writeln!(
        out,
        "# HELP ferry_operations Operations in the journal by state.\n# TYPE ferry_operations gauge"
    );
    for s in [
        OpState::Running,
        OpState::Succeeded,
        OpState::Failed,
        OpState::Cancelled,
    ] {
        let n = ops.iter().filter(|o| o.state == s).count();
        let _ = writeln!(out, "ferry_operations{{state=\"{s}\"}} {n}");
    }
    out
}
