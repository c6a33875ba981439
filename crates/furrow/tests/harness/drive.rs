//! Driving the sans-I/O session machine the way `session/driver.rs` does,
//! shared by the tests that run it without a socket (`session_machine.rs`,
//! `simulation.rs`).

use bytes::BytesMut;
use furrow::session::machine::{Fatal, Machine};
use furrow::session::outbox::Outbox;
use furrow_proto::{ErrorMsg, FrameDecoder, Message, Str};
use tokio::time::Instant;

/// Hands the machine the complete frames it takes now.
pub fn feed(m: &mut Machine, dec: &FrameDecoder, buf: &mut BytesMut, now: Instant) {
    while m.accepts_frame(now) {
        match dec.decode(buf) {
            Ok(Some(f)) => m.on_frame(f, 1_700_000_000_000),
            Ok(None) => break,
            Err(e) => {
                m.on_decode_error(e);
                break;
            }
        }
    }
    m.end_batch(now);
}

/// Whether `buf` holds a whole frame (or bytes no frame can start with).
pub fn complete_frame(dec: &FrameDecoder, buf: &[u8]) -> bool {
    match dec.check_header(buf) {
        Ok(Some(total)) => buf.len() >= total,
        Ok(None) => false,
        Err(_) => true,
    }
}

/// Queues the ERROR a fatal end earns.
pub fn queue_error(out: &mut Outbox, Fatal(code, message): Fatal) {
    out.queue(&Message::Error(ErrorMsg {
        code: code as u16,
        message: Str::from(message),
    }));
}
