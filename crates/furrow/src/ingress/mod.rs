//! Bytes in, before a session exists: the accept loop ([`listener`]),
//! admission and abuse limits ([`limits`]), the PROXY header a balancer
//! puts first ([`proxy`]), and the transport a session reads and writes
//! ([`connection`]: plain TCP or TLS, [`tls_conn`] a device's TLS state
//! through rustls' unbuffered API, [`tls_records`] the TLS 1.3 records
//! once the handshake is done, with [`tls`] the TLS listener's
//! configuration, mutual TLS and reloads; or a QUIC stream, [`quic`]).

pub mod connection;
pub mod limits;
pub mod listener;
pub mod proxy;
pub mod quic;
pub mod tls;
pub mod tls_conn;
pub mod tls_records;
