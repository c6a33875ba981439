//! A fault-injecting TCP proxy for end-to-end tests of the device SDK.
//!
//! It listens on 127.0.0.1:0; for every accepted connection it connects to
//! the upstream (the gateway) and pumps both directions in chunks of random
//! size, so frames are split and merged arbitrarily. On the way it injects,
//! with configurable probabilities:
//!
//! * small delays (a few ms before forwarding a chunk);
//! * stalls (no forwarding in that direction for a while);
//! * cuts: after a random number of bytes in either direction (drawn per
//!   connection and direction), it forwards exactly that prefix, often in
//!   the middle of a frame, then closes both sides, abruptly (RST) or with
//!   a FIN.
//!
//! Some connections are never cut, and cut offsets are drawn from ranges
//! wide enough that sessions make progress. Counters tell the test what was
//! injected, so it can fail when the proxy did nothing.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy injects. Probabilities are per forwarded chunk (delays,
/// stalls) or per connection and direction (cuts).
#[derive(Debug, Clone)]
pub struct FaultConfig {
    /// Largest chunk read and forwarded at once (each read uses a random
    /// size in `1..=max_chunk`).
    pub max_chunk: usize,
    /// Probability of a small delay before forwarding a chunk.
    pub delay_prob: f64,
    /// Its length, ms.
    pub delay_ms: RangeInclusive<u64>,
    /// Probability of a stall before forwarding a chunk.
    pub stall_prob: f64,
    /// Its length, ms.
    pub stall_ms: RangeInclusive<u64>,
    /// Probability that the device-to-gateway direction of a connection is
    /// cut.
    pub cut_up_prob: f64,
    /// Bytes forwarded device-to-gateway before that cut.
    pub cut_up_after: RangeInclusive<u64>,
    /// Probability that the gateway-to-device direction is cut.
    pub cut_down_prob: f64,
    /// Bytes forwarded gateway-to-device before that cut.
    pub cut_down_after: RangeInclusive<u64>,
    /// Probability that a cut is a reset (RST) rather than a FIN.
    pub reset_prob: f64,
    /// Draw cut offsets log-uniformly over their range (many early cuts:
    /// in the handshake, in the first frames; a few late ones) instead of
    /// uniformly.
    pub log_uniform_cuts: bool,
}

impl Default for FaultConfig {
    fn default() -> Self {
        Self {
            max_chunk: 16 * 1024,
            delay_prob: 0.05,
            delay_ms: 1..=10,
            stall_prob: 0.005,
            stall_ms: 100..=800,
            cut_up_prob: 0.7,
            cut_up_after: 1..=200_000,
            cut_down_prob: 0.3,
            cut_down_after: 1..=20_000,
            reset_prob: 0.5,
            log_uniform_cuts: false,
        }
    }
}

impl FaultConfig {
    /// Forwards faithfully: no delay, stall or cut.
    pub fn transparent() -> Self {
        Self {
            delay_prob: 0.0,
            stall_prob: 0.0,
            cut_up_prob: 0.0,
            cut_down_prob: 0.0,
            ..Self::default()
        }
    }
}

/// What the proxy did.
#[derive(Debug, Default)]
pub struct FaultStats {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Connections the upstream refused or that failed to connect.
    pub upstream_failures: AtomicU64,
    /// Cuts injected, device-to-gateway.
    pub cuts_up: AtomicU64,
    /// Cuts injected, gateway-to-device.
    pub cuts_down: AtomicU64,
    /// Of them, resets.
    pub resets: AtomicU64,
    /// Delays injected.
    pub delays: AtomicU64,
    /// Stalls injected.
    pub stalls: AtomicU64,
    /// Bytes forwarded device-to-gateway.
    pub bytes_up: AtomicU64,
    /// Bytes forwarded gateway-to-device.
    pub bytes_down: AtomicU64,
}

/// A snapshot of [`FaultStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounts {
    pub connections: u64,
    pub upstream_failures: u64,
    pub cuts_up: u64,
    pub cuts_down: u64,
    pub resets: u64,
    pub delays: u64,
    pub stalls: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

impl FaultStats {
    /// The counters now.
    pub fn snapshot(&self) -> FaultCounts {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FaultCounts {
            connections: g(&self.connections),
            upstream_failures: g(&self.upstream_failures),
            cuts_up: g(&self.cuts_up),
            cuts_down: g(&self.cuts_down),
            resets: g(&self.resets),
            delays: g(&self.delays),
            stalls: g(&self.stalls),
            bytes_up: g(&self.bytes_up),
            bytes_down: g(&self.bytes_down),
        }
    }
}

/// The running proxy. Dropping it stops accepting and closes every
/// connection it holds.
pub struct FaultProxy {
    addr: SocketAddr,
    stats: Arc<FaultStats>,
    /// When false, faults are off (the proxy forwards faithfully from then
    /// on, for new chunks and new connections).
    enabled: Arc<AtomicBool>,
    /// While set, nothing is forwarded in that direction ([up, down]);
    /// connections stay open and what was read waits.
    paused: Arc<[AtomicBool; 2]>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` on 127.0.0.1:0.
    pub async fn start(upstream: SocketAddr, cfg: FaultConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy binds");
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(FaultStats::default());
        let enabled = Arc::new(AtomicBool::new(true));
        let paused = Arc::new([AtomicBool::new(false), AtomicBool::new(false)]);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(
            listener,
            upstream,
            Arc::new(cfg),
            Arc::clone(&stats),
            Arc::clone(&enabled),
            Arc::clone(&paused),
            stop_rx,
        ));
        Self {
            addr,
            stats,
            enabled,
            paused,
            stop,
            task,
        }
    }

    /// Where devices connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What was injected so far.
    pub fn counts(&self) -> FaultCounts {
        self.stats.snapshot()
    }

    /// Turns fault injection on or off (live connections notice at their
    /// next chunk; cut offsets already drawn are ignored while off).
    pub fn set_faults(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    /// Stops (true) or resumes (false) all forwarding: a network outage
    /// that leaves the TCP connections open.
    pub fn set_paused(&self, paused: bool) {
        self.set_paused_dirs(paused, paused);
    }

    /// Pauses or resumes each direction: `up` device-to-gateway, `down`
    /// gateway-to-device.
    pub fn set_paused_dirs(&self, up: bool, down: bool) {
        self.paused[0].store(up, Ordering::Relaxed);
        self.paused[1].store(down, Ordering::Relaxed);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.send_replace(true);
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    cfg: Arc<FaultConfig>,
    stats: Arc<FaultStats>,
    enabled: Arc<AtomicBool>,
    paused: Arc<[AtomicBool; 2]>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (down, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        stats.connections.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(serve(
            down,
            upstream,
            Arc::clone(&cfg),
            Arc::clone(&stats),
            Arc::clone(&enabled),
            Arc::clone(&paused),
            stop.clone(),
        ));
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Dir {
    Up,
    Down,
}

/// How one pump ended.
#[derive(Debug)]
enum End {
    /// The reading side closed or failed.
    Closed,
    /// A cut was injected; `reset` says how to close.
    Cut { reset: bool },
}

async fn serve(
    down: TcpStream,
    upstream: SocketAddr,
    cfg: Arc<FaultConfig>,
    stats: Arc<FaultStats>,
    enabled: Arc<AtomicBool>,
    paused: Arc<[AtomicBool; 2]>,
    mut stop: watch::Receiver<bool>,
) {
    let up = match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(upstream)).await
    {
        Ok(Ok(s)) => s,
        _ => {
            stats.upstream_failures.fetch_add(1, Ordering::Relaxed);
            // Nobody to talk to: the device sees its connection closed.
            let _ = down.set_zero_linger();
            return;
        }
    };
    let _ = down.set_nodelay(true);
    let _ = up.set_nodelay(true);
    let (cut_up, cut_down) = {
        let mut rng = rand::thread_rng();
        let on = enabled.load(Ordering::Relaxed);
        let log = cfg.log_uniform_cuts;
        let mut draw = |p: f64, r: &RangeInclusive<u64>| {
            (on && p > 0.0 && rng.gen_bool(p.min(1.0))).then(|| draw_offset(&mut rng, r, log))
        };
        (
            draw(cfg.cut_up_prob, &cfg.cut_up_after),
            draw(cfg.cut_down_prob, &cfg.cut_down_after),
        )
    };
    let (mut down, mut up) = (down, up);
    let end = {
        let (down_rd, down_wr) = down.split();
        let (up_rd, up_wr) = up.split();
        let pump_up = pump(
            Dir::Up,
            down_rd,
            up_wr,
            cut_up,
            &cfg,
            &stats,
            &enabled,
            &paused[0],
        );
        let pump_down = pump(
            Dir::Down,
            up_rd,
            down_wr,
            cut_down,
            &cfg,
            &stats,
            &enabled,
            &paused[1],
        );
        tokio::pin!(pump_up, pump_down);
        // Whichever direction ends first ends the connection: both sockets
        // are closed (the other pump is dropped mid-way).
        tokio::select! {
            e = &mut pump_up => e,
            e = &mut pump_down => e,
            _ = stop.changed() => End::Cut { reset: true },
        }
    };
    if let End::Cut { reset: true } = end {
        stats.resets.fetch_add(1, Ordering::Relaxed);
        // SO_LINGER 0: close sends RST.
        let _ = down.set_zero_linger();
        let _ = up.set_zero_linger();
    }
    drop(down);
    drop(up);
}

/// A cut offset in `r`, uniform or log-uniform.
fn draw_offset(rng: &mut impl Rng, r: &RangeInclusive<u64>, log: bool) -> u64 {
    let (lo, hi) = ((*r.start()).max(1), (*r.end()).max(1));
    if !log || lo >= hi {
        return rng.gen_range(lo..=hi.max(lo));
    }
    let x = rng.gen_range((lo as f64).ln()..=(hi as f64).ln()).exp();
    (x.round() as u64).clamp(lo, hi)
}

#[allow(clippy::too_many_arguments)]
async fn pump(
    dir: Dir,
    mut rd: ReadHalf<'_>,
    mut wr: WriteHalf<'_>,
    cut_after: Option<u64>,
    cfg: &FaultConfig,
    stats: &FaultStats,
    enabled: &AtomicBool,
    paused: &AtomicBool,
) -> End {
    let mut buf = vec![0u8; cfg.max_chunk.max(1)];
    let mut forwarded: u64 = 0;
    let counter = match dir {
        Dir::Up => &stats.bytes_up,
        Dir::Down => &stats.bytes_down,
    };
    loop {
        let want = rand::thread_rng().gen_range(1..=buf.len());
        let n = match rd.read(&mut buf[..want]).await {
            Ok(0) | Err(_) => return End::Closed,
            Ok(n) => n,
        };
        let on = enabled.load(Ordering::Relaxed);
        let (pause, stalled, delayed) = {
            let mut rng = rand::thread_rng();
            if on && cfg.stall_prob > 0.0 && rng.gen_bool(cfg.stall_prob.min(1.0)) {
                (rng.gen_range(cfg.stall_ms.clone()), true, false)
            } else if on && cfg.delay_prob > 0.0 && rng.gen_bool(cfg.delay_prob.min(1.0)) {
                (rng.gen_range(cfg.delay_ms.clone()), false, true)
            } else {
                (0, false, false)
            }
        };
        if stalled {
            stats.stalls.fetch_add(1, Ordering::Relaxed);
        }
        if delayed {
            stats.delays.fetch_add(1, Ordering::Relaxed);
        }
        if pause > 0 {
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        while paused.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut chunk = &buf[..n];
        let mut cut = false;
        if let Some(at) = cut_after.filter(|_| enabled.load(Ordering::Relaxed)) {
            if forwarded + n as u64 >= at {
                chunk = &buf[..(at - forwarded.min(at)) as usize];
                cut = true;
            }
        }
        if !chunk.is_empty() {
            if wr.write_all(chunk).await.is_err() {
                return End::Closed;
            }
            forwarded += chunk.len() as u64;
            counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        if cut {
            match dir {
                Dir::Up => stats.cuts_up.fetch_add(1, Ordering::Relaxed),
                Dir::Down => stats.cuts_down.fetch_add(1, Ordering::Relaxed),
            };
            let reset = rand::thread_rng().gen_bool(cfg.reset_prob.clamp(0.0, 1.0));
            if !reset {
                let _ = wr.flush().await;
            }
            return End::Cut { reset };
        }
    }
}
