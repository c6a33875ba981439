//! Configuration: defaults, then a TOML file, then `FURROW_*` environment
//! variables, then command-line flags (the last one wins).
//!
//! Every key has a safe default, so `furrow serve` runs with no file at all.
//! Unknown keys are errors, never ignored: a typo must not silently leave a
//! limit at its default. Nested keys come from the environment with a
//! double underscore: `FURROW_STORAGE__SYNCHRONOUS=normal` sets
//! `storage.synchronous`. `furrow check-config` loads and validates without
//! starting.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::store::Synchronous;

/// The whole gateway configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This gateway instance's name, shown with its devices and (with
    /// several instances) used to route to them. Empty: the host name.
    pub instance_id: String,
    /// Device listener address.
    pub listen: SocketAddr,
    /// Set SO_REUSEPORT on the device listener, so that several gateway
    /// processes on one machine (each with this set) share its port and the
    /// kernel spreads connections among them.
    pub reuse_port: bool,
    /// Where the database lives.
    pub data_dir: PathBuf,
    /// Empty: the embedded SQLite database in `data_dir` (one instance).
    /// `postgres://user:password@host:port/db`: a PostgreSQL database that
    /// several instances share (`--database`).
    pub database_url: String,
    /// Per-connection limits.
    pub limits: Limits,
    /// Keepalive bounds.
    pub keepalive: Keepalive,
    /// Storage and group commit.
    pub storage: Storage,
    /// Session coordination.
    pub sessions: Sessions,
    /// Graceful shutdown.
    pub shutdown: Shutdown,
    /// The operator's HTTP API and /metrics.
    pub api: Api,
    /// Events to an MQTT broker.
    pub mqtt: Mqtt,
    /// The TLS device listener (off until a certificate is set).
    pub tls: Tls,
    /// The QUIC device listener (off until `quic.listen` is set).
    pub quic: Quic,
    /// PROXY protocol headers from a load balancer.
    pub proxy_protocol: ProxyProtocol,
    /// Device credentials.
    pub devices: Devices,
    /// Device state (desired and reported documents).
    pub state: State,
    /// Firmware images and their transfer to devices.
    pub firmware: Firmware,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            instance_id: String::new(),
            listen: SocketAddr::from(([0, 0, 0, 0], 7700)),
            reuse_port: false,
            data_dir: PathBuf::from("./furrow-data"),
            database_url: String::new(),
            limits: Limits::default(),
            keepalive: Keepalive::default(),
            storage: Storage::default(),
            sessions: Sessions::default(),
            shutdown: Shutdown::default(),
            api: Api::default(),
            mqtt: Mqtt::default(),
            tls: Tls::default(),
            quic: Quic::default(),
            proxy_protocol: ProxyProtocol::default(),
            devices: Devices::default(),
            state: State::default(),
            firmware: Firmware::default(),
        }
    }
}

/// Firmware over the air (docs/protocol.md, "Firmware updates").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Firmware {
    /// Largest image `POST /v1/firmware` takes (413 above it).
    pub max_image_bytes: u64,
    /// Longest range one CHUNK_REQUEST may ask for (FIRMWARE_OFFER's
    /// `chunk_max`), never more than a frame carries (65,490 bytes at the
    /// default `limits.max_frame`).
    pub chunk_max: u32,
    /// CHUNK_REQUESTs a device may have unanswered (the offer's `window`).
    pub window: u16,
    /// Devices of one firmware job downloading at once on this instance,
    /// when the job does not say (`max_downloads`).
    pub max_downloads: u32,
    /// Memory for images being served (least recently used out); at least
    /// `max_image_bytes`.
    pub cache_bytes: u64,
    /// Firmware bytes this instance sends per second, all devices together
    /// (0: no limit). Past it, chunk requests wait: a rollout takes a
    /// bounded share of CPU and uplink and telemetry keeps its latency.
    pub max_bytes_per_s: u64,
    /// The operator's Ed25519 key (PKCS#8, from `furrow firmware keygen`):
    /// uploads without a signature are signed with it. Empty: every upload
    /// brings its signature.
    pub signing_key_file: PathBuf,
    /// Public keys (64 hex digits) whose signatures uploads may carry, in
    /// addition to the signing key's own.
    pub trusted_keys: Vec<String>,
}

impl Default for Firmware {
    fn default() -> Self {
        Self {
            max_image_bytes: 64 << 20,
            chunk_max: 64 << 10,
            window: 4,
            max_downloads: 200,
            cache_bytes: 256 << 20,
            max_bytes_per_s: 128 << 20,
            signing_key_file: PathBuf::new(),
            trusted_keys: Vec::new(),
        }
    }
}

impl Config {
    /// The chunk length in force: `firmware.chunk_max`, and never more
    /// than a CHUNK frame carries (46 bytes of header fields).
    pub fn chunk_max(&self) -> u32 {
        self.firmware
            .chunk_max
            .min(self.limits.max_frame.saturating_sub(46))
    }
}

/// Device state limits (docs/protocol.md, "Device state").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct State {
    /// Largest desired or reported document, and patch, in bytes of
    /// compact JSON. Over it: REJECT STATE_TOO_LARGE for a REPORT, 413 for
    /// an API patch.
    pub max_bytes: usize,
    /// Deepest nesting of objects and arrays in a document (`{}` is 1).
    pub max_depth: usize,
    /// REPORTs per second one device may send; past it (and its burst) the
    /// gateway stops reading it until the rate allows more. 0: no limit.
    pub report_rate_per_s: u32,
    /// REPORTs a device may send at once before the rate applies.
    pub report_burst: u32,
}

impl Default for State {
    fn default() -> Self {
        Self {
            max_bytes: 8192,
            max_depth: 8,
            report_rate_per_s: 10,
            report_burst: 20,
        }
    }
}

impl Config {
    /// The document limits in force: `state.max_bytes`, and never more
    /// than a frame can carry (a whole desired document travels in one
    /// DESIRED frame: 16 bytes of header and version).
    pub fn state_limits(&self) -> crate::devices::state::StateLimits {
        let frame = (self.limits.max_frame as usize).saturating_sub(16);
        crate::devices::state::StateLimits {
            max_bytes: self.state.max_bytes.min(frame),
            max_depth: self.state.max_depth,
        }
    }
}

/// Device credentials.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Devices {
    /// After a token rotation, how long the old token still opens the
    /// device, unless the device authenticates with the new one first
    /// (then the old one stops at once). The API's `grace_s` overrides it
    /// per rotation; 0: the old token stops working at once.
    pub token_grace_s: u64,
}

impl Default for Devices {
    fn default() -> Self {
        Self {
            token_grace_s: 7 * 24 * 3600,
        }
    }
}

/// Per-connection limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest accepted value of a frame's length field (announced in WELCOME).
    pub max_frame: u32,
    /// Unacknowledged TELEMETRY a device may have outstanding (announced in WELCOME).
    pub max_inflight: u16,
    /// Time from accept until the whole HELLO must have arrived (beyond:
    /// ERROR HANDSHAKE_TIMEOUT) and the device's lookup answered (beyond:
    /// ERROR BUSY, before anything is claimed for it).
    pub handshake_timeout_ms: u64,
    /// Bytes read from a socket at a time. Allocated only while data flows:
    /// an idle connection holds no read buffer.
    pub read_chunk_bytes: usize,
    /// Outgoing bytes a connection may have unsent before the gateway stops
    /// reading it (a device that never reads its ACKs).
    pub max_unsent_bytes: usize,
    /// Connections the kernel may hold completed but not yet accepted
    /// (the listen backlog; Linux caps it at net.core.somaxconn). Too small
    /// and a reconnect storm loses SYNs, which devices retry only after a
    /// second.
    pub listen_backlog: u32,
    /// Connections held at once, in any phase. Beyond it a new connection
    /// gets ERROR BUSY and is closed before a session exists.
    pub max_connections: usize,
    /// New connections a second from one source address (an IPv6 /64),
    /// judged on the PROXY header's address behind a balancer. Beyond it:
    /// ERROR BUSY. 0: off.
    pub connect_rate_per_ip: u32,
    /// New connections one address may open at once before the rate
    /// applies (devices behind one NAT reconnect together after a restart).
    pub connect_burst_per_ip: u32,
    /// TELEMETRY frames a second one device may send. Beyond it the gateway
    /// reads its socket more slowly (flow control, nothing dropped). 0: off.
    pub telemetry_rate_per_device: u32,
    /// TELEMETRY frames a device may send at once before the rate applies.
    pub telemetry_burst_per_device: u32,
    /// Failed authentications of an address or device id answered at once.
    pub auth_failures_free: u32,
    /// Wait before answering the first failure past the free ones; it
    /// doubles with each further failure...
    pub auth_delay_base_ms: u64,
    /// ...up to this.
    pub auth_delay_max_ms: u64,
    /// Failed answers being delayed at once, at most. Beyond it a failure
    /// is answered at once: a flood of wrong tokens cannot fill
    /// `max_connections` with connections held for their delay. 0: no
    /// failure is delayed.
    pub auth_delayed_max: usize,
    /// No longer used, accepted so that older configuration files load
    /// (with a warning): bans refused devices with valid credentials
    /// (docs/security.md).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_ban_after: Option<u32>,
    /// No longer used; see `auth_ban_after`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_ban_ms: Option<u64>,
    /// Failures are forgotten after this long without another.
    pub auth_window_ms: u64,
    /// Addresses (or device ids) each limit tracks at most; the least
    /// recently seen are forgotten first.
    pub tracked_keys_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame: furrow_proto::DEFAULT_MAX_FRAME,
            max_inflight: 256,
            handshake_timeout_ms: 10_000,
            read_chunk_bytes: 16 * 1024,
            max_unsent_bytes: 64 * 1024,
            listen_backlog: 4096,
            max_connections: 100_000,
            connect_rate_per_ip: 500,
            connect_burst_per_ip: 20_000,
            telemetry_rate_per_device: 10_000,
            telemetry_burst_per_device: 10_000,
            auth_failures_free: 5,
            auth_delay_base_ms: 500,
            auth_delay_max_ms: 10_000,
            auth_delayed_max: 1_024,
            auth_ban_after: None,
            auth_ban_ms: None,
            auth_window_ms: 600_000,
            tracked_keys_max: 65_536,
        }
    }
}

impl Limits {
    /// Checks the limits of `ingress/limits.rs` (those of a connection are checked
    /// with the rest in [`Config::validate`]).
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, message: &str| {
            Err(ConfigError::Invalid {
                key,
                message: message.into(),
            })
        };
        if self.max_connections == 0 {
            return bad("limits.max_connections", "must be at least 1");
        }
        if self.connect_rate_per_ip > 0 && self.connect_burst_per_ip == 0 {
            return bad("limits.connect_burst_per_ip", "must be at least 1");
        }
        if self.telemetry_rate_per_device > 0 && self.telemetry_burst_per_device == 0 {
            return bad("limits.telemetry_burst_per_device", "must be at least 1");
        }
        if self.auth_delay_max_ms < self.auth_delay_base_ms {
            return bad(
                "limits.auth_delay_max_ms",
                "must be at least limits.auth_delay_base_ms",
            );
        }
        if self.auth_window_ms == 0 {
            return bad("limits.auth_window_ms", "must be above 0");
        }
        if self.tracked_keys_max < 16 {
            return bad("limits.tracked_keys_max", "must be at least 16");
        }
        Ok(())
    }
}

/// Keepalive bounds, in seconds. A device's request is clamped into
/// `[min_s, max_s]`; 0 asks for `default_s`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Keepalive {
    /// Used when the device asks for 0.
    pub default_s: u16,
    /// Floor.
    pub min_s: u16,
    /// Ceiling.
    pub max_s: u16,
}

impl Default for Keepalive {
    fn default() -> Self {
        Self {
            default_s: 60,
            min_s: 5,
            max_s: 900,
        }
    }
}

impl Keepalive {
    /// The effective keepalive for a device's request (never 0).
    pub fn effective(&self, requested: u16) -> u16 {
        if requested == 0 {
            self.default_s
        } else {
            requested.clamp(self.min_s, self.max_s)
        }
    }
}

/// Storage and group commit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Storage {
    /// SQLite durability: `full` (default: an ACK survives power loss),
    /// `normal` or `off` (both logged as a warning at start).
    pub synchronous: Synchronous,
    /// A commit batch closes at this many rows...
    pub batch_max_rows: usize,
    /// ...or this many microseconds after its first row arrived.
    pub batch_delay_us: u64,
    /// Commits start at least this many microseconds apart: a row that
    /// arrives sooner after the previous commit started waits out the
    /// rest, with the rows that follow it, so that many quiet devices
    /// share one fsync. Never paid after a pause or by a full batch. The
    /// wait is timed to the tenth of a millisecond (a timerfd): 2,000
    /// spends about what Tokio's millisecond timer made of the old 1,000.
    pub min_commit_interval_us: u64,
    /// Writer queue capacity, in jobs (one job is one read's worth of
    /// telemetry from one connection). Room for the jobs that arrive while
    /// a commit runs: at 10,000 devices a job is one reading, and a full
    /// queue parks every session on the queue's semaphore, a second wake-up
    /// per message that saturated the gateway at 1,024 (docs/performance.md,
    /// "The writer queue").
    pub queue_capacity: usize,
    /// SQLite only: readings are indexed per device (sealed) once this many
    /// wait unindexed in memory, 24 bytes each (they are durable already;
    /// the bound is on memory and on the scan at the next start): the
    /// devices with the most go first...
    pub seal_rows: usize,
    /// ...or once a device's oldest has waited this long. A seal costs
    /// about one index page per device it takes, so a device waits for
    /// a posting's worth of readings: a minute of a quiet fleet.
    pub seal_after_ms: u64,
    /// Readings are stored in one table (SQLite) or partition (PostgreSQL)
    /// per span of arrival time (`1d`, `6h`, ...); retention drops whole
    /// ones, so this is its granularity.
    pub chunk_span: Span,
    /// Readings older than this are dropped, a whole chunk at a time, once
    /// every reading in the chunk is older (`30d`; `0`: kept forever).
    /// Each device's `last_seq` is kept.
    pub retention: Span,
    /// Oldest chunks are dropped while the database (SQLite) or the
    /// telemetry partitions (PostgreSQL) hold more than this many bytes
    /// (0: no cap). The newest chunk is never dropped.
    pub max_bytes: u64,
    /// SQLite only: below this much free space on the database's filesystem the gateway
    /// stops taking telemetry (devices stay connected and are slowed down
    /// by flow control; nothing is dropped) until space returns.
    pub min_free_bytes: u64,
    /// PostgreSQL only: connections in the pool (the telemetry writer has
    /// one more of its own, so that lookups never hold commits up).
    pub pool_size: usize,
    /// PostgreSQL only: how long to wait for a connection before a call
    /// fails (and is retried, for commits).
    pub connect_timeout_ms: u64,
}

impl Default for Storage {
    fn default() -> Self {
        Self {
            synchronous: Synchronous::Full,
            batch_max_rows: 8192,
            batch_delay_us: 0,
            min_commit_interval_us: 2_000,
            queue_capacity: 4096,
            seal_rows: 1_000_000,
            seal_after_ms: 60_000,
            chunk_span: Span::from_ms(86_400_000),
            retention: Span::OFF,
            max_bytes: 0,
            min_free_bytes: 128 << 20,
            pool_size: 16,
            connect_timeout_ms: 3_000,
        }
    }
}

/// A span of time as people write it: `30d`, `12h`, `90m`, `45s`, or `0`
/// (off). Stored in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span(u64);

impl Span {
    /// Off (zero).
    pub const OFF: Span = Span(0);

    /// A span of `ms` milliseconds.
    pub const fn from_ms(ms: u64) -> Self {
        Span(ms)
    }

    /// In milliseconds (0: off).
    pub fn ms(self) -> u64 {
        self.0
    }
}

impl std::str::FromStr for Span {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "0" {
            return Ok(Span(0));
        }
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().map_err(|_| {
            format!("{s:?}: expected a number and a unit (30d, 12h, 90m, 45s) or 0")
        })?;
        let per = match unit {
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
        };
        n.checked_mul(per)
            .map(Span)
            .ok_or_else(|| format!("{s:?} is too long"))
    }
}

impl std::fmt::Display for Span {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = self.0;
        for (unit, per) in [
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1_000),
        ] {
            if ms > 0 && ms.is_multiple_of(per) {
                return write!(f, "{}{unit}", ms / per);
            }
        }
        match ms {
            0 => write!(f, "0"),
            // Not a whole number of seconds: cannot be written back; shown
            // in seconds, rounded up.
            _ => write!(f, "{}s", ms.div_ceil(1_000)),
        }
    }
}

impl Serialize for Span {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Session coordination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Sessions {
    /// How long a new session waits for the one it takes over to store what
    /// it had read and close.
    pub takeover_wait_ms: u64,
    /// How often the gateway looks for devices revoked by another process
    /// (such as `furrow device revoke`).
    pub revocation_poll_ms: u64,
    /// PostgreSQL only: how often this instance records that it is alive.
    pub heartbeat_ms: u64,
    /// PostgreSQL only: an instance silent this long is gone; its devices'
    /// session records are cleared.
    pub instance_timeout_ms: u64,
    /// PostgreSQL only: how long a new session waits for the session it
    /// takes over on another instance to store what it read and close
    /// (then WELCOME's last_seq is exact; past it, duplicates are still
    /// refused by the store's key).
    pub remote_takeover_wait_ms: u64,
    /// A session with nothing in flight that has been quiet this long is
    /// parked: no task, no buffer, its socket on the parking epoll, until
    /// the device sends, its keepalive runs out or the gateway has
    /// something for it. A session woken for its device's frame parks
    /// again as soon as that is ACKed, unless the device is chatty. 0
    /// never parks. Short by default: the fewer sessions hold a task at
    /// once after a burst of connections, the less freed memory the
    /// allocator keeps (docs/performance.md, "Parking sooner").
    pub park_after_ms: u64,
    /// A device whose last two frames came less than this apart is chatty:
    /// its session parks only after this long quiet (at least
    /// `park_after_ms`), so that a device sending every second keeps its
    /// task instead of paying a wake-up for each message.
    pub park_chatty_ms: u64,
    /// Once this many session tasks, and at least half of them, have ended
    /// or parked since the busiest moment, or this many connections have
    /// opened since the last time and their burst is over (the last second
    /// brought at most an eighth of them), the gateway gives the heap pages
    /// they freed back to the system (glibc's malloc_trim, checked once a
    /// second) and SQLite empties its page caches. 0 never does.
    pub trim_after: usize,
}

impl Default for Sessions {
    fn default() -> Self {
        Self {
            park_after_ms: 5,
            park_chatty_ms: 2_000,
            trim_after: 256,
            takeover_wait_ms: 5_000,
            revocation_poll_ms: 1_000,
            heartbeat_ms: 1_000,
            instance_timeout_ms: 10_000,
            remote_takeover_wait_ms: 2_000,
        }
    }
}

/// Graceful shutdown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Shutdown {
    /// Longest wait for sessions to store, ACK and say GOODBYE.
    pub drain_timeout_ms: u64,
    /// GOODBYE SERVER_SHUTDOWN carries a random `retry_after_ms` up to this,
    /// so that devices do not all come back at the same instant.
    pub retry_after_max_ms: u32,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self {
            drain_timeout_ms: 10_000,
            retry_after_max_ms: 5_000,
        }
    }
}

/// The operator's HTTP API (and Prometheus /metrics).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Api {
    /// Serve the API at all.
    pub enabled: bool,
    /// Listen address. Loopback by default; any other address needs a token.
    pub listen: SocketAddr,
    /// Bearer token required by every route but /healthz and /readyz (at
    /// least 16 characters). Empty: no token, allowed on loopback only.
    /// Prefer FURROW_API__TOKEN to writing it into a file.
    pub token: String,
}

impl Default for Api {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 7780)),
            token: String::new(),
        }
    }
}

impl Config {
    /// `instance_id`, or the host name when it is empty.
    pub fn instance(&self) -> String {
        if !self.instance_id.is_empty() {
            return self.instance_id.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "furrow".to_owned())
    }
}

/// The QUIC device listener: furrow/1 on one bidirectional stream of a
/// QUIC connection (ALPN `furrow/1`), with the TLS listener's certificate,
/// client CA and reloads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Quic {
    /// UDP address of the QUIC listener. Unset: no QUIC. Needs
    /// `tls.cert_file` and `tls.key_file`.
    pub listen: Option<SocketAddr>,
    /// Session tickets remembered for resumption and 0-RTT, one per
    /// device (about 300 bytes each, more under mutual TLS, which keeps
    /// the client's certificate chain with it). Each ticket is good for
    /// one resumption: a replayed 0-RTT flight finds none. 0: no
    /// resumption, every QUIC handshake is a full one.
    pub session_cache: usize,
    /// Receive and send buffer of the QUIC listener's UDP socket, bytes:
    /// room for a reconnect storm's first flights, which UDP would drop
    /// (the kernel caps it at net.core.rmem_max / wmem_max unless the
    /// gateway holds CAP_NET_ADMIN). Larger absorbs larger storms; it is
    /// also a longer queue when the gateway is overloaded for good.
    pub socket_buffer_bytes: usize,
    /// Path MTU discovery: probe each connection's path for datagrams
    /// larger than QUIC's 1,200-byte floor (up to 1,452). Off by default:
    /// furrow/1 frames are small, and the probes cost every new
    /// connection datagrams that a reconnect storm pays for. On: fewer,
    /// larger datagrams for firmware transfers.
    pub mtu_discovery: bool,
}

impl Default for Quic {
    fn default() -> Self {
        Self {
            listen: None,
            session_cache: 100_000,
            socket_buffer_bytes: 16 * 1024 * 1024,
            mtu_discovery: false,
        }
    }
}

/// The TLS device listener (see `tls`). On when `cert_file` is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tls {
    /// TLS device listener address.
    pub listen: SocketAddr,
    /// PEM certificate chain (server certificate first). Empty: no TLS.
    pub cert_file: PathBuf,
    /// PEM private key of the certificate.
    pub key_file: PathBuf,
    /// PEM CA certificates of device (client) certificates. Set: mutual
    /// TLS, every TLS device must present a certificate from this CA whose
    /// identity equals its HELLO device_id (its token may then be empty).
    pub client_ca_file: PathBuf,
    /// Where a client certificate names its device: `cn` (subject common
    /// name) or `san` (first DNS or URI subject alternative name).
    pub identity: crate::ingress::tls::IdentityFrom,
    /// Longest TLS handshake, from accept.
    pub handshake_timeout_ms: u64,
    /// Keep the plain TCP listener (`listen`) beside the TLS one.
    pub plain: bool,
    /// How often the files are checked for changes (reloaded without a
    /// restart, like SIGHUP); 0: only on SIGHUP.
    pub watch_ms: u64,
    /// TLS sessions remembered for resumption (TLS 1.2 ids; 1.3 uses
    /// tickets, which need no memory here).
    pub session_cache: usize,
}

impl Default for Tls {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 7701)),
            cert_file: PathBuf::new(),
            key_file: PathBuf::new(),
            client_ca_file: PathBuf::new(),
            identity: crate::ingress::tls::IdentityFrom::Cn,
            handshake_timeout_ms: 10_000,
            plain: true,
            watch_ms: 5_000,
            session_cache: 10_000,
        }
    }
}

impl Tls {
    /// Whether the TLS listener runs.
    pub fn enabled(&self) -> bool {
        !self.cert_file.as_os_str().is_empty()
    }
}

/// `--tls-cert`, `--tls-key`, `--client-ca`, `--tls-listen`, as nested
/// `tls.*` keys.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TlsOverride {
    /// `--tls-listen`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// `--tls-cert`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// `--tls-key`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// `--client-ca`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<PathBuf>,
}

/// Events to an MQTT broker (see `publish`). Off unless `url` is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Mqtt {
    /// `mqtt://host[:port]`, or `mqtts://host[:port]` for TLS; empty: no
    /// events.
    pub url: String,
    /// With mqtts://: the CA (PEM) that signed the broker's certificate.
    pub ca_file: String,
    /// With mqtts://: a client certificate (PEM) to present, for brokers
    /// that require one; with `key_file`.
    pub cert_file: String,
    /// Its private key (PEM).
    pub key_file: String,
    /// Topics start with this.
    pub topic_prefix: String,
    /// 0 or 1.
    pub qos: u8,
    /// Empty: `furrow-<instance>`.
    pub client_id: String,
    /// Broker credentials (empty: none).
    pub username: String,
    /// Broker password.
    pub password: String,
    /// Events that may wait for the broker; beyond, they are counted and
    /// dropped (ingest never waits for the broker).
    pub queue_capacity: usize,
}

impl Default for Mqtt {
    fn default() -> Self {
        Self {
            url: String::new(),
            ca_file: String::new(),
            cert_file: String::new(),
            key_file: String::new(),
            topic_prefix: "furrow".into(),
            qos: 1,
            client_id: String::new(),
            username: String::new(),
            password: String::new(),
            queue_capacity: 10_000,
        }
    }
}

/// PROXY protocol (v1 or v2) on the device listener, for gateways behind a
/// TCP load balancer (see `proxy`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyProtocol {
    /// Every connection must start with a PROXY header; its source address
    /// becomes the session's peer.
    pub enabled: bool,
    /// Networks of the balancers allowed to send one. A connection from
    /// anywhere else is refused: a header can claim any address.
    pub trusted: Vec<IpNet>,
    /// Time from accept until the whole header must have arrived. The
    /// handshake deadline (`limits.handshake_timeout_ms`, also from accept)
    /// applies too, so the shorter one wins.
    pub header_timeout_ms: u64,
}

impl Default for ProxyProtocol {
    fn default() -> Self {
        Self {
            enabled: false,
            trusted: vec![
                // Constants: the prefix lengths are in range.
                IpNet::new_assert(
                    std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 0)),
                    8,
                ),
                IpNet::new_assert(std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST), 128),
            ],
            header_timeout_ms: 3_000,
        }
    }
}

/// The shortest admin token accepted.
pub const MIN_API_TOKEN: usize = 16;

/// Values from command-line flags; `None` leaves the layers below alone.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Overrides {
    /// `--listen`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// `--data-dir`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// `--mqtt URL`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mqtt: Option<MqttOverride>,
    /// `--database URL`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    /// `--tls-cert` and friends.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsOverride>,
    /// `--reuse-port`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reuse_port: Option<bool>,
    /// `--proxy-protocol`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<ProxyProtocolOverride>,
}

/// `--proxy-protocol`, as the nested key `proxy_protocol.enabled`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProxyProtocolOverride {
    /// Whether headers are required.
    pub enabled: bool,
}

/// `--mqtt URL`, as the nested key `mqtt.url`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MqttOverride {
    /// The broker URL.
    pub url: String,
}

/// A configuration that cannot be used. Messages name the source and key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file cannot be read.
    #[error("cannot read config file {path}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A key is unknown or has a value of the wrong kind.
    #[error("invalid configuration: {0}")]
    Parse(String),
    /// A value is out of range.
    #[error("invalid configuration: {key}: {message}")]
    Invalid {
        /// The dotted key.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

impl Config {
    /// Loads defaults, then `file` (if given), then `FURROW_*` variables,
    /// then `overrides`, and validates the result.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            // Figment treats a missing file as empty; a named file must exist.
            std::fs::metadata(path).map_err(|source| ConfigError::File {
                path: path.to_path_buf(),
                source,
            })?;
            fig = fig.merge(Toml::file_exact(path));
        }
        fig = fig
            .merge(Env::prefixed("FURROW_").split("__"))
            .merge(Serialized::defaults(overrides));
        let cfg: Config = fig.extract().map_err(|e| {
            ConfigError::Parse(
                e.into_iter()
                    // Figment names keys with their profile; there is one.
                    .map(|e| e.to_string().replace("key \"default.", "key \""))
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks ranges and relations between values.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, message: String| Err(ConfigError::Invalid { key, message });
        if self.quic.listen.is_some() && !self.tls.enabled() {
            return bad(
                "quic.listen",
                "QUIC needs the TLS certificate: set tls.cert_file and tls.key_file".into(),
            );
        }
        // The largest HELLO (128-byte id, 256-byte token) must fit.
        if self.limits.max_frame < 512 {
            return bad(
                "limits.max_frame",
                format!("{} is below 512", self.limits.max_frame),
            );
        }
        if self.limits.max_frame > 16 * 1024 * 1024 {
            return bad(
                "limits.max_frame",
                format!("{} is above 16 MiB", self.limits.max_frame),
            );
        }
        if !(self.database_url.is_empty()
            || self.database_url.starts_with("postgres://")
            || self.database_url.starts_with("postgresql://"))
        {
            return bad(
                "database_url",
                format!(
                    "{:?}: expected empty (SQLite in data_dir) or postgres://...",
                    redact_url(&self.database_url)
                ),
            );
        }
        if self.sessions.heartbeat_ms == 0
            || self.sessions.instance_timeout_ms < 3 * self.sessions.heartbeat_ms
        {
            return bad(
                "sessions.instance_timeout_ms",
                format!(
                    "{} must be at least 3 x sessions.heartbeat_ms ({}, above 0)",
                    self.sessions.instance_timeout_ms, self.sessions.heartbeat_ms
                ),
            );
        }
        let tls = &self.tls;
        if tls.enabled() && tls.key_file.as_os_str().is_empty() {
            return bad(
                "tls.key_file",
                "tls.cert_file is set: the key is needed too".into(),
            );
        }
        let stray =
            !tls.key_file.as_os_str().is_empty() || !tls.client_ca_file.as_os_str().is_empty();
        if !tls.enabled() && stray {
            return bad(
                "tls.cert_file",
                "a key or client CA is set without a certificate".into(),
            );
        }
        if !tls.enabled() && !tls.plain {
            return bad(
                "tls.plain",
                "false turns the plain listener off, but no TLS certificate is set".into(),
            );
        }
        if tls.handshake_timeout_ms == 0 {
            return bad("tls.handshake_timeout_ms", "must be above 0".into());
        }
        if self.storage.pool_size == 0 {
            return bad("storage.pool_size", "must be at least 1".into());
        }
        if self.state.max_depth == 0 {
            return bad("state.max_depth", "must be at least 1".into());
        }
        if self.state.max_bytes < 2 {
            return bad("state.max_bytes", "must be at least 2".into());
        }
        if self.state.report_rate_per_s > 0 && self.state.report_burst == 0 {
            return bad("state.report_burst", "must be at least 1".into());
        }
        if self.storage.connect_timeout_ms == 0 {
            return bad("storage.connect_timeout_ms", "must be above 0".into());
        }
        let fw = &self.firmware;
        if fw.chunk_max < 512 {
            return bad("firmware.chunk_max", "must be at least 512".into());
        }
        if fw.window == 0 {
            return bad("firmware.window", "must be at least 1".into());
        }
        if fw.max_image_bytes == 0 {
            return bad("firmware.max_image_bytes", "must be above 0".into());
        }
        if fw.cache_bytes < fw.max_image_bytes {
            return bad(
                "firmware.cache_bytes",
                "must be at least firmware.max_image_bytes (an image is served from memory)".into(),
            );
        }
        for k in &fw.trusted_keys {
            if let Err(e) = crate::firmware::parse_public_key(k) {
                return bad("firmware.trusted_keys", e.to_string());
            }
        }
        if self.limits.max_inflight == 0 {
            return bad("limits.max_inflight", "must be at least 1".into());
        }
        if self.limits.handshake_timeout_ms == 0 {
            return bad("limits.handshake_timeout_ms", "must be above 0".into());
        }
        if self.limits.read_chunk_bytes < 512 {
            return bad("limits.read_chunk_bytes", "must be at least 512".into());
        }
        if self.limits.max_unsent_bytes < 1024 {
            return bad("limits.max_unsent_bytes", "must be at least 1024".into());
        }
        if self.api.enabled && self.api.token.is_empty() && !self.api.listen.ip().is_loopback() {
            return bad(
                "api.token",
                format!(
                    "the API on {} (not loopback) needs a token: set api.token or FURROW_API__TOKEN",
                    self.api.listen
                ),
            );
        }
        if !self.api.token.is_empty() && self.api.token.chars().count() < MIN_API_TOKEN {
            return bad(
                "api.token",
                format!("must be at least {MIN_API_TOKEN} characters"),
            );
        }
        if !self.mqtt.url.is_empty() {
            if let Err(e) = crate::publish::mqtt::check(&self.mqtt) {
                return bad(e.key(), e.to_string());
            }
        }
        if self.mqtt.qos > 1 {
            return bad("mqtt.qos", format!("must be 0 or 1, got {}", self.mqtt.qos));
        }
        if self.mqtt.queue_capacity == 0 {
            return bad("mqtt.queue_capacity", "must be at least 1".into());
        }
        if self.limits.listen_backlog == 0 {
            return bad("limits.listen_backlog", "must be at least 1".into());
        }
        self.limits.validate()?;
        let k = &self.keepalive;
        if k.min_s == 0 || k.min_s > k.max_s || !(k.min_s..=k.max_s).contains(&k.default_s) {
            return bad(
                "keepalive",
                format!(
                    "need 1 <= min_s <= default_s <= max_s, got min_s={} default_s={} max_s={}",
                    k.min_s, k.default_s, k.max_s
                ),
            );
        }
        if self.storage.batch_max_rows == 0 {
            return bad("storage.batch_max_rows", "must be at least 1".into());
        }
        if self.storage.queue_capacity == 0 {
            return bad("storage.queue_capacity", "must be at least 1".into());
        }
        if self.storage.chunk_span.ms() < 60_000 {
            return bad("storage.chunk_span", "must be at least 1m".into());
        }
        let retention = self.storage.retention.ms();
        if retention > 0 && retention < self.storage.chunk_span.ms() {
            return bad(
                "storage.retention",
                format!(
                    "must be 0 (off) or at least storage.chunk_span ({}): readings are dropped a chunk at a time",
                    self.storage.chunk_span
                ),
            );
        }
        if self.storage.seal_rows == 0 {
            return bad("storage.seal_rows", "must be at least 1".into());
        }
        if self.storage.batch_delay_us > 1_000_000 {
            return bad("storage.batch_delay_us", "must be at most 1 s".into());
        }
        if self.storage.min_commit_interval_us > 1_000_000 {
            return bad(
                "storage.min_commit_interval_us",
                "must be at most 1 s".into(),
            );
        }
        if self.sessions.revocation_poll_ms == 0 {
            return bad("sessions.revocation_poll_ms", "must be above 0".into());
        }
        let p = &self.proxy_protocol;
        if p.header_timeout_ms == 0 {
            return bad("proxy_protocol.header_timeout_ms", "must be above 0".into());
        }
        if p.enabled && p.trusted.is_empty() {
            return bad(
                "proxy_protocol.trusted",
                "is empty: every connection would be refused".into(),
            );
        }
        Ok(())
    }

    /// The handshake deadline as a duration.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.limits.handshake_timeout_ms)
    }

    /// The SQLite database file inside the data directory.
    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("furrow.db")
    }

    /// Where the data lives, for the start-up log: the SQLite file's full
    /// path, or the PostgreSQL URL without its password.
    pub fn storage_location(&self) -> String {
        if self.uses_postgres() {
            return redact_url(&self.database_url);
        }
        let path = self.database_path();
        let full = std::path::absolute(&path).unwrap_or(path);
        format!("sqlite:{}", full.display())
    }

    /// Whether the store is PostgreSQL (shared by instances).
    pub fn uses_postgres(&self) -> bool {
        !self.database_url.is_empty()
    }
}

/// A URL with its password (`scheme://user:PASSWORD@host`) hidden, for
/// logs and `check-config`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
// figment::Jail's closure signature returns its large error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn spans_read_and_write_as_people_do() {
        for (text, ms) in [
            ("30d", 30 * 86_400_000),
            ("12h", 43_200_000),
            ("90m", 5_400_000),
            ("45s", 45_000),
            ("0", 0),
        ] {
            let span: Span = text.parse().unwrap();
            assert_eq!(span.ms(), ms, "{text}");
            assert_eq!(span.to_string(), text);
        }
        assert_eq!(Span::from_ms(7_200_000).to_string(), "2h");
        for bad in ["", "30", "d", "1w", "-1d", "1.5h", "99999999999999999999d"] {
            assert!(bad.parse::<Span>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn retention_is_checked_against_the_chunk_span() {
        let mut c = Config::default();
        c.storage.retention = "30d".parse().unwrap();
        assert!(c.validate().is_ok());
        c.storage.retention = "1h".parse().unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("storage.retention"), "{e}");
        c.storage.chunk_span = "1h".parse().unwrap();
        assert!(c.validate().is_ok());
        c.storage.chunk_span = "10s".parse().unwrap();
        assert!(c.validate().is_err());
    }

    #[test]
    fn defaults_validate() {
        Config::default().validate().unwrap();
    }

    /// The documented example lists every key with its real default.
    #[test]
    fn example_file_matches_defaults() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../furrow.example.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let parsed: Config = toml_from_str(&text);
        assert_eq!(parsed, Config::default());
        let documented: toml::Table = text.parse().unwrap();
        let all = toml::Table::try_from(Config::default()).unwrap();
        assert_eq!(documented, all, "every key is in the example file");
    }

    fn toml_from_str(text: &str) -> Config {
        Figment::from(Toml::string(text)).extract().unwrap()
    }

    #[test]
    fn keepalive_clamps_and_never_zero() {
        let k = Keepalive::default();
        assert_eq!(k.effective(0), 60);
        assert_eq!(k.effective(1), 5);
        assert_eq!(k.effective(30), 30);
        assert_eq!(k.effective(u16::MAX), 900);
    }

    #[test]
    fn file_then_env_then_flags() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "f.toml",
                "listen = \"127.0.0.1:1\"\n[storage]\nsynchronous = \"normal\"\nbatch_max_rows = 10\n",
            )?;
            jail.set_env("FURROW_STORAGE__BATCH_MAX_ROWS", "20");
            let o = Overrides {
                listen: Some("127.0.0.1:2".parse().unwrap()),
                data_dir: None,
                mqtt: Some(MqttOverride {
                    url: "mqtt://127.0.0.1:1999".into(),
                }),
                database_url: Some("postgres://u:secret@127.0.0.1:5/f".into()),
                reuse_port: Some(true),
                proxy_protocol: Some(ProxyProtocolOverride { enabled: true }),
                tls: Some(TlsOverride {
                    cert_file: Some("/c.pem".into()),
                    key_file: Some("/k.pem".into()),
                    ..TlsOverride::default()
                }),
            };
            let c = Config::load(Some(Path::new("f.toml")), &o).unwrap();
            assert_eq!(c.listen.port(), 2, "flag wins over file");
            assert_eq!(c.database_url, "postgres://u:secret@127.0.0.1:5/f");
            assert_eq!(c.tls.cert_file, Path::new("/c.pem"));
            assert_eq!(
                c.tls.listen.port(),
                7701,
                "untouched nested keys keep their value"
            );
            assert_eq!(
                c.mqtt.url, "mqtt://127.0.0.1:1999",
                "a nested key from a flag"
            );
            assert_eq!(
                c.mqtt.topic_prefix, "furrow",
                "and its siblings keep defaults"
            );
            assert_eq!(c.storage.batch_max_rows, 20, "env wins over file");
            assert!(c.reuse_port);
            assert!(c.proxy_protocol.enabled);
            assert_eq!(
                c.proxy_protocol.trusted,
                ProxyProtocol::default().trusted,
                "--proxy-protocol leaves the trusted networks alone"
            );
            assert_eq!(c.storage.synchronous, Synchronous::Normal);
            Ok(())
        });
    }

    #[test]
    fn tls_settings_must_hang_together() {
        let invalid = |f: &dyn Fn(&mut Tls)| {
            let mut c = Config::default();
            f(&mut c.tls);
            c.validate().unwrap_err().to_string()
        };
        assert!(invalid(&|t| t.cert_file = "c.pem".into()).contains("tls.key_file"));
        assert!(invalid(&|t| t.key_file = "k.pem".into()).contains("tls.cert_file"));
        assert!(invalid(&|t| t.client_ca_file = "ca.pem".into()).contains("tls.cert_file"));
        assert!(invalid(&|t| t.plain = false).contains("tls.plain"));
        assert!(invalid(&|t| {
            t.cert_file = "c.pem".into();
            t.key_file = "k.pem".into();
            t.handshake_timeout_ms = 0;
        })
        .contains("tls.handshake_timeout_ms"));
        let mut ok = Config::default();
        ok.tls.cert_file = "c.pem".into();
        ok.tls.key_file = "k.pem".into();
        ok.tls.plain = false;
        ok.validate().unwrap();
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("bad.toml", "[storage]\nbatch_max_rowz = 1\n")?;
            let e = Config::load(Some(Path::new("bad.toml")), &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains("batch_max_rowz"), "{e}");
            assert!(e.contains("bad.toml"), "{e}");
            Ok(())
        });
    }

    /// Bans are gone (they kept valid devices out); a file written for an
    /// older version that still sets them loads, and they change nothing.
    #[test]
    fn the_retired_ban_settings_still_load() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "old.toml",
                "[limits]\nauth_ban_after = 20\nauth_ban_ms = 300000\n",
            )?;
            let c = Config::load(Some(Path::new("old.toml")), &Overrides::default())
                .expect("an older file loads");
            assert_eq!(c.limits.auth_ban_after, Some(20));
            assert_eq!(
                c.limits.auth_delayed_max,
                Limits::default().auth_delayed_max
            );
            Ok(())
        });
    }

    #[test]
    fn wrong_type_and_range_are_named() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("t.toml", "[limits]\nmax_frame = \"big\"\n")?;
            let e = Config::load(Some(Path::new("t.toml")), &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains("max_frame") && e.contains("t.toml"), "{e}");
            jail.create_file("r.toml", "[limits]\nmax_frame = 10\n")?;
            let e = Config::load(Some(Path::new("r.toml")), &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains("limits.max_frame"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn missing_file_is_named() {
        let e = Config::load(
            Some(Path::new("/nonexistent/f.toml")),
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("/nonexistent/f.toml"), "{e}");
    }

    #[test]
    fn the_api_fails_closed() {
        let mut c = Config::default();
        c.api.listen = "0.0.0.0:7780".parse().unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("api.token") && e.contains("0.0.0.0:7780"), "{e}");
        c.api.token = "short".into();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("at least 16"), "{e}");
        c.api.token = "a-long-enough-admin-token".into();
        c.validate().unwrap();
        // Off, or on loopback, it needs no token.
        let mut off = Config::default();
        off.api.enabled = false;
        off.api.listen = "0.0.0.0:7780".parse().unwrap();
        off.validate().unwrap();
        Config::default().validate().unwrap();
    }

    #[test]
    fn proxy_protocol_is_checked() {
        let mut c = Config::default();
        c.proxy_protocol.header_timeout_ms = 0;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("proxy_protocol.header_timeout_ms"), "{e}");
        // Above the handshake timeout is allowed: the shorter deadline wins.
        c.proxy_protocol.header_timeout_ms = c.limits.handshake_timeout_ms + 1;
        c.validate().unwrap();
        c.proxy_protocol.header_timeout_ms = 1;
        c.proxy_protocol.enabled = true;
        c.proxy_protocol.trusted.clear();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("proxy_protocol.trusted"), "{e}");
    }

    #[test]
    fn trusted_networks_come_from_a_file_and_bad_ones_are_named() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "p.toml",
                "[proxy_protocol]\nenabled = true\ntrusted = [\"10.0.0.0/8\", \"fd00::/8\"]\n",
            )?;
            let c = Config::load(Some(Path::new("p.toml")), &Overrides::default()).unwrap();
            assert_eq!(c.proxy_protocol.trusted.len(), 2);
            assert!(c.proxy_protocol.trusted[0]
                .contains(&"10.1.2.3".parse::<std::net::IpAddr>().unwrap()));
            jail.create_file("b.toml", "[proxy_protocol]\ntrusted = [\"10.0.0.0/33\"]\n")?;
            let e = Config::load(Some(Path::new("b.toml")), &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains("trusted") && e.contains("b.toml"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn mqtt_over_tls_fails_closed_without_a_readable_ca() {
        let mut c = Config::default();
        c.mqtt.url = "mqtts://broker:8883".into();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("mqtt.ca_file"), "{e}");
        c.mqtt.ca_file = "/nonexistent/ca.pem".into();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        c.mqtt.url = "http://broker".into();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("mqtt.url"), "{e}");
    }
}
