//! Shared helpers of the gateway's end-to-end tests: an in-process gateway
//! on 127.0.0.1:0 over a temporary data directory, a raw furrow/1 device on a
//! plain TCP socket, and direct reads of the SQLite file through a separate
//! connection (so what is "stored" is checked independently of the gateway).
//!
//! Every wait is bounded: a missing answer fails the test instead of hanging.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use furrow::devices::registry::Registry;
use furrow::store::prelude::*;
use furrow::Config;
use furrow_proto::message::encode_telemetry;
use furrow_proto::{
    CommandResult, CommandStatus, ErrorMsg, FrameDecoder, Goodbye, Hello, Message, Reject, Str,
    Welcome,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};

/// The longest a test waits for any single message from the gateway.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(10);

pub mod haproxy;
pub mod http;
pub mod mosquitto;
pub mod pki;
pub mod postgres;
pub mod process;

/// ERROR / REJECT codes (docs/protocol.md, "Codes").
pub mod code {
    pub const PROTOCOL_ERROR: u16 = 1;
    pub const UNSUPPORTED_VERSION: u16 = 2;
    pub const AUTH_FAILED: u16 = 3;
    pub const FRAME_TOO_LARGE: u16 = 4;
    pub const UNKNOWN_TYPE: u16 = 5;
    pub const HANDSHAKE_TIMEOUT: u16 = 6;
    pub const KEEPALIVE_TIMEOUT: u16 = 7;
    pub const INVALID_PAYLOAD: u16 = 20;
    pub const UNSUPPORTED_CONTENT_TYPE: u16 = 21;
}

/// GOODBYE codes.
pub mod goodbye {
    pub const NORMAL: u16 = 0;
    pub const SERVER_SHUTDOWN: u16 = 1;
    pub const SESSION_TAKEN_OVER: u16 = 2;
    pub const DEVICE_REVOKED: u16 = 3;
}

/// Wall clock in Unix milliseconds.
pub fn now_ms() -> u64 {
    furrow::clock::now_ms()
}

/// Fails the test if `fut` does not finish within `d`.
pub async fn within<T>(d: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match timeout(d, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {d:?}: {what}"),
    }
}

// ---------------------------------------------------------------------------
// The gateway
// ---------------------------------------------------------------------------

/// A gateway running on the test's runtime.
pub struct TestGateway {
    addr: SocketAddr,
    tls_addr: Option<SocketAddr>,
    quic_addr: Option<SocketAddr>,
    api: Option<SocketAddr>,
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    limits: Arc<furrow::ingress::limits::Limiter>,
    cfg: Config,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    // Dropped last: the database lives in it.
    _dir: tempfile::TempDir,
}

/// The configuration every test starts from: loopback, port 0, a fresh
/// temporary data directory, and otherwise the gateway's defaults.
pub fn base_config(data_dir: &Path) -> Config {
    let mut cfg = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data_dir.to_path_buf(),
        ..Config::default()
    };
    // Keep shutdown of a test gateway short when something is stuck.
    cfg.shutdown.drain_timeout_ms = 5_000;
    // Tests run side by side: no gateway may take the API's fixed port.
    cfg.api.listen = "127.0.0.1:0".parse().unwrap();
    // ...nor the TLS listener's, when a test turns TLS on.
    cfg.tls.listen = "127.0.0.1:0".parse().unwrap();
    cfg
}

impl TestGateway {
    /// A gateway with the default test configuration.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// A gateway whose configuration `tweak` may change (it may also point
    /// `data_dir` elsewhere).
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = base_config(dir.path());
        tweak(&mut cfg);
        cfg.validate().expect("the test configuration is valid");
        let server = within(
            Duration::from_secs(10),
            "Server::bind",
            furrow::Server::bind(cfg.clone()),
        )
        .await
        .expect("the gateway binds");
        let addr = server.local_addr();
        let tls_addr = server.tls_addr();
        let quic_addr = server.quic_addr();
        let api = server.api_addr();
        let store = server.store();
        let registry = server.registry();
        let limits = server.limits();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        Self {
            addr,
            tls_addr,
            quic_addr,
            api,
            store,
            registry,
            limits,
            cfg,
            stop: Some(tx),
            task: Some(task),
            _dir: dir,
        }
    }

    /// The QUIC listener's address (panics if QUIC is off).
    pub fn quic_addr(&self) -> SocketAddr {
        self.quic_addr.expect("the QUIC listener is on")
    }

    /// The value of the counter `name{outcome="OUTCOME"}` in `GET
    /// /metrics` (0 while it has not been counted). The recorder is
    /// global to a test process: compare before and after.
    pub async fn counter(&self, name: &str, outcome: &str) -> u64 {
        let text = reqwest::get(self.api_url("/metrics"))
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text");
        let key = format!("{name}{{outcome=\"{outcome}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&key))
            .map_or(0, |v| v.trim().parse().expect("a counter's value"))
    }

    /// The TLS listener's address (panics if TLS is off).
    pub fn tls_addr(&self) -> SocketAddr {
        self.tls_addr.expect("the TLS listener is on")
    }

    /// `http://API_ADDR{path}` (panics if the API is disabled).
    pub fn api_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api.expect("the API is enabled"))
    }

    /// The device listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The gateway's store.
    pub fn store(&self) -> Arc<dyn Store> {
        Arc::clone(&self.store)
    }

    /// The registry of live sessions.
    pub fn registry(&self) -> Arc<Registry> {
        Arc::clone(&self.registry)
    }

    /// The gateway's abuse limits (what they track now).
    pub fn limits(&self) -> Arc<furrow::ingress::limits::Limiter> {
        Arc::clone(&self.limits)
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The SQLite file.
    pub fn db_path(&self) -> PathBuf {
        self.cfg.database_path()
    }

    /// Provisions a device and returns its token.
    pub async fn add_device(&self, id: &str) -> String {
        furrow::devices::add_device(&*self.store, id)
            .await
            .expect("device provisioned")
    }

    /// Connects a raw device and completes the handshake.
    pub async fn connect_device(&self, id: &str, token: &str) -> (RawDevice, Welcome) {
        let mut dev = RawDevice::connect(self.addr).await;
        let w = dev.hello(id, token, 0).await;
        (dev, w)
    }

    /// Signals shutdown and waits for `run` to return. Returns how long it
    /// took. Fails the test after 30 s.
    pub async fn shutdown(&mut self) -> Duration {
        let started = Instant::now();
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            within(Duration::from_secs(30), "gateway shutdown", task)
                .await
                .expect("the gateway task did not panic");
        }
        started.elapsed()
    }

    /// Waits (at most 10 s) until the gateway has released the device's
    /// session (its connection ended and everything it took is resolved).
    pub async fn wait_offline(&self, id: &str) {
        within(Duration::from_secs(10), "device session released", async {
            while self.registry.is_online(id) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
    }

    /// Waits (at most 10 s) until the device holds a session.
    pub async fn wait_online(&self, id: &str) {
        within(
            Duration::from_secs(10),
            "device session registered",
            async {
                while !self.registry.is_online(id) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            },
        )
        .await
    }

    /// Waits (up to `limit`) until `n` device sessions are registered.
    pub async fn wait_sessions(&self, n: usize, limit: Duration) {
        within(limit, &format!("{n} device sessions registered"), async {
            while self.registry.len() < n {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
    }

    /// Whether `run` is still going.
    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }
}

// ---------------------------------------------------------------------------
// Message builders
// ---------------------------------------------------------------------------

/// HELLO version 1.
pub fn hello_msg(id: &str, token: &str, keepalive_s: u16) -> Message {
    Message::Hello(Hello {
        version: furrow_proto::VERSION,
        keepalive_s,
        device_id: Str::from(id),
        token: Str::from(token),
        capabilities: None,
    })
}

/// TELEMETRY with the current time.
pub fn telemetry_msg(seq: u64, content_type: u8, payload: &[u8]) -> Message {
    Message::Telemetry(furrow_proto::Telemetry {
        seq,
        timestamp_ms: now_ms(),
        content_type,
        payload: Bytes::copy_from_slice(payload),
    })
}

/// COMMAND_RESULT.
pub fn command_result_msg(command_id: u64, status: CommandStatus) -> Message {
    Message::CommandResult(CommandResult {
        command_id,
        status,
        content_type: 0,
        payload: Bytes::new(),
    })
}

/// One message as wire bytes.
pub fn encode(msg: &Message) -> Vec<u8> {
    let mut b = BytesMut::new();
    msg.encode(&mut b).unwrap();
    b.to_vec()
}

/// A raw frame: length field computed from `body`, any type and flags.
pub fn raw_frame(kind: u8, flags: u8, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(6 + body.len());
    v.extend_from_slice(&((body.len() + 2) as u32).to_be_bytes());
    v.push(kind);
    v.push(flags);
    v.extend_from_slice(body);
    v
}

/// A small valid JSON payload for seq `seq`.
pub fn json_payload(seq: u64) -> Vec<u8> {
    format!("{{\"seq\":{seq},\"t\":21.5}}").into_bytes()
}

/// TELEMETRY frames for `seqs`, JSON payloads, concatenated.
pub fn telemetry_frames(seqs: impl IntoIterator<Item = u64>) -> BytesMut {
    let mut b = BytesMut::new();
    let ts = now_ms();
    for s in seqs {
        encode_telemetry(s, ts, 1, &json_payload(s), &mut b).unwrap();
    }
    b
}

// ---------------------------------------------------------------------------
// The raw device
// ---------------------------------------------------------------------------

/// What reading the connection produced.
#[derive(Debug)]
pub enum Event {
    /// A complete message.
    Msg(Message),
    /// The gateway closed its side cleanly.
    Eof,
    /// The connection was reset (or another read error).
    Reset(std::io::ErrorKind),
    /// Nothing within the wait.
    Timeout,
}

/// The reading side of a device connection.
pub struct DeviceReader {
    rd: OwnedReadHalf,
    buf: BytesMut,
    decoder: FrameDecoder,
}

impl DeviceReader {
    fn new(rd: OwnedReadHalf) -> Self {
        Self {
            rd,
            buf: BytesMut::with_capacity(64 * 1024),
            // Whatever the gateway sends is decoded, however long.
            decoder: FrameDecoder::new(u32::MAX),
        }
    }

    /// Reads raw bytes until the gateway closes (EOF or reset): true, or
    /// the wait passes: false. For a device the gateway gave up on, whose
    /// last frame may be cut off (best-effort flush), like a network cut.
    pub async fn until_closed(&mut self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        loop {
            self.buf.clear();
            self.buf.reserve(16 * 1024);
            match tokio::time::timeout_at(deadline, self.rd.read_buf(&mut self.buf)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// The next complete frame's wire bytes, EOF, reset or timeout.
    pub async fn next_raw(&mut self, wait: Duration) -> Result<Bytes, Event> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(total) = self
                .decoder
                .check_header(&self.buf)
                .unwrap_or_else(|e| panic!("the gateway sent a malformed frame: {e}"))
            {
                if self.buf.len() >= total {
                    return Ok(self.buf.split_to(total).freeze());
                }
            }
            self.buf.reserve(16 * 1024);
            match tokio::time::timeout_at(deadline, self.rd.read_buf(&mut self.buf)).await {
                Err(_) => return Err(Event::Timeout),
                Ok(Ok(0)) => {
                    assert!(
                        self.buf.is_empty(),
                        "the gateway closed in the middle of a frame ({} bytes buffered)",
                        self.buf.len()
                    );
                    return Err(Event::Eof);
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(Event::Reset(e.kind())),
            }
        }
    }

    /// The next event within `wait`.
    pub async fn next_event(&mut self, wait: Duration) -> Event {
        match self.next_raw(wait).await {
            Ok(raw) => Event::Msg(parse(raw)),
            Err(ev) => ev,
        }
    }

    /// The next message; `None` when the gateway closed (clean EOF or a
    /// reset). Fails the test on timeout.
    pub async fn recv(&mut self) -> Option<Message> {
        self.recv_within(RECV_TIMEOUT).await
    }

    /// Like [`Self::recv`] with a custom wait.
    pub async fn recv_within(&mut self, wait: Duration) -> Option<Message> {
        match self.next_event(wait).await {
            Event::Msg(m) => Some(m),
            Event::Eof | Event::Reset(_) => None,
            Event::Timeout => panic!("no message from the gateway within {wait:?}"),
        }
    }

    /// Asserts that the gateway closes the connection cleanly (FIN) next.
    pub async fn expect_eof(&mut self) {
        match self.next_event(RECV_TIMEOUT).await {
            Event::Eof => {}
            other => panic!("expected the gateway to close the connection, got {other:?}"),
        }
    }

    /// Asserts that the connection ends next, by EOF or by a reset.
    pub async fn expect_closed(&mut self) {
        match self.next_event(RECV_TIMEOUT).await {
            Event::Eof | Event::Reset(_) => {}
            other => panic!("expected the connection to end, got {other:?}"),
        }
    }

    /// Asserts that nothing arrives (and the connection stays open) for `d`.
    pub async fn expect_silence(&mut self, d: Duration) {
        match self.next_event(d).await {
            Event::Timeout => {}
            other => panic!("expected nothing for {d:?}, got {other:?}"),
        }
    }
}

/// Parses one complete frame the gateway sent.
pub fn parse(raw: Bytes) -> Message {
    let mut b = BytesMut::from(&raw[..]);
    let frame = FrameDecoder::new(u32::MAX)
        .decode(&mut b)
        .unwrap()
        .expect("a complete frame");
    Message::from_frame(frame).unwrap_or_else(|e| panic!("the gateway sent a bad body: {e}"))
}

/// The writing side of a device connection.
pub struct DeviceWriter {
    wr: OwnedWriteHalf,
}

impl DeviceWriter {
    /// Writes bytes as they are.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.wr.write_all(bytes).await
    }

    /// Sends one message.
    pub async fn send(&mut self, msg: &Message) -> std::io::Result<()> {
        self.send_raw(&encode(msg)).await
    }

    /// Shuts down the device's sending side (FIN) and keeps the socket open
    /// for reading.
    pub async fn shutdown(&mut self) -> std::io::Result<()> {
        self.wr.shutdown().await
    }
}

/// A furrow/1 device on a raw TCP connection, driven by the test.
pub struct RawDevice {
    pub reader: DeviceReader,
    pub writer: DeviceWriter,
}

impl RawDevice {
    /// Connects to the gateway.
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = within(Duration::from_secs(10), "connect", TcpStream::connect(addr))
            .await
            .expect("connected");
        Self::from_stream(stream)
    }

    /// Wraps a connected stream.
    pub fn from_stream(stream: TcpStream) -> Self {
        stream.set_nodelay(true).unwrap();
        let (rd, wr) = stream.into_split();
        Self {
            reader: DeviceReader::new(rd),
            writer: DeviceWriter { wr },
        }
    }

    /// Splits into halves for concurrent reading and writing. Keep the
    /// writer alive: dropping it closes the device's sending side.
    pub fn split(self) -> (DeviceReader, DeviceWriter) {
        (self.reader, self.writer)
    }

    /// Writes bytes as they are; fails the test on error.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        within(
            Duration::from_secs(10),
            "write to the gateway",
            self.writer.send_raw(bytes),
        )
        .await
        .expect("write to the gateway")
    }

    /// Writes bytes; an I/O error is returned, not a failure (the gateway
    /// may have closed already).
    pub async fn try_send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        within(
            Duration::from_secs(10),
            "write to the gateway",
            self.writer.send_raw(bytes),
        )
        .await
    }

    /// Sends one message.
    pub async fn send(&mut self, msg: &Message) {
        self.send_raw(&encode(msg)).await
    }

    /// Sends HELLO and returns WELCOME; fails on anything else.
    pub async fn hello(&mut self, id: &str, token: &str, keepalive_s: u16) -> Welcome {
        self.send(&hello_msg(id, token, keepalive_s)).await;
        self.expect_welcome().await
    }

    /// Reads WELCOME; fails on anything else.
    pub async fn expect_welcome(&mut self) -> Welcome {
        match self.recv().await {
            Some(Message::Welcome(w)) => w,
            other => panic!("expected WELCOME, got {other:?}"),
        }
    }

    /// Sends one JSON TELEMETRY.
    pub async fn telemetry(&mut self, seq: u64, json: &str) {
        self.send(&telemetry_msg(seq, 1, json.as_bytes())).await
    }

    /// Sends TELEMETRY for every seq in `seqs` in one write (JSON payloads).
    pub async fn telemetry_batch(&mut self, seqs: impl IntoIterator<Item = u64>) {
        let b = telemetry_frames(seqs);
        self.send_raw(&b).await
    }

    /// The next message; `None` when the gateway closed. Fails on timeout.
    pub async fn recv(&mut self) -> Option<Message> {
        self.reader.recv().await
    }

    /// Like [`Self::recv`] with a custom wait.
    pub async fn recv_within(&mut self, wait: Duration) -> Option<Message> {
        self.reader.recv_within(wait).await
    }

    /// The next event.
    pub async fn next_event(&mut self, wait: Duration) -> Event {
        self.reader.next_event(wait).await
    }

    /// The next frame's exact bytes; fails on EOF or timeout.
    pub async fn recv_raw(&mut self) -> Bytes {
        match self.reader.next_raw(RECV_TIMEOUT).await {
            Ok(b) => b,
            Err(ev) => panic!("expected a frame, got {ev:?}"),
        }
    }

    /// Reads until an ACK of at least `seq`; returns every message read on
    /// the way (ACKs included). Fails on ERROR, GOODBYE, close, a backwards
    /// ACK, or timeout.
    pub async fn until_ack(&mut self, seq: u64) -> Vec<Message> {
        let mut seen = Vec::new();
        let mut last = 0;
        loop {
            let m = self.recv().await;
            match &m {
                Some(Message::Ack { seq: n }) => {
                    assert!(*n > last, "ACK went backwards or repeated: {last} then {n}");
                    last = *n;
                    seen.push(m.clone().unwrap());
                    if *n >= seq {
                        return seen;
                    }
                }
                Some(Message::Reject(_)) | Some(Message::Pong { .. }) => seen.push(m.unwrap()),
                other => panic!("waiting for ACK {seq} (last ACK {last}), got {other:?}"),
            }
        }
    }

    /// Expects ERROR `code` next, then a clean close. Returns the ERROR.
    pub async fn expect_error(&mut self, code: u16) -> ErrorMsg {
        let e = match self.recv().await {
            Some(Message::Error(e)) => e,
            other => panic!("expected ERROR {code}, got {other:?}"),
        };
        assert_eq!(e.code, code, "ERROR code (message: {:?})", e.message);
        self.reader.expect_eof().await;
        e
    }

    /// Expects GOODBYE `code` next (after any ACKs, which are returned).
    pub async fn expect_goodbye(&mut self, code: u16) -> (Goodbye, Vec<u64>) {
        let mut acks = Vec::new();
        loop {
            match self.recv().await {
                Some(Message::Ack { seq }) => acks.push(seq),
                Some(Message::Goodbye(g)) => {
                    assert_eq!(g.code, code, "GOODBYE code");
                    return (g, acks);
                }
                other => panic!("expected GOODBYE {code}, got {other:?}"),
            }
        }
    }

    /// Asserts that the gateway closes cleanly next.
    pub async fn expect_eof(&mut self) {
        self.reader.expect_eof().await
    }

    /// Asserts that nothing arrives for `d`.
    pub async fn expect_silence(&mut self, d: Duration) {
        self.reader.expect_silence(d).await
    }

    /// Round-trips a PING: proves the session is alive.
    pub async fn ping(&mut self, nonce: u64) {
        self.send(&Message::Ping { nonce }).await;
        loop {
            match self.recv().await {
                Some(Message::Pong { nonce: n }) if n == nonce => return,
                Some(Message::Ack { .. }) => {}
                other => panic!("expected PONG {nonce}, got {other:?}"),
            }
        }
    }
}

/// Expects a REJECT.
pub fn as_reject(m: &Message) -> Option<&Reject> {
    match m {
        Message::Reject(r) => Some(r),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// Direct database reads
// ---------------------------------------------------------------------------

/// Opens the gateway's SQLite file with a connection of our own.
pub fn open_db(path: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    c
}

/// Every stored seq of `device_id`, in order (as u64, the wire's type).
pub fn stored_seqs_in(conn: &rusqlite::Connection, device_id: &str) -> Vec<u64> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT t.seq FROM telemetry t JOIN devices d ON d.id = t.device \
             WHERE d.device_id = ?1 ORDER BY t.seq",
        )
        .unwrap();
    let mut v: Vec<u64> = stmt
        .query_map([device_id], |r| r.get::<_, i64>(0))
        .unwrap()
        .map(|r| r.unwrap() as u64)
        .collect();
    // Sorted as u64 (SQLite sorts seqs above i64::MAX as negative).
    v.sort_unstable();
    v
}

/// Every stored seq of `device_id`, from a fresh connection.
pub fn stored_seqs(db: &Path, device_id: &str) -> Vec<u64> {
    stored_seqs_in(&open_db(db), device_id)
}

/// Same, off the async worker.
pub async fn stored_seqs_async(db: &Path, device_id: &str) -> Vec<u64> {
    let db = db.to_path_buf();
    let id = device_id.to_owned();
    tokio::task::spawn_blocking(move || stored_seqs(&db, &id))
        .await
        .unwrap()
}

/// Number of stored rows of every device.
pub fn count_all_rows(db: &Path) -> u64 {
    let c = open_db(db);
    c.query_row("SELECT COUNT(*) FROM telemetry", [], |r| r.get::<_, i64>(0))
        .unwrap() as u64
}

/// One stored row: (timestamp_ms, received_ms, content_type, payload).
pub fn stored_row(db: &Path, device_id: &str, seq: u64) -> Option<(u64, u64, u8, Vec<u8>)> {
    let c = open_db(db);
    let mut stmt = c
        .prepare(
            "SELECT t.timestamp_ms, t.received_ms, t.content_type, t.payload \
             FROM telemetry t JOIN devices d ON d.id = t.device \
             WHERE d.device_id = ?1 AND t.seq = ?2",
        )
        .unwrap();
    let mut rows = stmt
        .query_map(rusqlite::params![device_id, seq as i64], |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                r.get::<_, i64>(1)? as u64,
                r.get::<_, u8>(2)?,
                r.get::<_, Vec<u8>>(3)?,
            ))
        })
        .unwrap();
    rows.next().map(|r| r.unwrap())
}

/// Asserts that `got` is exactly `expected` (each once), with a short diff.
pub fn assert_seqs(got: &[u64], expected: impl IntoIterator<Item = u64>, what: &str) {
    let want: Vec<u64> = expected.into_iter().collect();
    if got != want.as_slice() {
        let gs: std::collections::BTreeSet<_> = got.iter().copied().collect();
        let ws: std::collections::BTreeSet<_> = want.iter().copied().collect();
        let missing: Vec<_> = ws.difference(&gs).take(20).collect();
        let extra: Vec<_> = gs.difference(&ws).take(20).collect();
        panic!(
            "{what}: stored {} rows, expected {}; missing (first 20) {missing:?}, \
             unexpected (first 20) {extra:?}, duplicates: {}",
            got.len(),
            want.len(),
            got.len() - gs.len()
        );
    }
}

impl RawDevice {
    /// Sends `first..=last` pipelined, never more than `window` unacknowledged
    /// (ACKs are cumulative), calling `on_ack` for every ACK as it arrives.
    /// Returns the number of ACKs received. Fails on anything but ACKs, on an
    /// ACK that goes backwards or names a seq not sent yet, and on timeout.
    pub async fn stream_window(
        &mut self,
        first: u64,
        last: u64,
        window: u64,
        mut on_ack: impl FnMut(u64),
    ) -> usize {
        assert!(window > 0);
        let mut next = first;
        let mut acked = first - 1;
        let mut acks = 0;
        while acked < last {
            if next <= last && next - 1 - acked < window {
                let end = (acked + window).min(last);
                let frames = telemetry_frames(next..=end);
                self.send_raw(&frames).await;
                next = end + 1;
            }
            match self.recv().await {
                Some(Message::Ack { seq }) => {
                    assert!(seq > acked, "ACK went backwards: {acked} then {seq}");
                    assert!(seq < next, "ACK {seq} for a seq not sent yet (next {next})");
                    acked = seq;
                    acks += 1;
                    on_ack(seq);
                }
                other => panic!("streaming: expected ACK after {acked}, got {other:?}"),
            }
        }
        acks
    }
}

/// Installs a log subscriber for the test binary when `FURROW_TEST_LOG` is
/// set (an EnvFilter directive such as `furrow=debug`). Off by default.
pub fn init_test_logs() {
    if let Ok(filter) = std::env::var("FURROW_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

/// A `furrow` command (the binary under test) with a clean environment: no
/// FURROW_* variable of the caller leaks in.
pub fn furrow_cmd(args: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_furrow"));
    cmd.args(args);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("FURROW_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("RUST_LOG", "info");
    // Tests run side by side: no gateway may take the API's fixed port.
    cmd.env("FURROW_API__LISTEN", "127.0.0.1:0");
    cmd
}

/// A loopback port that was free a moment ago, below Linux's ephemeral
/// range (32768 and up): a port from that range could be taken, between
/// this call and the bind that uses it, by an outgoing connection (a
/// gateway's database pool, say), and the bind would fail. Never the same
/// port twice in one test process either.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    let span = 12_000u32;
    let mut next = u32::from(std::process::id() as u16).wrapping_mul(7919) % span;
    for _ in 0..span {
        next = (next + 1) % span;
        let port = 20_000 + next as u16;
        if given.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    panic!("no free loopback port in 20000..32000");
}

/// Streams JSON readings 1, 2, ... through an SDK client every `every`
/// while `streaming` holds; the task returns how many it queued.
pub fn stream_while(
    client: Arc<furrow_client::Client>,
    streaming: Arc<std::sync::atomic::AtomicBool>,
    every: Duration,
) -> JoinHandle<u64> {
    tokio::spawn(async move {
        let mut sent = 0u64;
        while streaming.load(std::sync::atomic::Ordering::Relaxed) {
            client
                .send(1, json_payload(sent + 1))
                .await
                .expect("queued");
            sent += 1;
            tokio::time::sleep(every).await;
        }
        sent
    })
}

/// Asserts that the store holds exactly seqs 1..=n of `device_id`: complete,
/// and each once.
pub async fn assert_stored_exactly(store: &dyn Store, device_id: &str, n: u64, context: &str) {
    let rows = store
        .telemetry(device_id, furrow::store::TelemetryRange::default(), 100_000)
        .await
        .expect("read back");
    let seqs: Vec<u64> = rows.iter().map(|r| r.seq).collect();
    assert_eq!(
        seqs,
        (1..=n).collect::<Vec<_>>(),
        "{device_id} ({context}): stored seqs are not exactly 1..={n}"
    );
}

/// Ends [`stream_while`] streams: clears `streaming`, collects how many
/// readings each sender queued, then waits (bounded) until every client has
/// them all acknowledged. Returns the counts, in `senders` order.
pub async fn stop_and_flush(
    streaming: &std::sync::atomic::AtomicBool,
    senders: Vec<JoinHandle<u64>>,
    clients: &[(String, Arc<furrow_client::Client>)],
) -> Vec<u64> {
    streaming.store(false, std::sync::atomic::Ordering::Relaxed);
    let mut sent = Vec::with_capacity(senders.len());
    for s in senders {
        sent.push(s.await.expect("sender"));
    }
    for (id, c) in clients {
        within(Duration::from_secs(60), &format!("{id} flushed"), c.flush())
            .await
            .expect("flush");
    }
    sent
}
