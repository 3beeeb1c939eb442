//! The shared result format of every suite, its table and its JSON file.
//!
//! `target/bench-results/<suite>.json` holds
//! `{"suite": "...", "results": [{"metric", "unit", "ferry", "peers": {..}, "higher_is_better"}]}`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// One measured figure: Ferry's value and the same figure for each peer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measurement {
    pub metric: String,
    pub unit: String,
    pub ferry: f64,
    pub peers: BTreeMap<String, f64>,
    pub higher_is_better: bool,
}

impl Measurement {
    pub fn new(metric: impl Into<String>, unit: impl Into<String>, ferry: f64) -> Self {
        Measurement {
            metric: metric.into(),
            unit: unit.into(),
            ferry,
            peers: BTreeMap::new(),
            higher_is_better: true,
        }
    }

    pub fn peer(mut self, name: impl Into<String>, value: f64) -> Self {
        self.peers.insert(name.into(), value);
        self
    }

    pub fn lower_is_better(mut self) -> Self {
        self.higher_is_better = false;
        self
    }

    /// How many times better Ferry is than `peer` (>1 means Ferry wins),
    /// whichever direction the metric counts in.
    pub fn ratio(&self, peer: &str) -> Option<f64> {
        let p = *self.peers.get(peer)?;
        if p == 0.0 || self.ferry == 0.0 {
            return None;
        }
        Some(if self.higher_is_better {
            self.ferry / p
        } else {
            p / self.ferry
        })
    }
}

/// All figures of one suite run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub suite: String,
    pub results: Vec<Measurement>,
}

impl Report {
    pub fn new(suite: impl Into<String>) -> Self {
        Report {
            suite: suite.into(),
            results: Vec::new(),
        }
    }

    pub fn push(&mut self, m: Measurement) {
        self.results.push(m);
    }

    /// The table printed at the end of a run: one row per metric, one
    /// column per peer with Ferry's ratio against it.
    pub fn table(&self) -> String {
        let peers: Vec<&String> = {
            let mut v: Vec<&String> = self.results.iter().flat_map(|m| m.peers.keys()).collect();
            v.sort();
            v.dedup();
            v
        };
        let mut rows = vec![{
            let mut h = vec!["metric".to_string(), "unit".into(), "ferry".into()];
            for p in &peers {
                h.push((*p).clone());
                h.push(format!("ratio vs {p}"));
            }
            h
        }];
        for m in &self.results {
            let mut r = vec![m.metric.clone(), m.unit.clone(), fmt_num(m.ferry)];
            for p in &peers {
                match m.peers.get(*p) {
                    Some(v) => {
                        r.push(fmt_num(*v));
                        r.push(m.ratio(p).map_or("-".into(), |x| format!("{x:.2}x")));
                    }
                    None => {
                        r.push("-".into());
                        r.push("-".into());
                    }
                }
            }
            rows.push(r);
        }
        let cols = rows[0].len();
        let widths: Vec<usize> = (0..cols)
            .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
            .collect();
        let mut out = format!("suite {}\n", self.suite);
        for (i, r) in rows.iter().enumerate() {
            let line: Vec<String> = r
                .iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
            if i == 0 {
                out.push_str(&"-".repeat(widths.iter().sum::<usize>() + 2 * (cols - 1)));
                out.push('\n');
            }
        }
        out
    }

    /// Writes `target/bench-results/<suite>.json` and returns its path.
    pub fn write(&self) -> anyhow::Result<PathBuf> {
        let dir = results_dir();
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{}.json", self.suite));
        std::fs::write(&path, serde_json::to_string_pretty(self)? + "\n")?;
        Ok(path)
    }
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

/// The cargo target directory (honours `CARGO_TARGET_DIR`).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let t = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target");
            t.canonicalize().unwrap_or(t)
        }
    }
}

pub fn results_dir() -> PathBuf {
    target_dir().join("bench-results")
}

/// A scratch directory for a suite's data files, on the same file system as
/// the target directory (so the disk measured is the project's disk, not a tmpfs).
/// A fresh scratch directory for a suite: under `FERRY_BENCH_SCRATCH` when
/// set (e.g. a tmpfs, to take the disk out of a measurement), else under
/// the target directory.
pub fn scratch_dir(suite: &str) -> anyhow::Result<tempfile::TempDir> {
    let base = match std::env::var_os("FERRY_BENCH_SCRATCH") {
        Some(dir) => PathBuf::from(dir),
        None => target_dir().join("bench-scratch"),
    };
    std::fs::create_dir_all(&base)?;
    Ok(tempfile::Builder::new().prefix(suite).tempdir_in(base)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_follows_direction() {
        let m = Measurement::new("iops", "ops/s", 200.0).peer("raw", 100.0);
        assert_eq!(m.ratio("raw"), Some(2.0));
        let l = Measurement::new("latency", "ms", 50.0)
            .peer("raw", 100.0)
            .lower_is_better();
        assert_eq!(l.ratio("raw"), Some(2.0));
        assert_eq!(l.ratio("absent"), None);
    }

    #[test]
    fn table_lists_every_metric_and_peer() {
        let mut r = Report::new("t");
        r.push(Measurement::new("a", "MB/s", 10.0).peer("p", 5.0));
        r.push(Measurement::new("b", "ops/s", 3.0));
        let t = r.table();
        assert!(t.contains("ratio vs p"));
        assert!(t.contains("2.00x"));
        assert!(t.lines().any(|l| l.starts_with("b ")));
    }

    #[test]
    fn json_has_the_shared_shape() {
        let mut r = Report::new("t");
        r.push(Measurement::new("a", "MB/s", 1.5).peer("p", 2.0));
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(v["suite"], "t");
        assert_eq!(v["results"][0]["peers"]["p"], 2.0);
        assert_eq!(v["results"][0]["higher_is_better"], true);
    }
}
