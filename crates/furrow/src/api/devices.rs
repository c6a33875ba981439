//! `/v1/devices`: provision, list, inspect, revoke, rotate tokens.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Extension;
use furrow_proto::GoodbyeCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};

use super::auth::{self, Caller};
use super::error::{ApiError, Json, Query};
use super::ApiState;
use crate::devices::{self, ProvisionError};
use crate::store::DeviceInfo;

/// Body of `POST /v1/devices`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDevice {
    /// 1 to 128 characters of `A-Z a-z 0-9 . _ : -`.
    pub device_id: String,
}

/// A device's credentials, shown once.
#[derive(Serialize, ToSchema)]
pub struct Credentials {
    /// The device id.
    pub device_id: String,
    /// The token: shown here only; the gateway keeps its hash.
    pub token: String,
}

/// A device as operators see it.
#[derive(Serialize, ToSchema)]
pub struct Device {
    /// The device id.
    pub device_id: String,
    /// Creation time, Unix ms.
    pub created_ms: u64,
    /// Revocation time, Unix ms; absent while active.
    pub revoked_ms: Option<u64>,
    /// Highest stored seq, 0 if none.
    pub last_seq: u64,
    /// Connected now.
    pub online: bool,
    /// The gateway instance holding its connection.
    pub instance: Option<String>,
    /// Its address as the gateway sees it (behind a load balancer with
    /// `proxy_protocol`, the one from the PROXY header).
    pub peer: Option<String>,
    /// When its session began, Unix ms.
    pub connected_since_ms: Option<u64>,
    /// When it last sent anything (online) or when its last stored reading
    /// arrived (offline), Unix ms.
    pub last_seen_ms: Option<u64>,
    /// Its tags.
    pub tags: crate::jobs::Tags,
}

impl Device {
    /// The device with its live session: on this instance, or (with
    /// PostgreSQL) as recorded by the instance that holds it.
    async fn of(s: &ApiState, d: DeviceInfo) -> Result<Self, ApiError> {
        let mut view = Self {
            online: false,
            instance: None,
            peer: None,
            connected_since_ms: None,
            last_seen_ms: d.last_seen_ms,
            device_id: d.device_id,
            created_ms: d.created_ms,
            revoked_ms: d.revoked_ms,
            last_seq: d.last_seq,
            tags: crate::jobs::Tags::new(),
        };
        if let Some(live) = s.registry.info(&view.device_id) {
            view.online = true;
            view.instance = Some(s.instance.clone());
            view.peer = Some(live.peer.to_string());
            view.connected_since_ms = Some(live.connected_ms);
            view.last_seen_ms = Some(live.last_seen_ms);
        } else if let Some(h) = s.cluster.holder(&view.device_id).await? {
            view.online = true;
            view.instance = Some(h.instance);
            view.peer = Some(h.peer);
            view.connected_since_ms = Some(h.connected_ms);
        }
        Ok(view)
    }
}

/// A page of devices.
#[derive(Serialize, ToSchema)]
pub struct DevicePage {
    /// Devices in id order.
    pub devices: Vec<Device>,
    /// Pass as `after` for the next page; absent on the last page.
    pub next: Option<String>,
}

/// Paging and filtering of `GET /v1/devices`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Start after this device id.
    pub after: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<u32>,
    /// Only devices with this tag, `key:value`; repeat for several (all
    /// must match).
    #[param(rename = "tag")]
    pub tag: Option<Vec<String>>,
    /// Only devices whose id starts with this.
    pub prefix: Option<String>,
    /// Only devices connected now (`true`) or not (`false`). A page may
    /// then hold fewer than `limit` devices and still have a `next`: each
    /// request looks at a bounded number of devices.
    pub online: Option<bool>,
}

impl ListQuery {
    /// From the query's pairs (`tag` may repeat, which a struct cannot
    /// take from a query string directly).
    fn of(pairs: Vec<(String, String)>) -> Result<Self, ApiError> {
        let mut q = Self {
            after: None,
            limit: None,
            tag: None,
            prefix: None,
            online: None,
        };
        for (k, v) in pairs {
            match k.as_str() {
                "after" => q.after = Some(v),
                "limit" => {
                    q.limit =
                        Some(v.parse().map_err(|_| {
                            ApiError::BadRequest(format!("limit: not a number: {v:?}"))
                        })?)
                }
                "tag" => q.tag.get_or_insert_with(Vec::new).push(v),
                "prefix" => q.prefix = Some(v),
                "online" => {
                    q.online = Some(match v.as_str() {
                        "true" => true,
                        "false" => false,
                        _ => {
                            return Err(ApiError::BadRequest(format!(
                                "online: true or false, not {v:?}"
                            )))
                        }
                    })
                }
                other => {
                    return Err(ApiError::BadRequest(format!(
                        "unknown query parameter {other:?}: expected after, limit, tag, prefix or online"
                    )))
                }
            }
        }
        Ok(q)
    }
}

/// A device's tags.
#[derive(Serialize, ToSchema)]
pub struct DeviceTags {
    /// The device id.
    pub device_id: String,
    /// Its tags.
    pub tags: crate::jobs::Tags,
}

/// A device's tags.
#[utoipa::path(get, path = "/v1/devices/{device_id}/tags", tag = "devices",
    params(("device_id" = String, Path)),
    responses((status = 200, body = DeviceTags), (status = 404, body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn tags(
    State(s): State<ApiState>,
    Path(device_id): Path<String>,
) -> Result<Json<DeviceTags>, ApiError> {
    super::require_device(&s, &device_id).await?;
    let mut all = s.store.tags_of(std::slice::from_ref(&device_id)).await?;
    Ok(Json(DeviceTags {
        tags: all.remove(&device_id).unwrap_or_default(),
        device_id,
    }))
}

/// Changes a device's tags: `{"site": "north", "old": null}` sets `site`
/// and removes `old` (a JSON merge patch of the tags; values are strings).
#[utoipa::path(patch, path = "/v1/devices/{device_id}/tags", tag = "devices",
    params(("device_id" = String, Path)),
    request_body(content = Object, content_type = "application/merge-patch+json"),
    responses((status = 200, body = DeviceTags), (status = 400, body = super::error::ErrorBody),
              (status = 404, body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn patch_tags(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(device_id): Path<String>,
    Json(body): Json<serde_json::Map<String, serde_json::Value>>,
) -> Result<Json<DeviceTags>, ApiError> {
    let mut changes = std::collections::BTreeMap::new();
    for (k, v) in body {
        let v = match v {
            serde_json::Value::Null => None,
            serde_json::Value::String(s) => Some(s),
            other => {
                return Err(ApiError::BadRequest(format!(
                    "tag {k:?}: a string, or null to remove it, not {other}"
                )))
            }
        };
        changes.insert(k, v);
    }
    let detail = json!({ "tags": changes });
    let tags = s.store.set_tags(&device_id, changes).await?;
    auth::record(&s, caller.audit("device.tags", &device_id, detail)).await;
    Ok(Json(DeviceTags { device_id, tags }))
}

/// Outcome of a revocation.
#[derive(Serialize, ToSchema)]
pub struct Revoked {
    /// The device id.
    pub device_id: String,
    /// False if it was revoked already.
    pub revoked: bool,
    /// A live connection on this instance was told GOODBYE DEVICE_REVOKED.
    pub disconnected: bool,
}

fn provision_err(e: ProvisionError) -> ApiError {
    match e {
        ProvisionError::InvalidId(_) => ApiError::BadRequest(e.to_string()),
        ProvisionError::Store(s) => s.into(),
    }
}

/// Creates a device; its token is in the answer and nowhere else.
#[utoipa::path(post, path = "/v1/devices", tag = "devices",
    request_body = CreateDevice,
    responses(
        (status = 201, body = Credentials),
        (status = 400, body = super::error::ErrorBody),
        (status = 409, description = "the id exists", body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn create(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Json(body): Json<CreateDevice>,
) -> Result<(StatusCode, Json<Credentials>), ApiError> {
    let token = devices::add_device(s.store.as_ref(), &body.device_id)
        .await
        .map_err(provision_err)?;
    auth::record(
        &s,
        caller.audit("device.create", &body.device_id, json!({})),
    )
    .await;
    Ok((
        StatusCode::CREATED,
        Json(Credentials {
            device_id: body.device_id,
            token,
        }),
    ))
}

/// Lists devices in id order, a page at a time.
#[utoipa::path(get, path = "/v1/devices", tag = "devices", params(ListQuery),
    responses((status = 200, body = DevicePage), (status = 400, body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(
    State(s): State<ApiState>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Json<DevicePage>, ApiError> {
    let q = ListQuery::of(pairs)?;
    let limit = super::page_limit(q.limit)?;
    let selector = q
        .tag
        .as_ref()
        .map(|terms| crate::jobs::parse_selector(terms))
        .transpose()
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let prefix = q.prefix.unwrap_or_default();
    let mut after = q.after;
    // Ids in order: those with the prefix start at the prefix itself,
    // which `device_id > after` would skip, so it is looked at first.
    let mut first = None;
    if !prefix.is_empty() && after.as_deref().is_none_or(|a| a < prefix.as_str()) {
        if let Some(d) = s.store.device(&prefix).await? {
            let tagged = match &selector {
                Some(sel) => {
                    let tags = s.store.tags_of(std::slice::from_ref(&prefix)).await?;
                    let have = tags.get(&prefix);
                    sel.iter()
                        .all(|(k, v)| have.and_then(|t| t.get(k)) == Some(v))
                }
                None => true,
            };
            first = tagged.then_some(d);
        }
        after = Some(prefix.clone());
    }
    // With an online filter, devices are read until the page is full or
    // `ONLINE_SCAN_MAX` have been looked at (then `next` goes on from
    // there): bounded work per request whatever the fleet.
    let fetch = if q.online.is_some() { 500 } else { limit };
    let mut devices = Vec::new();
    let mut scanned = 0usize;
    let mut pending: std::collections::VecDeque<DeviceInfo> = first.into_iter().collect();
    // The store has nothing after what `pending` holds.
    let mut exhausted = false;
    let next = loop {
        if pending.is_empty() && !exhausted {
            let page = match &selector {
                Some(sel) => s.store.select_devices(sel, after.clone(), fetch).await?,
                None => s.store.list_devices(after.clone(), fetch).await?,
            };
            exhausted = page.len() < fetch as usize;
            pending.extend(page);
        }
        let Some(d) = pending.pop_front() else {
            break None;
        };
        if !d.device_id.starts_with(&prefix) {
            // Past the ids with the prefix.
            break None;
        }
        scanned += 1;
        after = Some(d.device_id.clone());
        let view = Device::of(&s, d).await?;
        if q.online.is_none_or(|want| view.online == want) {
            devices.push(view);
            if devices.len() == limit as usize {
                break after.filter(|_| !(exhausted && pending.is_empty()));
            }
        }
        if q.online.is_some() && scanned >= ONLINE_SCAN_MAX {
            break after.filter(|_| !(exhausted && pending.is_empty()));
        }
    };
    let ids: Vec<String> = devices.iter().map(|d| d.device_id.clone()).collect();
    let mut tags = s.store.tags_of(&ids).await?;
    for view in &mut devices {
        view.tags = tags.remove(&view.device_id).unwrap_or_default();
    }
    Ok(Json(DevicePage { devices, next }))
}

/// Devices one listing with an online filter looks at, at most.
const ONLINE_SCAN_MAX: usize = 2_000;

/// One device, with its connection if it is online.
#[utoipa::path(get, path = "/v1/devices/{device_id}", tag = "devices",
    params(("device_id" = String, Path)),
    responses((status = 200, body = Device), (status = 404, body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn get(
    State(s): State<ApiState>,
    Path(device_id): Path<String>,
) -> Result<Json<Device>, ApiError> {
    match s.store.device(&device_id).await? {
        Some(d) => {
            let mut view = Device::of(&s, d).await?;
            let mut tags = s.store.tags_of(std::slice::from_ref(&device_id)).await?;
            view.tags = tags.remove(&device_id).unwrap_or_default();
            Ok(Json(view))
        }
        None => Err(ApiError::NotFound(format!("no device {device_id:?}"))),
    }
}

/// Revokes a device: it cannot connect again, a live connection is told
/// GOODBYE DEVICE_REVOKED (on another instance through a notification, and
/// within its revocation poll at the latest), and its open commands are
/// cancelled.
#[utoipa::path(post, path = "/v1/devices/{device_id}/revoke", tag = "devices",
    params(("device_id" = String, Path)),
    responses((status = 200, body = Revoked), (status = 404, body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn revoke(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(device_id): Path<String>,
) -> Result<Json<Revoked>, ApiError> {
    let revoked = s.store.revoke_device(&device_id).await?;
    auth::record(
        &s,
        caller.audit("device.revoke", &device_id, json!({ "newly": revoked })),
    )
    .await;
    let disconnected = s.registry.kick(&device_id, GoodbyeCode::DeviceRevoked);
    if !disconnected {
        // Connected to another instance: it hears at once (and polls the
        // revocation log anyway).
        s.cluster.revoked(&device_id).await;
    }
    // Revoked, it can take no new command; its open ones are cancelled.
    for c in s.store.cancel_open_commands(&device_id).await? {
        s.events.command(&c);
    }
    Ok(Json(Revoked {
        device_id,
        revoked,
        disconnected,
    }))
}

/// Body of `POST /v1/devices/{id}/token` (optional: no body takes the
/// defaults).
#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct RotateToken {
    /// Seconds the old token still opens the device, unless the device
    /// authenticates with the new one first: 0 to 31,536,000 (default
    /// `devices.token_grace_s`, 7 days; 0: it stops working at once).
    pub grace_s: Option<u64>,
    /// Also hand the new token to the device: a command named
    /// `furrow.token` with the JSON payload `{"token": "..."}`, which the
    /// device SDK answers by switching to it. Its time to live is the grace
    /// period (at least an hour, at most 30 days). The API and MQTT events
    /// show its payload as `{"token": "(hidden)"}`, and the stored payload
    /// becomes `{}` once the device uses the new token.
    #[serde(default)]
    pub deliver: bool,
}

/// The longest grace period, seconds (a year).
pub const MAX_GRACE_S: u64 = 365 * 24 * 3600;

/// A rotation's outcome: the new token, shown once.
#[derive(Serialize, ToSchema)]
pub struct Rotated {
    /// The device id.
    pub device_id: String,
    /// The new token: shown here only; the gateway keeps its hash.
    pub token: String,
    /// Until when (Unix ms) the old token still opens the device, unless
    /// the device uses the new one first; absent with no grace period.
    pub previous_valid_until_ms: Option<u64>,
    /// The `furrow.token` command that carries the new token (`deliver`).
    pub command_id: Option<u64>,
}

/// Gives a device a new token (shown once). The old one keeps working for
/// the grace period or until the device first authenticates with the new
/// one, so a device is never cut off by a rotation; a live connection is
/// not cut either (revoke does that). With `deliver`, the device is sent
/// the new token as a command.
#[utoipa::path(post, path = "/v1/devices/{device_id}/token", tag = "devices",
    params(("device_id" = String, Path)),
    request_body(content = Option<RotateToken>),
    responses((status = 200, body = Rotated), (status = 400, body = super::error::ErrorBody),
        (status = 404, body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn rotate(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(device_id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Rotated>, ApiError> {
    let body: RotateToken = if body.iter().all(u8::is_ascii_whitespace) {
        RotateToken::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(e.to_string()))?
    };
    let grace_s = body.grace_s.unwrap_or(s.token_grace.as_secs());
    if grace_s > MAX_GRACE_S {
        return Err(ApiError::BadRequest(format!(
            "grace_s must be 0 to {MAX_GRACE_S}, got {grace_s}"
        )));
    }
    let grace = std::time::Duration::from_secs(grace_s);
    let rotation = devices::rotate_token(s.store.as_ref(), &device_id, grace)
        .await
        .map_err(provision_err)?;
    let token = rotation.token;
    auth::record(
        &s,
        caller.audit(
            "device.rotate_token",
            &device_id,
            json!({ "grace_s": grace_s, "deliver": body.deliver }),
        ),
    )
    .await;
    let command_id = if body.deliver {
        let ttl_s = grace_s.clamp(3600, super::commands::MAX_TTL_S);
        // A hex token needs no escaping: this is valid JSON.
        let payload = format!(r#"{{"token":"{token}"}}"#).into_bytes();
        let rec = super::commands::enqueue(
            &s,
            &device_id,
            crate::store::NewCommand {
                name: crate::store::TOKEN_COMMAND.into(),
                content_type: furrow_proto::ContentType::Json as u8,
                payload,
                expires_ms: crate::clock::now_ms().saturating_add(ttl_s * 1000),
            },
        )
        .await?;
        Some(rec.id)
    } else {
        None
    };
    Ok(Json(Rotated {
        device_id,
        token,
        previous_valid_until_ms: rotation.previous_until_ms,
        command_id,
    }))
}
