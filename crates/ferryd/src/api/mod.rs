//! The HTTP API under `/v1`: routes, error mapping, and the blocking bridge
//! to the pool.

mod backups;
mod batch;
mod exports;
mod host;
mod migrate;
mod migrate_precopy;
mod ops;
mod peers;
mod profiles;
mod vmcopy;
mod vms;
mod vmsnaps;
mod volumes;

pub use batch::CompleteRequest;
pub(crate) use volumes::revert_volume;
pub use volumes::{ExportRequest, ImportRequest};

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::http::StatusCode;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ferry_api::ApiError;

use crate::auth::require_token;
use crate::daemon::Daemon;

/// Every route. `/v1/health` alone answers without a token (liveness
/// probes); it reveals nothing but "ok". The dashboard's files (`/`,
/// `/ui/...`, see [`crate::ui`]) hold no data and need no token either.
pub fn router(d: Arc<Daemon>) -> Router {
    let authed = Router::new()
        .route("/v1/host", get(host::info))
        .route("/v1/pool", get(host::pool))
        .route("/v1/volumes", get(volumes::list).post(volumes::create))
        .route(
            "/v1/volumes/{name}",
            get(volumes::show).delete(volumes::delete),
        )
        .route("/v1/volumes/{name}/grow", post(volumes::grow))
        .route("/v1/volumes/{name}/import", post(volumes::import))
        .route("/v1/volumes/{name}/export", post(volumes::export))
        .route("/v1/volumes/{name}/revert", post(volumes::revert))
        .route(
            "/v1/snapshots",
            get(volumes::snapshots).post(volumes::snapshot),
        )
        .route(
            "/v1/snapshots/{name}",
            axum::routing::delete(volumes::delete_snapshot),
        )
        .route("/v1/clones", post(volumes::clone))
        .route("/v1/exports", get(exports::list).post(exports::create))
        .route(
            "/v1/exports/{name}",
            get(exports::show).delete(exports::delete),
        )
        .route("/v1/operations", get(ops::list))
        .route("/v1/operations/{id}", get(ops::show))
        .route("/v1/operations/{id}/events", get(ops::events))
        .route("/v1/operations/{id}/cancel", post(ops::cancel))
        .route("/v1/host/peer-token", get(peers::token))
        .route("/v1/peers", get(peers::list).post(peers::add))
        .route("/v1/peers/{name}", get(peers::show).delete(peers::delete))
        .route("/v1/peer/hello", get(peers::hello))
        .route("/v1/peer/peers", get(peers::peer_list))
        .route("/v1/vms", get(vms::list).post(vms::define))
        .route("/v1/vms/{id}", get(vms::show).delete(vms::delete))
        .route("/v1/vms/{id}/start", post(vms::start))
        .route("/v1/vms/{id}/stop", post(vms::stop))
        .route("/v1/vms/{id}/pause", post(vms::pause))
        .route("/v1/vms/{id}/resume", post(vms::resume))
        .route("/v1/vms/{id}/kill", post(vms::kill))
        .route("/v1/vms/{id}/migrate", post(migrate::migrate))
        .route("/v1/vms/{id}/relocate", post(vms::relocate))
        .route("/v1/peer/migrate/incoming", post(migrate::incoming))
        .route(
            "/v1/peer/migrate/{uuid}",
            get(migrate::status).delete(migrate::abort),
        )
        .route("/v1/peer/migrate/{uuid}/hydrate", post(migrate::hydrate))
        .route("/v1/peer/migrate/{uuid}/finish", post(migrate::finish))
        .route("/v1/peer/migrate-precopy", post(migrate_precopy::incoming))
        .route(
            "/v1/peer/migrate-precopy/{uuid}",
            axum::routing::delete(migrate_precopy::abort),
        )
        .route(
            "/v1/peer/migrate-precopy/{uuid}/finish",
            post(migrate_precopy::finish),
        )
        .route(
            "/v1/migrations/batches",
            get(batch::list).post(batch::start),
        )
        .route("/v1/migrations/batches/{id}", get(batch::show))
        .route("/v1/migrations/batches/{id}/recover", post(batch::recover))
        .route("/v1/peer/migrations/batches", post(batch::register))
        .route("/v1/peer/migrations/records", get(batch::records))
        .route("/v1/peer/migrations/complete", post(batch::complete))
        .route("/v1/vms/{id}/copy", post(vmcopy::copy))
        .route("/v1/peer/copy/hash", post(vmcopy::hash))
        .route("/v1/vm-snapshots", get(vmsnaps::list).post(vmsnaps::create))
        .route(
            "/v1/vm-snapshots/{name}",
            get(vmsnaps::show).delete(vmsnaps::delete),
        )
        .route("/v1/vm-snapshots/{name}/revert", post(vmsnaps::revert))
        .route("/v1/vm-snapshots/{name}/clone", post(vmsnaps::clone))
        .route(
            "/v1/repos",
            get(backups::list_repos).post(backups::add_repo),
        )
        .route("/v1/repos/{repo}", get(backups::show_repo))
        .route("/v1/repos/{repo}/verify", post(backups::verify))
        .route("/v1/repos/{repo}/prune", post(backups::prune))
        .route("/v1/repos/{repo}/gc", post(backups::gc))
        .route(
            "/v1/repos/{repo}/backups",
            get(backups::list_backups).post(backups::create_backup),
        )
        .route(
            "/v1/repos/{repo}/backups/{id}",
            get(backups::show_backup).delete(backups::forget_backup),
        )
        .route(
            "/v1/repos/{repo}/backups/{id}/restore",
            post(backups::restore),
        )
        .route(
            "/v1/volumes/{name}/read-profile",
            get(profiles::show).post(profiles::set),
        )
        .route("/metrics", get(host::metrics))
        .layer(middleware::from_fn_with_state(d.clone(), require_token));
    Router::new()
        .route("/v1/health", get(|| async { "ok\n" }))
        .merge(authed)
        .merge(crate::ui::router())
        .fallback(|| async { error_response(StatusCode::NOT_FOUND, "no such API path", None) })
        .with_state(d)
}

/// An error answer: a status and an [`ApiError`] body.
#[derive(Debug)]
pub struct Failure(pub StatusCode, pub ApiError);

pub fn error_response(status: StatusCode, msg: &str, field: Option<&str>) -> Failure {
    Failure(
        status,
        ApiError {
            error: msg.to_string(),
            field: field.map(str::to_string),
        },
    )
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

impl From<ferry_pool::Error> for Failure {
    fn from(e: ferry_pool::Error) -> Self {
        use ferry_pool::ErrorKind as K;
        let status = match e.kind() {
            K::NotFound => StatusCode::NOT_FOUND,
            K::AlreadyExists | K::InUse | K::Lazy => StatusCode::CONFLICT,
            K::InvalidArgument => StatusCode::BAD_REQUEST,
            K::NoSpace => StatusCode::INSUFFICIENT_STORAGE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        error_response(status, &e.to_string(), None)
    }
}

impl From<ferry_ops::OpsError> for Failure {
    fn from(e: ferry_ops::OpsError) -> Self {
        use ferry_ops::OpsError as E;
        let status = match &e {
            E::NotFound(_) => StatusCode::NOT_FOUND,
            E::Finished { .. } => StatusCode::CONFLICT,
            E::Plan { .. } | E::UnknownKind { .. } => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        error_response(status, &e.to_string(), None)
    }
}

pub type ApiResult<T> = Result<Json<T>, Failure>;

/// Runs a pool call off the async runtime (pool calls may fsync).
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ferry_pool::Error> + Send + 'static,
) -> Result<T, Failure> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(Failure::from),
        Err(e) => Err(error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("pool call panicked: {e}"),
            None,
        )),
    }
}

/// A 400 naming the field at fault.
pub fn bad_field(field: &str, msg: &str) -> Failure {
    error_response(StatusCode::BAD_REQUEST, msg, Some(field))
}
