//! The outbox: every reading the application handed to [`crate::Client::send`]
//! that the gateway has not acknowledged yet, plus the device's seq counter.
//!
//! Two implementations: [`MemoryOutbox`] (the default; lost with the
//! process) and [`FileOutbox`] (an append-only log with checksums: after a
//! crash or restart, the seq counter and every unacknowledged reading come
//! back, and a torn last record is cut off).
//!
//! The client holds the outbox behind a lock and calls it from its tasks;
//! implementations only need to be `Send`.

use bytes::Bytes;

mod file;
mod memory;

pub use file::{FileOutbox, FileOutboxOptions};
pub use memory::MemoryOutbox;

/// One reading waiting for its ACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its seq (assigned by the outbox at append).
    pub seq: u64,
    /// Device clock when produced, Unix ms (0: unknown).
    pub timestamp_ms: u64,
    /// furrow/1 content type byte.
    pub content_type: u8,
    /// The payload.
    pub payload: Bytes,
}

/// Outbox failures.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The backing file failed.
    #[error("outbox file {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The backing file holds something that is not an outbox log (not a
    /// torn tail, which is repaired, but corruption before it).
    #[error("outbox file {path} is corrupt at byte {offset}: {reason}")]
    Corrupt {
        /// The file.
        path: std::path::PathBuf,
        /// Where.
        offset: u64,
        /// What.
        reason: String,
    },
}

/// Storage of unacknowledged readings.
pub trait Outbox: Send + 'static {
    /// Highest seq ever assigned (0 if none). Survives restarts for durable
    /// outboxes, so seqs keep increasing across device restarts.
    fn last_seq(&self) -> u64;

    /// Assigns the next seq (`last_seq() + 1`) to a reading and keeps it
    /// until acknowledged. Returns the seq.
    fn push(
        &mut self,
        timestamp_ms: u64,
        content_type: u8,
        payload: Bytes,
    ) -> Result<u64, OutboxError>;

    /// Forgets every entry with `seq <= upto` (the gateway has them, or
    /// WELCOME's `last_seq` says so).
    fn ack(&mut self, upto: u64) -> Result<(), OutboxError>;

    /// Forgets one entry (REJECTed: the gateway refused it for good).
    fn remove(&mut self, seq: u64) -> Result<(), OutboxError>;

    /// The gateway has stored seqs up to `after`, yet this outbox's counter
    /// is lower: the device lost its state (an in-memory outbox after a
    /// restart, a deleted outbox file) and would otherwise reuse seqs the
    /// gateway takes for duplicates, dropping new readings. Renumbers the
    /// pending entries (none of which the gateway can have under their new
    /// numbers) to follow `after`, in order, and continues counting from
    /// there. Does nothing when `after <= last_seq()`.
    fn rebase(&mut self, after: u64) -> Result<(), OutboxError>;

    /// Up to `limit` entries with `seq > after`, in seq order.
    fn after(&self, after: u64, limit: usize) -> Vec<Entry>;

    /// Number of entries held.
    fn len(&self) -> usize;

    /// Whether no entry is held.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
