//! One device session: a connection's life from accept to close.
//!
//! ```text
//! AwaitingHello --HELLO ok--> Active --kick/shutdown/GOODBYE/EOF--> Draining --> Closed
//!       |                        |
//!       +--error/timeout---------+--ERROR--------------------------------------> Closed
//! ```
//!
//! The rules live apart from the waiting:
//!
//! * [`machine`]: the sans-I/O core of an authenticated session (Active and
//!   Draining): frames, commits and time in; frames, writer jobs and store
//!   work out. No socket, no clock, no spawn.
//! * [`messages`]: one handler per message family (telemetry, commands,
//!   ping), called by the machine.
//! * [`handshake`]: the first frame, authentication and WELCOME, as pure
//!   decisions.
//! * [`acks`] (which seq may be ACKed), [`flow`] (keepalive with
//!   backpressure pauses), [`outbox`] (frames waiting for the socket).
//! * `driver`: the Tokio side. It reads the PROXY header, runs the TLS
//!   handshake, awaits the store and the takeover for HELLO, then feeds the
//!   machine from the socket, the writer and the timers until it ends, and
//!   drains; a session quiet for `sessions.park_after_ms` leaves its task
//!   for the [`park`]ing lot, which resumes it on its next frame, its
//!   keepalive deadline, or a wake-up from the registry.
//!
//! Whatever the exit, every frame a session took reaches the writer and is
//! resolved before the session releases its device: the next session of
//! the device then reads an exact `last_seq` from the store.

pub mod acks;
mod driver;
pub mod flow;
pub mod handshake;
pub mod machine;
pub mod messages;
pub mod outbox;
pub mod park;

use std::sync::Arc;

use furrow_proto::{ErrorCode, GoodbyeCode};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::devices::registry::Registry;
use crate::publish::Events;
use crate::store::prelude::*;
use crate::writer::WriterTx;

pub use driver::{run, run_quic, start_lot, Arrival, ParkLot, ParkedSession};

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
    pub tls: Option<Arc<crate::ingress::tls::TlsState>>,
    /// Connection, rate and authentication-failure limits.
    pub limits: Arc<crate::ingress::limits::Limiter>,
    /// Where quiet sessions park (`None`: they never do).
    pub park: Option<Arc<ParkLot>>,
    /// The connection tasks (a resumed session's task joins them).
    pub tracker: tokio_util::task::TaskTracker,
    /// Firmware images and download slots.
    pub firmware: Arc<crate::firmware::serve::Service>,
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
