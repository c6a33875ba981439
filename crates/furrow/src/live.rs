//! The last hour at a glance, for the console's overview
//! (`GET /v1/overview`): readings acknowledged per second, ACK p99 and
//! devices online, one point every [`STEP`], kept in memory for an hour.
//!
//! Prometheus has the same counters, but the console must answer on a
//! fresh install without one, and a histogram's fixed buckets give a p99
//! only to the nearest bucket. So the hot paths also count into
//! [`Live`]: one relaxed atomic add per commit and per ACK (the ACK's
//! latency into a log-linear histogram with four steps per power of two,
//! a p99 within 19 %), and a task reads and diffs them every step.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

/// Time between points.
pub const STEP: Duration = Duration::from_secs(10);

/// Points kept: an hour of them.
pub const POINTS: usize = 360;

/// Latency buckets: 0..16 µs one each, then four per power of two up to
/// 2^40 µs (beyond any ACK).
const BUCKETS: usize = 16 + 36 * 4;

/// Counters the hot paths add to (one per process: see [`live`]).
pub struct Live {
    acked: AtomicU64,
    latency: [AtomicU64; BUCKETS],
}

static LIVE: Live = Live {
    acked: AtomicU64::new(0),
    latency: [const { AtomicU64::new(0) }; BUCKETS],
};

/// The process's counters.
pub fn live() -> &'static Live {
    &LIVE
}

/// Bucket of a latency in µs.
fn bucket(us: u64) -> usize {
    if us < 16 {
        return us as usize;
    }
    let e = 63 - us.leading_zeros() as usize; // >= 4
    let sub = ((us >> (e - 2)) & 3) as usize;
    (16 + (e - 4) * 4 + sub).min(BUCKETS - 1)
}

/// The upper bound of bucket `i`, in µs.
fn bucket_top(i: usize) -> u64 {
    if i < 16 {
        return i as u64 + 1;
    }
    let e = (i - 16) / 4 + 4;
    let sub = ((i - 16) % 4) as u64;
    (4 + sub + 1) << (e - 2)
}

impl Live {
    /// `n` readings were committed (and their ACKs released).
    pub fn acked(&self, n: u64) {
        self.acked.fetch_add(n, Ordering::Relaxed);
    }

    /// An ACK went out `latency` after the oldest frame it covers.
    pub fn ack_latency(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency[bucket(us)].fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            acked: self.acked.load(Ordering::Relaxed),
            latency: std::array::from_fn(|i| self.latency[i].load(Ordering::Relaxed)),
        }
    }
}

struct Snapshot {
    acked: u64,
    latency: [u64; BUCKETS],
}

/// The p99 of the latencies between two snapshots, ms; `None` if none.
fn p99_ms(before: &Snapshot, now: &Snapshot) -> Option<f64> {
    let diff: Vec<u64> = (0..BUCKETS)
        .map(|i| now.latency[i].saturating_sub(before.latency[i]))
        .collect();
    let total: u64 = diff.iter().sum();
    if total == 0 {
        return None;
    }
    // The smallest bucket with at least 99 % of them at or below it.
    let want = total - total / 100;
    let mut seen = 0;
    for (i, n) in diff.iter().enumerate() {
        seen += n;
        if seen >= want {
            return Some(bucket_top(i) as f64 / 1000.0);
        }
    }
    None
}

/// One point of the series.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct Point {
    /// End of the step, Unix ms.
    pub t_ms: u64,
    /// Readings acknowledged per second over the step.
    pub acked_per_s: f64,
    /// ACK latency p99 over the step, ms (absent if nothing was ACKed).
    pub ack_p99_ms: Option<f64>,
    /// Devices connected to this instance at its end.
    pub online: u64,
}

/// The last hour, oldest first.
pub struct Series {
    points: Mutex<VecDeque<Point>>,
    /// The counters when the last point was taken, and when.
    last: Mutex<(tokio::time::Instant, Snapshot)>,
}

impl Series {
    /// An empty series.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            points: Mutex::new(VecDeque::new()),
            last: Mutex::new((tokio::time::Instant::now(), live().snapshot())),
        })
    }

    /// The step under way: since the last point until now (so that a
    /// page refreshed every few seconds sees numbers move between points).
    pub fn current(&self, online: u64) -> Point {
        let (at, before) = &*self.last.lock().unwrap_or_else(|p| p.into_inner());
        point(&live().snapshot(), before, at.elapsed(), online)
    }

    /// The points, oldest first.
    pub fn points(&self) -> Vec<Point> {
        self.points
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect()
    }

    fn push(&self, p: Point) {
        let mut g = self.points.lock().unwrap_or_else(|p| p.into_inner());
        if g.len() == POINTS {
            g.pop_front();
        }
        g.push_back(p);
    }

    /// Adds a point every `step` until `stop`; `online` counts this
    /// instance's devices.
    pub async fn sample(
        self: Arc<Self>,
        step: Duration,
        online: impl Fn() -> u64,
        stop: CancellationToken,
    ) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) =
            (tokio::time::Instant::now(), live().snapshot());
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + step, step);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = live().snapshot();
            let p = {
                let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
                let p = point(&now, &last.1, last.0.elapsed(), online());
                *last = (tokio::time::Instant::now(), now);
                p
            };
            self.push(p);
        }
    }
}

/// The point for the counters going from `before` to `now` in `took`.
fn point(now: &Snapshot, before: &Snapshot, took: Duration, online: u64) -> Point {
    Point {
        t_ms: crate::clock::now_ms(),
        acked_per_s: now.acked.saturating_sub(before.acked) as f64 / took.as_secs_f64().max(0.001),
        ack_p99_ms: p99_ms(before, now),
        online,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_ordered_and_tight() {
        let mut last = 0;
        for us in [0, 1, 15, 16, 17, 20, 31, 32, 100, 1_000, 3_700, 1_000_000] {
            let b = bucket(us);
            assert!(b >= last, "{us} µs");
            last = b;
            let top = bucket_top(b);
            assert!(top > us, "{us} µs under its bucket's top {top}");
            // Four steps per power of two: the top is at most 25 % above.
            assert!(
                top as f64 <= (us as f64 * 1.25).max(us as f64 + 1.0),
                "{us}: {top}"
            );
        }
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
    }

    #[tokio::test]
    async fn the_series_takes_a_point_every_step_and_keeps_an_hour() {
        // The step under way counts what happened since the last point.
        let idle = Series::new();
        live().acked(10);
        let cur = idle.current(1);
        assert!(cur.acked_per_s > 0.0, "{cur:?}");
        assert_eq!(cur.online, 1);

        let series = Series::new();
        let stop = CancellationToken::new();
        let task =
            tokio::spawn(Arc::clone(&series).sample(Duration::from_millis(20), || 7, stop.clone()));
        while series.points().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        live().acked(1_000);
        live().ack_latency(Duration::from_millis(3));
        while series.points().len() < 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop.cancel();
        task.await.unwrap();
        let points = series.points();
        assert!(points.iter().all(|p| p.online == 7));
        assert!(
            points.windows(2).all(|w| w[0].t_ms <= w[1].t_ms),
            "oldest first"
        );
        // Other tests of this binary count into the same counters: ours
        // are there at least, in a point after the first.
        assert!(
            points[1..]
                .iter()
                .any(|p| p.acked_per_s > 0.0 && p.ack_p99_ms.is_some()),
            "{points:?}"
        );
        for n in 0..POINTS + 5 {
            series.push(Point {
                t_ms: n as u64,
                acked_per_s: 0.0,
                ack_p99_ms: None,
                online: 0,
            });
        }
        let points = series.points();
        assert_eq!(points.len(), POINTS, "an hour at most");
        assert_eq!(points.last().map(|p| p.t_ms), Some(POINTS as u64 + 4));
    }

    #[test]
    fn p99_of_a_step() {
        let mut before = Snapshot {
            acked: 0,
            latency: [0; BUCKETS],
        };
        let mut now = Snapshot {
            acked: 0,
            latency: [0; BUCKETS],
        };
        assert_eq!(p99_ms(&before, &now), None, "nothing ACKed");
        // 990 ACKs at 2 ms, 10 at 40 ms: the p99 is 2 ms's bucket.
        now.latency[bucket(2_000)] = 990;
        now.latency[bucket(40_000)] = 10;
        let p = p99_ms(&before, &now).unwrap();
        assert!((2.0..2.5).contains(&p), "{p}");
        // 20 slow ones: the p99 is theirs.
        now.latency[bucket(40_000)] = 20;
        let p = p99_ms(&before, &now).unwrap();
        assert!((40.0..50.0).contains(&p), "{p}");
        // Only what happened between the snapshots counts.
        before.latency = now.latency;
        now.latency[bucket(500)] += 100;
        let p = p99_ms(&before, &now).unwrap();
        assert!((0.5..0.63).contains(&p), "{p}");
    }
}
