//! Who is calling, and what their role lets them do.
//!
//! A request's bearer token is either the configured `api.token` (role
//! `admin`, named `admin` in the audit log) or one of the API tokens in the
//! store (`/v1/api-tokens`, `furrow token`), each with a role: `read`,
//! `operate` or `admin`. Secrets are compared as SHA-256 digests, the
//! configured one in constant time; stored ones are looked up by digest, so
//! the secret itself is never kept. Without `api.token` and without a
//! bearer token, the API is open with the admin role: the configuration
//! allows that on loopback only.
//!
//! [`required_role`] is the one table of what each route needs: reading
//! needs `read`, sending commands `operate`, everything else that changes
//! something `admin`, as does reading the audit log.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::ApiState;
use crate::store::{NewAudit, Role};

/// The authenticated caller, for handlers (as a request extension) and the
/// audit log.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The token's name (`admin` for `api.token`, `local` when open).
    pub actor: String,
    /// What it may do.
    pub role: Role,
    /// The client's address.
    pub source: String,
}

impl Caller {
    /// An audit record of `action` on `target` by this caller.
    pub fn audit(&self, action: &str, target: &str, detail: serde_json::Value) -> NewAudit {
        NewAudit {
            actor: self.actor.clone(),
            source: self.source.clone(),
            action: action.to_owned(),
            target: target.to_owned(),
            detail: detail.to_string(),
        }
    }
}

/// The role a route needs, by method and route template.
pub fn required_role(method: &Method, route: &str) -> Role {
    match (method.as_str(), route) {
        ("GET", "/v1/audit") | ("GET", "/v1/api-tokens") => Role::Admin,
        ("GET" | "HEAD", _) => Role::Read,
        ("POST", "/v1/devices/{device_id}/commands") => Role::Operate,
        ("PATCH", "/v1/devices/{device_id}/state/desired") => Role::Operate,
        ("POST", "/v1/jobs" | "/v1/jobs/{job_id}/cancel") => Role::Operate,
        _ => Role::Admin,
    }
}

/// Authenticates the request and checks its role against the route.
pub async fn require_token(
    State(state): State<ApiState>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let source = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or_else(|| "unknown".to_owned(), |c| c.0.ip().to_string());
    let given = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let caller = match (given, &state.token_digest) {
        (None, None) => Caller {
            actor: "local".into(),
            role: Role::Admin,
            source,
        },
        (None, Some(_)) => return Err(ApiError::Unauthorized),
        (Some(token), configured) => {
            let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
            if configured.is_some_and(|c| bool::from(digest.ct_eq(&c))) {
                Caller {
                    actor: "admin".into(),
                    role: Role::Admin,
                    source,
                }
            } else {
                match state.store.api_token_by_hash(digest).await? {
                    Some(t) => Caller {
                        actor: t.name,
                        role: t.role,
                        source,
                    },
                    None => return Err(ApiError::Unauthorized),
                }
            }
        }
    };
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| req.uri().path().to_owned(), |m| m.as_str().to_owned());
    let needed = required_role(req.method(), &route);
    if caller.role < needed {
        return Err(ApiError::Forbidden(needed.as_str()));
    }
    req.extensions_mut().insert(caller);
    Ok(next.run(req).await)
}

/// The digest a configured token is compared through.
pub fn digest(token: &str) -> Option<[u8; 32]> {
    (!token.is_empty()).then(|| Sha256::digest(token.as_bytes()).into())
}

/// Records a change in the audit log. The change is made already: a failed
/// record is logged and counted, not turned into a failed request.
pub async fn record(state: &ApiState, entry: NewAudit) {
    if let Err(e) = state.store.record_audit(entry.clone()).await {
        metrics::counter!("furrow_audit_failures_total").increment(1);
        tracing::error!(error = %e, actor = %entry.actor, action = %entry.action,
            target = %entry.target, "cannot write the audit log");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_by_route() {
        let get = Method::GET;
        let post = Method::POST;
        assert_eq!(required_role(&get, "/v1/devices"), Role::Read);
        assert_eq!(required_role(&get, "/metrics"), Role::Read);
        assert_eq!(
            required_role(&post, "/v1/devices/{device_id}/commands"),
            Role::Operate
        );
        assert_eq!(required_role(&post, "/v1/devices"), Role::Admin);
        assert_eq!(
            required_role(&post, "/v1/devices/{device_id}/token"),
            Role::Admin
        );
        assert_eq!(required_role(&get, "/v1/audit"), Role::Admin);
        assert_eq!(required_role(&Method::DELETE, "/v1/anything"), Role::Admin);
        assert!(Role::Read < Role::Operate && Role::Operate < Role::Admin);
    }
}
