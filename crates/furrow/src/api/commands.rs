//! Commands to devices: `POST /v1/devices/{id}/commands` stores one
//! (queued) and, when the device is online here, wakes its session to
//! send it at once; otherwise its next session sends it. Lifecycle:
//! queued, delivered, then succeeded or failed (from COMMAND_RESULT),
//! expired (its time to live ran out first) or cancelled (the device was
//! revoked). Delivery is at least once: a delivered command is sent again
//! after each reconnect until it is answered.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Extension;
use base64::Engine;
use furrow_proto::{content, ContentType};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::Caller;
use super::error::{ApiError, Json, Query};
use super::ApiState;
use crate::clock::now_ms;
use crate::envelope;
use crate::store::{CommandRecord, NewCommand};

/// The longest time to live, seconds (30 days).
pub const MAX_TTL_S: u64 = 30 * 24 * 3600;

/// Body of `POST /v1/devices/{id}/commands`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCommand {
    /// The command's name, 1 to 255 bytes.
    pub name: String,
    /// json (default), text, cbor or octets.
    #[serde(default = "json")]
    pub content_type: String,
    /// json: any JSON value; text: a string; cbor and octets: base64.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
    /// Seconds before it expires unanswered: 1 to 2,592,000 (default 3,600).
    pub ttl_s: Option<u64>,
}

fn json() -> String {
    "json".into()
}

/// The device's answer.
#[derive(Serialize, ToSchema)]
pub struct ResultView {
    /// succeeded, failed or unknown_command.
    pub status: &'static str,
    /// The result's content type.
    pub content_type: String,
    /// JSON as JSON, anything else as base64.
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
}

/// A command as operators (and MQTT consumers) see it.
#[derive(Serialize, ToSchema)]
pub struct CommandView {
    /// Its id.
    pub command_id: u64,
    /// The device.
    pub device_id: String,
    /// Its name.
    pub name: String,
    /// The payload's content type.
    pub content_type: String,
    /// JSON as JSON, anything else as base64.
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
    /// queued, delivered, succeeded, failed, expired or cancelled.
    pub state: &'static str,
    /// Created, Unix ms.
    pub created_ms: u64,
    /// Expires, Unix ms.
    pub expires_ms: u64,
    /// Last state change, Unix ms.
    pub updated_ms: u64,
    /// The device's answer, once there is one.
    pub result: Option<ResultView>,
}

impl CommandView {
    /// The view of a stored command.
    pub fn of(c: &CommandRecord) -> Self {
        Self {
            command_id: c.id,
            device_id: c.device_id.clone(),
            name: c.name.clone(),
            content_type: envelope::content_type_name(c.content_type),
            payload: if c.name == crate::store::TOKEN_COMMAND {
                // A device's new token: shown once, in the rotation's
                // answer; never to readers of commands or MQTT events.
                serde_json::json!({ "token": "(hidden)" })
            } else {
                envelope::payload_value(c.content_type, &c.payload)
            },
            state: c.state.as_str(),
            created_ms: c.created_ms,
            expires_ms: c.expires_ms,
            updated_ms: c.updated_ms,
            result: c.outcome.as_ref().map(|o| ResultView {
                status: match o.status {
                    0 => "succeeded",
                    1 => "failed",
                    _ => "unknown_command",
                },
                content_type: envelope::content_type_name(o.content_type),
                payload: envelope::payload_value(o.content_type, &o.payload),
            }),
        }
    }
}

/// A page of a device's commands, newest first.
#[derive(Serialize, ToSchema)]
pub struct CommandPage {
    /// Commands, newest first.
    pub commands: Vec<CommandView>,
    /// Pass as `before` for the next page; absent on the last one.
    pub next_before: Option<u64>,
}

/// Paging of a device's commands.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct CommandsQuery {
    /// Only commands with a smaller id.
    pub before: Option<u64>,
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<u32>,
}

/// The content type byte and payload bytes of a request.
pub(crate) fn payload_of(ct: &str, v: serde_json::Value) -> Result<(u8, Vec<u8>), ApiError> {
    let bad = |m: String| ApiError::BadRequest(m);
    let b64 = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|e| bad(format!("payload: not base64: {e}"))),
        serde_json::Value::Null => Ok(Vec::new()),
        _ => Err(bad(
            "payload: a base64 string is expected for this content type".into(),
        )),
    };
    let (t, bytes) = match ct {
        "json" => (
            ContentType::Json,
            serde_json::to_vec(&v).map_err(|e| bad(e.to_string()))?,
        ),
        "text" => match v {
            serde_json::Value::String(s) => (ContentType::Text, s.into_bytes()),
            serde_json::Value::Null => (ContentType::Text, Vec::new()),
            _ => return Err(bad("payload: a string is expected for text".into())),
        },
        "cbor" => (ContentType::Cbor, b64(&v)?),
        "octets" => (ContentType::Octets, b64(&v)?),
        other => {
            return Err(bad(format!(
                "content_type {other:?}: expected json, text, cbor or octets"
            )))
        }
    };
    content::validate(t as u8, &bytes).map_err(|e| bad(format!("payload: {e}")))?;
    Ok((t as u8, bytes))
}

/// Queues a command for a device; an online device gets it at once.
#[utoipa::path(post, path = "/v1/devices/{device_id}/commands", tag = "commands",
    params(("device_id" = String, Path)),
    request_body = CreateCommand,
    responses((status = 201, body = CommandView), (status = 400, body = super::error::ErrorBody),
              (status = 404, body = super::error::ErrorBody),
              (status = 409, description = "the device is revoked", body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn create(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(device_id): Path<String>,
    Json(body): Json<CreateCommand>,
) -> Result<(StatusCode, Json<CommandView>), ApiError> {
    if body.name.is_empty() || body.name.len() > 255 {
        return Err(ApiError::BadRequest("name: 1 to 255 bytes".into()));
    }
    let ttl_s = body.ttl_s.unwrap_or(3600);
    if !(1..=MAX_TTL_S).contains(&ttl_s) {
        return Err(ApiError::BadRequest(format!(
            "ttl_s must be 1 to {MAX_TTL_S}, got {ttl_s}"
        )));
    }
    let (content_type, payload) = payload_of(&body.content_type, body.payload)?;
    // COMMAND: command_id u64, name str (u16 + bytes), content_type u8, payload.
    let frame_body = 8 + 2 + body.name.len() + 1 + payload.len();
    if frame_body + 2 > s.max_frame as usize {
        return Err(ApiError::BadRequest(format!(
            "the command would be a {} byte frame, above limits.max_frame {}",
            frame_body + 2,
            s.max_frame
        )));
    }
    let rec = enqueue(
        &s,
        &device_id,
        NewCommand {
            name: body.name,
            content_type,
            payload,
            expires_ms: now_ms().saturating_add(ttl_s * 1000),
        },
    )
    .await?;
    // The payload may hold secrets: the log names the command only.
    let detail = serde_json::json!({ "command_id": rec.id, "name": rec.name });
    super::auth::record(&s, caller.audit("command.create", &device_id, detail)).await;
    Ok((StatusCode::CREATED, Json(CommandView::of(&rec))))
}

/// Stores a command, announces it, and wakes the device's session here
/// or on whichever instance holds it.
pub(crate) async fn enqueue(
    s: &ApiState,
    device_id: &str,
    cmd: NewCommand,
) -> Result<CommandRecord, ApiError> {
    let rec = s.store.create_command(device_id, cmd).await?;
    s.events.command(&rec);
    if !s.registry.notify_commands(device_id) {
        s.cluster.command_created(device_id).await;
    }
    Ok(rec)
}

/// One command.
#[utoipa::path(get, path = "/v1/commands/{command_id}", tag = "commands",
    params(("command_id" = u64, Path)),
    responses((status = 200, body = CommandView), (status = 404, body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn get(
    State(s): State<ApiState>,
    Path(id): Path<u64>,
) -> Result<Json<CommandView>, ApiError> {
    match s.store.command(id).await? {
        Some(c) => Ok(Json(CommandView::of(&c))),
        None => Err(ApiError::NotFound(format!("no command {id}"))),
    }
}

/// A device's commands, newest first.
#[utoipa::path(get, path = "/v1/devices/{device_id}/commands", tag = "commands",
    params(("device_id" = String, Path), CommandsQuery),
    responses((status = 200, body = CommandPage), (status = 404, body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(
    State(s): State<ApiState>,
    Path(device_id): Path<String>,
    Query(q): Query<CommandsQuery>,
) -> Result<Json<CommandPage>, ApiError> {
    let limit = super::page_limit(q.limit)?;
    super::require_device(&s, &device_id).await?;
    let rows = s.store.commands_of(&device_id, q.before, limit).await?;
    let next_before = (rows.len() == limit as usize)
        .then(|| rows.last().map(|c| c.id))
        .flatten();
    Ok(Json(CommandPage {
        commands: rows.iter().map(CommandView::of).collect(),
        next_before,
    }))
}
