//! TELEMETRY: dedupe against the device's taken watermark, validate, stage
//! for the writer; its ACK waits for the commit (`acks.rs`).

use furrow_proto::{content, Message, Reject, Str, Telemetry};

use crate::session::machine::Machine;
use crate::store::TelemetryRecord;

impl Machine {
    pub(in crate::session) fn on_telemetry(&mut self, t: Telemetry, now_ms: u64) {
        if !self.id.slot.take(t.seq) {
            // At or below the taken watermark: never validated or stored
            // again; its ACK waits until the original is resolved.
            metrics::counter!("furrow_telemetry_duplicate_total").increment(1);
            self.acks.push_dup(t.seq);
            return;
        }
        match content::validate(t.content_type, &t.payload) {
            Err(e) => {
                metrics::counter!("furrow_telemetry_rejected_total").increment(1);
                self.out.queue(&Message::Reject(Reject {
                    seq: t.seq,
                    code: e.code() as u16,
                    reason: Str::from(e.to_string()),
                }));
                self.acks.push_rejected(t.seq);
                // The REJECT and its ACK go out now; the mark that keeps the
                // seq taken is stored with the next commit.
                self.ticket += 1;
                self.mark_ticket = self.ticket;
                self.staged_reject = t.seq;
            }
            Ok(_) => {
                self.ticket += 1;
                self.staged.push(TelemetryRecord {
                    device: self.id.key,
                    seq: t.seq,
                    timestamp_ms: if t.timestamp_ms == 0 {
                        now_ms
                    } else {
                        t.timestamp_ms
                    },
                    received_ms: now_ms,
                    content_type: t.content_type,
                    payload: t.payload,
                });
                self.acks.push_store(t.seq, self.ticket);
            }
        }
    }
}
