//! Devices: who they are ([`auth`]: tokens, stored only as hashes), which
//! session holds each one ([`registry`]: takeover, wake-ups), the state
//! they are asked to have and report ([`state`]: documents, versions,
//! merge patches), and
//! provisioning shared by the CLI and the HTTP API (here: a new device
//! gets a fresh token, shown once).

pub mod auth;
pub mod registry;
pub mod state;

use std::time::Duration;

use furrow_proto::message::valid_device_id;

use crate::devices::auth::{generate_token, hash_token};
use crate::store::prelude::*;
use crate::store::StoreError;

/// Why a device could not be provisioned.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The id breaks furrow/1's rules.
    #[error("invalid device id {0:?}: use 1 to 128 characters of A-Z a-z 0-9 . _ : -")]
    InvalidId(String),
    /// The store refused.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Creates a device and returns its token (the only time it is visible).
pub async fn add_device(store: &dyn Store, device_id: &str) -> Result<String, ProvisionError> {
    if !valid_device_id(device_id.as_bytes()) {
        return Err(ProvisionError::InvalidId(device_id.to_owned()));
    }
    let token = generate_token();
    store
        .create_device(device_id, hash_token(token.as_bytes()))
        .await?;
    Ok(token)
}

/// Gives a device a fresh token and returns it (the only time it is
/// visible). The old token keeps opening the device for `grace` (or until
/// the device first authenticates with the new one); with no grace it
/// stops working at the device's next handshake. A live connection is not
/// cut either way.
pub async fn rotate_token(
    store: &dyn Store,
    device_id: &str,
    grace: Duration,
) -> Result<Rotation, ProvisionError> {
    let token = generate_token();
    let previous_until_ms = (!grace.is_zero()).then(|| {
        crate::clock::now_ms().saturating_add(u64::try_from(grace.as_millis()).unwrap_or(u64::MAX))
    });
    store
        .rotate_token(device_id, hash_token(token.as_bytes()), previous_until_ms)
        .await?;
    Ok(Rotation {
        token,
        previous_until_ms,
    })
}

/// A rotation's outcome.
#[derive(Debug, Clone)]
pub struct Rotation {
    /// The new token (shown once).
    pub token: String,
    /// Until when (Unix ms) the old token still works, if at all.
    pub previous_until_ms: Option<u64>,
}
