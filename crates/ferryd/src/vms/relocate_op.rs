//! `vm.relocate`: the operation behind `POST /v1/vms/{id}/relocate`, which
//! moves disks of a running VM to new volumes of this host's pool with no
//! downtime ([`Vms::relocate_disk`]: mirror, pivot, the definition names
//! the new volume). The instant restore onto another host calls it on the
//! target host, whose VM runs from the staging host's export, and follows
//! it (`PeerClient::wait_operation`).
//!
//! One step per disk, `relocate <disk id>`, each retried after a restart
//! of this ferryd (a leftover mirror is cancelled and started again; a
//! pivot already made is recognised). A failed or cancelled relocation
//! leaves the disk where it was, so the VM loses nothing it wrote. Each
//! step logs its figures as `relocated: {json}` (bytes, seconds, MB/s).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_ops::{BoxFuture, Manager, Plan, Recovery, Step, StepContext, StepError};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::relocate::Relocated;
use super::{Vms, disk_id};
use crate::daemon::App;

/// The operation kind.
pub const KIND: &str = "vm.relocate";

/// The log line with a disk's figures starts with this.
pub const RELOCATED_PREFIX: &str = "relocated: ";

/// How long one disk's mirror may take to be ready or to pivot.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(3600);

/// The journaled parameters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Params {
    pub vm: String,
    pub uuid: String,
    pub disks: Vec<ferry_api::RelocateDisk>,
    /// The caller's idempotency key.
    #[serde(default)]
    pub request: Option<String>,
}

pub fn register(m: &Arc<Manager<App>>, vms: Arc<Vms>) {
    m.register(KIND, move |params| plan(vms.clone(), params));
}

fn plan(vms: Arc<Vms>, params: &Value) -> Result<Plan<App>, String> {
    let p: Params = serde_json::from_value(params.clone()).map_err(|e| e.to_string())?;
    let mut steps: Vec<(Box<dyn Step<App>>, f64)> = Vec::new();
    for d in &p.disks {
        steps.push((
            Box::new(RelocateStep {
                vms: vms.clone(),
                vm: p.vm.clone(),
                uuid: p.uuid.clone(),
                disk: d.clone(),
                name: format!("relocate {}", disk_id(d.index)),
            }),
            d.size.max(1) as f64,
        ));
    }
    Ok(Plan::new(
        &format!("relocate the disks of VM {} to this host's pool", p.vm),
        steps,
    ))
}

struct RelocateStep {
    vms: Arc<Vms>,
    vm: String,
    uuid: String,
    disk: ferry_api::RelocateDisk,
    name: String,
}

impl Step<App> for RelocateStep {
    fn name(&self) -> &str {
        &self.name
    }

    fn recovery(&self) -> Recovery {
        Recovery::Retry
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let d = &self.disk;
            let vm = self.vms.find(&self.uuid).map_err(StepError::failed)?;
            // Right after a restart the VM may not be re-attached yet.
            let deadline = Instant::now() + Duration::from_secs(60);
            while self.vms.control(&vm).await.is_none() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let local = vm
                .definition()
                .disks
                .get(d.index)
                .and_then(|x| x.volume().map(str::to_string));
            if local.as_deref() != Some(d.volume.as_str()) {
                let (pool, target, size) = (cx.app.pool.clone(), d.volume.clone(), d.size);
                tokio::task::spawn_blocking(move || match pool.volume(&target) {
                    Ok(_) => Ok(()),
                    Err(e) if e.kind() == ferry_pool::ErrorKind::NotFound => pool
                        .create_volume(&target, size)
                        .map(drop)
                        .map_err(|e| format!("creating volume {target}: {e}")),
                    Err(e) => Err(e.to_string()),
                })
                .await
                .map_err(StepError::failed)?
                .map_err(StepError::Failed)?;
            }
            let (h, node) = (cx.progress.clone(), cx.node);
            let progress = move |done: u64, total: u64| {
                h.update(|t| t.set_fraction(node, done as f64 / total.max(1) as f64));
            };
            let t0 = Instant::now();
            // Cancelling drops the mirror's future: the disk stays where it
            // was; a retry cancels the job QEMU may still run.
            let r = tokio::select! {
                r = self.vms.relocate_disk(&vm, d.index, &d.volume, &progress, MIRROR_TIMEOUT) => r,
                _ = cx.cancelled() => return Err(StepError::Cancelled),
            };
            let r = r.map_err(|e| {
                StepError::Failed(format!(
                    "{e}; disk {} of VM {} stays where it was (nothing it wrote is lost)",
                    disk_id(d.index),
                    self.vm
                ))
            })?;
            let secs = t0.elapsed().as_secs_f64();
            let v = match r {
                Relocated::AlreadyDone | Relocated::RecordOnly => {
                    json!({ "volume": d.volume, "bytes": 0 })
                }
                Relocated::Mirrored { bytes } => {
                    let mbs = bytes as f64 / secs.max(1e-6) / 1e6;
                    json!({ "volume": d.volume, "bytes": bytes, "secs": secs, "mb_per_s": mbs })
                }
            };
            cx.log(format!(
                "disk {} of VM {} on volume {} ({r:?})",
                disk_id(d.index),
                self.vm,
                d.volume
            ));
            cx.log(format!("{RELOCATED_PREFIX}{v}"));
            Ok(v)
        })
    }
}
