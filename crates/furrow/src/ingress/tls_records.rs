//! TLS records after the handshake, sealed and opened here instead of by
//! rustls, so that an idle TLS session keeps its traffic keys (a few
//! hundred bytes) instead of rustls's connection state (3.3 KB).
//!
//! This is the split kernel TLS makes: rustls runs the handshake, then
//! hands the traffic keys over (`dangerous_into_kernel_connection`); the
//! records themselves (RFC 8446 section 5) are simple enough to do here,
//! with ring's AEADs, the same code rustls would call. Kernel TLS is not
//! available on every host (this project's CI machine has none), so this
//! does it in user space.
//!
//! Key updates (RFC 8446, 7.2) need the application traffic secrets, not
//! only the keys rustls hands over. rustls keeps them in its
//! `KernelConnection` (800 bytes per connection, most of it state for
//! QUIC); the secrets themselves are 64-96 bytes. rustls gives them to a
//! [`KeyLog`] while the handshake runs, synchronously, on the thread that
//! drives it: [`SecretCapture`] takes them there (see [`capture`]), and
//! [`Records::new`] keeps its own key schedule when the keys it derives
//! from them are the ones rustls handed over, rustls's otherwise.
//!
//! Sans-IO: bytes in, plaintext and bytes to send out. The expanded AEAD
//! keys (~500 bytes each for AES-GCM) are built on first use and dropped by
//! [`Records::shed_keys`] when the session parks; the raw key, IV,
//! sequence number and traffic secret are all that a parked session keeps.
//!
//! What a peer may send after the handshake (RFC 8446, 5 and 4.6.3):
//! application data, alerts (close_notify ends the stream; user_canceled
//! is a warning; anything else is fatal) and KeyUpdate; anything else, a
//! record that fails authentication, or one over 2^14 bytes of plaintext
//! ends the connection with the alert the RFC names. TLS 1.2 has no key
//! update: its warnings are passed over, a renegotiation is refused with
//! a no_renegotiation warning (as rustls does) and the connection goes on.

use std::cell::RefCell;

use bytes::BytesMut;
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets, KeyLog};

/// Record header: type, legacy version, length.
const HEADER: usize = 5;
/// AEAD tag of every suite here (AES-GCM, ChaCha20-Poly1305).
const TAG: usize = 16;
/// Most plaintext in one record (RFC 8446, 5.1).
pub const MAX_PLAINTEXT: usize = 1 << 14;
/// Most ciphertext in one record: plaintext, content type, padding, tag.
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// TLS 1.2's bound (RFC 5246, 6.2.3).
const MAX_CIPHERTEXT_12: usize = MAX_PLAINTEXT + 2048;
/// TLS 1.2 AES-GCM's explicit nonce, sent before each record's ciphertext
/// (RFC 5288, 3).
const EXPLICIT_NONCE: usize = 8;

const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const KEY_UPDATE: u8 = 24;

/// Alert descriptions sent or understood here.
pub mod alert {
    pub const CLOSE_NOTIFY: u8 = 0;
    pub const NO_RENEGOTIATION: u8 = 100;
    pub const UNEXPECTED_MESSAGE: u8 = 10;
    pub const BAD_RECORD_MAC: u8 = 20;
    pub const RECORD_OVERFLOW: u8 = 22;
    pub const ILLEGAL_PARAMETER: u8 = 47;
    pub const DECODE_ERROR: u8 = 50;
    pub const INTERNAL_ERROR: u8 = 80;
    pub const USER_CANCELED: u8 = 90;
}

/// Why the record layer ends the connection.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("TLS record failed authentication")]
    BadRecordMac,
    #[error("TLS record of {0} bytes is over the limit")]
    Overflow(usize),
    #[error("unexpected TLS message: {0}")]
    Unexpected(&'static str),
    #[error("malformed TLS message: {0}")]
    Decode(&'static str),
    #[error("KeyUpdate with an invalid request value {0}")]
    IllegalKeyUpdate(u8),
    #[error("the peer sent TLS alert {0}")]
    PeerAlert(u8),
    #[error("TLS key schedule: {0}")]
    Keys(String),
    #[error("cipher suite {0} has no record layer here")]
    Unsupported(String),
}

impl RecordError {
    /// The alert to send the peer before closing, if any.
    pub fn alert(&self) -> Option<u8> {
        Some(match self {
            Self::BadRecordMac => alert::BAD_RECORD_MAC,
            Self::Overflow(_) => alert::RECORD_OVERFLOW,
            Self::Unexpected(_) => alert::UNEXPECTED_MESSAGE,
            Self::Decode(_) => alert::DECODE_ERROR,
            Self::IllegalKeyUpdate(_) => alert::ILLEGAL_PARAMETER,
            Self::PeerAlert(_) => return None,
            Self::Keys(_) | Self::Unsupported(_) => alert::INTERNAL_ERROR,
        })
    }
}

/// An application traffic secret (SHA-256 or SHA-384 long).
#[derive(Clone)]
pub struct Secret {
    bytes: [u8; 48],
    len: u8,
}

impl Secret {
    fn from_slice(s: &[u8]) -> Option<Self> {
        if s.len() != 32 && s.len() != 48 {
            return None;
        }
        let mut bytes = [0u8; 48];
        bytes[..s.len()].copy_from_slice(s);
        Some(Self {
            bytes,
            len: s.len() as u8,
        })
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    fn hash(&self) -> hkdf::Algorithm {
        if self.len == 48 {
            hkdf::HKDF_SHA384
        } else {
            hkdf::HKDF_SHA256
        }
    }

    /// HKDF-Expand-Label(secret, label, "", out.len()) (RFC 8446, 7.1).
    fn expand_label(&self, label: &[u8], out: &mut [u8]) -> Result<(), RecordError> {
        struct Len(usize);
        impl hkdf::KeyType for Len {
            fn len(&self) -> usize {
                self.0
            }
        }
        let length = u16::try_from(out.len())
            .map_err(|_| RecordError::Keys("label output too long".into()))?
            .to_be_bytes();
        let label_len = [(b"tls13 ".len() + label.len()) as u8];
        let info: [&[u8]; 5] = [&length, &label_len, b"tls13 ", label, &[0]];
        hkdf::Prk::new_less_safe(self.hash(), self.as_slice())
            .expand(&info, Len(out.len()))
            .and_then(|okm| okm.fill(out))
            .map_err(|_| RecordError::Keys("HKDF-Expand-Label failed".into()))
    }

    /// The next generation after a KeyUpdate (RFC 8446, 7.2).
    fn next(&self) -> Result<Self, RecordError> {
        let mut next = Self {
            bytes: [0; 48],
            len: self.len,
        };
        let len = usize::from(self.len);
        self.expand_label(b"traffic upd", &mut next.bytes[..len])?;
        Ok(next)
    }

    /// The key and IV this secret gives `alg` (RFC 8446, 7.3).
    fn keys(&self, alg: &'static aead::Algorithm) -> Result<([u8; 32], [u8; 12]), RecordError> {
        let mut key = [0u8; 32];
        let mut iv = [0u8; 12];
        self.expand_label(b"key", &mut key[..alg.key_len()])?;
        self.expand_label(b"iv", &mut iv)?;
        Ok((key, iv))
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.bytes.fill(0);
    }
}

/// Both directions' application traffic secrets.
#[derive(Clone, Default)]
pub struct TrafficSecrets {
    client: Option<Secret>,
    server: Option<Secret>,
}

/// Taking the traffic secrets from rustls while it runs a handshake.
///
/// rustls hands each secret to the configuration's [`KeyLog`] inside
/// `process_tls_records`, on the calling thread, with no await in
/// between. So the thread that drives a handshake arms a thread-local
/// slot before that call ([`capture::arm`]) and takes what came after it
/// ([`capture::take`]); a handshake driven without arming (or on another
/// thread) leaves nothing behind, and [`Records::new`] then keeps
/// rustls's key schedule.
pub mod capture {
    use super::*;

    thread_local! {
        static SLOT: RefCell<Option<TrafficSecrets>> = const { RefCell::new(None) };
    }

    /// Starts capturing on this thread.
    pub fn arm() {
        SLOT.with(|s| *s.borrow_mut() = Some(TrafficSecrets::default()));
    }

    /// Stops capturing; what came since [`arm`].
    pub fn take() -> TrafficSecrets {
        SLOT.with(|s| s.borrow_mut().take()).unwrap_or_default()
    }

    pub(super) fn put(label: &str, secret: &[u8]) {
        SLOT.with(|s| {
            if let Some(slot) = s.borrow_mut().as_mut() {
                let secret = Secret::from_slice(secret);
                match label {
                    "CLIENT_TRAFFIC_SECRET_0" => slot.client = secret,
                    "SERVER_TRAFFIC_SECRET_0" => slot.server = secret,
                    _ => {}
                }
            }
        });
    }
}

impl TrafficSecrets {
    /// Adds what a later capture found (the secrets come in different
    /// calls of the handshake).
    pub fn merge(&mut self, other: TrafficSecrets) {
        if other.client.is_some() {
            self.client = other.client;
        }
        if other.server.is_some() {
            self.server = other.server;
        }
    }
}

/// The [`KeyLog`] of the TCP listener's configuration: the application
/// traffic secrets to the thread's capture slot, nothing else, nowhere
/// else.
#[derive(Debug)]
pub struct SecretCapture;

impl KeyLog for SecretCapture {
    fn will_log(&self, label: &str) -> bool {
        matches!(label, "CLIENT_TRAFFIC_SECRET_0" | "SERVER_TRAFFIC_SECRET_0")
    }

    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        capture::put(label, secret);
    }
}

/// Where the next traffic secrets come from.
enum Schedule {
    /// Our own: the current secret of each direction.
    Own { tx: Secret, rx: Secret },
    /// rustls's, when the secrets were not captured.
    Rustls(Box<KernelConnection<ServerConnectionData>>),
    /// TLS 1.2: no key updates; the keys last the connection.
    Fixed,
}

/// One direction's keys: what a parked session keeps, plus the expanded
/// key while the session is active.
struct Keys {
    alg: &'static aead::Algorithm,
    key: [u8; 32],
    key_len: u8,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
    expanded: Option<Box<LessSafeKey>>,
}

impl Keys {
    /// From the key and IV of a traffic secret of ours.
    fn derive(
        alg: &'static aead::Algorithm,
        seq: u64,
        secret: &Secret,
    ) -> Result<Self, RecordError> {
        let (key, iv) = secret.keys(alg)?;
        Ok(Self {
            alg,
            key,
            key_len: alg.key_len() as u8,
            iv,
            seq,
            expanded: None,
        })
    }

    /// Whether both hold the same key and IV.
    fn same(&self, other: &Keys) -> bool {
        std::ptr::eq(self.alg, other.alg)
            && self.key == other.key
            && self.key_len == other.key_len
            && self.iv == other.iv
    }

    fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> Result<Self, RecordError> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(RecordError::Unsupported("a new AEAD".into())),
        };
        let (key, iv) = (key.as_ref(), iv.as_ref());
        let mut k = [0u8; 32];
        let mut i = [0u8; aead::NONCE_LEN];
        if key.len() != alg.key_len() || key.len() > k.len() || iv.len() != i.len() {
            return Err(RecordError::Keys("traffic key of the wrong length".into()));
        }
        k[..key.len()].copy_from_slice(key);
        i.copy_from_slice(iv);
        Ok(Self {
            alg,
            key: k,
            key_len: key.len() as u8,
            iv: i,
            seq,
            expanded: None,
        })
    }

    /// The expanded key, built on first use.
    fn key(&mut self) -> Result<&LessSafeKey, RecordError> {
        if self.expanded.is_none() {
            let unbound = UnboundKey::new(self.alg, &self.key[..usize::from(self.key_len)])
                .map_err(|_| RecordError::Keys("ring refused the traffic key".into()))?;
            self.expanded = Some(Box::new(LessSafeKey::new(unbound)));
        }
        match &self.expanded {
            Some(k) => Ok(k),
            None => Err(RecordError::Keys("no key".into())),
        }
    }

    /// The per-record nonce (RFC 8446, 5.3; the same construction for
    /// TLS 1.2's ChaCha20 and, as rustls does, for the nonces AES-GCM
    /// sends in TLS 1.2): the IV XOR the sequence number, which then
    /// moves on. Also returns that sequence number.
    fn next_nonce(&mut self) -> Result<([u8; aead::NONCE_LEN], u64), RecordError> {
        let mut n = self.iv;
        for (b, s) in n[aead::NONCE_LEN - 8..]
            .iter_mut()
            .zip(self.seq.to_be_bytes())
        {
            *b ^= s;
        }
        let seq = self.seq;
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or(RecordError::Keys("sequence numbers exhausted".into()))?;
        Ok((n, seq))
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        // Best effort: the raw key does not outlive the connection in
        // this allocation (ring's expanded key is its own business).
        self.key.fill(0);
        self.iv.fill(0);
    }
}

/// What [`Records::open`] found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    /// Bytes of the input taken (whole records only).
    pub consumed: usize,
    /// close_notify came; nothing after it is read.
    pub closed: bool,
}

/// The record layer of one established TLS connection.
pub struct Records {
    tx: Keys,
    rx: Keys,
    /// For the secrets after a KeyUpdate.
    schedule: Schedule,
    /// The start of a KeyUpdate split over records (at most its 4-byte
    /// header: it must end on a record boundary).
    hs: [u8; 4],
    hs_len: u8,
    /// Records sealed under one key before a KeyUpdate of ours (TLS 1.3)
    /// or before the connection ends (TLS 1.2, which has no key update).
    limit: u64,
    /// TLS 1.2's record format (RFC 5246, 6.2.3.3; RFC 5288; RFC 7905).
    tls12: bool,
}

impl Records {
    /// Takes over from rustls after the handshake: `secrets` and
    /// `kernel` from `dangerous_into_kernel_connection`, `captured` what
    /// [`SecretCapture`] took during the handshake. The key schedule is
    /// ours when the captured secrets give exactly the keys rustls handed
    /// over (not so if rustls already took a KeyUpdate), rustls's
    /// otherwise.
    pub fn new(
        secrets: ExtractedSecrets,
        kernel: KernelConnection<ServerConnectionData>,
        captured: TrafficSecrets,
    ) -> Result<Self, RecordError> {
        let (limit, tls12) = match kernel.negotiated_cipher_suite() {
            rustls::SupportedCipherSuite::Tls13(s) => (s.common.confidentiality_limit, false),
            rustls::SupportedCipherSuite::Tls12(s) => (s.common.confidentiality_limit, true),
        };
        let tx = Keys::new(secrets.tx.0, secrets.tx.1)?;
        let rx = Keys::new(secrets.rx.0, secrets.rx.1)?;
        let own = match (captured.server, captured.client) {
            _ if tls12 => Some(Schedule::Fixed),
            (Some(s), Some(c)) => {
                let mine = Keys::derive(tx.alg, tx.seq, &s)
                    .and_then(|t| Ok((t, Keys::derive(rx.alg, rx.seq, &c)?)));
                match mine {
                    Ok((t, r)) if t.same(&tx) && r.same(&rx) => {
                        Some(Schedule::Own { tx: s, rx: c })
                    }
                    _ => None,
                }
            }
            _ => None,
        };
        Ok(Self {
            tx,
            rx,
            schedule: own.unwrap_or_else(|| Schedule::Rustls(Box::new(kernel))),
            hs: [0; 4],
            hs_len: 0,
            limit: limit.min(u64::MAX / 2),
            tls12,
        })
    }

    #[cfg(test)]
    pub fn set_limit_for_tests(&mut self, limit: u64) {
        self.limit = limit;
    }

    /// Whether the key schedule is ours (rustls's state is gone).
    pub fn own_schedule(&self) -> bool {
        matches!(self.schedule, Schedule::Own { .. } | Schedule::Fixed)
    }

    /// The next keys of one direction (`tx`: ours, after our KeyUpdate;
    /// otherwise the peer's, after theirs).
    fn next_keys(&mut self, tx: bool) -> Result<Keys, RecordError> {
        let alg = if tx { self.tx.alg } else { self.rx.alg };
        match &mut self.schedule {
            Schedule::Own { tx: t, rx: r } => {
                let secret = if tx { t } else { r };
                *secret = secret.next()?;
                Keys::derive(alg, 0, secret)
            }
            Schedule::Rustls(k) => {
                let next = if tx {
                    k.update_tx_secret()
                } else {
                    k.update_rx_secret()
                };
                let (seq, secrets) = next.map_err(|e| RecordError::Keys(e.to_string()))?;
                Keys::new(seq, secrets)
            }
            Schedule::Fixed => Err(RecordError::Keys("TLS 1.2 has no key update".into())),
        }
    }

    /// Drops the expanded keys (rebuilt on the next record).
    pub fn shed_keys(&mut self) {
        self.tx.expanded = None;
        self.rx.expanded = None;
    }

    /// Opens every complete record at the front of `input` (in place):
    /// application data is appended to `plain`; a KeyUpdate the peer
    /// asks to be answered queues ours in `out`. Stops after close_notify.
    pub fn open(
        &mut self,
        input: &mut [u8],
        plain: &mut BytesMut,
        out: &mut Vec<u8>,
    ) -> Result<Opened, RecordError> {
        if self.tls12 {
            return self.open12(input, plain, out);
        }
        let mut done = Opened::default();
        while !done.closed {
            let rest = &mut input[done.consumed..];
            let Some(header) = rest.get(..HEADER) else {
                break;
            };
            let header: [u8; HEADER] = [header[0], header[1], header[2], header[3], header[4]];
            if header[0] != APPLICATION_DATA {
                return Err(RecordError::Unexpected("a record not protected"));
            }
            let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
            if len > MAX_CIPHERTEXT {
                return Err(RecordError::Overflow(len));
            }
            let Some(body) = rest.get_mut(HEADER..HEADER + len) else {
                break;
            };
            let (nonce, _) = self.rx.next_nonce()?;
            let opened = self
                .rx
                .key()?
                .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(header), body)
                .map_err(|_| RecordError::BadRecordMac)?;
            done.consumed += HEADER + len;
            // The content type is the last byte that is not padding.
            let end = opened
                .iter()
                .rposition(|&b| b != 0)
                .ok_or(RecordError::Unexpected("a record of padding only"))?;
            let (content, kind) = (&opened[..end], opened[end]);
            if content.len() > MAX_PLAINTEXT {
                return Err(RecordError::Overflow(content.len()));
            }
            if self.hs_len > 0 && kind != HANDSHAKE {
                return Err(RecordError::Unexpected(
                    "a record inside a handshake message",
                ));
            }
            match kind {
                APPLICATION_DATA => plain.extend_from_slice(content),
                ALERT => match content {
                    [_, alert::CLOSE_NOTIFY] => done.closed = true,
                    [_, alert::USER_CANCELED] => {}
                    [_, desc] => return Err(RecordError::PeerAlert(*desc)),
                    _ => return Err(RecordError::Decode("an alert of the wrong length")),
                },
                HANDSHAKE => self.handshake(content, out)?,
                _ => return Err(RecordError::Unexpected("a record of an unknown type")),
            }
        }
        Ok(done)
    }

    /// [`Self::open`] for TLS 1.2: the record's type is its own, the
    /// additional data is the sequence number, type, version and
    /// plaintext length, and AES-GCM sends the nonce's last 8 bytes.
    fn open12(
        &mut self,
        input: &mut [u8],
        plain: &mut BytesMut,
        out: &mut Vec<u8>,
    ) -> Result<Opened, RecordError> {
        let gcm = !std::ptr::eq(self.rx.alg, &aead::CHACHA20_POLY1305);
        let explicit = if gcm { EXPLICIT_NONCE } else { 0 };
        let mut done = Opened::default();
        while !done.closed {
            let rest = &mut input[done.consumed..];
            let Some(header) = rest.get(..HEADER) else {
                break;
            };
            let (kind, version) = (header[0], [header[1], header[2]]);
            let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
            if !matches!(kind, APPLICATION_DATA | ALERT | HANDSHAKE) {
                return Err(RecordError::Unexpected("a record of an unexpected type"));
            }
            if len > MAX_CIPHERTEXT_12 {
                return Err(RecordError::Overflow(len));
            }
            let Some(body) = rest.get_mut(HEADER..HEADER + len) else {
                break;
            };
            let Some(plain_len) = len.checked_sub(explicit + TAG) else {
                return Err(RecordError::BadRecordMac);
            };
            let (mut nonce, seq) = self.rx.next_nonce()?;
            if gcm {
                nonce[4..].copy_from_slice(&body[..EXPLICIT_NONCE]);
            }
            let aad = aad12(seq, kind, version, plain_len);
            let content = self
                .rx
                .key()?
                .open_within(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(aad),
                    body,
                    explicit..,
                )
                .map_err(|_| RecordError::BadRecordMac)?;
            done.consumed += HEADER + len;
            if content.len() > MAX_PLAINTEXT {
                return Err(RecordError::Overflow(content.len()));
            }
            match kind {
                APPLICATION_DATA => plain.extend_from_slice(content),
                ALERT => match content {
                    [_, alert::CLOSE_NOTIFY] => done.closed = true,
                    // Warnings go on (RFC 5246, 7.2).
                    [1, _] => {}
                    [_, desc] => return Err(RecordError::PeerAlert(*desc)),
                    _ => return Err(RecordError::Decode("an alert of the wrong length")),
                },
                // A renegotiation: refused with a warning, as rustls
                // does, and the connection goes on.
                _ => self.seal_one(ALERT, &[1, alert::NO_RENEGOTIATION], out)?,
            }
        }
        Ok(done)
    }

    /// A handshake record's content: only KeyUpdate may come now.
    fn handshake(&mut self, mut content: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        if content.is_empty() {
            return Err(RecordError::Unexpected("an empty handshake record"));
        }
        while !content.is_empty() {
            let need = 4 - usize::from(self.hs_len);
            if need > 0 {
                let take = need.min(content.len());
                let at = usize::from(self.hs_len);
                self.hs[at..at + take].copy_from_slice(&content[..take]);
                self.hs_len += take as u8;
                content = &content[take..];
                if self.hs_len < 4 {
                    break;
                }
                if self.hs != [KEY_UPDATE, 0, 0, 1] {
                    return Err(RecordError::Unexpected(
                        "a handshake message other than KeyUpdate after the handshake",
                    ));
                }
                if content.is_empty() {
                    // The request byte comes in the next record.
                    break;
                }
            }
            // The request byte, last in its record (a key change follows).
            let [request] = content else {
                return Err(RecordError::Unexpected(
                    "a KeyUpdate not aligned with its record's end",
                ));
            };
            content = &[];
            self.hs_len = 0;
            if *request > 1 {
                return Err(RecordError::IllegalKeyUpdate(*request));
            }
            self.rx = self.next_keys(false)?;
            if *request == 1 {
                self.update_tx(out)?;
            }
        }
        Ok(())
    }

    /// Sends a KeyUpdate (not requesting one back) under the current key,
    /// then moves to the next.
    fn update_tx(&mut self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        self.seal_one(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0], out)?;
        self.tx = self.next_keys(true)?;
        Ok(())
    }

    /// Seals `data` as application data records into `out`.
    pub fn seal(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        for chunk in data.chunks(MAX_PLAINTEXT) {
            self.seal_one(APPLICATION_DATA, chunk, out)?;
        }
        Ok(())
    }

    /// Seals an alert (close_notify is a warning, the rest fatal).
    pub fn seal_alert(&mut self, desc: u8, out: &mut Vec<u8>) -> Result<(), RecordError> {
        let level = if desc == alert::CLOSE_NOTIFY { 1 } else { 2 };
        self.seal_one(ALERT, &[level, desc], out)
    }

    fn seal_one(&mut self, kind: u8, data: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        if self.tls12 {
            if self.tx.seq >= self.limit {
                return Err(RecordError::Keys(
                    "the suite's confidentiality limit".into(),
                ));
            }
            return self.seal12(kind, data, out);
        }
        if self.tx.seq >= self.limit && kind != HANDSHAKE {
            // Near the suite's confidentiality limit: fresh keys first.
            self.update_tx(out)?;
        }
        self.seal_record(&[data, &[kind]], out)
    }

    /// One TLS 1.2 record of `kind`.
    fn seal12(&mut self, kind: u8, data: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        let gcm = !std::ptr::eq(self.tx.alg, &aead::CHACHA20_POLY1305);
        let (nonce, seq) = self.tx.next_nonce()?;
        let explicit: &[u8] = if gcm { &nonce[4..] } else { &[] };
        let len = explicit.len() + data.len() + TAG;
        let start = out.len();
        out.reserve(HEADER + len);
        out.extend_from_slice(&[kind, 3, 3, (len >> 8) as u8, len as u8]);
        out.extend_from_slice(explicit);
        let body = out.len();
        out.extend_from_slice(data);
        let aad = aad12(seq, kind, [3, 3], data.len());
        self.seal_in_place(nonce, &aad, out, start, body)
    }

    /// Seals one record whose inner plaintext (content, type, padding)
    /// is `parts` one after the other.
    fn seal_record(&mut self, parts: &[&[u8]], out: &mut Vec<u8>) -> Result<(), RecordError> {
        let len = parts.iter().map(|p| p.len()).sum::<usize>() + TAG;
        let header = [APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
        let start = out.len();
        out.reserve(HEADER + len);
        out.extend_from_slice(&header);
        for p in parts {
            out.extend_from_slice(p);
        }
        let (nonce, _) = self.tx.next_nonce()?;
        self.seal_in_place(nonce, &header, out, start, start + HEADER)
    }

    /// Seals `out[body..]` in place and appends the tag; on a failure the
    /// record (from `start`) is taken back out.
    fn seal_in_place(
        &mut self,
        nonce: [u8; aead::NONCE_LEN],
        aad: &[u8],
        out: &mut Vec<u8>,
        start: usize,
        body: usize,
    ) -> Result<(), RecordError> {
        let sealed = self.tx.key().and_then(|k| {
            k.seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut out[body..],
            )
            .map_err(|_| RecordError::Keys("sealing failed".into()))
        });
        match sealed {
            Ok(tag) => {
                out.extend_from_slice(tag.as_ref());
                Ok(())
            }
            Err(e) => {
                out.truncate(start);
                Err(e)
            }
        }
    }
}

/// TLS 1.2's additional data (RFC 5246, 6.2.3.3).
fn aad12(seq: u64, kind: u8, version: [u8; 2], len: usize) -> [u8; 13] {
    let mut aad = [0u8; 13];
    aad[..8].copy_from_slice(&seq.to_be_bytes());
    aad[8] = kind;
    aad[9..11].copy_from_slice(&version);
    aad[11..].copy_from_slice(&(len as u16).to_be_bytes());
    aad
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    impl Records {
        /// Both ends of a connection without rustls: (gateway, device).
        fn pair(alg: &'static aead::Algorithm, hash_len: usize) -> (Records, Records) {
            Self::pair_of(alg, hash_len, false)
        }

        fn pair_of(
            alg: &'static aead::Algorithm,
            hash_len: usize,
            tls12: bool,
        ) -> (Records, Records) {
            let s = Secret::from_slice(&vec![7u8; hash_len]).unwrap();
            let c = Secret::from_slice(&vec![9u8; hash_len]).unwrap();
            let end = |tx: &Secret, rx: &Secret| Records {
                tx: Keys::derive(alg, 0, tx).unwrap(),
                rx: Keys::derive(alg, 0, rx).unwrap(),
                schedule: Schedule::Own {
                    tx: tx.clone(),
                    rx: rx.clone(),
                },
                hs: [0; 4],
                hs_len: 0,
                limit: u64::MAX / 2,
                tls12,
            };
            (end(&s, &c), end(&c, &s))
        }
    }

    /// What the device sends, one record each unless split.
    #[derive(Debug, Clone)]
    enum Msg {
        Data(Vec<u8>, usize),
        UserCanceled,
        KeyUpdate { request: bool, split: usize },
        Close,
        Bad(Bad),
    }

    /// Records that must end the connection.
    #[derive(Debug, Clone)]
    enum Bad {
        UnknownType(u8),
        EmptyHandshake,
        OtherHandshake(u8),
        OnlyPadding(usize),
        AlertOfThree,
        FatalAlert(u8),
        IllegalKeyUpdate(u8),
        KeyUpdateWithMore,
        DataInsideKeyUpdate,
        Tampered,
    }

    fn msg() -> impl Strategy<Value = Msg> {
        let bad = prop_oneof![
            (0u8..=255)
                .prop_filter("not a known type", |t| ![0, 21, 22, 23].contains(t))
                .prop_map(Bad::UnknownType),
            Just(Bad::EmptyHandshake),
            (0u8..=255)
                .prop_filter("not KeyUpdate", |t| *t != KEY_UPDATE)
                .prop_map(Bad::OtherHandshake),
            (0usize..40).prop_map(Bad::OnlyPadding),
            Just(Bad::AlertOfThree),
            (1u8..=255)
                .prop_filter("fatal", |d| *d != alert::USER_CANCELED)
                .prop_map(Bad::FatalAlert),
            (2u8..=255).prop_map(Bad::IllegalKeyUpdate),
            Just(Bad::KeyUpdateWithMore),
            Just(Bad::DataInsideKeyUpdate),
            Just(Bad::Tampered),
        ];
        prop_oneof![
            8 => (proptest::collection::vec(any::<u8>(), 0..300), 0usize..20)
                .prop_map(|(d, pad)| Msg::Data(d, pad)),
            1 => Just(Msg::UserCanceled),
            3 => (any::<bool>(), 0usize..5).prop_map(|(request, split)| Msg::KeyUpdate { request, split }),
            1 => Just(Msg::Close),
            1 => bad.prop_map(Msg::Bad),
        ]
    }

    /// The device's side: seals `m` into `wire` (moving its keys on
    /// after a KeyUpdate of its own).
    fn send(dev: &mut Records, m: &Msg, wire: &mut Vec<u8>) {
        let pad = |n: usize| vec![0u8; n];
        match m {
            Msg::Data(d, p) => dev
                .seal_record(&[d, &[APPLICATION_DATA], &pad(*p)], wire)
                .unwrap(),
            Msg::UserCanceled => dev
                .seal_record(&[&[1, alert::USER_CANCELED], &[ALERT]], wire)
                .unwrap(),
            Msg::Close => dev.seal_alert(alert::CLOSE_NOTIFY, wire).unwrap(),
            Msg::KeyUpdate { request, split } => {
                let ku = [KEY_UPDATE, 0, 0, 1, u8::from(*request)];
                let at = (*split).min(4);
                if at == 0 {
                    dev.seal_record(&[&ku, &[HANDSHAKE]], wire).unwrap();
                } else {
                    dev.seal_record(&[&ku[..at], &[HANDSHAKE]], wire).unwrap();
                    dev.seal_record(&[&ku[at..], &[HANDSHAKE], &pad(3)], wire)
                        .unwrap();
                }
                dev.tx = dev.next_keys(true).unwrap();
            }
            Msg::Bad(b) => match b {
                Bad::UnknownType(t) => dev.seal_record(&[b"x", &[*t]], wire).unwrap(),
                Bad::EmptyHandshake => dev.seal_record(&[&[HANDSHAKE]], wire).unwrap(),
                Bad::OtherHandshake(t) => dev
                    .seal_record(&[&[*t, 0, 0, 1, 0], &[HANDSHAKE]], wire)
                    .unwrap(),
                Bad::OnlyPadding(n) => dev.seal_record(&[&pad(*n)], wire).unwrap(),
                Bad::AlertOfThree => dev.seal_record(&[&[1, 0, 0], &[ALERT]], wire).unwrap(),
                Bad::FatalAlert(d) => dev.seal_record(&[&[2, *d], &[ALERT]], wire).unwrap(),
                Bad::IllegalKeyUpdate(r) => dev
                    .seal_record(&[&[KEY_UPDATE, 0, 0, 1, *r], &[HANDSHAKE]], wire)
                    .unwrap(),
                Bad::KeyUpdateWithMore => dev
                    .seal_record(&[&[KEY_UPDATE, 0, 0, 1, 0, 1], &[HANDSHAKE]], wire)
                    .unwrap(),
                Bad::DataInsideKeyUpdate => {
                    dev.seal_record(&[&[KEY_UPDATE, 0], &[HANDSHAKE]], wire)
                        .unwrap();
                    dev.seal_record(&[b"data", &[APPLICATION_DATA]], wire)
                        .unwrap();
                }
                Bad::Tampered => {
                    let start = wire.len();
                    dev.seal_record(&[b"reading", &[APPLICATION_DATA]], wire)
                        .unwrap();
                    let i = start + HEADER + 3;
                    wire[i] ^= 0x40;
                }
            },
        }
    }

    fn suites() -> impl Strategy<Value = (&'static aead::Algorithm, usize)> {
        prop_oneof![
            Just((&aead::AES_128_GCM, 32)),
            Just((&aead::AES_256_GCM, 48)),
            Just((&aead::CHACHA20_POLY1305, 32)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Against a model of RFC 8446's record rules: the gateway
        /// delivers exactly the application data sent before the first
        /// close_notify or bad record, ends with an error exactly at a
        /// bad record, follows the device's key updates (answering the
        /// ones that ask), and its own records stay readable to the
        /// device throughout; however the bytes are split.
        #[test]
        fn the_record_layer_follows_the_model(
            suite in suites(),
            msgs in proptest::collection::vec(msg(), 0..24),
            chunks in proptest::collection::vec(1usize..200, 1..6),
        ) {
            let (mut gw, mut dev) = Records::pair(suite.0, suite.1);
            let mut wire = Vec::new();
            let mut expected = Vec::new();
            let mut ends = None;
            let mut requests = 0;
            for m in &msgs {
                send(&mut dev, m, &mut wire);
                match m {
                    Msg::KeyUpdate { request: true, .. } => requests += 1,
                    Msg::Data(d, _) => expected.extend_from_slice(d),
                    Msg::Close => { ends = Some(true); break; }
                    Msg::Bad(_) => { ends = Some(false); break; }
                    _ => {}
                }
            }
            // The gateway reads it in pieces, answering into `back`.
            let mut pending = Vec::new();
            let mut plain = BytesMut::new();
            let mut back = Vec::new();
            let (mut at, mut i) = (0, 0);
            let mut outcome = None;
            while at < wire.len() && outcome.is_none() {
                let n = chunks[i % chunks.len()].min(wire.len() - at);
                pending.extend_from_slice(&wire[at..at + n]);
                at += n;
                i += 1;
                match gw.open(&mut pending, &mut plain, &mut back) {
                    Ok(o) => {
                        pending.drain(..o.consumed);
                        if o.closed {
                            outcome = Some(true);
                        }
                    }
                    Err(e) => {
                        prop_assert!(e.alert().is_some() || matches!(e, RecordError::PeerAlert(_)));
                        outcome = Some(false);
                    }
                }
            }
            prop_assert_eq!(outcome, ends);
            prop_assert_eq!(&plain[..], &expected[..]);
            if ends.is_none() {
                prop_assert!(pending.is_empty(), "whole records all taken");
            }
            if ends != Some(false) {
                // The gateway's records (its KeyUpdates first) open on
                // the device's side, and so does what it sends next.
                gw.seal(b"ack", &mut back).unwrap();
                let Schedule::Own { rx: first, .. } = &dev.schedule else { unreachable!() };
                let mut want = first.clone();
                for _ in 0..requests {
                    want = want.next().unwrap();
                }
                let mut got = BytesMut::new();
                let mut sink = Vec::new();
                let o = dev.open(&mut back, &mut got, &mut sink).unwrap();
                prop_assert_eq!(&got[..], b"ack");
                prop_assert!(!o.closed);
                // One KeyUpdate of the gateway's per request, no more.
                let Schedule::Own { rx: now, .. } = &dev.schedule else { unreachable!() };
                prop_assert_eq!(now.as_slice(), want.as_slice());
            }
        }
    }

    /// TLS 1.2's records (AES-GCM with its explicit nonce, ChaCha20
    /// without): data either way, warnings passed over, a renegotiation
    /// refused with a warning while the connection goes on, a fatal alert
    /// or a tampered record ending it, close_notify.
    #[test]
    fn tls12_records() {
        for alg in [
            &aead::AES_128_GCM,
            &aead::AES_256_GCM,
            &aead::CHACHA20_POLY1305,
        ] {
            let (mut gw, mut dev) = Records::pair_of(alg, 32, true);
            let mut wire = Vec::new();
            dev.seal(b"one", &mut wire).unwrap();
            dev.seal_one(HANDSHAKE, &[1, 0, 0, 4, 3, 3, 0, 0], &mut wire)
                .unwrap();
            dev.seal_one(ALERT, &[1, alert::NO_RENEGOTIATION], &mut wire)
                .unwrap();
            dev.seal(&vec![5u8; 20_000], &mut wire).unwrap();
            let (mut plain, mut back) = (BytesMut::new(), Vec::new());
            let o = gw.open(&mut wire, &mut plain, &mut back).unwrap();
            assert_eq!(
                o,
                Opened {
                    consumed: wire.len(),
                    closed: false
                }
            );
            assert_eq!(plain.len(), 3 + 20_000);
            assert_eq!(&plain[..3], b"one");
            // The refusal, then the gateway's data, open on the device.
            gw.seal(b"ack", &mut back).unwrap();
            let mut got = BytesMut::new();
            let o = dev.open(&mut back, &mut got, &mut Vec::new()).unwrap();
            assert_eq!((&got[..], o.closed), (&b"ack"[..], false));

            let mut wire = Vec::new();
            dev.seal_alert(alert::CLOSE_NOTIFY, &mut wire).unwrap();
            let o = gw
                .open(&mut wire, &mut BytesMut::new(), &mut Vec::new())
                .unwrap();
            assert!(o.closed);

            let (mut gw, mut dev) = Records::pair_of(alg, 32, true);
            let mut wire = Vec::new();
            dev.seal_alert(alert::BAD_RECORD_MAC, &mut wire).unwrap();
            assert!(matches!(
                gw.open(&mut wire, &mut BytesMut::new(), &mut Vec::new()),
                Err(RecordError::PeerAlert(alert::BAD_RECORD_MAC))
            ));

            let (mut gw, mut dev) = Records::pair_of(alg, 32, true);
            let mut wire = Vec::new();
            dev.seal(b"reading", &mut wire).unwrap();
            let at = wire.len() - 20;
            wire[at] ^= 1;
            let mut plain = BytesMut::new();
            assert!(matches!(
                gw.open(&mut wire, &mut plain, &mut Vec::new()),
                Err(RecordError::BadRecordMac)
            ));
            assert!(plain.is_empty());
        }
    }

    #[test]
    fn key_update_labels_follow_rfc_8446() {
        // RFC 8448 (example handshake traces), section 3: the server's
        // application traffic secret and the key and IV it gives for
        // TLS_AES_128_GCM_SHA256.
        let hex = |s: &str| -> Vec<u8> {
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect()
        };
        let secret = Secret::from_slice(&hex(
            "a11af9f05531f856ad47116b45a950328204b4f44bfb6b3a4b4f1f3fcb631643",
        ))
        .unwrap();
        let (key, iv) = secret.keys(&aead::AES_128_GCM).unwrap();
        assert_eq!(&key[..16], &hex("9f02283b6c9c07efc26bb9f2ac92e356")[..]);
        assert_eq!(&iv[..], &hex("cf782b88dd83549aadf1e984")[..]);
    }
}
