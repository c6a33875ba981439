//! A tokio-util [`Decoder`]/[`Encoder`] over the sans-IO codec, for callers
//! that want `Framed`. Enabled by the `codec` feature.
//!
//! It parses bodies without session checks: use it on the device side or in
//! tools; the gateway does the spec's "may this come now" check between
//! [`FrameDecoder::decode`] and [`Message::parse`] itself.

use bytes::BytesMut;
use tokio_util::codec::{Decoder, Encoder};

use crate::{DecodeError, EncodeError, FrameDecoder, Message};

/// Errors of [`FurrowCodec`]: I/O or protocol.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The transport failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The peer sent something that is not furrow/1.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A message could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

/// Frames and parses furrow/1 messages.
#[derive(Debug, Clone, Copy, Default)]
pub struct FurrowCodec {
    frames: FrameDecoder,
}

impl FurrowCodec {
    /// A codec that refuses frames longer than `max_frame`.
    pub fn new(max_frame: u32) -> Self {
        Self {
            frames: FrameDecoder::new(max_frame),
        }
    }
}

impl Decoder for FurrowCodec {
    type Item = Message;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, CodecError> {
        match self.frames.decode(src)? {
            Some(f) => Ok(Some(Message::from_frame(f)?)),
            None => Ok(None),
        }
    }
}

impl Encoder<&Message> for FurrowCodec {
    type Error = CodecError;

    fn encode(&mut self, item: &Message, dst: &mut BytesMut) -> Result<(), CodecError> {
        item.encode(dst)?;
        Ok(())
    }
}
