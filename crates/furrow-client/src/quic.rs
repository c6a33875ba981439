//! furrow/1 over QUIC (`quic://host:port`): one bidirectional stream of a
//! QUIC connection (quinn, ALPN `furrow/1`, TLS 1.3 from the client's TLS
//! options) carries the session exactly as a TCP socket would, so the
//! outbox, acknowledgements and exactly-once rules are the same code.
//!
//! One endpoint (UDP socket) serves every reconnect of the client, and the
//! TLS configuration keeps its session tickets, so a reconnect resumes.
//! While a connection lives, QUIC carries it across address changes of
//! the device (a new cell, a NAT rebinding) without a reconnect.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio_rustls::rustls::ClientConfig;

/// The ALPN id of furrow/1 over QUIC.
pub const ALPN: &[u8] = b"furrow/1";

/// What a QUIC client connects with.
pub(crate) struct Quic {
    config: quinn::ClientConfig,
    /// `host:port` of the gateway.
    addr: String,
    /// The name the gateway's certificate is checked against.
    name: String,
    /// Made at the first connect (it needs the runtime and the address
    /// family), kept for the next ones.
    endpoint: Mutex<Option<quinn::Endpoint>>,
}

impl Quic {
    /// For the gateway at `addr` (`host:port`), trusting what `tls` trusts.
    pub(crate) fn new(tls: &ClientConfig, addr: &str, name: &str) -> Result<Self, String> {
        let mut tls = tls.clone();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| format!("QUIC needs TLS 1.3: {e}"))?;
        Ok(Self {
            config: quinn::ClientConfig::new(Arc::new(crypto)),
            addr: addr.to_owned(),
            name: name.to_owned(),
            endpoint: Mutex::new(None),
        })
    }

    fn endpoint(&self, target: SocketAddr) -> std::io::Result<quinn::Endpoint> {
        let mut slot = self.endpoint.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = slot.as_ref() {
            return Ok(e.clone());
        }
        let local: SocketAddr = if target.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let e = quinn::Endpoint::client(local)?;
        *slot = Some(e.clone());
        Ok(e)
    }

    /// A new connection and its stream, as one byte stream.
    pub(crate) async fn connect(
        &self,
    ) -> Result<tokio::io::Join<quinn::RecvStream, quinn::SendStream>, String> {
        let target = tokio::net::lookup_host(&self.addr)
            .await
            .map_err(|e| format!("{}: {e}", self.addr))?
            .next()
            .ok_or_else(|| format!("{}: no address", self.addr))?;
        let endpoint = self
            .endpoint(target)
            .map_err(|e| format!("UDP socket: {e}"))?;
        let conn = endpoint
            .connect_with(self.config.clone(), target, &self.name)
            .map_err(|e| format!("quic: {e}"))?
            .await
            .map_err(|e| format!("quic: {e}"))?;
        let (send, recv) = conn.open_bi().await.map_err(|e| format!("quic: {e}"))?;
        Ok(tokio::io::join(recv, send))
    }
}
