//! `/v1/storage`: how the gateway keeps telemetry (backend, retention, size
//! cap, free-space floor) and what it holds now.

use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, Json};
use super::ApiState;
use crate::config::Span;

/// The storage policy and state.
#[derive(Serialize, ToSchema)]
pub struct Storage {
    /// `sqlite` or `postgresql`.
    pub backend: &'static str,
    /// Readings older than this are dropped, a whole chunk at a time
    /// (`30d`; `0`: kept forever).
    pub retention: String,
    /// The oldest chunks are dropped while the database holds more bytes
    /// (0: no cap).
    pub max_bytes: u64,
    /// Below this much free space, telemetry waits (0: no floor).
    pub min_free_bytes: u64,
    /// The span of one chunk (`1d`), when the backend has chunks.
    pub chunk_span: Option<String>,
    /// Chunks held.
    pub chunks: Option<u64>,
    /// When the oldest chunk opened, Unix ms.
    pub oldest_chunk_opened_ms: Option<u64>,
    /// Bytes the database's pages hold.
    pub used_bytes: Option<u64>,
    /// Free bytes on the database's filesystem.
    pub free_bytes: Option<u64>,
    /// Readings stored but not yet indexed per device.
    pub unsealed_rows: Option<u64>,
    /// Telemetry commits succeed now (false during an outage or while the
    /// disk is below its floor; `/readyz` says the same).
    pub commits_ok: bool,
}

/// The storage policy and what the store holds.
#[utoipa::path(get, path = "/v1/storage", tag = "storage",
    responses((status = 200, body = Storage), (status = 503, body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn get(State(s): State<ApiState>) -> Result<Json<Storage>, ApiError> {
    let i = s.store.storage_info().await?;
    Ok(Json(Storage {
        backend: i.backend,
        retention: Span::from_ms(i.retention_ms).to_string(),
        max_bytes: i.max_bytes,
        min_free_bytes: i.min_free_bytes,
        chunk_span: i.chunk_span_ms.map(|ms| Span::from_ms(ms).to_string()),
        chunks: i.chunks,
        oldest_chunk_opened_ms: i.oldest_chunk_opened_ms,
        used_bytes: i.used_bytes,
        free_bytes: i.free_bytes,
        unsealed_rows: i.unsealed_rows,
        commits_ok: s.commits_ok.load(std::sync::atomic::Ordering::Acquire),
    }))
}
