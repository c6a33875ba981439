//! # furrow-client: the Furrow device SDK
//!
//! Turns the gateway's ACKs into a promise to the application: a reading
//! handed to [`Client::send`] is stored by the gateway exactly once, however
//! often the network drops, as long as the outbox survives (in memory by
//! default; on disk with [`Config::outbox_path`], across crashes and
//! restarts of the device process).
//!
//! ```no_run
//! # async fn demo() -> Result<(), furrow_client::ClientError> {
//! use furrow_client::{Client, Config};
//! let client = Client::start(Config::new("127.0.0.1:7700", "pump-17", "TOKEN"))?;
//! let seq = client.send(1, &br#"{"temp_c":21.5}"#[..]).await?; // 1 = JSON
//! client.flush().await?; // stored by the gateway
//! # let _ = seq; Ok(()) }
//! ```
//!
//! What it does for you:
//! * assigns seqs (persisted with a durable outbox) and keeps every reading
//!   until ACKed; `send` waits when the outbox is full, it never drops;
//! * pipelines up to WELCOME's `max_inflight`, and after a reconnect drops
//!   what WELCOME's `last_seq` covers and resends the rest in order;
//! * reconnects with exponential backoff and full jitter ([`Backoff`]),
//!   honouring GOODBYE's `retry_after_ms`; pings when idle and notices a
//!   dead connection (1.5 x keepalive of silence);
//! * answers COMMANDs through your handler and repeats the same answer for
//!   a command id it has handled before;
//! * takes a new token from the gateway (the `furrow.token` command an
//!   operator's rotation sends) and uses it from the next connection on,
//!   telling the application ([`Event::TokenRotated`]) so it can persist it;
//! * reports [`Event`]s: connected, disconnected (with why), acked, rejected;
//! * speaks TLS, with a client certificate for mutual TLS, when
//!   [`Config::tls`] is set ([`TlsOptions`]);
//! * downloads firmware the gateway offers when [`Config::firmware`] is set
//!   ([`FirmwareConfig`]): checks the fleet key's signature first, pulls the
//!   image by CRC-checked ranges, resumes after reconnects and restarts,
//!   verifies its SHA-256, hands it over ([`Event::FirmwareReady`]) and
//!   reports progress in the reported state.
#![deny(missing_docs)]

pub mod backoff;
pub mod client;
pub mod commands;
pub mod firmware;
pub mod outbox;
pub mod quic;
pub mod tls;

pub use backoff::Backoff;
pub use client::{
    Client, ClientError, Config, Desired, DesiredHandler, Disconnect, Event, TOKEN_COMMAND,
};
pub use commands::{handler, Command, CommandReply, Handler};
pub use firmware::{
    FileSink, FirmwareConfig, FirmwareError, FirmwareSink, FirmwareStats, ImageInfo, SinkFactory,
};
pub use tls::TlsOptions;
