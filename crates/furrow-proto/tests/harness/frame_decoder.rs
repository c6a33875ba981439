//! The `frame_decoder` fuzz harness, shared by the libFuzzer target
//! (`fuzz/fuzz_targets/frame_decoder.rs`, which includes this file with
//! `#[path]`) and the normal test suite (`tests/fuzz_corpus.rs`, which
//! replays the committed corpus and random inputs through it).
//!
//! Input layout: byte 0 is the number of cut points `k` (mod 32), the next
//! `k` bytes are chunk lengths, the rest is the byte stream. The stream is
//! decoded under every maximum in [`MAXES`], once whole and once fed in
//! those chunks (one decode loop after each chunk, as a reader does).
//!
//! Invariants checked (what `frame.rs` and `message.rs` promise):
//! * nothing panics;
//! * chunking changes nothing: the same frames, the same error, the same
//!   bytes left over (the spec's "one frame may arrive split over many
//!   reads, and one read may hold many frames");
//! * the first failure is the one an independent reading of the spec's
//!   check order gives (length < 2, length > max, flags, type);
//! * waiting for more bytes (`Ok(None)`), the buffer holds less than one
//!   maximum frame (4 + max bytes), and less than the frame in progress;
//! * a frame is exactly the bytes it came from, within the maximum;
//! * whatever parses as a `Message` obeys the field rules and re-encodes to
//!   exactly the frame it came from, which decodes and parses to the same
//!   message; parse failures are body errors (PROTOCOL_ERROR or
//!   UNSUPPORTED_VERSION), never framing ones;
//! * payload validation does not panic and agrees with its parts.

use bytes::{Bytes, BytesMut};
use furrow_proto::content::{self, ContentError};
use furrow_proto::message::{valid_device_id, MAX_TOKEN};
use furrow_proto::{
    ContentType, DecodeError, ErrorCode, FrameDecoder, Message, MessageType, RawFrame, HEADER_LEN,
};

/// The maximum length fields the stream is decoded under: the smallest
/// possible (bodies of 0 bytes), small ones that fuzzed lengths reach, the
/// spec's default, and the largest a u32 allows.
pub const MAXES: [u32; 6] = [2, 17, 64, 1024, furrow_proto::DEFAULT_MAX_FRAME, u32::MAX];

/// Splits a fuzz input into chunk lengths and the stream.
pub fn split_input(data: &[u8]) -> (Vec<usize>, &[u8]) {
    let Some((&k, rest)) = data.split_first() else {
        return (Vec::new(), data);
    };
    let k = usize::from(k % 32).min(rest.len());
    let (lens, stream) = rest.split_at(k);
    (lens.iter().map(|&l| usize::from(l)).collect(), stream)
}

/// What decoding a whole stream produced.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Frames taken, in order.
    pub frames: Vec<RawFrame>,
    /// The error that ended decoding, if any.
    pub error: Option<DecodeError>,
    /// Bytes still buffered at the end (an incomplete frame, or the
    /// unusable rest after an error).
    pub left: usize,
}

/// Runs every check on one fuzz input.
pub fn check(data: &[u8]) {
    let (lens, stream) = split_input(data);
    for max in MAXES {
        let whole = decode_chunked(stream, &[], max);
        let chunked = decode_chunked(stream, &lens, max);
        assert_eq!(whole, chunked, "chunking changed the outcome (max {max})");
        assert_eq!(whole.error, reference_error(stream, max), "max {max}");
        for f in whole.frames {
            check_frame(f, max);
        }
    }
}

/// Feeds `stream` in chunks of `lens` (the rest in one last chunk) and
/// decodes after each, checking the buffering invariants.
pub fn decode_chunked(stream: &[u8], lens: &[usize], max: u32) -> Outcome {
    let dec = FrameDecoder::new(max);
    let max_wire = 4 + max as usize;
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let (mut fed, mut taken) = (0usize, 0usize);
    let mut chunks = lens.iter().copied().chain(std::iter::once(usize::MAX));
    let mut first = true;
    while first || fed < stream.len() {
        first = false;
        let n = chunks.next().unwrap_or(usize::MAX).min(stream.len() - fed);
        buf.extend_from_slice(&stream[fed..fed + n]);
        fed += n;
        loop {
            let header = dec.check_header(&buf);
            match dec.decode(&mut buf) {
                Ok(None) => {
                    // Waiting: less than one maximum frame, and less than the
                    // frame whose header is here.
                    assert!(
                        buf.len() < max_wire,
                        "{} bytes buffered while waiting",
                        buf.len()
                    );
                    match header {
                        Ok(Some(total)) => assert!(buf.len() < total && total <= max_wire),
                        Ok(None) => assert!(buf.len() < 4),
                        Err(e) => panic!("check_header failed ({e}) but decode waits"),
                    }
                    break;
                }
                Ok(Some(f)) => {
                    let wire = f.wire_len();
                    assert_eq!(header, Ok(Some(wire)), "check_header disagrees with decode");
                    assert!(wire <= max_wire && f.body.len() + 2 <= max as usize);
                    let src = &stream[taken..taken + wire];
                    let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
                    assert_eq!(len + 4, wire, "frame length is not its length field");
                    assert_eq!((src[4], src[5]), (f.kind as u8, 0));
                    assert_eq!(
                        &src[HEADER_LEN..],
                        &f.body[..],
                        "body is not the bytes sent"
                    );
                    taken += wire;
                    frames.push(f);
                }
                Err(e) => {
                    assert_eq!(header, Err(e), "check_header disagrees with decode");
                    // An error consumes nothing.
                    assert_eq!(taken + buf.len(), fed);
                    return Outcome {
                        frames,
                        error: Some(e),
                        left: stream.len() - taken,
                    };
                }
            }
        }
        // The decoder only ever takes whole frames off the front.
        assert_eq!(taken + buf.len(), fed);
    }
    Outcome {
        frames,
        error: None,
        left: buf.len(),
    }
}

/// The spec's check order, written independently of `frame.rs`: the error
/// that decoding `stream` under `max` must end with, if any.
pub fn reference_error(stream: &[u8], max: u32) -> Option<DecodeError> {
    let mut at = 0usize;
    loop {
        let rest = &stream[at..];
        if rest.len() < 4 {
            return None;
        }
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
        if len < 2 {
            return Some(DecodeError::Protocol("frame length below 2"));
        }
        if len > max {
            return Some(DecodeError::FrameTooLarge { len, max });
        }
        if rest.len() < 6 {
            return None;
        }
        if rest[5] != 0 {
            return Some(DecodeError::Protocol("frame flags must be 0"));
        }
        if MessageType::from_u8(rest[4]).is_none() {
            return Some(DecodeError::UnknownType(rest[4]));
        }
        let total = 4 + len as usize;
        if rest.len() < total {
            return None;
        }
        at += total;
    }
}

/// Parses one frame and checks the message rules and the round trip.
pub fn check_frame(f: RawFrame, max: u32) {
    let wire_len = f.wire_len();
    let mut original = BytesMut::with_capacity(wire_len);
    original.extend_from_slice(&((f.body.len() + 2) as u32).to_be_bytes());
    original.extend_from_slice(&[f.kind as u8, 0]);
    original.extend_from_slice(&f.body);

    let parsed = Message::parse(f.kind, f.body.clone());
    // Parsing is a pure function of the bytes.
    assert_eq!(parsed, Message::parse(f.kind, f.body.clone()));
    let msg = match parsed {
        Ok(m) => m,
        Err(e) => {
            assert!(
                matches!(
                    e.code(),
                    ErrorCode::ProtocolError | ErrorCode::UnsupportedVersion
                ),
                "body error with a framing code: {e:?}"
            );
            if let DecodeError::UnsupportedVersion(v) = e {
                assert_eq!(f.kind, MessageType::Hello);
                assert_eq!(f.body.first(), Some(&v));
                assert_ne!(v, furrow_proto::VERSION);
            }
            return;
        }
    };
    assert_eq!(msg.kind(), f.kind);
    assert_eq!(msg.body_len(), f.body.len());
    check_fields(&msg);

    // Re-encoding gives back the very bytes; they decode to the same message.
    let mut enc = BytesMut::new();
    msg.encode(&mut enc).expect("a parsed message encodes");
    assert_eq!(&enc[..], &original[..], "re-encoding changed the frame");
    assert_eq!(msg.to_bytes().expect("encodes"), Bytes::from(enc.to_vec()));
    let again = FrameDecoder::new(max)
        .decode(&mut enc)
        .expect("a re-encoded frame decodes")
        .expect("a re-encoded frame is complete");
    assert!(enc.is_empty());
    assert_eq!(Message::from_frame(again), Ok(msg));
}

/// The field rules that `Message::parse` promises for what it accepts.
fn check_fields(msg: &Message) {
    match msg {
        Message::Hello(h) => {
            assert_eq!(h.version, furrow_proto::VERSION);
            assert!(valid_device_id(h.device_id.as_bytes()));
            assert!(h.token.len() <= MAX_TOKEN);
            assert!(std::str::from_utf8(h.token.as_bytes()).is_ok());
        }
        Message::Telemetry(t) => {
            assert_ne!(t.seq, 0);
            check_payload(t.content_type, &t.payload);
        }
        Message::Command(c) => check_payload(c.content_type, &c.payload),
        Message::CommandResult(r) => {
            assert!((r.status as u8) <= 2);
            check_payload(r.content_type, &r.payload);
        }
        _ => {}
    }
}

/// Payload validation agrees with its parts, for the frame's content type
/// and for every defined one.
fn check_payload(ct: u8, payload: &[u8]) {
    let json = content::is_json(payload);
    let cbor = content::is_cbor(payload);
    let text = std::str::from_utf8(payload).is_ok();
    for ct in [ct, 0, 1, 2, 3] {
        let want = match ct {
            0 => Ok(ContentType::Octets),
            1 if json => Ok(ContentType::Json),
            1 => Err(ContentError::InvalidPayload("json")),
            2 if cbor => Ok(ContentType::Cbor),
            2 => Err(ContentError::InvalidPayload("cbor")),
            3 if text => Ok(ContentType::Text),
            3 => Err(ContentError::InvalidPayload("text")),
            _ => Err(ContentError::UnsupportedContentType(ct)),
        };
        assert_eq!(content::validate(ct, payload), want);
    }
    // JSON is text.
    assert!(!json || text);
}
