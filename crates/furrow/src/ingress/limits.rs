//! Limits that protect the gateway from too many connections, a flood of
//! them from one address, a device that sends faster than its share, and
//! token guessing. Each limit has a setting under `[limits]`, a metric and
//! a test (`tests/limits.rs`, `tests/slowloris.rs`).
//!
//! * **Connections** ([`Limiter::admit`]): counted from accept, whatever the
//!   phase (PROXY header, TLS, HELLO, active). Beyond `max_connections` a new
//!   connection gets ERROR BUSY and is closed before any session exists.
//! * **Connect rate per address** ([`Limiter::allow_connect`]): a token bucket
//!   per source address (an IPv6 address counts as its /64, what one
//!   subscriber usually gets). It is applied where the real peer is known:
//!   behind a balancer, after the PROXY header, so the balancer's own
//!   address is never the one limited. Beyond it: ERROR BUSY, close (the
//!   protocol's answer for "retry later"; a device backs off).
//! * **Telemetry rate per device** ([`Throttle`]): a token bucket per
//!   session. Out of tokens, the session stops reading its socket until the
//!   next token is due, so the device slows down through TCP flow control;
//!   nothing is dropped or rejected, and the time does not count against
//!   the keepalive (it is a backpressure pause).
//! * **Authentication failures** ([`Limiter::auth_failed`],
//!   [`Limiter::delay_slot`]): counted per source address and per device id.
//!   Past `auth_failures_free` failures, each further *failed* answer waits
//!   a delay that doubles (capped at `auth_delay_max_ms`): a tarpit for the
//!   failing side only. Nothing is banned, and no check happens before the
//!   credentials are: a HELLO with a valid token (or certificate) is
//!   welcomed at once whatever others failed from its address (carrier NAT,
//!   a site's router) or for its device id (a guessable serial number).
//!   Tokens are 256 random bits, so guessing is not the threat; locking
//!   valid devices out is. At most `auth_delayed_max` answers wait at once,
//!   so a flood of wrong tokens cannot hold `max_connections` hostage;
//!   beyond that, failures are answered at once. Unknown devices and wrong
//!   tokens take the same path (store lookup, delay, the same ERROR
//!   AUTH_FAILED). The connect rate per address stays the flood defence.
//!
//! Every map of addresses or device ids is bounded (`tracked_keys_max`):
//! idle entries are swept every few seconds ([`Limiter::upkeep`]), and a
//! full map evicts its least recently used eighth at once (amortised O(1)).
//! Evicting an active entry forgets its history, which favours the evicted
//! key; only an attacker with more addresses than the cap gains from it,
//! and such an attacker is not stopped by a per-address limit anyway.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::BytesMut;
use furrow_proto::{ErrorCode, ErrorMsg, Message, Str};
use futures_util::future::{Either, FutureExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::config;

/// How often [`Limiter::upkeep`] should run.
pub const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The gateway's limits and the state they keep. One per gateway, shared by
/// the accept loop and every session.
pub struct Limiter {
    cfg: config::Limits,
    open: Arc<AtomicUsize>,
    connects: Mutex<Tracked<IpKey, TokenBucket>>,
    auth_by_addr: Mutex<Tracked<IpKey, Failures>>,
    auth_by_device: Mutex<Tracked<Box<str>, Failures>>,
    /// Failed answers waiting out their delay now.
    delayed: Arc<AtomicUsize>,
}

/// Held by a failed answer while it waits out its delay.
pub struct DelaySlot(Arc<AtomicUsize>);

impl Drop for DelaySlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!("furrow_auth_delayed").decrement(1.0);
    }
}

/// Held by a connection for its whole life (in its task, or parked); frees
/// its place on drop.
pub struct ConnPermit(Arc<AtomicUsize>);

impl Drop for ConnPermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The key of a source address: IPv4 as is, IPv6 by its /64 (one
/// subscriber's network, which it may fill with addresses at will).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpKey {
    /// An IPv4 address (or an IPv4-mapped IPv6 one).
    V4([u8; 4]),
    /// The first 64 bits of an IPv6 address.
    V6([u8; 8]),
}

impl From<IpAddr> for IpKey {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => IpKey::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpKey::V4(v4.octets()),
                None => {
                    let o = v6.octets();
                    let mut p = [0u8; 8];
                    p.copy_from_slice(&o[..8]);
                    IpKey::V6(p)
                }
            },
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The maps stay consistent at every step, so a panic elsewhere while
    // holding the lock leaves nothing half-done: carry on.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Limiter {
    /// Limits from the configuration, with nothing tracked yet.
    pub fn new(cfg: &config::Limits) -> Self {
        let cap = cfg.tracked_keys_max;
        Self {
            cfg: cfg.clone(),
            open: Arc::new(AtomicUsize::new(0)),
            connects: Mutex::new(Tracked::new(cap)),
            auth_by_addr: Mutex::new(Tracked::new(cap)),
            auth_by_device: Mutex::new(Tracked::new(cap)),
            delayed: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// A place for one more connection, or `None` at `max_connections`.
    pub fn try_connection(&self) -> Option<ConnPermit> {
        let max = self.cfg.max_connections;
        let prev = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            });
        match prev {
            Ok(_) => Some(ConnPermit(Arc::clone(&self.open))),
            Err(_) => None,
        }
    }

    /// Connections holding a place now.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Runs `serve(stream)` holding a connection place, or, at
    /// `max_connections`, answers ERROR BUSY and closes without building a
    /// session. Called by the accept loop for each new connection. A TLS
    /// listener, whose clients cannot read a plaintext ERROR before the TLS
    /// handshake, should take [`Self::try_connection`] and just close.
    pub fn admit<S, F, G>(
        &self,
        stream: S,
        serve: G,
    ) -> impl std::future::Future<Output = ()> + Send + 'static + use<S, F, G>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        F: std::future::Future<Output = ()> + Send + 'static,
        G: FnOnce(S, ConnPermit) -> F,
    {
        match self.try_connection() {
            // The session holds the permit, in its task or parked.
            Some(permit) => Either::Left(serve(stream, permit)),
            None => {
                refused("max_connections");
                Either::Right(refuse_busy(stream))
            }
        }
    }

    /// Like [`Self::admit`] for the TLS listener, whose clients cannot read
    /// a plaintext ERROR before their handshake: at `max_connections` the
    /// connection is closed without a word (counted all the same).
    pub fn admit_silent<S, F, G>(
        &self,
        stream: S,
        serve: G,
    ) -> impl std::future::Future<Output = ()> + Send + 'static + use<S, F, G>
    where
        S: Send + 'static,
        F: std::future::Future<Output = ()> + Send + 'static,
        G: FnOnce(S, ConnPermit) -> F,
    {
        match self.try_connection() {
            Some(permit) => Either::Left(serve(stream, permit)),
            None => {
                refused("max_connections");
                drop(stream);
                Either::Right(std::future::ready(()))
            }
        }
    }

    /// Whether a new connection from `ip` is within its connect rate
    /// (taking a token if so). Counts a refusal.
    pub fn allow_connect(&self, ip: IpAddr, now: Instant) -> bool {
        let rate = self.cfg.connect_rate_per_ip;
        if rate == 0 {
            return true;
        }
        let burst = self.cfg.connect_burst_per_ip;
        let ok = lock(&self.connects)
            .entry(IpKey::from(ip), now, || TokenBucket::new(rate, burst, now))
            .try_take(now);
        if !ok {
            refused("connect_rate");
        }
        ok
    }

    /// Records a failed authentication and returns how long to wait before
    /// answering it (zero within the free failures).
    pub fn auth_failed(&self, ip: IpAddr, device_id: &str, now: Instant) -> Duration {
        metrics::counter!("furrow_auth_failures_total").increment(1);
        let policy = self.auth_policy();
        let n_addr = lock(&self.auth_by_addr)
            .entry(IpKey::from(ip), now, Failures::default)
            .record(now, &policy);
        let n_dev = lock(&self.auth_by_device)
            .entry(device_id.into(), now, Failures::default)
            .record(now, &policy);
        let delay = policy.delay(n_addr.max(n_dev));
        if !delay.is_zero() {
            metrics::counter!("furrow_auth_delays_total").increment(1);
        }
        delay
    }

    /// A place among the failed answers waiting out a delay, or `None` when
    /// `auth_delayed_max` already wait (then the answer goes at once).
    pub fn delay_slot(&self) -> Option<DelaySlot> {
        let max = self.cfg.auth_delayed_max;
        let taken = self
            .delayed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            });
        if taken.is_err() {
            metrics::counter!("furrow_auth_delays_skipped_total").increment(1);
            return None;
        }
        metrics::gauge!("furrow_auth_delayed").increment(1.0);
        Some(DelaySlot(Arc::clone(&self.delayed)))
    }

    /// Failed answers waiting out their delay now.
    pub fn delayed_now(&self) -> usize {
        self.delayed.load(Ordering::Acquire)
    }

    /// A device proved its token: its own failures are forgotten (not its
    /// address's, which other devices may share with a guesser).
    pub fn auth_succeeded(&self, device_id: &str) {
        lock(&self.auth_by_device).remove(device_id);
    }

    /// A per-session telemetry throttle, or `None` when the rate is off.
    pub fn throttle(&self, now: Instant) -> Option<Throttle> {
        let rate = self.cfg.telemetry_rate_per_device;
        (rate > 0).then(|| Throttle {
            bucket: TokenBucket::new(rate, self.cfg.telemetry_burst_per_device, now),
            since: None,
        })
    }

    /// Forgets idle entries (full buckets, failures past their window) and
    /// updates the gauges. Run every [`UPKEEP_EVERY`].
    pub fn upkeep(&self, now: Instant) {
        let window = Duration::from_millis(self.cfg.auth_window_ms);
        let (n_connects, n_addr, n_dev) = {
            let mut c = lock(&self.connects);
            c.sweep(|b| b.is_full(now));
            let mut a = lock(&self.auth_by_addr);
            a.sweep(|f| f.idle(now, window));
            let mut d = lock(&self.auth_by_device);
            d.sweep(|f| f.idle(now, window));
            (c.map.len(), a.map.len(), d.map.len())
        };
        metrics::gauge!("furrow_limits_tracked_keys", "map" => "connect_rate")
            .set(n_connects as f64);
        metrics::gauge!("furrow_limits_tracked_keys", "map" => "auth_address").set(n_addr as f64);
        metrics::gauge!("furrow_limits_tracked_keys", "map" => "auth_device").set(n_dev as f64);
    }

    /// Runs [`Self::upkeep`] forever (the server aborts it at shutdown).
    pub async fn run_upkeep(self: Arc<Self>) {
        loop {
            tokio::time::sleep(UPKEEP_EVERY).await;
            self.upkeep(Instant::now());
        }
    }

    fn auth_policy(&self) -> AuthPolicy {
        AuthPolicy {
            free: self.cfg.auth_failures_free,
            base: Duration::from_millis(self.cfg.auth_delay_base_ms),
            max: Duration::from_millis(self.cfg.auth_delay_max_ms),
            window: Duration::from_millis(self.cfg.auth_window_ms),
        }
    }
}

/// Counts a connection refused for `reason`.
pub(crate) fn refused(reason: &'static str) {
    metrics::counter!("furrow_connections_refused_total", "reason" => reason).increment(1);
}

/// ERROR BUSY, then close: bounded in time (1 s to write 20-odd bytes)
/// and in memory (one small frame, a small buffer to drain what the
/// device already sent, so that the close is a FIN rather than a reset
/// that could discard the ERROR on its way).
pub async fn refuse_busy<S>(mut stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut frame = BytesMut::with_capacity(32);
    let msg = Message::Error(ErrorMsg {
        code: ErrorCode::Busy as u16,
        message: Str::from("busy; retry later"),
    });
    if msg.encode(&mut frame).is_err() {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(&frame).await?;
        stream.shutdown().await?;
        // Whatever arrived already (a HELLO), without waiting for more.
        let mut sink = [0u8; 512];
        for _ in 0..4 {
            match stream.read(&mut sink).now_or_never() {
                Some(Ok(n)) if n > 0 => {}
                _ => break,
            }
        }
        std::io::Result::Ok(())
    })
    .await;
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate: f64::from(rate.max(1)),
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.last = now;
    }

    /// Whether a token is available now (refilling first).
    pub fn ready(&mut self, now: Instant) -> bool {
        if self.tokens < 1.0 {
            self.refill(now);
        }
        self.tokens >= 1.0
    }

    /// Takes a token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        let ok = self.ready(now);
        if ok {
            self.tokens -= 1.0;
        }
        ok
    }

    /// Takes a token even if none is left (the bucket goes into debt,
    /// which later refills repay).
    pub fn take(&mut self) {
        self.tokens -= 1.0;
    }

    /// When the next whole token is due (now if one is there).
    pub fn next_at(&self) -> Instant {
        let missing = (1.0 - self.tokens).max(0.0);
        self.last + Duration::from_secs_f64(missing / self.rate)
    }

    /// Full again: nothing to remember about this key.
    fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }
}

/// A session's telemetry throttle: a token per TELEMETRY frame. Records
/// how often and how long the session waits for tokens.
#[derive(Debug)]
pub struct Throttle {
    bucket: TokenBucket,
    /// Since when the session has been waiting for a token.
    since: Option<Instant>,
}

impl Throttle {
    /// Whether the session may handle another frame now. The first `false`
    /// starts a throttled interval; the next `true` ends it.
    pub fn ready(&mut self, now: Instant) -> bool {
        if self.bucket.tokens >= 1.0 && self.since.is_none() {
            return true;
        }
        let ok = self.bucket.ready(now);
        match (ok, self.since) {
            (false, None) => {
                metrics::counter!("furrow_telemetry_throttled_total").increment(1);
                self.since = Some(now);
            }
            (true, Some(s)) => {
                self.since = None;
                record_throttled(now.saturating_duration_since(s));
            }
            _ => {}
        }
        ok
    }

    /// Pays for one TELEMETRY frame.
    pub fn take(&mut self) {
        self.bucket.take();
    }

    /// Whether the bucket is full again at `now`: then it holds nothing a
    /// fresh one would not (a parked session drops it).
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.since.is_none() && self.bucket.is_full(now)
    }

    /// When to look again after [`Self::ready`] said no.
    pub fn due(&self) -> Instant {
        self.bucket.next_at()
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        if let Some(s) = self.since {
            record_throttled(s.elapsed());
        }
    }
}

fn record_throttled(d: Duration) {
    metrics::counter!("furrow_telemetry_throttled_milliseconds_total")
        .increment(d.as_millis() as u64);
}

/// The failure policy, from the configuration.
struct AuthPolicy {
    free: u32,
    base: Duration,
    max: Duration,
    window: Duration,
}

impl AuthPolicy {
    /// The wait before answering failure number `n` (1-based).
    fn delay(&self, n: u32) -> Duration {
        if n <= self.free {
            return Duration::ZERO;
        }
        let k = (n - self.free - 1).min(30);
        self.base.saturating_mul(1u32 << k).min(self.max)
    }
}

/// Recent authentication failures of one address or device id.
#[derive(Debug, Default)]
struct Failures {
    count: u32,
    last: Option<Instant>,
}

impl Failures {
    /// Counts a failure (forgetting those older than the window). Returns
    /// the count.
    fn record(&mut self, now: Instant, p: &AuthPolicy) -> u32 {
        if self
            .last
            .is_some_and(|l| now.saturating_duration_since(l) > p.window)
        {
            self.count = 0;
        }
        self.count = self.count.saturating_add(1);
        self.last = Some(now);
        self.count
    }

    fn idle(&self, now: Instant, window: Duration) -> bool {
        self.last
            .is_none_or(|l| now.saturating_duration_since(l) > window)
    }
}

/// A map with at most `cap` entries, each stamped with its last use.
struct Tracked<K, V> {
    map: HashMap<K, (Instant, V)>,
    cap: usize,
}

impl<K: Eq + Hash, V> Tracked<K, V> {
    fn new(cap: usize) -> Self {
        Self {
            map: HashMap::new(),
            cap: cap.max(1),
        }
    }

    /// The entry of `key`, created by `make` if absent (evicting the least
    /// recently used eighth first if the map is full).
    fn entry(&mut self, key: K, now: Instant, make: impl FnOnce() -> V) -> &mut V {
        if !self.map.contains_key(&key) && self.map.len() >= self.cap {
            self.evict_oldest();
        }
        let e = self.map.entry(key).or_insert_with(|| (now, make()));
        e.0 = now;
        &mut e.1
    }

    fn remove<Q>(&mut self, key: &Q)
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.remove(key);
    }

    fn sweep(&mut self, mut idle: impl FnMut(&mut V) -> bool) {
        self.map.retain(|_, e| !idle(&mut e.1));
    }

    fn evict_oldest(&mut self) {
        let n = (self.map.len() / 8).max(1);
        let mut stamps: Vec<Instant> = self.map.values().map(|e| e.0).collect();
        if stamps.is_empty() {
            return;
        }
        let (_, cut, _) = stamps.select_nth_unstable(n - 1);
        let cut = *cut;
        self.map.retain(|_, e| e.0 > cut);
        metrics::counter!("furrow_limits_evictions_total").increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> config::Limits {
        config::Limits {
            auth_failures_free: 2,
            auth_delay_base_ms: 100,
            auth_delay_max_ms: 350,
            auth_delayed_max: 2,
            auth_window_ms: 10_000,
            ..config::Limits::default()
        }
    }

    #[test]
    fn bucket_allows_burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 3, t0);
        assert!((0..3).all(|_| b.try_take(t0)));
        assert!(!b.try_take(t0));
        assert_eq!(b.next_at(), t0 + Duration::from_millis(100));
        assert!(b.try_take(t0 + Duration::from_millis(100)));
        assert!(!b.try_take(t0 + Duration::from_millis(150)));
        // Refills never exceed the burst.
        assert!(b.is_full(t0 + Duration::from_secs(60)));
        assert!((0..3).all(|_| b.try_take(t0 + Duration::from_secs(60))));
    }

    #[test]
    fn delay_doubles_after_the_free_failures_and_is_capped() {
        let l = Limiter::new(&cfg());
        let p = l.auth_policy();
        let d: Vec<u64> = (1..=6).map(|n| p.delay(n).as_millis() as u64).collect();
        assert_eq!(d, [0, 0, 100, 200, 350, 350]);
    }

    #[test]
    fn failures_slow_the_address_and_the_device_id_and_are_forgotten() {
        let l = Limiter::new(&cfg());
        let t0 = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        // Different device ids from one address: the address's count grows.
        let d: Vec<u64> = (0..6)
            .map(|i| l.auth_failed(a, &format!("x{i}"), t0).as_millis() as u64)
            .collect();
        assert_eq!(d, [0, 0, 100, 200, 350, 350]);
        // One device id from many addresses: the device id's count grows.
        let d: Vec<u64> = (0..4u8)
            .map(|i| {
                let ip = IpAddr::from([198, 51, 100, i]);
                l.auth_failed(ip, "pump", t0).as_millis() as u64
            })
            .collect();
        assert_eq!(d, [0, 0, 100, 200]);
        // After the window without another failure, a clean slate.
        let later = t0 + Duration::from_millis(10_001);
        assert_eq!(l.auth_failed(a, "pump", later), Duration::ZERO);
    }

    #[test]
    fn delayed_answers_are_capped() {
        let l = Limiter::new(&cfg());
        let first = l.delay_slot().expect("a place");
        let _second = l.delay_slot().expect("a place");
        assert!(l.delay_slot().is_none(), "auth_delayed_max is 2");
        assert_eq!(l.delayed_now(), 2);
        drop(first);
        assert!(l.delay_slot().is_some());
    }

    #[test]
    fn success_forgets_the_device_not_the_address() {
        let l = Limiter::new(&cfg());
        let t0 = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..3 {
            l.auth_failed(a, "pump", t0);
        }
        l.auth_succeeded("pump");
        // The address still has 3 failures: the 4th is delayed 200 ms.
        let other: IpAddr = "192.0.2.9".parse().unwrap();
        assert_eq!(l.auth_failed(other, "pump", t0), Duration::ZERO);
        assert_eq!(
            l.auth_failed(a, "other", t0),
            Duration::from_millis(200),
            "the address keeps its count"
        );
    }

    #[test]
    fn maps_stay_bounded() {
        let c = config::Limits {
            tracked_keys_max: 64,
            connect_rate_per_ip: 1,
            connect_burst_per_ip: 1,
            ..config::Limits::default()
        };
        let l = Limiter::new(&c);
        let t0 = Instant::now();
        for i in 0..10_000u32 {
            let ip = IpAddr::from(i.to_be_bytes());
            l.allow_connect(ip, t0 + Duration::from_micros(u64::from(i)));
            l.auth_failed(ip, &format!("d{i}"), t0);
        }
        assert!(lock(&l.connects).map.len() <= 64);
        assert!(lock(&l.auth_by_addr).map.len() <= 64);
        assert!(lock(&l.auth_by_device).map.len() <= 64);
        // The most recent address is still limited.
        let last = IpAddr::from(9_999u32.to_be_bytes());
        assert!(!l.allow_connect(last, t0 + Duration::from_millis(10)));
        // Idle entries go at upkeep.
        l.upkeep(t0 + Duration::from_secs(3600));
        assert!(lock(&l.connects).map.is_empty());
        assert!(lock(&l.auth_by_device).map.is_empty());
    }

    #[test]
    fn ipv6_counts_by_its_64_and_mapped_v4_as_v4() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(IpKey::from(a), IpKey::from(b));
        assert_ne!(IpKey::from(a), IpKey::from(c));
        let m: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(IpKey::from(m), IpKey::from(v4));
    }

    #[test]
    fn connection_permits_are_returned() {
        let c = config::Limits {
            max_connections: 2,
            ..config::Limits::default()
        };
        let l = Limiter::new(&c);
        let a = l.try_connection().unwrap();
        let _b = l.try_connection().unwrap();
        assert!(l.try_connection().is_none());
        drop(a);
        assert!(l.try_connection().is_some());
    }
}
