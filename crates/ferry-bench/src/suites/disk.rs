//! `disk`: fio on a plain file of the project's disk, direct I/O. The
//! physical limit every other figure is compared to.

use crate::fio::{self, FioJob};
use crate::report::{Measurement, Report, scratch_dir};
use crate::suites::Options;

pub fn run(opts: &Options) -> anyhow::Result<Report> {
    let dir = scratch_dir("disk")?;
    let file = dir.path().join("disk.img");
    let mut report = Report::new("disk");
    let jobs = [
        ("seq-read-1M", "read", "1M", "MB/s"),
        ("seq-write-1M", "write", "1M", "MB/s"),
        ("rand-read-4k", "randread", "4k", "IOPS"),
        ("rand-write-4k", "randwrite", "4k", "IOPS"),
    ];
    for (metric, rw, bs, unit) in jobs {
        let job = FioJob {
            runtime_s: opts.runtime_s,
            size: opts.size.clone(),
            ..FioJob::new(metric, rw, bs)
        }
        .arg(format!("--filename={}", file.display()));
        eprintln!("disk: {metric} ({}s)", job.runtime_s);
        let r = fio::run(&job)?;
        let value = if unit == "IOPS" { r.iops } else { r.mb_per_s() };
        report.push(Measurement::new(metric, unit, value));
    }
    Ok(report)
}
