//! The Tokio side of a session: sockets, timers, the store and the writer
//! around the sans-I/O [`Machine`].
//!
//! The driver owns what waits: the connection, the HELLO deadline, the
//! store lookups and takeover of the handshake, the writer queue, and the
//! `select!` of an active session over its commits (which also carry kicks
//! and command wake-ups), its socket and one timer. Every decision is the
//! machine's: the driver feeds it and does what it says.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use furrow_proto::{ErrorCode, ErrorMsg, Goodbye, GoodbyeCode, Message, Str};
use rand::Rng;
use tokio::time::{sleep_until, timeout, Instant};
use tracing::{debug, info, warn, Instrument};

use super::handshake::{self, Certificate};
use super::machine::{self, Drain, Effect, End, Fatal, Identity, Limits, Machine};
use super::outbox::Outbox;
use super::park::{Lot, Parked, Unpark, Wake};
use super::{CloseReason, Shared};
use crate::clock::now_ms;
use crate::cluster::Claim;
use crate::devices::registry::SessionHandle;
use crate::ingress::connection::{self, Connection};
use crate::ingress::limits::ConnPermit;
use crate::writer::{AckCell, Parking};

/// Read size before WELCOME (the largest HELLO is 397 bytes).
const HANDSHAKE_READ_CHUNK: usize = 512;

/// The connection's phases.
enum Phase {
    AwaitingHello,
    Active(Box<Live>),
    Draining(Box<Live>, Drain),
    Closed(CloseReason),
}

/// How the phases end for this task.
enum Exit {
    /// The connection is closed.
    Closed(CloseReason, Option<String>),
    /// The session is quiet: park it.
    Park(Box<Live>),
}

/// An authenticated session: the machine, and what ties it to the
/// registry and the writer.
struct Live {
    m: Machine,
    // Keeps the registry entry exactly as long as the session lives.
    guard: DeviceGuard,
}

impl Live {
    /// The registry's handle: kicks, command wake-ups, last seen.
    fn handle(&self) -> &SessionHandle {
        &self.guard.handle
    }

    /// The session's one wake-up (commits, kicks, commands).
    fn cell(&self) -> Arc<AckCell> {
        Arc::clone(self.guard.handle.cell())
    }
}

/// Releases the device from the registry and signals a waiting successor,
/// on every exit path including a panic. Also who the session is for, in
/// one place, active or parked.
struct DeviceGuard {
    shared: Arc<Shared>,
    key: crate::store::DeviceKey,
    /// Also the device's id.
    handle: SessionHandle,
}

impl Drop for DeviceGuard {
    fn drop(&mut self) {
        let shared = &self.shared;
        // Offline only if no newer session of the device took over.
        let device_id = self.handle.device();
        if shared.registry.release(device_id, self.handle.id()) {
            shared.events.status(device_id, false);
        }
        shared.cluster.release(self.key, device_id, &self.handle);
        self.handle.finish();
    }
}

/// Decrements the open-connections gauge on every exit path.
struct OpenGauge;

impl OpenGauge {
    fn new() -> Self {
        metrics::gauge!("furrow_connections_open").increment(1.0);
        Self
    }
}

impl Drop for OpenGauge {
    fn drop(&mut self) {
        metrics::gauge!("furrow_connections_open").decrement(1.0);
    }
}

/// A closed connection's figures: counted by reason and logged once,
/// whether its task or the parking lot closed it.
struct Closed<'a> {
    conn: u64,
    peer: SocketAddr,
    device: &'a str,
    duration: Duration,
    stats: connection::Stats,
    frames_out: u64,
}

impl Closed<'_> {
    fn count_and_log(&self, reason: CloseReason) {
        metrics::counter!("furrow_connections_closed_total", "reason" => reason.as_str())
            .increment(1);
        info!(
            conn = self.conn,
            peer = %self.peer,
            device = self.device,
            duration_ms = self.duration.as_millis() as u64,
            frames_in = self.stats.frames_in,
            frames_out = self.frames_out,
            bytes_in = self.stats.bytes_in,
            bytes_out = self.stats.bytes_out,
            reason = reason.as_str(),
            "connection closed"
        );
    }
}

/// Whether handshakes are failing for want of storage: during an outage
/// every reconnecting device would otherwise log its own warning. The
/// first failure warns, the rest are debug, and the first handshake that
/// gets through again says so once.
static STORAGE_FAILING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn storage_failed(peer: SocketAddr, device: &str, e: &crate::store::StoreError, what: &str) {
    if STORAGE_FAILING.swap(true, std::sync::atomic::Ordering::AcqRel) {
        debug!(peer = %peer, device = %device, error = %e, "{what}");
    } else {
        warn!(peer = %peer, device = %device, error = %e,
            "{what}; handshakes answer BUSY until the store answers (further failures at debug)");
    }
}

/// The limits a session reads by, from the configuration.
fn session_limits(cfg: &crate::config::Config) -> Limits {
    let rate = cfg.state.report_rate_per_s;
    Limits {
        max_inflight: usize::from(cfg.limits.max_inflight),
        max_unsent: cfg.limits.max_unsent_bytes,
        state: machine::StateCfg {
            limits: cfg.state_limits(),
            report_interval: if rate == 0 {
                Duration::ZERO
            } else {
                Duration::from_secs(1) / rate
            },
            report_burst: cfg.state.report_burst,
        },
    }
}

fn storage_answers() {
    if STORAGE_FAILING.swap(false, std::sync::atomic::Ordering::AcqRel) {
        info!("handshakes reach the store again");
    }
}

/// Runs a connection to the end. Never fails: every outcome is a
/// [`CloseReason`], logged once.
///
/// Not an `async fn`: the session is built first and moved into the
/// future once, so the future does not also carry the socket and the
/// arguments as captured values (measured: ~150 bytes per idle device).
pub fn run(
    stream: tokio::net::TcpStream,
    arrival: Arrival,
    shared: Arc<Shared>,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> impl std::future::Future<Output = ()> + Send {
    let span = conn_span(arrival.conn_id);
    let _ = stream.set_nodelay(true);
    // HELLO is at most 397 bytes: small reads until WELCOME, so that a
    // crowd of handshakes does not touch a full read chunk each.
    let conn = Connection::new(stream, shared.cfg.limits.max_frame, HANDSHAKE_READ_CHUNK);
    Session::new(conn, arrival, shared, tls)
        .run_logged()
        .instrument(span)
}

/// How a connection arrived: what every transport's listener knows of it
/// before its session starts.
pub struct Arrival {
    /// The device's address (behind a balancer: the balancer's, until the
    /// PROXY header names the device's).
    pub peer: SocketAddr,
    /// When it was accepted.
    pub at: Instant,
    /// The connection's id in logs.
    pub conn_id: u64,
    /// Its place under `limits.max_connections`.
    pub permit: ConnPermit,
}

/// Runs a device's QUIC session (its connection's one bidirectional
/// stream) to the end, like [`run`]: the same session over another
/// transport. The connect rate and TLS were dealt with at accept.
pub fn run_quic(
    stream: crate::ingress::quic::QuicStream,
    accepted: Instant,
    conn_id: u64,
    shared: Arc<Shared>,
    permit: ConnPermit,
) -> impl std::future::Future<Output = ()> + Send {
    let arrival = Arrival {
        peer: stream.remote_address(),
        at: accepted,
        conn_id,
        permit,
    };
    let span = conn_span(conn_id);
    let conn = Connection::new_quic(stream, shared.cfg.limits.max_frame, HANDSHAKE_READ_CHUNK);
    Session::new(conn, arrival, shared, None)
        .run_logged()
        .instrument(span)
}

struct Session {
    conn: Connection,
    /// Frames to send before the machine exists (WELCOME, ERROR) and after
    /// it is gone; the machine owns them in between.
    out: Outbox,
    shared: Arc<Shared>,
    conn_id: u64,
    peer: SocketAddr,
    accepted: Instant,
    /// The TLS configuration to handshake with (TLS listener), taken at
    /// accept; dropped once the handshake is done.
    tls: Option<Arc<rustls::ServerConfig>>,
    /// The connection's place under `limits.max_connections`.
    permit: Option<ConnPermit>,
    _gauge: OpenGauge,
    /// A session the lot woke for its device's bytes parks again as soon
    /// as it has handled a frame (its count of frames read is past this)
    /// and is idle, unless the device is chatty: its socket then never
    /// enters Tokio's reactor (`Connection::from_parts`). `u64::MAX`: the
    /// usual quiet spell first.
    repark_after: u64,
}

/// Queues ERROR and closes (best effort, bounded).
async fn send_error(
    conn: &mut Connection,
    out: &mut Outbox,
    Fatal(code, message): Fatal,
) -> CloseReason {
    debug!(code = code.name(), %message, "closing with ERROR");
    out.queue(&Message::Error(ErrorMsg {
        code: code as u16,
        message: Str::from(message),
    }));
    let _ = timeout(Duration::from_secs(1), conn.close(out.bytes_mut())).await;
    CloseReason::Error(code)
}

/// A connection's span: debug level, so at the default level it is
/// disabled and costs an idle connection nothing (span storage measured
/// ~300 bytes each); the info lines carry peer and device as fields of
/// their own. `peer` is recorded once known (behind a balancer, from the
/// PROXY header).
fn conn_span(conn_id: u64) -> tracing::Span {
    tracing::debug_span!(
        "conn",
        id = conn_id,
        peer = tracing::field::Empty,
        device = tracing::field::Empty
    )
}

impl Session {
    /// A session that has not read a byte yet.
    fn new(
        conn: Connection,
        arrival: Arrival,
        shared: Arc<Shared>,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Self {
        Self {
            conn,
            out: Outbox::new(),
            shared,
            conn_id: arrival.conn_id,
            peer: arrival.peer,
            accepted: arrival.at,
            tls,
            permit: Some(arrival.permit),
            _gauge: OpenGauge::new(),
            repark_after: u64::MAX,
        }
    }

    async fn run_logged(mut self) {
        let tcp_peer = self.peer;
        let quic = self.conn.is_quic();
        // PROXY headers come from TCP balancers; QUIC's connect rate was
        // judged before its handshake.
        if self.shared.cfg.proxy_protocol.enabled && !quic {
            // Boxed: the idle session's future stays as small as without it.
            if let Err(outcome) = Box::pin(self.proxy_header()).await {
                metrics::counter!("furrow_connections_closed_total", "reason" => "proxy_refused")
                    .increment(1);
                debug!(conn = self.conn_id, peer = %tcp_peer, outcome, "connection refused: PROXY header");
                return;
            }
        }
        // The connect rate is judged here, where the real peer is known
        // (behind a balancer, from the PROXY header).
        if !quic
            && !self
                .shared
                .limits
                .allow_connect(self.peer.ip(), Instant::now())
        {
            debug!(conn = self.conn_id, peer = %self.peer, "connection refused: connect rate");
            if self.tls.is_none() {
                let busy = Fatal(
                    ErrorCode::Busy,
                    "connection rate exceeded; retry later".into(),
                );
                Box::pin(self.fail(busy)).await;
            }
            // A TLS client cannot read a plaintext ERROR: just closed.
            return;
        }
        if let Some(config) = self.tls.take() {
            // Boxed, like the PROXY header: idle sessions stay small.
            if let Err(outcome) = Box::pin(self.tls_handshake(config)).await {
                metrics::counter!("furrow_connections_closed_total", "reason" => "tls_failed")
                    .increment(1);
                debug!(conn = self.conn_id, peer = %self.peer, outcome, "connection refused: TLS handshake");
                return;
            }
        }
        tracing::Span::current().record("peer", tracing::field::display(self.peer));
        if quic {
            info!(conn = self.conn_id, peer = %self.peer, transport = "quic", "connection opened");
        } else if self.peer == tcp_peer {
            info!(conn = self.conn_id, peer = %self.peer, "connection opened");
        } else {
            info!(conn = self.conn_id, peer = %self.peer, via = %tcp_peer, "connection opened");
        }
        if let Some(live) = self.finish(Phase::AwaitingHello).await {
            self.park(live);
        }
    }

    /// A resumed session's task.
    async fn resumed(mut self, live: Box<Live>) {
        if let Some(live) = self.finish(Phase::Active(live)).await {
            self.park(live);
        }
    }

    /// Runs the phases from `phase` until the connection closes (logged
    /// once) or the session is to park (returned; parking consumes the
    /// session, done by the caller so the future holds it once).
    async fn finish(&mut self, phase: Phase) -> Option<Box<Live>> {
        let (reason, device) = match self.run(phase).await {
            Exit::Closed(reason, device) => (reason, device),
            Exit::Park(live) => return Some(live),
        };
        Closed {
            conn: self.conn_id,
            peer: self.peer,
            device: device.as_deref().unwrap_or("-"),
            duration: self.accepted.elapsed(),
            stats: self.conn.stats,
            frames_out: self.out.frames(),
        }
        .count_and_log(reason);
        None
    }

    async fn run(&mut self, mut phase: Phase) -> Exit {
        let mut device = None;
        loop {
            phase = match phase {
                Phase::AwaitingHello => Box::pin(self.handshake()).await,
                Phase::Active(mut live) => {
                    if self.active(&mut live).await {
                        return Exit::Park(live);
                    }
                    device = Some(live.m.device_id().to_string());
                    match live.m.start_drain() {
                        Some(End::Drain(drain)) => Phase::Draining(live, drain),
                        fatal => {
                            let f = match fatal {
                                Some(End::Fatal(f)) => f,
                                _ => Fatal(
                                    ErrorCode::Internal,
                                    "session ended without a cause".into(),
                                ),
                            };
                            let reason =
                                Box::pin(send_error(&mut self.conn, live.m.out(), f)).await;
                            // The socket is gone, but what was taken is stored.
                            Box::pin(self.settle(&mut live, false)).await;
                            self.out = std::mem::take(live.m.out());
                            Phase::Closed(reason)
                        }
                    }
                }
                Phase::Draining(mut live, drain) => {
                    let reason = Box::pin(self.drain(&mut live, drain)).await;
                    self.out = std::mem::take(live.m.out());
                    Phase::Closed(reason)
                }
                Phase::Closed(reason) => return Exit::Closed(reason, device),
            };
        }
    }

    /// Reads the PROXY header that must start the connection (bounded in
    /// bytes and time) and takes its source address as the peer. The
    /// bytes after it stay buffered for the handshake. On refusal, returns
    /// the outcome label; the caller closes without a word (the peer may not
    /// speak furrow/1).
    async fn proxy_header(&mut self) -> Result<(), &'static str> {
        let cfg = &self.shared.cfg;
        let count = |outcome: &'static str| {
            metrics::counter!("furrow_proxy_headers_total", "outcome" => outcome).increment(1);
            outcome
        };
        // Before reading a byte: only a trusted balancer may name a peer.
        if !crate::ingress::proxy::is_trusted(self.peer.ip(), &cfg.proxy_protocol.trusted) {
            return Err(count("untrusted"));
        }
        let deadline = self.accepted
            + Duration::from_millis(cfg.proxy_protocol.header_timeout_ms)
                .min(cfg.handshake_timeout());
        let shutdown = self.shared.shutdown.clone();
        loop {
            match crate::ingress::proxy::decode(self.conn.buffered()) {
                Ok(Some(h)) => {
                    self.conn.consume(h.len);
                    return match h.source {
                        Some(src) => {
                            self.peer = src;
                            count("proxied");
                            Ok(())
                        }
                        None => {
                            count("local");
                            Ok(())
                        }
                    };
                }
                Ok(None) => {}
                Err(e) => return Err(count(e.outcome())),
            }
            // Reads are HANDSHAKE_READ_CHUNK bytes (the connection sizes a
            // read up to a frame's length field, but a PROXY header's first
            // four bytes read as a length above any max_frame), and decode
            // answers before the buffer passes its caps.
            tokio::select! {
                _ = shutdown.cancelled() => return Err(count("shutdown")),
                _ = sleep_until(deadline) => return Err(count("timeout")),
                r = self.conn.read_some() => match r {
                    Ok(0) => return Err(count("closed")),
                    Ok(_) => {}
                    Err(_) => return Err(count("io_error")),
                },
            }
        }
    }

    /// The TLS handshake, bounded by `tls.handshake_timeout_ms` and the
    /// handshake deadline (both from accept). On failure, returns the
    /// outcome label; the caller closes (rustls has sent its alert).
    async fn tls_handshake(
        &mut self,
        config: Arc<rustls::ServerConfig>,
    ) -> Result<(), &'static str> {
        let cfg = &self.shared.cfg;
        let count = |outcome: &'static str| {
            metrics::counter!("furrow_tls_handshakes_total", "outcome" => outcome).increment(1);
            outcome
        };
        let deadline = self.accepted
            + Duration::from_millis(cfg.tls.handshake_timeout_ms).min(cfg.handshake_timeout());
        let shutdown = self.shared.shutdown.clone();
        let started = Instant::now();
        tokio::select! {
            _ = shutdown.cancelled() => Err(count("shutdown")),
            _ = sleep_until(deadline) => Err(count("timeout")),
            r = self.conn.start_tls(config) => match r {
                Ok(()) => {
                    metrics::histogram!("furrow_tls_handshake_seconds")
                        .record(started.elapsed().as_secs_f64());
                    let resumed = self.conn.tls_info().is_some_and(|(_, r)| r);
                    count(if resumed { "resumed" } else { "full" });
                    Ok(())
                }
                Err(e) => {
                    debug!(conn = self.conn_id, peer = %self.peer, error = %e, "TLS handshake failed");
                    Err(count("error"))
                }
            },
        }
    }

    /// Under mutual TLS, what the verified client certificate says about
    /// the device HELLO names.
    fn certificate(&self, device_id: &str) -> Certificate {
        let Some(tls) = self.shared.tls.as_ref().filter(|t| t.mutual()) else {
            return Certificate::Absent;
        };
        let Some(cert) = self.conn.peer_certificates().and_then(|c| c.first()) else {
            // Plain listener beside a mutual TLS one: no certificate.
            return Certificate::Absent;
        };
        match crate::ingress::tls::identity(cert, tls.identity_from()) {
            Some(id) if id == device_id => Certificate::Matches,
            Some(id) => {
                debug!(peer = %self.peer, device = %device_id, certificate = %id, "certificate is for another device");
                Certificate::Mismatch
            }
            None => Certificate::Mismatch,
        }
    }

    /// Sends ERROR (best effort, bounded) and reports the close.
    async fn fail(&mut self, fatal: Fatal) -> CloseReason {
        send_error(&mut self.conn, &mut self.out, fatal).await
    }

    async fn goodbye(&mut self, out: &mut Outbox, code: GoodbyeCode) -> CloseReason {
        let retry_after_ms = match code {
            GoodbyeCode::ServerShutdown => {
                let max = self.shared.cfg.shutdown.retry_after_max_ms;
                rand::thread_rng().gen_range(0..=max)
            }
            _ => 0,
        };
        out.queue(&Message::Goodbye(Goodbye {
            code: code as u16,
            retry_after_ms,
        }));
        let _ = timeout(Duration::from_secs(1), self.conn.close(out.bytes_mut())).await;
        CloseReason::Goodbye(code)
    }

    /// AwaitingHello: read HELLO by the deadline, authenticate, take over,
    /// WELCOME.
    async fn handshake(&mut self) -> Phase {
        let deadline = self.accepted + self.shared.cfg.handshake_timeout();
        let shutdown = self.shared.shutdown.clone();
        let frame = loop {
            match self.conn.next_frame() {
                Ok(Some(f)) => break f,
                Ok(None) => {}
                Err(e) => {
                    return self
                        .closed_by(Fatal(e.code(), e.to_string()), "hello")
                        .await
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => {
                    let mut out = std::mem::take(&mut self.out);
                    let reason = self.goodbye(&mut out, GoodbyeCode::ServerShutdown).await;
                    self.out = out;
                    return Phase::Closed(reason);
                }
                _ = sleep_until(deadline) => {
                    let f = Fatal(ErrorCode::HandshakeTimeout, "HELLO not received in time".into());
                    return self.closed_by(f, "timeout").await;
                }
                r = self.conn.read_some() => match r {
                    Ok(0) => return Phase::Closed(CloseReason::PeerClosed),
                    Ok(_) => {}
                    Err(_) => return Phase::Closed(CloseReason::Io),
                },
            }
        };
        let hello = match handshake::hello(frame) {
            Ok(h) => h,
            Err((f, outcome)) => return self.closed_by(f, outcome).await,
        };
        let device_id = hello.device_id.as_str().to_owned();
        tracing::Span::current().record("device", device_id.as_str());

        // Nothing is checked before the credentials: valid ones get in
        // whatever failed before from this address or for this device id
        // (ingress/limits.rs). Only failures pay, below.
        let limits = Arc::clone(&self.shared.limits);
        let store = Arc::clone(&self.shared.store);
        // The whole handshake, not only HELLO, is bounded by the deadline:
        // past it the device has most likely given up (its own timeout is
        // of the same order), and claiming the device for a connection
        // nobody reads would cost its next attempt a takeover. Under a
        // reconnection storm this sheds load with BUSY, which the device
        // answers with backoff.
        let found = match tokio::time::timeout_at(deadline, store.device_auth(&device_id)).await {
            Err(_) => return self.overloaded().await,
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                // BUSY (retry later), not an authentication failure: the
                // device backs off and comes back when the store answers.
                storage_failed(self.peer, &device_id, &e, "device lookup failed");
                let f = Fatal(ErrorCode::Busy, "storage unavailable; retry later".into());
                return self.closed_by(f, "storage_unavailable").await;
            }
        };
        let cert = self.certificate(&device_id);
        let verified =
            handshake::authenticated(found.as_ref(), hello.token.as_bytes(), cert, now_ms());
        if !verified.ok() {
            // Unknown device or wrong token alike: counted, then (past the
            // free failures) answered only after a growing delay, while
            // fewer than `auth_delayed_max` answers wait.
            let delay = limits.auth_failed(self.peer.ip(), &device_id, Instant::now());
            if !delay.is_zero() {
                if let Some(_slot) = limits.delay_slot() {
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
            let f = Fatal(ErrorCode::AuthFailed, "authentication failed".into());
            return self.closed_by(f, "auth_failed").await;
        }
        limits.auth_succeeded(&device_id);
        let Some(found) = found else {
            return self
                .closed_by(Fatal(ErrorCode::Internal, "lost device".into()), "internal")
                .await;
        };
        match verified {
            handshake::Verified::Previous => {
                metrics::counter!("furrow_auth_previous_token_total").increment(1);
            }
            handshake::Verified::Current if found.previous.is_some() => {
                // The device has its new token: the old one stops working.
                // Best effort: the grace period ends it anyway.
                if let Err(e) = store
                    .forget_previous_token(found.key, found.token_hash)
                    .await
                {
                    warn!(peer = %self.peer, device = %device_id, error = %e,
                        "cannot retire the previous token; it expires with its grace period");
                }
            }
            _ => {}
        }

        if Instant::now() >= deadline {
            return self.overloaded().await;
        }
        // Takeover: the newest connection wins. The older one stores what it
        // read and closes before this one announces last_seq.
        let device_id: Arc<str> = Arc::from(device_id);
        let handle = SessionHandle::new(self.conn_id, Arc::clone(&device_id), self.peer, now_ms());
        let cell = Arc::clone(handle.cell());
        let (old, slot) = self.shared.registry.claim(handle.clone());
        let guard = DeviceGuard {
            shared: Arc::clone(&self.shared),
            key: found.key,
            handle: handle.clone(),
        };
        if let Some(old) = old {
            metrics::counter!("furrow_session_takeovers_total").increment(1);
            old.kick(GoodbyeCode::SessionTakenOver);
            let wait = Duration::from_millis(self.shared.cfg.sessions.takeover_wait_ms);
            if timeout(wait, old.finished()).await.is_err() {
                warn!(peer = %self.peer, device = %device_id, "previous session did not finish in time; continuing");
            }
        }
        // Across instances: record the claim; a session displaced on
        // another instance is told to close, and waited for (bounded).
        // The claim may bring the open commands along: the flag is taken
        // first, so an announcement from now on is not lost.
        handle.take_commands();
        let cluster = self.shared.cluster.clone();
        let reads = match cluster
            .claim(found.key, &handle, self.peer, handle.connected_ms())
            .await
        {
            Ok(Claim {
                displaced: None,
                reads,
            }) => reads,
            Ok(Claim {
                displaced: Some(displaced),
                ..
            }) => {
                metrics::counter!("furrow_session_takeovers_total").increment(1);
                if !cluster
                    .take_over(&device_id, handle.generation(), &displaced)
                    .await
                {
                    warn!(peer = %self.peer, device = %device_id, instance = %displaced.instance,
                        "the session on the other instance did not release in time; continuing");
                }
                // What the claim read predates the other session's last
                // commit: read again.
                match cluster.reread(found.key).await {
                    Ok(reads) => reads,
                    Err(e) => {
                        storage_failed(self.peer, &device_id, &e, "last_seq lookup failed");
                        let f = Fatal(ErrorCode::Busy, "storage unavailable; retry later".into());
                        return self.closed_by(f, "storage_unavailable").await;
                    }
                }
            }
            Err(e) => {
                storage_failed(self.peer, &device_id, &e, "cannot record the session");
                let f = Fatal(ErrorCode::Busy, "storage unavailable; retry later".into());
                return self.closed_by(f, "storage_unavailable").await;
            }
        };
        let (seqs, commands) = match reads {
            Some(r) => (r.seqs, Some(r.commands)),
            None => {
                handle.notify_commands();
                match store.device_seqs(found.key).await {
                    Ok(s) => (s, None),
                    Err(e) => {
                        storage_failed(self.peer, &device_id, &e, "last_seq lookup failed");
                        let f = Fatal(ErrorCode::Busy, "storage unavailable; retry later".into());
                        return self.closed_by(f, "storage_unavailable").await;
                    }
                }
            }
        };
        storage_answers();
        // Rejected seqs stay taken across sessions and restarts.
        slot.observe_stored(seqs.stored.max(seqs.rejected));

        let cfg = &self.shared.cfg;
        let (welcome, keepalive) = handshake::welcome(
            cfg,
            hello.keepalive_s,
            hello.capabilities,
            seqs.stored,
            now_ms(),
        );
        self.out.queue(&Message::Welcome(welcome));
        metrics::counter!("furrow_handshakes_total", "outcome" => "ok").increment(1);
        self.shared.events.status(&device_id, true);
        self.conn.set_read_chunk(cfg.limits.read_chunk_bytes);
        let now = Instant::now();
        let m = Machine::new(
            Identity {
                device_id,
                key: found.key,
                slot,
                cell: Arc::clone(&cell),
            },
            session_limits(cfg),
            keepalive,
            limits.throttle(now),
            std::mem::take(&mut self.out),
            now,
        );
        let mut live = Box::new(Live { m, guard });
        let caps = welcome.capabilities.unwrap_or(0);
        live.m.set_capabilities(caps);
        if live.m.has_state() {
            // The first turn of the loop reads the desired state.
            handle.notify_commands();
        }
        if let Some(open) = commands {
            live.m.commands_due(open);
            self.run_effects(&mut live.m);
        }
        Phase::Active(live)
    }

    /// Ends a handshake that could not finish by its deadline (the store
    /// is slow to answer): BUSY, counted as `overloaded`.
    async fn overloaded(&mut self) -> Phase {
        let f = Fatal(ErrorCode::Busy, "gateway busy; retry later".into());
        self.closed_by(f, "overloaded").await
    }

    /// Ends a failed handshake: count, ERROR, close.
    async fn closed_by(&mut self, f: Fatal, outcome: &'static str) -> Phase {
        metrics::counter!("furrow_handshakes_total", "outcome" => outcome).increment(1);
        Phase::Closed(self.fail(f).await)
    }

    /// Runs the store work the machine asked for, in the background.
    fn run_effects(&self, m: &mut Machine) {
        for effect in m.take_effects() {
            let (store, events) = (Arc::clone(&self.shared.store), self.shared.events.clone());
            match effect {
                Effect::AckDesired { device, version } => {
                    tokio::spawn(async move {
                        if let Err(e) = store.ack_desired(device, version).await {
                            warn!(error = %e, "cannot record a desired state confirmation");
                        }
                    });
                }
                Effect::MarkDelivered(ids) => {
                    tokio::spawn(async move {
                        match store.mark_delivered(ids).await {
                            Ok(changed) => changed.iter().for_each(|c| events.command(c)),
                            Err(e) => warn!(error = %e, "cannot mark commands delivered"),
                        }
                    });
                }
                Effect::CompleteCommand {
                    device,
                    command_id,
                    outcome,
                } => {
                    tokio::spawn(async move {
                        match store.complete_command(device, command_id, outcome).await {
                            Ok(Some(c)) => events.command(&c),
                            Ok(None) => {
                                metrics::counter!("furrow_command_results_ignored_total")
                                    .increment(1);
                                debug!(
                                    command_id,
                                    "result for an unknown, expired or answered command ignored"
                                );
                            }
                            Err(e) => warn!(error = %e, "cannot record a command result"),
                        }
                    });
                }
            }
        }
    }

    /// Feeds the machine the frames already read, while it takes them.
    fn handle_frames(&mut self, live: &mut Live, now: Instant) {
        if let Some(q) = self.conn.quic() {
            // QUIC keeps the connection when the device's address changes:
            // the session goes on, and shows where the device is now.
            let now_at = q.remote_address();
            if now_at != self.peer {
                metrics::counter!("furrow_quic_migrations_total").increment(1);
                info!(conn = self.conn_id, device = %live.m.device_id(), from = %self.peer, to = %now_at,
                    "device address changed; the session goes on");
                self.peer = now_at;
                live.guard.handle.set_peer(now_at);
            }
        }
        let mut wall = None;
        while live.m.accepts_frame(now) {
            match self.conn.next_frame() {
                Ok(Some(f)) => live.m.on_frame(f, *wall.get_or_insert_with(now_ms)),
                Ok(None) => break,
                Err(e) => {
                    live.m.on_decode_error(e);
                    break;
                }
            }
        }
        if live.m.end_batch(now) {
            if let Some(ms) = wall {
                live.handle().seen(ms);
            }
        }
        self.run_effects(&mut live.m);
    }

    /// Hands the machine's job to the writer if its queue has room.
    /// Returns false if the writer is gone.
    fn submit(&self, m: &mut Machine) -> bool {
        if let Some(job) = m.take_job() {
            match self.shared.writer.try_send(job) {
                Ok(()) => {}
                Err(tokio::sync::mpsc::error::TrySendError::Full(job)) => m.defer_job(job),
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => return false,
            }
        }
        true
    }

    /// Active: the main loop, until the machine ends (false) or the
    /// session has been quiet for `sessions.park_after_ms` (true: park it).
    ///
    /// A device between frames waits here until it parks, so the await
    /// point is kept small: one Notify (commits, kicks, command wake-ups),
    /// one readiness wait, one timer. The rarer waits (room in the writer
    /// queue, the store's open commands) are boxed futures of their own.
    async fn active(&mut self, live: &mut Live) -> bool {
        let cell = live.cell();
        let sessions = &self.shared.cfg.sessions;
        let policy = (self.shared.park.is_some() && sessions.park_after_ms > 0).then(|| {
            machine::ParkPolicy {
                after: Duration::from_millis(sessions.park_after_ms),
                chatty: Duration::from_millis(sessions.park_chatty_ms),
            }
        });
        // One timer for the whole loop, not one per turn: a message takes
        // two turns (its read, its commit), and a Sleep made anew each turn
        // registers and deregisters each time under the timer wheel's lock,
        // where a later deadline (keepalive, park) only moves a kept one's
        // expiry (an atomic store). The commit wake-up stays per turn: a
        // Notified kept registered while the task runs turns each commit
        // that lands meanwhile into a spurious wake-up of the task, where a
        // Notify without a waiter keeps a permit for the next turn.
        let far = Instant::now() + Duration::from_secs(3600);
        let mut timer = std::pin::pin!(sleep_until(far));
        loop {
            if self.shared.shutdown.is_cancelled() {
                live.m.close(GoodbyeCode::ServerShutdown);
                return false;
            }
            if let Some(code) = live.handle().kicked() {
                live.m.close(code);
                return false;
            }
            if live.handle().take_commands() {
                Box::pin(self.send_commands(live)).await;
            }
            // Free what commits resolved before taking more frames, so that
            // a full window reopens as soon as it can.
            let now = Instant::now();
            live.m.on_commit(cell.committed());
            live.m.advance(now, true);
            self.handle_frames(live, now);
            if live.m.ended().is_some() {
                return false;
            }
            if !self.submit(&mut live.m) {
                live.m
                    .fail(Fatal(ErrorCode::Internal, "storage writer stopped".into()));
                return false;
            }
            // Rejects and duplicates may resolve at once.
            live.m.advance(now, true);
            if self.conn.try_flush(live.m.out().bytes_mut()).is_err() {
                live.m.peer_closed();
                return false;
            }
            // The socket took the outbox: firmware requests held for room
            // in it are served now (written on the way out of the wait).
            live.m.on_flushed(now);
            let room = live.m.room(now);
            let buffered = self.conn.has_complete_frame();
            if room && buffered {
                // More complete frames already read: handle them first.
                continue;
            }
            // Read only when nothing complete is waiting: the read buffer
            // then stays within one frame plus one read chunk.
            let can_read = room && !buffered;
            live.m.set_reading(can_read, now);
            if live.m.has_pending_job() {
                if !Box::pin(self.wait_for_writer(live)).await {
                    live.m
                        .fail(Fatal(ErrorCode::Internal, "storage writer stopped".into()));
                    return false;
                }
                continue;
            }
            if can_read && !self.conn.has_buffered_input() {
                self.conn.release_idle();
                live.m.release_idle();
            }
            let write = self.conn.unsent(live.m.out().bytes_mut()) > 0;
            // Quiet with nothing in flight: park when the quiet lasts (at
            // once for a woken session that has handled its frame, unless
            // the device turned out chatty).
            let park_check = policy.map(|p| {
                let after = live.m.park_after(p);
                let quick = self.conn.stats.frames_in > self.repark_after && after == p.after;
                live.m.quiet_since() + if quick { Duration::ZERO } else { after }
            });
            let park_at = park_check
                .filter(|_| can_read && !write && live.m.parkable() && self.conn.parkable());
            if park_at.is_some_and(|at| at <= now) && !live.handle().commands_pending() {
                return true;
            }
            // While a commit or a write keeps the session from parking, the
            // timer still aims at the park check (a turn that finds the
            // session busy costs nothing else), so that its deadline only
            // ever moves later from a message's read to its ACK: Tokio
            // moves a deadline later with an atomic store, earlier only by
            // registering again under the wheel's lock.
            let park_wake = park_at.or(park_check.filter(|&at| at > now));
            let wake_at = match (live.m.wake_at(can_read, now), park_wake) {
                (Some(w), Some(p)) => Some(w.min(p)),
                (w, p) => w.or(p),
            };
            if let Some(at) = wake_at.filter(|&at| at != timer.deadline()) {
                timer.as_mut().reset(at);
            }
            // A socket outside the reactor (a woken session) is not
            // registered just to watch for more while its frame's commit is
            // pending: the ACK comes first, and more bytes then either find
            // the session still here or wake it from the lot again.
            let read_now = can_read && (live.m.settled() || !self.conn.is_direct());
            // Waiting for a commit with nothing to write: the writer may
            // write its ACK itself, and this task sleeps on (plain TCP).
            let armed = (read_now && !write && !live.m.settled())
                .then(|| self.conn.plain_fd())
                .flatten()
                .map(|fd| cell.arm(fd, live.m.acked()));
            let woke = tokio::select! {
                () = cell.changed() => Woke::Changed,
                r = self.conn.io(live.m.out().bytes_mut(), read_now, write), if read_now || write => Woke::Io(r),
                () = timer.as_mut(), if wake_at.is_some() => Woke::Timer,
            };
            if let Some(ack) = armed.and_then(crate::writer::Armed::disarm) {
                self.conn.stats.bytes_out += ack.written as u64;
                live.m.on_writer_ack(ack);
            }
            match woke {
                Woke::Changed => {}
                Woke::Io(Ok(Some(0)) | Err(_)) => {
                    live.m.peer_closed();
                    return false;
                }
                Woke::Io(Ok(Some(_))) => live.m.on_bytes(Instant::now()),
                Woke::Io(Ok(None)) => {}
                Woke::Timer => {
                    live.m.on_timer(Instant::now());
                    if live.m.ended().is_some() {
                        return false;
                    }
                }
            }
        }
    }

    /// Reads the device's open commands and hands them to the machine,
    /// which sends those this connection has not sent yet.
    async fn send_commands(&mut self, live: &mut Live) {
        match self.shared.store.open_commands(live.m.key()).await {
            Ok(open) => live.m.commands_due(open),
            Err(e) => {
                warn!(device = %live.m.device_id(), error = %e, "cannot read commands; retrying at the next wake-up");
                live.handle().notify_commands();
            }
        }
        // The same wake-up announces a change of the desired state, and a
        // firmware job's start (or end).
        if live.m.has_state() {
            match self.shared.store.state_of(live.m.key()).await {
                Ok(row) => {
                    live.m.desired_due(&row);
                    if live.m.has_firmware() {
                        Box::pin(self.offer_firmware(live, &row)).await;
                    }
                }
                Err(e) => {
                    warn!(device = %live.m.device_id(), error = %e, "cannot read the desired state; retrying at the next wake-up");
                    live.handle().notify_commands();
                }
            }
        }
        self.run_effects(&mut live.m);
    }

    /// Offers the image the device's firmware job wants, when a download
    /// slot is free (a freed slot wakes the session again), or withdraws
    /// an offer its job no longer makes.
    async fn offer_firmware(&mut self, live: &mut Live, row: &crate::devices::state::StateRow) {
        let fw = Arc::clone(&self.shared.firmware);
        let a = match self.shared.store.firmware_assignment(live.m.key()).await {
            Ok(Some(a)) => a,
            Ok(None) => return live.m.firmware_withdraw(),
            Err(e) => {
                warn!(device = %live.m.device_id(), error = %e, "cannot read the firmware job; retrying at the next wake-up");
                return live.handle().notify_commands();
            }
        };
        if live.m.firmware_offered() == Some(a.image.as_str()) {
            return;
        }
        let reported: serde_json::Value =
            serde_json::from_str(&row.reported.document).unwrap_or_default();
        if !crate::firmware::wants_offer(&reported, &a.image, &a.version) {
            return;
        }
        let image = match fw.images.get(&a.image).await {
            Ok(Some(img)) => img,
            Ok(None) => {
                warn!(device = %live.m.device_id(), image = %a.image, "the firmware job's image is gone or damaged");
                return;
            }
            Err(e) => {
                warn!(device = %live.m.device_id(), error = %e, "cannot load a firmware image; retrying at the next wake-up");
                return live.handle().notify_commands();
            }
        };
        let device = Arc::clone(live.m.device_id());
        if let Some(slot) = fw.slots.try_acquire(a.job, a.max_downloads, &device) {
            let terms = crate::session::messages::firmware::OfferTerms {
                job: a.job,
                slot,
                chunk_max: fw.chunk_max,
                window: fw.window,
                pace: Arc::clone(&fw.pace),
            };
            live.m.firmware_offer(image, terms);
        }
    }

    /// Waits for room in the writer queue and hands over the pending job,
    /// meanwhile sending ACKs for commits and waking for kicks. Returns
    /// false if the writer is gone.
    async fn wait_for_writer(&mut self, live: &mut Live) -> bool {
        let cell = live.cell();
        let writer = self.shared.writer.clone();
        let write = self.conn.unsent(live.m.out().bytes_mut()) > 0;
        tokio::select! {
            permit = writer.reserve() => match (permit, live.m.take_job()) {
                (Ok(p), Some(job)) => p.send(job),
                (Ok(_), None) => {}
                (Err(_), _) => return false,
            },
            _ = cell.changed() => {}
            _ = self.conn.io(live.m.out().bytes_mut(), false, write), if write => {}
        }
        true
    }

    /// Hands every staged record to the writer and waits until all this
    /// session took is resolved, sending ACKs when `ack` is true (and while
    /// the socket takes them: a dead socket stops the ACKs, not the wait).
    /// Bounded by the shutdown drain time once shutdown has begun.
    async fn settle(&mut self, live: &mut Live, mut ack: bool) -> bool {
        let shutdown = self.shared.shutdown.clone();
        let drain = Duration::from_millis(self.shared.cfg.shutdown.drain_timeout_ms);
        let cell = live.cell();
        let writer = self.shared.writer.clone();
        let mut deadline: Option<Instant> = None;
        loop {
            if !self.submit(&mut live.m) {
                return false;
            }
            live.m.on_commit(cell.committed());
            live.m.advance(Instant::now(), ack);
            if ack && self.conn.try_flush(live.m.out().bytes_mut()).is_err() {
                ack = false;
            }
            if live.m.settled() {
                return true;
            }
            if deadline.is_none() && shutdown.is_cancelled() {
                deadline = Some(Instant::now() + drain);
            }
            let far = Instant::now() + Duration::from_secs(3600);
            let pending = live.m.has_pending_job();
            tokio::select! {
                permit = writer.reserve(), if pending => match (permit, live.m.take_job()) {
                    (Ok(p), Some(job)) => p.send(job),
                    (Ok(_), None) => {}
                    (Err(_), _) => return false,
                },
                _ = cell.changed() => {}
                _ = shutdown.cancelled(), if deadline.is_none() => {}
                _ = sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => {
                    warn!(peer = %self.peer, device = %live.m.device_id(), outstanding = live.m.outstanding(), "drain deadline passed with telemetry unstored");
                    return false;
                }
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    }

    /// Draining: stop reading, handle what was already read, store and ACK
    /// it all, then GOODBYE (if ours to say) and close.
    async fn drain(&mut self, live: &mut Live, drain: Drain) -> CloseReason {
        // Complete frames already in the buffer were read: handle them too
        // (not after a device GOODBYE, which is its last word), whatever
        // the rate: nothing more is read.
        if !matches!(drain, Drain::DeviceGoodbye) {
            self.handle_frames(live, Instant::now());
            if let Some(End::Fatal(f)) = live.m.start_drain() {
                let reason = send_error(&mut self.conn, live.m.out(), f).await;
                self.settle(live, false).await;
                return reason;
            }
        }
        let socket_ok = !matches!(drain, Drain::PeerClosed);
        self.settle(live, true).await;
        match drain {
            Drain::Goodbye(code) => self.goodbye(live.m.out(), code).await,
            Drain::DeviceGoodbye => {
                let _ = timeout(
                    Duration::from_secs(1),
                    self.conn.close(live.m.out().bytes_mut()),
                )
                .await;
                CloseReason::DeviceGoodbye
            }
            Drain::PeerClosed => {
                if socket_ok {
                    let _ = timeout(
                        Duration::from_secs(1),
                        self.conn.close(live.m.out().bytes_mut()),
                    )
                    .await;
                }
                CloseReason::PeerClosed
            }
        }
    }
}

/// The lot that holds this gateway's parked sessions.
pub type ParkLot = Lot<ParkedSession>;

/// A parked session, held (boxed) in the lot beside its socket: no task, no
/// future, no buffer, and no field that another one already holds (the
/// peer, connection time and connection id are in the registry's handle).
pub struct ParkedSession {
    conn: connection::Parts,
    permit: Option<ConnPermit>,
    gauge: OpenGauge,
    m: machine::Parked,
    guard: DeviceGuard,
    /// Counts as a connection task while parked, so shutdown waits for it.
    token: tokio_util::task::task_tracker::TaskTrackerToken,
}

impl ParkedSession {
    /// Whether the device is gone and nothing is left to do for it: the
    /// socket has nothing more to read (the device closed it, or it failed)
    /// and nothing waits to be said to the device (a kick, commands,
    /// shutdown). A parked session has nothing in flight, so its task
    /// would only read the close and end; in a reconnect storm that is a
    /// task per device, queued behind the new handshakes, while each
    /// returning device finds its old session still open and takes it
    /// over (docs/performance.md, "100,000 devices on one machine").
    fn gone(&self, stream: &mio::net::TcpStream) -> bool {
        let handle = &self.guard.handle;
        if self.guard.shared.shutdown.is_cancelled()
            || handle.kicked().is_some()
            || handle.commands_pending()
        {
            return false;
        }
        match stream.peek(&mut [0u8; 1]) {
            Ok(n) => n == 0,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ),
        }
    }

    /// Ends a session found [`gone`](Self::gone) where the lot holds it,
    /// counted and logged as its task would have; dropping it releases the
    /// device and closes the socket.
    fn close_gone(self) {
        let info = self.guard.handle.info();
        Closed {
            conn: self.conn_id(),
            peer: info.peer,
            device: self.guard.handle.device(),
            duration: Duration::from_millis(now_ms().saturating_sub(info.connected_ms)),
            stats: self.conn.stats(),
            frames_out: self.m.frames_out(),
        }
        .count_and_log(CloseReason::PeerClosed);
    }
}

impl Parked for ParkedSession {
    fn conn_id(&self) -> u64 {
        self.guard.handle.id()
    }

    fn deadline(&self) -> std::time::Instant {
        self.m.deadline().into_std()
    }
}

/// Starts the parking lot; woken sessions resume as tasks on `tracker`.
/// Call from within the runtime.
pub fn start_lot(tracker: tokio_util::task::TaskTracker) -> std::io::Result<Arc<ParkLot>> {
    // The lot is a task on this runtime: its callback runs on a worker,
    // where a spawn goes to that worker's own queue.
    Lot::start(Box::new(move |stream, parked: ParkedSession, why| {
        let id = parked.conn_id();
        if why == Wake::Hangup {
            if parked.gone(&stream) {
                metrics::counter!("furrow_parked_hangups_total", "outcome" => "closed")
                    .increment(1);
                parked.close_gone();
                return;
            }
            metrics::counter!("furrow_parked_hangups_total", "outcome" => "resumed").increment(1);
        }
        let std_stream: std::net::TcpStream = stream.into();
        let (task, token) = resume(std_stream, parked, why);
        crate::ingress::listener::spawn_contained(&tracker, id, task);
        drop(token);
    }))
}

/// A woken session's task: back into the active phase (`stopping`: the
/// lot stops, so the gateway is shutting down). Returns the task and the
/// parked session's tracker token, to drop once the task is spawned.
fn resume(
    stream: std::net::TcpStream,
    parked: ParkedSession,
    why: Wake,
) -> (
    impl std::future::Future<Output = ()> + Send,
    tokio_util::task::task_tracker::TaskTrackerToken,
) {
    let conn_id = parked.conn_id();
    let ParkedSession {
        conn,
        permit,
        gauge,
        m,
        guard,
        token,
    } = parked;
    let conn = Connection::from_parts(stream, conn);
    let repark_after = match why {
        Wake::Readable | Wake::Hangup => conn.stats.frames_in,
        Wake::Deadline | Wake::Called | Wake::Stop => u64::MAX,
    };
    let cell = Arc::clone(guard.handle.cell());
    cell.set_parked(None);
    let shared = Arc::clone(&guard.shared);
    let cfg = &shared.cfg;
    let now = Instant::now();
    let mut m = Machine::unpark(
        m,
        Arc::clone(guard.handle.device()),
        guard.key,
        Arc::clone(&cell),
        session_limits(cfg),
        shared.limits.throttle(now),
        now,
    );
    if why == Wake::Stop {
        m.close(GoodbyeCode::ServerShutdown);
    }
    let info = guard.handle.info();
    // The connection's age, for its close line, from the wall clock.
    let age = Duration::from_millis(now_ms().saturating_sub(info.connected_ms));
    let span = tracing::debug_span!("conn", id = conn_id, peer = %info.peer, device = %guard.handle.device());
    let live = Box::new(Live { m, guard });
    let session = Session {
        conn,
        out: Outbox::new(),
        shared,
        conn_id,
        peer: info.peer,
        accepted: now.checked_sub(age).unwrap_or(now),
        tls: None,
        permit,
        _gauge: gauge,
        repark_after,
    };
    (session.resumed(live).instrument(span), token)
}

/// What ended an active session's wait.
enum Woke {
    /// A commit, a kick, commands.
    Changed,
    /// The socket.
    Io(std::io::Result<Option<usize>>),
    /// Its timer.
    Timer,
}

impl Session {
    /// Hands a quiet session to the lot: the task ends here, the socket
    /// and a small record stay.
    fn park(self, live: Box<Live>) {
        let Some(lot) = self.shared.park.clone() else {
            return;
        };
        let Live { m, guard } = *live;
        // Kept past the move into the record: to look once more after.
        let handle = guard.handle.clone();
        let cell = Arc::clone(handle.cell());
        let (std_stream, conn) = match self.conn.into_parts() {
            Ok(s) => s,
            Err(e) => {
                // Dropping everything closes the connection and releases
                // the device; the device reconnects.
                warn!(conn = self.conn_id, error = %e, "cannot park a session; closing it");
                metrics::counter!("furrow_connections_closed_total", "reason" => "io_error")
                    .increment(1);
                return;
            }
        };
        let m = m.park(Instant::now());
        let id = self.conn_id;
        let parked = ParkedSession {
            conn,
            permit: self.permit,
            gauge: self._gauge,
            m,
            guard,
            token: self.shared.tracker.token(),
        };
        let stream = mio::net::TcpStream::from_std(std_stream);
        let unpark: Arc<dyn Unpark> = Arc::clone(&lot) as Arc<dyn Unpark>;
        let parked_at = |key| cell.set_parked(Some(Parking { lot: unpark, key }));
        match lot.park(stream, parked, parked_at) {
            Ok(()) => {
                // A wake-up between the last look and now found no lot:
                // look once more.
                if self.shared.shutdown.is_cancelled()
                    || handle.kicked().is_some()
                    || handle.commands_pending()
                {
                    cell.wake();
                }
            }
            Err((stream, parked)) => {
                // The lot is stopping: resume at once, in a task of its own.
                let (task, token) = resume(stream.into(), parked, Wake::Stop);
                crate::ingress::listener::spawn_contained(&self.shared.tracker, id, task);
                drop(token);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use tokio_util::sync::CancellationToken;

    /// An idle device costs its task's future plus a few small objects; the
    /// future is the bulk (docs/performance.md). This pins it, so that a new
    /// `select!` branch or a captured value that doubles it is noticed.
    /// Not a timing: sizes are deterministic for a given compiler.
    #[tokio::test]
    async fn idle_connection_future_stays_small() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config {
            data_dir: dir.path().into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            ..Default::default()
        };
        cfg.api.listen = "127.0.0.1:0".parse().unwrap();
        let server = crate::Server::bind(cfg.clone()).await.unwrap();
        let (writer, _rx) = tokio::sync::mpsc::channel(1);
        let shared = Arc::new(Shared {
            cfg: cfg.clone(),
            store: server.store(),
            registry: server.registry(),
            writer,
            shutdown: CancellationToken::new(),
            events: crate::publish::Events::off(),
            cluster: crate::cluster::Cluster::single(),
            tls: None,
            limits: Arc::new(crate::ingress::limits::Limiter::new(&Default::default())),
            park: None,
            tracker: tokio_util::task::TaskTracker::new(),
            firmware: crate::firmware::serve::Service::new(&cfg, server.store(), server.registry()),
        });
        let permit = shared.limits.try_connection().unwrap();
        let arrival = Arrival {
            peer: addr,
            at: Instant::now(),
            conn_id: 1,
            permit,
        };
        let fut = run(stream, arrival, shared, None);
        let size = std::mem::size_of_val(&fut);
        // 1,288 since the writer may write ACKs (the guard on the lent
        // socket lives across the wait: 8 bytes).
        assert!(size <= 1288, "connection future grew to {size} bytes");
    }
}
#[cfg(test)]
mod parked_size {
    /// A parked session is the whole cost of a quiet device besides its
    /// registry entry (docs/performance.md). Sizes are deterministic for a
    /// given compiler: this notices a field that grows it.
    #[test]
    fn a_parked_session_stays_small() {
        let size = std::mem::size_of::<super::ParkedSession>();
        assert!(size <= 160, "a parked session grew to {size} bytes");
    }
}
