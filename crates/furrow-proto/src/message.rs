//! Typed furrow/1 messages: parsing a frame body and encoding a frame.
//!
//! Parsing borrows from the frame: strings and payloads are [`Bytes`] slices
//! of the read buffer, so decoding TELEMETRY allocates nothing. Field rules
//! that the spec makes PROTOCOL_ERROR at the wire level (seq 0, a device id
//! outside `[A-Za-z0-9._:-]{1,128}`, a token over 256 bytes, an unknown
//! command status, leftover bytes) are checked here, so every peer enforces
//! them the same way. Rules that need state (a second HELLO, duplicates) are
//! the session's.

use std::fmt;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::codes::{CommandStatus, ErrorCode, MessageType};
use crate::frame::{put_header, RawFrame};

/// Why a frame or a body could not be decoded. Each maps to the ERROR code
/// the gateway answers with ([`DecodeError::code`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The length field is above the maximum.
    #[error("frame length {len} is above the maximum {max}")]
    FrameTooLarge {
        /// The length field received.
        len: u32,
        /// The maximum in force.
        max: u32,
    },
    /// The type byte is not a furrow/1 message type.
    #[error("unknown message type 0x{0:02x}")]
    UnknownType(u8),
    /// HELLO asks for a protocol version other than 1.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// Any other malformation; the text says which.
    #[error("protocol error: {0}")]
    Protocol(&'static str),
}

impl DecodeError {
    /// The ERROR code this failure is answered with.
    pub const fn code(&self) -> ErrorCode {
        match self {
            Self::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            Self::UnknownType(_) => ErrorCode::UnknownType,
            Self::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            Self::Protocol(_) => ErrorCode::ProtocolError,
        }
    }
}

/// Why a message could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A `str` field is longer than its u16 byte count allows.
    #[error("string field of {0} bytes exceeds 65535")]
    StrTooLong(usize),
    /// The frame would exceed what a u32 length can describe.
    #[error("frame body of {0} bytes is too large")]
    TooLarge(usize),
}

/// A UTF-8 string field that shares the frame's buffer.
///
/// Construction checks UTF-8 once; [`Str::as_str`] is then cheap.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Str(Bytes);

impl Str {
    /// Wraps bytes after checking that they are UTF-8.
    pub fn from_utf8(bytes: Bytes) -> Result<Self, DecodeError> {
        match std::str::from_utf8(&bytes) {
            Ok(_) => Ok(Self(bytes)),
            Err(_) => Err(DecodeError::Protocol("string is not UTF-8")),
        }
    }

    /// A string from a static literal, without copying.
    pub const fn from_static(s: &'static str) -> Self {
        Self(Bytes::from_static(s.as_bytes()))
    }

    /// The string.
    pub fn as_str(&self) -> &str {
        // Checked at construction; the fallback is unreachable.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// The UTF-8 bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Byte length.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the string is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<&str> for Str {
    fn from(s: &str) -> Self {
        Self(Bytes::copy_from_slice(s.as_bytes()))
    }
}

impl From<String> for Str {
    fn from(s: String) -> Self {
        Self(Bytes::from(s))
    }
}

impl fmt::Debug for Str {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Str {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Maximum device id length in bytes.
pub const MAX_DEVICE_ID: usize = 128;
/// Maximum token length in bytes.
pub const MAX_TOKEN: usize = 256;

/// Whether `id` is a valid device id: 1 to 128 bytes of `[A-Za-z0-9._:-]`.
pub fn valid_device_id(id: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= MAX_DEVICE_ID
        && id
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// HELLO: a device opens a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version; 1.
    pub version: u8,
    /// Requested keepalive in seconds; 0 asks for the gateway's default.
    pub keepalive_s: u16,
    /// The device's id.
    pub device_id: Str,
    /// The device's secret token; empty only with a TLS client certificate.
    pub token: Str,
    /// Extensions the device speaks (bits, see [`crate::CAP_STATE`]);
    /// `None` when HELLO ends after the token, as a device that knows of
    /// none sends it.
    pub capabilities: Option<u32>,
}

/// WELCOME: the gateway accepts a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Welcome {
    /// Protocol version; 1.
    pub version: u8,
    /// The effective keepalive in seconds.
    pub keepalive_s: u16,
    /// The maximum value of the length field.
    pub max_frame: u32,
    /// How many unacknowledged TELEMETRY the device may have outstanding.
    pub max_inflight: u16,
    /// The highest durably stored seq of this device, 0 if none.
    pub last_seq: u64,
    /// The gateway's clock, Unix milliseconds.
    pub server_time_ms: u64,
    /// The extensions granted: present exactly when HELLO carried
    /// capabilities, and only bits HELLO asked for.
    pub capabilities: Option<u32>,
}

/// TELEMETRY: one reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Telemetry {
    /// Per-device sequence number, from 1, increasing.
    pub seq: u64,
    /// Device clock, Unix milliseconds; 0 if unknown.
    pub timestamp_ms: u64,
    /// Raw content type byte (see [`crate::ContentType`]).
    pub content_type: u8,
    /// The payload.
    pub payload: Bytes,
}

/// REJECT: one reading refused for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    /// The refused seq.
    pub seq: u64,
    /// Raw code (see [`ErrorCode`]).
    pub code: u16,
    /// Human-readable reason.
    pub reason: Str,
}

/// COMMAND: the gateway asks the device to do something.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// Command id, unique per gateway deployment.
    pub command_id: u64,
    /// Command name.
    pub name: Str,
    /// Raw content type byte of the payload.
    pub content_type: u8,
    /// Arguments.
    pub payload: Bytes,
}

/// COMMAND_RESULT: the device answers a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandResult {
    /// The command answered.
    pub command_id: u64,
    /// Outcome.
    pub status: CommandStatus,
    /// Raw content type byte of the payload.
    pub content_type: u8,
    /// Result data.
    pub payload: Bytes,
}

/// DESIRED: the device's whole desired state, as operators set it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// Its version; each change raises it.
    pub version: u64,
    /// A JSON object (UTF-8).
    pub document: Bytes,
}

/// REPORT: a change of the device's reported state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// A seq of the device's TELEMETRY sequence (shared: ACK covers both).
    pub seq: u64,
    /// Device clock, Unix milliseconds; 0 if unknown.
    pub timestamp_ms: u64,
    /// A JSON merge patch (RFC 7396) of the reported document: an object.
    pub patch: Bytes,
}

/// Bytes of a firmware image's id: its SHA-256.
pub const IMAGE_ID_LEN: usize = 32;

/// Bytes of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// FIRMWARE_OFFER: the gateway offers an image (capability FIRMWARE).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirmwareOffer {
    /// The image's SHA-256, which is also its id.
    pub image: [u8; IMAGE_ID_LEN],
    /// Its length in bytes.
    pub size: u64,
    /// The longest range one CHUNK_REQUEST may ask for.
    pub chunk_max: u32,
    /// CHUNK_REQUESTs the device may have unanswered at once.
    pub window: u16,
    /// Ed25519 signature of [`firmware_signed_message`].
    pub signature: [u8; SIGNATURE_LEN],
    /// The device model the image is built for.
    pub model: Str,
    /// The firmware version the image installs.
    pub version: Str,
}

/// CHUNK_REQUEST: the device asks for `length` bytes at `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRequest {
    /// Which image.
    pub image: [u8; IMAGE_ID_LEN],
    /// Where the range starts.
    pub offset: u64,
    /// Its length (1 to the offer's `chunk_max`).
    pub length: u32,
}

/// CHUNK: a range of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Which image.
    pub image: [u8; IMAGE_ID_LEN],
    /// Where `data` starts in it.
    pub offset: u64,
    /// CRC-32 (IEEE 802.3, as zlib computes it) of `data`.
    pub crc32: u32,
    /// The bytes.
    pub data: Bytes,
}

/// The bytes an image's Ed25519 signature covers: a fixed label, the
/// image's SHA-256 and size, its model and version (each a u16 length and
/// UTF-8, as `str` fields are). Signing the metadata with the digest means
/// an image cannot be offered as another version or for another model.
pub fn firmware_signed_message(
    image: &[u8; IMAGE_ID_LEN],
    size: u64,
    model: &str,
    version: &str,
) -> Vec<u8> {
    const LABEL: &[u8] = b"furrow/1 firmware\0";
    let mut m = Vec::with_capacity(LABEL.len() + 32 + 8 + 4 + model.len() + version.len());
    m.extend_from_slice(LABEL);
    m.extend_from_slice(image);
    m.extend_from_slice(&size.to_be_bytes());
    for s in [model, version] {
        let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(&s.as_bytes()[..usize::from(len)]);
    }
    m
}

/// ERROR: fatal; the gateway closes after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorMsg {
    /// Raw code (see [`ErrorCode`]).
    pub code: u16,
    /// Human-readable message.
    pub message: Str,
}

/// GOODBYE: orderly close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Goodbye {
    /// Raw code (see [`crate::GoodbyeCode`]).
    pub code: u16,
    /// How long to wait before reconnecting.
    pub retry_after_ms: u32,
}

/// Any furrow/1 message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Device opens a session.
    Hello(Hello),
    /// Gateway accepts it.
    Welcome(Welcome),
    /// A reading.
    Telemetry(Telemetry),
    /// Cumulative acknowledgement up to and including `seq`.
    Ack {
        /// Highest acknowledged seq.
        seq: u64,
    },
    /// One reading refused.
    Reject(Reject),
    /// A command to the device.
    Command(Command),
    /// The device's answer to a command.
    CommandResult(CommandResult),
    /// Liveness probe.
    Ping {
        /// Echoed by PONG.
        nonce: u64,
    },
    /// Answer to PING.
    Pong {
        /// The PING's nonce.
        nonce: u64,
    },
    /// Fatal error.
    Error(ErrorMsg),
    /// Orderly close.
    Goodbye(Goodbye),
    /// The desired state (capability STATE).
    Desired(Desired),
    /// The device has the desired state of this version (capability STATE).
    DesiredAck {
        /// The version received.
        version: u64,
    },
    /// A change of the reported state (capability STATE).
    Report(Report),
    /// A firmware image on offer (capability FIRMWARE).
    FirmwareOffer(FirmwareOffer),
    /// The device asks for a range of an image (capability FIRMWARE).
    ChunkRequest(ChunkRequest),
    /// A range of an image (capability FIRMWARE).
    Chunk(Chunk),
    /// The offer of this image is withdrawn (capability FIRMWARE).
    FirmwareCancel {
        /// Which image.
        image: [u8; IMAGE_ID_LEN],
    },
}

/// Reads fields off a body, failing with PROTOCOL_ERROR when it runs short.
struct Body(Bytes);

impl Body {
    fn need(&self, n: usize) -> Result<(), DecodeError> {
        if self.0.remaining() < n {
            Err(DecodeError::Protocol("body too short for its fields"))
        } else {
            Ok(())
        }
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        self.need(1)?;
        Ok(self.0.get_u8())
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.need(2)?;
        Ok(self.0.get_u16())
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.need(4)?;
        Ok(self.0.get_u32())
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.need(8)?;
        Ok(self.0.get_u64())
    }
    fn bytes(&mut self) -> Result<Bytes, DecodeError> {
        let n = usize::from(self.u16()?);
        self.need(n)?;
        Ok(self.0.split_to(n))
    }
    fn str(&mut self) -> Result<Str, DecodeError> {
        Str::from_utf8(self.bytes()?)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        self.need(N)?;
        let mut a = [0u8; N];
        self.0.copy_to_slice(&mut a);
        Ok(a)
    }
    /// An optional trailing u32: absent when the body ends here.
    fn optional_u32(&mut self) -> Result<Option<u32>, DecodeError> {
        if self.0.is_empty() {
            Ok(None)
        } else {
            self.u32().map(Some)
        }
    }
    fn rest(self) -> Bytes {
        self.0
    }
    fn end(self) -> Result<(), DecodeError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Protocol(
                "bytes left over after the last field",
            ))
        }
    }
}

impl Message {
    /// The message type.
    pub fn kind(&self) -> MessageType {
        match self {
            Self::Hello(_) => MessageType::Hello,
            Self::Welcome(_) => MessageType::Welcome,
            Self::Telemetry(_) => MessageType::Telemetry,
            Self::Ack { .. } => MessageType::Ack,
            Self::Reject(_) => MessageType::Reject,
            Self::Command(_) => MessageType::Command,
            Self::CommandResult(_) => MessageType::CommandResult,
            Self::Ping { .. } => MessageType::Ping,
            Self::Pong { .. } => MessageType::Pong,
            Self::Error(_) => MessageType::Error,
            Self::Goodbye(_) => MessageType::Goodbye,
            Self::Desired(_) => MessageType::Desired,
            Self::DesiredAck { .. } => MessageType::DesiredAck,
            Self::Report(_) => MessageType::Report,
            Self::FirmwareOffer(_) => MessageType::FirmwareOffer,
            Self::ChunkRequest(_) => MessageType::ChunkRequest,
            Self::Chunk(_) => MessageType::Chunk,
            Self::FirmwareCancel { .. } => MessageType::FirmwareCancel,
        }
    }

    /// Parses a checked frame's body.
    pub fn from_frame(frame: RawFrame) -> Result<Self, DecodeError> {
        Self::parse(frame.kind, frame.body)
    }

    /// Parses the body of a frame of type `kind`.
    pub fn parse(kind: MessageType, body: Bytes) -> Result<Self, DecodeError> {
        let mut b = Body(body);
        let msg = match kind {
            MessageType::Hello => {
                // The version is read first and decides alone.
                let version = b.u8()?;
                if version != crate::VERSION {
                    return Err(DecodeError::UnsupportedVersion(version));
                }
                let keepalive_s = b.u16()?;
                let device_id = b.str()?;
                let token = b.str()?;
                let capabilities = b.optional_u32()?;
                b.end()?;
                if !valid_device_id(device_id.as_bytes()) {
                    return Err(DecodeError::Protocol(
                        "device_id must be 1 to 128 bytes of [A-Za-z0-9._:-]",
                    ));
                }
                if token.len() > MAX_TOKEN {
                    return Err(DecodeError::Protocol("token longer than 256 bytes"));
                }
                Self::Hello(Hello {
                    version,
                    keepalive_s,
                    device_id,
                    token,
                    capabilities,
                })
            }
            MessageType::Welcome => {
                let w = Welcome {
                    version: b.u8()?,
                    keepalive_s: b.u16()?,
                    max_frame: b.u32()?,
                    max_inflight: b.u16()?,
                    last_seq: b.u64()?,
                    server_time_ms: b.u64()?,
                    capabilities: b.optional_u32()?,
                };
                b.end()?;
                Self::Welcome(w)
            }
            MessageType::Telemetry => {
                let seq = b.u64()?;
                let timestamp_ms = b.u64()?;
                let content_type = b.u8()?;
                if seq == 0 {
                    return Err(DecodeError::Protocol("TELEMETRY seq 0"));
                }
                Self::Telemetry(Telemetry {
                    seq,
                    timestamp_ms,
                    content_type,
                    payload: b.rest(),
                })
            }
            MessageType::Ack => {
                let seq = b.u64()?;
                b.end()?;
                Self::Ack { seq }
            }
            MessageType::Reject => {
                let r = Reject {
                    seq: b.u64()?,
                    code: b.u16()?,
                    reason: b.str()?,
                };
                b.end()?;
                Self::Reject(r)
            }
            MessageType::Command => Self::Command(Command {
                command_id: b.u64()?,
                name: b.str()?,
                content_type: b.u8()?,
                payload: b.rest(),
            }),
            MessageType::CommandResult => {
                let command_id = b.u64()?;
                // The status is checked before anything after it.
                let status = CommandStatus::from_u8(b.u8()?).ok_or(DecodeError::Protocol(
                    "COMMAND_RESULT status must be 0, 1 or 2",
                ))?;
                Self::CommandResult(CommandResult {
                    command_id,
                    status,
                    content_type: b.u8()?,
                    payload: b.rest(),
                })
            }
            MessageType::Ping => {
                let nonce = b.u64()?;
                b.end()?;
                Self::Ping { nonce }
            }
            MessageType::Pong => {
                let nonce = b.u64()?;
                b.end()?;
                Self::Pong { nonce }
            }
            MessageType::Error => {
                let e = ErrorMsg {
                    code: b.u16()?,
                    message: b.str()?,
                };
                b.end()?;
                Self::Error(e)
            }
            MessageType::Goodbye => {
                let g = Goodbye {
                    code: b.u16()?,
                    retry_after_ms: b.u32()?,
                };
                b.end()?;
                Self::Goodbye(g)
            }
            MessageType::Desired => Self::Desired(Desired {
                version: b.u64()?,
                document: b.rest(),
            }),
            MessageType::DesiredAck => {
                let version = b.u64()?;
                b.end()?;
                Self::DesiredAck { version }
            }
            MessageType::Report => {
                let seq = b.u64()?;
                let timestamp_ms = b.u64()?;
                if seq == 0 {
                    return Err(DecodeError::Protocol("REPORT seq 0"));
                }
                Self::Report(Report {
                    seq,
                    timestamp_ms,
                    patch: b.rest(),
                })
            }
            MessageType::FirmwareOffer => {
                let o = FirmwareOffer {
                    image: b.array()?,
                    size: b.u64()?,
                    chunk_max: b.u32()?,
                    window: b.u16()?,
                    signature: b.array()?,
                    model: b.str()?,
                    version: b.str()?,
                };
                b.end()?;
                if o.chunk_max == 0 || o.window == 0 {
                    return Err(DecodeError::Protocol(
                        "FIRMWARE_OFFER chunk_max and window must not be 0",
                    ));
                }
                Self::FirmwareOffer(o)
            }
            MessageType::ChunkRequest => {
                let r = ChunkRequest {
                    image: b.array()?,
                    offset: b.u64()?,
                    length: b.u32()?,
                };
                b.end()?;
                if r.length == 0 {
                    return Err(DecodeError::Protocol("CHUNK_REQUEST length 0"));
                }
                Self::ChunkRequest(r)
            }
            MessageType::Chunk => Self::Chunk(Chunk {
                image: b.array()?,
                offset: b.u64()?,
                crc32: b.u32()?,
                data: b.rest(),
            }),
            MessageType::FirmwareCancel => {
                let image = b.array()?;
                b.end()?;
                Self::FirmwareCancel { image }
            }
        };
        Ok(msg)
    }

    /// Body length in bytes (the frame is 6 bytes more).
    pub fn body_len(&self) -> usize {
        let s = |x: &Str| 2 + x.len();
        let caps = |c: Option<u32>| if c.is_some() { 4 } else { 0 };
        match self {
            Self::Hello(h) => 1 + 2 + s(&h.device_id) + s(&h.token) + caps(h.capabilities),
            Self::Welcome(w) => 1 + 2 + 4 + 2 + 8 + 8 + caps(w.capabilities),
            Self::Telemetry(t) => 8 + 8 + 1 + t.payload.len(),
            Self::Ack { .. } | Self::Ping { .. } | Self::Pong { .. } | Self::DesiredAck { .. } => 8,
            Self::Reject(r) => 8 + 2 + s(&r.reason),
            Self::Command(c) => 8 + s(&c.name) + 1 + c.payload.len(),
            Self::CommandResult(c) => 8 + 1 + 1 + c.payload.len(),
            Self::Error(e) => 2 + s(&e.message),
            Self::Goodbye(_) => 2 + 4,
            Self::Desired(d) => 8 + d.document.len(),
            Self::Report(r) => 8 + 8 + r.patch.len(),
            Self::FirmwareOffer(o) => {
                IMAGE_ID_LEN + 8 + 4 + 2 + SIGNATURE_LEN + s(&o.model) + s(&o.version)
            }
            Self::ChunkRequest(_) => IMAGE_ID_LEN + 8 + 4,
            Self::Chunk(c) => IMAGE_ID_LEN + 8 + 4 + c.data.len(),
            Self::FirmwareCancel { .. } => IMAGE_ID_LEN,
        }
    }

    /// Appends this message as one frame to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), EncodeError> {
        let body_len = self.body_len();
        if body_len > (u32::MAX - 2) as usize {
            return Err(EncodeError::TooLarge(body_len));
        }
        for s in self.strs() {
            if s.len() > usize::from(u16::MAX) {
                return Err(EncodeError::StrTooLong(s.len()));
            }
        }
        put_header(dst, self.kind(), body_len);
        // Lengths of strs were checked above, so the casts cannot truncate.
        let put_str = |dst: &mut BytesMut, s: &Str| {
            dst.put_u16(s.len() as u16);
            dst.put_slice(s.as_bytes());
        };
        match self {
            Self::Hello(h) => {
                dst.put_u8(h.version);
                dst.put_u16(h.keepalive_s);
                put_str(dst, &h.device_id);
                put_str(dst, &h.token);
                if let Some(c) = h.capabilities {
                    dst.put_u32(c);
                }
            }
            Self::Welcome(w) => {
                dst.put_u8(w.version);
                dst.put_u16(w.keepalive_s);
                dst.put_u32(w.max_frame);
                dst.put_u16(w.max_inflight);
                dst.put_u64(w.last_seq);
                dst.put_u64(w.server_time_ms);
                if let Some(c) = w.capabilities {
                    dst.put_u32(c);
                }
            }
            Self::Telemetry(t) => {
                dst.put_u64(t.seq);
                dst.put_u64(t.timestamp_ms);
                dst.put_u8(t.content_type);
                dst.put_slice(&t.payload);
            }
            Self::Ack { seq } => dst.put_u64(*seq),
            Self::Reject(r) => {
                dst.put_u64(r.seq);
                dst.put_u16(r.code);
                put_str(dst, &r.reason);
            }
            Self::Command(c) => {
                dst.put_u64(c.command_id);
                put_str(dst, &c.name);
                dst.put_u8(c.content_type);
                dst.put_slice(&c.payload);
            }
            Self::CommandResult(c) => {
                dst.put_u64(c.command_id);
                dst.put_u8(c.status as u8);
                dst.put_u8(c.content_type);
                dst.put_slice(&c.payload);
            }
            Self::Ping { nonce } | Self::Pong { nonce } => dst.put_u64(*nonce),
            Self::DesiredAck { version } => dst.put_u64(*version),
            Self::Desired(d) => {
                dst.put_u64(d.version);
                dst.put_slice(&d.document);
            }
            Self::Report(r) => {
                dst.put_u64(r.seq);
                dst.put_u64(r.timestamp_ms);
                dst.put_slice(&r.patch);
            }
            Self::FirmwareOffer(o) => {
                dst.put_slice(&o.image);
                dst.put_u64(o.size);
                dst.put_u32(o.chunk_max);
                dst.put_u16(o.window);
                dst.put_slice(&o.signature);
                put_str(dst, &o.model);
                put_str(dst, &o.version);
            }
            Self::ChunkRequest(r) => {
                dst.put_slice(&r.image);
                dst.put_u64(r.offset);
                dst.put_u32(r.length);
            }
            Self::Chunk(c) => {
                dst.put_slice(&c.image);
                dst.put_u64(c.offset);
                dst.put_u32(c.crc32);
                dst.put_slice(&c.data);
            }
            Self::FirmwareCancel { image } => dst.put_slice(image),
            Self::Error(e) => {
                dst.put_u16(e.code);
                put_str(dst, &e.message);
            }
            Self::Goodbye(g) => {
                dst.put_u16(g.code);
                dst.put_u32(g.retry_after_ms);
            }
        }
        Ok(())
    }

    /// Encodes into a fresh buffer.
    pub fn to_bytes(&self) -> Result<Bytes, EncodeError> {
        let mut b = BytesMut::with_capacity(crate::HEADER_LEN + self.body_len());
        self.encode(&mut b)?;
        Ok(b.freeze())
    }

    fn strs(&self) -> impl Iterator<Item = &Str> {
        let (a, b) = match self {
            Self::Hello(h) => (Some(&h.device_id), Some(&h.token)),
            Self::Reject(r) => (Some(&r.reason), None),
            Self::Command(c) => (Some(&c.name), None),
            Self::Error(e) => (Some(&e.message), None),
            Self::FirmwareOffer(o) => (Some(&o.model), Some(&o.version)),
            _ => (None, None),
        };
        a.into_iter().chain(b)
    }
}

/// Appends an ACK frame; the hot path's encoder, infallible.
pub fn encode_ack(seq: u64, dst: &mut BytesMut) {
    dst.extend_from_slice(&ack_frame(seq));
}

/// Bytes in an ACK frame.
pub const ACK_FRAME_LEN: usize = crate::HEADER_LEN + 8;

/// An ACK frame as bytes, for a caller that writes it to a socket without
/// a buffer of its own (the gateway's storage writer does).
pub fn ack_frame(seq: u64) -> [u8; ACK_FRAME_LEN] {
    let mut f = [0u8; ACK_FRAME_LEN];
    // The length field counts type and flags: 2 + 8.
    f[..4].copy_from_slice(&10u32.to_be_bytes());
    f[4] = MessageType::Ack as u8;
    f[crate::HEADER_LEN..].copy_from_slice(&seq.to_be_bytes());
    f
}

/// Appends a TELEMETRY frame without building a [`Message`] (no `Bytes` for
/// the payload needed); used by SDKs and load generators.
pub fn encode_telemetry(
    seq: u64,
    timestamp_ms: u64,
    content_type: u8,
    payload: &[u8],
    dst: &mut BytesMut,
) -> Result<(), EncodeError> {
    let body = 17 + payload.len();
    if body > (u32::MAX - 2) as usize {
        return Err(EncodeError::TooLarge(body));
    }
    put_header(dst, MessageType::Telemetry, body);
    dst.put_u64(seq);
    dst.put_u64(timestamp_ms);
    dst.put_u8(content_type);
    dst.put_slice(payload);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_version_decides_alone() {
        // Version 2 followed by garbage: UNSUPPORTED_VERSION, not PROTOCOL_ERROR.
        let body = Bytes::from_static(&[2, 0xFF]);
        assert_eq!(
            Message::parse(MessageType::Hello, body),
            Err(DecodeError::UnsupportedVersion(2))
        );
        assert_eq!(
            Message::parse(MessageType::Hello, Bytes::new()),
            Err(DecodeError::Protocol("body too short for its fields"))
        );
    }

    #[test]
    fn device_id_rules() {
        assert!(valid_device_id(b"pump-17"));
        assert!(valid_device_id(b"a.b_c:d-E9"));
        assert!(!valid_device_id(b""));
        assert!(!valid_device_id(b"has space"));
        assert!(!valid_device_id("é".as_bytes()));
        assert!(valid_device_id(&[b'a'; 128]));
        assert!(!valid_device_id(&[b'a'; 129]));
    }

    #[test]
    fn telemetry_seq_zero_is_protocol_error() {
        let mut b = BytesMut::new();
        encode_telemetry(0, 0, 1, b"{}", &mut b).unwrap();
        let f = crate::FrameDecoder::default()
            .decode(&mut b)
            .unwrap()
            .unwrap();
        assert_eq!(
            Message::from_frame(f),
            Err(DecodeError::Protocol("TELEMETRY seq 0"))
        );
    }

    #[test]
    fn leftover_bytes_refused() {
        let body = Bytes::from_static(&[0, 0, 0, 0, 0, 0, 0, 1, 9]);
        assert!(matches!(
            Message::parse(MessageType::Ack, body),
            Err(DecodeError::Protocol(_))
        ));
    }

    #[test]
    fn command_result_status_checked_first() {
        // status 3 with the rest missing: still the status error.
        let body = Bytes::from_static(&[0, 0, 0, 0, 0, 0, 0, 1, 3]);
        assert_eq!(
            Message::parse(MessageType::CommandResult, body),
            Err(DecodeError::Protocol(
                "COMMAND_RESULT status must be 0, 1 or 2"
            ))
        );
    }

    #[test]
    fn str_not_utf8_refused() {
        let body = Bytes::from_static(&[0, 3, 0, 1, 0xFF]);
        assert_eq!(
            Message::parse(MessageType::Error, body),
            Err(DecodeError::Protocol("string is not UTF-8"))
        );
    }

    #[test]
    fn encode_refuses_oversized_str() {
        let m = Message::Error(ErrorMsg {
            code: 1,
            message: Str::from("x".repeat(70_000)),
        });
        assert_eq!(
            m.encode(&mut BytesMut::new()),
            Err(EncodeError::StrTooLong(70_000))
        );
    }
}
