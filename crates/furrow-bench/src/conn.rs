//! A device's connection: plain TCP, or TLS over it (rustls). One enum
//! rather than a boxed trait object, so the plain path costs nothing.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls::client::Resumption;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::{client::TlsStream, TlsConnector};

use crate::{BenchError, DeviceError};

/// TLS settings shared by a worker's devices.
#[derive(Clone)]
pub struct Tls {
    connector: TlsConnector,
    server_name: ServerName<'static>,
    config: Arc<ClientConfig>,
    resume: bool,
}

impl Tls {
    /// Trusts the certificates in `ca_pem`; names the server `server_name`;
    /// resumes sessions unless `resume` is false.
    pub fn new(ca_pem: &Path, server_name: &str, resume: bool) -> Result<Self, BenchError> {
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
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let mut cfg = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
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
        let config = Arc::new(cfg);
        Ok(Self {
            connector: TlsConnector::from(Arc::clone(&config)),
            server_name,
            config,
            resume,
        })
    }

    /// The settings for one device: with resumption, a session cache of
    /// its own, as a real device has. (A cache shared by every device keeps
    /// only a few TLS 1.3 tickets per server name, each usable once: in a
    /// storm most devices would find none.)
    pub fn for_device(&self) -> Self {
        if !self.resume {
            return self.clone();
        }
        let mut cfg = (*self.config).clone();
        cfg.resumption = Resumption::in_memory_sessions(4);
        let config = Arc::new(cfg);
        Self {
            connector: TlsConnector::from(Arc::clone(&config)),
            server_name: self.server_name.clone(),
            config,
            resume: true,
        }
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

/// A connection to the server.
pub enum Conn {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<TlsStream<TcpStream>>),
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
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
