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
