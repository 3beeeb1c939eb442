//! The block graph of a running QEMU, per guest disk: the chain of layers
//! from the active one (what the guest writes to) down to the base, and
//! where each layer's data lives (an NBD export or a file).
//!
//! Sources: `query-block` (device → root node), `query-named-block-nodes`
//! (node driver, filename, size) and `x-debug-query-block-graph` (the edges,
//! with their roles `file`/`backing`; present from QEMU 4.0 through 10.x).
//! Filter nodes QEMU inserts during jobs (`mirror_top`, `commit_top`,
//! `copy-on-read`, `throttle`, ...) are walked through, not reported as
//! layers.

use std::collections::HashMap;
use std::path::PathBuf;

use serde_json::{Value, json};

use crate::error::{Error, ErrorKind, Result};
use crate::qmp::QmpClient;
use crate::spec::NbdServer;

/// One node of the block graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockNode {
    /// Node name (auto-generated ones start with `#`).
    pub name: String,
    /// Driver (`qcow2`, `raw`, `nbd`, `file`, `mirror_top`, ...).
    pub driver: String,
    /// QEMU's filename for the node.
    pub filename: String,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Read-only.
    pub read_only: bool,
}

/// Where a layer's data lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockTarget {
    /// An NBD export.
    Nbd {
        /// The server.
        server: NbdServer,
        /// Export name.
        export: String,
    },
    /// A local file or block device.
    File(PathBuf),
    /// Anything else (driver and QEMU's filename).
    Other {
        /// Protocol driver.
        driver: String,
        /// QEMU's filename.
        filename: String,
    },
}

/// One layer of a disk's chain: a format node (or a bare protocol node)
/// and the protocol node holding its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// The format node (`qcow2`, `raw`), or the protocol node itself when
    /// no format node sits on it.
    pub node: BlockNode,
    /// The protocol node at the bottom of `node`'s `file` child.
    pub protocol: BlockNode,
    /// Where the data lives.
    pub target: BlockTarget,
}

/// The chain of one guest disk, active layer first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskChain {
    /// Guest device id (`vda`).
    pub device: String,
    /// The node the device is attached to (may be a job's filter node).
    pub root: String,
    /// Layers, active first, base last. Never empty.
    pub layers: Vec<Layer>,
}

impl DiskChain {
    /// The active layer (receives the guest's writes).
    pub fn top(&self) -> &Layer {
        &self.layers[0]
    }

    /// The base layer (bottom of the chain).
    pub fn base(&self) -> &Layer {
        &self.layers[self.layers.len() - 1]
    }

    /// Node names of the layers, active first.
    pub fn node_names(&self) -> Vec<&str> {
        self.layers.iter().map(|l| l.node.name.as_str()).collect()
    }
}

/// The block graph of a VM.
#[derive(Debug, Clone)]
pub struct BlockGraph {
    /// Every named node.
    pub nodes: HashMap<String, BlockNode>,
    /// Edges (parent node, role, child node) between block nodes.
    pub edges: Vec<(String, String, String)>,
    /// The chain of every guest disk, in `query-block` order.
    pub disks: Vec<DiskChain>,
}

impl BlockGraph {
    /// The chain of the disk with this device id.
    pub fn disk(&self, device: &str) -> Result<&DiskChain> {
        self.disks
            .iter()
            .find(|d| d.device == device)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound(format!("no disk with device id {device}")),
                    "reading the block graph",
                )
            })
    }

    /// A node name starting with `prefix` that no node uses yet (`prefix`,
    /// then `prefix1`, `prefix2`, ...).
    pub fn unused_name(&self, prefix: &str) -> String {
        if !self.nodes.contains_key(prefix) {
            return prefix.to_string();
        }
        (1..)
            .map(|i| format!("{prefix}{i}"))
            .find(|n| !self.nodes.contains_key(n))
            .unwrap_or_default()
    }

    fn child(&self, parent: &str, role: &str) -> Option<&BlockNode> {
        self.edges
            .iter()
            .find(|(p, r, _)| p == parent && r == role)
            .and_then(|(_, _, c)| self.nodes.get(c))
    }

    fn any_child(&self, parent: &str) -> Option<&BlockNode> {
        self.edges
            .iter()
            .find(|(p, _, _)| p == parent)
            .and_then(|(_, _, c)| self.nodes.get(c))
    }
}

const FILTERS: &[&str] = &[
    "mirror_top",
    "commit_top",
    "copy-on-read",
    "throttle",
    "preallocate",
    "compress",
    "copy-before-write",
    "snapshot-access",
    "blkdebug",
    "blkverify",
    "blklogwrites",
];

/// Reads the block graph.
pub async fn block_graph(qmp: &QmpClient) -> Result<BlockGraph> {
    let ctx = format!("reading the block graph over {}", qmp.path().display());
    let named = qmp
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await?;
    let mut nodes = HashMap::new();
    for n in named.as_array().into_iter().flatten() {
        let Some(name) = n["node-name"].as_str() else {
            continue;
        };
        nodes.insert(
            name.to_string(),
            BlockNode {
                name: name.to_string(),
                driver: n["drv"].as_str().unwrap_or("").to_string(),
                filename: n["file"].as_str().unwrap_or("").to_string(),
                virtual_size: n["image"]["virtual-size"].as_u64().unwrap_or(0),
                read_only: n["ro"].as_bool().unwrap_or(false),
            },
        );
    }
    let graph = qmp
        .execute("x-debug-query-block-graph", Value::Null)
        .await?;
    let mut by_id: HashMap<u64, (String, String)> = HashMap::new();
    for n in graph["nodes"].as_array().into_iter().flatten() {
        if let (Some(id), Some(name)) = (n["id"].as_u64(), n["name"].as_str()) {
            by_id.insert(
                id,
                (
                    name.to_string(),
                    n["type"].as_str().unwrap_or("").to_string(),
                ),
            );
        }
    }
    let mut edges = Vec::new();
    for e in graph["edges"].as_array().into_iter().flatten() {
        let (Some(p), Some(c)) = (
            e["parent"].as_u64().and_then(|i| by_id.get(&i)),
            e["child"].as_u64().and_then(|i| by_id.get(&i)),
        ) else {
            continue;
        };
        if p.1 == "block-driver" && c.1 == "block-driver" {
            edges.push((
                p.0.clone(),
                e["name"].as_str().unwrap_or("").to_string(),
                c.0.clone(),
            ));
        }
    }
    let mut graph = BlockGraph {
        nodes,
        edges,
        disks: Vec::new(),
    };
    let blocks = qmp.execute("query-block", Value::Null).await?;
    for b in blocks.as_array().into_iter().flatten() {
        let Some(root) = b["inserted"]["node-name"].as_str() else {
            continue;
        };
        let device = device_id(b);
        let layers = walk(&graph, root).map_err(|what| {
            Error::new(ErrorKind::Protocol(format!("disk {device}: {what}")), &ctx)
        })?;
        graph.disks.push(DiskChain {
            device,
            root: root.to_string(),
            layers,
        });
    }
    Ok(graph)
}

/// The guest device id of a `query-block` entry: the `device` name of a
/// `-drive`, else the id inside the qdev path
/// (`/machine/peripheral/vda/virtio-backend` → `vda`), else `qdev` itself.
fn device_id(b: &Value) -> String {
    if let Some(d) = b["device"].as_str().filter(|d| !d.is_empty()) {
        return d.to_string();
    }
    let qdev = b["qdev"].as_str().unwrap_or("");
    if let Some(rest) = qdev.strip_prefix("/machine/peripheral/") {
        return rest.split('/').next().unwrap_or(rest).to_string();
    }
    qdev.to_string()
}

fn walk(graph: &BlockGraph, root: &str) -> std::result::Result<Vec<Layer>, String> {
    let mut layers = Vec::new();
    let mut cur = graph
        .nodes
        .get(root)
        .ok_or_else(|| format!("root node {root} not in the node list"))?;
    for _ in 0..256 {
        if FILTERS.contains(&cur.driver.as_str()) {
            cur = graph
                .child(&cur.name, "backing")
                .or_else(|| graph.child(&cur.name, "file"))
                .or_else(|| graph.any_child(&cur.name))
                .ok_or_else(|| format!("filter node {} has no child", cur.name))?;
            continue;
        }
        // The protocol node under this layer: follow `file` down to a leaf.
        let mut proto = cur;
        while let Some(c) = graph.child(&proto.name, "file") {
            proto = c;
        }
        layers.push(Layer {
            node: cur.clone(),
            protocol: proto.clone(),
            target: target_of(proto),
        });
        match graph.child(&cur.name, "backing") {
            Some(b) => cur = b,
            None => return Ok(layers),
        }
    }
    Err("chain deeper than 256 layers".into())
}

/// Where a protocol node's data lives.
pub fn target_of(proto: &BlockNode) -> BlockTarget {
    match proto.driver.as_str() {
        "nbd" => parse_nbd_filename(&proto.filename).unwrap_or_else(|| BlockTarget::Other {
            driver: proto.driver.clone(),
            filename: proto.filename.clone(),
        }),
        "file" | "host_device" => BlockTarget::File(PathBuf::from(&proto.filename)),
        _ => BlockTarget::Other {
            driver: proto.driver.clone(),
            filename: proto.filename.clone(),
        },
    }
}

/// Parses QEMU's filename of an `nbd` node: `nbd+unix:///EXPORT?socket=PATH`,
/// `nbd://HOST:PORT/EXPORT` or `json:{...}`.
pub fn parse_nbd_filename(f: &str) -> Option<BlockTarget> {
    if let Some(j) = f.strip_prefix("json:") {
        let v: Value = serde_json::from_str(j).ok()?;
        let v = if v["driver"] == "nbd" {
            v
        } else {
            v["file"].clone()
        };
        let s = &v["server"];
        let server = match s["type"].as_str()? {
            "unix" => NbdServer::Unix(PathBuf::from(s["path"].as_str()?)),
            "inet" => NbdServer::Tcp {
                host: s["host"].as_str()?.to_string(),
                port: s["port"].as_str()?.parse().ok()?,
            },
            _ => return None,
        };
        return Some(BlockTarget::Nbd {
            server,
            export: v["export"].as_str().unwrap_or("").to_string(),
        });
    }
    if let Some(rest) = f.strip_prefix("nbd+unix://") {
        let (path_part, query) = rest.split_once('?')?;
        let export = path_part.trim_start_matches('/').to_string();
        let socket = query.split('&').find_map(|kv| kv.strip_prefix("socket="))?;
        return Some(BlockTarget::Nbd {
            server: NbdServer::Unix(PathBuf::from(socket)),
            export,
        });
    }
    if let Some(rest) = f
        .strip_prefix("nbd://")
        .or_else(|| f.strip_prefix("nbd+tcp://"))
    {
        let (hostport, export) = match rest.split_once('/') {
            Some((h, e)) => (h, e.to_string()),
            None => (rest, String::new()),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().ok()?),
            None => (hostport, 10809),
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        return Some(BlockTarget::Nbd {
            server: NbdServer::Tcp { host, port },
            export,
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_filenames_parse() {
        assert_eq!(
            parse_nbd_filename("nbd+unix:///vol-1?socket=/run/n.sock"),
            Some(BlockTarget::Nbd {
                server: NbdServer::Unix("/run/n.sock".into()),
                export: "vol-1".into()
            })
        );
        assert_eq!(
            parse_nbd_filename("nbd+unix:///?socket=/tmp/x.sock"),
            Some(BlockTarget::Nbd {
                server: NbdServer::Unix("/tmp/x.sock".into()),
                export: "".into()
            })
        );
        assert_eq!(
            parse_nbd_filename("nbd://10.0.0.1:10810/e"),
            Some(BlockTarget::Nbd {
                server: NbdServer::Tcp {
                    host: "10.0.0.1".into(),
                    port: 10810
                },
                export: "e".into()
            })
        );
        let j =
            r#"json:{"driver":"nbd","server":{"type":"inet","host":"h","port":"99"},"export":"x"}"#;
        assert_eq!(
            parse_nbd_filename(j),
            Some(BlockTarget::Nbd {
                server: NbdServer::Tcp {
                    host: "h".into(),
                    port: 99
                },
                export: "x".into()
            })
        );
        assert_eq!(parse_nbd_filename("/a/file"), None);
    }

    #[test]
    fn device_ids_from_query_block() {
        assert_eq!(
            device_id(&json!({"device": "", "qdev": "/machine/peripheral/vda/virtio-backend"})),
            "vda"
        );
        assert_eq!(
            device_id(&json!({"device": "drive0", "qdev": "x"})),
            "drive0"
        );
        assert_eq!(device_id(&json!({"device": "", "qdev": "vdb"})), "vdb");
    }
}
