//! Storage: the [`Store`] trait the gateway talks to, and its backends.
//!
//! Sessions never see a backend: they hand records to the
//! [`writer`](crate::writer), which calls [`TelemetryStore::append`] with a whole
//! group-commit batch. A backend must make a batch durable (under its
//! durability setting) before `append` returns, and must store a
//! `(device, seq)` pair at most once even when asked twice: the gateway
//! deduplicates in memory, and the backend's per-device watermark (the
//! highest stored seq) is the second line.
//!
//! Backends: [`sqlite`] (embedded, the default: one instance) and
//! [`postgres`] (several instances sharing one database). Both pass the
//! same conformance tests (`tests/store_conformance.rs`).

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::devices::state::{StateError, StateLimits, StateRow};
use crate::firmware::{Assignment, FirmwareRecord};
use crate::jobs::{DeviceState, JobDevice, JobRecord, NewJob, TagError, Tags};

#[cfg(feature = "postgres")]
pub mod postgres;
mod sql;
#[cfg(feature = "sqlite")]
pub mod sqlite;

#[cfg(feature = "postgres")]
pub use postgres::{PostgresOptions, PostgresStore};
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteStore;

/// SQLite's `synchronous` setting for the database (a setting whether or
/// not this build has SQLite, so that one configuration file fits all).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// fsync on every commit: an ACK survives a power cut (the default).
    Full,
    /// WAL is synced at checkpoints only: an ACK survives a process crash
    /// but the last commits may be lost on power failure.
    Normal,
    /// No fsync at all: for benchmarks and throwaway data.
    Off,
}

impl FromStr for Synchronous {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "full" => Ok(Self::Full),
            "normal" => Ok(Self::Normal),
            "off" => Ok(Self::Off),
            _ => Err(format!("expected full, normal or off, got {s:?}")),
        }
    }
}

/// A device's internal key in the store (stable, compact; not its name).
pub type DeviceKey = i64;

/// One reading on its way to storage.
#[derive(Debug, Clone)]
pub struct TelemetryRecord {
    /// Which device.
    pub device: DeviceKey,
    /// The device's seq.
    pub seq: u64,
    /// Device clock, or the receive time when the device sent 0.
    pub timestamp_ms: u64,
    /// When the gateway read the frame.
    pub received_ms: u64,
    /// Content type byte (validated).
    pub content_type: u8,
    /// The payload, a slice of the connection's read buffer.
    pub payload: Bytes,
}

/// One REPORT on its way to storage: a merge patch of the device's
/// reported state, applied in the same transaction as the telemetry of its
/// batch (so it is ACKed like telemetry, only once stored).
#[derive(Debug, Clone)]
pub struct ReportRecord {
    /// Which device.
    pub device: DeviceKey,
    /// The device's seq (its TELEMETRY sequence).
    pub seq: u64,
    /// Device clock of the change, or the receive time when it sent 0.
    pub timestamp_ms: u64,
    /// When the gateway read the frame.
    pub received_ms: u64,
    /// The patch (a JSON object, checked by the session).
    pub patch: Bytes,
    /// The limits the document it makes must keep.
    pub limits: StateLimits,
}

/// One group commit: readings to store, and per-device rejection
/// watermarks to record with them.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// Readings, each stored once.
    pub records: Vec<TelemetryRecord>,
    /// `(device, seq)`: the device's highest rejected seq is now at least
    /// `seq`. A rejected seq stays *taken* (furrow/1): after a reconnect or
    /// a restart, the same seq is a duplicate, never stored.
    pub rejections: Vec<(DeviceKey, u64)>,
    /// State reports, in each device's seq order, each applied once.
    pub reports: Vec<ReportRecord>,
}

/// A REPORT the commit refused (the document it would make is over a
/// limit): the device gets REJECT for it before the ACK that covers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Which device.
    pub device: DeviceKey,
    /// The REPORT's seq.
    pub seq: u64,
    /// REJECT code.
    pub code: furrow_proto::ErrorCode,
    /// Why, for the REJECT's reason.
    pub reason: String,
}

/// What a commit did besides storing: the reports it refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Appended {
    /// Refused reports (usually none).
    pub refused: Vec<Refused>,
}

impl Refused {
    /// A report `apply_report` refused.
    pub(crate) fn of(r: &ReportRecord, e: &StateError) -> Self {
        Self {
            device: r.device,
            seq: r.seq,
            code: if e.is_limit() {
                furrow_proto::ErrorCode::StateTooLarge
            } else {
                furrow_proto::ErrorCode::InvalidPayload
            },
            reason: e.to_string(),
        }
    }
}

/// One applied REPORT, as kept in a device's state history.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct StateChange {
    /// Increasing id (the history's cursor).
    pub id: u64,
    /// The REPORT's seq.
    pub seq: u64,
    /// The reported version it made.
    pub version: u64,
    /// Device clock of the change, Unix ms.
    pub at_ms: u64,
    /// When the gateway received it, Unix ms.
    pub received_ms: u64,
    /// The merge patch, JSON.
    pub patch: String,
}

/// A device's sequence watermarks in the store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceSeqs {
    /// Highest stored seq (WELCOME's `last_seq`), 0 if none.
    pub stored: u64,
    /// Highest rejected seq, 0 if none.
    pub rejected: u64,
}

/// A stored reading, read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTelemetry {
    /// The device's seq.
    pub seq: u64,
    /// Device clock (or receive time when unknown), Unix ms.
    pub timestamp_ms: u64,
    /// Receive time, Unix ms.
    pub received_ms: u64,
    /// Content type byte.
    pub content_type: u8,
    /// The payload.
    pub payload: Vec<u8>,
}

/// Which stored readings to read back: both bounds inclusive, all given
/// bounds must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TelemetryRange {
    /// Lowest seq.
    pub from_seq: u64,
    /// Highest seq.
    pub to_seq: u64,
    /// Earliest timestamp (device clock, or receive time), Unix ms.
    pub from_ms: u64,
    /// Latest timestamp, Unix ms.
    pub to_ms: u64,
}

impl Default for TelemetryRange {
    fn default() -> Self {
        // Seqs and times are stored as i64: the bounds stay within it.
        Self {
            from_seq: 0,
            to_seq: i64::MAX as u64,
            from_ms: 0,
            to_ms: i64::MAX as u64,
        }
    }
}

/// What HELLO needs to know about a device.
#[derive(Debug, Clone)]
pub struct DeviceAuth {
    /// Internal key.
    pub key: DeviceKey,
    /// SHA-256 of the token.
    pub token_hash: [u8; 32],
    /// Whether the device was revoked.
    pub revoked: bool,
    /// The token before the last rotation, while it is still accepted.
    pub previous: Option<PreviousToken>,
}

/// A row's previous token, if it has one of the right size.
pub(crate) fn previous_token(
    hash: Option<Vec<u8>>,
    until_ms: Option<i64>,
) -> Option<PreviousToken> {
    Some(PreviousToken {
        hash: hash?.try_into().ok()?,
        until_ms: u64::try_from(until_ms?).unwrap_or(0),
    })
}

/// The name of the command that hands a device its new token (the SDK
/// answers it itself): `{"token": "<64 hex>"}`.
pub const TOKEN_COMMAND: &str = "furrow.token";

/// A rotated-out token in its grace period: accepted until `until_ms`, or
/// until the device first authenticates with its new token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreviousToken {
    /// SHA-256 of the old token.
    pub hash: [u8; 32],
    /// Unix ms after which it no longer opens the device.
    pub until_ms: u64,
}

/// A device as listed to operators.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeviceInfo {
    /// The device id.
    pub device_id: String,
    /// Creation time, Unix ms.
    pub created_ms: u64,
    /// Revocation time, Unix ms, if revoked.
    pub revoked_ms: Option<u64>,
    /// Highest stored seq, 0 if none.
    pub last_seq: u64,
    /// When the reading with that seq was received, Unix ms, if any.
    pub last_seen_ms: Option<u64>,
}

/// Where a command is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommandState {
    /// Stored, not yet sent.
    Queued,
    /// Sent to the device (again after each reconnect until answered).
    Delivered,
    /// COMMAND_RESULT status 0.
    Succeeded,
    /// COMMAND_RESULT status 1 (failed) or 2 (unknown command).
    Failed,
    /// Its time to live ran out before an answer.
    Expired,
    /// The device was revoked before an answer.
    Cancelled,
}

impl CommandState {
    /// Lower-case name, as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Delivered => "delivered",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Expired => "expired",
            Self::Cancelled => "cancelled",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => Self::Queued,
            "delivered" => Self::Delivered,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "expired" => Self::Expired,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }

    /// Whether the command may still be delivered and answered.
    pub fn is_open(self) -> bool {
        matches!(self, Self::Queued | Self::Delivered)
    }
}

/// A new command.
#[derive(Debug, Clone)]
pub struct NewCommand {
    /// Its name.
    pub name: String,
    /// Content type byte of the payload (validated).
    pub content_type: u8,
    /// Arguments.
    pub payload: Vec<u8>,
    /// When it expires, Unix ms.
    pub expires_ms: u64,
}

/// The device's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutcome {
    /// COMMAND_RESULT status byte (0 succeeded, 1 failed, 2 unknown).
    pub status: u8,
    /// Content type byte of the result.
    pub content_type: u8,
    /// Result data.
    pub payload: Vec<u8>,
}

/// A stored command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandRecord {
    /// Its id (the wire's command_id).
    pub id: u64,
    /// The device.
    pub device_id: String,
    /// Its name.
    pub name: String,
    /// Content type byte of the payload.
    pub content_type: u8,
    /// Arguments.
    pub payload: Vec<u8>,
    /// Where it is.
    pub state: CommandState,
    /// Created, Unix ms.
    pub created_ms: u64,
    /// Expires, Unix ms.
    pub expires_ms: u64,
    /// Last change, Unix ms.
    pub updated_ms: u64,
    /// The device's answer, once there is one.
    pub outcome: Option<CommandOutcome>,
}

impl StoreError {
    /// A backend's own error, under the backend's name.
    pub(crate) fn backend(
        backend: &'static str,
        e: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        StoreError::Backend {
            backend,
            error: Box::new(e),
        }
    }
}

/// How the store keeps telemetry, for operators (`GET /v1/storage`).
/// `None`: the backend does not have or report it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StorageInfo {
    /// `sqlite` or `postgresql`.
    pub backend: &'static str,
    /// Readings older than this are dropped, a chunk at a time (0: never).
    pub retention_ms: u64,
    /// Oldest chunks go while the database is larger (0: no cap).
    pub max_bytes: u64,
    /// Telemetry waits while the filesystem has less free space (0: off).
    pub min_free_bytes: u64,
    /// Time span of one chunk.
    pub chunk_span_ms: Option<u64>,
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
}

/// A backend's own error, boxed.
pub type BackendError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error and its causes, `a: b: c`.
fn chain(e: &BackendError) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let next = c.to_string();
        // Some errors repeat their cause in their own message.
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        cause = c.source();
    }
    text
}

/// Storage failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database said no, or the connection to it failed. This type
    /// names no backend's types, so that each backend can be built or left
    /// out on its own. The message carries the backend error's own causes
    /// (tokio-postgres says only "db error" and keeps what the server said
    /// in its source), so that every log line that prints it says why.
    #[error("{backend}: {}", chain(.error))]
    Backend {
        /// `sqlite` or `postgres`.
        backend: &'static str,
        /// The backend's error (downcast to its type for details).
        error: BackendError,
    },
    /// No database connection could be had in time.
    #[error("postgres pool: {0}")]
    Pool(String),
    /// A batched statement failed, and with it every request in the batch.
    #[error("{0}")]
    Batch(std::sync::Arc<StoreError>),
    /// The database URL or settings are unusable.
    #[error("database settings: {0}")]
    Config(String),
    /// The database file or its folder cannot be used.
    #[error("cannot use database at {path}")]
    Open {
        /// The path tried.
        path: std::path::PathBuf,
        /// Why.
        source: BackendError,
    },
    /// An image with these bytes is stored already.
    #[error("firmware image {0} exists already")]
    FirmwareExists(String),
    /// An active job rolls this image out.
    #[error("firmware image {0} is used by an active job")]
    FirmwareInUse(String),
    /// A device with this id exists already.
    #[error("device {0:?} already exists")]
    DeviceExists(String),
    /// No device with this id.
    #[error("no device {0:?}")]
    NoSuchDevice(String),
    /// The device is revoked.
    #[error("device {0:?} is revoked")]
    Revoked(String),
    /// An API token by that name exists already.
    #[error("API token {0:?} already exists")]
    TokenExists(String),
    /// No API token by that name.
    #[error("no API token {0:?}")]
    NoSuchToken(String),
    /// A blocking task died (panicked or was cancelled).
    #[error("storage task failed: {0}")]
    Task(String),
    /// The database's filesystem has less free space than the floor.
    #[error("{free} bytes free on the database's filesystem, below storage.min_free_bytes ({floor}): telemetry waits until space returns")]
    DiskLow {
        /// Free bytes (for unprivileged users).
        free: u64,
        /// The floor.
        floor: u64,
    },
    /// Stored data failed a consistency check.
    #[error("stored data is damaged: {0}")]
    Corrupt(String),
    /// A file or folder beside the database (its lock file, its
    /// filesystem) cannot be used.
    #[error("cannot use {path}")]
    Io {
        /// The file or folder.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Another gateway process ingests into this database already.
    #[error("another furrow gateway is storing into {0} (its lock file is held)")]
    InUse(std::path::PathBuf),
    /// A state change was refused (a limit, or `If-Match`).
    #[error(transparent)]
    State(#[from] StateError),
    /// Tags or a selector were refused.
    #[error(transparent)]
    Tag(#[from] TagError),
    /// A job cannot be created as asked (no devices, say).
    #[error("{0}")]
    Job(String),
    /// The schema in the database is newer than this binary knows.
    #[error("database schema version {found} is newer than this gateway supports ({supported})")]
    SchemaTooNew {
        /// Version in the file.
        found: i64,
        /// Newest version this build knows.
        supported: i64,
    },
}

/// Telemetry: group commits from the writer, reads for the API and HELLO.
#[async_trait]
pub trait TelemetryStore: Send + Sync + 'static {
    /// records arrive in increasing seq order.
    async fn append(&self, batch: Arc<Batch>) -> Result<Appended, StoreError>;

    /// A device's highest stored and highest rejected seqs.
    async fn device_seqs(&self, device: DeviceKey) -> Result<DeviceSeqs, StoreError>;

    /// `limit`.
    async fn telemetry(
        &self,
        device_id: &str,
        range: TelemetryRange,
        limit: u32,
    ) -> Result<Vec<StoredTelemetry>, StoreError>;

    /// How the store keeps telemetry, for operators.
    async fn storage_info(&self) -> Result<StorageInfo, StoreError>;
}

/// How many devices there are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceCounts {
    /// Provisioned, revoked ones included.
    pub total: u64,
    /// Revoked.
    pub revoked: u64,
}

/// Devices: provisioning, authentication, revocation.
#[async_trait]
pub trait DeviceStore: Send + Sync + 'static {
    /// Looks a device up for authentication.
    async fn device_auth(&self, device_id: &str) -> Result<Option<DeviceAuth>, StoreError>;

    /// Registers a device with the hash of its token.
    async fn create_device(&self, device_id: &str, token_hash: [u8; 32]) -> Result<(), StoreError>;

    /// How many devices are provisioned, and how many of them are revoked.
    async fn count_devices(&self) -> Result<DeviceCounts, StoreError>;

    /// Lists devices in id order, after `after` (exclusive), at most `limit`.
    async fn list_devices(
        &self,
        after: Option<String>,
        limit: u32,
    ) -> Result<Vec<DeviceInfo>, StoreError>;

    /// One device, by id.
    async fn device(&self, device_id: &str) -> Result<Option<DeviceInfo>, StoreError>;

    /// Gives a device a new token hash (effective at its next handshake).
    /// With `previous_until_ms`, the token it replaces stays accepted until
    /// then (or until the device first uses the new one); without, it stops
    /// working at once. [`StoreError::NoSuchDevice`] if unknown.
    async fn rotate_token(
        &self,
        device_id: &str,
        token_hash: [u8; 32],
        previous_until_ms: Option<u64>,
    ) -> Result<(), StoreError>;

    /// The device authenticated with its current token `token_hash`: the
    /// previous one stops working now (unless the token changed again
    /// meanwhile), and its `furrow.token` commands, which held the new
    /// token, are cancelled if still open and their payloads become `{}`.
    async fn forget_previous_token(
        &self,
        key: DeviceKey,
        token_hash: [u8; 32],
    ) -> Result<(), StoreError>;

    /// Returns false if it was revoked already.
    async fn revoke_device(&self, device_id: &str) -> Result<bool, StoreError>;

    /// order. Gateways poll this to disconnect devices revoked elsewhere.
    async fn revocations_since(&self, cursor: i64) -> Result<Vec<(i64, String)>, StoreError>;
}

/// Commands: from creation through delivery to their outcome.
#[async_trait]
pub trait CommandStore: Send + Sync + 'static {
    /// if unknown; [`StoreError::Revoked`] if revoked.
    async fn create_command(
        &self,
        device_id: &str,
        cmd: NewCommand,
    ) -> Result<CommandRecord, StoreError>;

    /// One command.
    async fn command(&self, id: u64) -> Result<Option<CommandRecord>, StoreError>;

    /// when `None`), at most `limit`.
    async fn commands_of(
        &self,
        device_id: &str,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<CommandRecord>, StoreError>;

    /// first: what a session must (re)send.
    async fn open_commands(&self, device: DeviceKey) -> Result<Vec<CommandRecord>, StoreError>;

    /// Marks queued commands delivered; returns those that changed.
    async fn mark_delivered(&self, ids: Vec<u64>) -> Result<Vec<CommandRecord>, StoreError>;

    /// already answered id.
    async fn complete_command(
        &self,
        device: DeviceKey,
        id: u64,
        outcome: CommandOutcome,
    ) -> Result<Option<CommandRecord>, StoreError>;

    /// new ones); returns them.
    async fn cancel_open_commands(&self, device_id: &str)
        -> Result<Vec<CommandRecord>, StoreError>;

    /// Expires open commands whose time ran out by `now_ms`; returns them.
    async fn expire_commands(&self, now_ms: u64) -> Result<Vec<CommandRecord>, StoreError>;
}

/// What an API token may do. Ordered: each role may do what the ones
/// before it may.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read anything (dashboards, monitoring).
    Read,
    /// Also send commands to devices.
    Operate,
    /// Also manage devices, their tokens and API tokens, and read the
    /// audit log.
    Admin,
}

impl Role {
    /// Lower-case name, as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Operate => "operate",
            Self::Admin => "admin",
        }
    }

    /// Parses a stored or given name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "read" => Self::Read,
            "operate" => Self::Operate,
            "admin" => Self::Admin,
            _ => return None,
        })
    }
}

/// An API token as listed (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ApiToken {
    /// Its name, unique (who the audit log says acted).
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// When it was created, Unix ms.
    pub created_ms: u64,
    /// When it was revoked, if it was.
    pub revoked_ms: Option<u64>,
}

/// A change to record in the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAudit {
    /// Who: an API token's name, `admin` (the configured `api.token`),
    /// `local` (the API on loopback without a token) or `cli:<user>`.
    pub actor: String,
    /// From where: the client's address, or `cli`.
    pub source: String,
    /// What: `device.create`, `device.revoke`, `device.rotate_token`,
    /// `command.create`, `api_token.create`, `api_token.revoke`.
    pub action: String,
    /// On what: a device id or an API token's name.
    pub target: String,
    /// Details, JSON (never a secret).
    pub detail: String,
}

/// A recorded change.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuditEntry {
    /// Its id, increasing.
    pub id: u64,
    /// When, Unix ms.
    pub at_ms: u64,
    /// Who.
    pub actor: String,
    /// From where.
    pub source: String,
    /// What.
    pub action: String,
    /// On what.
    pub target: String,
    /// Details, JSON.
    pub detail: String,
}

/// Operator API tokens and the audit log.
#[async_trait]
pub trait AdminStore: Send + Sync + 'static {
    /// Registers an API token by the hash of its secret.
    /// [`StoreError::TokenExists`] if the name is taken (revoked or not).
    async fn create_api_token(
        &self,
        name: &str,
        role: Role,
        token_hash: [u8; 32],
    ) -> Result<ApiToken, StoreError>;

    /// Every API token, by name.
    async fn api_tokens(&self) -> Result<Vec<ApiToken>, StoreError>;

    /// The token whose secret hashes to `token_hash`, unless revoked.
    async fn api_token_by_hash(&self, token_hash: [u8; 32])
        -> Result<Option<ApiToken>, StoreError>;

    /// Revokes a token; false if it was already. [`StoreError::NoSuchToken`]
    /// if unknown.
    async fn revoke_api_token(&self, name: &str) -> Result<bool, StoreError>;

    /// Appends to the audit log.
    async fn record_audit(&self, entry: NewAudit) -> Result<(), StoreError>;

    /// The audit log, newest first, before id `before` (exclusive), at most
    /// `limit`.
    async fn audit(&self, before: Option<u64>, limit: u32) -> Result<Vec<AuditEntry>, StoreError>;
}

/// Device state: desired (operators), reported (devices, through the
/// writer's batches), the device's confirmations, the history of reports.
/// The rules are `devices::state`'s; a backend only keeps the rows.
#[async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// A device's state (an empty one if never set); `None` if no such
    /// device.
    async fn device_state(&self, device_id: &str) -> Result<Option<StateRow>, StoreError>;

    /// The same, by key (for the device's session).
    async fn state_of(&self, device: DeviceKey) -> Result<StateRow, StoreError>;

    /// Merges `patch` into the desired document, atomically, if the
    /// version is still `if_match` (when given):
    /// [`StateError::VersionMismatch`] otherwise, [`StoreError::NoSuchDevice`]
    /// if unknown. Returns the new row.
    async fn patch_desired(
        &self,
        device_id: &str,
        patch: serde_json::Map<String, serde_json::Value>,
        if_match: Option<u64>,
        limits: StateLimits,
    ) -> Result<StateRow, StoreError>;

    /// The device confirmed desired `version` (never beyond the current
    /// one, never backwards).
    async fn ack_desired(&self, device: DeviceKey, version: u64) -> Result<(), StoreError>;

    /// Applied reports of a device, newest first, before id `before`, at
    /// most `limit` (kept as long as telemetry).
    async fn state_history(
        &self,
        device_id: &str,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<StateChange>, StoreError>;
}

/// One tick of a job (see `jobs`): what changed.
#[derive(Debug, Clone)]
pub struct JobTick {
    /// The job after the tick.
    pub job: JobRecord,
    /// Whether its status changed in this tick.
    pub status_changed: bool,
    /// Devices started in this tick (their sessions are to be woken).
    pub started: Vec<String>,
    /// Devices whose state changed in this tick.
    pub changed: Vec<JobDevice>,
    /// The tick stopped at [`TickScope::max_devices`]: tick again with
    /// [`TickScope::after`] set to this to go on where it stopped.
    pub more: Option<i64>,
}

/// What part of a job one call of [`FleetStore::tick_job`] looks at.
///
/// A tick is cut into slices of at most `max_devices` devices, each its
/// own transaction, so that on SQLite, where a tick holds the one writer,
/// telemetry commits queued behind it wait for one slice, never for the
/// whole of a rollout that starts or finishes a thousand devices at once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TickScope {
    /// A firmware job's devices that have not reported since the job last
    /// looked at them (and are not due to time out) are skipped; false
    /// looks at all of them.
    pub changed_only: bool,
    /// Only in-progress devices after this one (the `more` of the slice
    /// before) are looked at; `None`: from the first.
    pub after: Option<i64>,
    /// Devices looked at or started in this slice at most (0: no limit).
    pub max_devices: usize,
}

impl TickScope {
    /// Every device, in one slice.
    pub fn all() -> Self {
        Self::default()
    }

    /// Devices that reported since the last look (see `changed_only`),
    /// in one slice.
    pub fn changed() -> Self {
        Self {
            changed_only: true,
            ..Self::default()
        }
    }

    /// Whether a slice that looked at `looked` devices is full: the job's
    /// next step waits for the slices after it.
    pub fn full(&self, looked: usize) -> bool {
        self.max_devices > 0 && looked >= self.max_devices
    }

    /// Of `n` devices due to start, how many a slice that looked at
    /// `looked` may start, and, when not all of them, where the next slice
    /// goes on (past every in-progress device: it only starts more).
    pub fn room(&self, n: u64, looked: usize) -> (u64, Option<i64>) {
        let room = match self.max_devices {
            0 => n,
            max => n.min(max.saturating_sub(looked) as u64),
        };
        (room, (room < n).then_some(i64::MAX))
    }
}

/// What a backend's tick returns inside its transaction: the job after
/// it, whether its status changed, the keys of the devices started and
/// changed, and where the next slice starts (if one is due).
pub(crate) type Ticked = (
    JobRecord,
    bool,
    Vec<i64>,
    Vec<(i64, DeviceState)>,
    Option<i64>,
);

/// Fleets: device tags and selectors, and jobs over them.
#[async_trait]
pub trait FleetStore: Send + Sync + 'static {
    /// Changes a device's tags (`Some`: set, `None`: remove) and returns
    /// them all. [`StoreError::NoSuchDevice`] if unknown.
    async fn set_tags(
        &self,
        device_id: &str,
        changes: BTreeMap<String, Option<String>>,
    ) -> Result<Tags, StoreError>;

    /// Tags of these devices (devices without tags are absent).
    async fn tags_of(&self, device_ids: &[String]) -> Result<BTreeMap<String, Tags>, StoreError>;

    /// Devices carrying every tag of `selector`, in id order after `after`,
    /// at most `limit`.
    async fn select_devices(
        &self,
        selector: &Tags,
        after: Option<String>,
        limit: u32,
    ) -> Result<Vec<DeviceInfo>, StoreError>;

    /// Creates a job over its target's devices (resolved now).
    async fn create_job(&self, job: NewJob) -> Result<JobRecord, StoreError>;

    /// One job.
    async fn job(&self, id: u64) -> Result<Option<JobRecord>, StoreError>;

    /// Jobs, newest first, before id `before`, at most `limit`.
    async fn jobs(&self, before: Option<u64>, limit: u32) -> Result<Vec<JobRecord>, StoreError>;

    /// A job's devices in rollout order, in `state` if given, after the
    /// device id `after` (in that order), at most `limit`.
    async fn job_devices(
        &self,
        id: u64,
        state: Option<DeviceState>,
        after: Option<String>,
        limit: u32,
    ) -> Result<Vec<JobDevice>, StoreError>;

    /// Cancels a running job: nothing more starts, devices whose operation
    /// has not reached them are cancelled. `None` if no such job; a job
    /// already stopped is returned unchanged.
    async fn cancel_job(&self, id: u64, now_ms: u64) -> Result<Option<JobRecord>, StoreError>;

    /// Jobs with anything left to do or to follow.
    async fn active_jobs(&self) -> Result<Vec<u64>, StoreError>;

    /// Advances a job (see `jobs`), in one transaction with the job
    /// locked; `None` if it is not active or another instance holds it.
    /// `scope` says which devices to look at (see [`TickScope`]): in-progress
    /// devices are brought up to date in the order of their keys, and only
    /// once all of them have been is the job's next step decided (devices
    /// started, or the job stopped).
    async fn tick_job(
        &self,
        id: u64,
        now_ms: u64,
        limits: StateLimits,
        scope: TickScope,
    ) -> Result<Option<JobTick>, StoreError>;
}

/// Firmware images (their bytes beside the database on SQLite, inside it
/// on PostgreSQL) and what firmware jobs ask of each device.
#[async_trait]
pub trait FirmwareStore: Send + Sync + 'static {
    /// Stores an image whose bytes are in the file `staged` (which is
    /// consumed), under `record.id`, its SHA-256, which the caller has
    /// computed over those bytes. [`StoreError::FirmwareExists`] if an
    /// image with those bytes is stored already.
    async fn put_firmware(
        &self,
        record: FirmwareRecord,
        staged: std::path::PathBuf,
    ) -> Result<FirmwareRecord, StoreError>;

    /// One image's metadata.
    async fn firmware(&self, id: &str) -> Result<Option<FirmwareRecord>, StoreError>;

    /// Every image, newest first.
    async fn list_firmware(&self) -> Result<Vec<FirmwareRecord>, StoreError>;

    /// Deletes an image: `false` if there is none,
    /// [`StoreError::FirmwareInUse`] while an active job rolls it out.
    async fn delete_firmware(&self, id: &str) -> Result<bool, StoreError>;

    /// An image's bytes.
    async fn firmware_bytes(&self, id: &str) -> Result<Option<Bytes>, StoreError>;

    /// The image a running firmware job has started on this device and
    /// not yet finished (the newest such job), if any.
    async fn firmware_assignment(
        &self,
        device: DeviceKey,
    ) -> Result<Option<Assignment>, StoreError>;
}

/// A whole backend, shared by the writer, the sessions, the API and the
/// CLI: every job above, and a health check. Split by job so that a piece
/// of the gateway can say which part of the store it needs.
#[async_trait]
pub trait Store:
    TelemetryStore + DeviceStore + CommandStore + AdminStore + StateStore + FleetStore + FirmwareStore
{
    /// A cheap query proving the store answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Gives back memory held only to go faster (page caches), called when
    /// a burst is over and the gateway trims its heap (`memory.rs`). A
    /// backend without such caches in the gateway's process does nothing.
    async fn release_memory(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// The store's traits, for `use crate::store::prelude::*` where a `dyn
/// Store` is called.
pub mod prelude {
    pub use super::{
        AdminStore, CommandStore, DeviceStore, FirmwareStore, FleetStore, StateStore, Store,
        TelemetryStore,
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Like tokio-postgres' error: a vague message, the detail in the source.
    #[derive(Debug)]
    struct Vague(std::io::Error);

    impl std::fmt::Display for Vague {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("db error")
        }
    }

    impl std::error::Error for Vague {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_backend_error_says_what_its_causes_say() {
        let e = StoreError::backend(
            "postgres",
            Vague(std::io::Error::other(
                "FATAL: sorry, too many clients already",
            )),
        );
        assert_eq!(
            e.to_string(),
            "postgres: db error: FATAL: sorry, too many clients already"
        );
    }
}
