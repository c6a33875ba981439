//! # furrow-proto: the furrow/1 wire format
//!
//! Everything a gateway, a device SDK or firmware needs to speak furrow/1
//! (see `docs/protocol.md`), and nothing else: no sockets, no clock, no tasks.
//! Callers feed bytes in and take frames out, so the same code runs in the
//! gateway, in the SDK, in fuzzers and in property tests.
//!
//! The layers, from bytes up:
//!
//! * [`frame`]: the 6-byte frame header and the incremental [`FrameDecoder`].
//!   It decides on an oversized frame from the four length bytes alone and
//!   hands out bodies as [`bytes::Bytes`] slices of the read buffer (no copy).
//! * [`message`]: typed [`Message`]s, parsed from a frame body and encoded
//!   into a `BytesMut`.
//! * [`content`]: payload validation by content type (JSON, CBOR, UTF-8 text,
//!   octets), so a device can check what it sends with the gateway's rules.
//! * [`codes`]: the numeric registries (message types, ERROR/REJECT codes,
//!   GOODBYE codes, content types, command statuses).
//!
//! Decoding is split in two steps on purpose: the spec orders checks as
//! length, flags, type, *whether that message may come now*, then body. The
//! third check needs session state, which lives with the caller; so
//! [`FrameDecoder::decode`] stops after the type and [`Message::parse`] does
//! the body.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod codes;
pub mod content;
pub mod frame;
pub mod message;

#[cfg(feature = "codec")]
pub mod codec;

pub use codes::{
    CommandStatus, ContentType, ErrorCode, GoodbyeCode, MessageType, CAP_FIRMWARE, CAP_STATE,
};
pub use frame::{FrameDecoder, RawFrame, DEFAULT_MAX_FRAME, HEADER_LEN};
pub use message::{
    firmware_signed_message, Chunk, ChunkRequest, Command, CommandResult, DecodeError, Desired,
    EncodeError, ErrorMsg, FirmwareOffer, Goodbye, Hello, Message, Reject, Report, Str, Telemetry,
    Welcome, IMAGE_ID_LEN, SIGNATURE_LEN,
};

/// The protocol version this crate speaks, carried in HELLO and WELCOME.
pub const VERSION: u8 = 1;
