//! The `session` fuzz harness, shared by the libFuzzer target
//! (`fuzz/fuzz_targets/session.rs`, which includes this file with
//! `#[path]`) and the normal test suite (`tests/fuzz_session.rs`, which
//! replays the committed corpus and proptest inputs through it).
//!
//! One in-process gateway per process (a `static`), on 127.0.0.1:0 over a
//! SQLite store in a temporary directory, with small limits so that the
//! rare paths are near: `max_frame` 1024, `max_inflight` 4, a writer queue
//! of 2 jobs, 512-byte reads. Each input gets a freshly provisioned device
//! and plays up to three connections of up to 32 steps each: the steps are
//! encoded and written at once (a reader runs alongside, so neither side
//! blocks the other), then the device closes its sending side and reads
//! until the gateway closes. A connection may stay open while the next one
//! connects, so a valid HELLO there takes its session over.
//!
//! Checks, per connection:
//! * the gateway never panics (`furrow_connection_panics_total` stays 0;
//!   under libFuzzer a panic on any thread aborts at once anyway);
//! * everything it sends is well-formed furrow/1, gateway-side frames, and
//!   it closes on a frame boundary within 10 s of the device's EOF;
//! * the answer is what the spec says for the bytes sent, simulated here
//!   independently: WELCOME for a good HELLO first and only then, else the
//!   one ERROR the first frame earns; after WELCOME, the ERROR the first bad
//!   frame earns and nothing after it, or (GOODBYE or EOF) every TELEMETRY
//!   read answered: the last ACK is the highest seq sent, a PONG for each
//!   PING in order; ACKs never go backwards and only name seqs this
//!   connection sent; a REJECT comes before any ACK that covers it.
//!
//! and, every 1000 inputs, that a fresh device still gets a clean session.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arbitrary::Arbitrary;
use bytes::{BufMut, BytesMut};
use furrow::store::prelude::*;
use furrow::store::Synchronous;
use furrow::Config;
use furrow_proto::message::encode_telemetry;
use furrow_proto::{
    ErrorCode, FrameDecoder, Goodbye, GoodbyeCode, Hello, Message, MessageType, Str,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

/// The gateway's limits in the harness.
pub const MAX_FRAME: u32 = 1024;
const MAX_INFLIGHT: u16 = 4;
const MAX_CONNS: usize = 3;
const MAX_STEPS: usize = 32;
/// How long the gateway may take to close after the device's EOF.
const CLOSE_WAIT: Duration = Duration::from_secs(10);
/// A fresh valid session is tried after this many inputs.
pub const HEALTH_EVERY: u64 = 1000;

// ---------------------------------------------------------------------------
// The input
// ---------------------------------------------------------------------------

/// One fuzz input: connections of one fresh device, in order.
#[derive(Debug, Arbitrary)]
pub struct Input {
    /// At most [`MAX_CONNS`] are played.
    pub conns: Vec<Conn>,
}

/// One connection's steps.
#[derive(Debug, Arbitrary)]
pub struct Conn {
    /// At most [`MAX_STEPS`] are played.
    pub steps: Vec<Step>,
    /// Keep this connection open while the next one connects and writes.
    pub overlap_next: bool,
}

/// What the device writes.
#[derive(Debug, Arbitrary)]
pub enum Step {
    /// HELLO with the device's id and token.
    Hello {
        keepalive_s: u16,
    },
    /// HELLO with the device's id and another token.
    HelloWrongToken {
        token: String,
    },
    /// HELLO with any version, id and token bytes (own id if `own_id`).
    HelloRaw {
        version: u8,
        keepalive_s: u16,
        own_id: bool,
        device_id: Vec<u8>,
        token: Vec<u8>,
    },
    /// TELEMETRY; the content type matches the payload unless given.
    Telemetry {
        seq: SeqStep,
        timestamp_ms: u64,
        content_type: Option<u8>,
        payload: Payload,
    },
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    CommandResult {
        command_id: u64,
        status: u8,
        content_type: u8,
        payload: Vec<u8>,
    },
    Goodbye {
        code: u16,
        retry_after_ms: u32,
    },
    /// A frame of any type and flags, its length field right.
    Frame {
        kind: u8,
        flags: u8,
        body: Vec<u8>,
    },
    /// A bare header, its length field anything.
    Header {
        len: u32,
        kind: u8,
        flags: u8,
    },
    /// Raw bytes.
    Garbage(Vec<u8>),
}

/// TELEMETRY's seq, relative to the highest this input has used.
#[derive(Debug, Arbitrary)]
pub enum SeqStep {
    Next,
    Same,
    Back(u8),
    Jump(u16),
    Zero,
    Raw(u64),
}

/// A payload, mostly of a content type's own kind.
#[derive(Debug, Arbitrary)]
pub enum Payload {
    Json(Json),
    JsonText(String),
    Cbor(Cbor),
    Text(String),
    Bytes(Vec<u8>),
}

#[derive(Debug, Arbitrary)]
pub enum Json {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

#[derive(Debug, Arbitrary)]
pub enum Cbor {
    Uint(u64),
    Nint(u64),
    Bytes(Vec<u8>),
    Text(String),
    Arr(Vec<Cbor>),
    Map(Vec<(Cbor, Cbor)>),
    Tag(u64, Box<Cbor>),
    Simple(u8),
    F64(f64),
    IndefArr(Vec<Cbor>),
    IndefBytes(Vec<Vec<u8>>),
    Raw(Vec<u8>),
}

// ---------------------------------------------------------------------------
// Encoding the steps
// ---------------------------------------------------------------------------

/// The device an input plays.
#[derive(Debug, Clone)]
pub struct Device {
    pub id: String,
    pub token: String,
}

/// Nesting beyond this is cut short (the gateway's limits are tested by
/// `content.rs`; here it only costs stack).
const MAX_DEPTH: usize = 24;

fn json_value(j: &Json, depth: usize) -> serde_json::Value {
    use serde_json::Value;
    if depth > MAX_DEPTH {
        return Value::Null;
    }
    match j {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Bool(*b),
        Json::Int(i) => Value::from(*i),
        // Non-finite floats become null: JSON has none.
        Json::Float(f) => Value::from(*f),
        Json::Str(s) => Value::String(s.clone()),
        Json::Arr(v) => Value::Array(v.iter().map(|j| json_value(j, depth + 1)).collect()),
        Json::Obj(v) => Value::Object(
            v.iter()
                .map(|(k, j)| (k.clone(), json_value(j, depth + 1)))
                .collect(),
        ),
    }
}

fn cbor_head(out: &mut Vec<u8>, major: u8, val: u64) {
    let m = major << 5;
    match val {
        0..=23 => out.push(m | val as u8),
        24..=0xFF => out.extend_from_slice(&[m | 24, val as u8]),
        0x100..=0xFFFF => {
            out.push(m | 25);
            out.extend_from_slice(&(val as u16).to_be_bytes());
        }
        0x1_0000..=0xFFFF_FFFF => {
            out.push(m | 26);
            out.extend_from_slice(&(val as u32).to_be_bytes());
        }
        _ => {
            out.push(m | 27);
            out.extend_from_slice(&val.to_be_bytes());
        }
    }
}

fn cbor_bytes(c: &Cbor, out: &mut Vec<u8>, depth: usize) {
    if depth > MAX_DEPTH {
        out.push(0xf6); // null
        return;
    }
    match c {
        Cbor::Uint(v) => cbor_head(out, 0, *v),
        Cbor::Nint(v) => cbor_head(out, 1, *v),
        Cbor::Bytes(b) => {
            cbor_head(out, 2, b.len() as u64);
            out.extend_from_slice(b);
        }
        Cbor::Text(s) => {
            cbor_head(out, 3, s.len() as u64);
            out.extend_from_slice(s.as_bytes());
        }
        Cbor::Arr(v) => {
            cbor_head(out, 4, v.len() as u64);
            v.iter().for_each(|c| cbor_bytes(c, out, depth + 1));
        }
        Cbor::Map(v) => {
            cbor_head(out, 5, v.len() as u64);
            for (k, c) in v {
                cbor_bytes(k, out, depth + 1);
                cbor_bytes(c, out, depth + 1);
            }
        }
        Cbor::Tag(t, c) => {
            cbor_head(out, 6, *t);
            cbor_bytes(c, out, depth + 1);
        }
        Cbor::Simple(s) => cbor_head(out, 7, u64::from(*s)),
        Cbor::F64(f) => {
            out.push(0xfb);
            out.extend_from_slice(&f.to_bits().to_be_bytes());
        }
        Cbor::IndefArr(v) => {
            out.push(0x9f);
            v.iter().for_each(|c| cbor_bytes(c, out, depth + 1));
            out.push(0xff);
        }
        Cbor::IndefBytes(chunks) => {
            out.push(0x5f);
            for b in chunks {
                cbor_head(out, 2, b.len() as u64);
                out.extend_from_slice(b);
            }
            out.push(0xff);
        }
        Cbor::Raw(b) => out.extend_from_slice(b),
    }
}

/// The payload's bytes and the content type that matches them.
fn payload_bytes(p: &Payload) -> (u8, Vec<u8>) {
    match p {
        Payload::Json(j) => (1, serde_json::to_vec(&json_value(j, 0)).unwrap_or_default()),
        Payload::JsonText(s) => (1, s.as_bytes().to_vec()),
        Payload::Cbor(c) => {
            let mut out = Vec::new();
            cbor_bytes(c, &mut out, 0);
            (2, out)
        }
        Payload::Text(s) => (3, s.as_bytes().to_vec()),
        Payload::Bytes(b) => (0, b.clone()),
    }
}

fn put_str(dst: &mut BytesMut, s: &[u8]) {
    let s = &s[..s.len().min(usize::from(u16::MAX))];
    dst.put_u16(s.len() as u16);
    dst.put_slice(s);
}

fn put_frame(dst: &mut BytesMut, kind: u8, flags: u8, body: &[u8]) {
    dst.put_u32(body.len() as u32 + 2);
    dst.put_u8(kind);
    dst.put_u8(flags);
    dst.put_slice(body);
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Encodes one connection's steps; `hi` is the highest seq used so far.
pub fn encode_steps(steps: &[Step], dev: &Device, hi: &mut u64) -> Vec<u8> {
    let mut out = BytesMut::new();
    for step in steps.iter().take(MAX_STEPS) {
        match step {
            Step::Hello { keepalive_s } => {
                let m = hello(dev, dev.token.as_str(), *keepalive_s);
                m.encode(&mut out).expect("HELLO encodes");
            }
            Step::HelloWrongToken { token } => {
                let mut t = truncate_utf8(token, 255).to_owned();
                if t == dev.token {
                    t.push('x');
                }
                hello(dev, &t, 0).encode(&mut out).expect("HELLO encodes");
            }
            Step::HelloRaw {
                version,
                keepalive_s,
                own_id,
                device_id,
                token,
            } => {
                let mut body = BytesMut::new();
                body.put_u8(*version);
                body.put_u16(*keepalive_s);
                put_str(
                    &mut body,
                    if *own_id {
                        dev.id.as_bytes()
                    } else {
                        device_id
                    },
                );
                put_str(&mut body, token);
                put_frame(&mut out, MessageType::Hello as u8, 0, &body);
            }
            Step::Telemetry {
                seq,
                timestamp_ms,
                content_type,
                payload,
            } => {
                let seq = match seq {
                    SeqStep::Next => hi.saturating_add(1),
                    SeqStep::Same => *hi,
                    SeqStep::Back(n) => hi.saturating_sub(u64::from(*n)),
                    SeqStep::Jump(n) => hi.saturating_add(u64::from(*n) + 1),
                    SeqStep::Zero => 0,
                    SeqStep::Raw(s) => *s,
                };
                *hi = (*hi).max(seq);
                let (ct, bytes) = payload_bytes(payload);
                let ct = content_type.unwrap_or(ct);
                encode_telemetry(seq, *timestamp_ms, ct, &bytes, &mut out).expect("encodes");
            }
            Step::Ping { nonce } => Message::Ping { nonce: *nonce }.encode(&mut out).unwrap(),
            Step::Pong { nonce } => Message::Pong { nonce: *nonce }.encode(&mut out).unwrap(),
            Step::CommandResult {
                command_id,
                status,
                content_type,
                payload,
            } => {
                let mut body = BytesMut::new();
                body.put_u64(*command_id);
                body.put_u8(*status);
                body.put_u8(*content_type);
                body.put_slice(payload);
                put_frame(&mut out, MessageType::CommandResult as u8, 0, &body);
            }
            Step::Goodbye {
                code,
                retry_after_ms,
            } => Message::Goodbye(Goodbye {
                code: *code,
                retry_after_ms: *retry_after_ms,
            })
            .encode(&mut out)
            .unwrap(),
            Step::Frame { kind, flags, body } => put_frame(&mut out, *kind, *flags, body),
            Step::Header { len, kind, flags } => {
                out.put_u32(*len);
                out.put_u8(*kind);
                out.put_u8(*flags);
            }
            Step::Garbage(b) => out.put_slice(b),
        }
    }
    out.to_vec()
}

fn hello(dev: &Device, token: &str, keepalive_s: u16) -> Message {
    Message::Hello(Hello {
        version: furrow_proto::VERSION,
        keepalive_s,
        device_id: Str::from(dev.id.as_str()),
        token: Str::from(token),
        capabilities: None,
    })
}

// ---------------------------------------------------------------------------
// What the spec says the gateway answers
// ---------------------------------------------------------------------------

/// How a connection must end, simulated from the bytes the device wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// No complete first frame: the gateway says nothing and closes.
    Silence,
    /// The handshake fails: exactly this ERROR.
    HandshakeError(ErrorCode),
    /// WELCOME, then the session ends as `end` says.
    Session(Session),
}

/// A session's expected course.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Session {
    /// The HELLO's keepalive request.
    pub keepalive_s: u16,
    /// TELEMETRY seqs the gateway reads (parsed ones, in order).
    pub seqs: Vec<u64>,
    /// PING nonces the gateway reads, in order.
    pub pings: Vec<u64>,
    /// The ERROR the first bad frame earns, if one comes.
    pub error: Option<ErrorCode>,
}

/// Simulates the gateway's reading of `wire` (docs/protocol.md).
pub fn expect(wire: &[u8], dev: &Device) -> Expect {
    let dec = FrameDecoder::new(MAX_FRAME);
    let mut buf = BytesMut::from(wire);
    let first = match dec.decode(&mut buf) {
        Err(e) => return Expect::HandshakeError(e.code()),
        Ok(None) => return Expect::Silence,
        Ok(Some(f)) => f,
    };
    if first.kind != MessageType::Hello {
        return Expect::HandshakeError(ErrorCode::ProtocolError);
    }
    let hello = match Message::from_frame(first) {
        Ok(Message::Hello(h)) => h,
        Ok(_) => unreachable!("a HELLO frame parses as HELLO"),
        Err(e) => return Expect::HandshakeError(e.code()),
    };
    if hello.device_id.as_str() != dev.id || hello.token.as_str() != dev.token {
        return Expect::HandshakeError(ErrorCode::AuthFailed);
    }
    let mut s = Session {
        keepalive_s: hello.keepalive_s,
        ..Session::default()
    };
    loop {
        let f = match dec.decode(&mut buf) {
            Err(e) => {
                s.error = Some(e.code());
                break;
            }
            Ok(None) => break,
            Ok(Some(f)) => f,
        };
        if !f.kind.sent_by_device() || f.kind == MessageType::Hello {
            s.error = Some(ErrorCode::ProtocolError);
            break;
        }
        match Message::from_frame(f) {
            Err(e) => {
                s.error = Some(e.code());
                break;
            }
            Ok(Message::Telemetry(t)) => s.seqs.push(t.seq),
            Ok(Message::Ping { nonce }) => s.pings.push(nonce),
            Ok(Message::Goodbye(_)) => break,
            Ok(_) => {}
        }
    }
    Expect::Session(s)
}

// ---------------------------------------------------------------------------
// The gateway
// ---------------------------------------------------------------------------

/// The process's gateway and the runtime it runs on.
pub struct Env {
    rt: Runtime,
    addr: SocketAddr,
    store: Arc<dyn Store>,
    cfg: Config,
    devices: AtomicU64,
    runs: AtomicU64,
}

static ENV: OnceLock<Env> = OnceLock::new();

/// The gateway, started on first use.
pub fn env() -> &'static Env {
    ENV.get_or_init(Env::start)
}

const DIR_PREFIX: &str = "furrow-fuzz-session-";

/// Removes data directories left by earlier processes (a static is never
/// dropped, so each process leaves its own behind).
fn remove_stale_dirs(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(DIR_PREFIX)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// The gateway's configuration in the harness.
pub fn config(data_dir: PathBuf) -> Config {
    let mut cfg = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir,
        ..Config::default()
    };
    cfg.api.enabled = false;
    cfg.limits.max_frame = MAX_FRAME;
    cfg.limits.max_inflight = MAX_INFLIGHT;
    cfg.limits.handshake_timeout_ms = 2_000;
    cfg.limits.read_chunk_bytes = 512;
    cfg.limits.max_unsent_bytes = 1024;
    cfg.storage.synchronous = Synchronous::Off;
    cfg.storage.queue_capacity = 2;
    cfg.sessions.takeover_wait_ms = 3_000;
    cfg.shutdown.drain_timeout_ms = 3_000;
    // The harness checks the protocol, not the abuse limits (tests/limits.rs
    // does): wrong tokens by the thousand must not delay failures, nor a
    // burst of connections or frames be throttled.
    cfg.limits.auth_failures_free = u32::MAX;
    cfg.limits.connect_rate_per_ip = 0;
    cfg.limits.telemetry_rate_per_device = 0;
    cfg.validate().expect("the harness configuration is valid");
    cfg
}

impl Env {
    fn start() -> Self {
        // One worker for the gateway; the harness drives its own futures
        // from the calling thread (`block_on`).
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        // Installs the Prometheus recorder, so panics are counted.
        let _ = furrow::metrics::handle();
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        remove_stale_dirs(&base);
        let dir = base.join(format!(
            "{DIR_PREFIX}{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        let cfg = config(dir);
        let (addr, store) = rt.block_on(async {
            let server = furrow::Server::bind(cfg.clone())
                .await
                .expect("the gateway binds");
            let addr = server.local_addr();
            let store = server.store();
            tokio::spawn(server.run(std::future::pending::<()>()));
            (addr, store)
        });
        Self {
            rt,
            addr,
            store,
            cfg,
            devices: AtomicU64::new(0),
            runs: AtomicU64::new(0),
        }
    }

    /// Provisions a fresh device.
    async fn device(&self) -> Device {
        let n = self.devices.fetch_add(1, Ordering::Relaxed);
        let id = format!("fz-{n}");
        let token = furrow::devices::add_device(&*self.store, &id)
            .await
            .expect("device provisioned");
        Device { id, token }
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish()
}

/// `furrow_connection_panics_total` as rendered for /metrics (0 if absent).
pub fn panics_counted() -> u64 {
    furrow::metrics::handle()
        .render()
        .lines()
        .filter(|l| l.starts_with("furrow_connection_panics_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

// ---------------------------------------------------------------------------
// Playing an input
// ---------------------------------------------------------------------------

/// What came back on one connection.
#[derive(Debug)]
pub struct Answer {
    /// Every byte the gateway sent.
    pub bytes: Vec<u8>,
    /// The gateway closed (EOF or reset) within [`CLOSE_WAIT`].
    pub closed: bool,
    /// The connection was reset: the last bytes may be lost.
    pub reset: bool,
}

struct Open {
    wr: tokio::net::tcp::OwnedWriteHalf,
    reader: JoinHandle<Answer>,
}

impl Open {
    async fn start(addr: SocketAddr, wire: &[u8]) -> Self {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let _ = stream.set_nodelay(true);
        let (mut rd, mut wr) = stream.into_split();
        let reader = tokio::spawn(async move {
            let mut bytes = Vec::new();
            let mut chunk = vec![0u8; 4096];
            let deadline = tokio::time::Instant::now() + CLOSE_WAIT + CLOSE_WAIT;
            loop {
                match tokio::time::timeout_at(deadline, rd.read(&mut chunk)).await {
                    Err(_) => {
                        return Answer {
                            bytes,
                            closed: false,
                            reset: false,
                        }
                    }
                    Ok(Ok(0)) => {
                        return Answer {
                            bytes,
                            closed: true,
                            reset: false,
                        }
                    }
                    Ok(Ok(n)) => bytes.extend_from_slice(&chunk[..n]),
                    Ok(Err(_)) => {
                        return Answer {
                            bytes,
                            closed: true,
                            reset: true,
                        }
                    }
                }
            }
        });
        // The gateway may close (ERROR) before taking everything: a failed
        // write is part of the game.
        let _ = tokio::time::timeout(CLOSE_WAIT, wr.write_all(wire)).await;
        Self { wr, reader }
    }

    async fn finish(mut self) -> Answer {
        let _ = self.wr.shutdown().await;
        let a = self.reader.await.expect("reader task");
        drop(self.wr);
        a
    }
}

/// One connection's plan.
struct Plan {
    wire: Vec<u8>,
    expect: Expect,
    /// Another connection of the device says a good HELLO while this one
    /// is open: it may be taken over.
    may_be_taken_over: bool,
}

/// Plays one input against the process's gateway and checks everything.
pub fn run_one(input: &Input) {
    let env = env();
    let n = env.runs.fetch_add(1, Ordering::Relaxed) + 1;
    env.rt.block_on(play(env, input));
    let panics = panics_counted();
    assert_eq!(
        panics, 0,
        "the gateway caught {panics} panic(s) in sessions"
    );
    if n.is_multiple_of(HEALTH_EVERY) {
        health_check();
    }
}

async fn play(env: &Env, input: &Input) {
    let dev = env.device().await;
    let conns = &input.conns[..input.conns.len().min(MAX_CONNS)];
    let mut hi = 0u64;
    let mut plans: Vec<Plan> = conns
        .iter()
        .map(|c| {
            let wire = encode_steps(&c.steps, &dev, &mut hi);
            let expect = expect(&wire, &dev);
            Plan {
                wire,
                expect,
                may_be_taken_over: false,
            }
        })
        .collect();
    // Overlapping sessions of one device: either may take the other over
    // (the gateway may read the later HELLO first).
    for i in 0..plans.len().saturating_sub(1) {
        if conns[i].overlap_next
            && matches!(plans[i].expect, Expect::Session(_))
            && matches!(plans[i + 1].expect, Expect::Session(_))
        {
            plans[i].may_be_taken_over = true;
            plans[i + 1].may_be_taken_over = true;
        }
    }
    let mut prev: Option<(Open, usize)> = None;
    for (i, plan) in plans.iter().enumerate() {
        let open = Open::start(env.addr, &plan.wire).await;
        if let Some((p, j)) = prev.take() {
            check_answer(&plans[j], &p.finish().await, &env.cfg);
        }
        if conns[i].overlap_next && i + 1 < plans.len() {
            prev = Some((open, i));
        } else {
            check_answer(plan, &open.finish().await, &env.cfg);
        }
    }
    if let Some((p, j)) = prev {
        check_answer(&plans[j], &p.finish().await, &env.cfg);
    }
}

/// Checks the bytes a session answered before closing cleanly (no
/// takeover) against the spec: for replays that run without sockets.
pub fn check_reply(expect: &Expect, bytes: &[u8], cfg: &Config) {
    let plan = Plan {
        wire: Vec::new(),
        expect: expect.clone(),
        may_be_taken_over: false,
    };
    let ans = Answer {
        bytes: bytes.to_vec(),
        closed: true,
        reset: false,
    };
    check_answer(&plan, &ans, cfg);
}

/// Checks one connection's answer against the spec.
fn check_answer(plan: &Plan, ans: &Answer, cfg: &Config) {
    let ctx = || format!("expected {:?}, got {:?}", plan.expect, ans);
    assert!(
        ans.closed,
        "the gateway did not close within {CLOSE_WAIT:?} of the device's EOF; {}",
        ctx()
    );
    // Every byte is a well-formed gateway frame.
    let mut buf = BytesMut::from(&ans.bytes[..]);
    let dec = FrameDecoder::new(u32::MAX);
    let mut msgs = Vec::new();
    loop {
        match dec.decode(&mut buf) {
            Ok(Some(f)) => {
                assert!(
                    f.kind.sent_by_gateway(),
                    "the gateway sent {}; {}",
                    f.kind.name(),
                    ctx()
                );
                match Message::from_frame(f) {
                    Ok(m) => msgs.push(m),
                    Err(e) => panic!("the gateway sent a malformed body: {e}; {}", ctx()),
                }
            }
            Ok(None) => break,
            Err(e) => panic!("the gateway sent a malformed frame: {e}; {}", ctx()),
        }
    }
    if !ans.reset {
        assert!(buf.is_empty(), "the gateway closed mid-frame; {}", ctx());
    }
    // ERROR and GOODBYE end the conversation.
    if let Some(i) = msgs
        .iter()
        .position(|m| matches!(m, Message::Error(_) | Message::Goodbye(_)))
    {
        assert_eq!(i + 1, msgs.len(), "frames after ERROR/GOODBYE; {}", ctx());
    }
    let taken_over = matches!(
        msgs.last(),
        Some(Message::Goodbye(Goodbye { code, .. })) if *code == GoodbyeCode::SessionTakenOver as u16
    );
    assert!(
        !taken_over || plan.may_be_taken_over,
        "taken over with no other session; {}",
        ctx()
    );
    match &plan.expect {
        Expect::Silence => assert!(msgs.is_empty(), "{}", ctx()),
        Expect::HandshakeError(code) => {
            if !ans.reset || !msgs.is_empty() {
                assert!(
                    matches!(&msgs[..], [Message::Error(e)] if e.code == *code as u16),
                    "handshake answer; {}",
                    ctx()
                );
            }
        }
        Expect::Session(s) => check_session(s, &msgs, ans, taken_over, cfg, &ctx),
    }
}

fn check_session(
    s: &Session,
    msgs: &[Message],
    ans: &Answer,
    taken_over: bool,
    cfg: &Config,
    ctx: &dyn Fn() -> String,
) {
    if ans.reset && msgs.is_empty() {
        return;
    }
    match msgs.first() {
        Some(Message::Welcome(w)) => {
            assert_eq!(w.version, furrow_proto::VERSION);
            assert_eq!(w.keepalive_s, cfg.keepalive.effective(s.keepalive_s));
            assert_eq!(w.max_frame, MAX_FRAME);
            assert_eq!(w.max_inflight, MAX_INFLIGHT);
        }
        _ => panic!("a good HELLO did not get WELCOME first; {}", ctx()),
    }
    let mut last_ack = 0u64;
    let mut rejected = Vec::new();
    let mut pongs = Vec::new();
    for m in &msgs[1..] {
        match m {
            Message::Ack { seq } => {
                assert!(*seq >= last_ack, "ACK went backwards; {}", ctx());
                assert!(
                    s.seqs.contains(seq),
                    "ACK {seq} names a seq not sent; {}",
                    ctx()
                );
                last_ack = *seq;
            }
            Message::Reject(r) => {
                assert!(
                    s.seqs.contains(&r.seq),
                    "REJECT of a seq not sent; {}",
                    ctx()
                );
                assert!(
                    r.seq > last_ack,
                    "REJECT {} after an ACK covering it; {}",
                    r.seq,
                    ctx()
                );
                assert!(
                    [
                        ErrorCode::InvalidPayload as u16,
                        ErrorCode::UnsupportedContentType as u16
                    ]
                    .contains(&r.code),
                    "{}",
                    ctx()
                );
                rejected.push(r.seq);
            }
            Message::Pong { nonce } => pongs.push(*nonce),
            Message::Error(e) => {
                assert_eq!(
                    Some(e.code),
                    s.error.map(|c| c as u16),
                    "unexpected ERROR; {}",
                    ctx()
                );
            }
            Message::Goodbye(g) => {
                assert_eq!(g.code, GoodbyeCode::SessionTakenOver as u16, "{}", ctx());
            }
            other => panic!("unexpected {:?} in a session; {}", other.kind(), ctx()),
        }
    }
    if ans.reset || taken_over {
        return;
    }
    // Whatever the gateway read, it answered.
    assert!(
        s.pings.starts_with(&pongs),
        "PONGs do not follow the PINGs; {}",
        ctx()
    );
    match s.error {
        Some(code) => {
            assert!(
                matches!(msgs.last(), Some(Message::Error(e)) if e.code == code as u16),
                "the ERROR {code:?} the stream earns did not come; {}",
                ctx()
            );
            assert_eq!(pongs, s.pings, "PINGs unanswered; {}", ctx());
        }
        None => {
            let max = s.seqs.iter().copied().max().unwrap_or(0);
            assert_eq!(last_ack, max, "TELEMETRY left unacknowledged; {}", ctx());
            assert_eq!(pongs, s.pings, "PINGs unanswered; {}", ctx());
        }
    }
}

/// A fresh device still gets WELCOME, an ACK and a clean close.
pub fn health_check() {
    let env = env();
    env.rt.block_on(async {
        let dev = env.device().await;
        let mut wire = BytesMut::new();
        hello(&dev, &dev.token, 30).encode(&mut wire).unwrap();
        encode_telemetry(1, 0, 1, br#"{"ok":true}"#, &mut wire).unwrap();
        Message::Goodbye(Goodbye {
            code: 0,
            retry_after_ms: 0,
        })
        .encode(&mut wire)
        .unwrap();
        let ans = Open::start(env.addr, &wire).await.finish().await;
        assert!(ans.closed && !ans.reset, "health check: {ans:?}");
        let mut buf = BytesMut::from(&ans.bytes[..]);
        let dec = FrameDecoder::new(u32::MAX);
        let mut msgs = Vec::new();
        while let Some(f) = dec.decode(&mut buf).expect("well-formed") {
            msgs.push(Message::from_frame(f).expect("well-formed"));
        }
        assert!(
            matches!(&msgs[..], [Message::Welcome(_), Message::Ack { seq: 1 }]),
            "health check: a fresh session got {msgs:?}"
        );
    });
    assert_eq!(panics_counted(), 0);
}

/// Random bytes as an input whose connections start with a good HELLO
/// where `hello_first` says so (random bytes seldom spell one, so cases
/// then reach the active session); `None` if the bytes make no input.
pub fn input_with_hellos(data: &[u8], hello_first: &[bool]) -> Option<Input> {
    let mut input = input_from_bytes(data)?;
    while input.conns.len() < hello_first.len() {
        input.conns.push(Conn {
            steps: Vec::new(),
            overlap_next: false,
        });
    }
    for (conn, hello) in input.conns.iter_mut().zip(hello_first) {
        if *hello {
            conn.steps.insert(0, Step::Hello { keepalive_s: 0 });
        }
    }
    Some(input)
}

/// Bytes as a fuzz input for `Input` (as libfuzzer-sys builds it).
pub fn input_from_bytes(data: &[u8]) -> Option<Input> {
    use arbitrary::Unstructured;
    Input::arbitrary_take_rest(Unstructured::new(data)).ok()
}
