//! `/v1/devices/{id}/telemetry`: a device's stored readings by seq range or
//! time range, a page at a time. JSON payloads come back as JSON; CBOR,
//! text and octets as base64.

use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, Json, Query};
use super::ApiState;
use crate::envelope;
use crate::store::{StoredTelemetry, TelemetryRange};

/// Range and paging.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct RangeQuery {
    /// Lowest seq (inclusive).
    pub from_seq: Option<u64>,
    /// Highest seq (inclusive).
    pub to_seq: Option<u64>,
    /// Earliest timestamp, Unix ms (inclusive; the device's clock, or the
    /// receive time when the device sent none).
    pub from_ms: Option<u64>,
    /// Latest timestamp, Unix ms (inclusive).
    pub to_ms: Option<u64>,
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<u32>,
}

/// One stored reading.
#[derive(Serialize, ToSchema)]
pub struct Reading {
    /// The device's seq.
    pub seq: u64,
    /// Device clock (or receive time), Unix ms.
    pub timestamp_ms: u64,
    /// When the gateway received it, Unix ms.
    pub received_ms: u64,
    /// json, cbor, text or octets.
    pub content_type: String,
    /// The payload: JSON as JSON, anything else as standard base64.
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
}

/// A page of readings.
#[derive(Serialize, ToSchema)]
pub struct ReadingPage {
    /// The device id.
    pub device_id: String,
    /// Readings in seq order.
    pub readings: Vec<Reading>,
    /// Pass as `from_seq` for the next page; absent on the last one.
    pub next_from_seq: Option<u64>,
}

fn reading(t: StoredTelemetry) -> Reading {
    Reading {
        seq: t.seq,
        timestamp_ms: t.timestamp_ms,
        received_ms: t.received_ms,
        content_type: envelope::content_type_name(t.content_type),
        payload: envelope::payload_value(t.content_type, &t.payload),
    }
}

/// A device's stored readings.
#[utoipa::path(get, path = "/v1/devices/{device_id}/telemetry", tag = "telemetry",
    params(("device_id" = String, Path), RangeQuery),
    responses((status = 200, body = ReadingPage), (status = 400, body = super::error::ErrorBody),
              (status = 404, body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(
    State(s): State<ApiState>,
    Path(device_id): Path<String>,
    Query(q): Query<RangeQuery>,
) -> Result<Json<ReadingPage>, ApiError> {
    let limit = super::page_limit(q.limit)?;
    let d = TelemetryRange::default();
    let range = TelemetryRange {
        from_seq: q.from_seq.unwrap_or(d.from_seq),
        to_seq: q.to_seq.unwrap_or(d.to_seq),
        from_ms: q.from_ms.unwrap_or(d.from_ms),
        to_ms: q.to_ms.unwrap_or(d.to_ms),
    };
    if range.from_seq > range.to_seq || range.from_ms > range.to_ms {
        return Err(ApiError::BadRequest(
            "an empty range: from is after to".into(),
        ));
    }
    super::require_device(&s, &device_id).await?;
    let rows = s.store.telemetry(&device_id, range, limit).await?;
    let next_from_seq = (rows.len() == limit as usize)
        .then(|| rows.last().map(|r| r.seq + 1))
        .flatten()
        .filter(|n| *n <= range.to_seq);
    Ok(Json(ReadingPage {
        device_id,
        readings: rows.into_iter().map(reading).collect(),
        next_from_seq,
    }))
}
