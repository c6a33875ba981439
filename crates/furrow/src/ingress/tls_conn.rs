//! A device's TLS state: rustls' unbuffered API, with the ciphertext
//! buffers owned here so that an idle connection holds none.
//!
//! rustls' buffered `ServerConnection` keeps a read buffer of at least
//! 4 KiB (zero-filled, so resident) and its write queues for the life of
//! the connection. Through the unbuffered API the caller owns those
//! buffers: here `incoming` holds ciphertext read and not yet processed
//! (at most a partial record between reads) and `outgoing` records
//! encrypted and not yet written. Both are released when the connection
//! goes idle ([`TlsConn::release_idle`]) and are not part of what a
//! parked session keeps.
//!
//! Once a session first goes idle, rustls hands the records over to
//! [`super::tls_records`]: what stays while parked is the connection's
//! traffic keys, a few hundred bytes instead of rustls's 3.3 KB of state.
//!
//! No I/O happens here beyond the non-blocking reads and writes the
//! caller asks for on its socket: [`super::connection::Connection`] waits
//! for readiness, as it does for plain TCP.

use std::io;
use std::sync::Arc;

use bytes::BytesMut;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use tokio::net::TcpStream;

use super::connection::Socket;
use tracing::warn;

use super::tls_records::{self, Records};

/// What the connection needs after its buffered records are processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// More bytes from the peer (the handshake is blocked on them).
    Read,
    /// Application data may flow: the handshake is complete and every
    /// complete record has been processed.
    Traffic,
    /// The peer sent close_notify (after any data it sent before).
    PeerClosed,
}

/// Ciphertext read per socket read while the handshake runs.
const HANDSHAKE_READ: usize = 4096;

/// Room for a record's header, tag and padding beyond its payload.
const RECORD_OVERHEAD: usize = 64;

/// Most plaintext encrypted per call: bounds `outgoing` to about this
/// much beyond what the socket has not taken yet.
const ENCRYPT_MAX: usize = 64 * 1024;

/// Who seals and opens the records.
enum State {
    /// The handshake, until the session first goes idle.
    Rustls(Box<UnbufferedServerConnection>),
    /// After that.
    Records(Box<Records>),
    /// Between the two, or after a failed hand-over: no more records.
    Gone,
}

/// One device's TLS connection.
pub struct TlsConn {
    state: State,
    /// The traffic secrets rustls logged during the handshake (taken by
    /// the record layer at the hand-over).
    captured: tls_records::TrafficSecrets,
    /// The protocol version and whether the handshake resumed a session
    /// (kept: rustls's connection does not outlive the hand-over).
    version: &'static str,
    resumed: bool,
    /// Ciphertext read and not yet processed.
    incoming: Vec<u8>,
    /// Records not yet written; `sent` of them already are.
    outgoing: Vec<u8>,
    sent: usize,
    /// close_notify seen and reported once.
    peer_closed: bool,
    /// close_notify to be sent at the next write.
    close: bool,
}

impl std::fmt::Debug for TlsConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConn")
            .field("incoming", &self.incoming.len())
            .field("outgoing", &(self.outgoing.len() - self.sent))
            .finish_non_exhaustive()
    }
}

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Runs `f` on the spare room at the end of `buf`, growing it to the size
/// `f` asks for when the room was too small.
fn append_with<E>(
    buf: &mut Vec<u8>,
    guess: usize,
    mut f: impl FnMut(&mut [u8]) -> Result<usize, E>,
    required: impl Fn(&E) -> Option<usize>,
) -> Result<(), E> {
    let start = buf.len();
    let mut room = guess;
    loop {
        buf.resize(start + room, 0);
        match f(&mut buf[start..]) {
            Ok(n) => {
                buf.truncate(start + n);
                return Ok(());
            }
            Err(e) => {
                buf.truncate(start);
                match required(&e) {
                    Some(need) if need > room => room = need,
                    _ => return Err(e),
                }
            }
        }
    }
}

/// [`append_with`] for what rustls encrypts (records, close_notify).
fn encrypt_into(
    buf: &mut Vec<u8>,
    guess: usize,
    f: impl FnMut(&mut [u8]) -> Result<usize, EncryptError>,
) -> io::Result<()> {
    append_with(buf, guess, f, |e| match e {
        EncryptError::InsufficientSize(s) => Some(s.required_size),
        _ => None,
    })
    .map_err(|e| io::Error::other(e.to_string()))
}

impl TlsConn {
    /// Runs the handshake on `stream`. `early` holds bytes already read
    /// (the start of the ClientHello, after a PROXY header); application
    /// data that arrives with the handshake's last flight is appended to
    /// `plain`. The caller bounds this in time. Returns the connection and
    /// the ciphertext bytes read and written.
    pub async fn accept(
        stream: &TcpStream,
        config: Arc<rustls::ServerConfig>,
        early: &[u8],
        plain: &mut BytesMut,
    ) -> io::Result<(Box<Self>, u64, u64)> {
        let mut tls = Self::new(config, early)?;
        let (mut read, mut written) = (0u64, 0u64);
        loop {
            let next = tls.process(plain, None);
            // Handshake records, or an alert after an error: out first.
            while tls.unsent() > 0 {
                match tls.write_to(stream) {
                    Ok(n) => written += n as u64,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => stream.writable().await?,
                    Err(e) => return Err(e),
                }
            }
            match next? {
                Next::Traffic => {
                    // The handshake's buffers are the largest this
                    // connection holds: gone before the session starts.
                    tls.release_buffers();
                    tls.note_handshake();
                    return Ok((tls, read, written));
                }
                Next::PeerClosed => return Err(io::ErrorKind::UnexpectedEof.into()),
                Next::Read => {
                    // While the device answers (a round trip), hold no
                    // buffer: a burst of handshakes waits here, and what
                    // it holds is what it scatters the long-lived objects
                    // allocated meanwhile over (docs/performance.md).
                    tls.release_buffers();
                    stream.readable().await?;
                    match tls.read_from(stream, HANDSHAKE_READ) {
                        Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                        Ok(n) => read += n as u64,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }

    /// Processes every complete record in `incoming`: application data is
    /// appended to `plain`; handshake records, alerts and close_notify,
    /// and `send` (encrypted once the handshake allows, up to
    /// [`ENCRYPT_MAX`] and advanced past what was taken) go to `outgoing`.
    /// On an error the alert rustls queued is encoded too, for the caller
    /// to send on a best-effort basis.
    pub fn process(
        &mut self,
        plain: &mut BytesMut,
        send: Option<&mut BytesMut>,
    ) -> io::Result<Next> {
        match &mut self.state {
            State::Rustls(_) => self.process_rustls(plain, send),
            State::Records(_) => self.process_records(plain, send),
            State::Gone => Err(io::Error::other("TLS connection lost its state")),
        }
    }

    fn new(config: Arc<rustls::ServerConfig>, early: &[u8]) -> io::Result<Box<Self>> {
        Ok(Box::new(Self {
            state: State::Rustls(Box::new(
                UnbufferedServerConnection::new(config).map_err(tls_err)?,
            )),
            captured: Default::default(),
            version: "other",
            resumed: false,
            incoming: early.to_vec(),
            outgoing: Vec::new(),
            sent: 0,
            peer_closed: false,
            close: false,
        }))
    }

    /// Keeps what the session may ask about the handshake later.
    fn note_handshake(&mut self) {
        if let State::Rustls(conn) = &self.state {
            self.version = match conn.protocol_version() {
                Some(rustls::ProtocolVersion::TLSv1_3) => "1.3",
                Some(rustls::ProtocolVersion::TLSv1_2) => "1.2",
                _ => "other",
            };
            self.resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        }
    }

    /// [`Self::process`] after the hand-over.
    fn process_records(
        &mut self,
        plain: &mut BytesMut,
        send: Option<&mut BytesMut>,
    ) -> io::Result<Next> {
        let State::Records(rec) = &mut self.state else {
            return Err(io::Error::other("not in the record layer"));
        };
        if !self.peer_closed {
            match rec.open(&mut self.incoming, plain, &mut self.outgoing) {
                Ok(opened) => {
                    self.incoming.drain(..opened.consumed);
                    if opened.closed {
                        self.peer_closed = true;
                        // Nothing after close_notify is read.
                        self.incoming = Vec::new();
                    }
                }
                Err(e) => {
                    if let Some(alert) = e.alert() {
                        // Best effort, as rustls does with its alert.
                        let _ = rec.seal_alert(alert, &mut self.outgoing);
                    }
                    self.incoming = Vec::new();
                    return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                }
            }
        }
        let sealed = (|| {
            if let Some(out) = send.filter(|o| !o.is_empty()) {
                let n = out.len().min(ENCRYPT_MAX);
                rec.seal(&out[..n], &mut self.outgoing)?;
                let _ = out.split_to(n);
            }
            if self.close {
                self.close = false;
                rec.seal_alert(tls_records::alert::CLOSE_NOTIFY, &mut self.outgoing)?;
            }
            Ok::<_, tls_records::RecordError>(())
        })();
        sealed.map_err(io::Error::other)?;
        Ok(if self.peer_closed {
            Next::PeerClosed
        } else {
            Next::Traffic
        })
    }

    /// [`Self::process`] through rustls.
    fn process_rustls(
        &mut self,
        plain: &mut BytesMut,
        mut send: Option<&mut BytesMut>,
    ) -> io::Result<Next> {
        let State::Rustls(conn) = &mut self.state else {
            return Err(io::Error::other("not in rustls"));
        };
        let mut failed: Option<rustls::Error> = None;
        loop {
            let handshaking = conn.is_handshaking();
            if handshaking {
                tls_records::capture::arm();
            }
            let UnbufferedStatus { mut discard, state } =
                conn.process_tls_records(&mut self.incoming);
            if handshaking {
                self.captured.merge(tls_records::capture::take());
            }
            let next = match state {
                Err(e) => {
                    if failed.is_some() {
                        // The alert is encoded (or there was none).
                        break;
                    }
                    failed = Some(e);
                    None
                }
                Ok(ConnectionState::ReadTraffic(mut records)) => {
                    while let Some(record) = records.next_record() {
                        let record = record.map_err(tls_err)?;
                        discard += record.discard;
                        plain.extend_from_slice(record.payload);
                    }
                    None
                }
                Ok(ConnectionState::EncodeTlsData(mut enc)) => {
                    append_with(
                        &mut self.outgoing,
                        HANDSHAKE_READ,
                        |out| enc.encode(out),
                        |e| match e {
                            EncodeError::InsufficientSize(s) => Some(s.required_size),
                            _ => None,
                        },
                    )
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                    None
                }
                // Written by the caller from `outgoing`.
                Ok(ConnectionState::TransmitTlsData(t)) => {
                    t.done();
                    None
                }
                Ok(ConnectionState::BlockedHandshake) => Some(Next::Read),
                Ok(ConnectionState::PeerClosed) => {
                    self.peer_closed = true;
                    None
                }
                Ok(ConnectionState::WriteTraffic(_)) if failed.is_some() => Some(Next::Traffic),
                Ok(ConnectionState::WriteTraffic(mut w)) => {
                    if let Some(out) = send.take().filter(|o| !o.is_empty()) {
                        let n = out.len().min(ENCRYPT_MAX);
                        let guess = n + RECORD_OVERHEAD * (n / 16_384 + 1);
                        encrypt_into(&mut self.outgoing, guess, |buf| w.encrypt(&out[..n], buf))?;
                        let _ = out.split_to(n);
                    }
                    if self.close {
                        self.close = false;
                        encrypt_into(&mut self.outgoing, RECORD_OVERHEAD, |buf| {
                            w.queue_close_notify(buf)
                        })?;
                    }
                    Some(if self.peer_closed {
                        Next::PeerClosed
                    } else {
                        Next::Traffic
                    })
                }
                Ok(ConnectionState::Closed) => Some(Next::PeerClosed),
                // Early data is not enabled, so this is a peer out of line.
                Ok(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "unexpected TLS state",
                    ))
                }
            };
            self.incoming.drain(..discard.min(self.incoming.len()));
            match (next, failed.take()) {
                (Some(next), None) => return Ok(next),
                (Some(_), Some(e)) => return Err(tls_err(e)),
                (None, f) => failed = f,
            }
        }
        Err(tls_err(
            failed.unwrap_or(rustls::Error::HandshakeNotComplete),
        ))
    }

    /// One non-blocking read of up to `chunk` bytes of ciphertext. With no
    /// buffer held (an idle session released it, or a handshake waiting
    /// for the device's next flight), the read goes through the thread's
    /// scratch and only what came is kept: a quiet device's record costs an
    /// allocation of its own size, not a `chunk`-sized one from the heap's
    /// bins freed again after every message.
    pub fn read_from(&mut self, stream: &dyn Socket, chunk: usize) -> io::Result<usize> {
        if self.incoming.capacity() == 0 {
            return stream.read_scratch(&mut self.incoming, chunk);
        }
        self.incoming.reserve(chunk);
        let spare = self.incoming.capacity() - self.incoming.len();
        stream.read_into(&mut self.incoming, spare)
    }

    /// Writes what `outgoing` holds, without waiting; returns the bytes
    /// written (WouldBlock when the socket took none).
    pub fn write_to(&mut self, stream: &dyn Socket) -> io::Result<usize> {
        let mut total = 0;
        while self.sent < self.outgoing.len() {
            match stream.write_some(&self.outgoing[self.sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.sent += n;
                    total += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && total > 0 => break,
                Err(e) => return Err(e),
            }
        }
        if self.sent == self.outgoing.len() {
            self.outgoing.clear();
            self.sent = 0;
        }
        Ok(total)
    }

    /// Ciphertext bytes not yet written.
    pub fn unsent(&self) -> usize {
        self.outgoing.len() - self.sent
    }

    /// Whether close_notify has been seen: reads end there.
    pub fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// Whether nothing is held but the connection's state: no partial
    /// record read, nothing to write.
    pub fn is_idle(&self) -> bool {
        self.incoming.is_empty() && self.unsent() == 0 && !self.close
    }

    /// Frees the ciphertext buffers when they are empty, and hands the
    /// records over from rustls (once, at the first idle
    /// moment after the handshake: rustls must hold nothing unsent, and
    /// the session has read its client certificate by then).
    pub fn release_idle(&mut self) {
        self.release_buffers();
        if matches!(self.state, State::Rustls(_))
            && matches!(self.version, "1.3" | "1.2")
            && self.is_idle()
            && !self.peer_closed
        {
            self.hand_over();
        }
    }

    /// What a parked session keeps: no buffers, no expanded keys.
    pub fn park(&mut self) {
        self.release_idle();
        if let State::Records(rec) = &mut self.state {
            rec.shed_keys();
        }
    }

    /// rustls to [`Records`]. On failure (not expected: checked above)
    /// the connection has no state left and its next use is an error.
    fn hand_over(&mut self) {
        let State::Rustls(conn) = std::mem::replace(&mut self.state, State::Gone) else {
            return;
        };
        let records = conn
            .dangerous_into_kernel_connection()
            .map_err(|e| e.to_string())
            .and_then(|(secrets, kernel)| {
                let captured = std::mem::take(&mut self.captured);
                Records::new(secrets, kernel, captured).map_err(|e| e.to_string())
            });
        let schedule = match records {
            Ok(r) => {
                let schedule = if r.own_schedule() { "own" } else { "rustls" };
                self.state = State::Records(Box::new(r));
                schedule
            }
            Err(e) => {
                warn!(error = %e, "TLS records could not leave rustls; the session ends");
                "failed"
            }
        };
        metrics::counter!("furrow_tls_record_handovers_total", "schedule" => schedule).increment(1);
    }

    /// Whether the records are sealed here rather than by rustls, and
    /// whether the key schedule is ours too.
    pub fn handed_over(&self) -> (bool, bool) {
        match &self.state {
            State::Records(r) => (true, r.own_schedule()),
            _ => (false, false),
        }
    }

    fn release_buffers(&mut self) {
        if self.incoming.is_empty() && self.incoming.capacity() > 0 {
            self.incoming = Vec::new();
        }
        if self.unsent() == 0 && self.outgoing.capacity() > 0 {
            self.outgoing = Vec::new();
            self.sent = 0;
        }
    }

    /// Queues close_notify, sent by the next [`Self::process`] and write.
    pub fn queue_close(&mut self) {
        self.close = true;
    }

    /// Whether a queued close_notify is not encrypted yet.
    pub fn close_queued(&self) -> bool {
        self.close
    }

    /// The verified client certificate chain, if the device sent one.
    /// Gone after the hand-over (the session reads it at HELLO).
    pub fn peer_certificates(&self) -> Option<&[rustls_pki_types::CertificateDer<'static>]> {
        match &self.state {
            State::Rustls(conn) => conn.peer_certificates(),
            _ => None,
        }
    }

    /// The protocol version and whether the session was resumed.
    pub fn info(&self) -> (&'static str, bool) {
        (self.version, self.resumed)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use proptest::prelude::*;

    use super::*;

    /// A server configuration as the TLS listener builds it, and the
    /// roots a client trusts it by.
    fn configs() -> (Arc<rustls::ServerConfig>, Arc<rustls::RootCertStore>) {
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::certs::Ca::new("records-test", 2).unwrap();
        let server = ca.server(&["localhost".to_owned()], 2).unwrap();
        std::fs::write(dir.path().join("server.pem"), &server.cert_pem).unwrap();
        std::fs::write(dir.path().join("server.key"), &server.key_pem).unwrap();
        std::fs::write(dir.path().join("ca.pem"), &ca.cert_pem).unwrap();
        let cfg = crate::config::Tls {
            cert_file: dir.path().join("server.pem"),
            key_file: dir.path().join("server.key"),
            ..Default::default()
        };
        let state = super::super::tls::TlsState::load(&cfg, 0).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for c in super::super::tls::read_certs("CA", &dir.path().join("ca.pem")).unwrap() {
            roots.add(c).unwrap();
        }
        (state.current(), Arc::new(roots))
    }

    /// A device (rustls's buffered client) and the gateway's side, joined
    /// in memory.
    struct Pair {
        client: rustls::ClientConnection,
        server: Box<TlsConn>,
        plain: BytesMut,
    }

    impl Pair {
        fn new(suite: Option<rustls::SupportedCipherSuite>) -> Self {
            Self::with(suite, &rustls::version::TLS13)
        }

        fn with(
            suite: Option<rustls::SupportedCipherSuite>,
            version: &'static rustls::SupportedProtocolVersion,
        ) -> Self {
            let (server, roots) = configs();
            let mut provider = rustls::crypto::ring::default_provider();
            if let Some(s) = suite {
                provider.cipher_suites = vec![s];
            }
            let client = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
                .with_protocol_versions(&[version])
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            let client = Arc::new(client);
            let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
            let mut p = Self {
                client: rustls::ClientConnection::new(client, name).unwrap(),
                server: TlsConn::new(server, &[]).unwrap(),
                plain: BytesMut::new(),
            };
            for _ in 0..10 {
                p.pass_to_server(usize::MAX).unwrap();
                p.pass_to_client();
                if !p.client.is_handshaking()
                    && matches!(p.server.state, State::Rustls(ref c) if !c.is_handshaking())
                {
                    p.server.note_handshake();
                    return p;
                }
            }
            panic!("no handshake");
        }

        /// The client's records to the server, `chunk` bytes at a time;
        /// then the server's answer is out.
        fn pass_to_server(&mut self, chunk: usize) -> io::Result<Next> {
            let mut wire = Vec::new();
            while self.client.wants_write() {
                self.client.write_tls(&mut wire).unwrap();
            }
            let mut next = self.server.process(&mut self.plain, None)?;
            for piece in wire.chunks(chunk.max(1)) {
                self.server.incoming.extend_from_slice(piece);
                next = self.server.process(&mut self.plain, None)?;
            }
            Ok(next)
        }

        /// The server's records to the client; the client's plaintext.
        fn pass_to_client(&mut self) -> Vec<u8> {
            let mut wire = &self.server.outgoing[self.server.sent..];
            let mut got = Vec::new();
            while !wire.is_empty() {
                self.client.read_tls(&mut wire).unwrap();
                self.client.process_new_packets().unwrap();
                let _ = self.client.reader().read_to_end(&mut got);
            }
            self.server.outgoing.clear();
            self.server.sent = 0;
            got
        }

        /// The server seals `data`.
        fn send(&mut self, data: &[u8]) {
            let mut out = BytesMut::from(data);
            while !out.is_empty() {
                self.server
                    .process(&mut self.plain, Some(&mut out))
                    .unwrap();
            }
        }

        fn hand_over(&mut self) -> (bool, bool) {
            self.server.release_idle();
            self.server.handed_over()
        }
    }

    fn payload(i: usize, len: usize) -> Vec<u8> {
        (0..len).map(|j| (i * 31 + j * 7) as u8).collect()
    }

    /// Traffic both ways, in records of every size up to several
    /// records per write, before and after the hand-over and after
    /// parking (keys shed and rebuilt).
    fn exchange(p: &mut Pair, rounds: usize) {
        for i in 0..rounds {
            let len = [0, 1, 17, 1500, 16_384, 40_000][i % 6];
            let data = payload(i, len);
            p.client.writer().write_all(&data).unwrap();
            p.pass_to_server(usize::MAX).unwrap();
            assert_eq!(&p.plain[..], &data[..], "round {i} to the gateway");
            p.plain.clear();
            let back = payload(i + 1000, len);
            p.send(&back);
            assert_eq!(p.pass_to_client(), back, "round {i} to the device");
        }
    }

    #[test]
    fn records_flow_both_ways_after_the_hand_over() {
        let mut p = Pair::new(None);
        exchange(&mut p, 6);
        assert_eq!(p.hand_over(), (true, true), "records and key schedule ours");
        exchange(&mut p, 12);
        p.server.park();
        exchange(&mut p, 6);
        assert_eq!(p.server.info(), ("1.3", false));
    }

    #[test]
    fn every_tls13_suite_is_handed_over() {
        for suite in rustls::crypto::ring::default_provider().cipher_suites {
            if suite.tls13().is_none() {
                continue;
            }
            let mut p = Pair::new(Some(suite));
            assert_eq!(p.hand_over(), (true, true), "{suite:?}");
            exchange(&mut p, 6);
            key_updates(&mut p);
        }
    }

    /// The device asks for fresh keys and sends `up`; the gateway reads it
    /// and answers `down`, which the device reads.
    fn updated_round_trip(p: &mut Pair, up: &[u8], down: &[u8]) {
        p.client.refresh_traffic_keys().unwrap();
        p.client.writer().write_all(up).unwrap();
        p.pass_to_server(usize::MAX).unwrap();
        assert_eq!(&p.plain[..], up);
        p.plain.clear();
        p.send(down);
        assert_eq!(p.pass_to_client(), down);
    }

    /// The device asks for a key update (rustls asks the gateway to
    /// update too); then the gateway updates on its own near the
    /// suite's limit.
    fn key_updates(p: &mut Pair) {
        for _ in 0..3 {
            // Our KeyUpdate goes out first, under the old key.
            updated_round_trip(p, b"after", b"answer");
        }
        if let State::Records(r) = &mut p.server.state {
            r.set_limit_for_tests(2);
        }
        for i in 0..5 {
            let data = payload(i, 100);
            p.send(&data);
            assert_eq!(p.pass_to_client(), data);
        }
        exchange(p, 6);
    }

    #[test]
    fn key_updates_with_our_schedule_and_with_rustls_s() {
        let mut p = Pair::new(None);
        assert_eq!(p.hand_over(), (true, true));
        key_updates(&mut p);

        // Nothing captured: rustls's key schedule does the updates.
        let mut p = Pair::new(None);
        p.server.captured = Default::default();
        assert_eq!(p.hand_over(), (true, false));
        key_updates(&mut p);
    }

    #[test]
    fn a_key_update_before_the_hand_over_keeps_rustls_s_schedule() {
        let mut p = Pair::new(None);
        updated_round_trip(&mut p, b"x", b"y");
        // The captured secrets are the first generation's: they no
        // longer give the current keys.
        assert_eq!(p.hand_over(), (true, false));
        key_updates(&mut p);
    }

    #[test]
    fn records_split_anywhere_arrive_whole() {
        let mut p = Pair::new(None);
        assert_eq!(p.hand_over(), (true, true));
        let data = payload(7, 20_000);
        p.client.writer().write_all(&data).unwrap();
        p.client.refresh_traffic_keys().unwrap();
        p.client.writer().write_all(b"tail").unwrap();
        p.pass_to_server(1).unwrap();
        assert_eq!(p.plain.len(), data.len() + 4);
        assert_eq!(&p.plain[..data.len()], &data[..]);
        assert_eq!(&p.plain[data.len()..], b"tail");
    }

    #[test]
    fn close_notify_either_way() {
        let mut p = Pair::new(None);
        assert_eq!(p.hand_over(), (true, true));
        p.client.writer().write_all(b"last").unwrap();
        p.client.send_close_notify();
        assert_eq!(p.pass_to_server(usize::MAX).unwrap(), Next::PeerClosed);
        assert_eq!(&p.plain[..], b"last");
        assert!(p.server.peer_closed());

        let mut p = Pair::new(None);
        assert_eq!(p.hand_over(), (true, true));
        p.server.queue_close();
        p.send(b"bye");
        assert!(!p.server.close_queued());
        assert_eq!(p.pass_to_client(), b"bye");
        let mut rest = Vec::new();
        assert_eq!(
            p.client.reader().read_to_end(&mut rest).unwrap(),
            0,
            "clean end"
        );
    }

    #[test]
    fn a_tampered_record_ends_the_connection_with_an_alert() {
        let mut p = Pair::new(None);
        assert_eq!(p.hand_over(), (true, true));
        tampered_record_is_refused(&mut p);
    }

    /// A record with one bit flipped: an error, nothing delivered, and
    /// bad_record_mac for the device.
    fn tampered_record_is_refused(p: &mut Pair) {
        p.client.writer().write_all(b"reading").unwrap();
        let mut wire = Vec::new();
        p.client.write_tls(&mut wire).unwrap();
        let last = wire.len() - 1;
        wire[last] ^= 1;
        p.server.incoming.extend_from_slice(&wire);
        let err = p.server.process(&mut p.plain, None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(p.plain.is_empty(), "nothing unauthenticated delivered");
        let mut wire = &p.server.outgoing[..];
        p.client.read_tls(&mut wire).unwrap();
        let err = p.client.process_new_packets().unwrap_err();
        assert_eq!(
            err,
            rustls::Error::AlertReceived(rustls::AlertDescription::BadRecordMac)
        );
    }

    #[test]
    fn an_unprotected_record_is_refused() {
        let mut p = Pair::new(None);
        assert_eq!(p.hand_over(), (true, true));
        // A plaintext alert (type 21) where only protected records may come.
        p.server.incoming.extend_from_slice(&[21, 3, 3, 0, 2, 1, 0]);
        assert!(p.server.process(&mut p.plain, None).is_err());
    }

    /// A read with no buffer held keeps only the bytes that came (through
    /// the thread's scratch), not a read chunk's worth of capacity; with
    /// a partial record held, reads reserve as before.
    #[tokio::test]
    async fn a_read_without_a_buffer_keeps_only_what_came() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut device = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (gateway, _) = listener.accept().await.unwrap();
        let (config, _) = configs();
        let mut tls = TlsConn::new(config, &[]).unwrap();
        assert_eq!(tls.incoming.capacity(), 0);

        tokio::io::AsyncWriteExt::write_all(&mut device, &[7; 100])
            .await
            .unwrap();
        gateway.readable().await.unwrap();
        let n = tls.read_from(&gateway, 16_384).unwrap();
        assert_eq!(n, 100);
        assert_eq!(&tls.incoming[..], &[7; 100][..]);
        assert!(
            tls.incoming.capacity() < 1024,
            "an idle read held {} bytes of capacity",
            tls.incoming.capacity()
        );

        tokio::io::AsyncWriteExt::write_all(&mut device, &[8; 50])
            .await
            .unwrap();
        gateway.readable().await.unwrap();
        assert_eq!(tls.read_from(&gateway, 16_384).unwrap(), 50);
        assert_eq!(tls.incoming.len(), 150);
        assert!(tls.incoming.capacity() >= 16_384);
    }

    /// TLS 1.2 (rustls's client, every TLS 1.2 suite the gateway takes)
    /// is handed over too: records both ways, split anywhere, a tampered
    /// one refused, a renegotiation refused with a warning while the
    /// connection goes on, close_notify.
    #[test]
    fn tls12_is_handed_over_too() {
        let tls12: Vec<_> = rustls::crypto::ring::default_provider()
            .cipher_suites
            .into_iter()
            // The gateway's certificate here is ECDSA (`furrow certs`).
            .filter(|s| {
                s.tls13().is_none()
                    && s.usable_for_signature_algorithm(rustls::SignatureAlgorithm::ECDSA)
            })
            .collect();
        assert!(!tls12.is_empty());
        for suite in tls12 {
            let mut p = Pair::with(Some(suite), &rustls::version::TLS12);
            assert_eq!(p.server.info(), ("1.2", false), "{suite:?}");
            exchange(&mut p, 6);
            assert_eq!(p.hand_over(), (true, true), "{suite:?}");
            exchange(&mut p, 12);
            p.server.park();
            exchange(&mut p, 6);

            let data = payload(3, 20_000);
            p.client.writer().write_all(&data).unwrap();
            p.pass_to_server(1).unwrap();
            assert_eq!(&p.plain[..], &data[..], "{suite:?}: split at every byte");
            p.plain.clear();

            p.client.writer().write_all(b"bye").unwrap();
            p.client.send_close_notify();
            assert_eq!(p.pass_to_server(7).unwrap(), Next::PeerClosed);
            assert_eq!(&p.plain[..], b"bye");
        }

        let mut p = Pair::with(None, &rustls::version::TLS12);
        assert_eq!(p.hand_over(), (true, true));
        tampered_record_is_refused(&mut p);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever follows a valid record, the record layer answers
        /// with plaintext, a wait for more, or an error: no panic, and
        /// what it delivered is exactly the authenticated data.
        #[test]
        fn garbage_after_the_hand_over_is_an_error_not_a_panic(
            garbage in proptest::collection::vec(any::<u8>(), 0..400),
            splits in proptest::collection::vec(1usize..64, 1..8),
        ) {
            let mut p = Pair::new(None);
            prop_assert_eq!(p.hand_over(), (true, true));
            p.client.writer().write_all(b"good").unwrap();
            let mut wire = Vec::new();
            p.client.write_tls(&mut wire).unwrap();
            wire.extend_from_slice(&garbage);
            let mut at = 0;
            let mut i = 0;
            while at < wire.len() {
                let n = splits[i % splits.len()].min(wire.len() - at);
                p.server.incoming.extend_from_slice(&wire[at..at + n]);
                at += n;
                i += 1;
                if p.server.process(&mut p.plain, None).is_err() {
                    break;
                }
            }
            prop_assert_eq!(&p.plain[..], b"good");
        }
    }
}
