//! Frames a session has encoded and the transport has not yet written.
//!
//! The session core writes into an [`Outbox`]; the driver hands its bytes to
//! the transport. Keeping the buffer here, not in the socket wrapper, is
//! what lets the session run without a socket (tests, fuzzing, parking).
//! Like the read buffer, it holds no memory while empty and idle
//! ([`Outbox::release_idle`]).

use bytes::BytesMut;
use furrow_proto::message::{ack_frame, encode_ack, ACK_FRAME_LEN};
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
        crate::metrics::wire().frame_out(MessageType::Ack, ACK_FRAME_LEN);
    }

    /// ACK `seq`, of which the storage writer wrote the first `written`
    /// bytes to the socket: counted, and the rest of a frame it only
    /// began queued (the outbox is empty then: nothing was queued while
    /// the writer held the socket).
    pub fn writer_ack(&mut self, seq: u64, written: usize) {
        self.frames += 1;
        if written < ACK_FRAME_LEN {
            self.buf.extend_from_slice(&ack_frame(seq)[written..]);
            // A whole frame the writer counted itself.
            crate::metrics::wire().frame_out(MessageType::Ack, ACK_FRAME_LEN);
        }
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
