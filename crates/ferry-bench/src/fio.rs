//! Runs fio jobs and reads their JSON output. Every suite that measures
//! block I/O (the disk, pool volumes, NBD exports) goes through here so that
//! all figures come from the same tool with the same settings.

use std::process::Command;

use anyhow::{Context, bail};

/// One fio job. `target` is a file name, or for the nbd engine a URI.
#[derive(Debug, Clone)]
pub struct FioJob {
    pub name: String,
    /// fio's `rw`: read, write, randread, randwrite.
    pub rw: String,
    pub bs: String,
    pub iodepth: u32,
    pub numjobs: u32,
    pub runtime_s: u32,
    pub size: String,
    pub ioengine: String,
    pub direct: bool,
    /// Extra `--key=value` arguments (filename or uri among them).
    pub args: Vec<String>,
}

impl FioJob {
    pub fn new(name: &str, rw: &str, bs: &str) -> Self {
        FioJob {
            name: name.into(),
            rw: rw.into(),
            bs: bs.into(),
            iodepth: 16,
            numjobs: 1,
            runtime_s: 10,
            size: "1G".into(),
            ioengine: "libaio".into(),
            direct: true,
            args: Vec::new(),
        }
    }

    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }
}

/// What a job measured, summed over reads and writes.
#[derive(Debug, Clone, Copy)]
pub struct FioResult {
    pub iops: f64,
    pub bytes_per_s: f64,
}

impl FioResult {
    pub fn mb_per_s(&self) -> f64 {
        self.bytes_per_s / 1e6
    }
}

pub fn run(job: &FioJob) -> anyhow::Result<FioResult> {
    let mut cmd = Command::new("fio");
    cmd.arg(format!("--name={}", job.name))
        .arg(format!("--rw={}", job.rw))
        .arg(format!("--bs={}", job.bs))
        .arg(format!("--iodepth={}", job.iodepth))
        .arg(format!("--numjobs={}", job.numjobs))
        .arg(format!("--runtime={}", job.runtime_s))
        .arg("--time_based")
        .arg(format!("--size={}", job.size))
        .arg(format!("--ioengine={}", job.ioengine))
        .arg(format!("--direct={}", u8::from(job.direct)))
        .arg("--group_reporting")
        .arg("--output-format=json")
        .args(&job.args);
    let out = cmd.output().context("cannot run fio (is it installed?)")?;
    if !out.status.success() {
        bail!(
            "fio job {} failed: {}",
            job.name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse(&String::from_utf8_lossy(&out.stdout))
        .with_context(|| format!("reading fio output of job {}", job.name))
}

/// Reads fio's `--output-format=json`, skipping any text it printed first.
pub fn parse(stdout: &str) -> anyhow::Result<FioResult> {
    let start = stdout.find('{').context("fio printed no JSON")?;
    let v: serde_json::Value = serde_json::from_str(&stdout[start..])?;
    let job = &v["jobs"][0];
    let mut iops = 0.0;
    let mut bw = 0.0;
    for dir in ["read", "write"] {
        iops += job[dir]["iops"].as_f64().unwrap_or(0.0);
        bw += job[dir]["bw_bytes"].as_f64().unwrap_or(0.0);
    }
    if iops == 0.0 {
        bail!("fio measured no I/O");
    }
    Ok(FioResult {
        iops,
        bytes_per_s: bw,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fio_json_after_noise() {
        let s = r#"note: both iodepth >= 1 and synchronous I/O engine are selected
{"jobs":[{"read":{"iops":100.5,"bw_bytes":411648},"write":{"iops":0,"bw_bytes":0}}]}"#;
        let r = parse(s).unwrap();
        assert_eq!(r.iops, 100.5);
        assert_eq!(r.bytes_per_s, 411648.0);
    }

    #[test]
    fn empty_result_is_an_error() {
        let s = r#"{"jobs":[{"read":{"iops":0,"bw_bytes":0},"write":{"iops":0,"bw_bytes":0}}]}"#;
        assert!(parse(s).is_err());
    }
}
