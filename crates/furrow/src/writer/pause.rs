//! The writer's wait before a paced commit, to the tenth of a millisecond.
//!
//! Tokio's timer wheel ticks once a millisecond and rounds every deadline
//! up to the next tick, so a 1 ms pacing interval made a batch wait 1-2 ms,
//! and the ACK tail with it. A timerfd registered in the runtime's own
//! reactor (epoll) wakes at the deadline itself, for one `timerfd_settime`
//! per paced commit (at most one per interval). Tokio's timer stays for
//! tests and simulations that run on a paused clock, which a timerfd would
//! not follow, and where no timerfd can be made (docs/performance.md,
//! "Pacing on a timerfd").

use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::time::{Instant, Sleep};

/// How the writer waits out the rest of a pacing interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaceTimer {
    /// A timerfd in the reactor: wakes within tens of microseconds.
    Precise,
    /// Tokio's timer: millisecond ticks, follows a paused test clock.
    Runtime,
}

/// One reusable deadline (reset per batch, not made per job).
pub(super) enum Pause {
    Precise {
        fd: AsyncFd<OwnedFd>,
        deadline: Instant,
    },
    Runtime(Pin<Box<Sleep>>),
}

impl Pause {
    pub(super) fn new(timer: PaceTimer) -> Self {
        let now = Instant::now();
        if timer == PaceTimer::Precise {
            match timerfd() {
                Ok(fd) => return Pause::Precise { fd, deadline: now },
                Err(e) => {
                    tracing::warn!(error = %e, "no timerfd for commit pacing; using Tokio's millisecond timer")
                }
            }
        }
        Pause::Runtime(Box::pin(tokio::time::sleep_until(now)))
    }

    pub(super) fn deadline(&self) -> Instant {
        match self {
            Pause::Precise { deadline, .. } => *deadline,
            Pause::Runtime(sleep) => sleep.deadline(),
        }
    }

    /// Arms the pause for `deadline`; [`Pause::wait`] then completes at it.
    pub(super) fn reset(&mut self, deadline: Instant) {
        match self {
            Pause::Precise { fd, deadline: d } => {
                *d = deadline;
                // A zero it_value disarms a timerfd: a deadline already
                // past fires after a nanosecond instead.
                let rel = deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_nanos(1));
                if let Err(e) = arm(fd.get_ref(), rel) {
                    // Not expected (the fd is ours and the value valid);
                    // the wait then ends at once, so a commit only loses
                    // its pacing, never its turn.
                    tracing::warn!(error = %e, "timerfd_settime failed");
                    let _ = arm(fd.get_ref(), Duration::from_nanos(1));
                }
            }
            Pause::Runtime(sleep) => sleep.as_mut().reset(deadline),
        }
    }

    /// Completes once the deadline last set has passed. Cancel-safe: a
    /// `select!` that drops it leaves the pause armed for the next call.
    pub(super) async fn wait(&mut self) {
        match self {
            Pause::Precise { fd, deadline } => loop {
                // The expiry may have been read already (a wait for the
                // same deadline again): the clock, not the fd, decides.
                if Instant::now() >= *deadline {
                    return;
                }
                let Ok(mut guard) = fd.readable().await else {
                    return;
                };
                let mut expirations = [0u8; 8];
                match guard.try_io(|fd| {
                    rustix::io::read(fd.get_ref(), &mut expirations).map_err(std::io::Error::from)
                }) {
                    Ok(Ok(_)) => return,
                    // Readiness left over from a deadline re-armed since:
                    // try_io cleared it, wait for the real one.
                    Err(_would_block) => continue,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "reading the pacing timerfd failed");
                        return;
                    }
                }
            },
            Pause::Runtime(sleep) => sleep.as_mut().await,
        }
    }
}

fn timerfd() -> std::io::Result<AsyncFd<OwnedFd>> {
    use rustix::time::{timerfd_create, TimerfdClockId, TimerfdFlags};
    let fd = timerfd_create(
        TimerfdClockId::Monotonic,
        TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
    )?;
    // SAFETY: an `OwnedFd` keeps its descriptor open until it is dropped
    // and `as_raw_fd` always returns that one; the `AsyncFd` owns it, so
    // the descriptor stays the same for the whole registration (the
    // parking lot registers its epoll the same way, session/park.rs).
    Ok(unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)? })
}

fn arm(fd: &OwnedFd, after: Duration) -> std::io::Result<()> {
    use rustix::time::{timerfd_settime, Itimerspec, TimerfdTimerFlags};
    let zero = rustix::time::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let value = rustix::time::Timespec::try_from(after)
        .map_err(|_| std::io::Error::other("pacing deadline out of range"))?;
    timerfd_settime(
        fd,
        TimerfdTimerFlags::empty(),
        &Itimerspec {
            it_interval: zero,
            it_value: value,
        },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_precise_pause_never_ends_before_its_deadline() {
        let mut pause = Pause::new(PaceTimer::Precise);
        assert!(matches!(pause, Pause::Precise { .. }));
        for _ in 0..20 {
            let start = Instant::now();
            let deadline = start + Duration::from_micros(300);
            pause.reset(deadline);
            pause.wait().await;
            let now = Instant::now();
            assert!(now >= deadline, "woke {:?} early", deadline - now);
        }
    }

    #[tokio::test]
    async fn a_pause_re_armed_before_it_fired_waits_for_the_new_deadline() {
        let mut pause = Pause::new(PaceTimer::Precise);
        pause.reset(Instant::now() + Duration::from_micros(50));
        tokio::time::sleep(Duration::from_millis(5)).await;
        // The first deadline has fired unread; the new one must still be waited for.
        let deadline = Instant::now() + Duration::from_millis(20);
        pause.reset(deadline);
        pause.wait().await;
        assert!(Instant::now() >= deadline);
        assert_eq!(pause.deadline(), deadline);
    }

    #[tokio::test]
    async fn a_second_wait_for_a_deadline_that_passed_ends_at_once() {
        let mut pause = Pause::new(PaceTimer::Precise);
        pause.reset(Instant::now() + Duration::from_millis(1));
        pause.wait().await;
        // The writer skips the reset when a batch's deadline equals the
        // last one; the timerfd's expiry has been read by then.
        tokio::time::timeout(Duration::from_secs(5), pause.wait())
            .await
            .expect("a deadline that has passed must not be waited for again");
    }

    #[tokio::test]
    async fn a_deadline_already_past_ends_at_once() {
        let mut pause = Pause::new(PaceTimer::Precise);
        let past = Instant::now();
        tokio::time::sleep(Duration::from_millis(2)).await;
        pause.reset(past);
        tokio::time::timeout(Duration::from_secs(5), pause.wait())
            .await
            .expect("a past deadline must not hang");
    }
}
