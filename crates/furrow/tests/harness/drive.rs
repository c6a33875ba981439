//! Driving the sans-I/O session machine the way `session/driver.rs` does,
//! shared by the tests that run it without a socket (`session_machine.rs`,
//! `simulation.rs`), and the dice of their seeded schedules.

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

/// A small deterministic generator (xorshift64*): a schedule's dice.
#[derive(Clone)]
pub struct Dice(u64);

impl Dice {
    /// Dice for `seed` (any value, 0 included).
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// True with probability `pct` percent.
    pub fn chance(&mut self, pct: u64) -> bool {
        self.next() % 100 < pct
    }

    /// A number below `n` (0 if `n` is 0).
    #[allow(dead_code)] // session_machine.rs does not use it
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}
