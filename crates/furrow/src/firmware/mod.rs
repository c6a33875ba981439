//! Firmware over the air: signed images, stored content-addressed, offered
//! to devices by firmware jobs and pulled by them in ranges over furrow/1
//! (docs/protocol.md, "Firmware updates").
//!
//! * here: what an image is ([`FirmwareRecord`]), the operator's Ed25519
//!   key (`furrow firmware keygen` / `sign`, [`SigningKey`]), the check of
//!   a signature, and the rules that read a device's reported state
//!   ([`outcome`], [`wants_offer`]);
//! * [`serve`]: what sessions share to serve images: the in-memory image
//!   cache and the per-job download slots of this instance;
//! * the bytes live in the store (`FirmwareStore`): SQLite keeps them as
//!   files beside its database, PostgreSQL in the database, so that every
//!   instance can serve every image.
//!
//! Signatures cover `furrow_proto::firmware_signed_message` (digest, size,
//! model, version), so an image cannot be passed off as another version.

pub mod serve;

use std::path::Path;

use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use serde::Serialize;

/// A stored firmware image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct FirmwareRecord {
    /// Hex SHA-256 of the image: its id.
    pub id: String,
    /// A name for people.
    pub name: String,
    /// The version it installs.
    pub version: String,
    /// The device model it is built for.
    pub model: String,
    /// Bytes.
    pub size: u64,
    /// Hex Ed25519 signature of the signed message.
    pub signature: String,
    /// Uploaded, Unix ms.
    pub created_ms: u64,
    /// Who uploaded it.
    pub created_by: String,
}

impl FirmwareRecord {
    /// The raw id (SHA-256), if the stored hex is well formed.
    pub fn image_id(&self) -> Option<[u8; 32]> {
        hex::decode(&self.id).ok()?.try_into().ok()
    }

    /// The raw signature, if the stored hex is well formed.
    pub fn signature_bytes(&self) -> Option<[u8; 64]> {
        hex::decode(&self.signature).ok()?.try_into().ok()
    }
}

/// What is wrong with an image, a key or a signature.
#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    /// A key file cannot be read or is not an Ed25519 PKCS#8 key.
    #[error("firmware key {path}: {why}")]
    Key {
        /// The file.
        path: String,
        /// Why.
        why: String,
    },
    /// A public key is not 64 hex digits.
    #[error("public key {0:?}: expected 64 hex digits (32 bytes)")]
    PublicKey(String),
    /// A signature is not 128 hex digits.
    #[error("signature: expected 128 hex digits (64 bytes)")]
    SignatureFormat,
    /// No trusted key verifies the signature.
    #[error("the signature does not verify with any trusted firmware key")]
    BadSignature,
    /// An upload without a signature, and no signing key to make one.
    #[error("no signature given and no firmware.signing_key_file to sign with")]
    Unsigned,
    /// Metadata breaks a rule.
    #[error("{0}")]
    Invalid(String),
    /// Reading or writing a file failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The operator's Ed25519 key pair (a PKCS#8 v2 file, as `furrow firmware
/// keygen` writes it).
pub struct SigningKey(Ed25519KeyPair);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({})", self.public_hex())
    }
}

impl SigningKey {
    /// A new key pair, as PKCS#8 document bytes to keep secret.
    pub fn generate() -> Result<Vec<u8>, FirmwareError> {
        let rng = ring::rand::SystemRandom::new();
        Ed25519KeyPair::generate_pkcs8(&rng)
            .map(|d| d.as_ref().to_vec())
            .map_err(|_| FirmwareError::Invalid("cannot generate a key pair".into()))
    }

    /// Reads a PKCS#8 key pair from bytes.
    pub fn from_pkcs8(der: &[u8], origin: &str) -> Result<Self, FirmwareError> {
        Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map(Self)
            .map_err(|e| FirmwareError::Key {
                path: origin.to_owned(),
                why: format!("not an Ed25519 PKCS#8 key ({e})"),
            })
    }

    /// Reads a key file.
    pub fn load(path: &Path) -> Result<Self, FirmwareError> {
        let der = std::fs::read(path).map_err(|e| FirmwareError::Key {
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
        Self::from_pkcs8(&der, &path.display().to_string())
    }

    /// The public key, raw.
    pub fn public(&self) -> [u8; 32] {
        let mut k = [0u8; 32];
        k.copy_from_slice(self.0.public_key().as_ref());
        k
    }

    /// The public key as 64 hex digits (what devices are built with).
    pub fn public_hex(&self) -> String {
        hex::encode(self.public())
    }

    /// Signs an image's metadata.
    pub fn sign(&self, image: &[u8; 32], size: u64, model: &str, version: &str) -> [u8; 64] {
        let msg = furrow_proto::firmware_signed_message(image, size, model, version);
        let mut s = [0u8; 64];
        s.copy_from_slice(self.0.sign(&msg).as_ref());
        s
    }
}

/// Parses a hex Ed25519 public key.
pub fn parse_public_key(hex_key: &str) -> Result<[u8; 32], FirmwareError> {
    hex::decode(hex_key.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| FirmwareError::PublicKey(hex_key.to_owned()))
}

/// Parses a hex signature.
pub fn parse_signature(hex_sig: &str) -> Result<[u8; 64], FirmwareError> {
    hex::decode(hex_sig.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(FirmwareError::SignatureFormat)
}

/// Whether `signature` over the image's metadata verifies with `key`.
pub fn verify(
    key: &[u8; 32],
    signature: &[u8; 64],
    image: &[u8; 32],
    size: u64,
    model: &str,
    version: &str,
) -> bool {
    let msg = furrow_proto::firmware_signed_message(image, size, model, version);
    UnparsedPublicKey::new(&ED25519, key)
        .verify(&msg, signature)
        .is_ok()
}

/// Checks a name, model or version: 1 to 64 printable characters.
pub fn check_label(what: &str, v: &str) -> Result<(), FirmwareError> {
    if v.is_empty() || v.len() > 64 || v.chars().any(|c| c.is_control()) {
        return Err(FirmwareError::Invalid(format!(
            "{what}: 1 to 64 bytes without control characters"
        )));
    }
    Ok(())
}

/// The states a device reports for an update (`firmware.update.state`).
pub const STATES: [&str; 6] = [
    "downloading",
    "downloaded",
    "verified",
    "installing",
    "installed",
    "failed",
];

/// What a device's reported state says about the update to `image`
/// installing `version`: its `firmware.version` (the firmware it runs) and
/// the state of `firmware.update` if that is about this image.
pub fn progress<'a>(
    reported: &'a serde_json::Value,
    image: &str,
) -> (Option<&'a str>, Option<&'a str>) {
    let fw = reported.get("firmware");
    let running = fw.and_then(|f| f.get("version")).and_then(|v| v.as_str());
    let update = fw
        .and_then(|f| f.get("update"))
        .filter(|u| u.get("image").and_then(|i| i.as_str()) == Some(image))
        .and_then(|u| u.get("state"))
        .and_then(|s| s.as_str());
    (running, update)
}

/// Whether the gateway should offer `image` to a device whose reported
/// document is `reported`: not once it runs `version`, nor once it has the
/// image verified (or is installing it, or failed it): an offer then would
/// only make it fetch or install again.
pub fn wants_offer(reported: &serde_json::Value, image: &str, version: &str) -> bool {
    match progress(reported, image) {
        (Some(v), _) if v == version => false,
        (_, Some("verified" | "installing" | "installed" | "failed")) => false,
        _ => true,
    }
}

/// What a firmware job's device becomes: succeeded once it runs `version`,
/// failed once it reports `failed` for the image; timed out past the
/// device timeout after its start, or past the job's deadline.
pub fn outcome(
    reported: &serde_json::Value,
    image: &str,
    version: &str,
    started_ms: u64,
    job: &crate::jobs::JobRecord,
    now_ms: u64,
) -> Option<crate::jobs::DeviceState> {
    use crate::jobs::DeviceState;
    match progress(reported, image) {
        (Some(v), _) if v == version => Some(DeviceState::Succeeded),
        (_, Some("failed")) => Some(DeviceState::Failed),
        _ if now_ms >= started_ms.saturating_add(job.device_timeout_ms)
            || now_ms >= job.deadline_ms =>
        {
            Some(DeviceState::TimedOut)
        }
        _ => None,
    }
}

/// What the API needs to take uploads (`[firmware]`).
#[derive(Debug)]
pub struct Uploads {
    /// Largest image.
    pub max_image_bytes: u64,
    /// Signs uploads that bring no signature.
    pub signing: Option<SigningKey>,
    /// Keys whose signatures uploads may carry (the signing key's too).
    pub trusted: Vec<[u8; 32]>,
    /// Where uploads are written while they arrive (`firmware/` in the
    /// data directory, beside SQLite's images, so a rename places them).
    pub staging: std::path::PathBuf,
    /// A job's `max_downloads` when it does not say.
    pub max_downloads: u32,
}

impl Uploads {
    /// The settings of `cfg`; fails on a key that cannot be used.
    pub fn from_config(cfg: &crate::Config) -> Result<Self, FirmwareError> {
        let fw = &cfg.firmware;
        let signing = if fw.signing_key_file.as_os_str().is_empty() {
            None
        } else {
            Some(SigningKey::load(&fw.signing_key_file)?)
        };
        let mut trusted = fw
            .trusted_keys
            .iter()
            .map(|k| parse_public_key(k))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(k) = &signing {
            trusted.push(k.public());
        }
        Ok(Self {
            max_image_bytes: fw.max_image_bytes,
            signing,
            trusted,
            staging: cfg.data_dir.join("firmware"),
            max_downloads: fw.max_downloads,
        })
    }

    /// Whether `signature` verifies with a trusted key.
    pub fn trusts(
        &self,
        signature: &[u8; 64],
        image: &[u8; 32],
        size: u64,
        model: &str,
        version: &str,
    ) -> bool {
        self.trusted
            .iter()
            .any(|k| verify(k, signature, image, size, model, version))
    }
}

/// A firmware job's part for one device: what to offer it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// The job.
    pub job: u64,
    /// The image's id (hex SHA-256).
    pub image: String,
    /// The version it installs.
    pub version: String,
    /// Devices of this job downloading at once on one instance.
    pub max_downloads: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_signature_covers_the_metadata() {
        let key = SigningKey::from_pkcs8(&SigningKey::generate().unwrap(), "test").unwrap();
        let img = [7u8; 32];
        let sig = key.sign(&img, 100, "p7", "1.1.0");
        assert!(verify(&key.public(), &sig, &img, 100, "p7", "1.1.0"));
        assert!(!verify(&key.public(), &sig, &img, 100, "p7", "1.1.1"));
        assert!(!verify(&key.public(), &sig, &img, 101, "p7", "1.1.0"));
        let other = SigningKey::from_pkcs8(&SigningKey::generate().unwrap(), "test").unwrap();
        assert!(!verify(&other.public(), &sig, &img, 100, "p7", "1.1.0"));
        assert_eq!(parse_public_key(&key.public_hex()).unwrap(), key.public());
        assert!(parse_public_key("abc").is_err());
    }

    #[test]
    fn the_reported_state_decides() {
        let job = crate::jobs::JobRecord {
            id: 1,
            status: crate::jobs::JobStatus::Running,
            target: crate::jobs::Target::Devices(vec![]),
            operation: crate::jobs::Operation::Desired { patch: "{}".into() },
            rate_per_min: 0,
            abort: None,
            device_timeout_ms: 1000,
            deadline_ms: 100_000,
            created_by: "t".into(),
            created_ms: 0,
            updated_ms: 0,
            finished_ms: None,
            reason: None,
            started: 0,
            counts: crate::jobs::Counts::default(),
        };
        let none = json!({});
        assert!(wants_offer(&none, "aa", "2"));
        assert_eq!(outcome(&none, "aa", "2", 0, &job, 10), None);
        let downloading = json!({"firmware": {"version": "1", "update": {"image": "aa", "state": "downloading", "percent": 40}}});
        assert!(wants_offer(&downloading, "aa", "2"));
        let verified =
            json!({"firmware": {"version": "1", "update": {"image": "aa", "state": "verified"}}});
        assert!(!wants_offer(&verified, "aa", "2"));
        // Another image's state says nothing about this one.
        assert!(wants_offer(&verified, "bb", "2"));
        let failed = json!({"firmware": {"version": "1", "update": {"image": "aa", "state": "failed", "reason": "x"}}});
        assert_eq!(
            outcome(&failed, "aa", "2", 0, &job, 10),
            Some(crate::jobs::DeviceState::Failed)
        );
        let done =
            json!({"firmware": {"version": "2", "update": {"image": "aa", "state": "installed"}}});
        assert!(!wants_offer(&done, "aa", "2"));
        assert_eq!(
            outcome(&done, "aa", "2", 0, &job, 10),
            Some(crate::jobs::DeviceState::Succeeded)
        );
        assert_eq!(
            outcome(&downloading, "aa", "2", 0, &job, job.device_timeout_ms),
            Some(crate::jobs::DeviceState::TimedOut)
        );
    }
}
