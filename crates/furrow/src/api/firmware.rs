//! Firmware images: `POST /v1/firmware?name=&version=&model=[&signature=]`
//! with the image as the body (streamed to a file while its SHA-256 is
//! computed, never held in memory; `firmware.max_image_bytes` at most),
//! `GET /v1/firmware`, `GET /v1/firmware/{id}`, `DELETE
//! /v1/firmware/{id}` (409 while an active job rolls it out).
//!
//! An upload carries a detached signature (`furrow firmware sign`) that
//! must verify with a trusted key, or none, and the gateway signs it with
//! `firmware.signing_key_file`. Either way the stored signature is one a
//! device built with the fleet's public key accepts.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Extension;
use futures_util::StreamExt;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use utoipa::IntoParams;

use super::auth::Caller;
use super::error::{ApiError, Json, Query};
use super::ApiState;
use crate::clock::now_ms;
use crate::firmware::{self, FirmwareRecord};

/// What an upload says about its image.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct UploadQuery {
    /// A name for people.
    pub name: String,
    /// The firmware version the image installs.
    pub version: String,
    /// The device model it is for.
    pub model: String,
    /// Hex Ed25519 signature (`furrow firmware sign`); absent: the
    /// gateway signs with its key.
    pub signature: Option<String>,
}

/// A staged upload's file, removed unless the store took it.
struct Staged(Option<std::path::PathBuf>);

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Uploads an image (the request body, `application/octet-stream`).
#[utoipa::path(post, path = "/v1/firmware", tag = "firmware",
    params(UploadQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, body = FirmwareRecord),
              (status = 400, description = "bad metadata, or a signature no trusted key verifies", body = super::error::ErrorBody),
              (status = 409, description = "the same image is stored already", body = super::error::ErrorBody),
              (status = 413, description = "over firmware.max_image_bytes", body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn upload(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<UploadQuery>,
    body: Body,
) -> Result<(StatusCode, Json<FirmwareRecord>), ApiError> {
    let bad = |e: firmware::FirmwareError| ApiError::BadRequest(e.to_string());
    firmware::check_label("name", &q.name).map_err(bad)?;
    firmware::check_label("version", &q.version).map_err(bad)?;
    firmware::check_label("model", &q.model).map_err(bad)?;
    let signature = q
        .signature
        .as_deref()
        .map(firmware::parse_signature)
        .transpose()
        .map_err(bad)?;
    if signature.is_none() && s.uploads.signing.is_none() {
        return Err(bad(firmware::FirmwareError::Unsigned));
    }
    let path = s
        .uploads
        .staging
        .join(format!("upload-{:016x}.part", rand::random::<u64>()));
    let mut staged = Staged(Some(path.clone()));
    let io = |e: std::io::Error| {
        tracing::warn!(error = %e, "cannot stage a firmware upload");
        ApiError::Store(crate::store::StoreError::Io {
            path: path.clone(),
            source: e,
        })
    };
    let mut file = tokio::fs::File::create(&path).await.map_err(io)?;
    let mut hash = Sha256::new();
    let mut size: u64 = 0;
    let mut stream = body.into_data_stream();
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(|e| ApiError::BadRequest(format!("reading the body: {e}")))?;
        size += piece.len() as u64;
        if size > s.uploads.max_image_bytes {
            metrics::counter!("furrow_firmware_uploads_total", "outcome" => "too_large")
                .increment(1);
            return Err(ApiError::TooLarge(format!(
                "the image is over firmware.max_image_bytes ({})",
                s.uploads.max_image_bytes
            )));
        }
        hash.update(&piece);
        file.write_all(&piece).await.map_err(io)?;
    }
    file.flush().await.map_err(io)?;
    drop(file);
    if size == 0 {
        return Err(ApiError::BadRequest("the image is empty".into()));
    }
    let id: [u8; 32] = hash.finalize().into();
    let signature = match signature {
        Some(sig) => {
            if !s.uploads.trusts(&sig, &id, size, &q.model, &q.version) {
                metrics::counter!("furrow_firmware_uploads_total", "outcome" => "bad_signature")
                    .increment(1);
                return Err(bad(firmware::FirmwareError::BadSignature));
            }
            sig
        }
        None => match &s.uploads.signing {
            Some(k) => k.sign(&id, size, &q.model, &q.version),
            None => return Err(bad(firmware::FirmwareError::Unsigned)),
        },
    };
    let record = FirmwareRecord {
        id: hex::encode(id),
        name: q.name,
        version: q.version,
        model: q.model,
        size,
        signature: hex::encode(signature),
        created_ms: now_ms(),
        created_by: caller.actor.clone(),
    };
    let staged_path = staged.0.take().unwrap_or(path);
    let record = s.store.put_firmware(record, staged_path).await?;
    metrics::counter!("furrow_firmware_uploads_total", "outcome" => "stored").increment(1);
    let detail = serde_json::json!({ "name": record.name, "version": record.version,
        "model": record.model, "size": record.size });
    super::auth::record(&s, caller.audit("firmware.upload", &record.id, detail)).await;
    Ok((StatusCode::CREATED, Json(record)))
}

/// Every image, newest first.
#[utoipa::path(get, path = "/v1/firmware", tag = "firmware",
    responses((status = 200, body = Vec<FirmwareRecord>)),
    security(("bearer" = [])))]
pub async fn list(State(s): State<ApiState>) -> Result<Json<Vec<FirmwareRecord>>, ApiError> {
    Ok(Json(s.store.list_firmware().await?))
}

/// One image.
#[utoipa::path(get, path = "/v1/firmware/{image_id}", tag = "firmware",
    params(("image_id" = String, Path, description = "hex SHA-256")),
    responses((status = 200, body = FirmwareRecord), (status = 404, body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn get(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<FirmwareRecord>, ApiError> {
    s.store
        .firmware(&id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no firmware image {id}")))
}

/// Deletes an image (409 while an active job rolls it out).
#[utoipa::path(delete, path = "/v1/firmware/{image_id}", tag = "firmware",
    params(("image_id" = String, Path, description = "hex SHA-256")),
    responses((status = 204), (status = 404, body = super::error::ErrorBody),
              (status = 409, body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if !s.store.delete_firmware(&id).await? {
        return Err(ApiError::NotFound(format!("no firmware image {id}")));
    }
    s.firmware.images.forget(&id);
    super::auth::record(
        &s,
        caller.audit("firmware.delete", &id, serde_json::json!({})),
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}
