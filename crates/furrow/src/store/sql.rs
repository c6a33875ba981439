//! What both SQL backends share: the command columns they select, and the
//! mapping of such a row (read by each backend's driver into
//! [`CommandColumns`]) to a [`CommandRecord`], with one rule for the
//! columns SQL stores as signed integers.

use super::{CommandOutcome, CommandRecord, CommandState};

/// Columns of a command row joined with its device, in [`CommandColumns`]'
/// order.
pub(crate) const COMMAND_COLS: &str =
    "c.id, d.device_id, c.name, c.content_type, c.payload, c.status,
    c.created_ms, c.expires_ms, c.updated_ms, c.result_status, c.result_content_type,
    c.result_payload";

/// A command row as the driver returns it, integers as stored (signed).
pub(crate) struct CommandColumns {
    pub id: i64,
    pub device_id: String,
    pub name: String,
    pub content_type: i64,
    pub payload: Vec<u8>,
    pub status: String,
    pub created_ms: i64,
    /// NULL: never expires.
    pub expires_ms: Option<i64>,
    pub updated_ms: i64,
    pub result_status: Option<i64>,
    pub result_content_type: Option<i64>,
    pub result_payload: Option<Vec<u8>>,
}

/// A stored byte (content type, status) back to a byte; a value out of
/// range (only this code writes them) reads as 0.
fn byte(v: i64) -> u8 {
    u8::try_from(v).unwrap_or(0)
}

impl CommandColumns {
    /// The record.
    pub(crate) fn record(self) -> CommandRecord {
        CommandRecord {
            id: self.id as u64,
            device_id: self.device_id,
            name: self.name,
            content_type: byte(self.content_type),
            payload: self.payload,
            // Only this code writes the column; an unknown value reads as failed.
            state: CommandState::parse(&self.status).unwrap_or(CommandState::Failed),
            created_ms: self.created_ms as u64,
            expires_ms: self.expires_ms.unwrap_or(i64::MAX) as u64,
            updated_ms: self.updated_ms as u64,
            outcome: self.result_status.map(|status| CommandOutcome {
                status: byte(status),
                content_type: byte(self.result_content_type.unwrap_or(0)),
                payload: self.result_payload.unwrap_or_default(),
            }),
        }
    }
}

/// Columns of a `device_state` row, in [`StateColumns`]' order.
pub(crate) const STATE_COLS: &str = "desired, desired_version, desired_fields, desired_updated_ms,
    desired_acked, reported, reported_version, reported_fields, reported_updated_ms,
    reported_seq";

/// A `device_state` row as the driver returns it.
pub(crate) struct StateColumns {
    pub desired: String,
    pub desired_version: i64,
    pub desired_fields: String,
    pub desired_updated_ms: i64,
    pub desired_acked: i64,
    pub reported: String,
    pub reported_version: i64,
    pub reported_fields: String,
    pub reported_updated_ms: i64,
    pub reported_seq: i64,
}

impl StateColumns {
    /// The row.
    pub(crate) fn row(self) -> crate::devices::state::StateRow {
        use crate::devices::state::{Side, StateRow};
        StateRow {
            desired: Side {
                document: self.desired,
                version: self.desired_version as u64,
                fields: self.desired_fields,
                updated_ms: self.desired_updated_ms as u64,
            },
            desired_acked: self.desired_acked as u64,
            reported: Side {
                document: self.reported,
                version: self.reported_version as u64,
                fields: self.reported_fields,
                updated_ms: self.reported_updated_ms as u64,
            },
            reported_seq: self.reported_seq as u64,
        }
    }
}

/// Columns of a `jobs` row, in [`JobColumns`]' order.
pub(crate) const JOB_COLS: &str = "id, status, target, op_kind, op_name, op_content_type,
    op_payload, rate_per_min, abort_failed_pct, abort_min_completed, device_timeout_ms,
    deadline_ms, created_by, created_ms, updated_ms, finished_ms, reason, started";

/// A `jobs` row as the driver returns it.
pub(crate) struct JobColumns {
    pub id: i64,
    pub status: String,
    pub target: String,
    pub op_kind: String,
    pub op_name: String,
    pub op_content_type: i64,
    pub op_payload: Vec<u8>,
    pub rate_per_min: i64,
    pub abort_failed_pct: Option<f64>,
    pub abort_min_completed: Option<i64>,
    pub device_timeout_ms: i64,
    pub deadline_ms: i64,
    pub created_by: String,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub finished_ms: Option<i64>,
    pub reason: Option<String>,
    pub started: i64,
}

impl JobColumns {
    /// The record (its counts are read apart).
    pub(crate) fn record(self) -> crate::jobs::JobRecord {
        use crate::jobs::{AbortRule, Counts, JobRecord, JobStatus, Operation, Target};
        let operation = if self.op_kind == "desired" {
            Operation::Desired {
                patch: String::from_utf8_lossy(&self.op_payload).into_owned(),
            }
        } else if self.op_kind == "firmware" {
            let p: crate::jobs::FirmwareParams =
                serde_json::from_slice(&self.op_payload).unwrap_or_default();
            Operation::Firmware {
                image: self.op_name,
                version: p.version,
                max_downloads: p.max_downloads,
            }
        } else {
            Operation::Command {
                name: self.op_name,
                content_type: byte(self.op_content_type),
                payload: self.op_payload,
            }
        };
        JobRecord {
            id: self.id as u64,
            // Only this code writes the column; an unknown value reads as
            // stopped.
            status: JobStatus::parse(&self.status).unwrap_or(JobStatus::Cancelled),
            target: serde_json::from_str(&self.target).unwrap_or(Target::Devices(Vec::new())),
            operation,
            rate_per_min: u32::try_from(self.rate_per_min).unwrap_or(0),
            abort: self
                .abort_failed_pct
                .zip(self.abort_min_completed)
                .map(|(failed_pct, min)| AbortRule {
                    failed_pct,
                    min_completed: min as u64,
                }),
            device_timeout_ms: self.device_timeout_ms as u64,
            deadline_ms: self.deadline_ms as u64,
            created_by: self.created_by,
            created_ms: self.created_ms as u64,
            updated_ms: self.updated_ms as u64,
            finished_ms: self.finished_ms.map(|v| v as u64),
            reason: self.reason,
            started: self.started as u64,
            counts: Counts::default(),
        }
    }
}

/// Columns of a job's device (`jd` joined with its device `d`), in
/// [`JobDeviceColumns`]' order.
pub(crate) const JOB_DEVICE_COLS: &str =
    "d.device_id, jd.state, jd.started_ms, jd.finished_ms, jd.command_id, jd.desired_version";

/// A job's device as the driver returns it.
pub(crate) struct JobDeviceColumns {
    pub device_id: String,
    pub state: String,
    pub started_ms: Option<i64>,
    pub finished_ms: Option<i64>,
    pub command_id: Option<i64>,
    pub desired_version: Option<i64>,
}

impl JobDeviceColumns {
    /// The record.
    pub(crate) fn record(self) -> crate::jobs::JobDevice {
        use crate::jobs::{DeviceState, JobDevice};
        JobDevice {
            device_id: self.device_id,
            state: DeviceState::parse(&self.state).unwrap_or(DeviceState::Cancelled),
            started_ms: self.started_ms.map(|v| v as u64),
            finished_ms: self.finished_ms.map(|v| v as u64),
            command_id: self.command_id.map(|v| v as u64),
            desired_version: self.desired_version.map(|v| v as u64),
        }
    }
}
