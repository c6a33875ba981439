//! Numeric registries of furrow/1: message types, ERROR/REJECT codes, GOODBYE
//! codes, content types and command statuses.
//!
//! Codes that arrive from the peer and may legitimately be unknown (a content
//! type, a GOODBYE code) stay raw integers on [`crate::Message`]; these enums
//! give names to the values the spec defines.

/// The `type` byte of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageType {
    /// Device opens a session.
    Hello = 0x01,
    /// Gateway accepts a session.
    Welcome = 0x02,
    /// Device sends a reading.
    Telemetry = 0x03,
    /// Gateway acknowledges readings cumulatively.
    Ack = 0x04,
    /// Gateway refuses one reading for good.
    Reject = 0x05,
    /// Gateway sends a command.
    Command = 0x06,
    /// Device answers a command.
    CommandResult = 0x07,
    /// Liveness probe, either side.
    Ping = 0x08,
    /// Answer to PING, either side.
    Pong = 0x09,
    /// Fatal error from the gateway.
    Error = 0x0A,
    /// Orderly close, either side.
    Goodbye = 0x0B,
    /// Gateway sends the desired state (capability STATE only).
    Desired = 0x0C,
    /// Device confirms a desired state version (capability STATE only).
    DesiredAck = 0x0D,
    /// Device reports a change of its state (capability STATE only).
    Report = 0x0E,
    /// Gateway offers a firmware image (capability FIRMWARE only).
    FirmwareOffer = 0x0F,
    /// Device asks for a range of an offered image (capability FIRMWARE only).
    ChunkRequest = 0x10,
    /// Gateway sends a range of an image (capability FIRMWARE only).
    Chunk = 0x11,
    /// Gateway withdraws an offer (capability FIRMWARE only).
    FirmwareCancel = 0x12,
}

impl MessageType {
    /// Maps a `type` byte to a known message type.
    pub const fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            0x01 => Self::Hello,
            0x02 => Self::Welcome,
            0x03 => Self::Telemetry,
            0x04 => Self::Ack,
            0x05 => Self::Reject,
            0x06 => Self::Command,
            0x07 => Self::CommandResult,
            0x08 => Self::Ping,
            0x09 => Self::Pong,
            0x0A => Self::Error,
            0x0B => Self::Goodbye,
            0x0C => Self::Desired,
            0x0D => Self::DesiredAck,
            0x0E => Self::Report,
            0x0F => Self::FirmwareOffer,
            0x10 => Self::ChunkRequest,
            0x11 => Self::Chunk,
            0x12 => Self::FirmwareCancel,
            _ => return None,
        })
    }

    /// Whether a device may send this message type.
    pub const fn sent_by_device(self) -> bool {
        matches!(
            self,
            Self::Hello
                | Self::Telemetry
                | Self::CommandResult
                | Self::Ping
                | Self::Pong
                | Self::Goodbye
                | Self::DesiredAck
                | Self::Report
                | Self::ChunkRequest
        )
    }

    /// Whether the message belongs to an extension, and which capability
    /// bit (docs/protocol.md, "Capabilities") both sides must have agreed
    /// on before it may be sent.
    pub const fn capability(self) -> Option<u32> {
        match self {
            Self::Desired | Self::DesiredAck | Self::Report => Some(CAP_STATE),
            Self::FirmwareOffer | Self::ChunkRequest | Self::Chunk | Self::FirmwareCancel => {
                Some(CAP_FIRMWARE)
            }
            _ => None,
        }
    }

    /// Whether a gateway may send this message type.
    pub const fn sent_by_gateway(self) -> bool {
        !matches!(
            self,
            Self::Hello
                | Self::Telemetry
                | Self::CommandResult
                | Self::DesiredAck
                | Self::Report
                | Self::ChunkRequest
        )
    }

    /// Upper-case name as the spec writes it; stable, for logs and metric labels.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Hello => "HELLO",
            Self::Welcome => "WELCOME",
            Self::Telemetry => "TELEMETRY",
            Self::Ack => "ACK",
            Self::Reject => "REJECT",
            Self::Command => "COMMAND",
            Self::CommandResult => "COMMAND_RESULT",
            Self::Ping => "PING",
            Self::Pong => "PONG",
            Self::Error => "ERROR",
            Self::Goodbye => "GOODBYE",
            Self::Desired => "DESIRED",
            Self::DesiredAck => "DESIRED_ACK",
            Self::Report => "REPORT",
            Self::FirmwareOffer => "FIRMWARE_OFFER",
            Self::ChunkRequest => "CHUNK_REQUEST",
            Self::Chunk => "CHUNK",
            Self::FirmwareCancel => "FIRMWARE_CANCEL",
        }
    }
}

/// Capability bit of device state (DESIRED, DESIRED_ACK, REPORT), in
/// HELLO's and WELCOME's optional `capabilities` field.
pub const CAP_STATE: u32 = 1;

/// Capability bit of firmware updates (FIRMWARE_OFFER, CHUNK_REQUEST,
/// CHUNK, FIRMWARE_CANCEL). A gateway grants it only with [`CAP_STATE`]:
/// the device reports its progress through its reported state.
pub const CAP_FIRMWARE: u32 = 2;

/// Codes carried by ERROR (fatal) and REJECT (one message refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// Malformed frame or message, or a message at the wrong time.
    ProtocolError = 1,
    /// HELLO carries a version other than 1.
    UnsupportedVersion = 2,
    /// Unknown device or wrong token (deliberately indistinguishable).
    AuthFailed = 3,
    /// The length field is above the maximum frame length.
    FrameTooLarge = 4,
    /// The type byte is not a furrow/1 message type.
    UnknownType = 5,
    /// HELLO did not arrive within the handshake timeout.
    HandshakeTimeout = 6,
    /// No complete frame for 1.5 x the keepalive.
    KeepaliveTimeout = 7,
    /// Connection or rate limit: retry later.
    Busy = 8,
    /// The gateway failed internally.
    Internal = 9,
    /// REJECT: the payload does not match its content type.
    InvalidPayload = 20,
    /// REJECT: the content type is not one furrow/1 defines.
    UnsupportedContentType = 21,
    /// REJECT: a REPORT's patch, or the reported document it would make,
    /// is over the gateway's size or depth limit.
    StateTooLarge = 22,
}

impl ErrorCode {
    /// Maps a wire value to a known code.
    pub const fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::ProtocolError,
            2 => Self::UnsupportedVersion,
            3 => Self::AuthFailed,
            4 => Self::FrameTooLarge,
            5 => Self::UnknownType,
            6 => Self::HandshakeTimeout,
            7 => Self::KeepaliveTimeout,
            8 => Self::Busy,
            9 => Self::Internal,
            20 => Self::InvalidPayload,
            21 => Self::UnsupportedContentType,
            22 => Self::StateTooLarge,
            _ => return None,
        })
    }

    /// Upper-case name as the spec writes it; stable, for logs and metric labels.
    pub const fn name(self) -> &'static str {
        match self {
            Self::ProtocolError => "PROTOCOL_ERROR",
            Self::UnsupportedVersion => "UNSUPPORTED_VERSION",
            Self::AuthFailed => "AUTH_FAILED",
            Self::FrameTooLarge => "FRAME_TOO_LARGE",
            Self::UnknownType => "UNKNOWN_TYPE",
            Self::HandshakeTimeout => "HANDSHAKE_TIMEOUT",
            Self::KeepaliveTimeout => "KEEPALIVE_TIMEOUT",
            Self::Busy => "BUSY",
            Self::Internal => "INTERNAL",
            Self::InvalidPayload => "INVALID_PAYLOAD",
            Self::UnsupportedContentType => "UNSUPPORTED_CONTENT_TYPE",
            Self::StateTooLarge => "STATE_TOO_LARGE",
        }
    }
}

/// Codes carried by GOODBYE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum GoodbyeCode {
    /// Orderly close.
    Normal = 0,
    /// The gateway is shutting down; reconnect after `retry_after_ms`.
    ServerShutdown = 1,
    /// A newer connection of the same device took the session over.
    SessionTakenOver = 2,
    /// The device was revoked.
    DeviceRevoked = 3,
}

impl GoodbyeCode {
    /// Maps a wire value to a known code.
    pub const fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            0 => Self::Normal,
            1 => Self::ServerShutdown,
            2 => Self::SessionTakenOver,
            3 => Self::DeviceRevoked,
            _ => return None,
        })
    }

    /// Upper-case name as the spec writes it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Normal => "NORMAL",
            Self::ServerShutdown => "SERVER_SHUTDOWN",
            Self::SessionTakenOver => "SESSION_TAKEN_OVER",
            Self::DeviceRevoked => "DEVICE_REVOKED",
        }
    }
}

/// Content types of TELEMETRY and COMMAND payloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ContentType {
    /// Opaque bytes; anything goes.
    Octets = 0,
    /// Exactly one JSON value (RFC 8259).
    Json = 1,
    /// Exactly one well-formed CBOR data item (RFC 8949).
    Cbor = 2,
    /// Valid UTF-8 text.
    Text = 3,
}

impl ContentType {
    /// Maps a wire value to a known content type.
    pub const fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Octets,
            1 => Self::Json,
            2 => Self::Cbor,
            3 => Self::Text,
            _ => return None,
        })
    }

    /// Lower-case name, for APIs and logs.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Octets => "octets",
            Self::Json => "json",
            Self::Cbor => "cbor",
            Self::Text => "text",
        }
    }
}

/// Statuses of COMMAND_RESULT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CommandStatus {
    /// The command ran and succeeded.
    Succeeded = 0,
    /// The command ran and failed.
    Failed = 1,
    /// The device does not know the command.
    UnknownCommand = 2,
}

impl CommandStatus {
    /// Maps a wire value to a status; any other value is a PROTOCOL_ERROR.
    pub const fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Succeeded,
            1 => Self::Failed,
            2 => Self::UnknownCommand,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_type_round_trips_and_directions() {
        for b in 0..=255u8 {
            if let Some(t) = MessageType::from_u8(b) {
                assert_eq!(t as u8, b);
                assert!(t.sent_by_device() || t.sent_by_gateway());
            } else {
                assert!(b == 0 || b > 0x12);
            }
        }
        assert!(!MessageType::Hello.sent_by_gateway());
        assert!(!MessageType::Ack.sent_by_device());
        assert!(MessageType::Ping.sent_by_device() && MessageType::Ping.sent_by_gateway());
    }

    #[test]
    fn codes_round_trip() {
        for v in 0..=u16::MAX {
            if let Some(c) = ErrorCode::from_u16(v) {
                assert_eq!(c as u16, v);
            }
            if let Some(c) = GoodbyeCode::from_u16(v) {
                assert_eq!(c as u16, v);
            }
        }
        for v in 0..=u8::MAX {
            if let Some(c) = ContentType::from_u8(v) {
                assert_eq!(c as u8, v);
            }
            if let Some(c) = CommandStatus::from_u8(v) {
                assert_eq!(c as u8, v);
            }
        }
    }
}
