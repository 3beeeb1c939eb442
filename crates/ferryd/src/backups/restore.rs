//! The `backup.restore` operation: a backup into new pool volumes and a
//! new VM definition. Steps are described in the parent module.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ferry_api::{VmDefinition, VmDisk, VmDiskSpec};
use ferry_backup::VolumeTarget;
use ferry_ops::{BoxFuture, Manager, Plan, Recovery, Step, StepContext, StepError};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{Backups, RESTORE, THREADS};
use crate::daemon::App;

/// The journaled parameters of `backup.restore`, complete when accepted
/// (the plan is rebuilt from them after a restart).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestoreParams {
    pub repo: String,
    pub backup: String,
    /// The new VM's name.
    pub name: String,
    /// (device in the backup, new volume, size).
    pub disks: Vec<(String, String, u64)>,
    /// The backed-up definition (disks are replaced by the new volumes).
    pub definition: VmDefinition,
}

pub fn register(m: &Arc<Manager<App>>, b: &Arc<Backups>) {
    let b = b.clone();
    m.register(RESTORE, move |p| plan(b.clone(), p));
}

/// The new VM's definition: the backed-up one with a new name, no UUID
/// (a new one is generated) and the new volumes in the same order.
pub fn new_definition(p: &RestoreParams) -> Result<VmDefinition, String> {
    let mut def = p.definition.clone();
    def.name = p.name.clone();
    def.uuid = None;
    let mut disks = Vec::new();
    for (i, d) in def.disks.iter().enumerate() {
        let device = format!("vd{}", char::from(b'a' + i as u8));
        let (_, vol, _) = p
            .disks
            .iter()
            .find(|x| x.0 == device)
            .ok_or_else(|| format!("backup {} holds no disk {device}", p.backup))?;
        disks.push(VmDisk::Spec(VmDiskSpec {
            volume: Some(vol.clone()),
            read_only: d.spec().read_only,
            ..VmDiskSpec::default()
        }));
    }
    def.disks = disks;
    Ok(def)
}

fn plan(b: Arc<Backups>, params: &Value) -> Result<Plan<App>, String> {
    let p: RestoreParams = serde_json::from_value(params.clone()).map_err(|e| e.to_string())?;
    new_definition(&p)?;
    let bytes: u64 = p.disks.iter().map(|d| d.2).sum::<u64>().max(1);
    Ok(Plan::new(
        &format!(
            "restore of backup {} from repository {} as VM {}",
            p.backup, p.repo, p.name
        ),
        vec![
            (Box::new(CreateVolumes { p: p.clone() }), 0.0),
            (
                Box::new(Fetch {
                    b: b.clone(),
                    p: p.clone(),
                }),
                bytes as f64,
            ),
            (Box::new(Define { b, p }), bytes as f64 * 0.01),
        ],
    ))
}

struct CreateVolumes {
    p: RestoreParams,
}

impl Step<App> for CreateVolumes {
    fn name(&self) -> &str {
        "create volumes"
    }

    fn intent(&self, _cx: &StepContext<App>) -> Result<Value, StepError> {
        Ok(json!({ "volumes": self.p.disks.iter().map(|d| &d.1).collect::<Vec<_>>() }))
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let pool = cx.app.pool.clone();
            let disks = self.p.disks.clone();
            crate::operations::blocking(move || {
                for (_, vol, size) in &disks {
                    pool.create_volume(vol, *size)?;
                }
                Ok(())
            })
            .await?;
            for (dev, vol, size) in &self.p.disks {
                cx.log(format!(
                    "created volume {vol} ({size} bytes) for disk {dev}"
                ));
            }
            Ok(Value::Null)
        })
    }

    fn undo<'a>(
        &'a self,
        cx: &'a StepContext<App>,
        intent: &'a Value,
        _result: Option<&'a Value>,
    ) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let vols: Vec<String> = intent["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            let pool = cx.app.pool.clone();
            crate::operations::blocking(move || {
                for v in &vols {
                    match pool.delete_volume(v) {
                        Err(e) if e.kind() == ferry_pool::ErrorKind::NotFound => {}
                        r => r?,
                    }
                }
                Ok(())
            })
            .await?;
            cx.log("deleted the restore's volumes");
            Ok(())
        })
    }
}

struct Fetch {
    b: Arc<Backups>,
    p: RestoreParams,
}

impl Step<App> for Fetch {
    fn name(&self) -> &str {
        "restore data"
    }

    fn recovery(&self) -> Recovery {
        Recovery::Retry
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let (b, p, pool) = (self.b.clone(), self.p.clone(), cx.app.pool.clone());
            let (handle, node) = (cx.progress.clone(), cx.node);
            let total: u64 = p.disks.iter().map(|d| d.2).sum();
            let t0 = std::time::Instant::now();
            let fetched = tokio::task::spawn_blocking(move || -> Result<u64, String> {
                let (_, repo) = b.open(&p.repo).map_err(|e| e.to_string())?;
                let before = AtomicU64::new(0);
                let mut fetched = 0;
                for (dev, vol, size) in &p.disks {
                    let v = pool.volume(vol).map_err(|e| e.to_string())?;
                    let base = before.load(Ordering::Relaxed);
                    let h = handle.clone();
                    let prog = move |done: u64, _: u64| {
                        h.update(|t| {
                            t.set_fraction(node, (base + done) as f64 / total.max(1) as f64)
                        })
                    };
                    let st = repo
                        .restore_disk(
                            &p.backup,
                            dev,
                            &VolumeTarget(v),
                            THREADS,
                            false,
                            Some(&prog),
                        )
                        .map_err(|e| format!("{}; volume {vol} is incomplete", super::chain(&e)))?;
                    fetched += st.chunks_fetched;
                    before.fetch_add(*size, Ordering::Relaxed);
                }
                Ok(fetched)
            })
            .await
            .map_err(StepError::failed)?
            .map_err(StepError::Failed)?;
            let secs = t0.elapsed().as_secs_f64();
            cx.log(format!(
                "restored {total} bytes ({fetched} blocks fetched) in {secs:.1} s ({:.0} MB/s)",
                total as f64 / secs.max(1e-6) / 1e6
            ));
            Ok(json!({ "bytes": total, "fetched_blocks": fetched }))
        })
    }
}

struct Define {
    b: Arc<Backups>,
    p: RestoreParams,
}

impl Step<App> for Define {
    fn name(&self) -> &str {
        "define vm"
    }

    fn recovery(&self) -> Recovery {
        Recovery::Retry
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let def = new_definition(&self.p).map_err(StepError::Failed)?;
            let vms = self.b.vms.clone();
            let vm = match vms.find(&self.p.name) {
                Ok(vm) => {
                    let mine = vm
                        .definition()
                        .disks
                        .iter()
                        .map(|d| d.volume().map(str::to_string))
                        .collect::<Vec<_>>()
                        == def
                            .disks
                            .iter()
                            .map(|d| d.volume().map(str::to_string))
                            .collect::<Vec<_>>();
                    if !mine {
                        return Err(StepError::failed(format!(
                            "a VM named {} exists already on other volumes; the restored volumes are kept",
                            self.p.name
                        )));
                    }
                    vm
                }
                Err(_) => tokio::task::spawn_blocking(move || vms.define(def))
                    .await
                    .map_err(StepError::failed)?
                    .map_err(StepError::failed)?,
            };
            cx.log(format!("defined VM {} ({})", vm.name, vm.uuid));
            Ok(json!({ "vm": vm.name, "uuid": vm.uuid.to_string() }))
        })
    }

    fn undo<'a>(
        &'a self,
        cx: &'a StepContext<App>,
        _intent: &'a Value,
        result: Option<&'a Value>,
    ) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            if let Some(uuid) = result.and_then(|r| r["uuid"].as_str())
                && let Ok(vm) = self.b.vms.find(uuid)
            {
                self.b.vms.delete(&vm).await.map_err(StepError::failed)?;
                cx.log(format!("deleted VM {}", self.p.name));
            }
            Ok(())
        })
    }
}
