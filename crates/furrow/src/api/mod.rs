//! The operator's HTTP API (axum), on its own listener: JSON under `/v1`,
//! health checks, and Prometheus `/metrics`. Every route but `/healthz`
//! and `/readyz` needs a bearer token when `api.token` is configured (the
//! configuration refuses a non-loopback listener without one): that one,
//! or an API token whose role allows the route ([`auth`]). Every change is
//! written to the audit log ([`admin`]).
//!
//! [`app`] builds the router from state alone, so tests can drive it
//! without a socket.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::devices::registry::Registry;
use crate::store::prelude::*;

pub mod admin;
pub mod auth;
pub mod commands;
pub mod devices;
pub mod error;
pub mod firmware;
pub mod jobs;
pub mod overview;
pub mod state;
pub mod storage;
pub mod telemetry;
pub mod ui;

/// The OpenAPI document, generated from the handlers and their types.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "Furrow operator API", version = "1"),
    paths(
        devices::create,
        devices::list,
        devices::get,
        devices::revoke,
        devices::rotate,
        devices::tags,
        devices::patch_tags,
        telemetry::list,
        commands::create,
        commands::get,
        commands::list,
        state::get,
        state::patch_desired,
        state::history,
        firmware::upload,
        firmware::list,
        firmware::get,
        firmware::delete,
        jobs::create,
        jobs::list,
        jobs::get,
        jobs::devices,
        jobs::cancel,
        storage::get,
        overview::get,
        admin::create_token,
        admin::list_tokens,
        admin::revoke_token,
        admin::audit
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "devices", description = "Provisioning and fleet state"),
        (name = "telemetry", description = "Stored readings"),
        (name = "commands", description = "Commands to devices"),
        (name = "state", description = "Desired and reported device state"),
        (name = "jobs", description = "Operations rolled out over a fleet"),
        (name = "firmware", description = "Signed firmware images"),
        (name = "storage", description = "Retention and disk"),
        (name = "admin", description = "API tokens with roles, and the audit log")
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// What every handler can reach.
#[derive(Clone)]
pub struct ApiState {
    /// The store (source of truth).
    pub store: Arc<dyn Store>,
    /// Live sessions on this instance.
    pub registry: Arc<Registry>,
    /// Prometheus rendering.
    pub metrics: PrometheusHandle,
    /// True while the device listener accepts.
    pub accepting: Arc<AtomicBool>,
    /// True while the storage writer's commits succeed (false during a
    /// database outage, a full disk, or below `storage.min_free_bytes`).
    pub commits_ok: Arc<AtomicBool>,
    /// SHA-256 of the admin token, if one is configured.
    pub token_digest: Option<[u8; 32]>,
    /// This instance's name.
    pub instance: String,
    /// Events (command state changes).
    pub events: crate::publish::Events,
    /// limits.max_frame: a command must fit in one frame.
    pub max_frame: u32,
    /// devices.token_grace_s: how long a rotated-out token still works.
    pub token_grace: std::time::Duration,
    /// Other instances (PostgreSQL): where remote devices are connected.
    pub cluster: crate::cluster::Cluster,
    /// `[state]`: document limits of desired state patches.
    pub state_limits: crate::devices::state::StateLimits,
    /// Firmware images being served (a deleted one is dropped from memory).
    pub firmware: Arc<crate::firmware::serve::Service>,
    /// Firmware upload settings.
    pub uploads: Arc<crate::firmware::Uploads>,
    /// The last hour of traffic (`GET /v1/overview`).
    pub series: Arc<crate::live::Series>,
}

/// 404 unless the device exists.
pub(crate) async fn require_device(s: &ApiState, device_id: &str) -> Result<(), error::ApiError> {
    match s.store.device(device_id).await? {
        Some(_) => Ok(()),
        None => Err(error::ApiError::NotFound(format!(
            "no device {device_id:?}"
        ))),
    }
}

/// A page size: 1 to 1000, 100 when not given.
pub(crate) fn page_limit(limit: Option<u32>) -> Result<u32, error::ApiError> {
    match limit.unwrap_or(100) {
        n @ 1..=1000 => Ok(n),
        n => Err(error::ApiError::BadRequest(format!(
            "limit must be 1 to 1000, got {n}"
        ))),
    }
}

/// The router.
pub fn app(state: ApiState) -> Router {
    let protected = Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/devices", get(devices::list).post(devices::create))
        .route("/v1/devices/{device_id}", get(devices::get))
        .route("/v1/devices/{device_id}/revoke", post(devices::revoke))
        .route("/v1/devices/{device_id}/token", post(devices::rotate))
        .route("/v1/devices/{device_id}/telemetry", get(telemetry::list))
        .route(
            "/v1/devices/{device_id}/commands",
            get(commands::list).post(commands::create),
        )
        .route("/v1/commands/{command_id}", get(commands::get))
        .route(
            "/v1/devices/{device_id}/tags",
            get(devices::tags).patch(devices::patch_tags),
        )
        .route(
            "/v1/firmware",
            get(firmware::list)
                .post(firmware::upload)
                .layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route(
            "/v1/firmware/{image_id}",
            get(firmware::get).delete(firmware::delete),
        )
        .route("/v1/jobs", get(jobs::list).post(jobs::create))
        .route("/v1/jobs/{job_id}", get(jobs::get))
        .route("/v1/jobs/{job_id}/devices", get(jobs::devices))
        .route("/v1/jobs/{job_id}/cancel", post(jobs::cancel))
        .route("/v1/devices/{device_id}/state", get(state::get))
        .route(
            "/v1/devices/{device_id}/state/desired",
            axum::routing::patch(state::patch_desired),
        )
        .route("/v1/devices/{device_id}/state/history", get(state::history))
        .route("/v1/storage", get(storage::get))
        .route("/v1/overview", get(overview::get))
        .route(
            "/v1/api-tokens",
            get(admin::list_tokens).post(admin::create_token),
        )
        .route("/v1/api-tokens/{name}/revoke", post(admin::revoke_token))
        .route("/v1/audit", get(admin::audit))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        // The console's files are public (its sign-in form is one of
        // them); everything it shows comes from the API, with a token.
        .merge(ui::routes())
        .merge(protected)
        .with_state(state)
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
}

/// The process is up.
async fn healthz() -> impl IntoResponse {
    axum::Json(Health { status: "ok" })
}

#[derive(Serialize)]
struct Ready {
    ready: bool,
    store: bool,
    commits: bool,
    device_listener: bool,
}

/// The store answers, telemetry commits succeed, and the device listener
/// accepts.
async fn readyz(State(s): State<ApiState>) -> impl IntoResponse {
    let store = matches!(
        tokio::time::timeout(Duration::from_secs(2), s.store.ping()).await,
        Ok(Ok(()))
    );
    let commits = s.commits_ok.load(Ordering::Acquire);
    let device_listener = s.accepting.load(Ordering::Acquire);
    let ready = store && commits && device_listener;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(Ready {
            ready,
            store,
            commits,
            device_listener,
        }),
    )
}

/// The OpenAPI document.
async fn openapi() -> impl IntoResponse {
    axum::Json(<ApiDoc as utoipa::OpenApi>::openapi())
}

/// Prometheus text format.
async fn metrics(State(s): State<ApiState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

/// Binds the API listener (fail closed: an address in use stops the start).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves until `stop` is cancelled, then finishes the requests in flight.
pub async fn serve(listener: TcpListener, app: Router, stop: CancellationToken) {
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    tracing::info!(addr, "HTTP API listening");
    // The client's address, for the audit log.
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "HTTP API server failed");
    }
}
