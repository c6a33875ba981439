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
//! parked session keeps; what stays is the connection's keys and state.
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

/// One device's TLS connection.
pub struct TlsConn {
    conn: UnbufferedServerConnection,
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
        let mut tls = Box::new(Self {
            conn: UnbufferedServerConnection::new(config).map_err(tls_err)?,
            incoming: early.to_vec(),
            outgoing: Vec::new(),
            sent: 0,
            peer_closed: false,
            close: false,
        });
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
                    tls.release_idle();
                    return Ok((tls, read, written));
                }
                Next::PeerClosed => return Err(io::ErrorKind::UnexpectedEof.into()),
                Next::Read => {
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
        mut send: Option<&mut BytesMut>,
    ) -> io::Result<Next> {
        let mut failed: Option<rustls::Error> = None;
        loop {
            let UnbufferedStatus { mut discard, state } =
                self.conn.process_tls_records(&mut self.incoming);
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

    /// One non-blocking read of up to `chunk` bytes of ciphertext.
    pub fn read_from(&mut self, stream: &TcpStream, chunk: usize) -> io::Result<usize> {
        self.incoming.reserve(chunk);
        let spare = self.incoming.capacity() - self.incoming.len();
        super::connection::read_short_clears(stream, &mut self.incoming, spare)
    }

    /// Writes what `outgoing` holds, without waiting; returns the bytes
    /// written (WouldBlock when the socket took none).
    pub fn write_to(&mut self, stream: &TcpStream) -> io::Result<usize> {
        let mut total = 0;
        while self.sent < self.outgoing.len() {
            match stream.try_write(&self.outgoing[self.sent..]) {
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

    /// Frees the ciphertext buffers when they are empty.
    pub fn release_idle(&mut self) {
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
    pub fn peer_certificates(&self) -> Option<&[rustls_pki_types::CertificateDer<'static>]> {
        self.conn.peer_certificates()
    }

    /// The protocol version and whether the session was resumed.
    pub fn info(&self) -> (&'static str, bool) {
        let v = match self.conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "1.3",
            Some(rustls::ProtocolVersion::TLSv1_2) => "1.2",
            _ => "other",
        };
        (
            v,
            self.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
        )
    }
}
