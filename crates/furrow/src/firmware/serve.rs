//! What sessions share to serve firmware: the images in memory, and the
//! download slots of each job on this instance.
//!
//! A session serves CHUNKs straight from an [`Image`] in memory (a slice of
//! one `Bytes`, no read per chunk), so a thousand devices pulling the same
//! image cost one copy of it. [`Images`] loads each image once (concurrent
//! sessions wait for the same load) and keeps the most recently used ones
//! up to `firmware.cache_bytes`; an image still being served stays alive
//! through its sessions' `Arc`s even when evicted.
//!
//! [`Pace`] caps the bytes of firmware this instance sends per second (all
//! sessions together, `firmware.max_bytes_per_s`): a session whose next
//! CHUNK would go over it holds the request (and reads no more once it
//! holds a window of them) until the pace allows, so a rollout takes a
//! bounded share of the gateway's CPU and uplink and telemetry keeps its
//! latency.
//!
//! [`Slots`] caps how many devices of one job download at once here (the
//! job's `max_downloads`), so that a rollout cannot take the gateway's
//! whole uplink: a device gets its FIRMWARE_OFFER only with a slot, holds
//! it until it has been sent the image's last byte or its connection ends,
//! and a freed slot wakes the device that has waited longest.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::FirmwareRecord;
use crate::devices::registry::Registry;
use crate::store::prelude::*;
use crate::store::StoreError;

/// An image ready to serve.
#[derive(Debug)]
pub struct Image {
    /// Its metadata.
    pub record: FirmwareRecord,
    /// Its SHA-256 (id), raw.
    pub id: [u8; 32],
    /// Its signature, raw.
    pub signature: [u8; 64],
    /// Every byte.
    pub bytes: Bytes,
}

struct Entry {
    cell: Arc<tokio::sync::OnceCell<Arc<Image>>>,
    used: u64,
}

/// The images in memory (see the module docs).
pub struct Images {
    store: Arc<dyn Store>,
    cap: u64,
    inner: Mutex<(HashMap<String, Entry>, u64)>,
}

impl Images {
    /// An empty cache of at most `cap` bytes over `store`.
    pub fn new(store: Arc<dyn Store>, cap: u64) -> Self {
        Self {
            store,
            cap,
            inner: Mutex::new((HashMap::new(), 0)),
        }
    }

    /// The image `id`, loaded from the store on first use; `None` if the
    /// store has no such image (deleted) or its bytes do not match it.
    pub async fn get(&self, id: &str) -> Result<Option<Arc<Image>>, StoreError> {
        let cell = {
            let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            g.1 += 1;
            let tick = g.1;
            let e = g.0.entry(id.to_owned()).or_insert_with(|| Entry {
                cell: Arc::new(tokio::sync::OnceCell::new()),
                used: tick,
            });
            e.used = tick;
            Arc::clone(&e.cell)
        };
        let loaded = cell
            .get_or_try_init(|| async {
                let Some(record) = self.store.firmware(id).await.map_err(Some)? else {
                    return Err(None);
                };
                let Some(bytes) = self.store.firmware_bytes(id).await.map_err(Some)? else {
                    return Err(None);
                };
                let (Some(raw_id), Some(signature)) = (record.image_id(), record.signature_bytes())
                else {
                    return Err(None);
                };
                // The store is trusted, but a damaged file must not be
                // served as the signed image: devices would fetch it whole
                // and refuse it at the end.
                let digest: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(&bytes[..]).into();
                if digest != raw_id || bytes.len() as u64 != record.size {
                    tracing::error!(
                        image = id,
                        "stored firmware does not match its SHA-256; not serving it"
                    );
                    metrics::counter!("furrow_firmware_damaged_total").increment(1);
                    return Err(None);
                }
                metrics::counter!("furrow_firmware_cache_loads_total").increment(1);
                Ok(Arc::new(Image {
                    record,
                    id: raw_id,
                    signature,
                    bytes,
                }))
            })
            .await;
        match loaded {
            Ok(img) => {
                let img = Arc::clone(img);
                self.evict();
                Ok(Some(img))
            }
            Err(None) => {
                self.forget(id);
                Ok(None)
            }
            Err(Some(e)) => {
                self.forget(id);
                Err(e)
            }
        }
    }

    /// Drops an image from memory (deleted, or failed to load).
    pub fn forget(&self, id: &str) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.0.remove(id);
    }

    /// Keeps the loaded images within the cap, least recently used first
    /// out (the newest one always stays).
    fn evict(&self) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let size = |e: &Entry| e.cell.get().map_or(0, |i| i.bytes.len() as u64);
        let mut total: u64 = g.0.values().map(size).sum();
        while total > self.cap && g.0.len() > 1 {
            let Some(oldest) =
                g.0.iter()
                    .min_by_key(|(_, e)| e.used)
                    .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some(e) = g.0.remove(&oldest) {
                total -= size(&e);
            }
        }
        metrics::gauge!("furrow_firmware_cache_bytes").set(total as f64);
    }
}

/// Download slots per job on this instance (see the module docs).
pub struct Slots {
    registry: Arc<Registry>,
    jobs: Mutex<HashMap<u64, JobSlots>>,
}

#[derive(Default)]
struct JobSlots {
    active: u32,
    waiting: VecDeque<Arc<str>>,
    queued: HashSet<Arc<str>>,
}

/// A held download slot; dropping it frees the slot and wakes the device
/// that has waited longest for one.
pub struct SlotGuard {
    slots: Arc<Slots>,
    job: u64,
}

impl std::fmt::Debug for SlotGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SlotGuard(job {})", self.job)
    }
}

impl Slots {
    /// No slot taken; freed slots wake devices through `registry`.
    pub fn new(registry: Arc<Registry>) -> Arc<Self> {
        Arc::new(Self {
            registry,
            jobs: Mutex::new(HashMap::new()),
        })
    }

    /// A slot of `job` (at most `limit` at once, 0: no limit) for
    /// `device`, or `None`: the device is queued and woken when one frees.
    pub fn try_acquire(
        self: &Arc<Self>,
        job: u64,
        limit: u32,
        device: &Arc<str>,
    ) -> Option<SlotGuard> {
        let mut g = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let slots = g.entry(job).or_default();
        if limit > 0 && slots.active >= limit {
            if slots.queued.insert(Arc::clone(device)) {
                slots.waiting.push_back(Arc::clone(device));
            }
            metrics::counter!("furrow_firmware_slot_waits_total").increment(1);
            return None;
        }
        if slots.queued.remove(device) {
            slots.waiting.retain(|d| d != device);
        }
        slots.active += 1;
        metrics::gauge!("furrow_firmware_downloads_active").increment(1.0);
        Some(SlotGuard {
            slots: Arc::clone(self),
            job,
        })
    }

    /// Slots of `job` in use here.
    pub fn active(&self, job: u64) -> u32 {
        let g = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        g.get(&job).map_or(0, |s| s.active)
    }

    fn release(&self, job: u64) {
        let mut wake = Vec::new();
        {
            let mut g = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
            let Some(slots) = g.get_mut(&job) else {
                return;
            };
            slots.active = slots.active.saturating_sub(1);
            // Wake the longest waiting device still connected here; one
            // that left is dropped from the queue.
            while let Some(d) = slots.waiting.pop_front() {
                slots.queued.remove(&d);
                if self.registry.is_online(&d) {
                    wake.push(d);
                    break;
                }
            }
            if slots.active == 0 && slots.waiting.is_empty() {
                g.remove(&job);
            }
        }
        metrics::gauge!("furrow_firmware_downloads_active").decrement(1.0);
        for d in wake {
            self.registry.notify_commands(&d);
        }
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.slots.release(self.job);
    }
}

/// The instance's firmware byte rate (GCRA over one atomic: sessions on
/// every worker thread pay into it without a lock).
#[derive(Debug)]
pub struct Pace {
    base: std::time::Instant,
    /// Nanoseconds per byte, scaled by 2^16 (0: no limit).
    ns_per_byte_q16: u64,
    /// How far ahead of the rate a burst may run, ns.
    tolerance_ns: u64,
    /// Theoretical arrival time of the next byte, ns since `base`.
    tat: std::sync::atomic::AtomicU64,
}

impl Pace {
    /// `bytes_per_s` (0: no limit) with bursts of `burst` bytes.
    pub fn new(bytes_per_s: u64, burst: u64) -> Self {
        let ns_per_byte_q16 = if bytes_per_s == 0 {
            0
        } else {
            ((1_000_000_000u128 << 16) / u128::from(bytes_per_s)).max(1) as u64
        };
        Self {
            base: std::time::Instant::now(),
            ns_per_byte_q16,
            tolerance_ns: ((u128::from(burst) * u128::from(ns_per_byte_q16)) >> 16) as u64,
            tat: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Books `bytes` and says when they may go: `now` while the rate and
    /// its burst allow, else the time their turn comes. Every request
    /// books its own turn (and the backlog grows by it), so sessions
    /// waiting for the pace each wake once, at their turn, in the order
    /// they asked: no herd of sessions retrying at the same instant.
    pub fn reserve(&self, bytes: u64, now: tokio::time::Instant) -> tokio::time::Instant {
        use std::sync::atomic::Ordering;
        if self.ns_per_byte_q16 == 0 {
            return now;
        }
        let now_ns = now
            .into_std()
            .saturating_duration_since(self.base)
            .as_nanos() as u64;
        let cost = ((u128::from(bytes) * u128::from(self.ns_per_byte_q16)) >> 16) as u64;
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let start = tat.max(now_ns);
            match self.tat.compare_exchange_weak(
                tat,
                start + cost,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    // Within the burst: at once; beyond: when the
                    // backlog ahead of it is down to the burst.
                    let wait = start.saturating_sub(now_ns + self.tolerance_ns);
                    return now + std::time::Duration::from_nanos(wait);
                }
                Err(t) => tat = t,
            }
        }
    }
}

/// What sessions need to serve firmware, shared by all of them.
pub struct Service {
    /// Images in memory.
    pub images: Images,
    /// Download slots per job.
    pub slots: Arc<Slots>,
    /// The instance's firmware byte rate.
    pub pace: Arc<Pace>,
    /// The offers' `chunk_max` (see `Config::chunk_max`).
    pub chunk_max: u32,
    /// The offers' `window`.
    pub window: u16,
}

impl Service {
    /// The service for a gateway with `cfg` over `store`.
    pub fn new(cfg: &crate::Config, store: Arc<dyn Store>, registry: Arc<Registry>) -> Arc<Self> {
        Arc::new(Self {
            images: Images::new(store, cfg.firmware.cache_bytes),
            slots: Slots::new(registry),
            // Bursts of a few chunks per device, or a twentieth of a second.
            pace: Arc::new(Pace::new(
                cfg.firmware.max_bytes_per_s,
                (u64::from(cfg.chunk_max()) * 4).max(cfg.firmware.max_bytes_per_s / 20),
            )),
            chunk_max: cfg.chunk_max(),
            window: cfg.firmware.window,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pace_allows_its_rate_and_a_burst() {
        let pace = Pace::new(1_000_000, 100_000);
        let t0 = tokio::time::Instant::now();
        // The burst goes at once; later requests get their turns, in the
        // order they asked, a request's worth of time apart.
        let turns: Vec<_> = (0..30).map(|_| pace.reserve(10_000, t0) - t0).collect();
        let at_once = turns.iter().filter(|d| d.is_zero()).count();
        assert!((10..=11).contains(&at_once), "{turns:?}");
        for w in turns.windows(2).skip(at_once) {
            assert_eq!(
                w[1] - w[0],
                std::time::Duration::from_millis(10),
                "{turns:?}"
            );
        }
        // 30 requests of 10 kB at 1 MB/s with a 100 kB burst: the last
        // goes 0.2 s in.
        let last = *turns.last().unwrap();
        assert!(
            last >= std::time::Duration::from_millis(190)
                && last <= std::time::Duration::from_millis(210),
            "{last:?}"
        );
        // Idle long enough, the burst is back.
        let later = t0 + std::time::Duration::from_secs(5);
        assert_eq!(pace.reserve(10_000, later), later);
        assert_eq!(Pace::new(0, 0).reserve(u64::MAX / 2, t0), t0, "0: no limit");
    }

    #[test]
    fn slots_cap_a_job_and_free_in_turn() {
        let slots = Slots::new(Arc::new(Registry::new()));
        let (a, b, c): (Arc<str>, Arc<str>, Arc<str>) = ("a".into(), "b".into(), "c".into());
        let ga = slots.try_acquire(1, 2, &a).unwrap();
        let _gb = slots.try_acquire(1, 2, &b).unwrap();
        assert!(slots.try_acquire(1, 2, &c).is_none(), "the third waits");
        assert!(slots.try_acquire(1, 2, &c).is_none(), "queued once");
        assert!(
            slots.try_acquire(2, 2, &c).is_some(),
            "another job has its own"
        );
        assert_eq!(slots.active(1), 2);
        drop(ga);
        assert_eq!(slots.active(1), 1);
        let gc = slots.try_acquire(1, 2, &c);
        assert!(gc.is_some(), "the freed slot");
        assert_eq!(slots.active(1), 2);
        drop(gc);
        assert_eq!(slots.active(1), 1, "a dropped guard frees its slot");
        assert!(slots.try_acquire(3, 0, &a).is_some(), "0: no limit");
    }
}
