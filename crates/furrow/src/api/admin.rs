//! `/v1/api-tokens` and `/v1/audit`: operator tokens with roles (shown
//! once, stored as SHA-256), and the log of who changed what, when and from
//! where. Both need the admin role ([`super::auth::required_role`]).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Extension;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};

use super::auth::{self, Caller};
use super::error::{ApiError, Json, Query};
use super::ApiState;
use crate::devices::auth::{generate_token, hash_token};
use crate::store::{ApiToken, AuditEntry, Role};

/// Body of `POST /v1/api-tokens`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// 1 to 64 characters of `A-Z a-z 0-9 . _ : -`; names the caller in
    /// the audit log.
    pub name: String,
    /// read (dashboards, monitoring), operate (also commands) or admin
    /// (everything).
    pub role: String,
}

/// A new API token: its secret is shown here only.
#[derive(Serialize, ToSchema)]
pub struct NewToken {
    /// Its name.
    pub name: String,
    /// Its role.
    pub role: &'static str,
    /// The bearer token. The gateway keeps only its hash.
    pub token: String,
    /// When it was created, Unix ms.
    pub created_ms: u64,
}

/// An API token as listed: never its secret.
#[derive(Serialize, ToSchema)]
pub struct TokenView {
    /// Its name.
    pub name: String,
    /// Its role.
    pub role: &'static str,
    /// When it was created, Unix ms.
    pub created_ms: u64,
    /// When it was revoked, if it was.
    pub revoked_ms: Option<u64>,
}

impl TokenView {
    fn of(t: &ApiToken) -> Self {
        Self {
            name: t.name.clone(),
            role: t.role.as_str(),
            created_ms: t.created_ms,
            revoked_ms: t.revoked_ms,
        }
    }
}

/// Every API token.
#[derive(Serialize, ToSchema)]
pub struct TokenList {
    /// By name.
    pub tokens: Vec<TokenView>,
}

/// The outcome of a revocation.
#[derive(Serialize, ToSchema)]
pub struct TokenRevoked {
    /// The token's name.
    pub name: String,
    /// False if it was revoked already.
    pub revoked: bool,
}

/// Whether `name` can name a token.
pub fn valid_token_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Creates an API token with a role; its secret is in the answer only.
#[utoipa::path(post, path = "/v1/api-tokens", tag = "admin",
    request_body = CreateToken,
    responses((status = 201, body = NewToken), (status = 400, body = super::error::ErrorBody),
        (status = 409, description = "the name is taken", body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_token(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Json(body): Json<CreateToken>,
) -> Result<(StatusCode, Json<NewToken>), ApiError> {
    if !valid_token_name(&body.name) {
        return Err(ApiError::BadRequest(
            "name: 1 to 64 characters of A-Z a-z 0-9 . _ : -".into(),
        ));
    }
    let role = Role::parse(&body.role).ok_or_else(|| {
        ApiError::BadRequest(format!("role {:?}: read, operate or admin", body.role))
    })?;
    let token = generate_token();
    let t = s
        .store
        .create_api_token(&body.name, role, hash_token(token.as_bytes()))
        .await?;
    auth::record(
        &s,
        caller.audit(
            "api_token.create",
            &t.name,
            json!({ "role": role.as_str() }),
        ),
    )
    .await;
    Ok((
        StatusCode::CREATED,
        Json(NewToken {
            name: t.name,
            role: role.as_str(),
            token,
            created_ms: t.created_ms,
        }),
    ))
}

/// Lists the API tokens (never their secrets).
#[utoipa::path(get, path = "/v1/api-tokens", tag = "admin",
    responses((status = 200, body = TokenList)),
    security(("bearer" = [])))]
pub async fn list_tokens(State(s): State<ApiState>) -> Result<Json<TokenList>, ApiError> {
    let tokens = s.store.api_tokens().await?;
    Ok(Json(TokenList {
        tokens: tokens.iter().map(TokenView::of).collect(),
    }))
}

/// Revokes an API token: it opens nothing from the next request on.
#[utoipa::path(post, path = "/v1/api-tokens/{name}/revoke", tag = "admin",
    params(("name" = String, Path)),
    responses((status = 200, body = TokenRevoked), (status = 404, body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn revoke_token(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<TokenRevoked>, ApiError> {
    let revoked = s.store.revoke_api_token(&name).await?;
    auth::record(
        &s,
        caller.audit("api_token.revoke", &name, json!({ "newly": revoked })),
    )
    .await;
    Ok(Json(TokenRevoked { name, revoked }))
}

/// Paging of the audit log.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Only entries with a smaller id.
    pub before: Option<u64>,
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<u32>,
}

/// One change.
#[derive(Serialize, ToSchema)]
pub struct AuditView {
    /// Increasing.
    pub id: u64,
    /// When, Unix ms.
    pub at_ms: u64,
    /// Who: an API token's name, `admin` (api.token), `local` (loopback
    /// without a token) or `cli:<user>`.
    pub actor: String,
    /// From where: the client's address, or `cli`.
    pub source: String,
    /// What, e.g. `device.create`, `command.create`, `api_token.revoke`.
    pub action: String,
    /// On what: a device id or a token's name.
    pub target: String,
    /// Details.
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
}

/// A page of the audit log, newest first.
#[derive(Serialize, ToSchema)]
pub struct AuditPage {
    /// Newest first.
    pub entries: Vec<AuditView>,
    /// Pass as `before` for the next page; absent on the last one.
    pub next_before: Option<u64>,
}

impl AuditView {
    fn of(e: AuditEntry) -> Self {
        Self {
            id: e.id,
            at_ms: e.at_ms,
            actor: e.actor,
            source: e.source,
            action: e.action,
            target: e.target,
            detail: serde_json::from_str(&e.detail).unwrap_or(serde_json::Value::String(e.detail)),
        }
    }
}

/// The audit log: every change made through the API or the CLI, newest
/// first (kept as long as telemetry, `storage.retention`).
#[utoipa::path(get, path = "/v1/audit", tag = "admin", params(AuditQuery),
    responses((status = 200, body = AuditPage), (status = 400, body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn audit(
    State(s): State<ApiState>,
    Query(q): Query<AuditQuery>,
) -> Result<Json<AuditPage>, ApiError> {
    let limit = super::page_limit(q.limit)?;
    let entries = s.store.audit(q.before, limit).await?;
    let next_before = (entries.len() == limit as usize)
        .then(|| entries.last().map(|e| e.id))
        .flatten();
    Ok(Json(AuditPage {
        entries: entries.into_iter().map(AuditView::of).collect(),
        next_before,
    }))
}
