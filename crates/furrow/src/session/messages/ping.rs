//! PING: answered with a PONG carrying the same nonce, in order.

use furrow_proto::Message;

use crate::session::machine::Machine;

impl Machine {
    pub(in crate::session) fn on_ping(&mut self, nonce: u64) {
        self.out.queue(&Message::Pong { nonce });
    }
}
