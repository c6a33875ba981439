//! furrow/1 over QUIC (`quic://host:port`): one bidirectional stream of a
//! QUIC connection (quinn, ALPN `furrow/1`, TLS 1.3 from the client's TLS
//! options) carries the session exactly as a TCP socket would, so the
//! outbox, acknowledgements and exactly-once rules are the same code.
//!
//! One endpoint (UDP socket) serves every reconnect of the client, and the
//! TLS configuration keeps its session tickets, so a reconnect resumes,
//! with 0-RTT: HELLO (and the readings behind it) travel in the first
//! flight, and the first ACK comes one round trip after the reconnect
//! began. While a connection lives, QUIC carries it across address changes
//! of the device (a new cell, a NAT rebinding) without a reconnect.
//!
//! A gateway may refuse the early data (it lost the ticket: a restart,
//! another instance). Then [`QuicIo`] opens the stream again on the now
//! established connection and writes what it had sent early once more,
//! so the session above never sees the difference.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::rustls::ClientConfig;

/// The most a client writes in 0-RTT before the handshake completes (a
/// copy is kept in case the gateway refuses it): HELLO and a window of
/// readings fit; a larger write waits for the handshake.
const EARLY_MAX: usize = 64 * 1024;

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
        tls.enable_early_data = true;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| format!("QUIC needs TLS 1.3: {e}"))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        // No path MTU probes: readings are small, and each probe is a
        // padded datagram (and its ACK) on a metered link, processed by
        // the gateway too, in every reconnect of a storm.
        let mut transport = quinn::TransportConfig::default();
        transport.mtu_discovery_config(None);
        config.transport_config(Arc::new(transport));
        Ok(Self {
            config,
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

    /// A new connection and its stream, as one byte stream: in 0-RTT when
    /// a ticket from an earlier connection allows it.
    pub(crate) async fn connect(&self) -> Result<QuicIo, String> {
        let target = tokio::net::lookup_host(&self.addr)
            .await
            .map_err(|e| format!("{}: {e}", self.addr))?
            .next()
            .ok_or_else(|| format!("{}: no address", self.addr))?;
        let endpoint = self
            .endpoint(target)
            .map_err(|e| format!("UDP socket: {e}"))?;
        let connecting = endpoint
            .connect_with(self.config.clone(), target, &self.name)
            .map_err(|e| format!("quic: {e}"))?;
        let quic = |e: quinn::ConnectionError| format!("quic: {e}");
        match connecting.into_0rtt() {
            Ok((conn, accepted)) => {
                let (send, recv) = conn.open_bi().await.map_err(quic)?;
                Ok(QuicIo {
                    conn,
                    send,
                    recv,
                    early: Some(Early {
                        accepted: Box::pin(accepted),
                        sent: BytesMut::new(),
                        reopen: None,
                    }),
                })
            }
            Err(connecting) => {
                let conn = connecting.await.map_err(quic)?;
                let (send, recv) = conn.open_bi().await.map_err(quic)?;
                Ok(QuicIo {
                    conn,
                    send,
                    recv,
                    early: None,
                })
            }
        }
    }
}

type Reopen =
    Pin<Box<dyn Future<Output = io::Result<(quinn::SendStream, quinn::RecvStream)>> + Send>>;

/// A 0-RTT stream until the handshake says whether the gateway took it.
struct Early {
    /// Resolves at the end of the handshake: did the gateway take it?
    accepted: Pin<Box<quinn::ZeroRttAccepted>>,
    /// What was written early (at most [`EARLY_MAX`]), to write again if
    /// the gateway refused it.
    sent: BytesMut,
    /// Refused: the stream opened again and `sent` written on it.
    reopen: Option<Reopen>,
}

/// The session's stream (one bidirectional QUIC stream), as a byte stream.
pub(crate) struct QuicIo {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    early: Option<Early>,
}

impl QuicIo {
    /// Until the handshake is over: Ready once the stream is final
    /// (taken in 0-RTT, or opened again), Pending while it is not known.
    fn poll_settled(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(early) = self.early.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        if early.reopen.is_none() {
            if ready!(early.accepted.as_mut().poll(cx)) {
                self.early = None;
                return Poll::Ready(Ok(()));
            }
            // Refused: nothing early reached the gateway. The same bytes
            // again, on a new stream of the established connection.
            if let Some(reason) = self.conn.close_reason() {
                return Poll::Ready(Err(io::Error::other(reason)));
            }
            let conn = self.conn.clone();
            let sent = std::mem::take(&mut early.sent);
            early.reopen = Some(Box::pin(async move {
                let (mut send, recv) = conn.open_bi().await.map_err(io::Error::other)?;
                send.write_all(&sent).await.map_err(io::Error::other)?;
                Ok((send, recv))
            }));
        }
        let Some(reopen) = early.reopen.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let (send, recv) = ready!(reopen.as_mut().poll(cx))?;
        self.send = send;
        self.recv = recv;
        self.early = None;
        Poll::Ready(Ok(()))
    }
}

/// Whether `e` is quinn's refusal of what was written in 0-RTT.
fn zero_rtt_rejected(e: &io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<quinn::WriteError>())
        .is_some_and(|w| matches!(w, quinn::WriteError::ZeroRttRejected))
}

impl AsyncRead for QuicIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Nothing is read from a stream the gateway may yet refuse: its
        // answers come on the final one.
        ready!(this.poll_settled(cx))?;
        Pin::new(&mut this.recv).poll_read(cx, buf)
    }
}

impl AsyncWrite for QuicIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match this.poll_settled(cx) {
            Poll::Ready(r) => r?,
            Poll::Pending => {
                // Still early: write in 0-RTT while the copy has room.
                // (Otherwise the handshake, or the reopening, wakes us.)
                let Some(early) = this.early.as_mut() else {
                    return Poll::Pending;
                };
                if early.reopen.is_some() || early.sent.len() + buf.len() > EARLY_MAX {
                    return Poll::Pending;
                }
                match ready!(AsyncWrite::poll_write(Pin::new(&mut this.send), cx, buf)) {
                    Ok(n) => {
                        early.sent.extend_from_slice(&buf[..n]);
                        return Poll::Ready(Ok(n));
                    }
                    // The handshake ended in a refusal since `poll_settled`
                    // looked (the connection runs on another thread):
                    // settle now, which opens the stream again, and write
                    // there.
                    Err(e) if zero_rtt_rejected(&e) => ready!(this.poll_settled(cx))?,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
        }
        AsyncWrite::poll_write(Pin::new(&mut this.send), cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        AsyncWrite::poll_flush(Pin::new(&mut this.send), cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_settled(cx))?;
        AsyncWrite::poll_shutdown(Pin::new(&mut this.send), cx)
    }
}
