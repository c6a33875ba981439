//! TLS for the device listener: the server configuration (rustls, TLS 1.2
//! and 1.3 only, ring), mutual TLS, session resumption, and reloading
//! certificates without a restart.
//!
//! Fail closed: [`TlsState::load`] refuses a certificate, key or client CA
//! it cannot read or parse, so the gateway does not start half-secured.
//! A reload (SIGHUP, or a changed file seen by the watcher) that fails
//! keeps the configuration in force and logs why. New connections take
//! the configuration current at their accept; established sessions keep
//! theirs, untouched.
//!
//! Resumption: one ticketer and one session cache outlive reloads, so a
//! device resumes across a certificate rotation too (TLS 1.3 tickets, TLS
//! 1.2 session ids). QUIC keeps its tickets in a cache of its own
//! (`quic.session_cache`), each good for one resumption, since rustls
//! allows 0-RTT only on such tickets: a replayed flight finds none.
//!
//! Device identity under mutual TLS comes from the verified client
//! certificate: its subject CN, or its first DNS or URI SAN
//! (`tls.identity`); the session requires it to equal HELLO's device_id.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::{ProducesTickets, ServerSessionMemoryCache, StoresServerSessions};
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use crate::config::Tls as TlsConfig;

/// Where a device's id is read from in its client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentityFrom {
    /// The subject's common name.
    Cn,
    /// The first DNS name or URI in the subject alternative names.
    San,
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or held nothing usable.
    #[error("{what} {path}: {message}")]
    File {
        /// Which file it is (certificate, key, client CA).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// rustls refused the combination (a key that does not match, say).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client CA could not become a verifier.
    #[error("client CA: {0}")]
    Verifier(String),
}

fn file_err(what: &'static str, path: &Path, message: impl ToString) -> TlsError {
    TlsError::File {
        what,
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate of a PEM file (at least one).
pub fn read_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    // Read first: a missing or unreadable file says so plainly.
    let pem = std::fs::read(path).map_err(|e| file_err(what, path, e))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(what, path, e))?;
    if certs.is_empty() {
        return Err(file_err(what, path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

/// Reads a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = std::fs::read(path).map_err(|e| file_err("key", path, e))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| file_err("key", path, e))
}

/// The files' modification times, to notice a change.
fn stamps(cfg: &TlsConfig) -> Vec<Option<SystemTime>> {
    [&cfg.cert_file, &cfg.key_file, &cfg.client_ca_file]
        .iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

/// The TLS configuration in force, swapped whole on reload.
pub struct TlsState {
    cfg: TlsConfig,
    current: RwLock<Arc<ServerConfig>>,
    /// The same certificates for QUIC: TLS 1.3 only, ALPN `furrow/1`.
    quic: RwLock<Arc<ServerConfig>>,
    stamps: std::sync::Mutex<Vec<Option<SystemTime>>>,
    ticketer: Arc<dyn ProducesTickets>,
    cache: Arc<dyn StoresServerSessions>,
    /// QUIC's tickets, kept here (stateful) rather than sealed by the
    /// ticketer: rustls allows 0-RTT only on stateful tickets, each taken
    /// at its one use.
    quic_cache: Arc<dyn StoresServerSessions>,
}

impl std::fmt::Debug for TlsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsState")
            .field("cert_file", &self.cfg.cert_file)
            .field("client_ca_file", &self.cfg.client_ca_file)
            .finish()
    }
}

impl TlsState {
    /// Loads the certificate, key and (optional) client CA; fails closed.
    /// `quic_sessions`: QUIC session tickets remembered (`quic.session_cache`).
    pub fn load(cfg: &TlsConfig, quic_sessions: usize) -> Result<Arc<Self>, TlsError> {
        let ticketer = rustls::crypto::ring::Ticketer::new()?;
        let cache: Arc<dyn StoresServerSessions> =
            ServerSessionMemoryCache::new(cfg.session_cache.max(1));
        let quic_cache: Arc<dyn StoresServerSessions> = if quic_sessions == 0 {
            Arc::new(rustls::server::NoServerSessionStorage {})
        } else {
            Arc::new(QuicTickets::new(quic_sessions))
        };
        let stamps = stamps(cfg);
        let config = build(cfg, &ticketer, &cache, false)?;
        let quic = build(cfg, &ticketer, &quic_cache, true)?;
        Ok(Arc::new(Self {
            cfg: cfg.clone(),
            current: RwLock::new(config),
            quic: RwLock::new(quic),
            stamps: std::sync::Mutex::new(stamps),
            ticketer,
            cache,
            quic_cache,
        }))
    }

    /// The configuration for a new connection.
    pub fn current(&self) -> Arc<ServerConfig> {
        // A poisoned lock still holds a complete Arc.
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The configuration of the QUIC listener (TLS 1.3, ALPN `furrow/1`).
    pub fn quic_current(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.quic.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Whether devices must present a certificate.
    pub fn mutual(&self) -> bool {
        !self.cfg.client_ca_file.as_os_str().is_empty()
    }

    /// Where device ids come from in client certificates.
    pub fn identity_from(&self) -> IdentityFrom {
        self.cfg.identity
    }

    /// Loads the files again; on failure the old configuration stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let stamps = stamps(&self.cfg);
        let config = build(&self.cfg, &self.ticketer, &self.cache, false)?;
        let quic = build(&self.cfg, &self.ticketer, &self.quic_cache, true)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = config;
        *self.quic.write().unwrap_or_else(|p| p.into_inner()) = quic;
        *self.stamps.lock().unwrap_or_else(|p| p.into_inner()) = stamps;
        metrics::counter!("furrow_tls_reloads_total", "outcome" => "ok").increment(1);
        tracing::info!(cert = %self.cfg.cert_file.display(), "TLS certificates reloaded");
        Ok(())
    }

    /// Reloads if a file changed since the last load (the watcher).
    pub fn reload_if_changed(&self) {
        let now = stamps(&self.cfg);
        let changed = *self.stamps.lock().unwrap_or_else(|p| p.into_inner()) != now;
        if changed {
            self.reload_logged();
        }
    }

    /// Reloads, logging (not returning) a failure: the old configuration
    /// stays in force.
    pub fn reload_logged(&self) {
        if let Err(e) = self.reload() {
            metrics::counter!("furrow_tls_reloads_total", "outcome" => "error").increment(1);
            // Remember the stamps anyway: one log line per change, not one
            // per watch tick.
            *self.stamps.lock().unwrap_or_else(|p| p.into_inner()) = stamps(&self.cfg);
            tracing::error!(error = %e, "TLS reload failed; the previous certificates stay in force");
        }
    }
}

/// The rustls configuration of the TLS listener, or with `quic` of the
/// QUIC one (TLS 1.3 only, as QUIC requires, and ALPN `furrow/1`).
fn build(
    cfg: &TlsConfig,
    ticketer: &Arc<dyn ProducesTickets>,
    cache: &Arc<dyn StoresServerSessions>,
    quic: bool,
) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = read_certs("certificate", &cfg.cert_file)?;
    let key = read_key(&cfg.key_file)?;
    let versions: &[&rustls::SupportedProtocolVersion] = if quic {
        &[&rustls::version::TLS13]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let builder =
        ServerConfig::builder_with_provider(provider()).with_protocol_versions(versions)?;
    let builder = if cfg.client_ca_file.as_os_str().is_empty() {
        builder.with_no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        for ca in read_certs("client CA", &cfg.client_ca_file)? {
            roots
                .add(ca)
                .map_err(|e| file_err("client CA", &cfg.client_ca_file, e))?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        builder.with_client_cert_verifier(verifier)
    };
    let mut config = builder.with_single_cert(chain, key)?;
    config.session_storage = Arc::clone(cache);
    if quic {
        config.alpn_protocols = vec![super::quic::ALPN.to_vec()];
        // 0-RTT: early data only on a stateful ticket (no ticketer), which
        // rustls takes from the cache at its one use, so a replayed flight
        // finds no ticket and its early data is refused. One ticket per
        // connection: a device uses one per resumption.
        config.max_early_data_size = u32::MAX;
        config.send_tls13_tickets = 1;
    } else {
        config.ticketer = Arc::clone(ticketer);
        // TLS 1.3 records are sealed by tls_records.rs once the session
        // is established: rustls hands the traffic secrets over.
        config.enable_secret_extraction = true;
        config.key_log = Arc::new(super::tls_records::SecretCapture);
    }
    // Frames are small; the default 16 KiB records are fine, and rustls
    // bounds what it buffers for a peer that does not read (64 KiB).
    Ok(Arc::new(config))
}

/// QUIC's session tickets, each good for one resumption: rustls takes a
/// ticket (`take`) when a device resumes with it, so a replayed flight
/// finds none. Counts what resuming devices find.
///
/// Not rustls's `ServerSessionMemoryCache`: its `take` searches its
/// insertion order linearly, a cost per resumption that grows with the
/// fleet (one ticket per device: 100,000 by default). Here every
/// operation is O(1): a map in insertion order (hashlink, already built
/// for rusqlite), the oldest ticket evicted when full (its device's next
/// handshake is a full one). Measured side by side by `cargo bench -p
/// furrow --bench tickets`.
#[derive(Debug)]
pub struct QuicTickets {
    tickets: std::sync::Mutex<hashlink::LinkedHashMap<Vec<u8>, Vec<u8>>>,
    capacity: usize,
}

impl QuicTickets {
    /// Keeps up to `capacity` tickets (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            tickets: std::sync::Mutex::new(hashlink::LinkedHashMap::new()),
            capacity: capacity.max(1),
        }
    }

    fn tickets(&self) -> std::sync::MutexGuard<'_, hashlink::LinkedHashMap<Vec<u8>, Vec<u8>>> {
        // The map is consistent after every operation: a panic elsewhere
        // cannot leave it half-changed.
        self.tickets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tickets held.
    pub fn len(&self) -> usize {
        self.tickets().len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl StoresServerSessions for QuicTickets {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        let mut tickets = self.tickets();
        // A new ticket is the newest, even under a key seen before.
        tickets.remove(&key);
        while tickets.len() >= self.capacity {
            tickets.pop_front();
        }
        tickets.insert(key, value);
        true
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.tickets().get(key).cloned()
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        let found = self.tickets().remove(key);
        // The device offered a ticket, and 0-RTT data with it. Found: the
        // device resumes and its early data is taken. Not found: used
        // before (a replay), evicted, or issued by another instance or
        // before a restart; the handshake goes on in full and the early
        // data is discarded.
        let outcome = if found.is_some() {
            "accepted"
        } else {
            "rejected"
        };
        metrics::counter!("furrow_quic_0rtt_total", "outcome" => outcome).increment(1);
        found
    }

    fn can_cache(&self) -> bool {
        true
    }
}

/// The device id a verified client certificate names, per `from`.
pub fn identity(cert: &CertificateDer<'_>, from: IdentityFrom) -> Option<String> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    match from {
        IdentityFrom::Cn => x509
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned),
        IdentityFrom::San => {
            let san = x509.subject_alternative_name().ok()??;
            san.value.general_names.iter().find_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(s)
                | x509_parser::extensions::GeneralName::URI(s) => Some((*s).to_owned()),
                _ => None,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quic_ticket_is_good_once() {
        let t = QuicTickets::new(10);
        assert!(t.put(b"a".to_vec(), b"1".to_vec()));
        assert_eq!(t.get(b"a"), Some(b"1".to_vec()), "get leaves it");
        assert_eq!(t.take(b"a"), Some(b"1".to_vec()));
        assert_eq!(t.take(b"a"), None, "a replay finds none");
        assert!(t.is_empty());
    }

    #[test]
    fn a_full_quic_ticket_cache_evicts_its_oldest() {
        let t = QuicTickets::new(3);
        for k in [b"a", b"b", b"c"] {
            t.put(k.to_vec(), k.to_vec());
        }
        // Issued again: now the newest, so "b" is the oldest.
        t.put(b"a".to_vec(), b"a2".to_vec());
        t.put(b"d".to_vec(), b"d".to_vec());
        assert_eq!(t.len(), 3);
        assert_eq!(t.take(b"b"), None, "the oldest went");
        assert_eq!(t.take(b"a"), Some(b"a2".to_vec()));
        assert_eq!(t.take(b"c"), Some(b"c".to_vec()));
        assert_eq!(t.take(b"d"), Some(b"d".to_vec()));
        // Taking made room: nothing else is evicted.
        t.put(b"e".to_vec(), b"e".to_vec());
        t.put(b"f".to_vec(), b"f".to_vec());
        assert_eq!(t.get(b"e"), Some(b"e".to_vec()));
        // A cache of 0 keeps one: rustls asks for one ticket per handshake.
        let one = QuicTickets::new(0);
        assert!(one.put(b"x".to_vec(), vec![]));
        assert_eq!(one.len(), 1);
    }
}
