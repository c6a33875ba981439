//! Reconnect delays: exponential growth, capped, with full jitter.
//!
//! The n-th consecutive failure waits a uniformly random time in
//! `[0, min(max, initial * multiplier^n)]` ("full jitter"): a fleet that lost
//! its gateway at the same instant spreads its reconnects over the whole
//! window instead of arriving in synchronized waves.

use std::time::Duration;

use rand::Rng;

/// The reconnect policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    /// Ceiling of the first delay.
    pub initial: Duration,
    /// Ceiling of any delay.
    pub max: Duration,
    /// Growth of the ceiling per consecutive failure.
    pub multiplier: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(30),
            multiplier: 2.0,
        }
    }
}

impl Backoff {
    /// The ceiling for the `attempt`-th consecutive failure (0-based).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = self.multiplier.max(1.0).powi(attempt.min(64) as i32);
        let secs = (self.initial.as_secs_f64() * factor).min(self.max.as_secs_f64());
        Duration::from_secs_f64(secs.max(0.0))
    }

    /// A delay for the `attempt`-th consecutive failure, drawn with `rng`.
    pub fn delay(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling(attempt);
        if ceiling.is_zero() {
            return ceiling;
        }
        Duration::from_secs_f64(rng.gen_range(0.0..=ceiling.as_secs_f64()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn ceiling_grows_and_caps() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            multiplier: 2.0,
        };
        assert_eq!(b.ceiling(0), Duration::from_millis(100));
        assert_eq!(b.ceiling(1), Duration::from_millis(200));
        assert_eq!(b.ceiling(3), Duration::from_millis(800));
        assert_eq!(b.ceiling(4), Duration::from_secs(1));
        assert_eq!(b.ceiling(1000), Duration::from_secs(1));
    }

    #[test]
    fn delays_stay_within_ceiling_and_spread() {
        let b = Backoff::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let ds: Vec<Duration> = (0..1000).map(|_| b.delay(5, &mut rng)).collect();
        assert!(ds.iter().all(|d| *d <= b.ceiling(5)));
        let min = ds.iter().min().unwrap();
        let max = ds.iter().max().unwrap();
        assert!(*max - *min > b.ceiling(5) / 2, "full jitter spreads delays");
    }
}
