//! The client: the application's handle ([`Client`]) and the background
//! task that keeps one furrow/1 session alive.
//!
//! The promise: every reading passed to [`Client::send`] stays in the
//! outbox until the gateway acknowledges it (or refuses it for good with
//! REJECT). After any disconnect the task reconnects with backoff, learns
//! from WELCOME's `last_seq` what the gateway already stored, drops that
//! from the outbox, and sends the rest in order. The gateway stores each
//! seq once, so nothing is lost and nothing is stored twice.
//!
//! Concurrency: the outbox sits behind a short-held lock shared by `send`
//! (pushes) and the session task (acks, resends). A reader task per
//! connection decodes frames into a channel, so the session loop never
//! awaits a socket read inside `select!` (writes are awaited in the loop
//! body, bounded by a timeout).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use furrow_proto::content::{self, ContentError};
use furrow_proto::message::encode_telemetry;
use furrow_proto::{
    CommandResult, FrameDecoder, Goodbye, GoodbyeCode, Hello, Message, Report, Str,
};
use rand::SeedableRng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, mpsc, watch, Notify};
use tokio::time::{sleep_until, timeout, Instant};

use crate::backoff::Backoff;
use crate::commands::{Command, CommandReply, Handler, Recent, Seen};
use crate::firmware::{Download, FirmwareConfig, FirmwareError, FirmwareStats, Output, ReportSlot};
use crate::outbox::{FileOutbox, FileOutboxOptions, MemoryOutbox, Outbox, OutboxError};

/// How a client connects and behaves.
#[derive(Debug, Clone)]
pub struct Config {
    /// Gateway address: `host:port` (TCP, or TLS with [`Self::tls`]), or
    /// `quic://host:port` (QUIC; needs [`Self::tls`] for the gateway's CA).
    pub addr: String,
    /// This device's id.
    pub device_id: String,
    /// This device's token.
    pub token: String,
    /// Requested keepalive in seconds (0: the gateway's default).
    pub keepalive_s: u16,
    /// Readings the outbox may hold; `send` waits when it is full.
    pub outbox_capacity: usize,
    /// Keep the outbox in this file (durable across restarts) instead of
    /// memory.
    pub outbox_path: Option<PathBuf>,
    /// fsync the outbox file on every change (survives power loss, not only
    /// a crash of the device process).
    pub outbox_sync: bool,
    /// Reconnect policy.
    pub backoff: Backoff,
    /// Limit for TCP connect and for the handshake.
    pub connect_timeout: Duration,
    /// Command ids remembered with their answers, for redeliveries.
    pub command_memory: usize,
    /// TLS (and mutual TLS) to the gateway; `None`: plain TCP.
    pub tls: Option<crate::tls::TlsOptions>,
    /// Firmware updates over the air; `None`: the client does not ask for
    /// them.
    pub firmware: Option<FirmwareConfig>,
}

impl Config {
    /// A configuration with defaults for everything but the essentials.
    pub fn new(
        addr: impl Into<String>,
        device_id: impl Into<String>,
        token: impl Into<String>,
    ) -> Self {
        Self {
            addr: addr.into(),
            device_id: device_id.into(),
            token: token.into(),
            keepalive_s: 30,
            outbox_capacity: 10_000,
            outbox_path: None,
            outbox_sync: false,
            backoff: Backoff::default(),
            connect_timeout: Duration::from_secs(10),
            command_memory: 1024,
            tls: None,
            firmware: None,
        }
    }
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disconnect {
    /// TCP connect or the handshake failed.
    ConnectFailed(String),
    /// The connection broke.
    Io(String),
    /// The gateway said GOODBYE with this code.
    Goodbye {
        /// GOODBYE code (see `furrow_proto::GoodbyeCode`).
        code: u16,
        /// The gateway's advice.
        retry_after_ms: u32,
    },
    /// The gateway sent ERROR (AUTH_FAILED, BUSY, ...).
    Error {
        /// ERROR code.
        code: u16,
        /// Its message.
        message: String,
    },
    /// Nothing arrived from the gateway for 1.5 x the keepalive.
    KeepaliveTimeout,
    /// The gateway broke the protocol.
    Protocol(String),
    /// The application closed the client.
    Closed,
}

/// What happens to the client, for the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A session is up; the gateway had stored everything up to `last_seq`.
    Connected {
        /// WELCOME's `last_seq`.
        last_seq: u64,
    },
    /// A session ended, or an attempt failed; the next attempt follows after
    /// `retry_in` (unless the client was closed).
    Disconnected {
        /// Why.
        reason: Disconnect,
        /// Delay before the next attempt.
        retry_in: Duration,
    },
    /// Everything up to this seq is stored (or was rejected).
    Acked(u64),
    /// The gateway handed the device a new token (a `furrow.token`
    /// command, after an operator's rotation): the client uses it from its
    /// next connection on. Persist it where the device keeps its token, so
    /// that it boots with the new one: the old one stops working once the
    /// device has used the new one, or when its grace period ends.
    TokenRotated {
        /// The new token.
        token: String,
    },
    /// The gateway sent the desired state (after the desired-state
    /// handler ran; the client confirms it with DESIRED_ACK itself).
    Desired {
        /// Its version.
        version: u64,
    },
    /// A firmware image is downloaded and verified (its SHA-256 and the
    /// fleet key's signature): install it from `path`, then say how it went
    /// ([`Client::firmware_installing`], [`Client::firmware_installed`],
    /// [`Client::firmware_failed`]).
    FirmwareReady {
        /// The image's SHA-256, hex.
        image: String,
        /// The version it installs.
        version: String,
        /// Where the sink put it.
        path: PathBuf,
    },
    /// A firmware image was refused (another model, a bad signature, a
    /// SHA-256 mismatch, a storage error); the gateway was told.
    FirmwareRefused {
        /// The image's SHA-256, hex.
        image: String,
        /// Why.
        reason: String,
    },
    /// The gateway refused a reading for good; it was dropped.
    Rejected {
        /// The reading's seq.
        seq: u64,
        /// REJECT code.
        code: u16,
        /// The gateway's reason.
        reason: String,
    },
}

/// Errors of the client API.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The outbox failed.
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    /// The payload does not match its content type; the gateway would REJECT it.
    #[error("payload refused before sending: {0}")]
    InvalidPayload(ContentError),
    /// The payload does not fit in one frame.
    #[error("payload of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Its size.
        len: usize,
        /// The limit (from WELCOME's max_frame).
        max: usize,
    },
    /// The client is closed.
    #[error("client closed")]
    Closed,
    /// The TLS settings cannot be used (a CA or key file, say).
    #[error("TLS: {0}")]
    Tls(String),
    /// A state report is not a JSON object.
    #[error("a state report must be a JSON object")]
    NotAnObject,
    /// Device state needs a desired-state handler
    /// ([`Client::start_with_handlers`]) and a gateway that grants it.
    #[error("device state is off: {0}")]
    StateOff(&'static str),
    /// A firmware call that cannot be made now.
    #[error(transparent)]
    Firmware(#[from] FirmwareError),
}

/// A device state document the gateway sent: the whole desired state.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    /// Its version (rises with every change an operator makes).
    pub version: u64,
    /// The document, a JSON object.
    pub document: serde_json::Value,
}

/// Called with each new desired state (in version order, once per
/// version). It should apply what it can and [`Client::report`] what the
/// device now is; it must not block (spawn for slow work). The client
/// confirms the version to the gateway (DESIRED_ACK) after it returns.
pub type DesiredHandler = Arc<dyn Fn(Desired) + Send + Sync>;

/// The outbox's marker for a state report (never a content type on the
/// wire: an entry with it travels as REPORT, its payload the patch).
const REPORT_MARKER: u8 = 0xFF;

/// The command that hands the device a new token (`{"token": "..."}`),
/// sent by the gateway after a rotation with `deliver`.
pub const TOKEN_COMMAND: &str = "furrow.token";

/// What HELLO can carry as a token: 1 to 255 printable ASCII characters.
fn valid_token(t: &str) -> bool {
    (1..=255).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_graphic())
}

/// TELEMETRY header bytes inside the length field: type, flags, seq,
/// timestamp, content type.
const TELEMETRY_OVERHEAD: usize = 2 + 8 + 8 + 1;

/// A connection to the gateway: TCP, or TLS over it.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

struct Shared {
    /// The TLS connector, built once from `cfg.tls`.
    tls: Option<crate::tls::Tls>,
    /// QUIC, for a `quic://` address.
    quic: Option<crate::quic::Quic>,
    cfg: Config,
    /// The token HELLO presents: `cfg.token` until the gateway hands over
    /// a new one.
    token: Mutex<String>,
    outbox: Mutex<Box<dyn Outbox>>,
    /// Woken when the outbox shrinks (send may proceed).
    space: Notify,
    /// Woken when the outbox grows (the session may send).
    work: Notify,
    acked: watch::Sender<u64>,
    events: broadcast::Sender<Event>,
    /// Gateway clock minus local clock, ms; i64::MIN until known.
    clock_offset: AtomicI64,
    max_payload: AtomicU64,
    /// The last WELCOME's `max_inflight`; 0 before the first.
    last_window: AtomicU64,
    /// Bumped (under the outbox lock) whenever a rebase renumbers readings,
    /// so a waiting `flush` re-reads its target.
    rebases: AtomicU64,
    closing: watch::Sender<bool>,
    /// Called with each new desired state; device state is announced in
    /// HELLO only with one.
    desired_handler: Option<DesiredHandler>,
    /// The last desired state received.
    desired: Mutex<Option<Desired>>,
    /// 0: no WELCOME yet; 1: the gateway grants device state; 2: it does not.
    state_granted: std::sync::atomic::AtomicU8,
    /// The gateway refused a HELLO with capabilities (an older gateway):
    /// connect without them from now on.
    no_capabilities: std::sync::atomic::AtomicBool,
    /// Firmware updates, with [`Config::firmware`].
    firmware: Option<Firmware>,
}

/// The client's firmware side.
struct Firmware {
    /// Fed by the connection loop, read by the application's calls; held
    /// for short synchronous work only (never across an await).
    download: Mutex<Download>,
    /// Reports on their way to the outbox (see [`firmware_reporter`]).
    reports: ReportSlot,
    /// The running version was reported after a connection granting STATE.
    version_reported: std::sync::atomic::AtomicBool,
}

impl Firmware {
    fn download(&self) -> std::sync::MutexGuard<'_, Download> {
        self.download.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Shared {
    /// The token to present now.
    fn token(&self) -> String {
        self.token.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Takes the new token a `furrow.token` command carries.
    fn take_token(&self, payload: &[u8]) -> CommandReply {
        let token = serde_json::from_slice::<serde_json::Value>(payload)
            .ok()
            .and_then(|v| v.get("token")?.as_str().map(str::to_owned));
        match token {
            Some(t) if valid_token(&t) => {
                *self.token.lock().unwrap_or_else(|p| p.into_inner()) = t.clone();
                self.emit(Event::TokenRotated { token: t });
                CommandReply::ok(1, "{}")
            }
            _ => CommandReply::failed(
                "furrow.token needs {\"token\": 1 to 255 printable ASCII characters}",
            ),
        }
    }

    fn outbox(&self) -> std::sync::MutexGuard<'_, Box<dyn Outbox>> {
        // Outbox methods leave it consistent at every return; a panic in
        // one (a bug) does not make the queue unusable.
        self.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn emit(&self, e: Event) {
        let _ = self.events.send(e);
    }

    fn closing(&self) -> bool {
        *self.closing.borrow()
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A device's connection to a Furrow gateway. Cheap to share (`Arc`).
pub struct Client {
    shared: Arc<Shared>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// A receiver made before the session task started, for the first
    /// [`Client::events`] call: it sees every event from the start (the
    /// first connection attempt may report before anyone could subscribe).
    first_events: Mutex<Option<broadcast::Receiver<Event>>>,
}

impl Client {
    /// Opens the outbox and starts connecting in the background. Commands
    /// are answered "unknown command".
    pub fn start(cfg: Config) -> Result<Self, ClientError> {
        Self::start_inner(cfg, None, None)
    }

    /// Like [`Client::start`], with a command handler.
    pub fn start_with_handler(cfg: Config, handler: Handler) -> Result<Self, ClientError> {
        Self::start_inner(cfg, Some(handler), None)
    }

    /// Like [`Client::start`], with a command handler and a desired-state
    /// handler (either optional). With a desired-state handler the client
    /// speaks device state (docs/protocol.md, "Device state"): it receives
    /// the desired document and may [`Client::report`] its own.
    pub fn start_with_handlers(
        cfg: Config,
        commands: Option<Handler>,
        desired: Option<DesiredHandler>,
    ) -> Result<Self, ClientError> {
        Self::start_inner(cfg, commands, desired)
    }

    fn start_inner(
        cfg: Config,
        handler: Option<Handler>,
        desired_handler: Option<DesiredHandler>,
    ) -> Result<Self, ClientError> {
        let outbox: Box<dyn Outbox> = match &cfg.outbox_path {
            Some(path) => Box::new(FileOutbox::open(
                path,
                FileOutboxOptions {
                    sync: cfg.outbox_sync,
                    ..FileOutboxOptions::default()
                },
            )?),
            None => Box::new(MemoryOutbox::default()),
        };
        let quic_addr = cfg.addr.strip_prefix("quic://");
        let host_port = quic_addr.unwrap_or(&cfg.addr);
        let tls = match &cfg.tls {
            Some(opts) => Some(crate::tls::Tls::new(opts, host_port).map_err(ClientError::Tls)?),
            None => None,
        };
        let quic = match (quic_addr, &tls) {
            (None, _) => None,
            (Some(addr), Some(t)) => Some(
                crate::quic::Quic::new(t.connector.config(), addr, &t.host)
                    .map_err(ClientError::Tls)?,
            ),
            (Some(_), None) => {
                return Err(ClientError::Tls(
                    "a quic:// address needs TLS options (the gateway's CA)".into(),
                ))
            }
        };
        let firmware = cfg.firmware.as_ref().map(|f| Firmware {
            download: Mutex::new(Download::new(f)),
            reports: ReportSlot::new(),
            version_reported: std::sync::atomic::AtomicBool::new(false),
        });
        let (acked, _) = watch::channel(0);
        let (events, first_events) = broadcast::channel(1024);
        let (closing, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            outbox: Mutex::new(outbox),
            space: Notify::new(),
            work: Notify::new(),
            acked,
            events,
            clock_offset: AtomicI64::new(i64::MIN),
            max_payload: AtomicU64::new(
                (furrow_proto::DEFAULT_MAX_FRAME as usize - TELEMETRY_OVERHEAD) as u64,
            ),
            rebases: AtomicU64::new(0),
            last_window: AtomicU64::new(0),
            closing,
            tls,
            quic,
            token: Mutex::new(cfg.token.clone()),
            cfg,
            desired_handler,
            desired: Mutex::new(None),
            state_granted: std::sync::atomic::AtomicU8::new(0),
            no_capabilities: std::sync::atomic::AtomicBool::new(false),
            firmware,
        });
        if shared.firmware.is_some() {
            tokio::spawn(firmware_reporter(Arc::clone(&shared)));
        }
        let task = tokio::spawn(run(Arc::clone(&shared), handler));
        Ok(Self {
            shared,
            task: Mutex::new(Some(task)),
            first_events: Mutex::new(Some(first_events)),
        })
    }

    /// Queues a reading stamped with the device clock now. Returns its seq
    /// once it is in the outbox; waits while the outbox is full.
    pub async fn send(
        &self,
        content_type: u8,
        payload: impl Into<Bytes>,
    ) -> Result<u64, ClientError> {
        self.send_at(now_ms(), content_type, payload).await
    }

    /// Queues a reading with an explicit timestamp (Unix ms; 0: unknown, the
    /// gateway stamps it on receipt).
    pub async fn send_at(
        &self,
        timestamp_ms: u64,
        content_type: u8,
        payload: impl Into<Bytes>,
    ) -> Result<u64, ClientError> {
        let payload = payload.into();
        content::validate(content_type, &payload).map_err(ClientError::InvalidPayload)?;
        self.queue(timestamp_ms, content_type, payload).await
    }

    /// Puts a checked reading (or a state report, [`REPORT_MARKER`]) in
    /// the outbox; waits while it is full.
    async fn queue(
        &self,
        timestamp_ms: u64,
        content_type: u8,
        payload: Bytes,
    ) -> Result<u64, ClientError> {
        queue(&self.shared, timestamp_ms, content_type, payload).await
    }

    /// Queues a change of the device's reported state: `patch` is a JSON
    /// merge patch (RFC 7396) of the reported document, an object whose
    /// members replace the document's (`null` removes one). It takes the
    /// next seq and stays in the outbox until ACKed, exactly like a
    /// reading; [`Client::flush`] waits for it too. Needs a desired-state
    /// handler ([`Client::start_with_handlers`]) or [`Config::firmware`]
    /// (either makes the client ask for device state); refused once a
    /// gateway has said it does not speak device state.
    pub async fn report(&self, patch: serde_json::Value) -> Result<u64, ClientError> {
        if self.shared.desired_handler.is_none() && self.shared.firmware.is_none() {
            return Err(ClientError::StateOff(
                "start the client with a desired-state handler",
            ));
        }
        if self.shared.state_granted.load(Ordering::Acquire) == 2 {
            return Err(ClientError::StateOff(
                "the gateway does not speak device state",
            ));
        }
        if !patch.is_object() {
            return Err(ClientError::NotAnObject);
        }
        let bytes = serde_json::to_vec(&patch).map_err(|_| ClientError::NotAnObject)?;
        self.queue(now_ms(), REPORT_MARKER, bytes.into()).await
    }

    /// Tells the gateway the image of the last [`Event::FirmwareReady`] is
    /// being installed (`update.state` "installing"). Returns once the
    /// report is in the outbox.
    pub async fn firmware_installing(&self) -> Result<(), ClientError> {
        let fw = self.firmware()?;
        let patch = fw.download().installing()?;
        self.firmware_report(fw, patch).await
    }

    /// The device runs `version` now: reports it as `firmware.version`
    /// (what makes a firmware job count the device as updated) and, for the
    /// image last made ready, `update.state` "installed". Later reports
    /// carry this version. Call it after installing, or at boot into new
    /// firmware if the configuration still names the old version.
    pub async fn firmware_installed(&self, version: &str) -> Result<(), ClientError> {
        let fw = self.firmware()?;
        let patch = fw.download().installed(version);
        self.firmware_report(fw, patch).await
    }

    /// Installing the image of the last [`Event::FirmwareReady`] failed:
    /// reports `update.state` "failed" with `reason` (what makes a
    /// firmware job count the device as failed).
    pub async fn firmware_failed(&self, reason: &str) -> Result<(), ClientError> {
        let fw = self.firmware()?;
        let patch = fw.download().failed(reason)?;
        self.firmware_report(fw, patch).await
    }

    /// Firmware counters (all zero without [`Config::firmware`]).
    pub fn firmware_stats(&self) -> FirmwareStats {
        self.shared
            .firmware
            .as_ref()
            .map(|fw| fw.download().stats())
            .unwrap_or_default()
    }

    fn firmware(&self) -> Result<&Firmware, ClientError> {
        let fw = self
            .shared
            .firmware
            .as_ref()
            .ok_or(FirmwareError::NotConfigured)?;
        if self.shared.state_granted.load(Ordering::Acquire) == 2 {
            return Err(ClientError::StateOff(
                "the gateway does not speak device state",
            ));
        }
        Ok(fw)
    }

    /// Posts a firmware report behind those of the connection loop (same
    /// order, same slot) and waits until it is in the outbox.
    async fn firmware_report(
        &self,
        fw: &Firmware,
        patch: serde_json::Value,
    ) -> Result<(), ClientError> {
        let mut queued = fw.reports.queued.subscribe();
        let mut closing = self.shared.closing.subscribe();
        let gen = fw.reports.post(patch);
        loop {
            if *queued.borrow_and_update() >= gen {
                return Ok(());
            }
            if *closing.borrow_and_update() {
                return Err(ClientError::Closed);
            }
            tokio::select! {
                r = queued.changed() => if r.is_err() { return Err(ClientError::Closed) },
                _ = closing.changed() => {}
            }
        }
    }

    /// The last desired state received (`None` before the first).
    pub fn desired(&self) -> Option<Desired> {
        self.shared
            .desired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits until every reading sent before this call is acknowledged (or
    /// was rejected). Returns [`ClientError::Closed`] if the client is
    /// closed first (the readings stay in the outbox).
    pub async fn flush(&self) -> Result<(), ClientError> {
        let mut rx = self.shared.acked.subscribe();
        let mut closing = self.shared.closing.subscribe();
        let (mut target, mut epoch) = {
            let ob = self.shared.outbox();
            (ob.last_seq(), self.shared.rebases.load(Ordering::Acquire))
        };
        loop {
            {
                let ob = self.shared.outbox();
                // A rebase renumbered what was pending: everything queued
                // up to it is what this call waits for now.
                let now = self.shared.rebases.load(Ordering::Acquire);
                if now != epoch {
                    (target, epoch) = (ob.last_seq(), now);
                }
                let first = ob.after(0, 1).first().map(|e| e.seq);
                if first.is_none_or(|s| s > target) {
                    return Ok(());
                }
            }
            if *closing.borrow_and_update() {
                return Err(ClientError::Closed);
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return Err(ClientError::Closed) },
                _ = closing.changed() => {}
            }
        }
    }

    /// The highest acknowledged seq, as a watch (changes on every ACK).
    pub fn acked(&self) -> watch::Receiver<u64> {
        self.shared.acked.subscribe()
    }

    /// Connection, ACK and REJECT events. The first call's receiver has
    /// every event since the client started; later ones, those from their
    /// call on. A slow receiver may miss events (`RecvError::Lagged`); the
    /// outbox and [`Client::acked`] are the truth.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        let first = self
            .first_events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        first.unwrap_or_else(|| self.shared.events.subscribe())
    }

    /// Readings waiting for their ACK.
    pub fn pending(&self) -> usize {
        self.shared.outbox().len()
    }

    /// The highest seq assigned so far.
    pub fn last_seq(&self) -> u64 {
        self.shared.outbox().last_seq()
    }

    /// The gateway's clock now, Unix ms, for devices without a clock of
    /// their own; `None` until the first WELCOME.
    pub fn server_time_ms(&self) -> Option<u64> {
        match self.shared.clock_offset.load(Ordering::Relaxed) {
            i64::MIN => None,
            off => Some((now_ms() as i64).saturating_add(off).max(0) as u64),
        }
    }

    /// Stops the client: says GOODBYE, lets the gateway store and ACK what
    /// it has read, and stops reconnecting. Unacknowledged readings stay in
    /// the outbox (on disk, for a durable one).
    pub async fn close(&self) {
        self.shared.closing.send_replace(true);
        self.shared.space.notify_waiters();
        self.shared.acked.send_modify(|_| {});
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.shared.closing.send_replace(true);
    }
}

/// How one connection attempt ended.
struct Outcome {
    reason: Disconnect,
    welcomed: bool,
    retry_after: Option<Duration>,
}

impl Outcome {
    fn failed(reason: Disconnect) -> Self {
        Self {
            reason,
            welcomed: false,
            retry_after: None,
        }
    }
}

/// Puts a checked reading (or a state report) in the outbox; waits while
/// it is full.
async fn queue(
    shared: &Shared,
    timestamp_ms: u64,
    content_type: u8,
    payload: Bytes,
) -> Result<u64, ClientError> {
    let max = shared.max_payload.load(Ordering::Relaxed) as usize;
    if payload.len() > max {
        return Err(ClientError::TooLarge {
            len: payload.len(),
            max,
        });
    }
    loop {
        let space = shared.space.notified();
        tokio::pin!(space);
        space.as_mut().enable();
        if shared.closing() {
            return Err(ClientError::Closed);
        }
        {
            let mut ob = shared.outbox();
            if ob.len() < shared.cfg.outbox_capacity {
                let seq = ob.push(timestamp_ms, content_type, payload)?;
                drop(ob);
                shared.work.notify_one();
                return Ok(seq);
            }
        }
        space.await;
    }
}

/// Moves firmware reports from their slot into the outbox. A task of its
/// own because the outbox may be full: the connection loop, which must
/// keep reading (its ACKs are what make room), only ever posts.
async fn firmware_reporter(shared: Arc<Shared>) {
    let Some(fw) = &shared.firmware else { return };
    let mut closing = shared.closing.subscribe();
    loop {
        if shared.closing() {
            return;
        }
        if let Some((gen, patch)) = fw.reports.take() {
            // To a gateway without device state, a report would only be
            // dropped at the next WELCOME.
            if shared.state_granted.load(Ordering::Acquire) != 2 {
                let bytes = match serde_json::to_vec(&patch) {
                    Ok(b) => Bytes::from(b),
                    Err(e) => {
                        tracing::error!(error = %e, "firmware report not encodable");
                        fw.reports.mark_queued(gen);
                        continue;
                    }
                };
                match queue(&shared, now_ms(), REPORT_MARKER, bytes).await {
                    Ok(_) => {}
                    Err(ClientError::Closed) => return,
                    Err(e) => tracing::warn!(error = %e, "firmware report dropped"),
                }
            }
            fw.reports.mark_queued(gen);
            continue;
        }
        tokio::select! {
            _ = fw.reports.wake.notified() => {}
            _ = closing.changed() => return,
        }
    }
}

async fn run(shared: Arc<Shared>, handler: Option<Handler>) {
    let mut rng = rand::rngs::StdRng::from_entropy();
    let mut attempt: u32 = 0;
    let mut recent = Recent::new(shared.cfg.command_memory);
    let (results_tx, mut results_rx) = mpsc::channel(1024);
    let mut closing = shared.closing.subscribe();
    loop {
        if shared.closing() {
            return;
        }
        let outcome = serve_connection(
            &shared,
            handler.as_ref(),
            &mut recent,
            &results_tx,
            &mut results_rx,
            &mut closing,
        )
        .await;
        // Requests in flight died with the connection; the next one waits
        // for the gateway's offer and resumes from what the sink holds.
        if let Some(fw) = &shared.firmware {
            fw.download().on_disconnect();
        }
        // A session that was welcomed resets the backoff, unless the gateway
        // ended it with ERROR: then something about this device is wrong and
        // reconnecting at once would only repeat it.
        if outcome.welcomed && !matches!(outcome.reason, Disconnect::Error { .. }) {
            attempt = 0;
        }
        if shared.closing() {
            shared.emit(Event::Disconnected {
                reason: Disconnect::Closed,
                retry_in: Duration::ZERO,
            });
            return;
        }
        let mut delay = shared.cfg.backoff.delay(attempt, &mut rng);
        attempt = attempt.saturating_add(1);
        if let Some(after) = outcome.retry_after {
            delay = delay.max(after);
        }
        tracing::debug!(reason = ?outcome.reason, ?delay, "disconnected");
        shared.emit(Event::Disconnected {
            reason: outcome.reason,
            retry_in: delay,
        });
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = closing.changed() => return,
        }
    }
}

/// Decodes frames from the gateway into a channel until the connection ends.
async fn read_loop<R>(mut rd: R, tx: mpsc::Sender<Result<Message, String>>)
where
    R: tokio::io::AsyncRead + Unpin,
{
    // The gateway is trusted but still bounded: no frame above 16 MiB.
    let decoder = FrameDecoder::new(16 * 1024 * 1024);
    let mut buf = BytesMut::with_capacity(8 * 1024);
    loop {
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(f)) => {
                    let m = Message::from_frame(f).map_err(|e| e.to_string());
                    let stop = m.is_err();
                    if tx.send(m).await.is_err() || stop {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string())).await;
                    return;
                }
            }
        }
        // Room for the rest of the frame begun (a firmware CHUNK is up to
        // 64 KiB: one read, no regrowth), at least 8 KiB.
        let want = match buf.get(..4) {
            Some(h) => (u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize + 4)
                .min(16 * 1024 * 1024 + 4)
                .saturating_sub(buf.len()),
            None => 0,
        };
        buf.reserve(want.max(8 * 1024));
        match rd.read_buf(&mut buf).await {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => {
                let _ = tx.send(Err(e.to_string())).await;
                return;
            }
        }
    }
}

/// Aborts the reader task when the session ends, on every path.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn write_all<W: tokio::io::AsyncWrite + Unpin>(
    wr: &mut W,
    bytes: &[u8],
    limit: Duration,
) -> Result<(), Disconnect> {
    match timeout(limit, wr.write_all(bytes)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Disconnect::Io(e.to_string())),
        Err(_) => Err(Disconnect::Io("write timed out".into())),
    }
}

fn encode(msg: &Message) -> Result<Bytes, Disconnect> {
    msg.to_bytes()
        .map_err(|e| Disconnect::Protocol(e.to_string()))
}

fn result_frame(id: u64, reply: &CommandReply) -> Result<Bytes, Disconnect> {
    encode(&Message::CommandResult(CommandResult {
        command_id: id,
        status: reply.status,
        content_type: reply.content_type,
        payload: reply.payload.clone(),
    }))
}

/// A TCP connection to the gateway, under TLS when configured.
async fn connect_tcp(
    shared: &Arc<Shared>,
    closing: &mut watch::Receiver<bool>,
) -> Result<Box<dyn Io>, Outcome> {
    let cfg = &shared.cfg;
    let connect = timeout(cfg.connect_timeout, TcpStream::connect(&cfg.addr));
    let stream = match unless_closing(closing, connect).await {
        None => return Err(Outcome::failed(Disconnect::Closed)),
        Some(Ok(Ok(s))) => s,
        Some(Ok(Err(e))) => return Err(Outcome::failed(Disconnect::ConnectFailed(e.to_string()))),
        Some(Err(_)) => {
            return Err(Outcome::failed(Disconnect::ConnectFailed(
                "connect timed out".into(),
            )))
        }
    };
    let _ = stream.set_nodelay(true);
    let stream: Box<dyn Io> = match &shared.tls {
        None => Box::new(stream),
        Some(tls) => {
            let handshake = timeout(
                cfg.connect_timeout,
                tls.connector.connect(tls.name.clone(), stream),
            );
            match unless_closing(closing, handshake).await {
                None => return Err(Outcome::failed(Disconnect::Closed)),
                Some(Ok(Ok(s))) => Box::new(s),
                Some(Ok(Err(e))) => {
                    return Err(Outcome::failed(Disconnect::ConnectFailed(format!(
                        "tls: {e}"
                    ))))
                }
                Some(Err(_)) => {
                    return Err(Outcome::failed(Disconnect::ConnectFailed(
                        "TLS handshake timed out".into(),
                    )))
                }
            }
        }
    };
    Ok(stream)
}

/// Over QUIC, the first readings go right behind HELLO, before WELCOME
/// (docs/protocol.md, "Session" 4), so that with 0-RTT they travel in the
/// first flight and the first ACK comes one round trip after the reconnect
/// began. Only after an earlier WELCOME (whose window and frame size bound
/// the batch), and only readings: a state report waits for WELCOME to
/// grant device state. Returns the seqs sent (a prefix of the outbox).
async fn send_early<W: tokio::io::AsyncWrite + Unpin>(
    shared: &Shared,
    wr: &mut W,
) -> Result<Vec<u64>, Disconnect> {
    let window = shared.last_window.load(Ordering::Relaxed) as usize;
    if shared.quic.is_none() || window == 0 {
        return Ok(Vec::new());
    }
    let max_payload = shared.max_payload.load(Ordering::Relaxed) as usize;
    let batch = shared.outbox().after(0, window);
    let mut out = BytesMut::new();
    let mut sent = Vec::new();
    for e in batch
        .iter()
        .take_while(|e| e.content_type != REPORT_MARKER && e.payload.len() <= max_payload)
    {
        encode_telemetry(e.seq, e.timestamp_ms, e.content_type, &e.payload, &mut out)
            .map_err(|err| Disconnect::Protocol(err.to_string()))?;
        sent.push(e.seq);
    }
    if !out.is_empty() {
        write_all(wr, &out, shared.cfg.connect_timeout).await?;
    }
    Ok(sent)
}

#[allow(clippy::too_many_lines)]
async fn serve_connection(
    shared: &Arc<Shared>,
    handler: Option<&Handler>,
    recent: &mut Recent,
    results_tx: &mpsc::Sender<(u64, CommandReply)>,
    results_rx: &mut mpsc::Receiver<(u64, CommandReply)>,
    closing: &mut watch::Receiver<bool>,
) -> Outcome {
    let cfg = &shared.cfg;
    let stream = match &shared.quic {
        Some(quic) => {
            match unless_closing(closing, timeout(cfg.connect_timeout, quic.connect())).await {
                None => return Outcome::failed(Disconnect::Closed),
                Some(Ok(Ok(s))) => Box::new(s) as Box<dyn Io>,
                Some(Ok(Err(e))) => return Outcome::failed(Disconnect::ConnectFailed(e)),
                Some(Err(_)) => {
                    return Outcome::failed(Disconnect::ConnectFailed(
                        "QUIC handshake timed out".into(),
                    ))
                }
            }
        }
        None => match connect_tcp(shared, closing).await {
            Ok(s) => s,
            Err(outcome) => return outcome,
        },
    };
    let (rd, mut wr) = tokio::io::split(stream);
    let (msg_tx, mut msgs) = mpsc::channel(256);
    let _reader = AbortOnDrop(tokio::spawn(read_loop(rd, msg_tx)));

    // Device state is announced only by a client that handles it, and
    // not to a gateway that refused capabilities before. Firmware needs
    // device state too: progress travels in the reported state.
    let mut caps = 0;
    if shared.desired_handler.is_some() {
        caps |= furrow_proto::CAP_STATE;
    }
    if shared.firmware.is_some() {
        caps |= furrow_proto::CAP_STATE | furrow_proto::CAP_FIRMWARE;
    }
    let capabilities =
        (caps != 0 && !shared.no_capabilities.load(Ordering::Acquire)).then_some(caps);
    let hello = Message::Hello(Hello {
        version: furrow_proto::VERSION,
        keepalive_s: cfg.keepalive_s,
        device_id: Str::from(cfg.device_id.as_str()),
        token: Str::from(shared.token().as_str()),
        capabilities,
    });
    let hello = match encode(&hello) {
        Ok(b) => b,
        Err(e) => return Outcome::failed(e),
    };
    if let Err(e) = write_all(&mut wr, &hello, cfg.connect_timeout).await {
        return Outcome::failed(e);
    }
    let early = match send_early(shared, &mut wr).await {
        Ok(e) => e,
        Err(e) => return Outcome::failed(e),
    };
    let answer = match unless_closing(closing, timeout(cfg.connect_timeout, msgs.recv())).await {
        None => return Outcome::failed(Disconnect::Closed),
        Some(a) => a,
    };
    let welcome = match answer {
        Err(_) => return Outcome::failed(Disconnect::ConnectFailed("no WELCOME in time".into())),
        Ok(None) => {
            return Outcome::failed(Disconnect::ConnectFailed("closed during handshake".into()))
        }
        Ok(Some(Err(e))) => return Outcome::failed(Disconnect::Protocol(e)),
        Ok(Some(Ok(Message::Welcome(w)))) => w,
        Ok(Some(Ok(Message::Error(e)))) => {
            if capabilities.is_some() && e.code == furrow_proto::ErrorCode::ProtocolError as u16 {
                // A gateway older than capabilities: HELLO without them
                // from now on (device state stays off).
                tracing::warn!(
                    "the gateway refused HELLO with capabilities; connecting without device state"
                );
                shared.no_capabilities.store(true, Ordering::Release);
            }
            return Outcome::failed(Disconnect::Error {
                code: e.code,
                message: e.message.to_string(),
            });
        }
        Ok(Some(Ok(Message::Goodbye(g)))) => {
            return Outcome {
                reason: Disconnect::Goodbye {
                    code: g.code,
                    retry_after_ms: g.retry_after_ms,
                },
                welcomed: false,
                retry_after: Some(Duration::from_millis(u64::from(g.retry_after_ms))),
            }
        }
        Ok(Some(Ok(other))) => {
            return Outcome::failed(Disconnect::Protocol(format!(
                "expected WELCOME, got {}",
                other.kind().name()
            )))
        }
    };

    // The gateway has everything up to last_seq: drop it from the outbox.
    // If our counter is behind it, we lost our state (see Outbox::rebase):
    // renumber what is pending instead, or the gateway would take new
    // readings for duplicates.
    let max_payload = (welcome.max_frame as usize).saturating_sub(TELEMETRY_OVERHEAD);
    shared
        .max_payload
        .store(max_payload as u64, Ordering::Relaxed);
    let state = welcome
        .capabilities
        .is_some_and(|c| c & furrow_proto::CAP_STATE != 0);
    shared
        .state_granted
        .store(if state { 1 } else { 2 }, Ordering::Release);
    // Firmware on this connection only if granted (never without STATE).
    let firmware = match &shared.firmware {
        Some(fw) if state => {
            if !fw.version_reported.swap(true, Ordering::AcqRel) {
                fw.reports.post(fw.download().version_report());
            }
            welcome
                .capabilities
                .is_some_and(|c| c & furrow_proto::CAP_FIRMWARE != 0)
                .then_some(fw)
        }
        _ => None,
    };
    let mut rebased = false;
    let too_large = {
        let mut ob = shared.outbox();
        let res = if welcome.last_seq > ob.last_seq() {
            rebased = true;
            if shared.cfg.outbox_path.is_none() || ob.last_seq() == 0 {
                // A counter that lives in memory, or a new file: it starts
                // at 0 with every process, and continuing after the
                // gateway's last_seq is the rule, not a loss.
                tracing::debug!(
                    gateway = welcome.last_seq,
                    "new seq counter: continuing after the gateway's last_seq"
                );
            } else {
                tracing::warn!(
                    local = ob.last_seq(),
                    gateway = welcome.last_seq,
                    "seq counter behind the gateway (device state lost?): renumbering pending readings"
                );
            }
            let r = ob.rebase(welcome.last_seq);
            shared.rebases.fetch_add(1, Ordering::AcqRel);
            r
        } else {
            ob.ack(welcome.last_seq)
        };
        if let Err(e) = res {
            tracing::error!(error = %e, "outbox update after WELCOME failed");
        }
        // Readings queued before this gateway's max_frame was known may not
        // fit it: the gateway would refuse the frame and close, every time.
        // Drop them and say so rather than wedge the outbox.
        // Likewise state reports, to a gateway without device state.
        let big: Vec<(u64, usize)> = ob
            .after(0, usize::MAX)
            .iter()
            .filter(|e| {
                e.payload.len() > max_payload || (e.content_type == REPORT_MARKER && !state)
            })
            .map(|e| (e.seq, e.payload.len()))
            .collect();
        for (seq, _) in &big {
            if let Err(e) = ob.remove(*seq) {
                tracing::error!(error = %e, "outbox remove failed");
            }
        }
        big
    };
    for &(seq, len) in &too_large {
        let (code, reason) = if len > max_payload {
            (
                furrow_proto::ErrorCode::FrameTooLarge,
                format!("payload of {len} bytes exceeds the gateway's limit of {max_payload}"),
            )
        } else {
            (
                furrow_proto::ErrorCode::ProtocolError,
                "the gateway does not speak device state: state report dropped".into(),
            )
        };
        shared.emit(Event::Rejected {
            seq,
            code: code as u16,
            reason,
        });
    }
    shared.acked.send_if_modified(|v| {
        let raise = welcome.last_seq > *v;
        if raise {
            *v = welcome.last_seq;
        }
        raise
    });
    shared.space.notify_waiters();
    let offset = welcome.server_time_ms as i64 - now_ms() as i64;
    shared.clock_offset.store(offset, Ordering::Relaxed);
    shared.emit(Event::Connected {
        last_seq: welcome.last_seq,
    });

    let ka = Duration::from_secs(u64::from(welcome.keepalive_s.max(1)));
    let write_limit = ka + ka / 2;
    let window = usize::from(welcome.max_inflight.max(1));
    shared.last_window.store(window as u64, Ordering::Relaxed);
    let mut inflight: VecDeque<u64> = VecDeque::with_capacity(window.min(1024));
    let mut sent_upto = welcome.last_seq;
    // What went behind HELLO is in flight, unless WELCOME covered it or
    // the seqs were renumbered (then the gateway took those frames for
    // duplicates of what it had, and the renumbered ones go out below).
    if !rebased {
        inflight.extend(
            early
                .iter()
                .copied()
                .filter(|s| *s > welcome.last_seq && !too_large.iter().any(|(t, _)| t == s)),
        );
        sent_upto = sent_upto.max(early.last().copied().unwrap_or(0));
    }
    let mut last_rx = Instant::now();
    let mut last_tx = Instant::now();
    let mut ping_nonce = 0u64;
    let mut out = BytesMut::new();
    let session = |reason| Outcome {
        reason,
        welcomed: true,
        retry_after: None,
    };

    loop {
        // Fill the window with what the outbox holds beyond what was sent.
        if inflight.len() < window {
            let batch = shared.outbox().after(sent_upto, window - inflight.len());
            if !batch.is_empty() {
                out.clear();
                for e in &batch {
                    let encoded = if e.content_type == REPORT_MARKER {
                        Message::Report(Report {
                            seq: e.seq,
                            timestamp_ms: e.timestamp_ms,
                            patch: e.payload.clone(),
                        })
                        .encode(&mut out)
                    } else {
                        encode_telemetry(
                            e.seq,
                            e.timestamp_ms,
                            e.content_type,
                            &e.payload,
                            &mut out,
                        )
                    };
                    if let Err(err) = encoded {
                        return session(Disconnect::Protocol(err.to_string()));
                    }
                    inflight.push_back(e.seq);
                    sent_upto = e.seq;
                }
                if let Err(e) = write_all(&mut wr, &out, write_limit).await {
                    return session(e);
                }
                last_tx = Instant::now();
            }
        }
        let ping_at = last_tx + ka;
        let dead_at = last_rx + ka + ka / 2;
        tokio::select! {
            biased;
            _ = closing.changed() => {
                // GOODBYE, then keep reading until the gateway has ACKed what
                // it read and closed.
                let bye = Message::Goodbye(Goodbye { code: GoodbyeCode::Normal as u16, retry_after_ms: 0 });
                if let Ok(b) = encode(&bye) {
                    let _ = write_all(&mut wr, &b, write_limit).await;
                }
                let _ = timeout(Duration::from_secs(5), async {
                    while let Some(Ok(m)) = msgs.recv().await {
                        if let Message::Ack { seq } = m {
                            on_ack(shared, &mut inflight, seq);
                        }
                    }
                }).await;
                return session(Disconnect::Closed);
            }
            m = msgs.recv() => {
                last_rx = Instant::now();
                let msg = match m {
                    None => return session(Disconnect::Io("connection closed by the gateway".into())),
                    Some(Err(e)) => return session(Disconnect::Io(e)),
                    Some(Ok(m)) => m,
                };
                match msg {
                    Message::Ack { seq } => on_ack(shared, &mut inflight, seq),
                    Message::Reject(r) => {
                        if let Err(e) = shared.outbox().remove(r.seq) {
                            tracing::error!(error = %e, "outbox remove failed");
                        }
                        inflight.retain(|s| *s != r.seq);
                        shared.space.notify_waiters();
                        shared.acked.send_modify(|_| {});
                        shared.emit(Event::Rejected { seq: r.seq, code: r.code, reason: r.reason.to_string() });
                    }
                    // A new token from the gateway: the client's own
                    // business, answered at once (again, identically, for
                    // a redelivery).
                    Message::Command(c) if c.name.as_str() == TOKEN_COMMAND => {
                        let reply = shared.take_token(&c.payload);
                        let frame = match result_frame(c.command_id, &reply) {
                            Ok(f) => f,
                            Err(e) => return session(e),
                        };
                        if let Err(e) = write_all(&mut wr, &frame, write_limit).await {
                            return session(e);
                        }
                    }
                    Message::Command(c) => {
                        let cmd = Command {
                            id: c.command_id,
                            name: c.name.to_string(),
                            content_type: c.content_type,
                            payload: c.payload,
                        };
                        match recent.begin(cmd.id) {
                            Seen::Done(reply) => {
                                let frame = match result_frame(cmd.id, &reply) {
                                    Ok(f) => f,
                                    Err(e) => return session(e),
                                };
                                if let Err(e) = write_all(&mut wr, &frame, write_limit).await {
                                    return session(e);
                                }
                            }
                            Seen::Running => {}
                            Seen::New => {
                                let tx = results_tx.clone();
                                let id = cmd.id;
                                match handler {
                                    Some(h) => {
                                        let fut = h(cmd);
                                        tokio::spawn(async move {
                                            let _ = tx.send((id, fut.await)).await;
                                        });
                                    }
                                    None => {
                                        let _ = tx.try_send((id, CommandReply::unknown()));
                                    }
                                }
                            }
                        }
                    }
                    Message::Ping { nonce } => {
                        let pong = match encode(&Message::Pong { nonce }) {
                            Ok(b) => b,
                            Err(e) => return session(e),
                        };
                        if let Err(e) = write_all(&mut wr, &pong, write_limit).await {
                            return session(e);
                        }
                        last_tx = Instant::now();
                    }
                    Message::Pong { .. } => {}
                    Message::Desired(d) if state => {
                        on_desired(shared, &d);
                        let ack = match encode(&Message::DesiredAck { version: d.version }) {
                            Ok(b) => b,
                            Err(e) => return session(e),
                        };
                        if let Err(e) = write_all(&mut wr, &ack, write_limit).await {
                            return session(e);
                        }
                        last_tx = Instant::now();
                    }
                    Message::FirmwareOffer(o) if firmware.is_some() => {
                        if let Some(fw) = firmware {
                            let outs = fw.download().on_offer(&o);
                            if let Err(e) = firmware_outputs(shared, fw, outs, &mut wr, write_limit, &mut last_tx).await {
                                return session(e);
                            }
                        }
                    }
                    Message::Chunk(c) if firmware.is_some() => {
                        if let Some(fw) = firmware {
                            let outs = fw.download().on_chunk(&c);
                            if let Err(e) = firmware_outputs(shared, fw, outs, &mut wr, write_limit, &mut last_tx).await {
                                return session(e);
                            }
                        }
                    }
                    Message::FirmwareCancel { image } if firmware.is_some() => {
                        if let Some(fw) = firmware {
                            fw.download().on_cancel(&image);
                        }
                    }
                    Message::Goodbye(g) => {
                        return Outcome {
                            reason: Disconnect::Goodbye { code: g.code, retry_after_ms: g.retry_after_ms },
                            welcomed: true,
                            retry_after: Some(Duration::from_millis(u64::from(g.retry_after_ms))),
                        };
                    }
                    Message::Error(e) => {
                        return session(Disconnect::Error { code: e.code, message: e.message.to_string() });
                    }
                    other => {
                        return session(Disconnect::Protocol(format!("unexpected {}", other.kind().name())));
                    }
                }
            }
            Some((id, reply)) = results_rx.recv() => {
                recent.finish(id, reply.clone());
                let frame = match result_frame(id, &reply) {
                    Ok(f) => f,
                    Err(e) => return session(e),
                };
                if let Err(e) = write_all(&mut wr, &frame, write_limit).await {
                    return session(e);
                }
                last_tx = Instant::now();
            }
            _ = shared.work.notified(), if inflight.len() < window => {}
            _ = sleep_until(ping_at) => {
                ping_nonce += 1;
                let ping = match encode(&Message::Ping { nonce: ping_nonce }) {
                    Ok(b) => b,
                    Err(e) => return session(e),
                };
                if let Err(e) = write_all(&mut wr, &ping, write_limit).await {
                    return session(e);
                }
                last_tx = Instant::now();
            }
            _ = sleep_until(dead_at) => return session(Disconnect::KeepaliveTimeout),
        }
    }
}

/// Carries out what the firmware download asked for: CHUNK_REQUESTs go out
/// (one write), reports to their slot, events to the application.
async fn firmware_outputs<W: tokio::io::AsyncWrite + Unpin>(
    shared: &Shared,
    fw: &Firmware,
    outs: Vec<Output>,
    wr: &mut W,
    limit: Duration,
    last_tx: &mut Instant,
) -> Result<(), Disconnect> {
    let mut frames = BytesMut::new();
    for o in outs {
        match o {
            Output::Request(r) => Message::ChunkRequest(r)
                .encode(&mut frames)
                .map_err(|e| Disconnect::Protocol(e.to_string()))?,
            Output::Report(patch) => {
                fw.reports.post(patch);
            }
            Output::Event(e) => shared.emit(e),
        }
    }
    if !frames.is_empty() {
        write_all(wr, &frames, limit).await?;
        *last_tx = Instant::now();
    }
    Ok(())
}

/// Runs `fut` unless the client is closed first (`None`).
async fn unless_closing<F: std::future::Future>(
    closing: &mut watch::Receiver<bool>,
    fut: F,
) -> Option<F::Output> {
    if *closing.borrow_and_update() {
        return None;
    }
    tokio::select! {
        out = fut => Some(out),
        _ = closing.changed() => None,
    }
}

/// A DESIRED from the gateway: the handler sees each version once, in
/// order (a redelivery after a reconnect is confirmed again, not applied
/// again).
fn on_desired(shared: &Shared, d: &furrow_proto::Desired) {
    let document = match serde_json::from_slice::<serde_json::Value>(&d.document) {
        Ok(v @ serde_json::Value::Object(_)) => v,
        _ => {
            tracing::warn!(version = d.version, "DESIRED is not a JSON object; ignored");
            return;
        }
    };
    let desired = Desired {
        version: d.version,
        document,
    };
    {
        let mut last = shared.desired.lock().unwrap_or_else(|p| p.into_inner());
        if last.as_ref().is_some_and(|l| l.version >= d.version) {
            return;
        }
        *last = Some(desired.clone());
    }
    if let Some(h) = &shared.desired_handler {
        h(desired);
    }
    shared.emit(Event::Desired { version: d.version });
}

fn on_ack(shared: &Shared, inflight: &mut VecDeque<u64>, seq: u64) {
    if let Err(e) = shared.outbox().ack(seq) {
        tracing::error!(error = %e, "outbox ack failed");
    }
    while inflight.front().is_some_and(|s| *s <= seq) {
        inflight.pop_front();
    }
    shared.acked.send_if_modified(|v| {
        let raise = seq > *v;
        if raise {
            *v = seq;
        }
        raise
    });
    shared.space.notify_waiters();
    shared.emit(Event::Acked(seq));
}
