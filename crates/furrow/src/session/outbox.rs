//! Frames a session has encoded and the transport has not yet written.
//!
//! The session core writes into an [`Outbox`]; the driver hands its bytes to
//! the transport. Keeping the buffer here, not in the socket wrapper, is
//! what lets the session run without a socket (tests, fuzzing, parking).
//! Like the read buffer, it holds no memory while empty and idle
//! ([`Outbox::release_idle`]).

use bytes::BytesMut;
use furrow_proto::message::encode_ack;
use furrow_proto::{Message, MessageType};

/// Encoded frames waiting for the transport.
#[derive(Debug, Default)]
pub struct Outbox {
    buf: BytesMut,
    /// Frames queued over the connection's life (for the close log line).
    frames: u64,
}

impl Outbox {
    /// An empty outbox (allocates nothing).
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty outbox for a resumed session that had queued `frames`.
    pub fn resumed(frames: u64) -> Self {
        Self {
            buf: BytesMut::new(),
            frames,
        }
    }

    /// Queues a message.
    pub fn queue(&mut self, msg: &Message) {
        // Gateway messages carry our own short strings; an encoding failure
        // would be a bug, so it is logged and the frame skipped.
        let before = self.buf.len();
        match msg.encode(&mut self.buf) {
            Ok(()) => {
                self.frames += 1;
                crate::metrics::wire().frame_out(msg.kind(), self.buf.len() - before);
            }
            Err(e) => tracing::error!(error = %e, kind = msg.kind().name(), "cannot encode"),
        }
    }

    /// Queues an ACK (the hot path's frame).
    pub fn queue_ack(&mut self, seq: u64) {
        encode_ack(seq, &mut self.buf);
        self.frames += 1;
        crate::metrics::wire().frame_out(MessageType::Ack, furrow_proto::HEADER_LEN + 8);
    }

    /// Queues what the storage writer did not write of ACK `seq`'s frame
    /// (its first `written` bytes reached the socket; the outbox is empty:
    /// nothing was queued while the writer held the socket).
    pub fn queue_ack_rest(&mut self, seq: u64, written: usize) {
        let frame = furrow_proto::message::ack_frame(seq);
        self.buf
            .extend_from_slice(&frame[written.min(frame.len())..]);
        self.frames += 1;
        crate::metrics::wire().frame_out(MessageType::Ack, frame.len());
    }

    /// Counts an ACK frame the storage writer wrote whole.
    pub fn count_written_elsewhere(&mut self) {
        self.frames += 1;
    }

    /// Bytes waiting.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The bytes, for the transport to write and then advance past.
    pub fn bytes_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Frames queued so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Gives the buffer's memory back once everything is written.
    pub fn release_idle(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            self.buf = BytesMut::new();
        }
    }
}
