//! The admin bearer token. Compared in constant time, over SHA-256 digests
//! so that not even the token's length leaks through timing.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::ApiState;

/// Lets a request through when no token is configured or it carries
/// `Authorization: Bearer <token>`.
pub async fn require_token(
    State(state): State<ApiState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if let Some(expected) = &state.token_digest {
        let given = req
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let digest: [u8; 32] = Sha256::digest(given.trim().as_bytes()).into();
        if !bool::from(digest.ct_eq(expected)) || given.is_empty() {
            return Err(ApiError::Unauthorized);
        }
    }
    Ok(next.run(req).await)
}

/// The digest a configured token is compared through.
pub fn digest(token: &str) -> Option<[u8; 32]> {
    (!token.is_empty()).then(|| Sha256::digest(token.as_bytes()).into())
}
