//! Retention: keep-last / daily / weekly / monthly, per VM.

use std::collections::{BTreeMap, HashSet};

use serde::Serialize;

use crate::error::Result;
use crate::repo::{Manifest, Repository, civil};

/// Which backups to keep, per VM. A backup is kept if any rule keeps it.
#[derive(Debug, Clone, Default)]
pub struct PrunePolicy {
    /// The newest N backups.
    pub keep_last: usize,
    /// The newest backup of each of the last N days that have one.
    pub keep_daily: usize,
    /// The newest backup of each of the last N ISO weeks that have one.
    pub keep_weekly: usize,
    /// The newest backup of each of the last N months that have one.
    pub keep_monthly: usize,
}

/// What prune kept and forgot.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneResult {
    /// Backup ids kept.
    pub kept: Vec<String>,
    /// Backup ids forgotten (or that would be, in a dry run).
    pub forgotten: Vec<String>,
}

/// Maps a backup time to its day, week or month.
type Bucket = fn(u64) -> i64;

/// The ids `policy` keeps among `backups` (any VMs).
pub fn select(policy: &PrunePolicy, backups: &[Manifest]) -> HashSet<String> {
    let mut by_vm: BTreeMap<&str, Vec<&Manifest>> = BTreeMap::new();
    for m in backups {
        by_vm.entry(&m.vm).or_default().push(m);
    }
    let mut keep = HashSet::new();
    for (_, mut list) in by_vm {
        list.sort_by(|a, b| (b.time, &b.id).cmp(&(a.time, &a.id)));
        for m in list.iter().take(policy.keep_last) {
            keep.insert(m.id.clone());
        }
        let rules: [(usize, Bucket); 3] = [
            (policy.keep_daily, |t| (t / 86_400) as i64),
            // ISO weeks start on Monday; 1970-01-01 was a Thursday.
            (policy.keep_weekly, |t| {
                ((t / 86_400) as i64 + 3).div_euclid(7)
            }),
            (policy.keep_monthly, |t| {
                let (y, m, _) = civil((t / 86_400) as i64);
                y * 12 + m as i64
            }),
        ];
        for (n, bucket) in rules {
            let mut seen = HashSet::new();
            for m in &list {
                if seen.len() >= n {
                    break;
                }
                if seen.insert(bucket(m.time)) {
                    keep.insert(m.id.clone());
                }
            }
        }
    }
    keep
}

impl Repository {
    /// Forget the backups `policy` does not keep (nothing when `dry_run`).
    /// Their chunks are freed by the next [`Repository::gc`].
    pub fn prune(&self, policy: &PrunePolicy, dry_run: bool) -> Result<PruneResult> {
        let all = self.list()?;
        let keep = select(policy, &all);
        let mut r = PruneResult::default();
        for m in all {
            if keep.contains(&m.id) {
                r.kept.push(m.id);
            } else {
                if !dry_run {
                    self.forget(&m.id)?;
                }
                r.forgotten.push(m.id);
            }
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: &str, vm: &str, time: u64) -> Manifest {
        Manifest {
            id: id.into(),
            vm: vm.into(),
            time,
            config: serde_json::Value::Null,
            parent: None,
            disks: vec![],
        }
    }

    #[test]
    fn keeps_last_daily_weekly_monthly_per_vm() {
        let day = 86_400;
        // Four backups a day for 70 days, two VMs.
        let mut all = Vec::new();
        for vm in ["a", "b"] {
            for d in 0..70u64 {
                for h in 0..4u64 {
                    let t = 19_723 * day + d * day + h * 6 * 3600;
                    all.push(m(&format!("{vm}-{d:03}-{h}"), vm, t));
                }
            }
        }
        let p = PrunePolicy {
            keep_last: 2,
            ..Default::default()
        };
        let k = select(&p, &all);
        assert_eq!(k.len(), 4);
        assert!(k.contains("a-069-3") && k.contains("a-069-2") && k.contains("b-069-3"));
        let p = PrunePolicy {
            keep_daily: 3,
            ..Default::default()
        };
        let k = select(&p, &all);
        assert_eq!(k.len(), 6);
        assert!(k.contains("a-067-3") && !k.contains("a-066-3") && !k.contains("a-068-2"));
        let p = PrunePolicy {
            keep_monthly: 3,
            ..Default::default()
        };
        let k = select(&p, &all);
        // 2024-01-01 + 70 days spans January, February and March.
        assert_eq!(k.len(), 6);
        assert!(k.contains("a-030-3"), "last of January");
        let p = PrunePolicy {
            keep_weekly: 2,
            ..Default::default()
        };
        let k = select(&p, &all);
        assert_eq!(k.len(), 4);
        assert!(k.contains("a-069-3"));
        assert_eq!(select(&PrunePolicy::default(), &all).len(), 0);
    }
}
