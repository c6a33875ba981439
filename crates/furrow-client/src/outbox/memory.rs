//! The in-memory outbox: a seq-ordered queue. Lost with the process.

use std::collections::VecDeque;

use bytes::Bytes;

use super::{Entry, Outbox, OutboxError};

/// In-memory outbox (the default).
#[derive(Debug, Default)]
pub struct MemoryOutbox {
    entries: VecDeque<Entry>,
    last_seq: u64,
}

impl MemoryOutbox {
    /// An empty outbox whose first seq will be `last_seq + 1`.
    pub fn starting_after(last_seq: u64) -> Self {
        Self {
            entries: VecDeque::new(),
            last_seq,
        }
    }
}

impl Outbox for MemoryOutbox {
    fn last_seq(&self) -> u64 {
        self.last_seq
    }

    fn push(
        &mut self,
        timestamp_ms: u64,
        content_type: u8,
        payload: Bytes,
    ) -> Result<u64, OutboxError> {
        self.last_seq += 1;
        self.entries.push_back(Entry {
            seq: self.last_seq,
            timestamp_ms,
            content_type,
            payload,
        });
        Ok(self.last_seq)
    }

    fn ack(&mut self, upto: u64) -> Result<(), OutboxError> {
        while self.entries.front().is_some_and(|e| e.seq <= upto) {
            self.entries.pop_front();
        }
        Ok(())
    }

    fn remove(&mut self, seq: u64) -> Result<(), OutboxError> {
        if let Ok(i) = self.entries.binary_search_by_key(&seq, |e| e.seq) {
            self.entries.remove(i);
        }
        Ok(())
    }

    fn rebase(&mut self, after: u64) -> Result<(), OutboxError> {
        if after > self.last_seq {
            self.last_seq = renumber(&mut self.entries, after);
        }
        Ok(())
    }

    fn after(&self, after: u64, limit: usize) -> Vec<Entry> {
        entries_after(&self.entries, after, limit)
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Up to `limit` of the seq-ordered `entries` with `seq > after` (cloning an
/// entry shares its payload).
pub(super) fn entries_after(entries: &VecDeque<Entry>, after: u64, limit: usize) -> Vec<Entry> {
    let start = entries.partition_point(|e| e.seq <= after);
    entries.iter().skip(start).take(limit).cloned().collect()
}

/// Renumbers `entries` consecutively after `after`; returns the last seq.
pub(super) fn renumber(entries: &mut VecDeque<Entry>, after: u64) -> u64 {
    let mut seq = after;
    for e in entries.iter_mut() {
        seq = seq.saturating_add(1);
        e.seq = seq;
    }
    seq
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_ack_remove_after() {
        let mut o = MemoryOutbox::default();
        for i in 1..=5u8 {
            assert_eq!(o.push(0, 1, Bytes::from(vec![i])).unwrap(), u64::from(i));
        }
        o.ack(2).unwrap();
        o.remove(4).unwrap();
        let seqs: Vec<u64> = o.after(0, 10).iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![3, 5]);
        assert_eq!(o.after(3, 10).len(), 1);
        assert_eq!(o.last_seq(), 5);
        assert_eq!(o.push(0, 1, Bytes::new()).unwrap(), 6);
    }

    #[test]
    fn rebase_renumbers_after_the_gateway() {
        let mut o = MemoryOutbox::default();
        o.push(0, 1, Bytes::from_static(b"a")).unwrap();
        o.push(0, 1, Bytes::from_static(b"b")).unwrap();
        o.rebase(1).unwrap();
        assert_eq!(o.last_seq(), 2, "no-op when the counter is ahead");
        o.rebase(100).unwrap();
        let e = o.after(0, 10);
        assert_eq!((e[0].seq, &e[0].payload[..]), (101, &b"a"[..]));
        assert_eq!((e[1].seq, &e[1].payload[..]), (102, &b"b"[..]));
        assert_eq!(o.push(0, 1, Bytes::new()).unwrap(), 103);
    }
}
