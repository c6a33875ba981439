//! One device session: a connection's life from accept to close.
//!
//! The phases are an explicit state machine ([`Phase`]):
//!
//! ```text
//! AwaitingHello --HELLO ok--> Active --kick/shutdown/GOODBYE/EOF--> Draining --> Closed
//!       |                        |
//!       +--error/timeout---------+--ERROR--------------------------------------> Closed
//! ```
//!
//! * AwaitingHello: the whole HELLO must arrive before the handshake
//!   deadline (counted from accept). Then authentication, takeover of an
//!   older session (which is kicked and awaited, so WELCOME's `last_seq`
//!   includes everything it had read), and WELCOME.
//! * Active: frames are decoded from the read buffer and handled in order.
//!   TELEMETRY is deduplicated against the device's taken watermark,
//!   validated, and staged for the writer; ACKs follow commits (see
//!   [`acks`]). The session stops reading when `max_inflight` frames are
//!   unacknowledged, when the writer queue is full, or when too many bytes
//!   wait to be sent: TCP backpressure, never a drop.
//! * Draining: no more reading; everything taken is stored and ACKed, then
//!   GOODBYE (for shutdown, takeover, revocation) and close.
//!
//! Whatever the exit, every frame this session took reaches the writer and
//! is resolved before the session releases its device: the next session of
//! the device then reads an exact `last_seq` from the store.

pub mod acks;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use furrow_proto::content;
use furrow_proto::{
    ErrorCode, ErrorMsg, Goodbye, GoodbyeCode, Message, MessageType, RawFrame, Reject, Str,
    Telemetry, Welcome,
};
use rand::Rng;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::auth;
use crate::clock::now_ms;
use crate::config::Config;
use crate::connection::Connection;
use crate::publish::Events;
use crate::registry::{DeviceSlot, Registry, SessionHandle};
use crate::store::prelude::*;
use crate::store::{CommandOutcome, DeviceKey, TelemetryRecord};
use crate::writer::{AckCell, WriteJob, WriterTx};
use acks::AckTracker;

/// After backpressure ends, how long the gateway waits at least for bytes to
/// flow again before judging the peer dead (see `Session::active`).
const RESUME_GRACE: Duration = Duration::from_secs(10);

/// Read size before WELCOME (the largest HELLO is 397 bytes).
const HANDSHAKE_READ_CHUNK: usize = 512;

/// What every session shares.
pub struct Shared {
    /// The configuration in force.
    pub cfg: Config,
    /// The store (for HELLO lookups).
    pub store: Arc<dyn Store>,
    /// Live sessions.
    pub registry: Arc<Registry>,
    /// The writer's queue.
    pub writer: WriterTx,
    /// Cancelled when the gateway shuts down.
    pub shutdown: CancellationToken,
    /// Device status events.
    pub events: Events,
    /// Other instances (PostgreSQL), or none.
    pub cluster: crate::cluster::Cluster,
    /// The TLS listener's state (mutual TLS, identities), if it runs.
    pub tls: Option<Arc<crate::tls::TlsState>>,
    /// Connection, rate and authentication-failure limits.
    pub limits: Arc<crate::limits::Limiter>,
}

/// Why a connection closed; the `reason` of the close log line and metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer closed the connection.
    PeerClosed,
    /// The peer said GOODBYE.
    DeviceGoodbye,
    /// The gateway sent ERROR with this code.
    Error(ErrorCode),
    /// The gateway sent GOODBYE with this code.
    Goodbye(GoodbyeCode),
    /// The socket failed.
    Io,
}

impl CloseReason {
    /// A stable label (bounded set) for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PeerClosed => "peer_closed",
            Self::DeviceGoodbye => "device_goodbye",
            Self::Error(c) => c.name(),
            Self::Goodbye(c) => c.name(),
            Self::Io => "io_error",
        }
    }
}

/// The connection's state machine.
enum Phase {
    AwaitingHello,
    Active(Box<Active>),
    Draining(Box<Active>, Drain),
    Closed(CloseReason),
}

/// Why an active session drains.
#[derive(Debug, Clone, Copy)]
enum Drain {
    /// Say GOODBYE with this code after draining.
    Goodbye(GoodbyeCode),
    /// The device said GOODBYE: ACK what was read, then close.
    DeviceGoodbye,
    /// The device closed its side: store what was read, ACK if possible.
    PeerClosed,
}

/// A fatal condition: ERROR `code` with `message`, then close.
struct Fatal(ErrorCode, String);

/// What handling buffered frames asks for next.
enum Flow {
    Continue,
    Drain(Drain),
    Fatal(Fatal),
}

/// State of an authenticated session.
struct Active {
    device_id: Arc<str>,
    key: DeviceKey,
    slot: Arc<DeviceSlot>,
    handle: SessionHandle,
    cell: Arc<AckCell>,
    acks: AckTracker,
    /// Records read but not yet queued to the writer.
    staged: Vec<TelemetryRecord>,
    /// Commands sent on this connection and not yet answered.
    sent_commands: Vec<u64>,
    /// `(last ticket, when read)` of each read that staged telemetry, for
    /// the ACK latency histogram (one sample per ACK: its oldest read).
    read_marks: std::collections::VecDeque<(u64, Instant)>,
    /// A job the writer queue had no room for.
    pending_job: Option<WriteJob>,
    /// Ticket of the last staged record or rejection.
    ticket: u64,
    /// Highest seq rejected but not yet handed to the writer, 0 if none.
    staged_reject: u64,
    /// Ticket of the last rejection mark: the session holds its device until
    /// the mark is committed, so the next session reads it back.
    mark_ticket: u64,
    keepalive: Duration,
    /// The connection is dropped if no complete frame arrives before this.
    idle_deadline: Instant,
    /// When reading stopped for backpressure (time then does not count).
    paused_at: Option<Instant>,
    /// When reading resumed after a pause, until bytes flow again (that
    /// time does not count either, up to [`RESUME_GRACE`]).
    resumed_at: Option<Instant>,
    /// The device's telemetry rate (`limits.telemetry_rate_per_device`);
    /// out of tokens, the session stops reading: a backpressure pause.
    throttle: Option<crate::limits::Throttle>,
    // Keeps the registry entry exactly as long as the session lives.
    _guard: DeviceGuard,
}

/// Releases the device from the registry and signals a waiting successor,
/// on every exit path including a panic.
struct DeviceGuard {
    registry: Arc<Registry>,
    device_id: Arc<str>,
    handle: SessionHandle,
    events: Events,
    key: crate::store::DeviceKey,
    cluster: crate::cluster::Cluster,
}

impl Drop for DeviceGuard {
    fn drop(&mut self) {
        // Offline only if no newer session of the device took over.
        if self.registry.release(&self.device_id, self.handle.id()) {
            self.events.status(&self.device_id, false);
        }
        self.cluster
            .release(self.key, &self.device_id, &self.handle);
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
    peer: SocketAddr,
    accepted: Instant,
    conn_id: u64,
    shared: Arc<Shared>,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> impl std::future::Future<Output = ()> + Send {
    // A debug-level span: at the default level it is disabled and costs an
    // idle connection nothing (span storage measured ~300 bytes each); the
    // info lines carry peer and device as fields of their own.
    // `peer` is recorded once known: behind a balancer, from the PROXY header.
    let span = tracing::debug_span!(
        "conn",
        id = conn_id,
        peer = tracing::field::Empty,
        device = tracing::field::Empty
    );
    let _ = stream.set_nodelay(true);
    // HELLO is at most 397 bytes: small reads until WELCOME, so that a
    // crowd of handshakes does not touch a full read chunk each.
    let conn = Connection::new(stream, shared.cfg.limits.max_frame, HANDSHAKE_READ_CHUNK);
    let session = Session {
        conn,
        shared,
        conn_id,
        peer,
        accepted,
        tls,
    };
    session.run_logged().instrument(span)
}

struct Session {
    conn: Connection,
    shared: Arc<Shared>,
    conn_id: u64,
    peer: SocketAddr,
    accepted: Instant,
    /// The TLS configuration to handshake with (TLS listener), taken at
    /// accept; dropped once the handshake is done.
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl Session {
    async fn run_logged(mut self) {
        let _gauge = OpenGauge::new();
        let tcp_peer = self.peer;
        if self.shared.cfg.proxy_protocol.enabled {
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
        if !self
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
        if self.peer == tcp_peer {
            info!(conn = self.conn_id, peer = %self.peer, "connection opened");
        } else {
            info!(conn = self.conn_id, peer = %self.peer, via = %tcp_peer, "connection opened");
        }
        let (reason, device) = self.run().await;
        let st = self.conn.stats;
        metrics::counter!("furrow_connections_closed_total", "reason" => reason.as_str())
            .increment(1);
        info!(
            conn = self.conn_id,
            peer = %self.peer,
            device = device.as_deref().unwrap_or("-"),
            duration_ms = self.accepted.elapsed().as_millis() as u64,
            frames_in = st.frames_in,
            frames_out = st.frames_out,
            bytes_in = st.bytes_in,
            bytes_out = st.bytes_out,
            reason = reason.as_str(),
            "connection closed"
        );
    }

    async fn run(&mut self) -> (CloseReason, Option<String>) {
        let mut phase = Phase::AwaitingHello;
        let mut device = None;
        loop {
            phase = match phase {
                Phase::AwaitingHello => Box::pin(self.handshake()).await,
                Phase::Active(mut a) => {
                    device = Some(a.device_id.to_string());
                    match self.active(&mut a).await {
                        Ok(drain) => Phase::Draining(a, drain),
                        Err(fatal) => {
                            let reason = Box::pin(self.fail(fatal)).await;
                            // The socket is gone, but what was taken is stored.
                            Box::pin(self.settle(&mut a, false)).await;
                            Phase::Closed(reason)
                        }
                    }
                }
                Phase::Draining(mut a, drain) => {
                    Phase::Closed(Box::pin(self.drain(&mut a, drain)).await)
                }
                Phase::Closed(reason) => return (reason, device),
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
        if !crate::proxy::is_trusted(self.peer.ip(), &cfg.proxy_protocol.trusted) {
            return Err(count("untrusted"));
        }
        let deadline = self.accepted
            + Duration::from_millis(cfg.proxy_protocol.header_timeout_ms)
                .min(cfg.handshake_timeout());
        let shutdown = self.shared.shutdown.clone();
        loop {
            match crate::proxy::decode(self.conn.buffered()) {
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

    /// Under mutual TLS: the device id the verified client certificate
    /// names, which HELLO's must equal. `Ok(None)` without mutual TLS;
    /// `Err` when the certificate names none.
    fn certificate_identity(&self) -> Result<Option<String>, Fatal> {
        let Some(tls) = self.shared.tls.as_ref().filter(|t| t.mutual()) else {
            return Ok(None);
        };
        let Some(cert) = self.conn.peer_certificates().and_then(|c| c.first()) else {
            // Plain listener beside a mutual TLS one: no certificate.
            return Ok(None);
        };
        match crate::tls::identity(cert, tls.identity_from()) {
            Some(id) => Ok(Some(id)),
            None => Err(Fatal(ErrorCode::AuthFailed, "authentication failed".into())),
        }
    }

    /// Sends ERROR (best effort, bounded) and reports the close.
    async fn fail(&mut self, Fatal(code, message): Fatal) -> CloseReason {
        debug!(code = code.name(), %message, "closing with ERROR");
        self.conn.queue(&Message::Error(ErrorMsg {
            code: code as u16,
            message: Str::from(message),
        }));
        let _ = timeout(Duration::from_secs(1), self.conn.close()).await;
        CloseReason::Error(code)
    }

    async fn goodbye(&mut self, code: GoodbyeCode) -> CloseReason {
        let retry_after_ms = match code {
            GoodbyeCode::ServerShutdown => {
                let max = self.shared.cfg.shutdown.retry_after_max_ms;
                rand::thread_rng().gen_range(0..=max)
            }
            _ => 0,
        };
        self.conn.queue(&Message::Goodbye(Goodbye {
            code: code as u16,
            retry_after_ms,
        }));
        let _ = timeout(Duration::from_secs(1), self.conn.close()).await;
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
                    return Phase::Closed(self.goodbye(GoodbyeCode::ServerShutdown).await);
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
        if frame.kind != MessageType::Hello {
            let f = Fatal(
                ErrorCode::ProtocolError,
                "the first message must be HELLO".into(),
            );
            return self.closed_by(f, "not_hello").await;
        }
        let hello = match Message::from_frame(frame) {
            Ok(Message::Hello(h)) => h,
            Ok(_) => {
                let f = Fatal(
                    ErrorCode::Internal,
                    "HELLO parsed as another message".into(),
                );
                return self.closed_by(f, "internal").await;
            }
            Err(e) => {
                return self
                    .closed_by(Fatal(e.code(), e.to_string()), "bad_hello")
                    .await
            }
        };
        let device_id = hello.device_id.as_str().to_owned();
        tracing::Span::current().record("device", device_id.as_str());

        // A banned address or device id: the same answer as a wrong token,
        // without a store lookup.
        let limits = Arc::clone(&self.shared.limits);
        if limits.auth_banned(self.peer.ip(), &device_id, Instant::now()) {
            let f = Fatal(ErrorCode::AuthFailed, "authentication failed".into());
            return self.closed_by(f, "auth_banned").await;
        }
        let store = Arc::clone(&self.shared.store);
        let found = match store.device_auth(&device_id).await {
            Ok(found) => found,
            Err(e) => {
                // BUSY (retry later), not an authentication failure: the
                // device backs off and comes back when the store answers.
                storage_failed(self.peer, &device_id, &e, "device lookup failed");
                let f = Fatal(ErrorCode::Busy, "storage unavailable; retry later".into());
                return self.closed_by(f, "storage_unavailable").await;
            }
        };
        // Under mutual TLS the certificate names the device: it must be the
        // one HELLO names, and then it stands for the token (an empty token
        // is accepted; a token given must still be right). A mismatch fails
        // like a wrong token: same answer, same delay.
        let by_certificate = match self.certificate_identity() {
            Err(_) => Some(false),
            Ok(Some(cert_id)) if cert_id != device_id => {
                debug!(peer = %self.peer, device = %device_id, certificate = %cert_id, "certificate is for another device");
                Some(false)
            }
            Ok(Some(_)) => Some(true),
            Ok(None) => None,
        };
        let authenticated = match by_certificate {
            Some(false) => false,
            Some(true) if hello.token.as_bytes().is_empty() => {
                found.as_ref().is_some_and(|d| !d.revoked)
            }
            _ => auth::verify(found.as_ref(), hello.token.as_bytes()),
        };
        if !authenticated {
            // Unknown device or wrong token alike: counted, then (past the
            // free failures) answered only after a growing delay.
            let delay = limits.auth_failed(self.peer.ip(), &device_id, Instant::now());
            if !delay.is_zero() {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(delay) => {}
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

        // Takeover: the newest connection wins. The older one stores what it
        // read and closes before this one announces last_seq.
        let cell = Arc::new(AckCell::default());
        let handle = SessionHandle::new(self.conn_id, Arc::clone(&cell), self.peer, now_ms());
        let (old, slot) = self.shared.registry.claim(&device_id, handle.clone());
        let device_id: Arc<str> = Arc::from(device_id);
        let guard = DeviceGuard {
            registry: Arc::clone(&self.shared.registry),
            device_id: Arc::clone(&device_id),
            handle: handle.clone(),
            events: self.shared.events.clone(),
            key: found.key,
            cluster: self.shared.cluster.clone(),
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
        let cluster = self.shared.cluster.clone();
        match cluster
            .claim(found.key, &handle, self.peer, handle.info().connected_ms)
            .await
        {
            Ok(None) => {}
            Ok(Some(displaced)) => {
                metrics::counter!("furrow_session_takeovers_total").increment(1);
                if !cluster
                    .take_over(&device_id, handle.generation(), &displaced)
                    .await
                {
                    warn!(peer = %self.peer, device = %device_id, instance = %displaced.instance,
                        "the session on the other instance did not release in time; continuing");
                }
            }
            Err(e) => {
                storage_failed(self.peer, &device_id, &e, "cannot record the session");
                let f = Fatal(ErrorCode::Busy, "storage unavailable; retry later".into());
                return self.closed_by(f, "storage_unavailable").await;
            }
        }
        let seqs = match store.device_seqs(found.key).await {
            Ok(s) => s,
            Err(e) => {
                storage_failed(self.peer, &device_id, &e, "last_seq lookup failed");
                let f = Fatal(ErrorCode::Busy, "storage unavailable; retry later".into());
                return self.closed_by(f, "storage_unavailable").await;
            }
        };
        storage_answers();
        // Rejected seqs stay taken across sessions and restarts.
        slot.observe_stored(seqs.stored.max(seqs.rejected));
        let last_seq = seqs.stored;

        let cfg = &self.shared.cfg;
        let ka = cfg.keepalive.effective(hello.keepalive_s);
        self.conn.queue(&Message::Welcome(Welcome {
            version: furrow_proto::VERSION,
            keepalive_s: ka,
            max_frame: cfg.limits.max_frame,
            max_inflight: cfg.limits.max_inflight,
            last_seq,
            server_time_ms: now_ms(),
        }));
        metrics::counter!("furrow_handshakes_total", "outcome" => "ok").increment(1);
        self.shared.events.status(&device_id, true);
        self.conn.set_read_chunk(cfg.limits.read_chunk_bytes);
        let keepalive = Duration::from_millis(u64::from(ka) * 1500);
        Phase::Active(Box::new(Active {
            device_id,
            key: found.key,
            slot,
            handle,
            cell,
            acks: AckTracker::new(),
            staged: Vec::new(),
            read_marks: std::collections::VecDeque::new(),
            sent_commands: Vec::new(),
            pending_job: None,
            ticket: 0,
            staged_reject: 0,
            mark_ticket: 0,
            keepalive,
            idle_deadline: Instant::now() + keepalive,
            paused_at: None,
            resumed_at: None,
            throttle: limits.throttle(Instant::now()),
            _guard: guard,
        }))
    }

    /// Ends a failed handshake: count, ERROR, close.
    async fn closed_by(&mut self, f: Fatal, outcome: &'static str) -> Phase {
        metrics::counter!("furrow_handshakes_total", "outcome" => outcome).increment(1);
        Phase::Closed(self.fail(f).await)
    }

    /// Active: the main loop. Returns why to drain, or a fatal error.
    ///
    /// This is where idle devices spend their lives, so its await point is
    /// kept small: one Notify (commits, kicks, shutdown), one readiness
    /// wait, one timer. The rarer wait for room in the writer queue is a
    /// boxed future of its own.
    async fn active(&mut self, a: &mut Active) -> Result<Drain, Fatal> {
        let cell = Arc::clone(&a.cell);
        let max_inflight = usize::from(self.shared.cfg.limits.max_inflight);
        let max_unsent = self.shared.cfg.limits.max_unsent_bytes;
        loop {
            if self.shared.shutdown.is_cancelled() {
                return Ok(Drain::Goodbye(GoodbyeCode::ServerShutdown));
            }
            if let Some(code) = a.handle.kicked() {
                return Ok(Drain::Goodbye(code));
            }
            if a.handle.take_commands() {
                Box::pin(self.send_commands(a)).await;
            }
            // Free what commits resolved before taking more frames, so that
            // a full window reopens as soon as it can.
            self.advance(a);
            match self.handle_frames(a, max_inflight, max_unsent) {
                Flow::Continue => {}
                Flow::Drain(d) => return Ok(d),
                Flow::Fatal(f) => return Err(f),
            }
            self.submit(a)?;
            // Rejects and duplicates may resolve at once.
            self.advance(a);
            if self.conn.try_flush().is_err() {
                return Ok(Drain::PeerClosed);
            }
            let throttled = a.throttle.as_mut().is_some_and(|t| !t.ready());
            let room = a.acks.outstanding() < max_inflight
                && a.pending_job.is_none()
                && self.conn.unsent() < max_unsent
                && !throttled;
            let buffered = self.conn.has_complete_frame();
            if room && buffered {
                // More complete frames already read: handle them first.
                continue;
            }
            // Read only when nothing complete is waiting: the read buffer
            // then stays within one frame plus one read chunk.
            let can_read = room && !buffered;
            // Time spent not reading (backpressure) does not count against
            // the keepalive; nor does the time after resuming until bytes
            // flow again: a sender that met a closed TCP window retries on
            // the zero-window persist timer, which backs off (seen: seconds
            // of silence on loopback after the gateway had resumed reading).
            match (can_read, a.paused_at) {
                (false, None) => a.paused_at = Some(Instant::now()),
                (true, Some(p)) => {
                    a.idle_deadline += p.elapsed();
                    a.paused_at = None;
                    a.resumed_at.get_or_insert_with(Instant::now);
                }
                _ => {}
            }
            if a.pending_job.is_some() {
                if !Box::pin(self.wait_for_writer(a)).await {
                    return Err(Fatal(ErrorCode::Internal, "storage writer stopped".into()));
                }
                continue;
            }
            if can_read && !self.conn.has_buffered_input() {
                self.conn.release_idle();
                if a.read_marks.is_empty() && a.read_marks.capacity() > 0 {
                    a.read_marks = std::collections::VecDeque::new();
                }
            }
            // One timer serves both the keepalive and, while a duplicate waits
            // on another connection's commit, a short poll.
            let poll_device = a.acks.waits_on_device(a.slot.resolved());
            // While waiting for the flow to resume, a dead peer is still
            // noticed, after a longer grace.
            let deadline = match a.resumed_at {
                Some(r) => r + (a.keepalive * 2).max(RESUME_GRACE),
                None => a.idle_deadline,
            };
            let wake_at = match (can_read, poll_device) {
                (_, true) => Some(Instant::now() + Duration::from_millis(20)),
                (true, false) => Some(deadline),
                (false, false) => None,
            };
            // Throttled: look again when the next token is due.
            let wake_at = match a.throttle.as_ref().filter(|_| throttled) {
                Some(t) => Some(wake_at.map_or(t.due(), |w| w.min(t.due()))),
                None => wake_at,
            };
            let write = self.conn.unsent() > 0;
            tokio::select! {
                _ = cell.changed() => {}
                r = self.conn.io(can_read, write), if can_read || write => match r {
                    Ok(Some(0)) | Err(_) => return Ok(Drain::PeerClosed),
                    Ok(Some(_)) => {
                        // Bytes flow again: the wait since resuming was not idleness.
                        if let Some(r) = a.resumed_at.take() {
                            a.idle_deadline += r.elapsed();
                        }
                    }
                    Ok(None) => {}
                },
                _ = sleep_until(wake_at.unwrap_or(deadline)), if wake_at.is_some() => {
                    if can_read && Instant::now() >= deadline {
                        return Err(Fatal(ErrorCode::KeepaliveTimeout, "no frame within 1.5 x keepalive".into()));
                    }
                }
            }
        }
    }

    /// Sends the device's open commands that this connection has not sent
    /// yet (all of them after a reconnect: delivery is at least once), and
    /// marks them delivered in the background.
    async fn send_commands(&mut self, a: &mut Active) {
        let open = match self.shared.store.open_commands(a.key).await {
            Ok(c) => c,
            Err(e) => {
                warn!(device = %a.device_id, error = %e, "cannot read commands; retrying at the next wake-up");
                a.handle.notify_commands();
                return;
            }
        };
        let mut fresh = Vec::new();
        for c in open {
            if a.sent_commands.contains(&c.id) {
                continue;
            }
            self.conn.queue(&Message::Command(furrow_proto::Command {
                command_id: c.id,
                name: Str::from(c.name.as_str()),
                content_type: c.content_type,
                payload: c.payload.into(),
            }));
            a.sent_commands.push(c.id);
            fresh.push(c.id);
        }
        if fresh.is_empty() {
            return;
        }
        let (store, events) = (Arc::clone(&self.shared.store), self.shared.events.clone());
        tokio::spawn(async move {
            match store.mark_delivered(fresh).await {
                Ok(changed) => changed.iter().for_each(|c| events.command(c)),
                Err(e) => warn!(error = %e, "cannot mark commands delivered"),
            }
        });
    }

    /// Waits for room in the writer queue and hands over the pending job,
    /// meanwhile sending ACKs for commits and waking for kicks. Returns
    /// false if the writer is gone.
    async fn wait_for_writer(&mut self, a: &mut Active) -> bool {
        let cell = Arc::clone(&a.cell);
        let writer = self.shared.writer.clone();
        let write = self.conn.unsent() > 0;
        tokio::select! {
            permit = writer.reserve() => match (permit, a.pending_job.take()) {
                (Ok(p), Some(job)) => p.send(job),
                _ => return false,
            },
            _ = cell.changed() => {}
            _ = self.conn.io(false, write), if write => {}
        }
        true
    }

    /// Decodes and handles buffered frames while the limits allow.
    fn handle_frames(&mut self, a: &mut Active, max_inflight: usize, max_unsent: usize) -> Flow {
        let mut now_ms_cache = None;
        let mut got_frame = false;
        let ticket_before = a.ticket;
        let mut flow = Flow::Continue;
        while a.acks.outstanding() < max_inflight
            && self.conn.unsent() < max_unsent
            && a.throttle.as_mut().is_none_or(|t| t.ready())
        {
            let frame = match self.conn.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    flow = Flow::Fatal(Fatal(e.code(), e.to_string()));
                    break;
                }
            };
            if frame.kind == MessageType::Telemetry {
                if let Some(t) = &mut a.throttle {
                    t.take();
                }
            }
            got_frame = true;
            let now = *now_ms_cache.get_or_insert_with(now_ms);
            if let Some(f) = self.handle_frame(a, frame, now) {
                flow = f;
                break;
            }
        }
        if got_frame {
            if let Some(ms) = now_ms_cache {
                a.handle.seen(ms);
            }
            let now = Instant::now();
            a.idle_deadline = now + a.keepalive;
            if a.ticket > ticket_before {
                a.read_marks.push_back((a.ticket, now));
            }
        }
        flow
    }

    /// Handles one frame; `Some` ends the active phase.
    fn handle_frame(&mut self, a: &mut Active, frame: RawFrame, now: u64) -> Option<Flow> {
        // The type is known; may it come now, from a device? Then the body.
        let kind = frame.kind;
        if !kind.sent_by_device() || kind == MessageType::Hello {
            let msg = format!("{} is not allowed from a device now", kind.name());
            return Some(Flow::Fatal(Fatal(ErrorCode::ProtocolError, msg)));
        }
        let msg = match Message::from_frame(frame) {
            Ok(m) => m,
            Err(e) => return Some(Flow::Fatal(Fatal(e.code(), e.to_string()))),
        };
        match msg {
            Message::Telemetry(t) => self.on_telemetry(a, t, now),
            Message::Ping { nonce } => self.conn.queue(&Message::Pong { nonce }),
            Message::Pong { .. } => {}
            Message::CommandResult(r) => {
                a.sent_commands.retain(|id| *id != r.command_id);
                let (store, events, key) = (
                    Arc::clone(&self.shared.store),
                    self.shared.events.clone(),
                    a.key,
                );
                let outcome = CommandOutcome {
                    status: r.status as u8,
                    content_type: r.content_type,
                    payload: r.payload.to_vec(),
                };
                tokio::spawn(async move {
                    match store.complete_command(key, r.command_id, outcome).await {
                        Ok(Some(c)) => events.command(&c),
                        Ok(None) => {
                            metrics::counter!("furrow_command_results_ignored_total").increment(1);
                            debug!(
                                command_id = r.command_id,
                                "result for an unknown, expired or answered command ignored"
                            );
                        }
                        Err(e) => warn!(error = %e, "cannot record a command result"),
                    }
                });
            }
            Message::Goodbye(_) => return Some(Flow::Drain(Drain::DeviceGoodbye)),
            _ => {
                let m = format!("{} is not allowed from a device", kind.name());
                return Some(Flow::Fatal(Fatal(ErrorCode::ProtocolError, m)));
            }
        }
        None
    }

    fn on_telemetry(&mut self, a: &mut Active, t: Telemetry, now: u64) {
        if !a.slot.take(t.seq) {
            metrics::counter!("furrow_telemetry_duplicate_total").increment(1);
            a.acks.push_dup(t.seq);
            return;
        }
        match content::validate(t.content_type, &t.payload) {
            Err(e) => {
                metrics::counter!("furrow_telemetry_rejected_total").increment(1);
                self.conn.queue(&Message::Reject(Reject {
                    seq: t.seq,
                    code: e.code() as u16,
                    reason: Str::from(e.to_string()),
                }));
                a.acks.push_rejected(t.seq);
                // The REJECT and its ACK go out now; the mark that keeps the
                // seq taken is stored with the next commit.
                a.ticket += 1;
                a.mark_ticket = a.ticket;
                a.staged_reject = t.seq;
            }
            Ok(_) => {
                a.ticket += 1;
                a.staged.push(TelemetryRecord {
                    device: a.key,
                    seq: t.seq,
                    timestamp_ms: if t.timestamp_ms == 0 {
                        now
                    } else {
                        t.timestamp_ms
                    },
                    received_ms: now,
                    content_type: t.content_type,
                    payload: t.payload,
                });
                a.acks.push_store(t.seq, a.ticket);
            }
        }
    }

    /// Moves staged records into a writer job and queues it if there is room.
    fn submit(&mut self, a: &mut Active) -> Result<(), Fatal> {
        if !a.staged.is_empty() || a.staged_reject > 0 {
            let records = std::mem::take(&mut a.staged);
            let rejected = std::mem::take(&mut a.staged_reject);
            match &mut a.pending_job {
                Some(job) => {
                    job.records.extend(records);
                    job.ticket = a.ticket;
                    job.rejected_upto = job.rejected_upto.max(rejected);
                }
                None => {
                    a.pending_job = Some(WriteJob {
                        owner: Arc::clone(&a.cell),
                        ticket: a.ticket,
                        device: a.key,
                        device_id: Arc::clone(&a.device_id),
                        records,
                        rejected_upto: rejected,
                    })
                }
            }
        }
        if let Some(job) = a.pending_job.take() {
            match self.shared.writer.try_send(job) {
                Ok(()) => {}
                Err(tokio::sync::mpsc::error::TrySendError::Full(job)) => a.pending_job = Some(job),
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
                    return Err(Fatal(ErrorCode::Internal, "storage writer stopped".into()))
                }
            }
        }
        Ok(())
    }

    /// Pops resolved entries and queues the ACK they allow.
    fn advance(&mut self, a: &mut Active) {
        let adv = a.acks.advance(a.cell.committed(), a.slot.resolved());
        if let Some(seq) = adv.resolved {
            a.slot.resolve(seq);
        }
        if let Some(seq) = adv.ack {
            self.conn.queue_ack(seq);
            let committed = a.cell.committed();
            let mut oldest = None;
            while let Some(&(ticket, at)) = a.read_marks.front() {
                if ticket > committed {
                    break;
                }
                oldest.get_or_insert(at);
                a.read_marks.pop_front();
            }
            if let Some(at) = oldest {
                crate::metrics::wire()
                    .ack_latency
                    .record(at.elapsed().as_secs_f64());
            }
        }
    }

    /// Hands every staged record to the writer and waits until all this
    /// session took is resolved, sending ACKs when `ack` is true (and while
    /// the socket takes them: a dead socket stops the ACKs, not the wait).
    /// Bounded by the shutdown drain time once shutdown has begun.
    async fn settle(&mut self, a: &mut Active, mut ack: bool) -> bool {
        let shutdown = self.shared.shutdown.clone();
        let drain = Duration::from_millis(self.shared.cfg.shutdown.drain_timeout_ms);
        let cell = Arc::clone(&a.cell);
        let writer = self.shared.writer.clone();
        let mut deadline: Option<Instant> = None;
        loop {
            if self.submit(a).is_err() {
                return false;
            }
            if ack {
                self.advance(a);
                if self.conn.try_flush().is_err() {
                    ack = false;
                }
            } else {
                let adv = a.acks.advance(a.cell.committed(), a.slot.resolved());
                if let Some(seq) = adv.resolved {
                    a.slot.resolve(seq);
                }
            }
            if a.acks.outstanding() == 0
                && a.pending_job.is_none()
                && a.cell.committed() >= a.mark_ticket
            {
                return true;
            }
            if deadline.is_none() && shutdown.is_cancelled() {
                deadline = Some(Instant::now() + drain);
            }
            let far = Instant::now() + Duration::from_secs(3600);
            tokio::select! {
                permit = writer.reserve(), if a.pending_job.is_some() => match (permit, a.pending_job.take()) {
                    (Ok(p), Some(job)) => p.send(job),
                    _ => return false,
                },
                _ = cell.changed() => {}
                _ = shutdown.cancelled(), if deadline.is_none() => {}
                _ = sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => {
                    warn!(peer = %self.peer, device = %a.device_id, outstanding = a.acks.outstanding(), "drain deadline passed with telemetry unstored");
                    return false;
                }
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    }

    /// Draining: stop reading, handle what was already read, store and ACK
    /// it all, then GOODBYE (if ours to say) and close.
    async fn drain(&mut self, a: &mut Active, drain: Drain) -> CloseReason {
        // Complete frames already in the buffer were read: handle them too
        // (not after a device GOODBYE, which is its last word), whatever
        // the rate: nothing more is read.
        a.throttle = None;
        if !matches!(drain, Drain::DeviceGoodbye) {
            if let Flow::Fatal(f) = self.handle_frames(a, usize::MAX, usize::MAX) {
                let reason = self.fail(f).await;
                self.settle(a, false).await;
                return reason;
            }
        }
        let socket_ok = !matches!(drain, Drain::PeerClosed);
        self.settle(a, true).await;
        match drain {
            Drain::Goodbye(code) => self.goodbye(code).await,
            Drain::DeviceGoodbye => {
                let _ = timeout(Duration::from_secs(1), self.conn.close()).await;
                CloseReason::DeviceGoodbye
            }
            Drain::PeerClosed => {
                if socket_ok {
                    let _ = timeout(Duration::from_secs(1), self.conn.close()).await;
                }
                CloseReason::PeerClosed
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            cfg,
            store: server.store(),
            registry: server.registry(),
            writer,
            shutdown: CancellationToken::new(),
            events: Events::off(),
            cluster: crate::cluster::Cluster::single(),
            tls: None,
            limits: Arc::new(crate::limits::Limiter::new(&Default::default())),
        });
        let fut = run(stream, addr, Instant::now(), 1, shared, None);
        let size = std::mem::size_of_val(&fut);
        assert!(size <= 1280, "connection future grew to {size} bytes");
    }
}
