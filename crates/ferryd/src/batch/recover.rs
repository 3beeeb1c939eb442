//! `migrate.batch.recover`: acts on the status of each VM of a batch so
//! that every VM runs on exactly one host.
//!
//! Per VM, after waiting for a `vm.migrate` of the batch still running on
//! its source (it finishes or compensates by itself):
//! - switched over (`side` = destination): hydration is started at the
//!   destination (which writes the *completed* event), awaited, then the
//!   source is released (its QEMU, definition, exports and volumes) and the
//!   destination forgets its source records;
//! - not switched over: the destination removes the placeholder, its QEMU
//!   and lazy volumes (the record is marked rolled back), and the VM runs
//!   on the source — resumed, or restarted from its intact volumes when its
//!   QEMU died before switchover.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_api::{BatchMember, IncomingStatus};
use ferry_ops::{BoxFuture, Plan, Recovery, Step, StepContext, StepError};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::status::{self, Known};
use super::{Env, PATIENCE, patient, source_op};
use crate::daemon::App;
use crate::peers::PeerError;

/// The journaled parameters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Params {
    pub batch: String,
    pub to: String,
    pub members: Vec<BatchMember>,
}

pub(super) fn plan(env: Arc<Env>, params: &Value) -> Result<Plan<App>, String> {
    let p: Params = serde_json::from_value(params.clone()).map_err(|e| e.to_string())?;
    let title = format!("recover batch {} ({} VM(s))", p.batch, p.members.len());
    Ok(Plan::new(
        &title,
        vec![(
            Box::new(RecoverStep {
                env,
                p: Arc::new(p),
            }),
            1.0,
        )],
    ))
}

struct RecoverStep {
    env: Arc<Env>,
    p: Arc<Params>,
}

fn ok_404<T>(r: Result<T, PeerError>) -> Result<Option<T>, PeerError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(PeerError::Failed { status: 404, .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

fn runs(s: &str) -> bool {
    matches!(
        s,
        "running" | "paused" | "postmigrate" | "finish-migrate" | "inmigrate"
    ) || s.starts_with("postcopy")
}

impl RecoverStep {
    fn known(&self) -> Known {
        Known {
            batch: self.p.batch.clone(),
            to: self.p.to.clone(),
            members: self.p.members.clone(),
            operation: None,
            from: "journal".into(),
        }
    }

    async fn one(&self, cx: &StepContext<App>, m: &BatchMember) -> Result<String, String> {
        let (env, p) = (&self.env, &self.p);
        let src = env.client(&m.from).await?;
        let dst = env.client(&p.to).await?;
        // A migration of this batch still running finishes or compensates.
        if let Some(op) = patient("reading the source's operations", || {
            source_op(&src, &m.vm, &p.batch)
        })
        .await?
            && !op.state.is_finished()
        {
            cx.log(format!(
                "VM {}: waiting for operation {} on {}",
                m.name, op.id, m.from
            ));
            src.wait_operation(&op.id, PATIENCE, |_| {})
                .await
                .map_err(|e| e.to_string())?;
        }
        let recs = env.dest_records(&p.to, &p.batch).await?;
        let rec = recs.records.get(&m.vm).cloned();
        let st = status::member(env, &self.known(), m, rec.as_ref()).await;
        if st.source.state == "unreachable" || st.destination.state == "unreachable" {
            return Err(format!(
                "VM {}: {} is unreachable; nothing done",
                m.name,
                if st.source.state == "unreachable" {
                    &m.from
                } else {
                    &p.to
                }
            ));
        }
        let uuid = &m.vm;
        let what = if st.side == "destination" {
            // Finish: hydration (and the completed event), then release.
            let path = format!("/v1/peer/migrate/{uuid}/hydrate");
            patient("starting hydration", || async {
                ok_404(dst.post::<_, IncomingStatus>(&path, &json!({})).await)
            })
            .await?;
            let path = "/v1/peer/migrations/complete";
            let body = json!({ "batch": p.batch, "vm": uuid });
            patient("recording the completed event", || {
                dst.post::<_, serde::de::IgnoredAny>(path, &body)
            })
            .await?;
            let path = format!("/v1/peer/migrate/{uuid}");
            loop {
                let st = ok_404(dst.get::<IncomingStatus>(&path).await);
                match st {
                    Ok(None) => break,
                    Ok(Some(s)) if s.done => break,
                    Ok(Some(_)) | Err(PeerError::Unreachable { .. }) => {
                        tokio::time::sleep(Duration::from_secs(1)).await
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
            // Release the source.
            let vm_path = format!("/v1/vms/{uuid}");
            if st.source.state != "absent" {
                let _ = src
                    .post::<_, serde::de::IgnoredAny>(&format!("{vm_path}/kill"), &json!({}))
                    .await;
                ok_404(src.delete(&vm_path).await).map_err(|e| e.to_string())?;
            }
            let vols = rec.as_ref().map(|r| r.volumes.clone()).unwrap_or_default();
            for v in &vols {
                ok_404(src.delete(&format!("/v1/volumes/{v}")).await).map_err(|e| e.to_string())?;
            }
            let path = format!("/v1/peer/migrate/{uuid}/finish");
            ok_404(
                dst.post::<_, serde::de::IgnoredAny>(&path, &json!({}))
                    .await,
            )
            .map_err(|e| e.to_string())?;
            format!("finished: runs on {}, source released", p.to)
        } else {
            // Roll back: nothing of the VM stays at the destination.
            let path = format!("/v1/peer/migrate/{uuid}");
            ok_404(dst.delete(&path).await).map_err(|e| e.to_string())?;
            let vm_path = format!("/v1/vms/{uuid}");
            let s = status::side(env, &m.from, uuid).await;
            match s.state.as_str() {
                "running" => {}
                "paused" => {
                    src.post::<_, serde::de::IgnoredAny>(&format!("{vm_path}/resume"), &json!({}))
                        .await
                        .map_err(|e| e.to_string())?;
                }
                "absent" => {
                    return Err(format!(
                        "VM {} is defined neither here nor at {}: lost",
                        m.name, m.from
                    ));
                }
                "stopped" | "crashed" | "defined" => {
                    cx.log(format!(
                        "VM {}: its QEMU on {} is gone; restarting it from its volumes",
                        m.name, m.from
                    ));
                    src.post::<_, serde::de::IgnoredAny>(&format!("{vm_path}/start"), &json!({}))
                        .await
                        .map_err(|e| e.to_string())?;
                }
                other => {
                    return Err(format!(
                        "VM {} is {other} on {}; not rolled back",
                        m.name, m.from
                    ));
                }
            }
            format!("rolled back: runs on {}", m.from)
        };
        // Exactly one host runs it now.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let a = status::side(env, &m.from, uuid).await;
            let b = status::side(env, &p.to, uuid).await;
            let n = [&a, &b].iter().filter(|s| runs(&s.state)).count();
            if n == 1 {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "VM {} after recovery: {} on {}, {} on {}",
                    m.name, a.state, m.from, b.state, p.to
                ));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Ok(what)
    }
}

impl Step<App> for RecoverStep {
    fn name(&self) -> &str {
        "recover"
    }

    fn recovery(&self) -> Recovery {
        Recovery::Retry
    }

    fn run<'a>(&'a self, cx: &'a StepContext<App>) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let mut out = serde_json::Map::new();
            let mut failed = 0;
            for m in &self.p.members {
                let r = self.one(cx, m).await;
                let v = match r {
                    Ok(s) => s,
                    Err(e) => {
                        failed += 1;
                        format!("failed: {e}")
                    }
                };
                cx.log(format!("VM {}: {v}", m.name));
                out.insert(m.name.clone(), json!(v));
            }
            if failed > 0 {
                return Err(StepError::failed(format!(
                    "{failed} VM(s) not recovered: {}",
                    Value::Object(out)
                )));
            }
            Ok(Value::Object(out))
        })
    }
}
