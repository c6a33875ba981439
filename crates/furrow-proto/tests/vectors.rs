//! The spec's test vectors, byte for byte and in both directions, and table
//! tests for every decoding error docs/protocol.md defines.

use bytes::{Bytes, BytesMut};
use furrow_proto::message::{ack_frame, encode_ack, encode_telemetry, valid_device_id};
use furrow_proto::{
    content, Command, CommandResult, CommandStatus, ContentType, DecodeError, Desired, ErrorCode,
    ErrorMsg, FrameDecoder, Goodbye, Hello, Message, MessageType, Reject, Report, Str, Telemetry,
    Welcome, CAP_STATE, DEFAULT_MAX_FRAME, HEADER_LEN,
};
use furrow_proto::{firmware_signed_message, Chunk, ChunkRequest, FirmwareOffer, CAP_FIRMWARE};

/// The normative document, read at compile time so the vectors below cannot
/// drift from it unnoticed.
const PROTOCOL_MD: &str = include_str!("../../../docs/protocol.md");

/// The vectors every implementation checks against (the C library's tests
/// read the same file): `name: hex` lines, in the spec's order.
const SHARED_VECTORS: &str = include_str!("../../../docs/test-vectors.txt");

const HELLO_HEX: &str = "00 00 00 13 01 00 01 00 1e 00 07 70 75 6d 70 2d 31 37 00 03 6b 33 79";
const WELCOME_HEX: &str = "00 00 00 1b 02 00 01 00 1e 00 01 00 00 01 00 00 00 00 00 00 00 00 29 \
                           00 00 01 9a a3 b5 ec 00";
const TELEMETRY_HEX: &str = "00 00 00 1d 03 00 00 00 00 00 00 00 00 2a 00 00 01 9a a3 b5 ec 7b \
                             01 7b 22 74 22 3a 32 31 2e 35 7d";
const ACK_HEX: &str = "00 00 00 0a 04 00 00 00 00 00 00 00 00 2a";
const HELLO_CAPS_HEX: &str =
    "00 00 00 17 01 00 01 00 1e 00 07 70 75 6d 70 2d 31 37 00 03 6b 33 79 00 00 00 01";
const WELCOME_CAPS_HEX: &str = "00 00 00 1f 02 00 01 00 1e 00 01 00 00 01 00 00 00 00 00 00 00 00 \
                                29 00 00 01 9a a3 b5 ec 00 00 00 00 01";
const DESIRED_HEX: &str =
    "00 00 00 16 0c 00 00 00 00 00 00 00 00 03 7b 22 6c 65 64 22 3a 22 6f 6e 22 7d";
const DESIRED_ACK_HEX: &str = "00 00 00 0a 0d 00 00 00 00 00 00 00 00 03";
const REPORT_HEX: &str = "00 00 00 1e 0e 00 00 00 00 00 00 00 00 2b 00 00 01 9a a3 b5 ed c8 \
                          7b 22 6c 65 64 22 3a 22 6f 6e 22 7d";
const REJECT_STATE_HEX: &str = "00 00 00 1d 05 00 00 00 00 00 00 00 00 2c 00 16 00 0f 73 74 61 \
                                74 65 20 74 6f 6f 20 6c 61 72 67 65";
const HELLO_FW_HEX: &str =
    "00 00 00 17 01 00 01 00 1e 00 07 70 75 6d 70 2d 31 37 00 03 6b 33 79 00 00 00 03";
const OFFER_HEX: &str = concat!(
    "00 00 00 7b 0f 00 ",
    "ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ",
    "00 00 00 00 00 10 00 00 00 00 80 00 00 04 ",
    "5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a ",
    "5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a ",
    "00 02 70 37 00 05 31 2e 31 2e 30"
);
const CHUNK_REQUEST_HEX: &str = concat!(
    "00 00 00 2e 10 00 ",
    "ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ",
    "00 00 00 00 00 00 80 00 00 00 80 00"
);
const CHUNK_HEX: &str = concat!(
    "00 00 00 34 11 00 ",
    "ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ",
    "00 00 00 00 00 00 80 00 e4 1a 65 85 66 75 72 72 6f 77"
);
const CANCEL_HEX: &str = concat!(
    "00 00 00 22 12 00 ",
    "ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab"
);

const TOO_SHORT: DecodeError = DecodeError::Protocol("body too short for its fields");
const LEFTOVER: DecodeError = DecodeError::Protocol("bytes left over after the last field");
const NOT_UTF8: DecodeError = DecodeError::Protocol("string is not UTF-8");
const BAD_DEVICE_ID: DecodeError =
    DecodeError::Protocol("device_id must be 1 to 128 bytes of [A-Za-z0-9._:-]");
const LONG_TOKEN: DecodeError = DecodeError::Protocol("token longer than 256 bytes");
const SEQ_ZERO: DecodeError = DecodeError::Protocol("TELEMETRY seq 0");
const BAD_STATUS: DecodeError = DecodeError::Protocol("COMMAND_RESULT status must be 0, 1 or 2");
const SHORT_LENGTH: DecodeError = DecodeError::Protocol("frame length below 2");
const BAD_FLAGS: DecodeError = DecodeError::Protocol("frame flags must be 0");

fn unhex(s: &str) -> Vec<u8> {
    let compact: String = s.split_whitespace().collect();
    hex::decode(compact).unwrap()
}

fn encode(m: &Message) -> Vec<u8> {
    let mut b = BytesMut::new();
    m.encode(&mut b).unwrap();
    b.to_vec()
}

/// Decodes exactly one frame that makes up all of `wire`.
fn decode_one(wire: &[u8]) -> Result<Message, DecodeError> {
    decode_one_with(FrameDecoder::default(), wire)
}

fn decode_one_with(dec: FrameDecoder, wire: &[u8]) -> Result<Message, DecodeError> {
    let mut buf = BytesMut::from(wire);
    let frame = dec.decode(&mut buf)?.expect("a complete frame");
    assert!(buf.is_empty(), "the frame must consume exactly its bytes");
    assert_eq!(frame.wire_len(), wire.len());
    Message::parse(frame.kind, frame.body)
}

/// Only the frame-level checks (length, flags, type) on a buffer.
fn decode_header(bytes: &[u8]) -> Result<Option<MessageType>, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    FrameDecoder::default()
        .decode(&mut buf)
        .map(|f| f.map(|f| f.kind))
}

fn parse(kind: MessageType, body: &[u8]) -> Result<Message, DecodeError> {
    Message::parse(kind, Bytes::copy_from_slice(body))
}

fn hello_body(version: u8, keepalive: u16, id: &[u8], token: &[u8]) -> Vec<u8> {
    let mut b = vec![version];
    b.extend_from_slice(&keepalive.to_be_bytes());
    b.extend_from_slice(&(id.len() as u16).to_be_bytes());
    b.extend_from_slice(id);
    b.extend_from_slice(&(token.len() as u16).to_be_bytes());
    b.extend_from_slice(token);
    b
}

fn spec_hello() -> Message {
    Message::Hello(Hello {
        version: 1,
        keepalive_s: 30,
        device_id: Str::from("pump-17"),
        token: Str::from("k3y"),
        capabilities: None,
    })
}

fn spec_welcome() -> Message {
    Message::Welcome(Welcome {
        version: 1,
        keepalive_s: 30,
        max_frame: 65_536,
        max_inflight: 256,
        last_seq: 41,
        server_time_ms: 1_763_683_200_000,
        capabilities: None,
    })
}

fn spec_telemetry() -> Message {
    Message::Telemetry(Telemetry {
        seq: 42,
        timestamp_ms: 1_763_683_200_123,
        content_type: ContentType::Json as u8,
        payload: Bytes::from_static(br#"{"t":21.5}"#),
    })
}

fn spec_ack() -> Message {
    Message::Ack { seq: 42 }
}

fn spec_desired() -> Message {
    Message::Desired(Desired {
        version: 3,
        document: Bytes::from_static(br#"{"led":"on"}"#),
    })
}

fn spec_report() -> Message {
    Message::Report(Report {
        seq: 43,
        timestamp_ms: 1_763_683_200_456,
        patch: Bytes::from_static(br#"{"led":"on"}"#),
    })
}

const IMAGE: [u8; 32] = [0xab; 32];

fn spec_offer() -> Message {
    Message::FirmwareOffer(FirmwareOffer {
        image: IMAGE,
        size: 1_048_576,
        chunk_max: 32_768,
        window: 4,
        signature: [0x5a; 64],
        model: Str::from("p7"),
        version: Str::from("1.1.0"),
    })
}

fn spec_chunk_request() -> Message {
    Message::ChunkRequest(ChunkRequest {
        image: IMAGE,
        offset: 32_768,
        length: 32_768,
    })
}

fn spec_chunk() -> Message {
    Message::Chunk(Chunk {
        image: IMAGE,
        offset: 32_768,
        crc32: 0xe41a_6585,
        data: Bytes::from_static(b"furrow"),
    })
}

fn with_caps(m: Message, caps: u32) -> Message {
    match m {
        Message::Hello(h) => Message::Hello(Hello {
            capabilities: Some(caps),
            ..h
        }),
        Message::Welcome(w) => Message::Welcome(Welcome {
            capabilities: Some(caps),
            ..w
        }),
        other => other,
    }
}

fn spec_vectors() -> Vec<(&'static str, &'static str, Message)> {
    vec![
        ("HELLO", HELLO_HEX, spec_hello()),
        ("WELCOME", WELCOME_HEX, spec_welcome()),
        ("TELEMETRY", TELEMETRY_HEX, spec_telemetry()),
        ("ACK", ACK_HEX, spec_ack()),
        ("HELLO", HELLO_CAPS_HEX, with_caps(spec_hello(), CAP_STATE)),
        (
            "WELCOME",
            WELCOME_CAPS_HEX,
            with_caps(spec_welcome(), CAP_STATE),
        ),
        ("DESIRED", DESIRED_HEX, spec_desired()),
        (
            "DESIRED_ACK",
            DESIRED_ACK_HEX,
            Message::DesiredAck { version: 3 },
        ),
        ("REPORT", REPORT_HEX, spec_report()),
        (
            "REJECT",
            REJECT_STATE_HEX,
            Message::Reject(Reject {
                seq: 44,
                code: ErrorCode::StateTooLarge as u16,
                reason: Str::from("state too large"),
            }),
        ),
        (
            "HELLO",
            HELLO_FW_HEX,
            with_caps(spec_hello(), CAP_STATE | CAP_FIRMWARE),
        ),
        ("FIRMWARE_OFFER", OFFER_HEX, spec_offer()),
        ("CHUNK_REQUEST", CHUNK_REQUEST_HEX, spec_chunk_request()),
        ("CHUNK", CHUNK_HEX, spec_chunk()),
        (
            "FIRMWARE_CANCEL",
            CANCEL_HEX,
            Message::FirmwareCancel { image: IMAGE },
        ),
    ]
}

/// One valid message of every type, with non-empty strs and payloads.
fn one_of_each() -> Vec<Message> {
    vec![
        spec_hello(),
        spec_welcome(),
        spec_telemetry(),
        spec_ack(),
        Message::Reject(Reject {
            seq: 7,
            code: ErrorCode::InvalidPayload as u16,
            reason: Str::from("not json"),
        }),
        Message::Command(Command {
            command_id: 9,
            name: Str::from("reboot"),
            content_type: ContentType::Json as u8,
            payload: Bytes::from_static(b"{\"in_s\":5}"),
        }),
        Message::CommandResult(CommandResult {
            command_id: 9,
            status: CommandStatus::Failed,
            content_type: ContentType::Text as u8,
            payload: Bytes::from_static(b"busy"),
        }),
        Message::Ping { nonce: 0xdead_beef },
        Message::Pong { nonce: 0xdead_beef },
        Message::Error(ErrorMsg {
            code: ErrorCode::AuthFailed as u16,
            message: Str::from("authentication failed"),
        }),
        Message::Goodbye(Goodbye {
            code: 1,
            retry_after_ms: 5_000,
        }),
        spec_desired(),
        Message::DesiredAck { version: 3 },
        spec_report(),
        spec_offer(),
        spec_chunk_request(),
        spec_chunk(),
        Message::FirmwareCancel { image: IMAGE },
    ]
}

fn has_rest(kind: MessageType) -> bool {
    matches!(
        kind,
        MessageType::Telemetry
            | MessageType::Command
            | MessageType::CommandResult
            | MessageType::Desired
            | MessageType::Report
            | MessageType::Chunk
    )
}

// ---------------------------------------------------------------------------
// Test vectors
// ---------------------------------------------------------------------------

#[test]
fn vectors_match_the_spec_text() {
    let section = PROTOCOL_MD
        .split("## Test vectors (hex)")
        .nth(1)
        .expect("the spec has a test vector section");
    // Vectors are the indented lines of the section, in order.
    let in_spec: Vec<Vec<u8>> = section
        .lines()
        .filter(|l| l.starts_with("    ") && !l.trim().is_empty())
        .map(unhex)
        .collect();
    let ours: Vec<Vec<u8>> = spec_vectors().iter().map(|(_, h, _)| unhex(h)).collect();
    assert_eq!(in_spec, ours);
}

#[test]
fn the_shared_vector_file_holds_these_vectors() {
    let in_file: Vec<(String, Vec<u8>)> = SHARED_VECTORS
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (name, hex) = l.split_once(':').expect("a `name: hex` line");
            (name.trim().to_owned(), unhex(hex))
        })
        .collect();
    let names = [
        "hello",
        "welcome",
        "telemetry",
        "ack",
        "hello_caps",
        "welcome_caps",
        "desired",
        "desired_ack",
        "report",
        "reject_state",
        "hello_fw",
        "offer",
        "chunk_request",
        "chunk",
        "cancel",
    ];
    let ours: Vec<(String, Vec<u8>)> = names
        .iter()
        .zip(spec_vectors())
        .map(|(n, (_, hex, _))| (n.to_string(), unhex(hex)))
        .collect();
    assert_eq!(in_file, ours, "docs/test-vectors.txt");
}

#[test]
fn vectors_encode_byte_for_byte() {
    for (name, hex, msg) in spec_vectors() {
        let want = unhex(hex);
        assert_eq!(encode(&msg), want, "{name}: Message::encode");
        assert_eq!(&msg.to_bytes().unwrap()[..], &want[..], "{name}: to_bytes");
        assert_eq!(msg.body_len() + HEADER_LEN, want.len(), "{name}: body_len");
        assert_eq!(msg.kind().name(), name);
    }
}

#[test]
fn vectors_decode_to_the_message() {
    for (name, hex, msg) in spec_vectors() {
        let wire = unhex(hex);
        let mut buf = BytesMut::from(&wire[..]);
        let frame = FrameDecoder::default().decode(&mut buf).unwrap().unwrap();
        assert!(buf.is_empty(), "{name}");
        assert_eq!(frame.kind, msg.kind(), "{name}");
        assert_eq!(&frame.body[..], &wire[HEADER_LEN..], "{name}");
        assert_eq!(
            Message::parse(frame.kind, frame.body).unwrap(),
            msg,
            "{name}"
        );
    }
}

#[test]
fn vectors_decode_byte_at_a_time_and_back_to_back() {
    let mut wire = Vec::new();
    for (_, hex, _) in spec_vectors() {
        wire.extend_from_slice(&unhex(hex));
    }
    let want: Vec<Message> = spec_vectors().into_iter().map(|(_, _, m)| m).collect();

    // All in one read.
    let dec = FrameDecoder::default();
    let mut buf = BytesMut::from(&wire[..]);
    let mut got = Vec::new();
    while let Some(f) = dec.decode(&mut buf).unwrap() {
        got.push(Message::from_frame(f).unwrap());
    }
    assert_eq!(got, want);
    assert!(buf.is_empty());

    // One byte per read.
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for &b in &wire {
        buf.extend_from_slice(&[b]);
        while let Some(f) = dec.decode(&mut buf).unwrap() {
            got.push(Message::from_frame(f).unwrap());
        }
    }
    assert_eq!(got, want);
    assert!(buf.is_empty());
}

#[test]
fn hot_path_encoders_match_the_vectors() {
    let mut b = BytesMut::new();
    encode_ack(42, &mut b);
    assert_eq!(&b[..], &unhex(ACK_HEX)[..]);
    assert_eq!(&ack_frame(42)[..], &unhex(ACK_HEX)[..]);

    let mut b = BytesMut::new();
    encode_telemetry(42, 1_763_683_200_123, 1, br#"{"t":21.5}"#, &mut b).unwrap();
    assert_eq!(&b[..], &unhex(TELEMETRY_HEX)[..]);
}

#[test]
fn vector_telemetry_payload_is_valid_json() {
    let Message::Telemetry(t) = decode_one(&unhex(TELEMETRY_HEX)).unwrap() else {
        panic!("not TELEMETRY");
    };
    assert_eq!(
        content::validate(t.content_type, &t.payload),
        Ok(ContentType::Json)
    );
}

#[test]
fn every_message_type_round_trips() {
    for m in one_of_each() {
        let wire = encode(&m);
        assert_eq!(wire.len(), m.body_len() + HEADER_LEN, "{m:?}");
        let len = u32::from_be_bytes(wire[..4].try_into().unwrap()) as usize;
        assert_eq!(len, m.body_len() + 2, "{m:?}");
        assert_eq!(wire[4], m.kind() as u8, "{m:?}");
        assert_eq!(wire[5], 0, "flags, {m:?}");
        assert_eq!(decode_one(&wire).unwrap(), m);
    }
}

#[test]
fn message_kind_bytes_match_the_spec_table() {
    let table = [
        (0x01, "HELLO"),
        (0x02, "WELCOME"),
        (0x03, "TELEMETRY"),
        (0x04, "ACK"),
        (0x05, "REJECT"),
        (0x06, "COMMAND"),
        (0x07, "COMMAND_RESULT"),
        (0x08, "PING"),
        (0x09, "PONG"),
        (0x0A, "ERROR"),
        (0x0B, "GOODBYE"),
        (0x0C, "DESIRED"),
        (0x0D, "DESIRED_ACK"),
        (0x0E, "REPORT"),
        (0x0F, "FIRMWARE_OFFER"),
        (0x10, "CHUNK_REQUEST"),
        (0x11, "CHUNK"),
        (0x12, "FIRMWARE_CANCEL"),
    ];
    let kinds: Vec<(u8, &str)> = one_of_each()
        .iter()
        .map(|m| (m.kind() as u8, m.kind().name()))
        .collect();
    assert_eq!(kinds, table);
    for (b, name) in table {
        assert_eq!(MessageType::from_u8(b).unwrap().name(), name);
    }
}

// ---------------------------------------------------------------------------
// Body errors, per message type
// ---------------------------------------------------------------------------

/// Length of the fixed part of a body with `rest` (everything before it).
fn fixed_part(m: &Message) -> usize {
    match m {
        Message::Telemetry(_) => 17,
        Message::Command(c) => 8 + 2 + c.name.len() + 1,
        Message::CommandResult(_) => 10,
        Message::Desired(_) => 8,
        Message::Report(_) => 16,
        Message::Chunk(_) => 44,
        _ => m.body_len(),
    }
}

#[test]
fn body_too_short_for_every_type() {
    for m in one_of_each() {
        let wire = encode(&m);
        let body = &wire[HEADER_LEN..];
        for cut in 0..fixed_part(&m) {
            assert_eq!(
                parse(m.kind(), &body[..cut]),
                Err(TOO_SHORT),
                "{} cut to {cut} bytes",
                m.kind().name()
            );
            // Same through the frame decoder, with a length field that says so.
            let mut frame = ((cut + 2) as u32).to_be_bytes().to_vec();
            frame.extend_from_slice(&[m.kind() as u8, 0]);
            frame.extend_from_slice(&body[..cut]);
            assert_eq!(decode_one(&frame), Err(TOO_SHORT));
        }
    }
}

#[test]
fn body_too_short_table() {
    use MessageType::*;
    let cases: &[(MessageType, &[u8])] = &[
        (Hello, &[]),
        (Hello, &[1, 0]),                             // keepalive cut
        (Hello, &[1, 0, 30, 0]),                      // device_id count cut
        (Hello, &[1, 0, 30, 0, 3, b'a']),             // device_id bytes cut
        (Hello, &[1, 0, 30, 0, 1, b'a']),             // token missing
        (Hello, &[1, 0, 30, 0, 1, b'a', 0, 2, b'k']), // token cut
        (Welcome, &[1, 0, 30, 0, 1, 0, 0, 1, 0]),
        (Telemetry, &[0, 0, 0, 0, 0, 0, 0, 1]),
        (Telemetry, &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]), // no content_type
        (Ack, &[0, 0, 0, 0, 0, 0, 0]),
        (Reject, &[0, 0, 0, 0, 0, 0, 0, 1, 0, 20]), // no reason
        (Reject, &[0, 0, 0, 0, 0, 0, 0, 1, 0, 20, 0, 5, b'x']),
        (Command, &[0, 0, 0, 0, 0, 0, 0, 1, 0, 1, b'x']), // no content_type
        (Command, &[0, 0, 0, 0, 0, 0, 0, 1, 0xFF, 0xFF]), // name count beyond body
        (CommandResult, &[0, 0, 0, 0, 0, 0, 0, 1, 0]),    // no content_type
        (CommandResult, &[0, 0, 0, 0]),
        (Ping, &[]),
        (Pong, &[0; 7]),
        (Error, &[0]),
        (Error, &[0, 1, 0, 2, b'x']),
        (Goodbye, &[0, 0, 0, 0, 0]),
    ];
    for (kind, body) in cases {
        assert_eq!(parse(*kind, body), Err(TOO_SHORT), "{kind:?} {body:02x?}");
    }
}

/// What 1 to 3 bytes after a body's last field earn: left over, except
/// where an optional u32 may follow (then the u32 is too short).
fn leftover(m: &Message) -> DecodeError {
    match m {
        Message::Hello(Hello {
            capabilities: None, ..
        })
        | Message::Welcome(Welcome {
            capabilities: None, ..
        }) => TOO_SHORT,
        _ => LEFTOVER,
    }
}

#[test]
fn leftover_bytes_for_every_type_without_rest() {
    for m in one_of_each() {
        let mut wire = encode(&m);
        let body_before = wire[HEADER_LEN..].to_vec();
        for extra in [&[0u8][..], &[0xFF, 0xFF, 0xFF]] {
            let mut body = body_before.clone();
            body.extend_from_slice(extra);
            let got = parse(m.kind(), &body);
            if has_rest(m.kind()) {
                // The extra bytes are part of the payload.
                let got = got.unwrap();
                assert_ne!(got, m);
                assert_eq!(got.body_len(), m.body_len() + extra.len());
            } else {
                assert_eq!(got, Err(leftover(&m)), "{} + {extra:02x?}", m.kind().name());
            }
        }
        // Through the frame decoder too: grow the length field by one.
        wire.push(0);
        let len = u32::from_be_bytes(wire[..4].try_into().unwrap()) + 1;
        wire[..4].copy_from_slice(&len.to_be_bytes());
        if !has_rest(m.kind()) {
            assert_eq!(decode_one(&wire), Err(leftover(&m)), "{}", m.kind().name());
        }
    }
}

#[test]
fn empty_rest_is_allowed() {
    for (kind, body) in [
        (
            MessageType::Telemetry,
            &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0][..],
        ),
        (MessageType::Command, &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0][..]),
        (
            MessageType::CommandResult,
            &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0][..],
        ),
    ] {
        let m = parse(kind, body).unwrap();
        assert_eq!(m.kind(), kind);
        assert_eq!(m.body_len(), body.len());
        assert_eq!(encode(&m)[HEADER_LEN..], *body);
    }
}

const NOT_UTF8_SAMPLES: &[&[u8]] = &[
    &[0xFF],
    &[b'a', 0x80],             // stray continuation byte
    &[0xC3, 0x28],             // bad continuation
    &[0xC0, 0x80],             // overlong NUL
    &[0xED, 0xA0, 0x80],       // UTF-16 surrogate
    &[0xF4, 0x90, 0x80, 0x80], // above U+10FFFF
    &[0xE2, 0x82],             // truncated sequence
];

#[test]
fn str_not_utf8_in_every_str_field() {
    for bad in NOT_UTF8_SAMPLES {
        let n = (bad.len() as u16).to_be_bytes();
        let seq = 5u64.to_be_bytes();

        // HELLO device_id and token.
        assert_eq!(
            parse(MessageType::Hello, &hello_body(1, 30, bad, b"k")),
            Err(NOT_UTF8)
        );
        assert_eq!(
            parse(MessageType::Hello, &hello_body(1, 30, b"dev", bad)),
            Err(NOT_UTF8)
        );
        // REJECT reason.
        let mut b = seq.to_vec();
        b.extend_from_slice(&20u16.to_be_bytes());
        b.extend_from_slice(&n);
        b.extend_from_slice(bad);
        assert_eq!(parse(MessageType::Reject, &b), Err(NOT_UTF8));
        // COMMAND name (the payload after it may be anything).
        let mut b = seq.to_vec();
        b.extend_from_slice(&n);
        b.extend_from_slice(bad);
        b.extend_from_slice(&[0, 0xFF]);
        assert_eq!(parse(MessageType::Command, &b), Err(NOT_UTF8));
        // ERROR message.
        let mut b = 1u16.to_be_bytes().to_vec();
        b.extend_from_slice(&n);
        b.extend_from_slice(bad);
        assert_eq!(parse(MessageType::Error, &b), Err(NOT_UTF8));
    }
}

#[test]
fn str_multibyte_utf8_is_accepted() {
    let reason = "température élevée ✓ 🌡";
    let m = Message::Reject(Reject {
        seq: 1,
        code: 20,
        reason: Str::from(reason),
    });
    let Message::Reject(r) = decode_one(&encode(&m)).unwrap() else {
        panic!("not REJECT");
    };
    assert_eq!(r.reason.as_str(), reason);
}

#[test]
fn payloads_are_not_checked_at_the_message_layer() {
    // Octets of any kind, any content type byte: the message parses; the
    // content check (REJECT) is a separate step.
    let mut b = BytesMut::new();
    encode_telemetry(1, 0, 200, &[0xFF, 0xFE], &mut b).unwrap();
    let Message::Telemetry(t) = decode_one(&b).unwrap() else {
        panic!("not TELEMETRY");
    };
    assert_eq!(t.content_type, 200);
    assert_eq!(&t.payload[..], &[0xFF, 0xFE]);
    assert_eq!(
        content::validate(t.content_type, &t.payload)
            .unwrap_err()
            .code(),
        ErrorCode::UnsupportedContentType
    );
}

#[test]
fn hello_version_other_than_1_decides_alone() {
    let garbage: &[&[u8]] = &[
        &[],
        &[0xFF],
        &[0, 30, 0xFF, 0xFF],                // str count beyond the body
        &[0, 30, 0, 1, 0xFF, 0, 0],          // non-UTF-8 device_id
        &[0, 30, 0, 1, b' ', 0, 0],          // bad device_id
        &[0, 30, 0, 1, b'a', 0, 0, 1, 2, 3], // leftover bytes
    ];
    for version in [0u8, 2, 3, 0x7F, 0xFF] {
        for g in garbage {
            let mut body = vec![version];
            body.extend_from_slice(g);
            assert_eq!(
                parse(MessageType::Hello, &body),
                Err(DecodeError::UnsupportedVersion(version)),
                "version {version} then {g:02x?}"
            );
        }
        // A well-formed HELLO but for the version.
        let body = hello_body(version, 30, b"pump-17", b"k3y");
        let err = parse(MessageType::Hello, &body).unwrap_err();
        assert_eq!(err, DecodeError::UnsupportedVersion(version));
        assert_eq!(err.code(), ErrorCode::UnsupportedVersion);
    }
    // And through the frame decoder with the spec's HELLO, version byte patched.
    let mut wire = unhex(HELLO_HEX);
    wire[HEADER_LEN] = 2;
    assert_eq!(decode_one(&wire), Err(DecodeError::UnsupportedVersion(2)));
    // Version 1 with garbage is a PROTOCOL_ERROR, not UNSUPPORTED_VERSION.
    assert_eq!(parse(MessageType::Hello, &[1, 0xFF]), Err(TOO_SHORT));
}

#[test]
fn hello_device_id_rules() {
    let allowed = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-";
    let ok: Vec<Vec<u8>> = vec![
        b"a".to_vec(),
        b"pump-17".to_vec(),
        b"site:3.row_2-pump-17".to_vec(),
        allowed.to_vec(),
        vec![b'z'; 128],
        vec![b'.'; 1],
        vec![b'-'; 128],
    ];
    for id in &ok {
        let m = parse(MessageType::Hello, &hello_body(1, 30, id, b"t")).unwrap();
        let Message::Hello(h) = m else {
            panic!("not HELLO")
        };
        assert_eq!(h.device_id.as_bytes(), &id[..]);
        assert!(valid_device_id(id));
    }

    let mut bad: Vec<Vec<u8>> = vec![
        Vec::new(),
        vec![b'a'; 129],
        vec![b'-'; 300],
        b"has space".to_vec(),
        b"slash/no".to_vec(),
        b"at@no".to_vec(),
        b"tab\tno".to_vec(),
        b"nul\0no".to_vec(),
        "café".as_bytes().to_vec(),
        "пампа".as_bytes().to_vec(),
    ];
    // Every printable ASCII byte outside the alphabet, alone and inside an id.
    for c in 0x20u8..0x7F {
        if !allowed.contains(&c) {
            bad.push(vec![c]);
            bad.push(vec![b'a', c, b'b']);
        }
    }
    for id in &bad {
        assert_eq!(
            parse(MessageType::Hello, &hello_body(1, 30, id, b"t")),
            Err(BAD_DEVICE_ID),
            "{:?}",
            String::from_utf8_lossy(id)
        );
        assert!(!valid_device_id(id));
    }
}

#[test]
fn hello_token_length() {
    for (len, want_ok) in [
        (0, true),
        (1, true),
        (255, true),
        (256, true),
        (257, false),
        (1000, false),
    ] {
        let token = vec![b'k'; len];
        let got = parse(MessageType::Hello, &hello_body(1, 30, b"dev-1", &token));
        if want_ok {
            let Message::Hello(h) = got.unwrap() else {
                panic!("not HELLO")
            };
            assert_eq!(h.token.len(), len);
        } else {
            assert_eq!(got, Err(LONG_TOKEN), "token of {len} bytes");
        }
    }
    // 256 bytes of multi-byte UTF-8 is fine, 258 is not: the limit is bytes.
    let token = "é".repeat(128);
    assert_eq!(token.len(), 256);
    assert!(parse(
        MessageType::Hello,
        &hello_body(1, 0, b"d", token.as_bytes())
    )
    .is_ok());
    let token = "é".repeat(129);
    assert_eq!(
        parse(
            MessageType::Hello,
            &hello_body(1, 0, b"d", token.as_bytes())
        ),
        Err(LONG_TOKEN)
    );
}

#[test]
fn telemetry_seq_zero() {
    let body = |seq: u64| {
        let mut b = seq.to_be_bytes().to_vec();
        b.extend_from_slice(&1_763_683_200_123u64.to_be_bytes());
        b.push(1);
        b.extend_from_slice(b"{}");
        b
    };
    assert_eq!(parse(MessageType::Telemetry, &body(0)), Err(SEQ_ZERO));
    assert_eq!(
        parse(MessageType::Telemetry, &body(0)).unwrap_err().code(),
        ErrorCode::ProtocolError
    );
    for seq in [1, 2, u64::MAX] {
        let Message::Telemetry(t) = parse(MessageType::Telemetry, &body(seq)).unwrap() else {
            panic!("not TELEMETRY")
        };
        assert_eq!(t.seq, seq);
        assert_eq!(&t.payload[..], b"{}");
    }
    // Through the frame decoder, from the spec vector with seq zeroed.
    let mut wire = unhex(TELEMETRY_HEX);
    wire[HEADER_LEN..HEADER_LEN + 8].fill(0);
    assert_eq!(decode_one(&wire), Err(SEQ_ZERO));
}

#[test]
fn command_result_status() {
    let body = |status: u8| {
        let mut b = 77u64.to_be_bytes().to_vec();
        b.extend_from_slice(&[status, 3]);
        b.extend_from_slice(b"ok");
        b
    };
    for (v, s) in [
        (0, CommandStatus::Succeeded),
        (1, CommandStatus::Failed),
        (2, CommandStatus::UnknownCommand),
    ] {
        let Message::CommandResult(r) = parse(MessageType::CommandResult, &body(v)).unwrap() else {
            panic!("not COMMAND_RESULT")
        };
        assert_eq!(r.status, s);
        assert_eq!(r.command_id, 77);
        assert_eq!(r.content_type, 3);
        assert_eq!(&r.payload[..], b"ok");
    }
    for v in 3..=255u8 {
        assert_eq!(
            parse(MessageType::CommandResult, &body(v)),
            Err(BAD_STATUS),
            "status {v}"
        );
        // Checked first: with nothing after the status, still the status error.
        let mut b = 77u64.to_be_bytes().to_vec();
        b.push(v);
        assert_eq!(parse(MessageType::CommandResult, &b), Err(BAD_STATUS));
    }
}

// ---------------------------------------------------------------------------
// Frame errors and their order
// ---------------------------------------------------------------------------

#[test]
fn length_below_two() {
    for len in [0u32, 1] {
        let mut frame = len.to_be_bytes().to_vec();
        assert_eq!(decode_header(&frame), Err(SHORT_LENGTH), "length {len}");
        frame.extend_from_slice(&[0x08, 0, 0, 0]);
        assert_eq!(decode_header(&frame), Err(SHORT_LENGTH), "length {len}");
    }
    // Length 2 is the smallest frame: type and flags, empty body.
    let mut buf = BytesMut::from(&[0u8, 0, 0, 2, 0x08, 0][..]);
    let f = FrameDecoder::default().decode(&mut buf).unwrap().unwrap();
    assert_eq!(f.kind, MessageType::Ping);
    assert!(f.body.is_empty());
    assert_eq!(Message::from_frame(f), Err(TOO_SHORT));
}

#[test]
fn flags_must_be_zero() {
    for flags in [1u8, 2, 0x80, 0xFF] {
        let mut wire = unhex(ACK_HEX);
        wire[5] = flags;
        assert_eq!(decode_header(&wire), Err(BAD_FLAGS), "flags {flags:#x}");
        // Decided from the header, before the body arrives.
        assert_eq!(decode_header(&wire[..6]), Err(BAD_FLAGS));
    }
}

#[test]
fn unknown_types() {
    for t in (0u8..=255).filter(|t| !(1..=0x12).contains(t)) {
        let frame = [0, 0, 0, 10, t, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(decode_header(&frame), Err(DecodeError::UnknownType(t)));
        // Decided from the header, before the body arrives.
        assert_eq!(decode_header(&frame[..6]), Err(DecodeError::UnknownType(t)));
    }
    for t in 1u8..=0x12 {
        let frame = [0, 0, 0, 10, t, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(
            decode_header(&frame),
            Ok(Some(MessageType::from_u8(t).unwrap()))
        );
        // A known type waits for its body.
        assert_eq!(decode_header(&frame[..13]), Ok(None));
    }
}

#[test]
fn oversized_length() {
    let dec = FrameDecoder::default();
    assert_eq!(dec.max_frame(), DEFAULT_MAX_FRAME);
    assert_eq!(DEFAULT_MAX_FRAME, 65_536);
    for len in [65_537u32, 1 << 20, u32::MAX] {
        let mut buf = BytesMut::from(&len.to_be_bytes()[..]);
        assert_eq!(
            dec.decode(&mut buf),
            Err(DecodeError::FrameTooLarge { len, max: 65_536 }),
            "decided on the four length bytes alone"
        );
    }
    // The maximum itself is accepted: it is a value of the length field.
    let mut buf = BytesMut::from(&65_536u32.to_be_bytes()[..]);
    buf.extend_from_slice(&[0x03, 0]);
    assert_eq!(dec.decode(&mut buf), Ok(None));
    buf.resize(4 + 65_536, 0);
    let f = dec.decode(&mut buf).unwrap().unwrap();
    assert_eq!(f.body.len(), 65_534);
    assert!(buf.is_empty());

    // A custom maximum: exactly max accepted, max + 1 refused.
    let small = FrameDecoder::new(10);
    assert_eq!(decode_one_with(small, &unhex(ACK_HEX)), Ok(spec_ack()));
    let mut eleven = unhex(ACK_HEX);
    eleven[3] = 11;
    eleven.push(0);
    assert_eq!(
        decode_one_with(small, &eleven),
        Err(DecodeError::FrameTooLarge { len: 11, max: 10 })
    );
    let mut buf = BytesMut::from(&encode(&spec_telemetry())[..]);
    assert_eq!(
        small.decode(&mut buf),
        Err(DecodeError::FrameTooLarge { len: 29, max: 10 })
    );
}

#[test]
fn proxy_header_on_a_plain_listener_is_frame_too_large() {
    for header in [
        &b"PROXY TCP4 192.0.2.1 192.0.2.2 5000 1883\r\n"[..],
        &b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c"[..],
    ] {
        let len = u32::from_be_bytes(header[..4].try_into().unwrap());
        let mut buf = BytesMut::from(&header[..4]);
        assert_eq!(
            FrameDecoder::default().decode(&mut buf),
            Err(DecodeError::FrameTooLarge {
                len,
                max: DEFAULT_MAX_FRAME
            })
        );
    }
}

#[test]
fn check_order_length_then_flags_then_type() {
    let dec = FrameDecoder::new(1024);
    let cases: &[(&[u8], DecodeError)] = &[
        // Length below 2 beats bad flags and an unknown type.
        (&[0, 0, 0, 1, 0xFF, 0xFF], SHORT_LENGTH),
        (&[0, 0, 0, 0, 0x00, 0x01], SHORT_LENGTH),
        // An oversized length beats bad flags and an unknown type.
        (
            &[0, 0, 0x04, 0x01, 0xFF, 0xFF],
            DecodeError::FrameTooLarge {
                len: 1025,
                max: 1024,
            },
        ),
        (
            &[0xFF, 0xFF, 0xFF, 0xFF, 0x03, 0x00],
            DecodeError::FrameTooLarge {
                len: u32::MAX,
                max: 1024,
            },
        ),
        // Bad flags beat an unknown type.
        (&[0, 0, 0, 2, 0xFF, 0x01], BAD_FLAGS),
        (&[0, 0, 0, 2, 0x00, 0x80], BAD_FLAGS),
        (&[0, 0, 0, 10, 0x1F, 0x01], BAD_FLAGS),
        // An unknown type beats a body that is not there yet.
        (&[0, 0, 0, 10, 0x1F, 0x00], DecodeError::UnknownType(0x1F)),
    ];
    for (bytes, want) in cases {
        let mut buf = BytesMut::from(*bytes);
        assert_eq!(dec.decode(&mut buf), Err(*want), "{bytes:02x?}");
        assert_eq!(dec.check_header(bytes), Err(*want), "{bytes:02x?}");
    }
    // The type before the body: a known type with a malformed body passes
    // the frame decoder, and only Message::parse refuses it.
    let mut buf = BytesMut::from(&[0u8, 0, 0, 3, 0x04, 0, 0xAA][..]);
    let f = dec.decode(&mut buf).unwrap().unwrap();
    assert_eq!(f.kind, MessageType::Ack);
    assert_eq!(Message::from_frame(f), Err(TOO_SHORT));
}

/// The answer to a broken header must not depend on how the bytes were split
/// over reads: flags come before the type, so the type may only be judged
/// once the flags byte is there.
#[test]
fn check_order_does_not_depend_on_read_boundaries() {
    let dec = FrameDecoder::default();
    let bad_headers: &[&[u8]] = &[
        &[0, 0, 0, 2, 0xFF, 0x01],
        &[0, 0, 0, 10, 0x00, 0x80],
        &[0, 0, 0, 1, 0xFF, 0x01],
        &[0, 0, 0, 2, 0x03, 0x01],
        &[0, 0, 0, 2, 0x1F, 0x00],
    ];
    for whole in bad_headers {
        let want = dec.decode(&mut BytesMut::from(*whole)).unwrap_err();
        let mut buf = BytesMut::new();
        let mut got = None;
        for &b in *whole {
            buf.extend_from_slice(&[b]);
            match dec.decode(&mut buf) {
                Ok(None) => {}
                Ok(Some(f)) => panic!("{whole:02x?}: unexpected frame {f:?}"),
                Err(e) => {
                    got = Some(e);
                    break;
                }
            }
        }
        assert_eq!(got, Some(want), "{whole:02x?} fed one byte at a time");
    }
}

#[test]
fn partial_headers_wait() {
    let dec = FrameDecoder::default();
    let wire = unhex(TELEMETRY_HEX);
    for cut in 0..wire.len() {
        let mut buf = BytesMut::from(&wire[..cut]);
        assert_eq!(dec.decode(&mut buf), Ok(None), "cut at {cut}");
        assert_eq!(buf.len(), cut, "nothing consumed before a whole frame");
    }
    assert_eq!(dec.check_header(&wire[..3]), Ok(None));
    assert_eq!(dec.check_header(&wire[..4]), Ok(Some(wire.len())));
}

// ---------------------------------------------------------------------------
// Codes
// ---------------------------------------------------------------------------

#[test]
fn decode_error_codes_map_to_the_spec() {
    let cases = [
        (DecodeError::Protocol("x"), 1, "PROTOCOL_ERROR"),
        (DecodeError::UnsupportedVersion(2), 2, "UNSUPPORTED_VERSION"),
        (
            DecodeError::FrameTooLarge { len: 9, max: 8 },
            4,
            "FRAME_TOO_LARGE",
        ),
        (DecodeError::UnknownType(0x0C), 5, "UNKNOWN_TYPE"),
    ];
    for (err, code, name) in cases {
        assert_eq!(err.code() as u16, code, "{err:?}");
        assert_eq!(err.code().name(), name, "{err:?}");
    }
    // Every error the table tests produce is one of those four.
    for e in [
        TOO_SHORT,
        LEFTOVER,
        NOT_UTF8,
        BAD_DEVICE_ID,
        LONG_TOKEN,
        SEQ_ZERO,
        BAD_STATUS,
        SHORT_LENGTH,
        BAD_FLAGS,
    ] {
        assert_eq!(e.code(), ErrorCode::ProtocolError, "{e:?}");
    }
}

#[test]
fn error_code_registry_matches_the_spec_table() {
    // The "Codes (ERROR and REJECT)" table, verbatim.
    let table = [
        (1u16, "PROTOCOL_ERROR"),
        (2, "UNSUPPORTED_VERSION"),
        (3, "AUTH_FAILED"),
        (4, "FRAME_TOO_LARGE"),
        (5, "UNKNOWN_TYPE"),
        (6, "HANDSHAKE_TIMEOUT"),
        (7, "KEEPALIVE_TIMEOUT"),
        (8, "BUSY"),
        (9, "INTERNAL"),
        (20, "INVALID_PAYLOAD"),
        (21, "UNSUPPORTED_CONTENT_TYPE"),
        (22, "STATE_TOO_LARGE"),
    ];
    for (v, name) in table {
        let c = ErrorCode::from_u16(v).unwrap();
        assert_eq!(c as u16, v);
        assert_eq!(c.name(), name);
        assert!(
            PROTOCOL_MD.contains(&format!("| {v:<4} | {name:<24} |")),
            "{v} {name} in the spec's table"
        );
    }
    let known = (0..=u16::MAX)
        .filter(|&v| ErrorCode::from_u16(v).is_some())
        .count();
    assert_eq!(known, table.len());
}

// ---------------------------------------------------------------------------
// Capabilities and device state
// ---------------------------------------------------------------------------

#[test]
fn capabilities_are_optional_and_exactly_four_bytes() {
    let base = hello_body(1, 30, b"pump-17", b"k3y");
    // Absent: None, as an old device sends it.
    let Ok(Message::Hello(h)) = parse(MessageType::Hello, &base) else {
        panic!("HELLO without capabilities");
    };
    assert_eq!(h.capabilities, None);
    // One to three bytes: too short; five: left over.
    for extra in 1..=3usize {
        let mut b = base.clone();
        b.extend(std::iter::repeat_n(0u8, extra));
        assert_eq!(
            parse(MessageType::Hello, &b),
            Err(TOO_SHORT),
            "{extra} bytes"
        );
    }
    let mut b = base.clone();
    b.extend_from_slice(&[0, 0, 0, 1, 9]);
    assert_eq!(parse(MessageType::Hello, &b), Err(LEFTOVER));
    // Unknown bits are carried, not refused: the gateway ignores them.
    let mut b = base;
    b.extend_from_slice(&0xffff_ffffu32.to_be_bytes());
    let Ok(Message::Hello(h)) = parse(MessageType::Hello, &b) else {
        panic!("HELLO with every bit");
    };
    assert_eq!(h.capabilities, Some(u32::MAX));
    // WELCOME alike.
    let w = encode(&spec_welcome());
    let mut b = w[HEADER_LEN..].to_vec();
    b.extend_from_slice(&[0, 0]);
    assert_eq!(parse(MessageType::Welcome, &b), Err(TOO_SHORT));
}

#[test]
fn state_messages_belong_to_their_capability_and_direction() {
    for (kind, device) in [
        (MessageType::Desired, false),
        (MessageType::DesiredAck, true),
        (MessageType::Report, true),
    ] {
        assert_eq!(kind.capability(), Some(CAP_STATE), "{}", kind.name());
        assert_eq!(kind.sent_by_device(), device, "{}", kind.name());
        assert_eq!(kind.sent_by_gateway(), !device, "{}", kind.name());
    }
    for b in 0x01..=0x0Bu8 {
        assert_eq!(MessageType::from_u8(b).unwrap().capability(), None);
    }
}

#[test]
fn report_seq_zero_is_protocol_error() {
    let mut body = vec![0u8; 16];
    body.extend_from_slice(b"{}");
    assert_eq!(
        parse(MessageType::Report, &body),
        Err(DecodeError::Protocol("REPORT seq 0"))
    );
    assert_eq!(
        DecodeError::Protocol("REPORT seq 0").code(),
        ErrorCode::ProtocolError
    );
}

#[test]
fn firmware_messages_belong_to_their_capability_and_direction() {
    for (kind, device) in [
        (MessageType::FirmwareOffer, false),
        (MessageType::ChunkRequest, true),
        (MessageType::Chunk, false),
        (MessageType::FirmwareCancel, false),
    ] {
        assert_eq!(kind.capability(), Some(CAP_FIRMWARE), "{}", kind.name());
        assert_eq!(kind.sent_by_device(), device, "{}", kind.name());
        assert_eq!(kind.sent_by_gateway(), !device, "{}", kind.name());
    }
}

#[test]
fn firmware_zero_fields_are_protocol_errors() {
    // chunk_max 0, window 0, a request of length 0.
    let offer = encode(&spec_offer());
    let mut b = offer[HEADER_LEN..].to_vec();
    b[40..44].copy_from_slice(&[0; 4]);
    assert!(matches!(
        parse(MessageType::FirmwareOffer, &b),
        Err(DecodeError::Protocol(_))
    ));
    let mut b = offer[HEADER_LEN..].to_vec();
    b[44..46].copy_from_slice(&[0; 2]);
    assert!(matches!(
        parse(MessageType::FirmwareOffer, &b),
        Err(DecodeError::Protocol(_))
    ));
    let req = encode(&spec_chunk_request());
    let mut b = req[HEADER_LEN..].to_vec();
    b[40..44].copy_from_slice(&[0; 4]);
    assert_eq!(
        parse(MessageType::ChunkRequest, &b),
        Err(DecodeError::Protocol("CHUNK_REQUEST length 0"))
    );
}

#[test]
fn the_chunk_vector_carries_the_crc32_of_its_data() {
    let Message::Chunk(c) = decode_one(&unhex(CHUNK_HEX)).unwrap() else {
        panic!("not CHUNK");
    };
    assert_eq!(crc32fast::hash(&c.data), c.crc32);
}

#[test]
fn the_signed_message_is_laid_out_as_the_spec_says() {
    let m = firmware_signed_message(&IMAGE, 1_048_576, "p7", "1.1.0");
    let mut want = b"furrow/1 firmware\0".to_vec();
    want.extend_from_slice(&IMAGE);
    want.extend_from_slice(&1_048_576u64.to_be_bytes());
    want.extend_from_slice(&[0, 2, b'p', b'7', 0, 5]);
    want.extend_from_slice(b"1.1.0");
    assert_eq!(m, want);
    // Every field is covered: another version or model signs other bytes.
    assert_ne!(m, firmware_signed_message(&IMAGE, 1_048_576, "p7", "1.1.1"));
    assert_ne!(m, firmware_signed_message(&IMAGE, 1_048_576, "p8", "1.1.0"));
    assert_ne!(m, firmware_signed_message(&IMAGE, 1_048_575, "p7", "1.1.0"));
}
