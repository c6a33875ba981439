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
//! listener ──► session (connection, acks) ──► writer ──► store (sqlite | postgres)
//!                 │  ▲                          │
//!                 ▼  └──── AckCell (commits) ◄──┘
//!              registry (device → live session, takeover)
//!                 │
//!              cluster (postgres: which instance holds which device)
//! ```
//!
//! * [`listener`]: accept loop, one task per connection; [`limits`]:
//!   connection, rate and authentication-failure limits.
//! * [`proxy`]: the PROXY protocol header a load balancer puts first.
//! * [`session`]: the per-connection state machine (handshake, active,
//!   draining) over a [`connection::Connection`].
//! * [`registry`]: which session holds which device.
//! * [`cluster`]: several instances on one PostgreSQL: cross-instance
//!   takeover and command wakeups.
//! * [`writer`]: group commit and ACK release.
//! * [`tls`]: the TLS listener's configuration, mutual TLS, reloads.
//! * [`store`]: the storage trait and its SQLite and PostgreSQL backends.
//! * [`server`]: assembly and phased shutdown; [`config`]: settings.

#[cfg(not(any(feature = "sqlite", feature = "postgres")))]
compile_error!("furrow needs a storage backend: enable the \"sqlite\" or the \"postgres\" feature (both are on by default)");

pub mod api;
pub mod auth;
pub mod certs;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod devices;
pub mod envelope;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod proxy;
pub mod publish;
pub mod registry;
pub mod server;
pub mod session;
pub mod store;
pub mod tls;
pub mod writer;

pub use config::Config;
pub use server::Server;
