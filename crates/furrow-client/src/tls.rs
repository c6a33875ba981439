//! TLS to the gateway (rustls through tokio-rustls, ring), with an optional
//! client certificate for mutual TLS. Built once per client from PEM files,
//! so a missing or bad file fails [`crate::Client::start`], not every
//! reconnect. Sessions are resumed across reconnects (rustls's in-memory
//! ticket cache): a device that reconnects after a network blip saves the
//! full handshake.

use std::path::PathBuf;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

/// TLS settings of a client.
#[derive(Debug, Clone)]
pub struct TlsOptions {
    /// PEM CA certificates that sign the gateway's certificate.
    pub ca_file: PathBuf,
    /// The name to verify the gateway's certificate against (default: the
    /// host part of the address).
    pub server_name: Option<String>,
    /// PEM certificate and key of this device, for mutual TLS.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl TlsOptions {
    /// Trusts `ca_file`; no client certificate.
    pub fn new(ca_file: impl Into<PathBuf>) -> Self {
        Self {
            ca_file: ca_file.into(),
            server_name: None,
            client_cert: None,
        }
    }

    /// Presents this certificate and key (mutual TLS).
    pub fn with_client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.client_cert = Some((cert.into(), key.into()));
        self
    }
}

/// A ready connector and the name it verifies.
#[derive(Clone)]
pub(crate) struct Tls {
    pub(crate) connector: TlsConnector,
    pub(crate) name: ServerName<'static>,
    /// The name as text (QUIC takes a `&str`).
    pub(crate) host: String,
}

fn bad(path: &std::path::Path, e: impl std::fmt::Display) -> String {
    format!("{}: {e}", path.display())
}

impl Tls {
    /// Builds the connector for a gateway at `addr` (`host:port`).
    pub(crate) fn new(opts: &TlsOptions, addr: &str) -> Result<Self, String> {
        let mut roots = RootCertStore::empty();
        let pem = std::fs::read(&opts.ca_file).map_err(|e| bad(&opts.ca_file, e))?;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| bad(&opts.ca_file, e))?;
            roots.add(cert).map_err(|e| bad(&opts.ca_file, e))?;
        }
        if roots.is_empty() {
            return Err(bad(&opts.ca_file, "no PEM certificate"));
        }
        // AES-128-GCM first: its SHA-256 key schedule runs on the CPU's
        // SHA extensions where SHA-384's does not, so each handshake costs
        // the gateway less (a QUIC reconnect about a tenth). The gateway
        // follows the device's order, so a device without AES hardware
        // may still put ChaCha20 first.
        let mut provider = tokio_rustls::rustls::crypto::ring::default_provider();
        provider.cipher_suites.sort_by_key(|s| {
            s.suite() != tokio_rustls::rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        });
        let builder = ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let config = match &opts.client_cert {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let pem = std::fs::read(cert).map_err(|e| bad(cert, e))?;
                let chain = CertificateDer::pem_slice_iter(&pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| bad(cert, e))?;
                let key_pem = std::fs::read(key).map_err(|e| bad(key, e))?;
                let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| bad(key, e))?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| e.to_string())?
            }
        };
        let host = match &opts.server_name {
            Some(n) => n.clone(),
            None => host_of(addr).to_owned(),
        };
        let name = ServerName::try_from(host.clone()).map_err(|e| format!("server name: {e}"))?;
        Ok(Self {
            connector: TlsConnector::from(Arc::new(config)),
            name,
            host,
        })
    }
}

/// `host` of `host:port`, `[v6]:port` or a bare host.
fn host_of(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match addr.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::host_of;

    #[test]
    fn host_of_addresses() {
        assert_eq!(host_of("localhost:7701"), "localhost");
        assert_eq!(host_of("[::1]:7701"), "::1");
        assert_eq!(host_of("gw.example"), "gw.example");
        assert_eq!(host_of("10.0.0.1:1"), "10.0.0.1");
    }
}
