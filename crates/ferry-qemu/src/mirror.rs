//! `blockdev-mirror` of a disk to another NBD export, then pivot or cancel.
//!
//! Steps: `blockdev-add` a raw node over an `nbd` node for the target;
//! `blockdev-mirror` (sync `full`) from the disk's active node; wait for
//! `BLOCK_JOB_READY` (source and target in sync, guest writes now go to
//! both); then either [`MirrorJob::pivot`] (`block-job-complete`: the disk
//! now runs on the target) or [`MirrorJob::cancel`] (the disk stays on the
//! source; the target node is removed). A crash before the pivot leaves
//! the disk on the source, which stayed complete and current throughout.

use std::time::Duration;

use serde_json::json;
use tokio::sync::mpsc;

use crate::block::block_graph;
use crate::error::{Error, ErrorKind, Result};
use crate::jobs::{self, JobEnd, JobProgress};
use crate::qmp::{EventStream, QmpClient};
use crate::spec::NbdServer;

/// A running mirror job.
#[derive(Debug)]
#[must_use = "pivot() or cancel() the mirror"]
pub struct MirrorJob {
    qmp: QmpClient,
    events: EventStream,
    /// The job id.
    pub job: String,
    /// Guest device id.
    pub device: String,
    /// The node the disk ran on before (the mirror's source).
    pub source_node: String,
    /// The node added for the target (raw over nbd).
    pub target_node: String,
    ready: bool,
}

/// Starts mirroring disk `device` to the NBD export `export` on `server`.
pub async fn start_mirror(
    qmp: &QmpClient,
    device: &str,
    server: &NbdServer,
    export: &str,
) -> Result<MirrorJob> {
    let graph = block_graph(qmp).await?;
    let chain = graph.disk(device)?;
    let source_node = chain.root.clone();
    let target_node = graph.unused_name(&format!("{device}-mi"));
    let job = format!("mirror-{device}");
    let ctx = format!("mirror of disk {device} to NBD export {export:?}");
    qmp.execute(
        "blockdev-add",
        json!({
            "driver": "raw",
            "node-name": target_node,
            "file": {
                "driver": "nbd",
                "server": server.to_qapi(),
                "export": export,
                "reconnect-delay": crate::launch::NBD_RECONNECT_DELAY_S,
            },
            "discard": "unmap",
        }),
    )
    .await
    .map_err(|e| Error::new(e.kind, format!("{ctx}: adding the target ({})", e.context)))?;
    let events = qmp.events();
    if let Err(e) = qmp
        .execute(
            "blockdev-mirror",
            json!({"job-id": job, "device": source_node, "target": target_node, "sync": "full"}),
        )
        .await
    {
        let _ = qmp
            .execute("blockdev-del", json!({"node-name": target_node}))
            .await;
        return Err(Error::new(e.kind, format!("{ctx}: {}", e.context)));
    }
    Ok(MirrorJob {
        qmp: qmp.clone(),
        events,
        job,
        device: device.to_string(),
        source_node,
        target_node,
        ready: false,
    })
}

impl MirrorJob {
    /// Progress of the job, polled every `interval`, never going backwards.
    pub fn progress(&self, interval: Duration) -> mpsc::Receiver<JobProgress> {
        jobs::progress_stream(&self.qmp, &self.job, interval)
    }

    /// Waits until source and target are in sync.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        if !self.ready {
            jobs::wait_ready(&mut self.events, &self.job, timeout).await?;
            self.ready = true;
        }
        Ok(())
    }

    /// Waits until ready, then switches the disk to the target. With
    /// `release_source`, the source nodes are deleted afterwards (the NBD
    /// connection to the source closes); they must not be used by anything
    /// else.
    pub async fn pivot(mut self, timeout: Duration, release_source: bool) -> Result<()> {
        self.wait_ready(timeout).await?;
        jobs::complete(&self.qmp, &self.job).await?;
        match jobs::wait_end(&mut self.events, &self.job, timeout).await? {
            JobEnd::Completed => {}
            JobEnd::Cancelled => {
                return Err(Error::new(
                    ErrorKind::Job("cancelled during the pivot".into()),
                    format!("mirror of disk {}", self.device),
                ));
            }
        }
        if release_source {
            self.qmp
                .execute("blockdev-del", json!({"node-name": self.source_node}))
                .await?;
            // The protocol node under a format node added by -blockdev is
            // its own monitor-owned node; delete it too when we know it.
            let proto = format!("{}-pro", self.device);
            if self.source_node == format!("{}-fmt", self.device) {
                let _ = self
                    .qmp
                    .execute("blockdev-del", json!({"node-name": proto}))
                    .await;
            }
        }
        Ok(())
    }

    /// Abandons the mirror: the disk stays on the source and the target
    /// node is removed.
    pub async fn cancel(mut self, timeout: Duration) -> Result<()> {
        jobs::cancel(&self.qmp, &self.job, true).await?;
        jobs::wait_end(&mut self.events, &self.job, timeout).await?;
        self.qmp
            .execute("blockdev-del", json!({"node-name": self.target_node}))
            .await
            .map(drop)
    }
}
