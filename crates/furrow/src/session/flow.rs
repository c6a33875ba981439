//! Keepalive accounting with backpressure pauses. Pure: the caller passes
//! the time.
//!
//! A device must send a complete frame within 1.5 x keepalive. Time the
//! gateway spends not reading (backpressure: window full, writer queue
//! full, throttled) does not count, and neither does the time after it
//! resumes until bytes flow again: a sender that met a closed TCP window
//! retries on the zero-window persist timer, which backs off (seen: seconds
//! of silence on loopback after the gateway had resumed reading). A dead
//! peer is still noticed then, after a longer grace.

use std::time::Duration;

use tokio::time::Instant;

/// After backpressure ends, how long the gateway waits at least for bytes to
/// flow again before judging the peer dead.
pub const RESUME_GRACE: Duration = Duration::from_secs(10);

/// One session's keepalive clock.
#[derive(Debug, Clone)]
pub struct Keepalive {
    period: Duration,
    /// The connection is dropped if no complete frame arrives before this.
    idle_deadline: Instant,
    /// When reading stopped for backpressure.
    paused_at: Option<Instant>,
    /// When reading resumed after a pause, until bytes flow again.
    resumed_at: Option<Instant>,
}

impl Keepalive {
    /// A clock that expires `period` after `now` without a frame.
    pub fn new(period: Duration, now: Instant) -> Self {
        Self {
            period,
            idle_deadline: now + period,
            paused_at: None,
            resumed_at: None,
        }
    }

    /// A complete frame arrived.
    pub fn frame_read(&mut self, now: Instant) {
        self.idle_deadline = now + self.period;
    }

    /// Whether the session reads now; a change starts or ends a pause.
    pub fn reading(&mut self, can_read: bool, now: Instant) {
        match (can_read, self.paused_at) {
            (false, None) => self.paused_at = Some(now),
            (true, Some(p)) => {
                self.idle_deadline += now.saturating_duration_since(p);
                self.paused_at = None;
                self.resumed_at.get_or_insert(now);
            }
            _ => {}
        }
    }

    /// Bytes arrived: the wait since resuming was not idleness.
    pub fn bytes_read(&mut self, now: Instant) {
        if let Some(r) = self.resumed_at.take() {
            self.idle_deadline += now.saturating_duration_since(r);
        }
    }

    /// When the peer is judged dead if nothing arrives (while reading).
    pub fn deadline(&self) -> Instant {
        match self.resumed_at {
            Some(r) => r + (self.period * 2).max(RESUME_GRACE),
            None => self.idle_deadline,
        }
    }

    /// The clock reduced to what a parked session keeps: its period and
    /// the deadline now in force (a grace after a pause included).
    pub fn park(&self) -> (Duration, Instant) {
        (self.period, self.deadline())
    }

    /// A parked clock back: expires at `deadline` without a frame.
    pub fn resume(period: Duration, deadline: Instant) -> Self {
        Self {
            period,
            idle_deadline: deadline,
            paused_at: None,
            resumed_at: None,
        }
    }

    /// Whether a reading session has waited too long.
    pub fn expired(&self, now: Instant) -> bool {
        self.paused_at.is_none() && now >= self.deadline()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_push_the_deadline() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(Duration::from_secs(15), t0);
        assert!(!k.expired(t0 + Duration::from_secs(14)));
        assert!(k.expired(t0 + Duration::from_secs(15)));
        k.frame_read(t0 + Duration::from_secs(10));
        assert!(!k.expired(t0 + Duration::from_secs(24)));
        assert!(k.expired(t0 + Duration::from_secs(25)));
    }

    #[test]
    fn pauses_do_not_count_and_resuming_has_a_grace() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut k = Keepalive::new(s(3), t0);
        k.reading(false, t0 + s(1));
        // Paused: never expired.
        assert!(!k.expired(t0 + s(100)));
        k.reading(true, t0 + s(101));
        // Resumed without bytes yet: the grace (max(2 x 3 s, 10 s)) applies.
        assert_eq!(k.deadline(), t0 + s(111));
        assert!(!k.expired(t0 + s(110)));
        assert!(k.expired(t0 + s(111)));
        // Bytes flow at 105 s: the 4 s since resuming are forgiven too
        // (3 s period, 1 s used before the pause, 100 s paused, 4 s waiting).
        k.bytes_read(t0 + s(105));
        assert_eq!(k.deadline(), t0 + s(107));
    }
}
