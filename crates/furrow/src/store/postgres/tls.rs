//! TLS to PostgreSQL, with libpq's `sslmode` and `sslrootcert` in the
//! database URL, through rustls (`tokio-postgres-rustls`).
//!
//! tokio-postgres itself knows only `disable`, `prefer` and `require`, and
//! none of them checks the server's certificate. libpq's two checking modes
//! are added here, so that the URL an operator already uses with `psql`
//! works unchanged:
//!
//! | sslmode | encrypted | certificate checked |
//! |---|---|---|
//! | `disable` | no | - |
//! | `prefer` (the default, as in libpq) | if the server offers TLS | no |
//! | `require` | yes | no (with `sslrootcert`: as `verify-ca`, as libpq) |
//! | `verify-ca` | yes | chain to `sslrootcert` |
//! | `verify-full` | yes | chain to `sslrootcert`, and the host name |
//!
//! `sslrootcert` is a PEM file of the CA(s); the checking modes require it
//! (libpq would fall back to `~/.postgresql/root.crt`; a gateway should not
//! depend on its home directory). Without checking, TLS keeps a passive
//! eavesdropper out but not an active one: production wants `verify-full`.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use tokio_postgres::config::SslMode as PgSslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::store::StoreError;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// TLS if the server offers it, unchecked.
    Prefer,
    /// TLS, unchecked.
    Require,
    /// TLS, the chain checked against `sslrootcert`.
    VerifyCa,
    /// TLS, the chain and the host name checked.
    VerifyFull,
}

impl SslMode {
    fn parse(v: &str) -> Result<Self, StoreError> {
        Ok(match v {
            "disable" => Self::Disable,
            // libpq's `allow` (plain first, TLS if refused) is closest to
            // `prefer` for a server that is there to be used.
            "allow" | "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            other => {
                return Err(StoreError::Config(format!(
                    "sslmode={other}: use disable, prefer, require, verify-ca or verify-full"
                )))
            }
        })
    }
}

/// The connection settings of a database URL, and the TLS connector its
/// `sslmode` asks for.
pub struct Connect {
    /// The settings, without `sslmode`'s checking modes and `sslrootcert`
    /// (which tokio-postgres does not know).
    pub config: tokio_postgres::Config,
    /// Encrypts (and checks) as `sslmode` says.
    pub tls: MakeRustlsConnect,
    /// The mode in force.
    pub mode: SslMode,
}

/// Reads `url` (`postgres://...?sslmode=...&sslrootcert=...`, or libpq's
/// `key=value` form) into settings and a TLS connector.
pub fn connect_settings(url: &str) -> Result<Connect, StoreError> {
    let (rest, sslmode, rootcert) = take_tls_params(url);
    let mut config: tokio_postgres::Config = rest
        .parse()
        .map_err(|e: tokio_postgres::Error| StoreError::Config(e.to_string()))?;
    let mode = match sslmode.as_deref() {
        Some(v) => SslMode::parse(v)?,
        None => SslMode::Prefer,
    };
    // `require` with a root certificate checks the chain (libpq does).
    let mode = match (mode, &rootcert) {
        (SslMode::Require, Some(_)) => SslMode::VerifyCa,
        (m, _) => m,
    };
    config.ssl_mode(match mode {
        SslMode::Disable => PgSslMode::Disable,
        SslMode::Prefer => PgSslMode::Prefer,
        _ => PgSslMode::Require,
    });
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Config(format!("TLS to PostgreSQL: {e}")))?;
    let client = match mode {
        SslMode::Disable | SslMode::Prefer | SslMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Unchecked(provider)))
            .with_no_client_auth(),
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let path = rootcert.ok_or_else(|| {
                StoreError::Config(
                    "sslmode=verify-ca and verify-full need sslrootcert=<PEM file of the CA> \
                     in the database URL"
                        .into(),
                )
            })?;
            let roots = read_roots(&path)?;
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| StoreError::Config(format!("sslrootcert={path}: {e}")))?;
            let verifier: Arc<dyn ServerCertVerifier> = if mode == SslMode::VerifyCa {
                Arc::new(ChainOnly(webpki))
            } else {
                webpki
            };
            builder
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth()
        }
    };
    Ok(Connect {
        config,
        tls: MakeRustlsConnect::new(client),
        mode,
    })
}

fn read_roots(path: &str) -> Result<RootCertStore, StoreError> {
    let pem =
        std::fs::read(path).map_err(|e| StoreError::Config(format!("sslrootcert={path}: {e}")))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| StoreError::Config(format!("sslrootcert={path}: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| StoreError::Config(format!("sslrootcert={path}: {e}")))?;
    }
    if roots.is_empty() {
        return Err(StoreError::Config(format!(
            "sslrootcert={path}: no certificate in the file"
        )));
    }
    Ok(roots)
}

/// Takes `sslmode` and `sslrootcert` out of a URL's query string or a
/// `key=value` string; returns the rest and their values.
fn take_tls_params(url: &str) -> (String, Option<String>, Option<String>) {
    let (mut mode, mut root) = (None, None);
    if let Some((base, query)) = url
        .split_once('?')
        .filter(|_| url.starts_with("postgres://") || url.starts_with("postgresql://"))
    {
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("sslmode", v)) => mode = Some(percent_decode(v)),
                Some(("sslrootcert", v)) => root = Some(percent_decode(v)),
                _ => kept.push(pair),
            }
        }
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return (rest, mode, root);
    }
    if url.contains("://") {
        return (url.to_owned(), None, None);
    }
    // key=value form, whitespace separated (quoted values are left to
    // tokio-postgres as they are).
    let mut kept = Vec::new();
    for word in url.split_whitespace() {
        match word.split_once('=') {
            Some(("sslmode", v)) => mode = Some(v.to_owned()),
            Some(("sslrootcert", v)) => root = Some(v.to_owned()),
            _ => kept.push(word),
        }
    }
    (kept.join(" "), mode, root)
}

/// `%XX` escapes of a URL query value (a path may need them).
fn percent_decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, ..) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `prefer` and `require`: encrypted, the certificate not checked (as
/// libpq). The handshake's signatures are still verified, so the session
/// is with whoever holds the certificate's key.
#[derive(Debug)]
struct Unchecked(Arc<CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to `sslrootcert`; the name in the
/// certificate is not compared with the host.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_come_out_of_urls_and_key_value_strings() {
        let (rest, mode, root) = take_tls_params(
            "postgres://u@db:5432/furrow?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca.pem",
        );
        assert_eq!(rest, "postgres://u@db:5432/furrow?application_name=x");
        assert_eq!(mode.as_deref(), Some("verify-full"));
        assert_eq!(root.as_deref(), Some("/etc/ca.pem"));
        let (rest, mode, root) = take_tls_params("postgres://u@db/furrow?sslmode=require");
        assert_eq!(
            (rest.as_str(), mode.as_deref(), root),
            ("postgres://u@db/furrow", Some("require"), None)
        );
        let (rest, mode, root) =
            take_tls_params("host=db user=u sslmode=verify-ca sslrootcert=/ca.pem dbname=f");
        assert_eq!(rest, "host=db user=u dbname=f");
        assert_eq!(
            (mode.as_deref(), root.as_deref()),
            (Some("verify-ca"), Some("/ca.pem"))
        );
        let (rest, mode, _) = take_tls_params("postgres://u@db/furrow");
        assert_eq!((rest.as_str(), mode), ("postgres://u@db/furrow", None));
    }

    #[test]
    fn modes_and_their_refusals() {
        let mode = |url: &str| connect_settings(url).map(|c| c.mode);
        assert_eq!(mode("postgres://u@h/d").unwrap(), SslMode::Prefer);
        assert_eq!(
            mode("postgres://u@h/d?sslmode=disable").unwrap(),
            SslMode::Disable
        );
        assert_eq!(
            mode("postgres://u@h/d?sslmode=require").unwrap(),
            SslMode::Require
        );
        let err = |url: &str| match connect_settings(url) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{url} was accepted"),
        };
        assert!(err("postgres://u@h/d?sslmode=verify-full").contains("sslrootcert"));
        assert!(err("postgres://u@h/d?sslmode=sometimes").contains("sslmode=sometimes"));
        assert!(
            err("postgres://u@h/d?sslmode=verify-ca&sslrootcert=/nonexistent.pem")
                .contains("/nonexistent.pem")
        );
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let url = format!(
            "postgres://u@h/d?sslmode=verify-full&sslrootcert={}",
            empty.display()
        );
        assert!(err(&url).contains("no certificate"));
        // `require` with a root certificate checks the chain, as libpq.
        let ca = crate::certs::Ca::new("test CA", 1).unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, &ca.cert_pem).unwrap();
        let url = format!(
            "postgres://u@h/d?sslmode=require&sslrootcert={}",
            ca_file.display()
        );
        assert_eq!(mode(&url).unwrap(), SslMode::VerifyCa);
    }
}
