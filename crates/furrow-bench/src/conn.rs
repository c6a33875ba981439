//! A device's connection: plain TCP, TLS over it (rustls), or one stream
//! of a QUIC connection (quinn, `--quic`). One enum rather than a boxed
//! trait object, so the plain path costs nothing.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls::client::Resumption;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::{client::TlsStream, TlsConnector};

use crate::{BenchError, DeviceError};

/// The ALPN id of furrow/1 over QUIC.
const ALPN: &[u8] = b"furrow/1";

/// TLS settings shared by a worker's devices, over TCP or QUIC.
#[derive(Clone)]
pub struct Tls {
    connector: TlsConnector,
    server_name: ServerName<'static>,
    config: Arc<ClientConfig>,
    resume: bool,
    /// QUIC instead of TCP: quinn's configuration over `config`.
    quic: Option<quinn::ClientConfig>,
    /// The device's UDP socket (QUIC), made at its first connect and kept
    /// for its reconnects, as a device keeps its modem's.
    endpoint: Arc<Mutex<Option<quinn::Endpoint>>>,
}

/// rustls with ring, offering AES-128-GCM first, as the SDK does: its
/// SHA-256 key schedule runs on the CPU's SHA extensions, SHA-384's does
/// not, which makes a QUIC handshake about a tenth cheaper for the gateway
/// (docs/performance.md, "QUIC").
fn provider() -> Arc<tokio_rustls::rustls::crypto::CryptoProvider> {
    use tokio_rustls::rustls::CipherSuite;
    let mut p = tokio_rustls::rustls::crypto::ring::default_provider();
    p.cipher_suites
        .sort_by_key(|s| s.suite() != CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

/// quinn's client configuration over `tls` (ALPN `furrow/1`, 0-RTT on).
fn quic_config(tls: &ClientConfig) -> Result<quinn::ClientConfig, BenchError> {
    let mut tls = tls.clone();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.enable_early_data = true;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| BenchError::Invalid(format!("--quic needs TLS 1.3: {e}")))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    // As the SDK: no path MTU probes, which would cost the gateway (and
    // this generator) datagrams per connection that devices do not send.
    let mut transport = quinn::TransportConfig::default();
    transport.mtu_discovery_config(None);
    config.transport_config(Arc::new(transport));
    Ok(config)
}

impl Tls {
    /// Trusts the certificates in `ca_pem`; names the server `server_name`;
    /// resumes sessions unless `resume` is false; over QUIC with `quic`;
    /// offers only TLS 1.2 with `tls12`.
    pub fn new(
        ca_pem: &Path,
        server_name: &str,
        resume: bool,
        quic: bool,
        tls12: bool,
    ) -> Result<Self, BenchError> {
        let bad = |m: String| BenchError::Invalid(format!("--tls-ca {}: {m}", ca_pem.display()));
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca_pem).map_err(|e| bad(e.to_string()))? {
            roots
                .add(cert.map_err(|e| bad(e.to_string()))?)
                .map_err(|e| bad(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(bad("no certificate in the file".into()));
        }
        let versions: &[&'static tokio_rustls::rustls::SupportedProtocolVersion] = if tls12 {
            &[&tokio_rustls::rustls::version::TLS12]
        } else {
            tokio_rustls::rustls::DEFAULT_VERSIONS
        };
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .map_err(|e| BenchError::Invalid(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.resumption = if resume {
            // Enough tickets for every device of a large run to resume.
            Resumption::in_memory_sessions(100_000)
        } else {
            Resumption::disabled()
        };
        let server_name = ServerName::try_from(server_name.to_owned())
            .map_err(|e| BenchError::Invalid(format!("--tls-server-name: {e}")))?;
        let quic = if quic { Some(quic_config(&cfg)?) } else { None };
        let config = Arc::new(cfg);
        Ok(Self {
            connector: TlsConnector::from(Arc::clone(&config)),
            server_name,
            config,
            resume,
            quic,
            endpoint: Arc::default(),
        })
    }

    /// Whether devices connect over QUIC.
    pub fn is_quic(&self) -> bool {
        self.quic.is_some()
    }

    /// The settings for one device: with resumption, a session cache of
    /// its own, as a real device has. (A cache shared by every device keeps
    /// only a few TLS 1.3 tickets per server name, each usable once: in a
    /// storm most devices would find none.)
    pub fn for_device(&self) -> Self {
        if !self.resume {
            return Self {
                endpoint: Arc::default(),
                ..self.clone()
            };
        }
        let mut cfg = (*self.config).clone();
        cfg.resumption = Resumption::in_memory_sessions(4);
        // Built from this device's own rustls configuration, so that its
        // QUIC tickets are its own too.
        let quic = self.quic.as_ref().and_then(|_| quic_config(&cfg).ok());
        let config = Arc::new(cfg);
        Self {
            connector: TlsConnector::from(Arc::clone(&config)),
            server_name: self.server_name.clone(),
            config,
            resume: true,
            quic,
            endpoint: Arc::default(),
        }
    }

    /// A QUIC connection to `addr` from `source` and its one stream, in
    /// 0-RTT when the device holds a ticket. (A gateway that refuses the
    /// early data fails the stream: the device reconnects, counted as an
    /// io error.)
    pub async fn connect_quic(
        &self,
        addr: SocketAddr,
        source: Option<IpAddr>,
    ) -> Result<Conn, DeviceError> {
        let err = |e: String| DeviceError::Tls(format!("quic: {e}"));
        let Some(cfg) = &self.quic else {
            return Err(err("not configured".into()));
        };
        let endpoint = {
            let mut slot = self.endpoint.lock().unwrap_or_else(|p| p.into_inner());
            match slot.as_ref() {
                Some(e) => e.clone(),
                None => {
                    let ip = source.unwrap_or(if addr.is_ipv4() {
                        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
                    } else {
                        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                    });
                    let e = quinn::Endpoint::client(SocketAddr::new(ip, 0))
                        .map_err(DeviceError::Connect)?;
                    *slot = Some(e.clone());
                    e
                }
            }
        };
        let name = match &self.server_name {
            ServerName::DnsName(n) => n.as_ref().to_owned(),
            other => format!("{other:?}"),
        };
        let connecting = endpoint
            .connect_with(cfg.clone(), addr, &name)
            .map_err(|e| err(e.to_string()))?;
        let conn = match connecting.into_0rtt() {
            Ok((conn, _accepted)) => conn,
            Err(connecting) => connecting.await.map_err(|e| err(e.to_string()))?,
        };
        let (send, recv) = conn.open_bi().await.map_err(|e| err(e.to_string()))?;
        Ok(Conn::Quic(Box::new(QuicConn {
            _conn: conn,
            send,
            recv,
        })))
    }

    /// Runs the TLS handshake over `tcp`.
    pub async fn connect(&self, tcp: TcpStream) -> Result<Conn, DeviceError> {
        let s = self
            .connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| DeviceError::Tls(e.to_string()))?;
        Ok(Conn::Tls(Box::new(s)))
    }
}

/// A device's QUIC stream (the connection closes when this goes).
pub struct QuicConn {
    _conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

/// A connection to the server.
pub enum Conn {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<TlsStream<TcpStream>>),
    /// A QUIC stream.
    Quic(Box<QuicConn>),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::Quic(q) => Pin::new(&mut q.recv).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::Quic(q) => AsyncWrite::poll_write(Pin::new(&mut q.send), cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::Quic(q) => AsyncWrite::poll_flush(Pin::new(&mut q.send), cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::Quic(q) => AsyncWrite::poll_shutdown(Pin::new(&mut q.send), cx),
        }
    }
}
