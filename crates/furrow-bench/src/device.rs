//! One simulated device: connect (from its source address), handshake,
//! then send as its mode says and time every acknowledgement, until the
//! coordinator says stop. A failed connection is counted by kind and
//! retried with a short backoff, so a run reports errors instead of dying
//! of the first one.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::conn::{Conn, Tls};
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

use crate::args::{BenchArgs, Mode, Protocol};
use crate::stats::Recorder;
use crate::wire::{packet_id, Ack, Granted, Wire};
use crate::{Cred, DeviceError};

/// What the coordinator asks of every device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Connect and wait.
    Connect,
    /// Send as the mode says.
    Run,
    /// Drop the connection now, reconnect at once, and keep streaming.
    Storm(Instant),
    /// Close and end.
    Stop,
}

/// Everything the devices of one worker share.
pub struct Shared {
    /// The run's options.
    pub args: BenchArgs,
    /// Where devices record.
    pub rec: Recorder,
    /// The payload every message carries.
    pub payload: Bytes,
}

/// Messages sent and not yet acknowledged, oldest first.
#[derive(Default)]
struct Window {
    q: VecDeque<(u64, Instant, bool)>,
}

impl Window {
    fn len(&self) -> usize {
        self.q.len()
    }

    fn push(&mut self, seq: u64, at: Instant) {
        self.q.push_back((seq, at, false));
    }

    /// Applies an acknowledgement; the latency (us) of each message it
    /// newly covers goes to `out`.
    fn ack(&mut self, ack: Ack, now: Instant, out: &mut Vec<u64>) {
        let us = |t: Instant| now.saturating_duration_since(t).as_micros() as u64;
        match ack {
            Ack::UpTo(n) => {
                while let Some(&(seq, t, acked)) = self.q.front() {
                    if seq > n {
                        break;
                    }
                    if !acked {
                        out.push(us(t));
                    }
                    self.q.pop_front();
                }
            }
            Ack::PacketId(id) => {
                let Some(&(front, ..)) = self.q.front() else {
                    return;
                };
                // Packet ids follow seqs modulo 65,535 and a window is at
                // most 65,535 long, so the offset from the front is unique.
                let idx = (usize::from(id) + 65_535 - usize::from(packet_id(front))) % 65_535;
                if let Some(e) = self.q.get_mut(idx) {
                    if !e.2 {
                        e.2 = true;
                        out.push(us(e.1));
                    }
                }
                while self.q.front().is_some_and(|e| e.2) {
                    self.q.pop_front();
                }
            }
        }
    }
}

/// The loopback source address `k` (127.0.0.1 + k), or none when the
/// run uses one source or the server is not on loopback.
pub fn source_addr(index: usize, sources: u32, server: SocketAddr) -> Option<IpAddr> {
    if sources <= 1 || !server.ip().is_loopback() || !server.is_ipv4() {
        return None;
    }
    let k = (index % sources as usize) as u32;
    Some(IpAddr::V4(Ipv4Addr::from(
        u32::from(Ipv4Addr::new(127, 0, 0, 1)) + k,
    )))
}

async fn open(addr: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = sock.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// How a session ended.
enum Ended {
    Stop,
    Storm(Instant),
    /// authflood: the handshake is what is measured; close, wait, again.
    Cycle,
    Failed(DeviceError),
}

/// One device, from its first connection to the stop.
pub struct Device {
    /// Its credentials.
    pub cred: Cred,
    /// Its index in the whole run (all workers).
    pub index: usize,
    /// Its server.
    pub addr: SocketAddr,
    /// Its source address.
    pub source: Option<IpAddr>,
    /// When it may first connect (the ramp).
    pub start_at: Instant,
    /// Its TLS settings (its own session cache), if TLS.
    pub tls: Option<Tls>,
}

impl Device {
    /// Runs the device until the phase is `Stop`.
    pub async fn run(self, shared: Arc<Shared>, mut phase: watch::Receiver<Phase>) {
        tokio::select! {
            _ = tokio::time::sleep_until(self.start_at.into()) => {}
            _ = phase.wait_for(|p| *p == Phase::Stop) => return,
        }
        let args = &shared.args;
        let topic = format!("{}/{}", args.topic_prefix, self.cred.id);
        let mut wire = Wire::new(args.protocol, topic, shared.payload.clone());
        let mut next_seq = 1u64;
        let mut failures = 0u32;
        let mut sessions = 0u64;
        let mut storm = Storm::default();
        loop {
            if *phase.borrow() == Phase::Stop {
                return;
            }
            let started = Instant::now();
            let timeout = Duration::from_secs(args.handshake_timeout);
            let outcome =
                match tokio::time::timeout(timeout, self.connect(&mut wire, &shared)).await {
                    Err(_) => Err(DeviceError::HandshakeTimeout),
                    Ok(r) => r,
                };
            let ended = match outcome {
                Ok((stream, rbuf, granted)) => {
                    shared.rec.connected(started.elapsed().as_micros() as u64);
                    if sessions > 0 {
                        shared.rec.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    sessions += 1;
                    failures = 0;
                    if args.protocol == Protocol::Furrow {
                        // Continue after what the gateway stored: seqs it has
                        // not stored are sent again as new.
                        next_seq = granted.last_seq.wrapping_add(1).max(1);
                    }
                    let s = Session {
                        shared: &shared,
                        wire: &mut wire,
                        stream,
                        rbuf,
                        granted,
                        next_seq: &mut next_seq,
                        storm: &mut storm,
                    };
                    let ended = s.run(&mut phase).await;
                    shared.rec.connected.fetch_sub(1, Ordering::Relaxed);
                    ended
                }
                Err(e) => Ended::Failed(e),
            };
            match ended {
                Ended::Stop => return,
                Ended::Storm(at) => {
                    storm.handled = Some(at);
                    storm.pending = Some(at);
                }
                Ended::Cycle => {
                    // A random share of two periods: `--rate` handshakes a
                    // second on average, the fleet out of step.
                    let period = Duration::from_secs_f64(1.0 / args.rate.max(1e-3));
                    let wait = period.mul_f64(rand::thread_rng().gen_range(0.0..2.0));
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = phase.wait_for(|p| *p == Phase::Stop) => return,
                    }
                }
                Ended::Failed(e) => {
                    shared.rec.error(e.kind());
                    failures = failures.saturating_add(1);
                    // Full jitter, 50 ms doubling to a 2 s cap.
                    let cap = 50u64.saturating_mul(1 << failures.min(6)).min(2_000);
                    let wait = Duration::from_millis(rand::thread_rng().gen_range(0..=cap));
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = phase.wait_for(|p| *p == Phase::Stop) => return,
                    }
                }
            }
        }
    }

    async fn connect(
        &self,
        wire: &mut Wire,
        shared: &Shared,
    ) -> Result<(Conn, BytesMut, Granted), DeviceError> {
        let args = &shared.args;
        let mut stream = match &self.tls {
            Some(tls) if tls.is_quic() => tls.connect_quic(self.addr, self.source).await?,
            Some(tls) => {
                let tcp = open(self.addr, self.source)
                    .await
                    .map_err(DeviceError::Connect)?;
                tls.connect(tcp).await?
            }
            None => Conn::Plain(
                open(self.addr, self.source)
                    .await
                    .map_err(DeviceError::Connect)?,
            ),
        };
        let mut out = BytesMut::with_capacity(256);
        wire.hello(&self.cred.id, &self.cred.token, args.keepalive, &mut out)?;
        stream.write_all(&out).await?;
        stream.flush().await?;
        let mut rbuf = BytesMut::with_capacity(512);
        loop {
            if let Some(g) = wire.handshake(&mut rbuf)? {
                return Ok((stream, rbuf, g));
            }
            if stream.read_buf(&mut rbuf).await? == 0 {
                return Err(DeviceError::Closed);
            }
        }
    }
}

/// The first attacker source address: far from the devices' own
/// (127.0.0.1 and up), so that the server tells them apart.
const ATTACK_BASE: Ipv4Addr = Ipv4Addr::new(127, 0, 200, 1);

/// How long an attacker waits for an answer before it hangs up and tries
/// again: a flooder does not sit out the server's delays.
const ATTACK_PATIENCE: Duration = Duration::from_millis(100);

/// authflood: one connection after another sending HELLO with a wrong
/// token for `victim`, as fast as it can, until the stop. Every attempt is
/// counted by outcome (`attack: ERROR 3` is AUTH_FAILED).
pub struct Attacker {
    /// The device id it claims to be.
    pub victim: String,
    /// The server.
    pub addr: SocketAddr,
    /// Its source address (127.0.200.x).
    pub source: Option<IpAddr>,
}

impl Attacker {
    /// The attacker `index` of a run.
    pub fn new(index: usize, sources: u32, victim: String, addr: SocketAddr) -> Self {
        let k = (index % sources.max(1) as usize) as u32;
        let source = (addr.ip().is_loopback() && addr.is_ipv4())
            .then(|| IpAddr::V4(Ipv4Addr::from(u32::from(ATTACK_BASE) + k)));
        Self {
            victim,
            addr,
            source,
        }
    }

    /// Attacks from the run phase until the stop.
    pub async fn run(self, shared: Arc<Shared>, mut phase: watch::Receiver<Phase>) {
        match phase
            .wait_for(|p| matches!(p, Phase::Run | Phase::Stop))
            .await
        {
            Ok(p) if *p == Phase::Run => {}
            _ => return,
        }
        let wrong = "0".repeat(64);
        loop {
            if *phase.borrow() == Phase::Stop {
                return;
            }
            let attempt = tokio::time::timeout(ATTACK_PATIENCE, self.attempt(&shared, &wrong));
            let kind = match attempt.await {
                Err(_) => "no answer in 100 ms".to_owned(),
                Ok(Ok(())) => "WELCOME".to_owned(),
                Ok(Err(e)) => e.kind(),
            };
            shared.rec.error(format!("attack: {kind}"));
            if kind.starts_with("connect") {
                // Out of ports or refused: do not spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    async fn attempt(&self, shared: &Shared, token: &str) -> Result<(), DeviceError> {
        let mut wire = Wire::new(Protocol::Furrow, String::new(), shared.payload.clone());
        let mut stream = open(self.addr, self.source)
            .await
            .map_err(DeviceError::Connect)?;
        let mut out = BytesMut::with_capacity(256);
        wire.hello(&self.victim, token, shared.args.keepalive, &mut out)?;
        stream.write_all(&out).await?;
        let mut rbuf = BytesMut::with_capacity(512);
        loop {
            if wire.handshake(&mut rbuf)?.is_some() {
                return Ok(());
            }
            if stream.read_buf(&mut rbuf).await? == 0 {
                return Err(DeviceError::Closed);
            }
        }
    }
}

/// One connection's send and acknowledge loop.
struct Session<'a> {
    shared: &'a Shared,
    wire: &'a mut Wire,
    stream: Conn,
    rbuf: BytesMut,
    granted: Granted,
    next_seq: &'a mut u64,
    storm: &'a mut Storm,
}

/// A device's view of the storm.
#[derive(Default)]
struct Storm {
    /// The storm this device has already dropped its connection for.
    handled: Option<Instant>,
    /// Set from the storm until the first acknowledgement after it.
    pending: Option<Instant>,
}

impl Session<'_> {
    /// Whether this phase ends the session.
    fn ends(&self, phase: Phase) -> Option<Ended> {
        match phase {
            Phase::Stop => Some(Ended::Stop),
            Phase::Run if self.shared.args.mode == Mode::Authflood => Some(Ended::Cycle),
            Phase::Storm(at) if self.storm.handled != Some(at) => Some(Ended::Storm(at)),
            _ => None,
        }
    }

    async fn run(mut self, phase: &mut watch::Receiver<Phase>) -> Ended {
        match self.exchange(phase).await {
            Ok(e) => e,
            Err(e) => Ended::Failed(e),
        }
    }

    async fn exchange(&mut self, phase: &mut watch::Receiver<Phase>) -> Result<Ended, DeviceError> {
        let args = &self.shared.args;
        let window_cap = args.window.min(self.granted.max_inflight).max(1);
        let flat = args.mode == Mode::Flat;
        let paced = matches!(args.mode, Mode::Steady | Mode::Storm);
        let mut window = Window::default();
        let mut wbuf = BytesMut::with_capacity(4096);
        let mut lat = Vec::with_capacity(64);
        let mut sending;
        let mut last_write = Instant::now();
        let half_keepalive = Duration::from_secs(u64::from(args.keepalive)).div_f64(2.0);
        let mut ping =
            tokio::time::interval_at((Instant::now() + half_keepalive).into(), half_keepalive);
        // Paced devices start at a random phase of their period so that a
        // fleet does not send in lockstep. The timer wakes at most every
        // millisecond (Tokio's resolution) and each wake-up sends every
        // message due by then in one write: one syscall per message would
        // make the generator, not the server, the bottleneck at high rates.
        let period_s = 1.0 / args.rate.max(1e-3);
        let period = Duration::from_secs_f64(period_s);
        // After the storm a device sends at once, as a reconnecting device
        // flushes what it queued: "back" is then the reconnection, not the
        // wait for the next tick.
        let mut first = match self.storm.pending {
            Some(_) => Instant::now(),
            None => Instant::now() + period.mul_f64(rand::thread_rng().gen_range(0.0..1.0)),
        };
        let wake = period.max(Duration::from_millis(1));
        let mut tick = tokio::time::interval_at(first.into(), wake);
        // A device connected before the run began starts its grid when the
        // run does: counted from its connection, the first tick of the run
        // would owe every period since, and a fleet that took 20 s to
        // connect would open with a burst of two messages per device.
        let mut anchored = *phase.borrow() != Phase::Connect;
        // A late tick keeps the device on its own grid (`first` + k x
        // period). With `Delay` a late tick moved the grid to when the
        // generator got round to it, so every device whose tick fell
        // inside one busy stretch of the generator (reading a burst of
        // ACKs, say) ended up on the same phase: within seconds a fleet
        // of 10,000 sent most of each second's messages in a few hundred
        // milliseconds, a lockstep no fleet of independent clocks has.
        tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let mut scheduled = 0u64;
        loop {
            let now_phase = *phase.borrow_and_update();
            if let Some(end) = self.ends(now_phase) {
                return Ok(end);
            }
            sending = now_phase != Phase::Connect && args.mode != Mode::Idle;
            if sending && !anchored {
                anchored = true;
                first = Instant::now() + period.mul_f64(rand::thread_rng().gen_range(0.0..1.0));
                tick = tokio::time::interval_at(first.into(), wake);
                tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
            }
            if sending && flat {
                let now = Instant::now();
                let mut n = 0;
                while window.len() < window_cap {
                    self.wire.message(*self.next_seq, &mut wbuf)?;
                    window.push(*self.next_seq, now);
                    *self.next_seq += 1;
                    n += 1;
                }
                self.shared.rec.sent.fetch_add(n, Ordering::Relaxed);
            }
            while !wbuf.is_empty() {
                // `write` is cancel-safe (nothing is written when it loses
                // the race), so a server that stops reading cannot hold up
                // a stop or a storm.
                tokio::select! {
                    r = self.stream.write(&wbuf) => match r? {
                        0 => return Err(DeviceError::Closed),
                        n => wbuf.advance(n),
                    },
                    r = phase.changed() => {
                        if r.is_err() {
                            return Ok(Ended::Stop);
                        }
                        if let Some(end) = self.ends(*phase.borrow()) {
                            return Ok(end);
                        }
                    }
                }
                last_write = Instant::now();
            }
            wbuf.clear();
            // TLS may hold records back until flushed; plain TCP does not.
            if matches!(self.stream, Conn::Tls(_)) {
                self.stream.flush().await?;
            }
            if self.rbuf.capacity() - self.rbuf.len() < 1024 {
                self.rbuf.reserve(8 * 1024);
            }
            tokio::select! {
                biased;
                r = phase.changed() => {
                    if r.is_err() {
                        return Ok(Ended::Stop);
                    }
                }
                r = self.stream.read_buf(&mut self.rbuf) => {
                    if r? == 0 {
                        return Err(DeviceError::Closed);
                    }
                    let now = Instant::now();
                    self.wire.acks(&mut self.rbuf, |a| window.ack(a, now, &mut lat))?;
                    if !lat.is_empty() {
                        self.shared.rec.acks(&lat);
                        lat.clear();
                        if let Some(at) = self.storm.pending.take() {
                            self.shared.rec.storm_back(now.saturating_duration_since(at).as_micros() as u64);
                        }
                    }
                }
                _ = tick.tick(), if sending && paced => {
                    let now = Instant::now();
                    let due = (now.saturating_duration_since(first).as_secs_f64() / period_s) as u64 + 1;
                    let mut n = 0;
                    // A message due while the window is full is not sent
                    // later: the offered rate never exceeds what the
                    // window allows.
                    while scheduled < due {
                        scheduled += 1;
                        if window.len() < window_cap {
                            self.wire.message(*self.next_seq, &mut wbuf)?;
                            window.push(*self.next_seq, now);
                            *self.next_seq += 1;
                            n += 1;
                        }
                    }
                    self.shared.rec.sent.fetch_add(n, Ordering::Relaxed);
                }
                _ = ping.tick() => {
                    if last_write.elapsed() >= half_keepalive {
                        self.wire.ping(&mut wbuf)?;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cumulative_ack_covers_every_seq_up_to_it_once() {
        let t = Instant::now();
        let mut w = Window::default();
        for s in 1..=5 {
            w.push(s, t);
        }
        let mut out = Vec::new();
        w.ack(Ack::UpTo(3), t + Duration::from_micros(250), &mut out);
        assert_eq!(out, vec![250, 250, 250]);
        assert_eq!(w.len(), 2);
        w.ack(Ack::UpTo(3), t, &mut out);
        assert_eq!(out.len(), 3, "a repeated ACK covers nothing new");
    }

    #[test]
    fn packet_id_acks_may_come_out_of_order() {
        let t = Instant::now();
        let mut w = Window::default();
        // Seqs across the 65,535 wrap of packet ids.
        for s in 65_534..65_538 {
            w.push(s, t);
        }
        let mut out = Vec::new();
        w.ack(Ack::PacketId(packet_id(65_536)), t, &mut out);
        assert_eq!((out.len(), w.len()), (1, 4), "the front is not acked yet");
        w.ack(Ack::PacketId(packet_id(65_534)), t, &mut out);
        w.ack(Ack::PacketId(packet_id(65_535)), t, &mut out);
        assert_eq!((out.len(), w.len()), (3, 1));
        w.ack(Ack::PacketId(packet_id(65_535)), t, &mut out);
        assert_eq!(out.len(), 3, "an unknown packet id is ignored");
        w.ack(Ack::PacketId(packet_id(65_537)), t, &mut out);
        assert_eq!((out.len(), w.len()), (4, 0));
    }

    #[test]
    fn source_addresses_spread_over_loopback_only() {
        let lo: SocketAddr = "127.0.0.1:7700".parse().expect("addr");
        let other: SocketAddr = "10.0.0.1:7700".parse().expect("addr");
        assert_eq!(source_addr(5, 1, lo), None);
        assert_eq!(source_addr(5, 4, other), None);
        assert_eq!(
            source_addr(5, 4, lo),
            Some("127.0.0.2".parse().expect("ip"))
        );
        assert_eq!(
            source_addr(300, 400, lo),
            Some("127.0.1.45".parse().expect("ip"))
        );
    }
}
