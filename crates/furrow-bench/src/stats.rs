//! What devices record while they run, and how records from threads and
//! worker processes are merged. Counters are cumulative atomics; latency
//! histograms are per interval, swapped out at each sample, so that the
//! report can show p99 per second as well as over the whole run.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// An empty latency histogram: 1 us to 60 s, 3 significant digits.
pub fn new_hist() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// A histogram as (value, count) pairs: small, exact (to the histogram's
/// precision) and plain JSON, so worker processes can send theirs.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct HistData(pub Vec<(u64, u64)>);

impl HistData {
    /// The recorded values of `h`.
    pub fn of(h: &Histogram<u64>) -> Self {
        Self(
            h.iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
        )
    }

    /// Adds these values into `h`.
    pub fn add_to(&self, h: &mut Histogram<u64>) {
        for &(v, n) in &self.0 {
            h.saturating_record_n(v, n);
        }
    }
}

/// Counters and histograms shared by the devices of one worker process.
#[derive(Default)]
pub struct Recorder {
    /// Devices connected (handshake done) now.
    pub connected: AtomicU64,
    /// Messages sent.
    pub sent: AtomicU64,
    /// Successful connections after the first one, per device.
    pub reconnects: AtomicU64,
    /// Devices back and streaming after the storm.
    pub storm_back: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    /// Messages acknowledged, with their latencies since the last sample:
    /// under one lock, so that a sample's count and histogram agree.
    acks: Mutex<(u64, Option<Histogram<u64>>)>,
    connect_us: Mutex<Option<Histogram<u64>>>,
    storm_us: Mutex<Option<Histogram<u64>>>,
}

fn record_all(slot: &Mutex<Option<Histogram<u64>>>, values: &[u64]) {
    if let Ok(mut h) = slot.lock() {
        let h = h.get_or_insert_with(new_hist);
        for &v in values {
            h.saturating_record(v.max(1));
        }
    }
}

fn take(slot: &Mutex<Option<Histogram<u64>>>) -> HistData {
    slot.lock()
        .ok()
        .and_then(|mut h| h.take())
        .map(|h| HistData::of(&h))
        .unwrap_or_default()
}

impl Recorder {
    /// Counts an error by its kind.
    pub fn error(&self, kind: String) {
        if let Ok(mut m) = self.errors.lock() {
            *m.entry(kind).or_default() += 1;
        }
    }

    /// Records ACK latencies (microseconds), one lock per batch.
    pub fn acks(&self, us: &[u64]) {
        if let Ok(mut a) = self.acks.lock() {
            a.0 += us.len() as u64;
            let h = a.1.get_or_insert_with(new_hist);
            for &v in us {
                h.saturating_record(v.max(1));
            }
        }
    }

    /// Records a connect plus handshake latency.
    pub fn connected(&self, us: u64) {
        self.connected.fetch_add(1, Ordering::Relaxed);
        record_all(&self.connect_us, &[us]);
    }

    /// Records a device back and streaming after the storm, `us` after it.
    pub fn storm_back(&self, us: u64) {
        self.storm_back.fetch_add(1, Ordering::Relaxed);
        record_all(&self.storm_us, &[us]);
    }

    /// The counters now, and the histograms since the last sample.
    pub fn sample(&self) -> Sample {
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (acked, ack_us) = self
            .acks
            .lock()
            .map(|mut a| {
                (
                    a.0,
                    a.1.take().map(|h| HistData::of(&h)).unwrap_or_default(),
                )
            })
            .unwrap_or_default();
        Sample {
            connected: c(&self.connected),
            sent: c(&self.sent),
            acked,
            reconnects: c(&self.reconnects),
            storm_back: c(&self.storm_back),
            errors: self.errors.lock().map(|m| m.clone()).unwrap_or_default(),
            ack_us,
            connect_us: take(&self.connect_us),
            storm_us: take(&self.storm_us),
            rss_kib: None,
        }
    }
}

/// One worker's state at a sampling instant. Counters are cumulative;
/// histograms hold what was recorded since the previous sample.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct Sample {
    /// Devices connected now.
    pub connected: u64,
    /// Messages sent so far.
    pub sent: u64,
    /// Messages acknowledged so far.
    pub acked: u64,
    /// Reconnections so far.
    pub reconnects: u64,
    /// Devices back after the storm so far.
    pub storm_back: u64,
    /// Errors by kind so far.
    pub errors: BTreeMap<String, u64>,
    /// ACK latencies since the last sample, microseconds.
    pub ack_us: HistData,
    /// Connect plus handshake latencies since the last sample.
    pub connect_us: HistData,
    /// Storm reconnection times since the last sample.
    pub storm_us: HistData,
    /// The server's resident memory, when a pid was given (coordinator only).
    pub rss_kib: Option<u64>,
}

impl Sample {
    /// Adds another worker's sample taken at the same instant.
    pub fn merge(&mut self, o: Sample) {
        self.connected += o.connected;
        self.sent += o.sent;
        self.acked += o.acked;
        self.reconnects += o.reconnects;
        self.storm_back += o.storm_back;
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.ack_us.0.extend(o.ack_us.0);
        self.connect_us.0.extend(o.connect_us.0);
        self.storm_us.0.extend(o.storm_us.0);
    }
}

/// Percentiles of a latency histogram, microseconds.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Percentiles {
    /// Values recorded.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest value.
    pub max: u64,
}

impl Percentiles {
    /// The percentiles of `h` (all zero when it is empty).
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let q = |p| h.value_at_quantile(p);
        Self {
            count: h.len(),
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            p999: q(0.999),
            max: h.max(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hist_data_round_trips_through_json() {
        let mut h = new_hist();
        for v in [1, 5, 5, 900, 12_345, 2_000_000] {
            h.record(v).expect("in range");
        }
        let json = serde_json::to_string(&HistData::of(&h)).expect("json");
        let back: HistData = serde_json::from_str(&json).expect("parse");
        let mut h2 = new_hist();
        back.add_to(&mut h2);
        assert_eq!(Percentiles::of(&h), Percentiles::of(&h2));
        assert_eq!(h2.len(), 6);
    }

    #[test]
    fn samples_merge_counters_errors_and_histograms() {
        let r1 = Recorder::default();
        let r2 = Recorder::default();
        r1.acks(&[10, 20]);
        r2.acks(&[30]);
        r1.error("closed".into());
        r2.error("closed".into());
        r2.error("refused".into());
        let mut s = r1.sample();
        s.merge(r2.sample());
        assert_eq!(s.acked, 3);
        assert_eq!(s.errors.get("closed"), Some(&2));
        assert_eq!(s.errors.get("refused"), Some(&1));
        let mut h = new_hist();
        s.ack_us.add_to(&mut h);
        assert_eq!(h.len(), 3);
        // Histograms are per interval: the next sample starts empty.
        assert!(r1.sample().ack_us.0.is_empty());
        assert_eq!(r1.sample().acked, 2);
    }
}
