//! Development certificates (`furrow certs`), so that a new user can try
//! TLS and mutual TLS in minutes: a CA, a server certificate signed by it,
//! and device certificates whose subject CN (and DNS SAN) is the device id.
//!
//! Made with rcgen (ECDSA P-256). For production, use your own PKI: the
//! gateway only needs PEM files (`tls.cert_file`, `tls.key_file`,
//! `tls.client_ca_file`).
//!
//! Layout of the output directory:
//! `ca.pem` `ca.key` · `server.pem` `server.key` · `devices/ID.pem`
//! `devices/ID.key`. Keys are written readable by their owner only.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Why certificates could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    /// rcgen refused (a name it cannot encode, say).
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The CA is missing (make it first: `furrow certs ca`).
    #[error("no CA in {0} (run `furrow certs ca --out {0}` first)")]
    NoCa(String),
    /// A file exists and would be overwritten.
    #[error("{0} exists; remove it or choose another --out")]
    Exists(PathBuf),
    /// A device id furrow/1 would refuse.
    #[error("invalid device id {0:?}")]
    InvalidId(String),
}

/// A certificate and its key, as PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
}

/// A CA able to sign.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    /// Its certificate, as PEM.
    pub cert_pem: String,
}

/// Validity: from a day ago (clock skew) for `days` days.
fn validity(params: &mut CertificateParams, days: u32) {
    let now = std::time::SystemTime::now();
    let day = std::time::Duration::from_secs(86_400);
    params.not_before = (now - day).into();
    params.not_after = (now + day * days).into();
}

impl Ca {
    /// A new self-signed CA.
    pub fn new(name: &str, days: u32) -> Result<Self, CertsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.distinguished_name.push(DnType::CommonName, name);
        validity(&mut params, days);
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        Ok(Self {
            cert,
            key,
            cert_pem,
        })
    }

    /// The CA's key, as PEM.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Loads a CA from its PEM certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertsError> {
        let key = KeyPair::from_pem(key_pem)?;
        let params = CertificateParams::from_ca_cert_pem(cert_pem)?;
        // Re-signed with the same key and name: an issuer equal to the one
        // devices and servers already trust.
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert,
            key,
            cert_pem: cert_pem.to_owned(),
        })
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn server(&self, names: &[String], days: u32) -> Result<Issued, CertsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        params
            .distinguished_name
            .push(DnType::CommonName, names.first().map_or("furrow", |n| n));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        validity(&mut params, days);
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A device certificate naming `device_id` (subject CN and DNS SAN),
    /// valid for `days` days.
    pub fn device(&self, device_id: &str, days: u32) -> Result<Issued, CertsError> {
        let now = std::time::SystemTime::now();
        let day = std::time::Duration::from_secs(86_400);
        self.device_valid(device_id, now - day, now + day * days)
    }

    /// A device certificate valid from `not_before` to `not_after` (tests
    /// make expired ones with this).
    pub fn device_valid(
        &self,
        device_id: &str,
        not_before: std::time::SystemTime,
        not_after: std::time::SystemTime,
    ) -> Result<Issued, CertsError> {
        if !furrow_proto::message::valid_device_id(device_id.as_bytes()) {
            return Err(CertsError::InvalidId(device_id.to_owned()));
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, device_id);
        params
            .subject_alt_names
            .push(SanType::DnsName(device_id.try_into()?));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn write_new(path: &Path, contents: &str, secret: bool) -> Result<(), CertsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| CertsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    if secret {
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => CertsError::Exists(path.to_path_buf()),
        _ => io(e),
    })?;
    f.write_all(contents.as_bytes()).map_err(io)
}

fn mkdir(dir: &Path) -> Result<(), CertsError> {
    std::fs::create_dir_all(dir).map_err(|source| CertsError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

/// Makes `ca.pem` and `ca.key` in `dir`; returns their paths.
pub fn make_ca(dir: &Path, days: u32) -> Result<Vec<PathBuf>, CertsError> {
    mkdir(dir)?;
    let ca = Ca::new("furrow development CA", days)?;
    let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
    write_new(&key, &ca.key_pem(), true)?;
    write_new(&cert, &ca.cert_pem, false)?;
    Ok(vec![cert, key])
}

/// Loads the CA in `dir`.
pub fn load_ca(dir: &Path) -> Result<Ca, CertsError> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => CertsError::NoCa(dir.display().to_string()),
            _ => CertsError::Io { path, source },
        })
    };
    Ca::from_pem(&read("ca.pem")?, &read("ca.key")?)
}

/// Makes `server.pem` and `server.key` in `dir`, signed by its CA.
pub fn make_server(dir: &Path, names: &[String], days: u32) -> Result<Vec<PathBuf>, CertsError> {
    let ca = load_ca(dir)?;
    let issued = ca.server(names, days)?;
    let (cert, key) = (dir.join("server.pem"), dir.join("server.key"));
    write_new(&key, &issued.key_pem, true)?;
    write_new(&cert, &issued.cert_pem, false)?;
    Ok(vec![cert, key])
}

/// Makes `devices/ID.pem` and `devices/ID.key` in `dir`, signed by its CA.
pub fn make_device(dir: &Path, device_id: &str, days: u32) -> Result<Vec<PathBuf>, CertsError> {
    let ca = load_ca(dir)?;
    let issued = ca.device(device_id, days)?;
    let devices = dir.join("devices");
    mkdir(&devices)?;
    let (cert, key) = (
        devices.join(format!("{device_id}.pem")),
        devices.join(format!("{device_id}.key")),
    );
    write_new(&key, &issued.key_pem, true)?;
    write_new(&cert, &issued.cert_pem, false)?;
    Ok(vec![cert, key])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_signs_servers_and_devices_that_rustls_accepts() {
        let dir = tempfile::tempdir().unwrap();
        make_ca(dir.path(), 30).unwrap();
        make_server(dir.path(), &["localhost".into(), "127.0.0.1".into()], 30).unwrap();
        make_device(dir.path(), "pump-7", 30).unwrap();
        // Never overwritten.
        assert!(matches!(
            make_ca(dir.path(), 30),
            Err(CertsError::Exists(_))
        ));
        assert!(matches!(
            make_device(dir.path(), "bad id", 30),
            Err(CertsError::InvalidId(_))
        ));
        // The device certificate names its device.
        let cert =
            crate::ingress::tls::read_certs("c", &dir.path().join("devices/pump-7.pem")).unwrap();
        use crate::ingress::tls::{identity, IdentityFrom};
        assert_eq!(
            identity(&cert[0], IdentityFrom::Cn).as_deref(),
            Some("pump-7")
        );
        assert_eq!(
            identity(&cert[0], IdentityFrom::San).as_deref(),
            Some("pump-7")
        );
        // The server pair loads as a TLS configuration with mutual TLS.
        let cfg = crate::config::Tls {
            cert_file: dir.path().join("server.pem"),
            key_file: dir.path().join("server.key"),
            client_ca_file: dir.path().join("ca.pem"),
            ..crate::config::Tls::default()
        };
        let state = crate::ingress::tls::TlsState::load(&cfg, 0).unwrap();
        assert!(state.mutual());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "keys are private");
    }

    #[test]
    fn no_ca_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            make_server(dir.path(), &["x".into()], 1),
            Err(CertsError::NoCa(_))
        ));
    }
}
