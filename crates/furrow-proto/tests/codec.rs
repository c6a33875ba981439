//! The `codec` feature: `FurrowCodec` as a tokio-util `Decoder`/`Encoder`,
//! driven directly on a `BytesMut` (no sockets).
#![cfg(feature = "codec")]

use bytes::{Bytes, BytesMut};
use furrow_proto::codec::{CodecError, FurrowCodec};
use furrow_proto::{
    CommandResult, CommandStatus, DecodeError, EncodeError, ErrorMsg, Goodbye, Hello, Message, Str,
    Telemetry, Welcome, DEFAULT_MAX_FRAME,
};
use tokio_util::codec::{Decoder, Encoder};

/// The spec's ACK 42 vector.
const ACK_42: [u8; 14] = [0, 0, 0, 0x0a, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0x2a];

fn messages() -> Vec<Message> {
    vec![
        Message::Hello(Hello {
            version: 1,
            keepalive_s: 30,
            device_id: Str::from("pump-17"),
            token: Str::from("k3y"),
            capabilities: None,
        }),
        Message::Welcome(Welcome {
            version: 1,
            keepalive_s: 30,
            max_frame: DEFAULT_MAX_FRAME,
            max_inflight: 256,
            last_seq: 41,
            server_time_ms: 1_763_683_200_000,
            capabilities: None,
        }),
        Message::Telemetry(Telemetry {
            seq: 42,
            timestamp_ms: 1_763_683_200_123,
            content_type: 1,
            payload: Bytes::from_static(br#"{"t":21.5}"#),
        }),
        Message::Ack { seq: 42 },
        Message::CommandResult(CommandResult {
            command_id: 3,
            status: CommandStatus::UnknownCommand,
            content_type: 0,
            payload: Bytes::new(),
        }),
        Message::Ping { nonce: 1 },
        Message::Error(ErrorMsg {
            code: 3,
            message: Str::from("authentication failed"),
        }),
        Message::Goodbye(Goodbye {
            code: 2,
            retry_after_ms: 0,
        }),
    ]
}

fn decode_all(codec: &mut FurrowCodec, buf: &mut BytesMut) -> Vec<Message> {
    let mut out = Vec::new();
    while let Some(m) = codec.decode(buf).unwrap() {
        out.push(m);
    }
    out
}

#[test]
fn encoder_writes_the_spec_bytes() {
    let mut codec = FurrowCodec::default();
    let mut buf = BytesMut::new();
    codec.encode(&Message::Ack { seq: 42 }, &mut buf).unwrap();
    assert_eq!(&buf[..], &ACK_42[..]);
}

#[test]
fn encoder_appends_and_matches_message_encode() {
    let mut codec = FurrowCodec::default();
    let mut buf = BytesMut::new();
    let mut want = BytesMut::new();
    for m in messages() {
        codec.encode(&m, &mut buf).unwrap();
        m.encode(&mut want).unwrap();
    }
    assert_eq!(buf, want);
}

#[test]
fn round_trip_through_the_codec() {
    let mut codec = FurrowCodec::default();
    let mut buf = BytesMut::new();
    for m in messages() {
        codec.encode(&m, &mut buf).unwrap();
    }
    assert_eq!(decode_all(&mut codec, &mut buf), messages());
    assert!(buf.is_empty());
    assert_eq!(codec.decode(&mut buf).unwrap(), None);
    assert_eq!(codec.decode_eof(&mut buf).unwrap(), None);
}

#[test]
fn frames_split_over_reads() {
    let mut wire = BytesMut::new();
    let mut codec = FurrowCodec::default();
    for m in messages() {
        codec.encode(&m, &mut wire).unwrap();
    }
    for step in [1, 2, 3, 7, 13, 64] {
        let mut codec = FurrowCodec::default();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for chunk in wire.chunks(step) {
            buf.extend_from_slice(chunk);
            got.extend(decode_all(&mut codec, &mut buf));
        }
        assert_eq!(got, messages(), "reads of {step} bytes");
        assert!(buf.is_empty());
    }
}

#[test]
fn no_session_rules_in_the_codec() {
    // Two HELLOs, and a gateway-only message: the codec parses them all; the
    // "may this come now" check is the session's.
    let hello = messages().remove(0);
    let mut codec = FurrowCodec::default();
    let mut buf = BytesMut::new();
    codec.encode(&hello, &mut buf).unwrap();
    codec.encode(&hello, &mut buf).unwrap();
    buf.extend_from_slice(&ACK_42);
    let got = decode_all(&mut codec, &mut buf);
    assert_eq!(got, vec![hello.clone(), hello, Message::Ack { seq: 42 }]);
}

#[test]
fn frame_too_large_from_the_length_alone() {
    let mut codec = FurrowCodec::new(9);
    let mut buf = BytesMut::from(&ACK_42[..4]);
    match codec.decode(&mut buf) {
        Err(CodecError::Decode(DecodeError::FrameTooLarge { len: 10, max: 9 })) => {}
        other => panic!("expected FRAME_TOO_LARGE, got {other:?}"),
    }
    // The same frame fits the default maximum.
    let mut buf = BytesMut::from(&ACK_42[..]);
    assert_eq!(
        FurrowCodec::default().decode(&mut buf).unwrap(),
        Some(Message::Ack { seq: 42 })
    );
}

#[test]
fn header_and_body_errors_surface_as_decode_errors() {
    let cases: Vec<(Vec<u8>, DecodeError)> = vec![
        (
            vec![0, 0, 0, 1],
            DecodeError::Protocol("frame length below 2"),
        ),
        (
            vec![0, 0, 0, 10, 0x04, 0x01],
            DecodeError::Protocol("frame flags must be 0"),
        ),
        (vec![0, 0, 0, 10, 0x1F, 0], DecodeError::UnknownType(0x1F)),
        // HELLO version 2: the body is parsed too, unlike FrameDecoder alone.
        (
            vec![0, 0, 0, 3, 0x01, 0, 2],
            DecodeError::UnsupportedVersion(2),
        ),
        // TELEMETRY seq 0.
        (
            {
                let mut v = vec![0, 0, 0, 19, 0x03, 0];
                v.extend_from_slice(&[0; 17]);
                v
            },
            DecodeError::Protocol("TELEMETRY seq 0"),
        ),
        // ACK with a byte left over.
        (
            {
                let mut v = ACK_42.to_vec();
                v[3] = 11;
                v.push(0);
                v
            },
            DecodeError::Protocol("bytes left over after the last field"),
        ),
    ];
    for (bytes, want) in cases {
        let mut buf = BytesMut::from(&bytes[..]);
        match FurrowCodec::default().decode(&mut buf) {
            Err(CodecError::Decode(e)) => assert_eq!(e, want, "{bytes:02x?}"),
            other => panic!("{bytes:02x?}: expected {want:?}, got {other:?}"),
        }
    }
}

#[test]
fn decode_eof_with_a_partial_frame_is_an_io_error() {
    let mut codec = FurrowCodec::default();
    let mut buf = BytesMut::from(&ACK_42[..9]);
    assert_eq!(codec.decode(&mut buf).unwrap(), None);
    match codec.decode_eof(&mut buf) {
        Err(CodecError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::Other),
        other => panic!("expected an I/O error, got {other:?}"),
    }
    // A complete frame at EOF is still delivered.
    let mut buf = BytesMut::from(&ACK_42[..]);
    assert_eq!(
        codec.decode_eof(&mut buf).unwrap(),
        Some(Message::Ack { seq: 42 })
    );
}

#[test]
fn encode_errors_surface() {
    let m = Message::Error(ErrorMsg {
        code: 9,
        message: Str::from("x".repeat(65_536)),
    });
    let mut buf = BytesMut::new();
    match FurrowCodec::default().encode(&m, &mut buf) {
        Err(CodecError::Encode(EncodeError::StrTooLong(65_536))) => {}
        other => panic!("expected StrTooLong, got {other:?}"),
    }
    assert!(buf.is_empty(), "nothing written for a refused message");
    // 65,535 bytes is the largest str.
    let m = Message::Error(ErrorMsg {
        code: 9,
        message: Str::from("x".repeat(65_535)),
    });
    FurrowCodec::default().encode(&m, &mut buf).unwrap();
    assert_eq!(buf.len(), 6 + 2 + 2 + 65_535);
}
