//! Frames: the 6-byte header and incremental decoding.
//!
//! ```text
//! offset  size  field
//! 0       4     length  u32 BE: bytes after this field (type + flags + body)
//! 4       1     type
//! 5       1     flags   0 in furrow/1
//! 6       n     body    length - 2 bytes
//! ```
//!
//! [`FrameDecoder::decode`] is called with whatever bytes have arrived. "Not
//! enough bytes yet" is `Ok(None)`, not an error. The checks run in the
//! spec's order (length, flags, type) and each as soon as its bytes are
//! there: an oversized length is refused from the four length bytes alone, so
//! the caller never has to buffer more than one maximum frame. A complete
//! frame is split off the buffer with `split_to(..).freeze()`: the body is a
//! reference-counted slice of the read buffer, not a copy.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::codes::MessageType;
use crate::message::DecodeError;

/// Bytes before the body: length (4), type (1), flags (1).
pub const HEADER_LEN: usize = 6;

/// The length field counts type and flags too, so 2 is the smallest value.
pub const MIN_LENGTH: u32 = 2;

/// The spec's default maximum value of the length field.
pub const DEFAULT_MAX_FRAME: u32 = 65_536;

/// A frame whose header has been checked and whose body is complete but not
/// yet parsed. Parse it with [`crate::Message::parse`] once the caller has
/// checked that this message type may arrive now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// The message type.
    pub kind: MessageType,
    /// The body: `length - 2` bytes.
    pub body: Bytes,
}

impl RawFrame {
    /// Bytes this frame took on the wire.
    pub fn wire_len(&self) -> usize {
        HEADER_LEN + self.body.len()
    }
}

/// Incremental, allocation-free frame decoder.
///
/// It keeps no state besides its limit: everything lives in the caller's
/// buffer, so it is trivially cancel-safe and can be shared.
#[derive(Debug, Clone, Copy)]
pub struct FrameDecoder {
    max_frame: u32,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME)
    }
}

impl FrameDecoder {
    /// A decoder that refuses length fields above `max_frame`.
    pub const fn new(max_frame: u32) -> Self {
        Self { max_frame }
    }

    /// The largest accepted value of the length field.
    pub const fn max_frame(&self) -> u32 {
        self.max_frame
    }

    /// Checks whatever header bytes `buf` holds, in the spec's order. Returns
    /// the full wire length of the frame once the four length bytes are
    /// there.
    ///
    /// Useful for a reader that wants to size its next read to the frame.
    pub fn check_header(&self, buf: &[u8]) -> Result<Option<usize>, DecodeError> {
        let Some(len_bytes) = buf.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
        if len < MIN_LENGTH {
            return Err(DecodeError::Protocol("frame length below 2"));
        }
        if len > self.max_frame {
            return Err(DecodeError::FrameTooLarge {
                len,
                max: self.max_frame,
            });
        }
        // Flags before type, and neither until both bytes are here: the
        // answer must not depend on how the header was split across reads.
        if let (Some(&kind), Some(&flags)) = (buf.get(4), buf.get(5)) {
            if flags != 0 {
                return Err(DecodeError::Protocol("frame flags must be 0"));
            }
            if MessageType::from_u8(kind).is_none() {
                return Err(DecodeError::UnknownType(kind));
            }
        }
        // u32 -> usize cannot truncate on the 32/64-bit targets we build for.
        Ok(Some(4 + len as usize))
    }

    /// Takes one complete frame off the front of `buf`, if there is one.
    ///
    /// On `Err` the stream is unusable (framing is lost); the caller answers
    /// with ERROR [`DecodeError::code`] and closes.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<RawFrame>, DecodeError> {
        let Some(total) = self.check_header(buf)? else {
            return Ok(None);
        };
        if buf.len() < total {
            return Ok(None);
        }
        let kind = match MessageType::from_u8(buf[4]) {
            Some(kind) => kind,
            None => return Err(DecodeError::UnknownType(buf[4])),
        };
        let mut frame = buf.split_to(total);
        frame.advance(HEADER_LEN);
        Ok(Some(RawFrame {
            kind,
            body: frame.freeze(),
        }))
    }
}

/// Writes a frame header for a body of `body_len` bytes.
///
/// # Panics
///
/// Never for bodies a `u32` length can describe; callers check against their
/// maximum first (see [`crate::EncodeError::TooLarge`]).
pub(crate) fn put_header(dst: &mut BytesMut, kind: MessageType, body_len: usize) {
    // Bodies are bounded by the caller's max frame (<= u32::MAX - 2).
    let len = (body_len + 2) as u32;
    dst.reserve(HEADER_LEN + body_len);
    dst.put_u32(len);
    dst.put_u8(kind as u8);
    dst.put_u8(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec() -> FrameDecoder {
        FrameDecoder::new(DEFAULT_MAX_FRAME)
    }

    #[test]
    fn needs_four_bytes_to_decide() {
        let mut buf = BytesMut::from(&[0u8, 0, 0][..]);
        assert_eq!(dec().decode(&mut buf), Ok(None));
    }

    #[test]
    fn oversized_refused_from_length_alone() {
        let mut buf = BytesMut::from(&[0x00u8, 0x01, 0x00, 0x01][..]);
        assert_eq!(
            dec().decode(&mut buf),
            Err(DecodeError::FrameTooLarge {
                len: 65_537,
                max: 65_536
            })
        );
        // A PROXY v1 header read as a frame is far too large.
        let mut buf = BytesMut::from(&b"PROXY TCP4 1.2.3.4"[..]);
        assert!(matches!(
            dec().decode(&mut buf),
            Err(DecodeError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn checks_run_in_spec_order() {
        // length < 2 wins over everything.
        let mut b = BytesMut::from(&[0u8, 0, 0, 1, 0xFF][..]);
        assert_eq!(dec().decode(&mut b).unwrap_err().code() as u16, 1);
        // flags before type: unknown type with flags set is PROTOCOL_ERROR.
        let mut b = BytesMut::from(&[0u8, 0, 0, 2, 0xFF, 1][..]);
        assert_eq!(
            dec().decode(&mut b),
            Err(DecodeError::Protocol("frame flags must be 0"))
        );
        // unknown type, flags fine.
        let mut b = BytesMut::from(&[0u8, 0, 0, 2, 0xFF, 0][..]);
        assert_eq!(dec().decode(&mut b), Err(DecodeError::UnknownType(0xFF)));
        // type 0 is unknown too.
        let mut b = BytesMut::from(&[0u8, 0, 0, 2, 0x00, 0][..]);
        assert_eq!(dec().decode(&mut b), Err(DecodeError::UnknownType(0)));
    }

    #[test]
    fn header_errors_before_body_arrives() {
        let mut b = BytesMut::from(&[0u8, 0, 0, 100, 0x03, 7][..]);
        assert_eq!(
            dec().decode(&mut b),
            Err(DecodeError::Protocol("frame flags must be 0"))
        );
    }

    #[test]
    fn coalesced_and_split_frames() {
        let ping = [0u8, 0, 0, 10, 0x08, 0, 0, 0, 0, 0, 0, 0, 0, 7];
        let mut all = BytesMut::new();
        all.extend_from_slice(&ping);
        all.extend_from_slice(&ping);
        all.extend_from_slice(&ping[..5]);
        let a = dec().decode(&mut all).unwrap().unwrap();
        let b = dec().decode(&mut all).unwrap().unwrap();
        assert_eq!(a, b);
        assert_eq!(a.kind, MessageType::Ping);
        assert_eq!(&a.body[..], &ping[6..]);
        assert_eq!(dec().decode(&mut all), Ok(None));
        all.extend_from_slice(&ping[5..]);
        assert!(dec().decode(&mut all).unwrap().is_some());
        assert!(all.is_empty());
    }
}
