//! Device state (capability STATE): DESIRED out until the device confirms
//! it, DESIRED_ACK in, REPORT in. A REPORT is handled like TELEMETRY (it
//! takes a seq of the same sequence, is staged for the writer and ACKed
//! after the commit that applies it); its patch is checked here, the
//! document it makes by the store inside that commit.

use furrow_proto::{ErrorCode, Message, Reject, Report, Str};

use crate::devices::state::{parse_patch, StateRow};
use crate::session::machine::{Effect, Machine};
use crate::store::ReportRecord;

impl Machine {
    /// The device's state, read after a wake-up (or the handshake): sends
    /// the desired document if the device has not confirmed its version
    /// and this connection has not sent it yet.
    pub fn desired_due(&mut self, row: &StateRow) {
        let version = row.desired.version;
        if !self.has_state() || version <= row.desired_acked || version <= self.desired_sent {
            return;
        }
        self.out.queue(&Message::Desired(furrow_proto::Desired {
            version,
            document: bytes::Bytes::copy_from_slice(row.desired.document.as_bytes()),
        }));
        self.desired_sent = version;
        metrics::counter!("furrow_state_desired_sent_total").increment(1);
    }

    pub(in crate::session) fn on_desired_ack(&mut self, version: u64) {
        // The store ignores a version beyond the current one.
        self.effects.push(Effect::AckDesired {
            device: self.id.key,
            version,
        });
    }

    pub(in crate::session) fn on_report(&mut self, r: Report, now_ms: u64) {
        // Paced at the allowed rate (the driver stops reading when ahead).
        let interval = self.limits.state.report_interval;
        if !interval.is_zero() {
            let now = self.frame_time;
            let tat = self.report_tat.map_or(now, |t| t.max(now)) + interval;
            self.report_tat = Some(tat);
            if tat > now + interval * self.limits.state.report_burst {
                // Past its burst: the session pauses reading this device.
                metrics::counter!("furrow_state_reports_paced_total").increment(1);
            }
        }
        if !self.id.slot.take(r.seq) {
            metrics::counter!("furrow_state_reports_duplicate_total").increment(1);
            self.acks.push_dup(r.seq);
            return;
        }
        match parse_patch(&r.patch, self.limits.state.limits) {
            Err(e) => {
                let (code, reason) = if e.is_limit() {
                    (ErrorCode::StateTooLarge, "limit")
                } else {
                    (ErrorCode::InvalidPayload, "invalid")
                };
                metrics::counter!("furrow_state_reports_rejected_total", "reason" => reason)
                    .increment(1);
                self.out.queue(&Message::Reject(Reject {
                    seq: r.seq,
                    code: code as u16,
                    reason: Str::from(e.to_string()),
                }));
                self.acks.push_rejected(r.seq);
                self.ticket += 1;
                self.mark_ticket = self.ticket;
                self.staged_reject = r.seq;
            }
            Ok(_) => {
                self.ticket += 1;
                self.staged_reports.push(ReportRecord {
                    device: self.id.key,
                    seq: r.seq,
                    timestamp_ms: if r.timestamp_ms == 0 {
                        now_ms
                    } else {
                        r.timestamp_ms
                    },
                    received_ms: now_ms,
                    patch: r.patch,
                    limits: self.limits.state.limits,
                });
                self.acks.push_store(r.seq, self.ticket);
            }
        }
    }
}
