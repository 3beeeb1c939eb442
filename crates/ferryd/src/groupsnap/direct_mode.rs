//! Direct mode: one step freezes every guest, takes the group snapshot in
//! every pool holding the disks, and thaws.

use super::*;

// --------------------------------------------------------------- direct

pub(super) struct Direct {
    pub(super) env: Arc<Env>,
    pub(super) p: Params,
    pub(super) per_vm: Vec<[usize; 2]>,
    pub(super) storage: usize,
}

impl Step<App> for Direct {
    fn name(&self) -> &str {
        "quiesce, snapshot, thaw"
    }

    fn intent(&self, cx: &StepContext<App>) -> Result<Value, StepError> {
        let r = resolved(cx)?;
        Ok(json!({
            "group": self.p.name,
            "vms": self.p.vms,
            "pairs": pairs(&self.p, &r),
            "remote": remote_pairs(&self.p, &r),
        }))
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let r = resolved(cx)?;
            let pairs = pairs(&self.p, &r);
            let remote = remote_pairs(&self.p, &r);
            let mut agents = Vec::new();
            for vm in &self.p.vms {
                let (_, _, qga) = control(&self.env, vm).await.map_err(StepError::Failed)?;
                agents.push(qga);
            }
            let probes = futures::future::join_all(
                agents
                    .iter()
                    .map(|a| probe_agent(self.p.quiesce, a.as_ref())),
            )
            .await;

            // ---- the guests' pause starts here: no journal writes until thaw.
            let t0 = Instant::now();
            let freezes = futures::future::join_all(probes.iter().map(|p| async move {
                let r = match p {
                    Ok(a) => Some(a.freeze().await),
                    Err(_) => None,
                };
                (r, Instant::now())
            }))
            .await;
            let mut guards = Vec::new();
            let mut qs = Vec::new();
            for ((probe, (fr, at)), vm) in probes.iter().zip(freezes).zip(&self.p.vms) {
                let mut q = Quiesce::default();
                match (probe, fr) {
                    (Err(why), _) => q.note = format!("{why}; crash-consistent"),
                    (Ok(_), Some(Err(e))) => {
                        q.note = format!(
                            "the guest agent's freeze failed ({e}); a thaw was sent; crash-consistent"
                        )
                    }
                    (Ok(_), Some(Ok(g))) => {
                        q.freeze_ms = Some(ms(at - t0));
                        guards.push((vm.clone(), g, at));
                    }
                    (Ok(_), None) => {}
                }
                qs.push(q);
            }
            if !guards.is_empty() {
                test_pause(&format!("{KIND}:frozen")).await;
            }
            let t_snap = Instant::now();
            let snap =
                take_everywhere(&self.env, &cx.app.pool, &self.p.name, &pairs, &remote).await;
            let t_snapped = Instant::now();
            let thaws =
                futures::future::join_all(guards.into_iter().map(|(vm, g, at)| async move {
                    let r = g.thaw().await;
                    (vm, at, r, Instant::now())
                }))
                .await;
            // ---- pause over.

            let storage_ms = ms(t_snapped - t_snap);
            let mut failed_thaws = Vec::new();
            for (vm, at, r, done) in thaws {
                let i = self.p.vms.iter().position(|v| *v == vm).unwrap_or(0);
                let q = &mut qs[i];
                match r {
                    Ok(_) => {
                        q.quiesced = true;
                        q.note = "frozen by the guest agent for the pool snapshot".into();
                        q.frozen_ms = Some(ms(done - t0));
                        q.pause_ms = Some(ms(t_snapped - at));
                    }
                    Err(e) => failed_thaws.push(format!("VM {vm}: thaw failed: {e}")),
                }
            }
            for (i, [a, b]) in self.per_vm.iter().enumerate() {
                let _ = i;
                cx.progress.update(|t| {
                    t.finish(*a);
                    t.finish(*b);
                });
            }
            cx.progress.update(|t| t.finish(self.storage));
            let remote_lines = snap.map_err(|e| {
                StepError::failed(format!(
                    "the pool group snapshot failed: {e}; every frozen guest was sent a thaw"
                ))
            })?;
            if !failed_thaws.is_empty() {
                return Err(StepError::failed(format!(
                    "{}; the undo retries the thaw",
                    failed_thaws.join("; ")
                )));
            }
            for (vm, q) in self.p.vms.iter().zip(&qs) {
                cx.log(format!(
                    "VM {vm}: {}{}",
                    q.note,
                    q.frozen_ms
                        .map(|f| format!(" (frozen {f:.1} ms)"))
                        .unwrap_or_default()
                ));
            }
            cx.log(format!(
                "pool group snapshot {} of exactly {} volume(s) ({storage_ms:.1} ms)",
                self.p.name,
                pairs.len() + remote.len()
            ));
            for l in remote_lines {
                cx.log(l);
            }
            let per_vm: Vec<Value> = qs
                .iter()
                .map(|q| serde_json::to_value(q).unwrap_or(Value::Null))
                .collect();
            Ok(json!({ "vms": per_vm, "storage_ms": storage_ms }))
        })
    }

    fn undo<'a>(
        &'a self,
        cx: &'a StepContext<App>,
        intent: &'a Value,
        _result: Option<&'a Value>,
    ) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let mut problems = Vec::new();
            for vm in &self.p.vms {
                match control_wait(&self.env, vm).await {
                    Ok((_, Some(a))) => match thaw(&a).await {
                        Ok(n) => cx.log(format!("VM {vm}: thaw sent ({n} file system(s) thawed)")),
                        Err(e) => {
                            cx.log(format!("VM {vm}: thaw not answered: {e}"));
                            if a.sync(AGENT_PROBE).await.is_ok() {
                                problems.push(format!("VM {vm}: thaw failed: {e}"));
                            }
                        }
                    },
                    Ok((_, None)) => {}
                    Err(e) => cx.log(format!("VM {vm}: not thawed: {e}")),
                }
            }
            let pool = cx.app.pool.clone();
            let pairs = intent_pairs(intent);
            if let Err(e) = tokio::task::spawn_blocking(move || delete_pairs(&pool, &pairs))
                .await
                .map_err(StepError::failed)
                .and_then(|r| r)
            {
                problems.push(format!("cannot delete the group's snapshots: {e}"));
            }
            if let Err(e) = remote::delete(&self.env, &intent_remote(intent)).await {
                problems.push(format!("cannot delete the group's snapshots: {e}"));
            }
            if problems.is_empty() {
                Ok(())
            } else {
                Err(StepError::failed(problems.join("; ")))
            }
        })
    }
}
