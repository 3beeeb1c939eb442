//! The OpenAPI 3.1 document of the HTTP API, built from the API types
//! themselves (their JSON Schemas come from `schemars`), so a type change
//! changes the document. `ferryd openapi` prints it; the repository keeps a
//! copy in `docs/openapi.json`, and `tests/openapi.rs` checks that copy is
//! current and that it lists exactly the routes the running router serves.

use ferry_api::*;
use schemars::generate::{SchemaGenerator, SchemaSettings};
use schemars::{JsonSchema, Schema};
use serde_json::{Map, Value, json};

/// One documented call.
struct Op {
    method: &'static str,
    path: &'static str,
    summary: &'static str,
    tag: &'static str,
    request: Option<Schema>,
    /// Success status and body (None: no body, or a non-JSON body).
    ok: (u16, Option<Schema>),
    /// Error statuses this call answers besides 401.
    errors: &'static [u16],
    /// Which token opens it.
    auth: Auth,
    /// For non-JSON success bodies.
    content_type: Option<&'static str>,
    /// Optional integer query parameters: (name, description).
    query: &'static [(&'static str, &'static str)],
}

#[derive(Clone, Copy, PartialEq)]
enum Auth {
    None,
    Admin,
    AdminOrPeer,
}

struct Doc {
    g: SchemaGenerator,
    ops: Vec<Op>,
}

impl Doc {
    fn schema<T: JsonSchema>(&mut self) -> Option<Schema> {
        Some(self.g.subschema_for::<T>())
    }

    #[allow(clippy::too_many_arguments)]
    fn op(
        &mut self,
        method: &'static str,
        path: &'static str,
        tag: &'static str,
        summary: &'static str,
        request: Option<Schema>,
        ok: (u16, Option<Schema>),
        errors: &'static [u16],
    ) {
        let auth = if path == "/v1/health" {
            Auth::None
        } else if path.starts_with(crate::auth::PEER_PREFIX) {
            Auth::AdminOrPeer
        } else {
            Auth::Admin
        };
        self.ops.push(Op {
            method,
            path,
            summary,
            tag,
            request,
            ok,
            errors,
            auth,
            content_type: None,
            query: &[],
        });
    }
}

/// Every (method, path) the document lists, for tests.
pub fn operations() -> Vec<(String, String)> {
    build()
        .ops
        .iter()
        .map(|o| (o.method.to_uppercase(), o.path.to_string()))
        .collect()
}

fn build() -> Doc {
    let mut d = Doc {
        g: SchemaGenerator::new(
            SchemaSettings::draft2020_12()
                .with(|s| s.definitions_path = "/components/schemas".into()),
        ),
        ops: Vec::new(),
    };
    const NF: &[u16] = &[404];
    const BAD_NF_CONFLICT: &[u16] = &[400, 404, 409];
    const NF_CONFLICT: &[u16] = &[404, 409];
    let started = d.schema::<Started>();

    d.op(
        "get",
        "/v1/health",
        "host",
        "Liveness probe; answers `ok` without a token.",
        None,
        (200, None),
        &[],
    );
    d.ops.last_mut().expect("just pushed").content_type = Some("text/plain");
    let s = d.schema::<HostInfo>();
    d.op(
        "get",
        "/v1/host",
        "host",
        "Name, version, listeners, accelerator, uptime.",
        None,
        (200, s),
        &[],
    );
    let s = d.schema::<PeerToken>();
    d.op(
        "get",
        "/v1/host/peer-token",
        "peers",
        "This host's peer token, to give to other hosts.",
        None,
        (200, s),
        &[],
    );
    let s = d.schema::<PoolInfo>();
    d.op(
        "get",
        "/v1/pool",
        "pool",
        "Chunk size, space used, counts.",
        None,
        (200, s),
        &[],
    );
    d.op(
        "get",
        "/metrics",
        "host",
        "Prometheus text format: I/O, operations, pool.",
        None,
        (200, None),
        &[],
    );
    d.ops.last_mut().expect("just pushed").content_type = Some("text/plain; version=0.0.4");

    let s = d.schema::<Vec<VolumeInfo>>();
    d.op(
        "get",
        "/v1/volumes",
        "volumes",
        "List volumes.",
        None,
        (200, s),
        &[],
    );
    let (r, s) = (d.schema::<CreateVolume>(), d.schema::<VolumeInfo>());
    d.op(
        "post",
        "/v1/volumes",
        "volumes",
        "Create a thin volume.",
        r,
        (201, s),
        &[400, 409, 507],
    );
    let s = d.schema::<VolumeInfo>();
    d.op(
        "get",
        "/v1/volumes/{name}",
        "volumes",
        "Show a volume.",
        None,
        (200, s),
        NF,
    );
    d.op(
        "delete",
        "/v1/volumes/{name}",
        "volumes",
        "Delete a volume (refused while exported, used by a VM, or needed by a clone).",
        None,
        (204, None),
        NF_CONFLICT,
    );
    let (r, s) = (d.schema::<GrowVolume>(), d.schema::<VolumeInfo>());
    d.op(
        "post",
        "/v1/volumes/{name}/grow",
        "volumes",
        "Grow a volume.",
        r,
        (200, s),
        BAD_NF_CONFLICT,
    );
    let r = d.schema::<crate::api::ImportRequest>();
    d.op(
        "post",
        "/v1/volumes/{name}/import",
        "volumes",
        "Import a disk image (raw, qcow2, …; detected) into a new volume (an operation).",
        r,
        (202, started.clone()),
        &[400, 409],
    );
    let r = d.schema::<crate::api::ExportRequest>();
    d.op("post", "/v1/volumes/{name}/export", "volumes", "Export a volume to a qcow2 or raw file, consistently through a temporary snapshot (an operation).", r, (202, started.clone()), &[400, 404, 409]);
    let (r, s) = (
        d.schema::<ferry_api::RevertVolume>(),
        d.schema::<ferry_api::RevertedVolume>(),
    );
    d.op(
        "post",
        "/v1/volumes/{name}/revert",
        "volumes",
        "Make a volume's content its snapshot's again (only ranges written since are copied back); refused while a VM of this host using it runs.",
        r,
        (200, s),
        &[400, 404, 409],
    );

    let s = d.schema::<Vec<SnapshotInfo>>();
    d.op(
        "get",
        "/v1/snapshots",
        "snapshots",
        "List snapshots.",
        None,
        (200, s),
        &[],
    );
    let (r, s) = (
        d.schema::<CreateSnapshot>(),
        d.schema::<Vec<SnapshotInfo>>(),
    );
    d.op(
        "post",
        "/v1/snapshots",
        "snapshots",
        "Snapshot one volume, or several at one atomic point (a group).",
        r,
        (201, s),
        BAD_NF_CONFLICT,
    );
    d.op(
        "delete",
        "/v1/snapshots/{name}",
        "snapshots",
        "Delete a snapshot (refused while exported or cloned).",
        None,
        (204, None),
        NF_CONFLICT,
    );
    let (r, s) = (d.schema::<CreateClone>(), d.schema::<VolumeInfo>());
    d.op(
        "post",
        "/v1/clones",
        "snapshots",
        "A writable volume sharing a snapshot's chunks.",
        r,
        (201, s),
        BAD_NF_CONFLICT,
    );

    let s = d.schema::<Vec<ExportInfo>>();
    d.op(
        "get",
        "/v1/exports",
        "exports",
        "List NBD exports.",
        None,
        (200, s),
        &[],
    );
    let (r, s) = (d.schema::<CreateExport>(), d.schema::<ExportInfo>());
    d.op(
        "post",
        "/v1/exports",
        "exports",
        "Export a volume (read-write) or a snapshot (read-only) over NBD.",
        r,
        (201, s),
        BAD_NF_CONFLICT,
    );
    let s = d.schema::<ExportInfo>();
    d.op(
        "get",
        "/v1/exports/{name}",
        "exports",
        "Show an export, with its TCP URI (which holds its secret).",
        None,
        (200, s),
        NF,
    );
    d.op(
        "delete",
        "/v1/exports/{name}",
        "exports",
        "Remove an export.",
        None,
        (204, None),
        NF,
    );

    let s = d.schema::<Vec<Operation>>();
    d.op(
        "get",
        "/v1/operations",
        "operations",
        "List operations.",
        None,
        (200, s),
        &[],
    );
    let s = d.schema::<Operation>();
    d.op(
        "get",
        "/v1/operations/{id}",
        "operations",
        "An operation with its steps, log and progress tree.",
        None,
        (200, s),
        &[400, 404],
    );
    d.ops.last_mut().expect("just pushed").query = &[(
        "wait_s",
        "Seconds to wait for the operation to finish before answering (0..=300, default 0).",
    )];
    d.op(
        "get",
        "/v1/operations/{id}/events",
        "operations",
        "Server-sent events: the operation as it changes, until it ends.",
        None,
        (200, None),
        NF,
    );
    d.ops.last_mut().expect("just pushed").content_type = Some("text/event-stream");
    d.op(
        "post",
        "/v1/operations/{id}/cancel",
        "operations",
        "Cancel an operation; it compensates what it did.",
        None,
        (202, None),
        NF_CONFLICT,
    );

    let s = d.schema::<Vec<VmInfo>>();
    d.op(
        "get",
        "/v1/vms",
        "vms",
        "List VMs with their state.",
        None,
        (200, s),
        &[],
    );
    let (r, s) = (d.schema::<VmDefinition>(), d.schema::<VmInfo>());
    d.op(
        "post",
        "/v1/vms",
        "vms",
        "Define a VM whose disks are pool volumes (or files).",
        r,
        (201, s),
        BAD_NF_CONFLICT,
    );
    let s = d.schema::<VmInfo>();
    d.op(
        "get",
        "/v1/vms/{id}",
        "vms",
        "A VM (by name or UUID): definition, state, pid, QMP status.",
        None,
        (200, s.clone()),
        NF,
    );
    d.op(
        "delete",
        "/v1/vms/{id}",
        "vms",
        "Delete a stopped VM's definition (never its volumes).",
        None,
        (204, None),
        NF_CONFLICT,
    );
    d.op(
        "post",
        "/v1/vms/{id}/start",
        "vms",
        "Start a VM.",
        None,
        (200, s.clone()),
        &[400, 404, 409],
    );
    let st = d.schema::<VmStopped>();
    d.op(
        "post",
        "/v1/vms/{id}/stop",
        "vms",
        "Graceful stop (guest agent, then ACPI), killed after timeout_s.",
        None,
        (200, st),
        &[400, 404, 409],
    );
    d.ops.last_mut().expect("just pushed").query = &[(
        "timeout_s",
        "Seconds the graceful shutdown has before QEMU is killed (1..=3600, default 60).",
    )];
    d.op(
        "post",
        "/v1/vms/{id}/pause",
        "vms",
        "Pause a running VM.",
        None,
        (200, s.clone()),
        NF_CONFLICT,
    );
    d.op(
        "post",
        "/v1/vms/{id}/resume",
        "vms",
        "Resume a paused VM.",
        None,
        (200, s.clone()),
        NF_CONFLICT,
    );
    d.op(
        "post",
        "/v1/vms/{id}/kill",
        "vms",
        "Kill a VM's QEMU at once.",
        None,
        (200, s),
        NF_CONFLICT,
    );
    let r = d.schema::<ferry_api::MigrateVm>();
    d.op(
        "post",
        "/v1/vms/{id}/migrate",
        "vms",
        "Live-migrate a running VM to a peer (a vm.migrate operation): on demand (default), the VM runs there at switchover and its disks hydrate in the background; precopy, the disks are mirrored there first.",
        r,
        (202, started.clone()),
        &[400, 404, 409],
    );
    let r = d.schema::<ferry_api::RelocateVm>();
    d.op(
        "post",
        "/v1/vms/{id}/relocate",
        "vms",
        "Relocate disks of a running VM to new volumes of this host's pool with no downtime (a vm.relocate operation: mirror, pivot); a disk may be a peer's volume. Idempotent by request key.",
        r,
        (202, started.clone()),
        BAD_NF_CONFLICT,
    );
    let r = d.schema::<ferry_api::VmCopyRequest>();
    d.op(
        "post",
        "/v1/vms/{id}/copy",
        "vms",
        "Copy a VM to a peer host (an operation): from an application-consistent snapshot if it runs; partition-weighted progress; verified.",
        r,
        (202, started.clone()),
        BAD_NF_CONFLICT,
    );
    let (r, s) = (
        d.schema::<ferry_api::HashRanges>(),
        d.schema::<ferry_api::RangeHashes>(),
    );
    d.op(
        "post",
        "/v1/peer/copy/hash",
        "peers",
        "BLAKE3 of ranges of a volume of this host (the verify of a VM copy to it).",
        r,
        (200, s),
        &[400, 404],
    );

    let s = d.schema::<Vec<VmSnapshotGroup>>();
    d.op(
        "get",
        "/v1/vm-snapshots",
        "vm-snapshots",
        "List snapshot groups of VMs.",
        None,
        (200, s),
        &[],
    );
    let r = d.schema::<CreateVmSnapshot>();
    d.op(
        "post",
        "/v1/vm-snapshots",
        "vm-snapshots",
        "Targeted, application-consistent snapshot of a group of VMs (an operation).",
        r,
        (202, started.clone()),
        BAD_NF_CONFLICT,
    );
    let s = d.schema::<VmSnapshotGroup>();
    d.op(
        "get",
        "/v1/vm-snapshots/{name}",
        "vm-snapshots",
        "A snapshot group: per VM and disk, the volume snapshot and its consistency.",
        None,
        (200, s),
        NF,
    );
    d.op(
        "delete",
        "/v1/vm-snapshots/{name}",
        "vm-snapshots",
        "Delete a snapshot group and its volume snapshots.",
        None,
        (204, None),
        NF_CONFLICT,
    );
    let (r, s) = (
        d.schema::<RevertVmSnapshot>(),
        d.schema::<Vec<RevertedVm>>(),
    );
    d.op(
        "post",
        "/v1/vm-snapshots/{name}/revert",
        "vm-snapshots",
        "Revert stopped VMs to the snapshot group.",
        r,
        (200, s),
        BAD_NF_CONFLICT,
    );
    let (r, s) = (d.schema::<CloneVmSnapshot>(), d.schema::<VmInfo>());
    d.op(
        "post",
        "/v1/vm-snapshots/{name}/clone",
        "vm-snapshots",
        "Define a new VM from one VM of the group, on clones of its disks.",
        r,
        (201, s),
        BAD_NF_CONFLICT,
    );

    backups(&mut d, &started);
    batches(&mut d);

    let s = d.schema::<Vec<PeerInfo>>();
    d.op(
        "get",
        "/v1/peers",
        "peers",
        "List registered peers.",
        None,
        (200, s),
        &[],
    );
    let (r, s) = (d.schema::<AddPeer>(), d.schema::<PeerInfo>());
    d.op(
        "post",
        "/v1/peers",
        "peers",
        "Register another host by URL and its peer token (checked live).",
        r,
        (201, s),
        &[400, 409, 502],
    );
    let s = d.schema::<PeerInfo>();
    d.op(
        "get",
        "/v1/peers/{name}",
        "peers",
        "A peer with a live check (reachable, latency).",
        None,
        (200, s),
        NF,
    );
    d.op(
        "delete",
        "/v1/peers/{name}",
        "peers",
        "Forget a peer.",
        None,
        (204, None),
        NF,
    );
    let s = d.schema::<PeerHello>();
    d.op(
        "get",
        "/v1/peer/hello",
        "peer",
        "Peer endpoint: who this host is (peer or admin token).",
        None,
        (200, s),
        &[],
    );
    let s = d.schema::<Vec<PeerInfo>>();
    d.op(
        "get",
        "/v1/peer/peers",
        "peer",
        "Peer endpoint: the hosts this host has registered (names and URLs, no tokens), so a peer finds the name this host gives it.",
        None,
        (200, s),
        &[],
    );
    let (r, s) = (
        d.schema::<ferry_api::IncomingRequest>(),
        d.schema::<ferry_api::IncomingReady>(),
    );
    d.op(
        "post",
        "/v1/peer/migrate/incoming",
        "peer",
        "Peer endpoint (migration destination): create lazy volumes sourced from the source's NBD exports, define the VM, start QEMU with -incoming.",
        r,
        (201, s),
        &[400, 409],
    );
    let s = d.schema::<ferry_api::IncomingStatus>();
    d.op(
        "get",
        "/v1/peer/migrate/{uuid}",
        "peer",
        "Peer endpoint: hydration of an incoming VM's disks (missing chunks, source errors).",
        None,
        (200, s.clone()),
        NF,
    );
    d.op(
        "delete",
        "/v1/peer/migrate/{uuid}",
        "peer",
        "Peer endpoint: remove an incoming VM that did not switch over (QEMU, definition, lazy volumes).",
        None,
        (204, None),
        NF_CONFLICT,
    );
    d.op(
        "post",
        "/v1/peer/migrate/{uuid}/hydrate",
        "peer",
        "Peer endpoint: after switchover, wait for the VM to run here and start hydrating its disks.",
        None,
        (200, s),
        NF_CONFLICT,
    );
    d.op(
        "post",
        "/v1/peer/migrate/{uuid}/finish",
        "peer",
        "Peer endpoint: the source released its volumes; forget the incoming VM's source records.",
        None,
        (204, None),
        &[409],
    );
    let (r, s) = (
        d.schema::<ferry_api::PrecopyRequest>(),
        d.schema::<ferry_api::PrecopyReady>(),
    );
    d.op(
        "post",
        "/v1/peer/migrate-precopy",
        "peer",
        "Peer endpoint (pre-copy migration destination): create empty volumes, define the VM on them, start QEMU with -incoming; answers the NBD exports the source mirrors each disk to.",
        r,
        (201, s),
        &[400, 409],
    );
    d.op(
        "delete",
        "/v1/peer/migrate-precopy/{uuid}",
        "peer",
        "Peer endpoint: remove a VM arriving by pre-copy that did not switch over (QEMU, definition, the volumes made for it).",
        None,
        (204, None),
        NF_CONFLICT,
    );
    d.op(
        "post",
        "/v1/peer/migrate-precopy/{uuid}/finish",
        "peer",
        "Peer endpoint: after a pre-copy switchover, wait for the VM to run here and end its arrival.",
        None,
        (204, None),
        NF_CONFLICT,
    );
    d
}

/// Batch migration (coordinator and destination records).
fn batches(d: &mut Doc) {
    let r = d.schema::<BatchRequest>();
    let s = d.schema::<BatchStarted>();
    d.op(
        "post",
        "/v1/migrations/batches",
        "migrations",
        "Migrate many VMs (on this host or its peers) to one destination: a migrate.batch operation on this host, which runs vm.migrate on each VM's source host, `parallel` at a time.",
        r,
        (202, s),
        &[400, 409],
    );
    let s = d.schema::<Vec<BatchSummary>>();
    d.op(
        "get",
        "/v1/migrations/batches",
        "migrations",
        "Batches this host coordinates or holds records of as a destination.",
        None,
        (200, s),
        &[],
    );
    let s = d.schema::<BatchStatus>();
    d.op(
        "get",
        "/v1/migrations/batches/{id}",
        "migrations",
        "Status of each VM of a batch (not started / in progress / migrated / failed), decided from the destination's durable records and the live state of both sides. Query `dest=HOST` asks that destination for the member list when this host has no journal of the batch.",
        None,
        (200, s),
        &[400, 404, 502],
    );
    let s = d.schema::<Started>();
    d.op(
        "post",
        "/v1/migrations/batches/{id}/recover",
        "migrations",
        "Finish the VMs of a batch past switchover and roll back the others (a migrate.batch.recover operation); every VM ends running on exactly one host. Query `dest=HOST` as for the status.",
        None,
        (202, s),
        &[400, 404, 409, 502],
    );
    let r = d.schema::<BatchManifest>();
    d.op(
        "post",
        "/v1/peer/migrations/batches",
        "peer",
        "Peer endpoint (batch destination): store a batch's manifest (members, sources) durably before any VM moves.",
        r,
        (204, None),
        &[400, 409],
    );
    let s = d.schema::<BatchRecords>();
    d.op(
        "get",
        "/v1/peer/migrations/records",
        "peer",
        "Peer endpoint (batch destination): the durable records of batch `?batch=ID` (manifest; per VM: started, placeholder, rolled back, completed).",
        None,
        (200, s),
        &[400],
    );
    let r = d.schema::<crate::api::CompleteRequest>();
    d.op(
        "post",
        "/v1/peer/migrations/complete",
        "peer",
        "Peer endpoint (batch destination): record the completed event of a VM that runs here after switchover (recovery).",
        r,
        (204, None),
        &[400, 404, 409],
    );
}

/// Backup repositories and backups.
fn backups(d: &mut Doc, started: &Option<Schema>) {
    const NF: &[u16] = &[404];
    const BAD_NF: &[u16] = &[400, 404];
    const BAD_NF_CONFLICT: &[u16] = &[400, 404, 409];
    let s = d.schema::<Vec<RepoEntry>>();
    d.op(
        "get",
        "/v1/repos",
        "backups",
        "List the backup repositories this host knows.",
        None,
        (200, s),
        &[],
    );
    let (r, s) = (d.schema::<AddRepo>(), d.schema::<RepoEntry>());
    d.op(
        "post",
        "/v1/repos",
        "backups",
        "Create (create: true) or add an existing backup repository: a directory or s3://bucket/prefix.",
        r,
        (201, s),
        &[400, 404, 409],
    );
    let s = d.schema::<RepoSummary>();
    d.op(
        "get",
        "/v1/repos/{repo}",
        "backups",
        "A repository with its counts and sizes.",
        None,
        (200, s),
        NF,
    );
    d.op(
        "post",
        "/v1/repos/{repo}/verify",
        "backups",
        "Read and check every chunk (an operation; it fails naming bad chunks and the backups they affect).",
        None,
        (202, started.clone()),
        NF,
    );
    let r = d.schema::<PruneRepo>();
    d.op(
        "post",
        "/v1/repos/{repo}/prune",
        "backups",
        "Forget the backups no keep rule keeps (an operation).",
        r,
        (202, started.clone()),
        BAD_NF,
    );
    d.op(
        "post",
        "/v1/repos/{repo}/gc",
        "backups",
        "Remove chunks no backup references (an operation; safe against running backups).",
        None,
        (202, started.clone()),
        NF,
    );
    let s = d.schema::<Vec<BackupInfo>>();
    d.op(
        "get",
        "/v1/repos/{repo}/backups",
        "backups",
        "List the backups of a repository, oldest first.",
        None,
        (200, s),
        NF,
    );
    let r = d.schema::<CreateBackup>();
    d.op(
        "post",
        "/v1/repos/{repo}/backups",
        "backups",
        "Back up a VM (an operation): consistent snapshot, then its disks from the pool snapshot, incremental to its previous backup.",
        r,
        (202, started.clone()),
        BAD_NF_CONFLICT,
    );
    let s = d.schema::<BackupInfo>();
    d.op(
        "get",
        "/v1/repos/{repo}/backups/{id}",
        "backups",
        "A backup: VM, consistency, disks and what each backup read and uploaded.",
        None,
        (200, s),
        NF,
    );
    d.op(
        "delete",
        "/v1/repos/{repo}/backups/{id}",
        "backups",
        "Forget a backup (its chunks are removed by the next gc).",
        None,
        (204, None),
        NF,
    );
    let r = d.schema::<RestoreBackup>();
    d.op(
        "post",
        "/v1/repos/{repo}/backups/{id}/restore",
        "backups",
        "Restore a backup into new volumes and a new VM, on this host or a peer (an operation).",
        r,
        (202, started.clone()),
        BAD_NF_CONFLICT,
    );
    let s = d.schema::<ReadProfile>();
    d.op(
        "get",
        "/v1/volumes/{name}/read-profile",
        "backups",
        "A volume's read profile: the byte ranges it read first, in order (backups store it).",
        None,
        (200, s.clone()),
        NF,
    );
    let r = d.schema::<SetReadProfile>();
    d.op(
        "post",
        "/v1/volumes/{name}/read-profile",
        "backups",
        "Start recording a volume's read profile (reads or seconds), or set it (ranges).",
        r,
        (200, s),
        BAD_NF,
    );
}

fn path_params(path: &str) -> Vec<Value> {
    path.split('/')
        .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(|name| {
            json!({ "name": name, "in": "path", "required": true, "schema": { "type": "string" } })
        })
        .collect()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted: an operation (or a cancel) started",
        204 => "Done, no body",
        400 => "Bad request; `field` names the field at fault",
        401 => "Missing or unknown token",
        403 => "A peer token on an admin call",
        404 => "No such object (the message names it)",
        409 => "Conflicts with the current state (in use, exists, finished)",
        502 => "The peer could not be reached or answered wrongly",
        507 => "The pool is full",
        _ => "See the error message",
    }
}

/// The whole document.
pub fn document() -> Value {
    let mut doc = build();
    let error = doc.g.subschema_for::<ApiError>();
    let mut paths = Map::new();
    for op in &doc.ops {
        let mut responses = Map::new();
        let mut ok = json!({ "description": reason(op.ok.0) });
        if let Some(s) = &op.ok.1 {
            ok["content"] = json!({ "application/json": { "schema": s } });
        } else if let Some(ct) = op.content_type {
            ok["content"] = json!({ ct: { "schema": { "type": "string" } } });
        }
        responses.insert(op.ok.0.to_string(), ok);
        let mut errs: Vec<u16> = op.errors.to_vec();
        match op.auth {
            Auth::None => {}
            Auth::Admin => errs.extend([401, 403]),
            Auth::AdminOrPeer => errs.push(401),
        }
        errs.sort_unstable();
        for e in errs {
            responses.insert(
                e.to_string(),
                json!({ "description": reason(e),
                        "content": { "application/json": { "schema": error } } }),
            );
        }
        let mut o = json!({
            "summary": op.summary,
            "tags": [op.tag],
            "operationId": format!("{}{}", op.method, op.path.replace(['/', '{', '}', '-'], "_")),
            "responses": responses,
        });
        let mut params = path_params(op.path);
        for (name, desc) in op.query {
            params.push(json!({ "name": name, "in": "query", "required": false,
                                "description": desc, "schema": { "type": "integer", "minimum": 1 } }));
        }
        if !params.is_empty() {
            o["parameters"] = Value::Array(params);
        }
        if let Some(r) = &op.request {
            o["requestBody"] =
                json!({ "required": true, "content": { "application/json": { "schema": r } } });
        }
        o["security"] = match op.auth {
            Auth::None => json!([]),
            Auth::Admin => json!([{ "admin": [] }]),
            Auth::AdminOrPeer => json!([{ "admin": [] }, { "peer": [] }]),
        };
        let entry = paths
            .entry(op.path.to_string())
            .or_insert_with(|| json!({}));
        entry[op.method] = o;
    }
    let mut schemas = doc.g.take_definitions(true);
    schemas.sort_keys();
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "ferryd",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The HTTP API of ferryd, Ferry's host daemon. Every call but /v1/health needs a bearer token: the admin token (ferryd init writes it to DATA/admin.token) opens everything; a host's peer token (GET /v1/host/peer-token) opens only /v1/peer/ and is what other hosts hold. Errors have the body {error, field?}."
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "admin": { "type": "http", "scheme": "bearer", "description": "The host's admin token." },
                "peer": { "type": "http", "scheme": "bearer", "description": "The host's peer token; opens only /v1/peer/." }
            }
        }
    })
}
