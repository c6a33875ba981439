//! One error type for every route: a stable machine-readable code, a
//! message for people, and the HTTP status, rendered as
//! `{"error": {"code": "...", "message": "..."}}`.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::devices::state::StateError;
use crate::store::StoreError;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No token, or the wrong one.
    #[error("a valid bearer token is required")]
    Unauthorized,
    /// The token's role does not allow this route.
    #[error("this needs the {0} role")]
    Forbidden(&'static str),
    /// The request is malformed; the message says how.
    #[error("{0}")]
    BadRequest(String),
    /// Nothing by that name.
    #[error("{0}")]
    NotFound(String),
    /// It exists already, or the state forbids it.
    #[error("{0}")]
    Conflict(String),
    /// `If-Match` named another version.
    #[error("{0}")]
    PreconditionFailed(String),
    /// Over a size or depth limit.
    #[error("{0}")]
    TooLarge(String),
    /// The store failed; details are logged, not returned.
    #[error("the store is unavailable")]
    Store(#[source] StoreError),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::DeviceExists(id) => Self::Conflict(format!("device {id:?} already exists")),
            StoreError::NoSuchDevice(id) => Self::NotFound(format!("no device {id:?}")),
            StoreError::Revoked(id) => Self::Conflict(format!("device {id:?} is revoked")),
            StoreError::TokenExists(n) => Self::Conflict(format!("API token {n:?} already exists")),
            StoreError::NoSuchToken(n) => Self::NotFound(format!("no API token {n:?}")),
            StoreError::State(e @ StateError::VersionMismatch { .. }) => {
                Self::PreconditionFailed(e.to_string())
            }
            StoreError::State(e) if e.is_limit() => Self::TooLarge(e.to_string()),
            StoreError::State(e) => Self::BadRequest(e.to_string()),
            StoreError::Tag(e) => Self::BadRequest(e.to_string()),
            StoreError::Job(m) => Self::BadRequest(m),
            e @ (StoreError::FirmwareExists(_) | StoreError::FirmwareInUse(_)) => {
                Self::Conflict(e.to_string())
            }
            other => Self::Store(other),
        }
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorDetail {
    /// Stable: unauthorized, forbidden, bad_request, not_found, conflict,
    /// precondition_failed, too_large, unavailable.
    code: &'static str,
    /// For people; may change.
    message: String,
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            Self::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Self::PreconditionFailed(_) => (StatusCode::PRECONDITION_FAILED, "precondition_failed"),
            Self::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            Self::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.parts();
        if let Self::Store(e) = &self {
            tracing::warn!(error = %e, "API request failed in the store");
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code,
                message: self.to_string(),
            },
        };
        let mut resp = (status, axum::Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

/// A JSON request body, or a JSON response. Rejections are
/// [`ApiError::BadRequest`] with serde's own words (which field, which line
/// and column).
///
/// The body is read as JSON when it says `Content-Type: application/json`
/// (or `+json`), and also whatever its content type when the request
/// carries an `Authorization` header: `curl -d '{...}'` sends a form
/// content type, and an API that refused it would fail the first command a
/// newcomer types. A browser cannot add that header to a cross-site request
/// without a CORS preflight (which this API never grants), so a web page
/// still cannot make an operator's browser post a form here, even to a
/// gateway with no token.
pub struct Json<T>(pub T);

impl<S, T> FromRequest<S> for Json<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        let headers = req.headers();
        let declared_json = headers
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|m| {
                let m = m.trim().to_ascii_lowercase();
                m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
            })
            .unwrap_or(false);
        if declared_json {
            let axum::Json(v) = axum::Json::<T>::from_request(req, state).await?;
            return Ok(Self(v));
        }
        if !headers.contains_key(axum::http::header::AUTHORIZATION) {
            return Err(ApiError::BadRequest(
                "send the body as JSON with Content-Type: application/json".into(),
            ));
        }
        let body = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::BadRequest(e.body_text()))?;
        serde_json::from_slice(&body)
            .map(Self)
            .map_err(|e| ApiError::BadRequest(format!("the body is not the JSON expected: {e}")))
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        Self::BadRequest(r.body_text())
    }
}

/// `Query<T>` with the same treatment.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct Query<T>(pub T);

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        Self::BadRequest(r.body_text())
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}
