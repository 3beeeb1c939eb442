//! `status` of a batch: the decision of [`crate::batch`] per VM, with the
//! evidence and the live state of both sides.

use ferry_api::{
    BatchMember, BatchStatus, BatchVmState, BatchVmStatus, IncomingStatus, MigrationRecord,
    SideState, VmInfo,
};

use super::{Env, source_op};
use crate::peers::PeerError;

/// Where the member list comes from.
pub struct Known {
    pub batch: String,
    pub to: String,
    pub members: Vec<BatchMember>,
    /// The local `migrate.batch` operation and its state, if any.
    pub operation: Option<(String, String)>,
    pub from: String,
}

/// The live state of VM `vm` on `host`.
pub async fn side(env: &Env, host: &str, vm: &str) -> SideState {
    let st = |state: &str, pid| SideState {
        host: host.to_string(),
        state: state.to_string(),
        pid,
    };
    let c = match env.client(host).await {
        Ok(c) => c,
        Err(_) => return st("unreachable", None),
    };
    match c.get::<VmInfo>(&format!("/v1/vms/{vm}")).await {
        Ok(info) => match (&info.qmp_status, info.pid) {
            (Some(q), pid) => st(q, pid),
            (None, Some(pid)) => st(&info.state.to_string(), Some(pid)),
            (None, None) => st("stopped", None),
        },
        Err(PeerError::Failed { status: 404, .. }) => st("absent", None),
        Err(_) => st("unreachable", None),
    }
}

/// Whether a QEMU in run state `s` is the VM's live instance after a
/// migration arrived (not waiting for it, not gone).
fn runs(s: &str) -> bool {
    !matches!(
        s,
        "absent" | "stopped" | "crashed" | "defined" | "unreachable" | "inmigrate"
    )
}

/// The decision for one VM.
#[allow(clippy::too_many_arguments)]
pub fn decide(
    m: &BatchMember,
    rec: Option<&MigrationRecord>,
    source: SideState,
    destination: SideState,
    hydrating: bool,
    dest_sources: bool,
    op: Option<(String, bool)>,
) -> BatchVmStatus {
    let mut evidence = Vec::new();
    let running_op = op.as_ref().is_some_and(|(_, unfinished)| *unfinished);
    let (state, side, reason, action);
    match rec {
        None => {
            state = if running_op {
                BatchVmState::InProgress
            } else {
                BatchVmState::NotStarted
            };
            side = "source";
            reason = "no migration-started record at the destination: not migrated".to_string();
            action = if runs(&source.state) {
                "none"
            } else {
                "restart on source"
            };
        }
        Some(r) => {
            evidence.push("record".to_string());
            if r.placeholder.is_some() {
                evidence.push("placeholder".into());
            }
            if r.rolled_back.is_some() {
                evidence.push("rolled_back".into());
            }
            if r.completed.is_some() {
                evidence.push("completed".into());
            }
            if r.completed.is_some() {
                state = BatchVmState::Migrated;
                side = "destination";
                reason = "migration-completed event at the destination: migrated".to_string();
                action = if source.state != "absent" || dest_sources {
                    "finish"
                } else {
                    "none"
                };
            } else if r.placeholder.is_none() || r.rolled_back.is_some() {
                state = if running_op {
                    BatchVmState::InProgress
                } else {
                    BatchVmState::Failed
                };
                side = "source";
                reason = if r.rolled_back.is_some() {
                    "record, placeholder rolled back: not migrated".to_string()
                } else {
                    "record, no placeholder: not migrated".to_string()
                };
                action = if destination.state != "absent" || !runs(&source.state) {
                    "roll back"
                } else {
                    "none"
                };
            } else {
                // Placeholder, no event: the live state decides.
                let mut why = Vec::new();
                if runs(&destination.state) {
                    why.push(format!("the destination's QEMU is {}", destination.state));
                }
                if matches!(source.state.as_str(), "postmigrate" | "finish-migrate") {
                    why.push(format!("the source's QEMU is {}", source.state));
                }
                if hydrating {
                    why.push("the destination hydrates its disks".into());
                }
                if why.is_empty() {
                    side = "source";
                    reason = format!(
                        "placeholder, no completed event; no switchover (destination {}, source {}): not migrated",
                        destination.state, source.state
                    );
                    state = if running_op {
                        BatchVmState::InProgress
                    } else {
                        BatchVmState::Failed
                    };
                    action = "roll back";
                } else {
                    side = "destination";
                    reason = format!(
                        "placeholder, no completed event; switched over: {}",
                        why.join(", ")
                    );
                    state = BatchVmState::InProgress;
                    action = "finish";
                }
            }
        }
    }
    BatchVmStatus {
        vm: m.vm.clone(),
        name: m.name.clone(),
        state,
        side: side.to_string(),
        evidence,
        reason,
        source,
        destination,
        operation: op.map(|(id, _)| id),
        action: action.to_string(),
    }
}

/// The status of one member.
pub async fn member(
    env: &Env,
    k: &Known,
    m: &BatchMember,
    rec: Option<&MigrationRecord>,
) -> BatchVmStatus {
    let source = side(env, &m.from, &m.vm).await;
    let destination = side(env, &k.to, &m.vm).await;
    let mut incoming = None;
    if let Ok(c) = env.client(&k.to).await
        && let Ok(st) = c
            .get::<IncomingStatus>(&format!("/v1/peer/migrate/{}", m.vm))
            .await
    {
        incoming = Some(st);
    }
    let hydrating = incoming.as_ref().is_some_and(|s| s.hydrating);
    let op = match env.client(&m.from).await {
        Ok(c) => source_op(&c, &m.vm, &k.batch)
            .await
            .ok()
            .flatten()
            .map(|o| (o.id, !o.state.is_finished())),
        Err(_) => None,
    };
    decide(
        m,
        rec,
        source,
        destination,
        hydrating,
        incoming.is_some(),
        op,
    )
}

/// The status of a batch.
pub async fn status(env: &Env, k: &Known) -> Result<BatchStatus, String> {
    let recs = env.dest_records(&k.to, &k.batch).await.map_err(|e| {
        format!(
            "the destination {} cannot be asked for its records of batch {}: {e}",
            k.to, k.batch
        )
    })?;
    let mut members = k.members.clone();
    if let Some(man) = &recs.manifest {
        for mm in &man.members {
            if !members.iter().any(|x| x.vm == mm.vm) {
                members.push(mm.clone());
            }
        }
    }
    let mut vms = Vec::new();
    for m in &members {
        vms.push(member(env, k, m, recs.records.get(&m.vm)).await);
    }
    Ok(BatchStatus {
        batch: k.batch.clone(),
        to: k.to.clone(),
        operation: k.operation.as_ref().map(|o| o.0.clone()),
        operation_state: k.operation.as_ref().map(|o| o.1.clone()),
        from: k.from.clone(),
        vms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_api::Mark;

    fn s(state: &str) -> SideState {
        SideState {
            host: "h".into(),
            state: state.into(),
            pid: None,
        }
    }

    fn rec(placeholder: bool, completed: bool) -> MigrationRecord {
        let mark = Mark {
            at_ms: 1,
            note: String::new(),
        };
        MigrationRecord {
            batch: "b".into(),
            vm: "u".into(),
            name: "vm".into(),
            from: "a".into(),
            volumes: vec![],
            started: mark.clone(),
            placeholder: placeholder.then(|| mark.clone()),
            rolled_back: None,
            completed: completed.then_some(mark),
        }
    }

    #[test]
    fn the_decision_follows_the_evidence() {
        let m = BatchMember {
            vm: "u".into(),
            name: "vm".into(),
            from: "a".into(),
        };
        let d = decide(&m, None, s("running"), s("absent"), false, false, None);
        assert_eq!(
            (d.state, d.side.as_str()),
            (BatchVmState::NotStarted, "source")
        );
        let r = rec(false, false);
        let d = decide(&m, Some(&r), s("running"), s("absent"), false, false, None);
        assert_eq!((d.state, d.side.as_str()), (BatchVmState::Failed, "source"));
        let r = rec(true, false);
        let d = decide(
            &m,
            Some(&r),
            s("running"),
            s("inmigrate"),
            false,
            false,
            None,
        );
        assert_eq!(
            (d.side.as_str(), d.action.as_str()),
            ("source", "roll back")
        );
        let d = decide(
            &m,
            Some(&r),
            s("postmigrate"),
            s("running"),
            false,
            false,
            None,
        );
        assert_eq!(
            (d.side.as_str(), d.action.as_str()),
            ("destination", "finish")
        );
        // The source's QEMU died after switchover: the destination runs it.
        let d = decide(&m, Some(&r), s("crashed"), s("running"), false, false, None);
        assert_eq!(d.side, "destination");
        let r = rec(true, true);
        let d = decide(&m, Some(&r), s("absent"), s("running"), false, false, None);
        assert_eq!(
            (d.state, d.action.as_str()),
            (BatchVmState::Migrated, "none")
        );
    }
}
