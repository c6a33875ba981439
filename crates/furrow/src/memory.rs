//! Giving the heap back after a burst of connections.
//!
//! A session's task, its readiness state and its buffers (about 2.5 KB)
//! are freed when it parks or closes, but glibc keeps freed pages that lie
//! between live objects (the registry entries and parked records allocated
//! meanwhile): after 10,000 devices connect in two seconds and park, about
//! 400 bytes per connection stay resident for nothing. `malloc_trim` hands
//! every whole free page back to the kernel (docs/performance.md, "Memory
//! per idle connection"). It walks the heap, so it runs only when there
//! is something to give back, checked once a second, after either
//!
//! * at least `sessions.trim_after` session tasks, and at least half of
//!   them, have ended or parked since the busiest moment (a busy fleet
//!   that went quiet), or
//! * at least `sessions.trim_after` connections have opened since the last
//!   trim and the burst is over: the last second brought at most an
//!   eighth of them. Sessions that park a few milliseconds after WELCOME
//!   never pile up as tasks, yet every handshake leaves its transient
//!   memory between the long-lived objects allocated meanwhile.
//!
//! A steady fleet whose tasks come and go at the same rate triggers
//! neither, and a steady trickle of reconnections at most once every
//! eight seconds.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::debug;

/// Session tasks alive now, and the most alive since the last trim.
static ALIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// Counts one session task while it lives (connection tasks hold one).
#[derive(Debug)]
pub struct TaskAlive(());

impl TaskAlive {
    /// Counts a task that is starting.
    pub fn new() -> Self {
        let now = ALIVE.fetch_add(1, Ordering::Relaxed) + 1;
        PEAK.fetch_max(now, Ordering::Relaxed);
        Self(())
    }
}

impl Default for TaskAlive {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TaskAlive {
    fn drop(&mut self) {
        ALIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the once-a-second check looks at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Activity {
    /// The most session tasks alive at once since the last trim.
    pub peak: usize,
    /// Session tasks alive now.
    pub alive: usize,
    /// Connections opened since the last trim.
    pub opened: usize,
    /// Of those, the ones opened since the previous check (a second ago).
    pub opened_lately: usize,
}

/// Whether the memory freed since the last trim is worth giving back
/// (`after` = 0: never): enough tasks have gone since the busiest moment,
/// at least `after` and at least half of them (the half keeps a fleet whose
/// active sessions swing by a few hundred around thousands from trimming
/// every second: each trim's pages would only be faulted back in); or
/// enough connections opened, at least `after`, and their burst is over,
/// the last second having brought at most an eighth of them.
pub fn worth_trimming(a: Activity, after: usize) -> bool {
    if after == 0 {
        return false;
    }
    let tasks_went = a.peak.saturating_sub(a.alive) >= after.max(a.peak / 2);
    let burst_over = a.opened >= after && a.opened_lately.saturating_mul(8) <= a.opened;
    tasks_went || burst_over
}

/// Checks once a second until `stop`, trimming when [`worth_trimming`];
/// `release` runs first (the store's page caches, which the burst's
/// device lookups filled), so that the pages it frees go back as well.
pub async fn run<F, Fut>(after: usize, stop: CancellationToken, release: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    if after == 0 {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Connections accepted (every listener) at the last trim and at the
    // previous check.
    let opened = crate::ingress::listener::connections_opened;
    let mut opened_at_trim = opened();
    let mut opened_at_check = opened_at_trim;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let alive = ALIVE.load(Ordering::Relaxed);
        let peak = PEAK.load(Ordering::Relaxed);
        let opened_now = opened();
        let activity = Activity {
            peak,
            alive,
            opened: opened_now.saturating_sub(opened_at_trim) as usize,
            opened_lately: opened_now.saturating_sub(opened_at_check) as usize,
        };
        opened_at_check = opened_now;
        if !worth_trimming(activity, after) {
            continue;
        }
        // From here the busiest moment is now: tasks that start and end
        // later count from this level, connections from this count.
        PEAK.store(alive, Ordering::Relaxed);
        opened_at_trim = opened_now;
        release().await;
        // It walks every arena under its lock: off the workers.
        let started = std::time::Instant::now();
        if let Ok(Some(freed)) = tokio::task::spawn_blocking(trim).await {
            metrics::counter!("furrow_memory_trims_total").increment(1);
            metrics::counter!("furrow_memory_trimmed_bytes_total").increment(freed);
            debug!(
                freed,
                alive,
                peak,
                opened = activity.opened,
                took_us = started.elapsed().as_micros() as u64,
                "gave freed heap pages back"
            );
        }
    }
}

/// Gives free heap pages back to the kernel; returns the resident bytes
/// that went (None where the allocator cannot).
pub fn trim() -> Option<u64> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let before = resident();
        // SAFETY: malloc_trim takes no pointer and only returns free pages
        // of glibc's own heap to the kernel (madvise); it locks each arena
        // as it goes, so it is safe to call while other threads allocate.
        unsafe {
            libc::malloc_trim(0);
        }
        Some(before.saturating_sub(resident()))
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

/// The process's resident bytes (Linux: /proc/self/statm), 0 if unknown.
fn resident() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * rustix::param::page_size() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tasks(peak: usize, alive: usize) -> Activity {
        Activity {
            peak,
            alive,
            ..Activity::default()
        }
    }

    fn opened(opened: usize, opened_lately: usize) -> Activity {
        Activity {
            opened,
            opened_lately,
            ..Activity::default()
        }
    }

    #[test]
    fn trims_only_after_enough_tasks_went() {
        assert!(!worth_trimming(tasks(1_000, 900), 256), "100 gone: not yet");
        assert!(worth_trimming(tasks(400, 144), 256));
        assert!(worth_trimming(tasks(1_250, 0), 256), "a burst that parked");
        assert!(worth_trimming(tasks(12_000, 6_000), 256), "half went");
        assert!(
            !worth_trimming(tasks(12_000, 11_000), 256),
            "a steady fleet's swing"
        );
        assert!(
            !worth_trimming(tasks(1_000, 1_200), 256),
            "more alive than the peak"
        );
        assert!(!worth_trimming(tasks(10_000, 0), 0), "0 turns it off");
    }

    #[test]
    fn trims_once_a_burst_of_connections_is_over() {
        // 1,000 devices connected and parked within milliseconds: no task
        // piled up, but their handshakes' memory is there to give back.
        assert!(worth_trimming(opened(1_000, 0), 256), "the burst is over");
        assert!(!worth_trimming(opened(1_000, 600), 256), "still connecting");
        assert!(!worth_trimming(opened(200, 0), 256), "too few");
        assert!(!worth_trimming(opened(10_000, 0), 0), "0 turns it off");
    }

    #[test]
    fn a_steady_trickle_of_connections_trims_seldom() {
        // 100 connections a second, every second: the check sees
        // `opened` grow by 100 a tick and trims when a tick brings at most
        // an eighth of what came since the last trim.
        let (mut since, mut trims) = (0, 0);
        for _ in 0..80 {
            since += 100;
            if worth_trimming(opened(since, 100), 256) {
                trims += 1;
                since = 0;
            }
        }
        assert_eq!(trims, 10, "once every 8 s over 80 s");
    }

    #[test]
    fn tasks_are_counted_while_they_live() {
        let base = ALIVE.load(Ordering::Relaxed);
        let tasks: Vec<_> = (0..3).map(|_| TaskAlive::new()).collect();
        assert!(ALIVE.load(Ordering::Relaxed) >= base + 3);
        assert!(PEAK.load(Ordering::Relaxed) >= base + 3);
        drop(tasks);
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn trimming_returns_freed_pages() {
        // 64 MiB in 16 KiB blocks, every other block kept: the freed half
        // is whole pages between live blocks, as after a burst.
        let mut blocks: Vec<Vec<u8>> = (0..4096).map(|_| vec![1u8; 16 * 1024]).collect();
        let kept: Vec<Vec<u8>> = blocks
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| i % 2 == 0)
            .map(|(_, b)| std::mem::take(b))
            .collect();
        drop(blocks);
        let freed = trim().unwrap_or(0);
        assert!(
            freed >= 16 * 1024 * 1024,
            "only {freed} bytes given back of 32 MiB freed"
        );
        drop(kept);
    }
}
