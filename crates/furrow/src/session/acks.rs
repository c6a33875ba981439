//! Per-connection acknowledgement bookkeeping. Pure: no I/O, no clock.
//!
//! Every TELEMETRY read on a connection becomes an entry, in read order:
//!
//! * `Store(ticket)`: handed to the writer; resolved once the writer has
//!   committed this connection's `ticket`.
//! * `Resolved`: rejected, so resolved at once.
//! * `Dup`: a seq at or below the device's taken watermark; resolved once
//!   the device's resolved watermark reaches it (its original is stored or
//!   rejected).
//!
//! The ACK is the highest seq of the longest resolved prefix. That gives
//! the spec's guarantees directly: every TELEMETRY this connection sent with
//! seq <= n is resolved (everything before it in read order is, and later
//! entries with a lower seq are duplicates of taken seqs, which are ordered
//! before them); n is a seq this connection sent; and n never goes back.

use std::collections::VecDeque;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Store(u64),
    Resolved,
    Dup,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    seq: u64,
    kind: Kind,
}

/// What [`AckTracker::advance`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Advance {
    /// A new ACK to send, if the prefix moved past the last one sent.
    pub ack: Option<u64>,
    /// Highest non-duplicate seq popped: the device's resolved watermark
    /// may be raised to it.
    pub resolved: Option<u64>,
}

/// Unacknowledged TELEMETRY of one connection.
#[derive(Debug, Default)]
pub struct AckTracker {
    entries: VecDeque<Entry>,
    last_acked: u64,
    best: u64,
    /// `Dup` entries held (they resolve on the device's watermark, not on
    /// a commit of this connection's).
    dups: usize,
    /// Highest seq pushed.
    pushed: u64,
}

impl AckTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// A frame handed to the writer under `ticket`.
    pub fn push_store(&mut self, seq: u64, ticket: u64) {
        self.pushed = self.pushed.max(seq);
        self.entries.push_back(Entry {
            seq,
            kind: Kind::Store(ticket),
        });
    }

    /// A frame rejected (REJECT already queued before any ACK covering it).
    pub fn push_rejected(&mut self, seq: u64) {
        self.pushed = self.pushed.max(seq);
        self.entries.push_back(Entry {
            seq,
            kind: Kind::Resolved,
        });
    }

    /// A duplicate frame.
    pub fn push_dup(&mut self, seq: u64) {
        self.pushed = self.pushed.max(seq);
        self.dups += 1;
        self.entries.push_back(Entry {
            seq,
            kind: Kind::Dup,
        });
    }

    /// Entries not yet acknowledged: what counts against `max_inflight`.
    pub fn outstanding(&self) -> usize {
        self.entries.len()
    }

    /// Whether any duplicate waits on another connection's commits.
    pub fn waits_on_device(&self, device_resolved: u64) -> bool {
        self.entries
            .front()
            .is_some_and(|e| e.kind == Kind::Dup && e.seq > device_resolved)
    }

    /// Pops the resolved prefix given the writer's `committed` ticket and the
    /// device's `device_resolved` watermark.
    pub fn advance(&mut self, committed: u64, device_resolved: u64) -> Advance {
        let mut resolved_here = 0;
        let mut watermark = device_resolved;
        while let Some(e) = self.entries.front() {
            let done = match e.kind {
                Kind::Store(t) => t <= committed,
                Kind::Resolved => true,
                Kind::Dup => e.seq <= watermark,
            };
            if !done {
                break;
            }
            if e.kind == Kind::Dup {
                self.dups -= 1;
            } else {
                resolved_here = resolved_here.max(e.seq);
                watermark = watermark.max(e.seq);
            }
            self.best = self.best.max(e.seq);
            self.entries.pop_front();
        }
        let ack = (self.best > self.last_acked).then(|| {
            self.last_acked = self.best;
            self.best
        });
        Advance {
            ack,
            resolved: (resolved_here > 0).then_some(resolved_here),
        }
    }

    /// The last ACK handed out, 0 if none.
    pub fn last_acked(&self) -> u64 {
        self.last_acked
    }

    /// The ACK that a commit of every entry's ticket will allow, if it is
    /// that commit alone that holds them back (no duplicate among them
    /// waits on the device's watermark): then whoever learns of the commit
    /// first may send it (the storage writer does, see
    /// `crate::writer::AckCell::arm`).
    pub fn ack_on_commit(&self) -> Option<u64> {
        let due = self.pushed.max(self.best);
        (self.dups == 0 && due > self.last_acked).then_some(due)
    }

    /// ACK `seq` went out without this tracker (see [`Self::ack_on_commit`]):
    /// [`Self::advance`] hands out only ACKs above it.
    pub fn acked_elsewhere(&mut self, seq: u64) {
        self.last_acked = self.last_acked.max(seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_only_committed_prefix() {
        let mut t = AckTracker::new();
        t.push_store(1, 1);
        t.push_store(2, 2);
        t.push_store(3, 3);
        assert_eq!(t.advance(0, 0).ack, None);
        assert_eq!(t.advance(2, 0).ack, Some(2));
        assert_eq!(t.outstanding(), 1);
        assert_eq!(t.advance(2, 0).ack, None, "no repeat ACK");
        assert_eq!(
            t.advance(3, 0),
            Advance {
                ack: Some(3),
                resolved: Some(3)
            }
        );
    }

    #[test]
    fn reject_acks_at_once_when_nothing_before_is_pending() {
        let mut t = AckTracker::new();
        t.push_rejected(1);
        assert_eq!(t.advance(0, 0).ack, Some(1));
        t.push_store(2, 1);
        t.push_rejected(3);
        assert_eq!(t.advance(0, 0).ack, None, "2 is not committed yet");
        assert_eq!(t.advance(1, 0).ack, Some(3));
    }

    #[test]
    fn dup_waits_for_its_original() {
        let mut t = AckTracker::new();
        t.push_store(5, 1);
        t.push_dup(5);
        assert_eq!(t.advance(0, 0).ack, None);
        // Committing the original resolves the dup behind it in one pass.
        assert_eq!(t.advance(1, 0).ack, Some(5));
        assert_eq!(t.outstanding(), 0);
    }

    #[test]
    fn dup_of_other_connection_waits_for_device_watermark() {
        let mut t = AckTracker::new();
        t.push_dup(9);
        assert!(t.waits_on_device(8));
        assert_eq!(t.advance(0, 8).ack, None);
        let a = t.advance(0, 9);
        assert_eq!(a.ack, Some(9));
        assert_eq!(a.resolved, None, "a dup raises nothing");
    }

    #[test]
    fn ack_never_goes_back_and_is_a_sent_seq() {
        let mut t = AckTracker::new();
        t.push_store(10, 1);
        assert_eq!(t.advance(1, 0).ack, Some(10));
        // A lower duplicate later does not produce a lower ACK.
        t.push_dup(4);
        assert_eq!(t.advance(1, 10).ack, None);
        assert_eq!(t.last_acked(), 10);
    }

    #[test]
    fn an_ack_sent_elsewhere_on_commit_is_not_sent_again() {
        let mut t = AckTracker::new();
        assert_eq!(t.ack_on_commit(), None, "nothing to ACK");
        t.push_store(1, 1);
        t.push_rejected(2);
        t.push_store(3, 2);
        assert_eq!(t.ack_on_commit(), Some(3));
        t.acked_elsewhere(3);
        assert_eq!(t.advance(2, 0).ack, None, "3 went out already");
        assert_eq!(t.outstanding(), 0);
        t.push_store(4, 3);
        assert_eq!(t.advance(3, 0).ack, Some(4), "later ACKs still go out");
    }

    #[test]
    fn no_ack_on_commit_while_a_duplicate_waits() {
        let mut t = AckTracker::new();
        t.push_dup(7);
        t.push_store(8, 1);
        assert_eq!(
            t.ack_on_commit(),
            None,
            "7 waits on the device, not a commit"
        );
        assert_eq!(t.advance(1, 7).ack, Some(8));
        t.push_store(9, 2);
        assert_eq!(t.ack_on_commit(), Some(9), "the duplicate is gone");
    }
}
