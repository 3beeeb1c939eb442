//! Following an operation: a progress bar with ETA and the current step
//! (from the server-sent event stream), or JSON lines with `--json`.

use std::time::Duration;

use anyhow::Context;
use ferry_api::{OpState, Operation};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::Method;

use crate::client::Client;

/// Follows operation `id` until it ends; returns its final state.
pub async fn watch(c: &Client, id: &str, json: bool) -> anyhow::Result<Operation> {
    let bar = (!json).then(|| {
        let b = ProgressBar::new(1000);
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] [{wide_bar}] {percent:>3}% ETA {eta} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        b.enable_steady_tick(Duration::from_millis(200));
        b
    });
    let resp = c
        .request(Method::GET, &format!("/v1/operations/{id}/events"))
        .send()
        .await
        .with_context(|| format!("cannot reach ferryd at {}", c.url))?;
    if !resp.status().is_success() {
        // Let the ordinary path produce the API's error message.
        c.get::<Operation>(&format!("/v1/operations/{id}")).await?;
    }
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    let mut last: Option<Operation> = None;
    while let Some(chunk) = stream.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let data: String = event
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(str::trim_start)
                .collect();
            if data.is_empty() {
                continue;
            }
            let op: Operation = serde_json::from_str(&data)
                .with_context(|| format!("unexpected event from ferryd: {data}"))?;
            if json {
                println!("{}", serde_json::to_string(&op)?);
            } else if let (Some(b), Some(p)) = (&bar, &op.progress) {
                b.set_position((p.overall * 1000.0) as u64);
                b.set_message(p.current().unwrap_or_default().to_string());
            }
            last = Some(op);
        }
    }
    let op = match last {
        Some(op) if op.state.is_finished() => op,
        _ => c.get(&format!("/v1/operations/{id}")).await?,
    };
    if let Some(b) = bar {
        match op.state {
            OpState::Succeeded => {
                b.set_position(1000);
                b.finish_with_message("done");
            }
            s => b.abandon_with_message(s.to_string()),
        }
    }
    Ok(op)
}
