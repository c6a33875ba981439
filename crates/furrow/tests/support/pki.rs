//! A test PKI: a CA, a server certificate for `localhost` as files, device
//! certificates, and a rustls client trusting the CA (the TLS and QUIC
//! tests).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use furrow::certs::{Ca, Issued};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{ClientConfig as RustlsClient, RootCertStore};

/// A CA and a server certificate for `localhost`, as files in `dir`.
pub struct Pki {
    pub ca: Ca,
    pub dir: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path, tag: &str) -> Self {
        let ca = Ca::new(&format!("test CA {tag}"), 30).unwrap();
        let server = ca.server(&["localhost".into()], 30).unwrap();
        let dir = dir.join(tag);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ca.pem"), &ca.cert_pem).unwrap();
        std::fs::write(dir.join("server.pem"), &server.cert_pem).unwrap();
        std::fs::write(dir.join("server.key"), &server.key_pem).unwrap();
        Self { ca, dir }
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Writes a device's certificate and key; returns their paths.
    pub fn device_files(&self, issued: &Issued, name: &str) -> (PathBuf, PathBuf) {
        let (c, k) = (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, &issued.cert_pem).unwrap();
        std::fs::write(&k, &issued.key_pem).unwrap();
        (c, k)
    }
}

pub fn tls_on(c: &mut furrow::Config, pki: &Pki, mutual: bool) {
    c.tls.cert_file = pki.dir.join("server.pem");
    c.tls.key_file = pki.dir.join("server.key");
    if mutual {
        c.tls.client_ca_file = pki.ca_file();
    }
}

/// [`tls_on`] with the TLS listener and a QUIC listener on loopback, on
/// ports of their own.
pub fn quic_on(c: &mut furrow::Config, pki: &Pki, mutual: bool) {
    tls_on(c, pki, mutual);
    c.tls.listen = "127.0.0.1:0".parse().unwrap();
    c.quic.listen = Some("127.0.0.1:0".parse().unwrap());
}

/// A rustls client trusting `ca`, presenting `client` if given.
pub fn client_config(ca: &Pki, client: Option<&Issued>) -> Arc<RustlsClient> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.ca.cert_pem.as_bytes()).unwrap())
        .unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let b = RustlsClient::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    Arc::new(match client {
        None => b.with_no_client_auth(),
        Some(i) => b
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(i.cert_pem.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(i.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
    })
}
