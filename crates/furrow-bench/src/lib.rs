//! # furrow-bench: the load generator behind `furrow bench`
//!
//! Opens N device connections to one or more servers and measures what a
//! fleet sees: connect plus handshake latency, acknowledged messages per
//! second over time, ACK latency percentiles (HdrHistogram), and errors by
//! kind. The same workload runs over furrow/1 or over MQTT QoS 1, so a
//! gateway and a broker such as Mosquitto are measured by one generator.
//!
//! The layers, from the socket up:
//!
//! * [`conn`]: plain TCP or TLS (rustls);
//! * [`wire`]: the two protocols behind one interface (handshake, message,
//!   ping, acknowledgements);
//! * [`device`]: one device's connect, send and acknowledge loop, with
//!   the window of unacknowledged messages and its timing;
//! * [`stats`]: counters and per-interval histograms, mergeable across
//!   threads and processes;
//! * [`worker`]: the devices of one process, and worker processes for runs
//!   above the 20,000 files one process may open;
//! * [`run`]: the coordinator that moves workers through the phases and
//!   samples them; [`report`] and [`chart`] present the result.
//!
//! Devices are given as credentials; provisioning them is the caller's
//! job (the `furrow` binary writes them into the gateway's database).

pub mod args;
pub mod chart;
pub mod conn;
pub mod device;
pub mod report;
pub mod run;
pub mod stats;
pub mod wire;
pub mod worker;

use serde::{Deserialize, Serialize};

pub use args::{BenchArgs, Mode, Protocol};
pub use report::Report;
pub use run::run;
pub use worker::{worker_main, Launcher};

/// A device's credentials: its id, and its token (empty for MQTT without
/// authentication).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Cred {
    /// Device id (MQTT: client id).
    pub id: String,
    /// Token (MQTT: password, with the id as user name, when not empty).
    pub token: String,
}

/// Why a run could not be done.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The options do not make sense.
    #[error("{0}")]
    Invalid(String),
    /// A local resource failed (threads, pipes, /proc, files).
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A worker process misbehaved.
    #[error("worker: {0}")]
    Worker(String),
    /// The chart could not be drawn.
    #[error("chart: {0}")]
    Chart(String),
}

/// Why one device's connection failed; counted by [`DeviceError::kind`].
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The TCP connection was not established.
    #[error("connect: {0}")]
    Connect(std::io::Error),
    /// The server did not answer the handshake in time.
    #[error("handshake timeout")]
    HandshakeTimeout,
    /// The server closed the connection.
    #[error("closed by the server")]
    Closed,
    /// A read or write failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// furrow/1 ERROR.
    #[error("ERROR {0}")]
    ServerError(u16),
    /// furrow/1 GOODBYE.
    #[error("GOODBYE {0}")]
    Goodbye(u16),
    /// furrow/1 REJECT of a message.
    #[error("REJECT {0}")]
    Rejected(u16),
    /// MQTT CONNACK refusal.
    #[error("refused: {0}")]
    Refused(String),
    /// Bytes that do not parse.
    #[error("decode: {0}")]
    Decode(#[from] furrow_proto::DecodeError),
    /// Something the protocol does not allow here.
    #[error("protocol: {0}")]
    Protocol(String),
    /// A message could not be encoded.
    #[error("encode: {0}")]
    Encode(String),
    /// The TLS handshake failed.
    #[error("tls: {0}")]
    Tls(String),
}

impl DeviceError {
    /// The error's kind, for counting: a small, bounded set of strings
    /// (I/O errors by kind, server codes by number).
    pub fn kind(&self) -> String {
        match self {
            Self::Connect(e) => format!("connect: {:?}", e.kind()),
            Self::Io(e) => format!("io: {:?}", e.kind()),
            Self::HandshakeTimeout => "handshake timeout".into(),
            Self::Closed => "closed by server".into(),
            Self::ServerError(c) => format!("ERROR {c}"),
            Self::Goodbye(c) => format!("GOODBYE {c}"),
            Self::Rejected(c) => format!("REJECT {c}"),
            Self::Refused(r) => format!("refused: {r}"),
            Self::Decode(_) => "decode".into(),
            Self::Protocol(_) => "protocol".into(),
            Self::Encode(_) => "encode".into(),
            // rustls errors name what failed, from a small fixed set.
            Self::Tls(e) => format!("tls: {e}"),
        }
    }
}
