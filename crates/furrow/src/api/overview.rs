//! `GET /v1/overview`: the fleet at a glance, for the console's first page
//! (and anyone else): who is asking, devices online and offline, the
//! instances and what each holds, storage, and the last hour of traffic
//! ([`crate::live`]). One request, so the console's refresh every few
//! seconds costs one store count, not a page of devices.

use axum::extract::State;
use axum::Extension;
use serde::Serialize;
use utoipa::ToSchema;

use super::auth::Caller;
use super::error::{ApiError, Json};
use super::ApiState;
use crate::live::Point;

/// Devices by state.
#[derive(Serialize, ToSchema)]
pub struct DeviceCountsView {
    /// Provisioned and not revoked.
    pub total: u64,
    /// Connected now (to any instance).
    pub online: u64,
    /// Not connected (`total - online`).
    pub offline: u64,
    /// Revoked.
    pub revoked: u64,
}

/// An instance and the devices connected to it.
#[derive(Serialize, ToSchema)]
pub struct InstanceView {
    /// Its name.
    pub instance: String,
    /// Devices connected to it.
    pub devices: u64,
}

/// The last hour, one point per step.
#[derive(Serialize, ToSchema)]
pub struct SeriesView {
    /// Time between points, ms.
    pub step_ms: u64,
    /// This instance's points, oldest first (at most an hour's).
    pub points: Vec<Point>,
    /// The step under way, from the last point until now.
    pub current: Point,
}

/// The fleet at a glance.
#[derive(Serialize, ToSchema)]
pub struct Overview {
    /// The caller's token name.
    pub actor: String,
    /// The caller's role (`read`, `operate`, `admin`): what it may change.
    #[schema(value_type = String)]
    pub role: &'static str,
    /// This instance.
    pub instance: String,
    /// Now, Unix ms (the gateway's clock).
    pub now_ms: u64,
    /// Devices.
    pub devices: DeviceCountsView,
    /// Connections on this instance.
    pub connections: u64,
    /// Live instances (one without PostgreSQL).
    pub instances: Vec<InstanceView>,
    /// Storage, as `GET /v1/storage`.
    pub storage: super::storage::Storage,
    /// Readings acknowledged per second, ACK p99, devices online.
    pub series: SeriesView,
}

/// The fleet at a glance.
#[utoipa::path(get, path = "/v1/overview", tag = "devices",
    responses((status = 200, body = Overview), (status = 503, body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn get(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Overview>, ApiError> {
    let counts = s.store.count_devices().await?;
    let connections = s.registry.len() as u64;
    let instances = match s.cluster.instances().await? {
        Some(list) => list
            .into_iter()
            .map(|(instance, devices)| InstanceView { instance, devices })
            .collect(),
        None => vec![InstanceView {
            instance: s.instance.clone(),
            devices: connections,
        }],
    };
    let online: u64 = instances.iter().map(|i| i.devices).sum();
    let total = counts.total.saturating_sub(counts.revoked);
    let Json(storage) = super::storage::get(State(s.clone())).await?;
    Ok(Json(Overview {
        actor: caller.actor,
        role: caller.role.as_str(),
        instance: s.instance.clone(),
        now_ms: crate::clock::now_ms(),
        devices: DeviceCountsView {
            total,
            online,
            offline: total.saturating_sub(online),
            revoked: counts.revoked,
        },
        connections,
        instances,
        storage,
        series: SeriesView {
            step_ms: crate::live::STEP.as_millis() as u64,
            points: s.series.points(),
            current: s.series.current(connections),
        },
    }))
}
