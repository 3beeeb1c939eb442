//! Overlay mode, per VM: quiesce, switch every disk to an overlay in one
//! QMP transaction, thaw (`VmOverlay`); after the storage snapshot, commit
//! the overlays back (`Merge`). `sweep` is the idempotent clean-up both the
//! merge and the undo use.

use super::*;

// ------------------------------------------------------- overlay per VM

pub(super) struct VmOverlay {
    pub(super) env: Arc<Env>,
    pub(super) p: Params,
    pub(super) vm: String,
    pub(super) name: String,
    pub(super) phases: [usize; 3],
}

fn fault_for(vm: &str) -> bool {
    std::env::var(FAULT_VAR).is_ok_and(|v| v == format!("qmp:{vm}"))
}

impl Step<App> for VmOverlay {
    fn name(&self) -> &str {
        &self.name
    }

    fn intent(&self, _cx: &StepContext<App>) -> Result<Value, StepError> {
        Ok(json!({
            "vm": self.vm,
            "overlay_dir": self.env.overlay_dir(&self.p.name, &self.vm),
        }))
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let r = resolved(cx)?;
            let rv = resolved_vm(&r, &self.vm)?;
            let (_, qmp, qga) = control(&self.env, &self.vm)
                .await
                .map_err(StepError::Failed)?;
            let dir = self.env.overlay_dir(&self.p.name, &self.vm);
            std::fs::create_dir_all(&dir)
                .map_err(|e| StepError::failed(format!("cannot create {}: {e}", dir.display())))?;
            let devices: Vec<&str> = rv.disks.iter().map(|d| d.device.as_str()).collect();
            let mut prepared = overlay::prepare(&qmp, &devices, &dir).await.map_err(|e| {
                StepError::failed(format!(
                    "VM {}: cannot create its overlays: {e}; the guest was not frozen",
                    self.vm
                ))
            })?;
            let agent = probe_agent(self.p.quiesce, qga.as_ref()).await;
            if fault_for(&self.vm) {
                prepared = sabotage(prepared, &qmp).await;
            }
            let [n_quiesce, n_overlay, n_thaw] = self.phases;

            // ---- the guest's pause starts here: no journal writes until thaw.
            let t0 = Instant::now();
            let (guard, mut q) = match &agent {
                Ok(a) => match a.freeze().await {
                    Ok(g) => (Some(g), Quiesce::default()),
                    Err(e) => (
                        None,
                        Quiesce {
                            note: format!(
                                "the guest agent's freeze failed ({e}); a thaw was sent; crash-consistent"
                            ),
                            ..Quiesce::default()
                        },
                    ),
                },
                Err(why) => (
                    None,
                    Quiesce {
                        note: format!("{why}; crash-consistent"),
                        ..Quiesce::default()
                    },
                ),
            };
            let t_frozen = Instant::now();
            if guard.is_some() {
                test_pause(&format!("{KIND}:frozen:{}", self.vm)).await;
            }
            let snap = prepared.snapshot().await;
            let t_switched = Instant::now();
            let thawed = match guard {
                Some(g) => Some(g.thaw().await),
                None => None,
            };
            let t_thawed = Instant::now();
            // ---- pause over.

            cx.progress.update(|t| t.finish(n_quiesce));
            let set = match snap {
                Ok(set) => set,
                Err(e) => {
                    let th = match &thawed {
                        Some(Ok(_)) => "the guest was thawed",
                        Some(Err(_)) => "the guest's thaw FAILED (the undo retries it)",
                        None => "the guest was not frozen",
                    };
                    return Err(StepError::failed(format!(
                        "VM {}: the overlay snapshot failed: {e}; {th}; no overlay was switched to",
                        self.vm
                    )));
                }
            };
            cx.progress.update(|t| t.finish(n_overlay));
            if let Some(th) = thawed {
                th.map_err(|e| {
                    StepError::failed(format!(
                        "VM {}: thaw failed: {e}; the undo retries it",
                        self.vm
                    ))
                })?;
                q.quiesced = true;
                q.note = "frozen by the guest agent for the overlay switch".into();
                q.freeze_ms = Some(ms(t_frozen - t0));
                q.frozen_ms = Some(ms(t_thawed - t0));
            }
            q.pause_ms = Some(ms(t_switched - t_frozen));
            cx.progress.update(|t| t.finish(n_thaw));
            cx.log(format!(
                "VM {}: {} disk(s) switched to overlays in {}; {}{}",
                self.vm,
                devices.len(),
                dir.display(),
                q.note,
                q.frozen_ms
                    .map(|f| format!(
                        " (frozen {f:.1} ms, switch {:.1} ms)",
                        q.pause_ms.unwrap_or(0.0)
                    ))
                    .unwrap_or_default()
            ));
            let overlays: Vec<Value> = snap_overlays(&set.overlays);
            let mut v = serde_json::to_value(&q).map_err(StepError::failed)?;
            v["overlays"] = Value::Array(overlays);
            Ok(v)
        })
    }

    fn undo<'a>(
        &'a self,
        cx: &'a StepContext<App>,
        intent: &'a Value,
        _result: Option<&'a Value>,
    ) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let dir = PathBuf::from(intent["overlay_dir"].as_str().unwrap_or_default());
            let (qmp, qga) = match control_wait(&self.env, &self.vm).await {
                Ok(c) => c,
                Err(e) => {
                    return leftover_without_qemu(&dir, &self.vm, &e);
                }
            };
            let mut problems = Vec::new();
            if let Some(a) = &qga {
                match thaw(a).await {
                    Ok(n) => cx.log(format!(
                        "VM {}: thaw sent ({n} file system(s) thawed)",
                        self.vm
                    )),
                    Err(e) => {
                        // An agent that never answered never froze anything
                        // it was asked to; say so, do not fail on it.
                        cx.log(format!("VM {}: thaw not answered: {e}", self.vm));
                        if a.sync(AGENT_PROBE).await.is_ok() {
                            problems.push(format!("thaw failed: {e}"));
                        }
                    }
                }
            }
            match sweep(&qmp, &dir).await {
                Ok(what) => cx.log(format!("VM {}: {what}", self.vm)),
                Err(e) => problems.push(e),
            }
            if problems.is_empty() {
                Ok(())
            } else {
                Err(StepError::failed(format!(
                    "VM {}: {}",
                    self.vm,
                    problems.join("; ")
                )))
            }
        })
    }
}

fn snap_overlays(o: &[Overlay]) -> Vec<Value> {
    o.iter()
        .map(|o| json!({"device": o.device, "node": o.node, "below": o.below, "path": o.path}))
        .collect()
}

/// Makes the transaction of `prepared` fail in QEMU (test-only fault).
async fn sabotage(prepared: overlay::Prepared, qmp: &QmpClient) -> overlay::Prepared {
    // Deleting the first overlay's node makes the transaction name a node
    // that does not exist: QEMU refuses the whole transaction.
    if let Some(o) = prepared.overlays().first() {
        let _ = qmp
            .execute("blockdev-del", json!({"node-name": o.node}))
            .await;
    }
    prepared
}

/// After QEMU is gone: overlay files left in `dir` hold guest writes that
/// are not in the volume. Keep them and say so.
fn leftover_without_qemu(dir: &Path, vm: &str, why: &str) -> Result<(), StepError> {
    let files: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path().display().to_string())
                .collect()
        })
        .unwrap_or_default();
    if files.is_empty() {
        let _ = std::fs::remove_dir(dir);
        return Ok(());
    }
    Err(StepError::failed(format!(
        "VM {vm}: {why}; its overlay files were kept ({}): commit them into the volume \
         with qemu-img commit before starting the VM",
        files.join(", ")
    )))
}

fn in_dir(filename: &str, dir: &Path) -> bool {
    Path::new(filename).parent() == Some(dir)
}

/// Folds every overlay of `dir` that a disk of the VM runs on back into
/// the layer below it (active commit), deletes the overlay nodes no disk
/// uses, and removes the files and the directory. Idempotent: after a
/// crash at any point, running it again finishes the job.
async fn sweep(qmp: &QmpClient, dir: &Path) -> Result<String, String> {
    let graph = block_graph(qmp)
        .await
        .map_err(|e| format!("cannot read the block graph: {e}"))?;
    let mut active = Vec::new();
    let mut used = BTreeSet::new();
    for chain in &graph.disks {
        for (i, layer) in chain.layers.iter().enumerate() {
            used.insert(layer.node.name.clone());
            if in_dir(&layer.protocol.filename, dir) {
                if i != 0 || chain.layers.len() < 2 {
                    return Err(format!(
                        "disk {}: overlay {} is not the active layer; left as is",
                        chain.device, layer.protocol.filename
                    ));
                }
                active.push(Overlay {
                    device: chain.device.clone(),
                    below: chain.layers[1].node.name.clone(),
                    node: layer.node.name.clone(),
                    path: PathBuf::from(&layer.protocol.filename),
                });
            }
        }
    }
    let n_active = active.len();
    if !active.is_empty() {
        OverlaySet::adopt(qmp.clone(), active)
            .commit(COMMIT_TIMEOUT)
            .await
            .map_err(|e| format!("committing its overlays failed: {e}; they are still active"))?;
    }
    let mut dropped = 0;
    for node in graph.nodes.values() {
        if node.driver == "qcow2" && !used.contains(&node.name) {
            let file_in_dir = graph.edges.iter().any(|(p, role, c)| {
                p == &node.name
                    && role == "file"
                    && graph.nodes.get(c).is_some_and(|f| in_dir(&f.filename, dir))
            }) || in_dir(&node.filename, dir);
            if file_in_dir {
                qmp.execute("blockdev-del", json!({"node-name": node.name}))
                    .await
                    .map_err(|e| format!("cannot delete overlay node {}: {e}", node.name))?;
                dropped += 1;
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            std::fs::remove_file(e.path())
                .map_err(|err| format!("cannot remove {}: {err}", e.path().display()))?;
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot remove {}: {e}", dir.display())),
    }
    if let Some(parent) = dir.parent() {
        let _ = std::fs::remove_dir(parent);
    }
    Ok(format!(
        "{n_active} overlay(s) committed back, {dropped} unused overlay node(s) deleted, no overlay left"
    ))
}

// ---------------------------------------------------------------- merge

pub(super) struct Merge {
    pub(super) env: Arc<Env>,
    pub(super) p: Params,
    pub(super) vm: String,
    pub(super) name: String,
}

impl Step<App> for Merge {
    fn name(&self) -> &str {
        &self.name
    }

    fn recovery(&self) -> Recovery {
        Recovery::Retry
    }

    fn intent(&self, _cx: &StepContext<App>) -> Result<Value, StepError> {
        Ok(json!({ "vm": self.vm, "overlay_dir": self.env.overlay_dir(&self.p.name, &self.vm) }))
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let dir = self.env.overlay_dir(&self.p.name, &self.vm);
            let (qmp, _) = control_wait(&self.env, &self.vm).await.map_err(|e| {
                StepError::failed(format!("VM {}: cannot merge its overlays: {e}", self.vm))
            })?;
            let t0 = Instant::now();
            let what = sweep(&qmp, &dir)
                .await
                .map_err(|e| StepError::failed(format!("VM {}: {e}", self.vm)))?;
            let merge_ms = ms(t0.elapsed());
            cx.log(format!("VM {}: {what} ({merge_ms:.0} ms)", self.vm));
            Ok(json!({ "merge_ms": merge_ms }))
        })
    }

    fn undo<'a>(
        &'a self,
        cx: &'a StepContext<App>,
        intent: &'a Value,
        _result: Option<&'a Value>,
    ) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let dir = PathBuf::from(intent["overlay_dir"].as_str().unwrap_or_default());
            let (qmp, _) = match control_wait(&self.env, &self.vm).await {
                Ok(c) => c,
                Err(e) => return leftover_without_qemu(&dir, &self.vm, &e),
            };
            let what = sweep(&qmp, &dir)
                .await
                .map_err(|e| StepError::failed(format!("VM {}: {e}", self.vm)))?;
            cx.log(format!("VM {}: {what}", self.vm));
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_dir_membership() {
        let d = Path::new("/data/overlays/g/vm");
        assert!(in_dir("/data/overlays/g/vm/vda-1-vda-ov.qcow2", d));
        assert!(!in_dir("/data/overlays/g/vm2/vda.qcow2", d));
        assert!(!in_dir("nbd+unix:///vm.x.vda?socket=/data/run/nbd.sock", d));
    }
}
