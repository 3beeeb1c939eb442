//! `ferry-guest`: the workload tool of Ferry's test guest (also runs on the
//! host). See the library documentation for the record format.
//!
//! ```text
//! ferry-guest write --file PATH [--rate PER_SEC] [--count N] [--size BYTES]
//! ferry-guest verify (--file PATH | --image DISK.raw [--path /records])
//!                    [--expect-min-records N] [--event]
//! ferry-guest ready
//! ferry-guest event NAME [KEY=VALUE ...]
//! ```
//! Exit codes: 0 success, 1 corruption found, 2 usage or I/O error.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ferry_guest::{event, image, record, verify, writer::Writer};
use serde_json::{Map, Value, json};

const USAGE: &str = "usage:
  ferry-guest write --file PATH [--rate PER_SEC] [--count N] [--size BYTES]
  ferry-guest verify (--file PATH | --image DISK.raw [--path /records]) [--expect-min-records N] [--event]
  ferry-guest ready
  ferry-guest event NAME [KEY=VALUE ...]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("write") => write(&args[1..]),
        Some("verify") => verify_cmd(&args[1..]),
        Some("ready") => ready(),
        Some("event") => event_cmd(&args[1..]),
        Some("-h" | "--help") => {
            println!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        _ => Err(format!("unknown or missing command\n{USAGE}")),
    };
    match result {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("ferry-guest: {msg}");
            ExitCode::from(2)
        }
    }
}

/// `--name value` options, in any order.
struct Opts(Vec<(String, Option<String>)>);

impl Opts {
    fn parse(args: &[String], flags: &[&str], valued: &[&str]) -> Result<Opts, String> {
        let mut out = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let name = a
                .strip_prefix("--")
                .ok_or_else(|| format!("unexpected argument {a:?}\n{USAGE}"))?;
            if flags.contains(&name) {
                out.push((name.to_owned(), None));
            } else if valued.contains(&name) {
                let v = it.next().ok_or_else(|| format!("--{name} needs a value"))?;
                out.push((name.to_owned(), Some(v.clone())));
            } else {
                return Err(format!("unknown option --{name}\n{USAGE}"));
            }
        }
        Ok(Opts(out))
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
    }

    fn has(&self, name: &str) -> bool {
        self.0.iter().any(|(n, _)| n == name)
    }

    fn num<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>, String> {
        self.get(name)
            .map(|v| {
                v.parse()
                    .map_err(|_| format!("--{name}: not a number: {v:?}"))
            })
            .transpose()
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

fn write(args: &[String]) -> Result<ExitCode, String> {
    let o = Opts::parse(args, &[], &["file", "rate", "count", "size"])?;
    let path = PathBuf::from(o.get("file").ok_or("write: --file is required")?);
    let rate: f64 = o.num("rate")?.unwrap_or(10.0);
    if !rate.is_finite() || rate < 0.0 {
        return Err(format!("--rate must be a non-negative number, not {rate}"));
    }
    let count: Option<u64> = o.num("count")?;
    let size: usize = o.num("size")?.unwrap_or(record::DEFAULT_RECORD_LEN);
    let mut w = Writer::open(&path, size).map_err(|e| error_chain(&e))?;
    event::emit(
        "writer",
        json!({
            "file": path.display().to_string(),
            "next_seq": w.next_seq(),
            "torn_tail_bytes": w.resumed().torn_tail_bytes,
            "size": size,
            "rate": rate,
        }),
    );
    let interval = (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate));
    let start = Instant::now();
    let mut written = 0u64;
    while count.is_none_or(|c| written < c) {
        if let Some(iv) = interval {
            let due = start + iv.mul_f64(written as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        let seq = w.append().map_err(|e| error_chain(&e))?;
        event::emit("record", json!({ "seq": seq }));
        written += 1;
    }
    event::emit(
        "write-done",
        json!({ "written": written, "next_seq": w.next_seq() }),
    );
    Ok(ExitCode::SUCCESS)
}

fn verify_cmd(args: &[String]) -> Result<ExitCode, String> {
    let o = Opts::parse(
        args,
        &["event"],
        &["file", "image", "path", "expect-min-records"],
    )?;
    let mut report = match (o.get("file"), o.get("image")) {
        (Some(f), None) => verify::verify_file(f.as_ref()),
        (None, Some(img)) => image::verify_image(img.as_ref(), o.get("path").unwrap_or("/records")),
        _ => {
            return Err(format!(
                "verify: give exactly one of --file or --image\n{USAGE}"
            ));
        }
    }
    .map_err(|e| error_chain(&e))?;
    if let Some(n) = o.num("expect-min-records")? {
        report.expect_min_records(n);
    }
    let value = serde_json::to_value(&report).map_err(|e| e.to_string())?;
    if o.has("event") {
        event::emit("verify", value);
    } else {
        println!("{value}");
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn ready() -> Result<ExitCode, String> {
    let uptime =
        std::fs::read_to_string("/proc/uptime").map_err(|e| format!("/proc/uptime: {e}"))?;
    let secs: f64 = uptime
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("/proc/uptime: unexpected content {uptime:?}"))?;
    event::emit("ready", json!({ "uptime_ms": (secs * 1000.0) as u64 }));
    Ok(ExitCode::SUCCESS)
}

fn event_cmd(args: &[String]) -> Result<ExitCode, String> {
    let (name, rest) = args.split_first().ok_or("event: NAME is required")?;
    let mut fields = Map::new();
    for kv in rest {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("event: expected KEY=VALUE, got {kv:?}"))?;
        let value = if let Ok(n) = v.parse::<i64>() {
            json!(n)
        } else if let Ok(b) = v.parse::<bool>() {
            json!(b)
        } else {
            json!(v)
        };
        fields.insert(k.to_owned(), value);
    }
    event::emit(name, Value::Object(fields));
    Ok(ExitCode::SUCCESS)
}
