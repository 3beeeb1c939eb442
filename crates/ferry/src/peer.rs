//! `ferry peer …`: register the other hosts this host works with.

use clap::Subcommand;
use ferry_api::{PeerInfo, PeerToken};
use serde_json::json;

use crate::client::Client;
use crate::output::{emit, size, table};

#[derive(Subcommand)]
pub enum PeerVerb {
    List,
    /// The peer and a live check (reachable, latency, its pool usage).
    Show {
        name: String,
    },
    /// Register another host: its API URL and its peer token (run
    /// `ferry peer token` on that host). NAME defaults to the host's name.
    Add {
        /// The peer's API URL (named apart from the global `--url`).
        #[arg(value_name = "URL")]
        peer_url: String,
        #[arg(long = "peer-token")]
        peer_token: String,
        #[arg(long)]
        name: Option<String>,
    },
    Remove {
        name: String,
    },
    /// This host's peer token, to give to other hosts' `ferry peer add`.
    Token,
}

fn rows(p: &[PeerInfo]) -> String {
    table(
        &[
            "NAME",
            "URL",
            "HOST",
            "VERSION",
            "NBD",
            "REACHABLE",
            "POOL USED",
        ],
        p.iter()
            .map(|p| {
                vec![
                    p.name.clone(),
                    p.url.clone(),
                    p.host_name.clone(),
                    p.version.clone(),
                    p.nbd.clone().unwrap_or_else(|| "-".into()),
                    match (p.reachable, p.latency_ms) {
                        (Some(true), Some(ms)) => format!("yes ({ms:.1} ms)"),
                        (Some(false), _) => {
                            format!("NO: {}", p.error.as_deref().unwrap_or("unknown error"))
                        }
                        _ => "-".into(),
                    },
                    p.pool
                        .as_ref()
                        .map(|p| format!("{} ({} volumes)", size(p.used_bytes), p.volumes))
                        .unwrap_or_else(|| "-".into()),
                ]
            })
            .collect(),
    )
}

pub async fn run(c: &Client, j: bool, verb: PeerVerb) -> anyhow::Result<()> {
    match verb {
        PeerVerb::List => {
            let p: Vec<PeerInfo> = c.get("/v1/peers").await?;
            emit(j, &p, |p| rows(p));
        }
        PeerVerb::Show { name } => {
            let p: PeerInfo = c.get(&format!("/v1/peers/{name}")).await?;
            emit(j, &p, |p| rows(std::slice::from_ref(p)));
        }
        PeerVerb::Add {
            peer_url,
            peer_token,
            name,
        } => {
            let body = json!({ "name": name, "url": peer_url, "token": peer_token });
            let p: PeerInfo = c.post("/v1/peers", &body).await?;
            emit(j, &p, |p| rows(std::slice::from_ref(p)));
        }
        PeerVerb::Remove { name } => {
            c.delete(&format!("/v1/peers/{name}")).await?;
            emit(j, &json!({ "removed": name }), |_| {
                format!("removed peer {name}\n")
            });
        }
        PeerVerb::Token => {
            let t: PeerToken = c.get("/v1/host/peer-token").await?;
            emit(j, &t, |t| format!("{}\n", t.token));
        }
    }
    Ok(())
}
