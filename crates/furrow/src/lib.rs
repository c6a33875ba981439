//! # Furrow: a TCP gateway for IoT device fleets
//!
//! Devices hold long-lived connections and speak furrow/1 (`docs/protocol.md`,
//! wire format in the `furrow-proto` crate). The gateway authenticates them,
//! stores their telemetry durably and acknowledges only what is stored.
//!
//! The data path, one module per layer (ARCHITECTURE.md walks a frame
//! through it):
//!
//! ```text
//! ingress ──► session (machine, driver) ──► writer ──► store (sqlite | postgres)
//!                 │  ▲                          │
//!                 ▼  └──── AckCell (commits) ◄──┘        └──► publish (MQTT)
//!              devices::registry (device → live session, takeover)
//!                 │
//!              cluster (postgres: which instance holds which device)
//! ```
//!
//! * [`ingress`]: bytes in before a session exists: the accept loop,
//!   admission and abuse limits, the PROXY header, the transport (TCP or
//!   TLS).
//! * [`session`]: one device's protocol: a sans-I/O machine and the Tokio
//!   driver around it; quiet sessions parked without a task.
//! * [`devices`]: tokens, provisioning, and which session holds which
//!   device ([`devices::registry`]).
//! * [`cluster`]: several instances on one PostgreSQL: cross-instance
//!   takeover and command wakeups.
//! * [`writer`]: group commit and ACK release.
//! * [`store`]: the storage traits and their SQLite and PostgreSQL backends.
//! * [`jobs`]: fleet jobs (commands, desired state, firmware) rolled out
//!   at a rate; [`firmware`]: signed images served to devices in ranges.
//! * [`publish`]: events to MQTT after commit.
//! * [`server`]: assembly and phased shutdown; [`config`]: settings;
//!   [`api`]: the operator's HTTP API.

#[cfg(not(any(feature = "sqlite", feature = "postgres")))]
compile_error!("furrow needs a storage backend: enable the \"sqlite\" or the \"postgres\" feature (both are on by default)");

pub mod api;
pub mod certs;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod devices;
pub mod envelope;
pub mod firmware;
pub mod ingress;
pub mod jobs;
pub mod live;
pub mod memory;
pub mod metrics;
pub mod publish;
pub mod server;
pub mod session;
pub mod store;
pub mod writer;

pub use config::Config;
pub use server::Server;
