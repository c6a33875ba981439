//! furrow/1 over QUIC (quinn): the listener's configuration and one device
//! session's stream.
//!
//! A device opens a QUIC connection (TLS 1.3, ALPN [`ALPN`], the same
//! certificates, client CA and reloads as the TLS listener) and one
//! bidirectional stream on it; furrow/1 runs on that stream unchanged,
//! frame for frame, as on TCP. QUIC brings what TCP cannot: the connection
//! survives the device's address changing (a NAT rebinding, a modem moving
//! cells) without a new handshake, and its loss recovery is per stream.
//!
//! [`QuicStream`] gives the session the same non-blocking reads and writes
//! as a TCP socket (`try_*` poll the stream once with a no-op waker; the
//! waits poll it with the task's), so the session code is the same for
//! both transports. A QUIC session is never parked (parking is for TCP
//! sockets on the shared readiness loop): it keeps its task.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::BytesMut;
use rustls_pki_types::CertificateDer;
use tokio::io::AsyncWrite;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::limits::{refused, ConnPermit, Limiter};
use super::listener::{next_conn_id, spawn_contained};
use super::tls::TlsError;

/// The ALPN protocol id a furrow/1 QUIC client offers (docs/protocol.md).
pub const ALPN: &[u8] = b"furrow/1";

/// The QUIC transport settings the listener applies to every connection,
/// kept so that a certificate reload rebuilds the same configuration.
#[derive(Debug, Clone, Copy)]
pub struct Transport {
    /// The longest a connection may stay silent: above the longest
    /// keepalive a session allows, so that QUIC never closes a session
    /// furrow/1 still considers alive.
    pub idle: Duration,
    /// Path MTU discovery (`quic.mtu_discovery`): off, every datagram
    /// stays within QUIC's 1,200-byte floor.
    pub mtu_discovery: bool,
}

impl Transport {
    /// From the gateway's configuration: the idle timeout past the longest
    /// keepalive (plus its 50 % grace).
    pub fn from_config(cfg: &crate::config::Config) -> Self {
        Self {
            idle: Duration::from_secs(u64::from(cfg.keepalive.max_s) * 3 / 2 + 30),
            mtu_discovery: cfg.quic.mtu_discovery,
        }
    }
}

/// quinn's server configuration over `tls` (a TLS 1.3 rustls configuration
/// with [`ALPN`]).
pub fn server_config(
    tls: Arc<rustls::ServerConfig>,
    settings: Transport,
) -> Result<quinn::ServerConfig, TlsError> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Verifier(format!("QUIC: {e}")))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // One furrow/1 session per connection, on one bidirectional stream.
    transport.max_concurrent_bidi_streams(1u8.into());
    transport.max_concurrent_uni_streams(0u8.into());
    let idle = quinn::IdleTimeout::try_from(settings.idle)
        .map_err(|e| TlsError::Verifier(format!("QUIC idle timeout: {e}")))?;
    transport.max_idle_timeout(Some(idle));
    // furrow/1 frames are small. quinn's discovery probes every new
    // connection's path with padded datagrams up to 1,452 bytes (about four
    // probes and their ACKs each way), which cost a 2,000-device reconnect
    // storm a third of its time here (docs/performance.md, "QUIC").
    if !settings.mtu_discovery {
        transport.mtu_discovery_config(None);
    }
    config.transport_config(Arc::new(transport));
    // A device whose address changes keeps its connection.
    config.migration(true);
    Ok(config)
}

/// The QUIC listener's UDP socket on `addr`, its receive and send buffers
/// asked for at `buffer` bytes each. A reconnect storm's first flights
/// (a padded 1,200-byte Initial, and 0-RTT, from every device at once)
/// arrive faster than one endpoint task reads them: with the kernel's
/// default buffer (208 KiB) 2,000 devices reconnecting at once lost most
/// of them, and each loss costs the device a retransmission timeout
/// (docs/performance.md, "QUIC"). The kernel caps the size at
/// `net.core.rmem_max` / `wmem_max` unless the gateway may override the
/// cap (`CAP_NET_ADMIN`: `SO_RCVBUFFORCE`, as quic-go does); a capped size
/// is logged, and `furrow_quic_socket_buffer_bytes{direction}` shows what
/// was granted.
pub fn bind_socket(addr: SocketAddr, buffer: usize) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: a refused size leaves the default, reported below.
    let _ = socket.set_recv_buffer_size(buffer);
    let _ = socket.set_send_buffer_size(buffer);
    // Linux grants min(asked, cap) and reports twice that (the doubling
    // covers its bookkeeping): less, and the sysctl capped it. A gateway
    // allowed past the cap takes the size asked for; any other gets EPERM,
    // which leaves the capped size.
    let asked = buffer.saturating_mul(2);
    if socket.recv_buffer_size()? < asked {
        let _ = rustix::net::sockopt::set_socket_recv_buffer_size_force(&socket, buffer);
    }
    if socket.send_buffer_size()? < asked {
        let _ = rustix::net::sockopt::set_socket_send_buffer_size_force(&socket, buffer);
    }
    for (direction, got) in [
        ("receive", socket.recv_buffer_size()?),
        ("send", socket.send_buffer_size()?),
    ] {
        metrics::gauge!("furrow_quic_socket_buffer_bytes", "direction" => direction)
            .set(got as f64);
        if got < asked {
            tracing::warn!(
                direction,
                asked = buffer,
                granted = got,
                "QUIC socket buffer capped by the kernel: raise net.core.rmem_max and wmem_max \
                 (or grant CAP_NET_ADMIN) for reconnect storms without losses"
            );
        }
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Accepts QUIC connections until `shutdown`. Before any handshake work,
/// an address over its connect rate, or a gateway at `max_connections`,
/// is refused (a QUIC refusal: the device backs off). Each accepted
/// connection completes its handshake and opens its stream within
/// `handshake_timeout`, in its own task, then runs `handler`.
pub async fn accept_loop<H, F>(
    endpoint: &quinn::Endpoint,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
    limits: &Limiter,
    handshake_timeout: Duration,
    handler: H,
) where
    H: Fn(QuicStream, Instant, u64, ConnPermit) -> F + Clone + Send + 'static,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => return,
            i = endpoint.accept() => match i {
                Some(i) => i,
                // The endpoint was closed.
                None => return,
            },
        };
        let at = Instant::now();
        let peer = incoming.remote_address();
        metrics::counter!("furrow_connections_accepted_total").increment(1);
        if !limits.allow_connect(peer.ip(), at) {
            tracing::debug!(peer = %peer, "QUIC connection refused: connect rate");
            incoming.refuse();
            continue;
        }
        let Some(permit) = limits.try_connection() else {
            refused("max_connections");
            incoming.refuse();
            continue;
        };
        let id = next_conn_id();
        let handler = handler.clone();
        spawn_contained(tracker, id, async move {
            let started = std::time::Instant::now();
            let outcome = match tokio::time::timeout(handshake_timeout, establish(incoming)).await {
                Err(_) => Err("timeout"),
                Ok(r) => r,
            };
            let count = |outcome: &'static str| {
                metrics::counter!("furrow_quic_handshakes_total", "outcome" => outcome)
                    .increment(1);
            };
            match outcome {
                Ok(stream) => {
                    count("ok");
                    metrics::histogram!("furrow_quic_handshake_seconds")
                        .record(started.elapsed().as_secs_f64());
                    handler(stream, at, id, permit).await;
                }
                Err(outcome) => {
                    count(outcome);
                    tracing::debug!(conn = id, peer = %peer, outcome, "QUIC connection refused: handshake");
                }
            }
        });
    }
}

/// The handshake, then the device's stream.
///
/// 0-RTT: a resuming device may send its stream (HELLO, and TELEMETRY
/// behind it) in its first flight. Such a stream is served at once, before
/// the handshake completes, and the gateway's answers (WELCOME, ACKs) go
/// out as 0.5-RTT data: the device has its first ACK one round trip after
/// it began. That is safe because rustls accepts early data only on a
/// ticket it still holds and takes it at that use (a replayed flight finds
/// none and its data is discarded), and because what early data can do is
/// idempotent anyway: a TELEMETRY seq already taken is a duplicate, never
/// stored twice (docs/protocol.md, "Transport"). The device's identity
/// under mutual TLS is the one its ticket carries, verified at the
/// handshake that issued it. Any other stream waits for the handshake to
/// complete, so the client certificate is verified before the first frame.
async fn establish(incoming: quinn::Incoming) -> Result<QuicStream, &'static str> {
    let connecting = incoming.accept().map_err(|_| "error")?;
    // A server's conversion always succeeds (quinn); the fallback is a
    // plain handshake all the same.
    let (conn, handshake) = match connecting.into_0rtt() {
        Ok((conn, done)) => (conn, Some(done)),
        Err(connecting) => (connecting.await.map_err(|_| "error")?, None),
    };
    let (send, recv) = conn.accept_bi().await.map_err(|e| match e {
        // What a failed handshake ends with (a TLS alert is a transport
        // error), against a device that went away without a stream.
        quinn::ConnectionError::TransportError(_) | quinn::ConnectionError::ConnectionClosed(_) => {
            "error"
        }
        _ => "no_stream",
    })?;
    // (0-RTT is counted where the ticket is looked up: ingress/tls.rs.)
    if !recv.is_0rtt() {
        if let Some(done) = handshake {
            done.await;
            if conn.close_reason().is_some() {
                return Err("error");
            }
        }
    }
    Ok(QuicStream::new(conn, send, recv))
}

/// A device session's QUIC stream and its connection.
pub struct QuicStream {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    /// The verified client certificate chain (mutual TLS).
    certs: Option<Vec<CertificateDer<'static>>>,
}

impl QuicStream {
    /// The session's stream `send`/`recv` on `conn`.
    pub fn new(conn: quinn::Connection, send: quinn::SendStream, recv: quinn::RecvStream) -> Self {
        let certs = conn
            .peer_identity()
            .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
            .map(|b| *b);
        Self {
            conn,
            send,
            recv,
            certs,
        }
    }

    /// The device's address now (it changes when the device migrates).
    pub fn remote_address(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    /// The verified client certificate chain, if the device sent one.
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.certs.as_deref()
    }

    /// Reads into `buf`'s spare capacity (the caller reserved some) with
    /// the task's waker. `Ready(Ok(0))`: the device finished its stream.
    pub fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        tokio_util::io::poll_read_buf(Pin::new(&mut self.recv), cx, buf)
    }

    /// One read without waiting: `WouldBlock` if nothing is there.
    pub fn try_read(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self.poll_read(&mut Context::from_waker(Waker::noop()), buf) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    /// Writes from `out` with the task's waker; advances `out`.
    pub fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        // The trait's (io::Error), not quinn's inherent one (WriteError).
        match AsyncWrite::poll_write(Pin::new(&mut self.send), cx, out) {
            Poll::Ready(Ok(0)) if !out.is_empty() => {
                Poll::Ready(Err(io::ErrorKind::WriteZero.into()))
            }
            Poll::Ready(Ok(n)) => {
                let _ = out.split_to(n);
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    }

    /// One write without waiting: `WouldBlock` if the stream takes nothing
    /// now (flow control).
    pub fn try_write(&mut self, out: &mut BytesMut) -> io::Result<usize> {
        match self.poll_write(&mut Context::from_waker(Waker::noop()), out) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    /// Writes all of `out`, waiting for flow control as needed.
    pub async fn write_all(&mut self, out: &mut BytesMut) -> io::Result<()> {
        while !out.is_empty() {
            poll_fn(|cx| self.poll_write(cx, out)).await?;
        }
        Ok(())
    }

    /// Ends our side of the stream and waits until the device has read
    /// it all (or stopped it): what was queued, GOODBYE or ERROR last, is
    /// delivered before the connection goes. The caller bounds it in time.
    pub async fn finish(&mut self) -> io::Result<()> {
        // Finishing twice is harmless: the stream is finished either way.
        let _ = self.send.finish();
        let _ = self.send.stopped().await;
        Ok(())
    }
}

impl Drop for QuicStream {
    fn drop(&mut self) {
        // The session is over: the connection goes with it (code 0, like a
        // TCP close), rather than idling until its timeout.
        self.conn.close(0u8.into(), b"");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the kernel allows a socket buffer to grow to (sysctl).
    fn cap(name: &str) -> usize {
        std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
            .expect("the sysctl")
            .trim()
            .parse()
            .expect("a number")
    }

    /// A quinn server with [`server_config`] (`mtu_discovery` as given)
    /// and a client with quinn's defaults (which probe): the server's path
    /// MTU probes once a stream has carried a few exchanges both ways.
    async fn server_probes(mtu_discovery: bool) -> u64 {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let ca = crate::certs::Ca::new("test CA", 1).unwrap();
        let issued = ca.server(&["localhost".to_owned()], 1).unwrap();
        let chain = vec![CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let settings = Transport {
            idle: Duration::from_secs(30),
            mtu_discovery,
        };
        let config = server_config(Arc::new(tls), settings).unwrap();
        let server = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = server.local_addr().unwrap();

        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap())
            .unwrap();
        let mut client_tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client_tls.alpn_protocols = vec![ALPN.to_vec()];
        let client_config = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(client_tls).unwrap(),
        ));
        let client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let connecting = client
            .connect_with(client_config, addr, "localhost")
            .unwrap();
        let serve = async {
            let conn = server.accept().await.unwrap().await.unwrap();
            let (mut send, mut recv) = conn.accept_bi().await.unwrap();
            let mut buf = [0u8; 4];
            for _ in 0..20 {
                recv.read_exact(&mut buf).await.unwrap();
                send.write_all(&buf).await.unwrap();
            }
            conn
        };
        let talk = async {
            let conn = connecting.await.unwrap();
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            let mut buf = [0u8; 4];
            for i in 0..20u32 {
                send.write_all(&i.to_be_bytes()).await.unwrap();
                recv.read_exact(&mut buf).await.unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            conn
        };
        let (conn, _client_conn) = tokio::join!(serve, talk);
        conn.stats().path.sent_plpmtud_probes
    }

    #[tokio::test]
    async fn path_mtu_probes_only_when_asked_for() {
        // quinn's discovery probes as soon as the handshake is confirmed:
        // 200 ms of exchanges leave it time for several.
        assert!(server_probes(true).await > 0, "discovery on: probes");
        assert_eq!(server_probes(false).await, 0, "discovery off: none");
    }

    /// Whether this process may set socket buffers past the kernel's cap
    /// (CAP_NET_ADMIN in its effective set, bit 12).
    fn may_override_cap() -> bool {
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        let eff = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .expect("CapEff");
        u64::from_str_radix(eff.trim(), 16).expect("hex") & (1 << 12) != 0
    }

    #[test]
    fn the_listener_socket_gets_the_buffers_asked_for_past_the_cap_only_with_cap_net_admin() {
        let above = 2 * cap("rmem_max").max(cap("wmem_max"));
        let forced = may_override_cap();
        for asked in [256 * 1024, 1024 * 1024, above] {
            let socket = bind_socket("127.0.0.1:0".parse().unwrap(), asked).unwrap();
            let s = socket2::SockRef::from(&socket);
            // Linux grants min(asked, cap) and reports twice that; a
            // process with CAP_NET_ADMIN gets what it asked for.
            let want = |cap: usize| 2 * if forced { asked } else { asked.min(cap) };
            assert_eq!(s.recv_buffer_size().unwrap(), want(cap("rmem_max")));
            assert_eq!(s.send_buffer_size().unwrap(), want(cap("wmem_max")));
        }
    }
}
