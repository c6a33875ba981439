//! What a run is asked to do: the options of `furrow bench`, shared by the
//! coordinator and (serialized as JSON) by its worker processes.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The workload.
#[derive(clap::ValueEnum, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Each device sends at `--rate` messages per second (never beyond its
    /// window): ACK latency below saturation.
    Steady,
    /// Each device keeps `--window` messages unacknowledged and sends as
    /// fast as ACKs allow: the maximum rate.
    Flat,
    /// Hold N connections and report (with `--server-pid`, the server's
    /// resident memory per connection).
    Idle,
    /// Devices stream at `--rate`; then all drop their connections at once
    /// and reconnect: time until every one is back and streaming.
    Storm,
    /// Devices reconnect `--rate` times a second each, timing every
    /// handshake, while `--attackers` connections send HELLOs with wrong
    /// tokens for the same device ids as fast as they can, from
    /// `--attack-sources` other addresses: what a token-guessing flood costs
    /// the server, and whether valid devices still get in promptly.
    Authflood,
}

/// The protocol spoken to the server.
#[derive(clap::ValueEnum, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// furrow/1 TELEMETRY, cumulative ACKs.
    Furrow,
    /// MQTT 3.1.1 QoS 1 PUBLISH to `PREFIX/ID`, one PUBACK per message.
    Mqtt,
}

/// Options of one benchmark run.
#[derive(clap::Args, Serialize, Deserialize, Clone, Debug)]
pub struct BenchArgs {
    /// The workload.
    #[arg(value_enum)]
    pub mode: Mode,
    /// Protocol: furrow/1, or MQTT QoS 1 for a broker such as Mosquitto.
    #[arg(long, value_enum, default_value = "furrow")]
    pub protocol: Protocol,
    /// Server address; repeat to spread devices over several (device i
    /// goes to address i mod count).
    #[arg(long = "addr", default_value = "127.0.0.1:7700")]
    pub addrs: Vec<SocketAddr>,
    /// Number of devices (connections).
    #[arg(long, default_value_t = 100)]
    pub devices: usize,
    /// New connections per second while connecting (0: no limit).
    #[arg(long, default_value_t = 5000)]
    pub ramp: u32,
    /// Unacknowledged messages per device (furrow/1 caps it at WELCOME's
    /// max_inflight).
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    /// Messages per second per device (steady and storm).
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// JSON payload size in bytes.
    #[arg(long, default_value_t = 120)]
    pub payload_bytes: usize,
    /// Seconds of warm-up before measuring (flat and steady).
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,
    /// Seconds to measure (storm: the longest to wait for all to be back).
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Worker processes (0: one per 19,000 devices, as one process may
    /// open at most 20,000 files here).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Threads per worker process, each with its own single-threaded
    /// runtime (fairer than one multi-threaded runtime under saturation).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Loopback source addresses to spread connections over (127.0.0.1,
    /// 127.0.0.2, ...; 0: one per 1,000 devices). One source address
    /// reaches one server port through about 28,000 ephemeral ports.
    #[arg(long, default_value_t = 0)]
    pub sources: u32,
    /// Seconds the server may take to answer a handshake.
    #[arg(long, default_value_t = 10)]
    pub handshake_timeout: u64,
    /// Keepalive asked for in HELLO / CONNECT, seconds; the device pings
    /// at half of it when it has nothing else to send.
    #[arg(long, default_value_t = 60)]
    pub keepalive: u16,
    /// Connect over TLS (the server's certificate is checked against
    /// `--tls-ca`).
    #[arg(long, requires = "tls_ca")]
    pub tls: bool,
    /// Connect over QUIC (furrow/1 on one stream, ALPN `furrow/1`, TLS
    /// 1.3 checked against `--tls-ca`; 0-RTT when resuming): `--addr` is
    /// then the gateway's QUIC (UDP) address.
    #[arg(long, requires = "tls_ca", conflicts_with = "tls")]
    pub quic: bool,
    /// PEM file of the certificate authorities to trust.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// The name the server's certificate must carry.
    #[arg(long, default_value = "localhost")]
    pub tls_server_name: String,
    /// Full handshakes only: no TLS session resumption.
    #[arg(long)]
    pub tls_no_resume: bool,
    /// Offer TLS 1.2 only, as devices on mbedTLS 2.x do (TLS 1.3 by
    /// default).
    #[arg(long, requires = "tls", default_value_t = false)]
    #[serde(default)]
    pub tls12: bool,
    /// MQTT topic prefix (topics are PREFIX/DEVICE_ID).
    #[arg(long, default_value = "furrow-bench")]
    pub topic_prefix: String,
    /// Process id of the server, to report its CPU time (flat, steady and
    /// authflood: per message; storm: per reconnect) and its resident
    /// memory (idle: bytes per connection).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// authflood: connections sending wrong tokens at once.
    #[arg(long, default_value_t = 200)]
    pub attackers: usize,
    /// authflood: loopback addresses the attackers send from
    /// (127.0.200.1, 127.0.200.2, ...).
    #[arg(long, default_value_t = 20)]
    pub attack_sources: u32,
    /// Write the JSON report here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write an SVG chart of throughput and p99 latency over time here.
    #[arg(long, value_name = "FILE")]
    pub chart: Option<PathBuf>,
    /// No progress bar (it is also off when stderr is not a terminal).
    #[arg(long)]
    pub quiet: bool,
}

/// The most devices one worker process takes: 20,000 open files per
/// process here, less a margin for the runtime and pipes.
pub const DEVICES_PER_WORKER: usize = 19_000;

/// Connections per loopback source address before the next one is used.
/// The kernel's search for a free ephemeral port grows with the ports a
/// source address already holds: 20,000 devices connecting from one
/// address took the generator 1.7 CPUs, from 20 addresses 0.25.
pub const DEVICES_PER_SOURCE: usize = 1_000;

impl BenchArgs {
    /// Checks the options before anything connects.
    pub fn validate(&self) -> Result<(), crate::BenchError> {
        let bad = |m: &str| Err(crate::BenchError::Invalid(m.to_owned()));
        if self.devices == 0 {
            return bad("--devices must be at least 1");
        }
        if self.addrs.is_empty() {
            return bad("give at least one --addr");
        }
        if matches!(self.mode, Mode::Steady | Mode::Storm | Mode::Authflood)
            && !(self.rate > 0.0 && self.rate.is_finite())
        {
            return bad("--rate must be a positive number of messages per second");
        }
        if self.mode == Mode::Authflood {
            if self.protocol != Protocol::Furrow || self.tls || self.quic {
                return bad("authflood speaks furrow/1 over plain TCP only");
            }
            if self.worker_count() > 1 {
                return bad("authflood runs in one process: at most 19,000 devices, --workers 1");
            }
            if self.attack_sources == 0 || self.attack_sources > 254 {
                return bad("--attack-sources must be 1 to 254");
            }
        }
        if self.quic && self.protocol != Protocol::Furrow {
            return bad("--quic speaks furrow/1 only");
        }
        if self.window == 0 || (self.protocol == Protocol::Mqtt && self.window > 65_535) {
            return bad("--window must be 1 to 65,535");
        }
        if self.threads == 0 {
            return bad("--threads must be at least 1");
        }
        if self.keepalive == 0 {
            return bad("--keepalive must be at least 1 second");
        }
        if self.sources > 255 * 255 {
            return bad("--sources: at most 65,025 addresses of 127.0.0.0/8");
        }
        Ok(())
    }

    /// Worker processes this run uses.
    pub fn worker_count(&self) -> usize {
        match self.workers {
            0 => self.devices.div_ceil(DEVICES_PER_WORKER),
            n => n.min(self.devices),
        }
    }

    /// Loopback source addresses this run spreads connections over.
    pub fn source_count(&self) -> u32 {
        match self.sources {
            0 => u32::try_from(self.devices.div_ceil(DEVICES_PER_SOURCE)).unwrap_or(u32::MAX),
            n => n,
        }
    }
}
