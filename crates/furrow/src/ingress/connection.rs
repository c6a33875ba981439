//! A device connection's socket and buffers: bytes in, frames out, and
//! encoded frames back to the socket.
//!
//! Memory is the point of this module. An idle connection holds no buffer:
//! it waits for readiness ([`TcpStream::readable`]) with nothing allocated,
//! and only then reads without blocking, up to `read_chunk` bytes into its
//! worker thread's scratch, keeping just the bytes that came.
//! Frames are split off the read buffer as `Bytes` (no copy), and the read
//! buffer is released once it is empty. The write buffer likewise exists
//! only while bytes wait to be sent. So a quiet fleet costs a task and a
//! socket per device, not a buffer (see the idle-memory benchmark).
//!
//! All methods that await are cancel-safe: state lives in the struct, and
//! `readable`/`writable` readiness waits lose nothing when dropped, so the
//! session can use them as `select!` branches.
//!
//! TLS rides the same readiness loop through rustls' unbuffered API
//! ([`super::tls_conn`]): on readable, ciphertext goes from the socket into
//! a buffer of the connection's own and plaintext out of rustls into the
//! read buffer; queued frames are encrypted into records and written. No
//! second stream type, no buffer while idle (the ciphertext buffers are
//! released like the read buffer), and the PROXY header (plaintext, before
//! the ClientHello) is read by the same code as without TLS.
//!
//! QUIC ([`super::quic`]) is the other transport: its stream is polled
//! the same way (once without waiting, or with the task's waker), behind
//! the same methods, so the session does not know which one it runs on.
//!
//! A TCP session (plain or TLS) resumed from the parking lot starts
//! without a place in Tokio's reactor (`Transport::Direct`): the lot woke it because bytes
//! came, so it reads and writes the socket directly, and registers only
//! when it has to wait for the socket. A quiet device's message then costs
//! no `epoll_ctl` pair and no trip through the reactor for the readiness
//! the lot has already seen, when its session parks again right after the
//! ACK (`session/driver.rs`).

use std::io;
use std::sync::Arc;
use std::task::Poll;

use bytes::BytesMut;
use furrow_proto::{DecodeError, FrameDecoder, RawFrame};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::quic::QuicStream;
use super::tls_conn::{Next, TlsConn};

/// Counters for the close log line and metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// Complete frames decoded.
    pub frames_in: u64,
    /// Bytes read.
    pub bytes_in: u64,
    /// Bytes written.
    pub bytes_out: u64,
}

/// What carries the bytes.
enum Transport {
    /// A TCP socket (plain, or under [`Connection::start_tls`]).
    Tcp(TcpStream),
    /// A TCP socket not registered in Tokio's reactor (yet): read and
    /// written directly until the session has to wait for it.
    Direct(std::net::TcpStream),
    /// No socket: a registration failed halfway (the session ends).
    Detached,
    /// A QUIC stream (boxed: TCP connections pay one enum tag).
    Quic(Box<QuicStream>),
}

/// The socket plus its read and write buffers.
pub struct Connection {
    stream: Transport,
    /// TLS state, once [`Connection::start_tls`] has run (boxed: plain
    /// connections pay one pointer).
    tls: Option<Box<TlsConn>>,
    /// TLS: the next read returns without the socket (the peer's
    /// close_notify, after data delivered with it).
    tls_pending: bool,
    rbuf: BytesMut,
    decoder: FrameDecoder,
    read_chunk: usize,
    /// Traffic counters.
    pub stats: Stats,
}

/// A connection without its socket: what a parked session keeps.
pub struct Parts {
    tls: Option<Box<TlsConn>>,
    decoder: FrameDecoder,
    read_chunk: u32,
    stats: Stats,
}

impl Parts {
    /// The connection's counters so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }
}

impl Connection {
    /// Whether the connection holds nothing but its socket's state: no
    /// bytes read and not handled, none waiting in rustls either way.
    pub fn parkable(&self) -> bool {
        matches!(self.stream, Transport::Tcp(_) | Transport::Direct(_))
            && self.rbuf.is_empty()
            && !self.tls_pending
            && self.tls.as_ref().is_none_or(|t| t.is_idle())
    }

    /// The socket's descriptor when bytes may go to it past this
    /// connection's buffers (see `crate::writer::AckCell::arm`): plain TCP
    /// only, as TLS records are sealed here and QUIC has no socket per
    /// device.
    pub fn plain_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        if self.tls.is_some() || self.tls_pending {
            return None;
        }
        match &self.stream {
            Transport::Tcp(s) => Some(s.as_raw_fd()),
            Transport::Direct(s) => Some(s.as_raw_fd()),
            Transport::Detached | Transport::Quic(_) => None,
        }
    }

    /// Whether this connection is a QUIC stream.
    pub fn is_quic(&self) -> bool {
        matches!(self.stream, Transport::Quic(_))
    }

    /// The QUIC stream, on a QUIC connection.
    pub fn quic(&self) -> Option<&QuicStream> {
        match &self.stream {
            Transport::Quic(q) => Some(q),
            _ => None,
        }
    }

    /// The TCP socket, registered in Tokio's reactor first if it is not
    /// yet (to wait for it); an error on QUIC, whose paths never get here
    /// (no TLS layer of ours, no parking).
    fn registered(&mut self) -> io::Result<&TcpStream> {
        if matches!(self.stream, Transport::Direct(_)) {
            if let Transport::Direct(s) = std::mem::replace(&mut self.stream, Transport::Detached) {
                self.stream = Transport::Tcp(TcpStream::from_std(s)?);
            }
        }
        match &self.stream {
            Transport::Tcp(s) => Ok(s),
            Transport::Quic(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "not a TCP connection",
            )),
            Transport::Direct(_) | Transport::Detached => Err(detached()),
        }
    }

    /// Whether the socket is read and written without Tokio's reactor.
    pub fn is_direct(&self) -> bool {
        matches!(self.stream, Transport::Direct(_))
    }

    /// Splits off the socket (see [`Self::parkable`]; buffers are dropped),
    /// out of Tokio's reactor. A QUIC connection has no socket to park: an
    /// error.
    pub fn into_parts(mut self) -> io::Result<(std::net::TcpStream, Parts)> {
        let stream = match self.stream {
            Transport::Tcp(s) => s.into_std()?,
            Transport::Direct(s) => s,
            Transport::Quic(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "a QUIC session is not parked",
                ))
            }
            Transport::Detached => return Err(detached()),
        };
        if let Some(tls) = self.tls.as_mut() {
            tls.park();
        }
        let parts = Parts {
            tls: self.tls,
            decoder: self.decoder,
            read_chunk: u32::try_from(self.read_chunk).unwrap_or(u32::MAX),
            stats: self.stats,
        };
        Ok((stream, parts))
    }

    /// Puts a parked connection back together; it reads and writes its
    /// socket directly until it has to wait for it (plain or TLS: the
    /// record layer reads and writes through [`Socket`]).
    pub fn from_parts(stream: std::net::TcpStream, parts: Parts) -> Self {
        Self {
            stream: Transport::Direct(stream),
            tls: parts.tls,
            tls_pending: false,
            rbuf: BytesMut::new(),
            decoder: parts.decoder,
            read_chunk: parts.read_chunk as usize,
            stats: parts.stats,
        }
    }

    /// Wraps an accepted socket.
    pub fn new(stream: TcpStream, max_frame: u32, read_chunk: usize) -> Self {
        Self::with(Transport::Tcp(stream), max_frame, read_chunk)
    }

    /// Wraps a device's QUIC stream.
    pub fn new_quic(stream: QuicStream, max_frame: u32, read_chunk: usize) -> Self {
        Self::with(Transport::Quic(Box::new(stream)), max_frame, read_chunk)
    }

    fn with(stream: Transport, max_frame: u32, read_chunk: usize) -> Self {
        Self {
            stream,
            tls: None,
            tls_pending: false,
            rbuf: BytesMut::new(),
            decoder: FrameDecoder::new(max_frame),
            read_chunk,
            stats: Stats::default(),
        }
    }

    /// Changes the size of subsequent reads.
    pub fn set_read_chunk(&mut self, bytes: usize) {
        self.read_chunk = bytes;
    }

    /// Reads what the socket has, waiting for it without holding a buffer.
    /// `Ok(0)` is end of stream. Cancel-safe.
    pub async fn read_some(&mut self) -> io::Result<usize> {
        if self.is_quic() {
            self.reserve_read();
            let Self { stream, rbuf, .. } = self;
            let Transport::Quic(q) = stream else {
                return Ok(0);
            };
            let n = std::future::poll_fn(|cx| q.poll_read(cx, rbuf)).await?;
            self.count_in(n);
            return Ok(n);
        }
        loop {
            if self.is_direct() {
                if let Some(n) = self.try_read()? {
                    return Ok(n);
                }
            }
            if !self.tls_pending {
                self.registered()?.readable().await?;
            }
            if let Some(n) = self.try_read()? {
                return Ok(n);
            }
        }
    }

    /// Waits until the socket can be read (if `read`) or written (if
    /// `write`), then does the non-blocking I/O that is possible: writes
    /// `out`, reads one chunk. Returns `Some(n)` when a read
    /// happened (`Some(0)`: end of stream). Cancel-safe: the only await is
    /// the readiness wait, and nothing is consumed before it completes.
    pub async fn io(
        &mut self,
        out: &mut BytesMut,
        read: bool,
        write: bool,
    ) -> io::Result<Option<usize>> {
        let interest = match (read, write) {
            (true, true) => Interest::READABLE | Interest::WRITABLE,
            (true, false) => Interest::READABLE,
            (false, true) => Interest::WRITABLE,
            (false, false) => return std::future::pending().await,
        };
        if read && self.tls_pending {
            return self.try_read();
        }
        if self.is_quic() {
            return self.io_quic(out, read, write).await;
        }
        if self.is_direct() {
            // Whatever the socket takes or has now, without the reactor;
            // only a socket with neither is registered to wait.
            let before = out.len();
            if write {
                self.try_flush(out)?;
            }
            if read {
                if let Some(n) = self.try_read()? {
                    return Ok(Some(n));
                }
            }
            if out.len() < before {
                return Ok(None);
            }
        }
        let ready = self.registered()?.ready(interest).await?;
        if write && ready.is_writable() {
            self.try_flush(out)?;
        }
        if read && (ready.is_readable() || ready.is_read_closed()) {
            return self.try_read();
        }
        Ok(None)
    }

    /// [`Self::io`] on QUIC: polls the stream's write side (with `out`)
    /// and read side with the task's waker until one moves.
    async fn io_quic(
        &mut self,
        out: &mut BytesMut,
        read: bool,
        write: bool,
    ) -> io::Result<Option<usize>> {
        if read {
            self.reserve_read();
        }
        let Self {
            stream,
            rbuf,
            stats,
            ..
        } = self;
        let Transport::Quic(q) = stream else {
            return Ok(None);
        };
        let got = std::future::poll_fn(|cx| {
            let mut wrote = false;
            if write && !out.is_empty() {
                match q.poll_write(cx, out) {
                    Poll::Ready(Ok(n)) => {
                        stats.bytes_out += n as u64;
                        crate::metrics::wire().bytes_out.increment(n as u64);
                        wrote = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                }
            }
            if read {
                if let Poll::Ready(r) = q.poll_read(cx, rbuf) {
                    return Poll::Ready(r.map(Some));
                }
            }
            if wrote {
                Poll::Ready(Ok(None))
            } else {
                Poll::Pending
            }
        })
        .await?;
        if let Some(n) = got {
            self.count_in(n);
        }
        Ok(got)
    }

    /// Room for the next read: the frame in progress when it is larger
    /// than a read chunk.
    fn reserve_read(&mut self) {
        let want = match self.decoder.check_header(&self.rbuf) {
            Ok(Some(total)) => total.saturating_sub(self.rbuf.len()).max(self.read_chunk),
            _ => self.read_chunk,
        };
        self.rbuf.reserve(want);
    }

    fn count_in(&mut self, n: usize) {
        self.stats.bytes_in += n as u64;
        crate::metrics::wire().bytes_in.increment(n as u64);
    }

    /// One non-blocking read into a buffer reserved just for it. `None`
    /// when the socket had nothing after all.
    fn try_read(&mut self) -> io::Result<Option<usize>> {
        if self.tls.is_some() {
            return self.try_read_tls();
        }
        // No buffer held (an idle connection released it): read into the
        // thread's scratch and keep only what came.
        let scratch = self.rbuf.capacity() == 0 && matches!(self.stream, Transport::Tcp(_));
        // A direct read always goes through the scratch (`read_direct`).
        if !scratch && !self.is_direct() {
            self.reserve_read();
        }
        let spare = self.rbuf.capacity() - self.rbuf.len();
        let r = match &mut self.stream {
            Transport::Tcp(stream) if scratch => {
                read_into_scratch(stream, &mut self.rbuf, self.read_chunk)
            }
            Transport::Tcp(stream) => read_short_clears(stream, &mut self.rbuf, spare),
            Transport::Direct(stream) => read_direct(stream, &mut self.rbuf, self.read_chunk),
            Transport::Quic(q) => q.try_read(&mut self.rbuf),
            Transport::Detached => Err(detached()),
        };
        match r {
            Ok(n) => {
                self.count_in(n);
                Ok(Some(n))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// TLS: reads what the socket has into the connection's ciphertext
    /// buffer, then what rustls decrypts into the read buffer.
    fn try_read_tls(&mut self) -> io::Result<Option<usize>> {
        let Some(tls) = self.tls.as_mut() else {
            return Ok(None);
        };
        if tls.peer_closed() {
            self.tls_pending = false;
            return Ok(Some(0));
        }
        let stream: &dyn Socket = match &self.stream {
            Transport::Tcp(s) => s,
            Transport::Direct(s) => s,
            Transport::Quic(_) | Transport::Detached => return Ok(None),
        };
        let mut eof = false;
        match tls.read_from(stream, self.read_chunk) {
            Ok(0) => eof = true,
            Ok(n) => {
                self.stats.bytes_in += n as u64;
                crate::metrics::wire().bytes_in.increment(n as u64);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        let before = self.rbuf.len();
        let next = tls.process(&mut self.rbuf, None);
        // Alerts, session tickets, key updates: out at once, best effort
        // (a socket that takes none now gets them with the next write).
        match tls.write_to(stream) {
            Ok(n) => {
                self.stats.bytes_out += n as u64;
                crate::metrics::wire().bytes_out.increment(n as u64);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if next.is_ok() => return Err(e),
            Err(_) => {}
        }
        let closed = next? == Next::PeerClosed || eof;
        let n = self.rbuf.len() - before;
        if closed {
            // Data that came with the close first; the close at the next read.
            self.tls_pending = n > 0;
            return Ok(Some(n));
        }
        Ok((n > 0).then_some(n))
    }

    /// Runs the TLS handshake (the caller bounds it in time). Bytes already
    /// read (after a PROXY header) are the start of the ClientHello.
    pub async fn start_tls(&mut self, config: Arc<rustls::ServerConfig>) -> io::Result<()> {
        let early = std::mem::take(&mut self.rbuf);
        let Transport::Tcp(stream) = &self.stream else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "QUIC brings its own TLS",
            ));
        };
        let (tls, read, written) = TlsConn::accept(stream, config, &early, &mut self.rbuf).await?;
        self.stats.bytes_in += read;
        self.stats.bytes_out += written;
        crate::metrics::wire().bytes_in.increment(read);
        crate::metrics::wire().bytes_out.increment(written);
        // The device may have sent HELLO in the handshake's last flight: it
        // is in the read buffer now.
        self.tls_pending = tls.peer_closed();
        self.tls = Some(tls);
        Ok(())
    }

    /// TLS: the verified client certificate chain, if the device sent one.
    pub fn peer_certificates(&self) -> Option<&[rustls_pki_types::CertificateDer<'static>]> {
        match &self.stream {
            Transport::Quic(q) => q.peer_certificates(),
            _ => self.tls.as_ref().and_then(|t| t.peer_certificates()),
        }
    }

    /// TLS: the protocol version and whether the session was resumed.
    pub fn tls_info(&self) -> Option<(&'static str, bool)> {
        self.tls.as_ref().map(|t| t.info())
    }

    /// The next complete frame in the read buffer, if any.
    pub fn next_frame(&mut self) -> Result<Option<RawFrame>, DecodeError> {
        let f = self.decoder.decode(&mut self.rbuf)?;
        if let Some(f) = &f {
            self.stats.frames_in += 1;
            crate::metrics::wire().frame_in(f.kind, f.wire_len());
        }
        Ok(f)
    }

    /// Whether the read buffer holds a complete frame (or a header that is
    /// already an error): then the session must not read more, only handle
    /// what it has, so the buffer never grows past one frame plus one read.
    pub fn has_complete_frame(&self) -> bool {
        match self.decoder.check_header(&self.rbuf) {
            Ok(Some(total)) => self.rbuf.len() >= total,
            Ok(None) => false,
            Err(_) => true,
        }
    }

    /// The bytes read and not yet consumed (for a PROXY header, which
    /// precedes the frames).
    pub fn buffered(&self) -> &[u8] {
        &self.rbuf
    }

    /// Drops the first `n` buffered bytes (at most all of them).
    pub fn consume(&mut self, n: usize) {
        let _ = self.rbuf.split_to(n.min(self.rbuf.len()));
    }

    /// Whether the read buffer holds unparsed bytes.
    pub fn has_buffered_input(&self) -> bool {
        !self.rbuf.is_empty()
    }

    /// Gives back the read buffer's memory if it is empty (idle connections
    /// hold none).
    pub fn release_idle(&mut self) {
        if self.rbuf.is_empty() && self.rbuf.capacity() > 0 {
            self.rbuf = BytesMut::new();
        }
        if let Some(tls) = self.tls.as_mut() {
            tls.release_idle();
        }
    }

    /// Bytes of `out` plus what the transport itself holds, not yet written.
    pub fn unsent(&self, out: &BytesMut) -> usize {
        // Encrypted records not written yet, and a close_notify to send.
        let tls = self
            .tls
            .as_ref()
            .map_or(0, |t| t.unsent() + usize::from(t.close_queued()));
        out.len() + tls
    }

    /// Writes as much of `out` as the socket takes now, without waiting,
    /// and advances `out` past it.
    pub fn try_flush(&mut self, out: &mut BytesMut) -> io::Result<()> {
        if let Transport::Quic(q) = &mut self.stream {
            while !out.is_empty() {
                match q.try_write(out) {
                    Ok(n) => {
                        self.stats.bytes_out += n as u64;
                        crate::metrics::wire().bytes_out.increment(n as u64);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            return Ok(());
        }
        let stream: &dyn Socket = match &self.stream {
            Transport::Tcp(s) => s,
            Transport::Direct(s) => s,
            Transport::Quic(_) | Transport::Detached => return Err(detached()),
        };
        if let Some(tls) = self.tls.as_mut() {
            loop {
                let mut progressed = false;
                if tls.unsent() == 0 && (!out.is_empty() || tls.close_queued()) {
                    // Encrypts (part of) `out`; records that arrived meanwhile
                    // are decrypted into the read buffer as usual.
                    let before = out.len();
                    let next = tls.process(&mut self.rbuf, Some(out))?;
                    self.tls_pending |= next == Next::PeerClosed;
                    progressed = out.len() < before;
                }
                if tls.unsent() > 0 {
                    match tls.write_to(stream) {
                        Ok(n) => {
                            self.stats.bytes_out += n as u64;
                            crate::metrics::wire().bytes_out.increment(n as u64);
                            progressed = true;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                        Err(e) => return Err(e),
                    }
                }
                if !progressed {
                    return Ok(());
                }
            }
        }
        while !out.is_empty() {
            match stream.write_some(out) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.stats.bytes_out += n as u64;
                    crate::metrics::wire().bytes_out.increment(n as u64);
                    let _ = out.split_to(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Resolves when the socket can take more bytes. Cancel-safe.
    async fn writable(&mut self) -> io::Result<()> {
        self.registered()?.writable().await
    }

    /// Writes all of `out`, waiting as needed (bounded by the caller).
    pub async fn flush(&mut self, out: &mut BytesMut) -> io::Result<()> {
        if let Transport::Quic(q) = &mut self.stream {
            let before = out.len();
            let r = q.write_all(out).await;
            let n = (before - out.len()) as u64;
            self.stats.bytes_out += n;
            crate::metrics::wire().bytes_out.increment(n);
            return r;
        }
        loop {
            self.try_flush(out)?;
            if self.unsent(out) == 0 {
                return Ok(());
            }
            self.writable().await?;
        }
    }

    /// Writes `out`, then closes our sending side so the peer reads a
    /// clean end.
    pub async fn close(&mut self, out: &mut BytesMut) -> io::Result<()> {
        use tokio::io::AsyncWriteExt;
        if self.tls.is_some() {
            // Queued frames go out first, then close_notify.
            self.flush(out).await?;
            if let Some(tls) = self.tls.as_mut() {
                tls.queue_close();
            }
        }
        self.flush(out).await?;
        match &mut self.stream {
            Transport::Tcp(s) => s.shutdown().await,
            Transport::Direct(s) => s.shutdown(std::net::Shutdown::Write),
            Transport::Quic(q) => q.finish().await,
            Transport::Detached => Err(detached()),
        }
    }
}

fn detached() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the socket was lost")
}

/// A read from a socket outside Tokio's reactor: up to `room` bytes
/// through the thread's scratch (initialised memory, which `Read` needs),
/// appended to `buf` at their exact size. `WouldBlock` when nothing came.
fn read_direct<B: bytes::BufMut>(
    stream: &std::net::TcpStream,
    buf: &mut B,
    room: usize,
) -> io::Result<usize> {
    use std::io::Read;
    via_scratch(buf, room, |scratch| loop {
        match (&*stream).read(scratch) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    })
}

/// A TCP socket's non-blocking reads and writes, whether Tokio's reactor
/// watches it ([`TcpStream`]: a short read clears its readiness, see
/// [`read_short_clears`]) or not (a woken session's socket, read and
/// written directly until it has to wait). The TLS record layer takes
/// either.
pub trait Socket {
    /// One read into `buf`'s spare room (`spare` bytes reserved).
    fn read_into(&self, buf: &mut Vec<u8>, spare: usize) -> io::Result<usize>;
    /// One read of up to `room` bytes through the thread's scratch,
    /// appended to `buf` at their exact size: for a buffer that holds
    /// nothing (see [`read_into_scratch`]).
    fn read_scratch(&self, buf: &mut Vec<u8>, room: usize) -> io::Result<usize>;
    /// One write of what `bytes` the socket takes now.
    fn write_some(&self, bytes: &[u8]) -> io::Result<usize>;
}

impl Socket for TcpStream {
    fn read_into(&self, buf: &mut Vec<u8>, spare: usize) -> io::Result<usize> {
        read_short_clears(self, buf, spare)
    }

    fn read_scratch(&self, buf: &mut Vec<u8>, room: usize) -> io::Result<usize> {
        read_into_scratch(self, buf, room)
    }

    fn write_some(&self, bytes: &[u8]) -> io::Result<usize> {
        self.try_write(bytes)
    }
}

impl Socket for std::net::TcpStream {
    fn read_into(&self, buf: &mut Vec<u8>, spare: usize) -> io::Result<usize> {
        read_direct(self, buf, spare)
    }

    fn read_scratch(&self, buf: &mut Vec<u8>, room: usize) -> io::Result<usize> {
        read_direct(self, buf, room)
    }

    fn write_some(&self, bytes: &[u8]) -> io::Result<usize> {
        use std::io::Write;
        loop {
            match (&*self).write(bytes) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }
}

/// One non-blocking read into `buf`'s spare capacity that, when the socket
/// gave less than that, also clears Tokio's readiness for it.
///
/// Why: Tokio keeps a socket readable until a read returns `WouldBlock`, so
/// after every message a session would make a second `recv` just to learn
/// that nothing more came: at 10,000 devices x 1 msg/s that is half of the
/// gateway's socket reads. A short read already says the receive queue is
/// empty (TCP's `recvmsg` copies what is queued, backlog included, up to the
/// length asked). Nothing is lost: Tokio clears readiness only if no new
/// event came since the read began (its tick), data arriving later raises a
/// new edge, and a close seen by epoll is never cleared.
/// `spare` is the room the caller reserved in `buf`.
pub(crate) fn read_short_clears<B: bytes::BufMut>(
    stream: &TcpStream,
    buf: &mut B,
    spare: usize,
) -> io::Result<usize> {
    let mut got = None;
    let r = stream.try_io(Interest::READABLE, || {
        let n = stream.try_read_buf(buf)?;
        got = Some(n);
        if n > 0 && n < spare {
            // Drained: tell Tokio so (the bytes are kept in `got`).
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(n)
        }
    });
    match (got, r) {
        (Some(n), _) => Ok(n),
        (None, r) => r,
    }
}

thread_local! {
    /// Each worker thread's read scratch (see [`read_into_scratch`]).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A read for a connection that holds no buffer: up to `chunk` bytes into
/// the thread's scratch, then into `buf` at their exact size. A quiet
/// device's one frame then costs an allocation of its own size (glibc's
/// per-thread cache serves it) instead of a `chunk`-sized one from the
/// heap's bins, split and released again for every message, and the read
/// is as wide as ever (narrower reads cost more syscalls when many devices
/// stream at once).
fn read_into_scratch<B: bytes::BufMut>(
    stream: &TcpStream,
    buf: &mut B,
    chunk: usize,
) -> io::Result<usize> {
    via_scratch(buf, chunk, |mut room| {
        read_short_clears(stream, &mut room, chunk)
    })
}

/// One read by `read` into the first `room` bytes of the thread's scratch,
/// whose bytes are then appended to `buf`.
fn via_scratch<B: bytes::BufMut>(
    buf: &mut B,
    room: usize,
    read: impl FnOnce(&mut [u8]) -> io::Result<usize>,
) -> io::Result<usize> {
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        if scratch.len() < room {
            scratch.resize(room, 0);
        }
        let n = read(&mut scratch[..room])?;
        buf.put_slice(&scratch[..n]);
        Ok(n)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (tokio::net::TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = l.accept().await.unwrap();
        (client, server)
    }

    /// A parked plain connection comes back outside Tokio's reactor: it
    /// reads what came and writes its answer directly, parks again without
    /// ever registering, and registers only when it has to wait, missing
    /// nothing that came before (or after) it did.
    #[tokio::test]
    async fn a_resumed_connection_works_directly_until_it_waits() {
        let (mut client, server) = pair().await;
        let conn = Connection::new(server, 1 << 20, 512);
        let (std_stream, parts) = conn.into_parts().unwrap();
        let mut wire = BytesMut::new();
        furrow_proto::message::encode_telemetry(1, 0, 0, b"one", &mut wire).unwrap();
        client.write_all(&wire).await.unwrap();
        let mut conn = Connection::from_parts(std_stream, parts);
        assert!(conn.is_direct());
        // The bytes are there (the lot saw them); wait for the kernel to
        // have them all, as the lot's event says.
        let mut out = BytesMut::from(&b"ack-1"[..]);
        let n = loop {
            match conn.io(&mut out, true, true).await.unwrap() {
                Some(n) => break n,
                None => tokio::task::yield_now().await,
            }
        };
        assert!(conn.is_direct(), "nothing had to wait: still direct");
        assert_eq!(n, wire.len());
        assert!(out.is_empty(), "the answer went out directly");
        let f = conn.next_frame().unwrap().expect("a whole frame");
        assert_eq!(&f.body[17..], b"one");
        let mut got = [0u8; 5];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ack-1");

        // Parks again without having registered, and comes back.
        conn.release_idle();
        assert!(conn.parkable());
        let (std_stream, parts) = conn.into_parts().unwrap();
        let mut conn = Connection::from_parts(std_stream, parts);
        // Nothing to read: it registers and waits; bytes sent later wake it.
        let mut none = BytesMut::new();
        let waiting = conn.io(&mut none, true, false);
        let late = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            wire.clear();
            furrow_proto::message::encode_telemetry(2, 0, 0, b"two", &mut wire).unwrap();
            client.write_all(&wire).await.unwrap();
            client
        };
        let (got, mut client) = tokio::join!(
            async { tokio::time::timeout(Duration::from_secs(5), waiting).await },
            late
        );
        assert!(matches!(got.expect("woken by the late bytes"), Ok(Some(n)) if n > 0));
        assert!(!conn.is_direct(), "it waited, so it is registered");
        let f = conn.next_frame().unwrap().expect("a whole frame");
        assert_eq!(&f.body[17..], b"two");
        // A close reads as the end, registered or not.
        drop(client.shutdown().await);
        drop(client);
        let end = tokio::time::timeout(Duration::from_secs(5), conn.read_some())
            .await
            .expect("the close");
        assert_eq!(end.unwrap(), 0);
    }

    /// A short read clears readiness (no second `recv` to learn the queue is
    /// empty), and neither later data nor a close is missed.
    #[tokio::test]
    async fn a_short_read_clears_readiness_and_misses_nothing_after() {
        let (mut client, server) = pair().await;
        let mut buf = BytesMut::with_capacity(64);
        client.write_all(b"abc").await.unwrap();
        server.readable().await.unwrap();
        assert_eq!(read_short_clears(&server, &mut buf, 64).unwrap(), 3);
        // Cleared: waiting for readiness now would park the task.
        assert!(server.readable().now_or_never().is_none());

        // Data after the read raises readiness again.
        client.write_all(b"de").await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), server.readable())
            .await
            .expect("readable again after new data")
            .unwrap();
        assert_eq!(read_short_clears(&server, &mut buf, 59).unwrap(), 2);
        assert_eq!(&buf[..], b"abcde");

        // Data then the close: the close is still seen after the short read.
        client.write_all(b"xyz").await.unwrap();
        client.shutdown().await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), server.readable())
            .await
            .expect("readable")
            .unwrap();
        let mut n = read_short_clears(&server, &mut buf, 57).unwrap();
        assert_eq!(n, 3, "the data before the close comes first");
        tokio::time::timeout(Duration::from_secs(5), server.readable())
            .await
            .expect("the close keeps the socket readable")
            .unwrap();
        n = read_short_clears(&server, &mut buf, 54).unwrap();
        assert_eq!(n, 0, "end of stream");
    }

    /// A connection holding no buffer reads through the thread's scratch
    /// and keeps exactly what came: a frame larger than the read chunk
    /// arrives whole over several reads, and after the buffer is released
    /// the next frame comes through the scratch again, not mixed with
    /// leftovers of the first.
    #[tokio::test]
    async fn reads_without_a_buffer_go_through_the_scratch() {
        let (mut client, server) = pair().await;
        let mut conn = Connection::new(server, 1 << 20, 512);
        let big = vec![b'x'; 1500];
        let mut wire = BytesMut::new();
        furrow_proto::message::encode_telemetry(1, 0, 0, &big, &mut wire).unwrap();
        furrow_proto::message::encode_telemetry(2, 0, 0, b"small", &mut wire).unwrap();
        client.write_all(&wire).await.unwrap();
        let mut frames = Vec::new();
        while frames.len() < 2 {
            let n = tokio::time::timeout(Duration::from_secs(5), conn.read_some())
                .await
                .expect("data")
                .unwrap();
            assert!(
                n > 0 && n <= 1500,
                "one read is at most a chunk or a frame's rest: {n}"
            );
            while let Some(f) = conn.next_frame().unwrap() {
                frames.push(f);
            }
        }
        assert_eq!(frames[0].body.len(), 17 + 1500);
        assert_eq!(&frames[0].body[17..], &big[..]);
        assert_eq!(&frames[1].body[17..], b"small");
        assert!(!conn.has_buffered_input());

        conn.release_idle();
        wire.clear();
        furrow_proto::message::encode_telemetry(3, 0, 0, b"again", &mut wire).unwrap();
        client.write_all(&wire).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read_some())
            .await
            .expect("data")
            .unwrap();
        assert_eq!(n, wire.len());
        let f = conn.next_frame().unwrap().expect("a whole frame");
        assert_eq!(&f.body[..8], &3u64.to_be_bytes());
        assert_eq!(&f.body[17..], b"again");
        assert!(conn.next_frame().unwrap().is_none());
    }

    /// A read that fills the room it was given leaves readiness set: more
    /// may be queued.
    #[tokio::test]
    async fn a_full_read_keeps_readiness() {
        let (mut client, server) = pair().await;
        client.write_all(&[7u8; 100]).await.unwrap();
        server.readable().await.unwrap();
        let mut buf = BytesMut::with_capacity(10);
        let spare = buf.capacity() - buf.len();
        let n = read_short_clears(&server, &mut buf, spare).unwrap();
        assert_eq!(n, spare);
        assert!(server.readable().now_or_never().is_some());
    }
}
