//! Disks in the pools of other hosts. A disk `{"host": P, "volume": V}`
//! is volume `V` of peer `P`'s pool: at `start`, this host asks `P` for an
//! export of `V` named `remote-vm.<uuid>.<disk id>` (made once, found again
//! afterwards) and QEMU reaches it over NBD/TCP with the export's secret;
//! `delete` removes that export. The peer keeps the export across its own
//! restarts, so QEMU's NBD reconnect finds it again.

use std::collections::HashMap;

use ferry_api::{CreateExport, ExportInfo, VmDefinition, VolumeInfo};
use ferry_qemu::NbdServer;
use uuid::Uuid;

use super::{VmError, disk_id};
use crate::peers::{PeerError, Peers};

/// The name of the export of disk `id` of VM `uuid` on the peer.
pub fn remote_export_name(uuid: &Uuid, id: &str) -> String {
    format!("remote-vm.{uuid}.{id}")
}

/// Where QEMU finds one remote disk.
#[derive(Debug, Clone)]
pub struct RemoteDisk {
    pub server: NbdServer,
    /// `<export name>/<secret>`.
    pub export: String,
}

fn other(def: &VmDefinition, msg: String) -> VmError {
    VmError::Other {
        vm: def.name.clone(),
        msg,
    }
}

/// Checks every remote disk of `def`: its peer is registered and holds the
/// volume. Nothing is changed on the peers.
pub async fn check(peers: &Peers, def: &VmDefinition) -> Result<(), VmError> {
    for (i, d) in def.disks.iter().enumerate() {
        let Some((host, volume)) = d.remote() else {
            continue;
        };
        let field = format!("disks[{i}].host");
        let client = peers
            .client(host)
            .map_err(|e| super::invalid(field.clone(), e.to_string()))?;
        match client
            .get::<VolumeInfo>(&format!("/v1/volumes/{volume}"))
            .await
        {
            Ok(_) => {}
            Err(PeerError::Failed { status: 404, .. }) => {
                return Err(VmError::VolumeNotFound(format!("{volume} (on {host})")));
            }
            Err(e) => return Err(other(def, format!("disk {}: {e}", disk_id(i)))),
        }
    }
    Ok(())
}

/// Makes sure every remote disk of `def` has its export on its peer;
/// returns, per disk id, where QEMU reaches it.
pub async fn ensure(
    peers: &Peers,
    def: &VmDefinition,
    uuid: &Uuid,
) -> Result<HashMap<String, RemoteDisk>, VmError> {
    let mut out = HashMap::new();
    for (i, d) in def.disks.iter().enumerate() {
        let Some((host, volume)) = d.remote() else {
            continue;
        };
        let id = disk_id(i);
        let name = remote_export_name(uuid, &id);
        let fail = |e: PeerError| other(def, format!("disk {id} (volume {volume} on {host}): {e}"));
        let client = peers.client(host).map_err(fail)?;
        let e = match client
            .get::<ExportInfo>(&format!("/v1/exports/{name}"))
            .await
        {
            Ok(e) => e,
            Err(PeerError::Failed { status: 404, .. }) => {
                let req = CreateExport {
                    name: Some(name.clone()),
                    volume: Some(volume.to_string()),
                    snapshot: None,
                    direct: false,
                    write_out: false,
                };
                client
                    .post::<_, ExportInfo>("/v1/exports", &req)
                    .await
                    .map_err(fail)?
            }
            Err(e) => return Err(fail(e)),
        };
        if e.volume.as_deref() != Some(volume) {
            return Err(VmError::Conflict(format!(
                "export {name} on {host} serves {:?}, not volume {volume}; remove it there first",
                e.volume
            )));
        }
        let uri = e.tcp_uri.ok_or_else(|| {
            other(
                def,
                format!("disk {id}: {host} has no TCP NBD listener (ferryd --nbd-listen there)"),
            )
        })?;
        let disk = parse_tcp_uri(&uri).ok_or_else(|| {
            other(
                def,
                format!("disk {id}: {host} gave an unusable export URI"),
            )
        })?;
        out.insert(id, disk);
    }
    Ok(out)
}

/// Removes the exports of `def`'s remote disks on their peers. A peer that
/// cannot be reached keeps its export (it serves no one once the VM is
/// gone); the returned lines say which.
pub async fn remove(peers: &Peers, def: &VmDefinition, uuid: &Uuid) -> Vec<String> {
    let mut left = Vec::new();
    for (i, d) in def.disks.iter().enumerate() {
        let Some((host, _)) = d.remote() else {
            continue;
        };
        let name = remote_export_name(uuid, &disk_id(i));
        let r = match peers.client(host) {
            Ok(c) => c.delete(&format!("/v1/exports/{name}")).await,
            Err(e) => Err(e),
        };
        match r {
            Ok(()) | Err(PeerError::Failed { status: 404, .. }) => {}
            Err(e) => left.push(format!("export {name} on {host} was left: {e}")),
        }
    }
    left
}

/// `nbd://<host>:<port>/<name>/<secret>` → server and `<name>/<secret>`.
fn parse_tcp_uri(uri: &str) -> Option<RemoteDisk> {
    let rest = uri.strip_prefix("nbd://")?;
    let (addr, export) = rest.split_once('/')?;
    let (host, port) = addr.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || export.is_empty() {
        return None;
    }
    Some(RemoteDisk {
        server: NbdServer::Tcp {
            host: host.to_string(),
            port: port.parse().ok()?,
        },
        export: export.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_uris() {
        let d = parse_tcp_uri("nbd://127.0.0.1:10809/remote-vm.x.vda/s3cr3t").unwrap();
        assert_eq!(d.export, "remote-vm.x.vda/s3cr3t");
        assert!(
            matches!(d.server, NbdServer::Tcp { ref host, port: 10809 } if host == "127.0.0.1")
        );
        let d = parse_tcp_uri("nbd://[::1]:7/e/s").unwrap();
        assert!(matches!(d.server, NbdServer::Tcp { ref host, port: 7 } if host == "::1"));
        for bad in [
            "nbd+unix:///x",
            "nbd://host/e",
            "nbd://h:x/e/s",
            "nbd://:1/e",
        ] {
            assert!(parse_tcp_uri(bad).is_none(), "{bad}");
        }
    }
}
