//! `cargo run --release -p ferry-bench -- <suite> [--runtime S] [--size 1G] [--trials N]`

use anyhow::{Context, bail};
use ferry_bench::suites::{Options, SUITES};

fn usage() -> String {
    let mut s = String::from(
        "usage: ferry-bench <suite> [--runtime SECONDS] [--size SIZE] [--trials N]\nsuites:\n",
    );
    for (name, what, _) in SUITES {
        s.push_str(&format!("  {name:<10} {what}\n"));
    }
    s
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let Some(suite) = args.next() else {
        eprint!("{}", usage());
        std::process::exit(2);
    };
    if suite == "--help" || suite == "-h" {
        print!("{}", usage());
        return Ok(());
    }
    let mut opts = Options {
        runtime_s: 10,
        size: "1G".into(),
        trials: 1000,
        rest: Vec::new(),
    };
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--runtime" => opts.runtime_s = value("--runtime")?.parse()?,
            "--size" => opts.size = value("--size")?,
            "--trials" => opts.trials = value("--trials")?.parse()?,
            // `<suite> --help` prints the usage rather than running the suite.
            "--help" | "-h" => {
                print!("{}", usage());
                return Ok(());
            }
            _ => opts.rest.push(a),
        }
    }
    // The backup suite's default disk is the 4 GiB.
    if suite == "backup" && !std::env::args().any(|a| a == "--size") {
        opts.size = "4G".into();
    }
    let Some((_, _, run)) = SUITES.iter().find(|(n, _, _)| *n == suite) else {
        eprint!("unknown suite {suite}\n{}", usage());
        std::process::exit(2);
    };
    let report = run(&opts)?;
    if report.results.is_empty() {
        bail!("suite {suite} measured nothing");
    }
    print!("{}", report.table());
    let path = report.write()?;
    println!("wrote {}", path.display());
    Ok(())
}
