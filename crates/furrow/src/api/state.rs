//! Device state: `GET /v1/devices/{id}/state` (desired, reported, delta,
//! versions, the time of each top-level member), `PATCH
//! .../state/desired` (a JSON merge patch, RFC 7396, with `If-Match` on the
//! desired version: 412 when another writer got there first), and `GET
//! .../state/history` (the reports applied, kept as long as telemetry).
//!
//! A change of the desired state wakes the device's session here or on
//! whichever instance holds it (the same wake-up as a new command); the
//! session sends DESIRED to a device that speaks device state.

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::Caller;
use super::error::{ApiError, Json, Query};
use super::ApiState;
use crate::devices::state::{parse_patch, StateView};
use crate::store::StateChange;

/// The response with the desired version as its ETag (`"7"`).
fn with_etag(view: StateView) -> Response {
    let etag = format!("\"{}\"", view.desired.version);
    let mut resp = Json(view).into_response();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    resp
}

/// `If-Match`: a version (`"7"`, `7` or `W/"7"`), or `*` (any).
fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(v) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = v
        .to_str()
        .map_err(|_| ApiError::BadRequest("If-Match is not text".into()))?
        .trim();
    if text == "*" {
        return Ok(None);
    }
    let bare = text.trim_start_matches("W/").trim_matches('"');
    bare.parse::<u64>().map(Some).map_err(|_| {
        ApiError::BadRequest(format!(
            "If-Match must be the desired version from the ETag (\"7\"), got {text:?}"
        ))
    })
}

/// A device's desired and reported state, their delta and versions.
#[utoipa::path(get, path = "/v1/devices/{device_id}/state", tag = "state",
    params(("device_id" = String, Path)),
    responses((status = 200, body = StateView, headers(("ETag" = String, description = "the desired version"))),
              (status = 404, body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn get(
    State(s): State<ApiState>,
    Path(device_id): Path<String>,
) -> Result<Response, ApiError> {
    match s.store.device_state(&device_id).await? {
        Some(row) => Ok(with_etag(StateView::of(&device_id, &row))),
        None => Err(ApiError::NotFound(format!("no device {device_id:?}"))),
    }
}

/// Changes the desired state with a JSON merge patch (RFC 7396): members
/// replace, `null` removes, objects merge. With `If-Match`, only if the
/// desired version is still that one (412 otherwise). The device gets the
/// new document at once if it is online, else at its next connection.
#[utoipa::path(patch, path = "/v1/devices/{device_id}/state/desired", tag = "state",
    params(("device_id" = String, Path),
           ("If-Match" = Option<String>, Header, description = "the desired version expected, as the ETag gave it")),
    request_body(content = Object, content_type = "application/merge-patch+json"),
    responses((status = 200, body = StateView, headers(("ETag" = String, description = "the new desired version"))),
              (status = 400, body = super::error::ErrorBody),
              (status = 404, body = super::error::ErrorBody),
              (status = 412, description = "the desired version is not If-Match's", body = super::error::ErrorBody),
              (status = 413, description = "over state.max_bytes or state.max_depth", body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn patch_desired(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(device_id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<serde_json::Value>,
) -> Result<Response, ApiError> {
    let expected = if_match(&headers)?;
    let bytes = serde_json::to_vec(&body).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let patch = parse_patch(&bytes, s.state_limits).map_err(|e| {
        if e.is_limit() {
            metrics::counter!("furrow_state_desired_refused_total", "reason" => "limit")
                .increment(1);
            ApiError::TooLarge(e.to_string())
        } else {
            ApiError::BadRequest(e.to_string())
        }
    })?;
    let keys: Vec<String> = patch.keys().cloned().collect();
    let row = match s
        .store
        .patch_desired(&device_id, patch, expected, s.state_limits)
        .await
    {
        Ok(row) => row,
        Err(e) => {
            let reason = match &e {
                crate::store::StoreError::State(se) if se.is_limit() => "limit",
                crate::store::StoreError::State(_) => "version",
                _ => "other",
            };
            metrics::counter!("furrow_state_desired_refused_total", "reason" => reason)
                .increment(1);
            return Err(e.into());
        }
    };
    metrics::counter!("furrow_state_desired_changes_total").increment(1);
    let view = StateView::of(&device_id, &row);
    s.events.desired(&view, &body);
    // Wake the session (here or where the device is) to send DESIRED.
    if !s.registry.notify_commands(&device_id) {
        s.cluster.command_created(&device_id).await;
    }
    let detail = serde_json::json!({ "version": row.desired.version, "members": keys });
    super::auth::record(&s, caller.audit("state.desired", &device_id, detail)).await;
    Ok(with_etag(view))
}

/// Paging of a device's state history.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    /// Only changes with a smaller id.
    pub before: Option<u64>,
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<u32>,
}

/// A page of reported changes, newest first.
#[derive(Serialize, ToSchema)]
pub struct HistoryPage {
    /// Changes, newest first.
    pub changes: Vec<StateChange>,
    /// Pass as `before` for the next page; absent on the last one.
    pub next_before: Option<u64>,
}

/// The reports a device's reported state was built from, newest first.
#[utoipa::path(get, path = "/v1/devices/{device_id}/state/history", tag = "state",
    params(("device_id" = String, Path), HistoryQuery),
    responses((status = 200, body = HistoryPage), (status = 404, body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn history(
    State(s): State<ApiState>,
    Path(device_id): Path<String>,
    Query(q): Query<HistoryQuery>,
) -> Result<Json<HistoryPage>, ApiError> {
    let limit = super::page_limit(q.limit)?;
    let changes = s.store.state_history(&device_id, q.before, limit).await?;
    let next_before = (changes.len() == limit as usize)
        .then(|| changes.last().map(|c| c.id))
        .flatten();
    Ok(Json(HistoryPage {
        changes,
        next_before,
    }))
}
