//! Property tests: round trips, stream reassembly, robustness against
//! arbitrary bytes, and payload validation.

use bytes::{Bytes, BytesMut};
use furrow_proto::content::{self, ContentError};
use furrow_proto::{Chunk, ChunkRequest, FirmwareOffer};
use furrow_proto::{
    Command, CommandResult, CommandStatus, ContentType, Desired, ErrorMsg, FrameDecoder, Goodbye,
    Hello, Message, Reject, Report, Str, Telemetry, Welcome, HEADER_LEN,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;

// ---------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------

fn device_id() -> impl Strategy<Value = Str> {
    "[A-Za-z0-9._:-]{1,128}".prop_map(Str::from)
}

/// Any UTF-8 string of at most `max_bytes` bytes (multi-byte chars included).
fn utf8_upto(max_bytes: usize) -> impl Strategy<Value = Str> {
    vec(any::<char>(), 0..=max_bytes).prop_map(move |chars| {
        let mut s = String::new();
        for c in chars {
            if s.len() + c.len_utf8() > max_bytes {
                break;
            }
            s.push(c);
        }
        Str::from(s)
    })
}

fn payload() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..300).prop_map(Bytes::from)
}

fn status() -> impl Strategy<Value = CommandStatus> {
    prop_oneof![
        Just(CommandStatus::Succeeded),
        Just(CommandStatus::Failed),
        Just(CommandStatus::UnknownCommand),
    ]
}

/// Every `Message` variant, with field values the spec allows.
fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (
            any::<u16>(),
            device_id(),
            utf8_upto(256),
            proptest::option::of(any::<u32>())
        )
            .prop_map(|(keepalive_s, device_id, token, capabilities)| {
                Message::Hello(Hello {
                    version: 1,
                    keepalive_s,
                    device_id,
                    token,
                    capabilities,
                })
            }),
        (
            any::<u8>(),
            any::<u16>(),
            any::<u32>(),
            any::<u16>(),
            any::<u64>(),
            any::<u64>(),
            proptest::option::of(any::<u32>())
        )
            .prop_map(
                |(version, keepalive_s, max_frame, max_inflight, last_seq, t, capabilities)| {
                    Message::Welcome(Welcome {
                        version,
                        keepalive_s,
                        max_frame,
                        max_inflight,
                        last_seq,
                        server_time_ms: t,
                        capabilities,
                    })
                }
            ),
        (1..=u64::MAX, any::<u64>(), any::<u8>(), payload()).prop_map(
            |(seq, timestamp_ms, content_type, payload)| {
                Message::Telemetry(Telemetry {
                    seq,
                    timestamp_ms,
                    content_type,
                    payload,
                })
            }
        ),
        any::<u64>().prop_map(|seq| Message::Ack { seq }),
        (any::<u64>(), any::<u16>(), utf8_upto(300))
            .prop_map(|(seq, code, reason)| Message::Reject(Reject { seq, code, reason })),
        (any::<u64>(), utf8_upto(64), any::<u8>(), payload()).prop_map(
            |(command_id, name, content_type, payload)| {
                Message::Command(Command {
                    command_id,
                    name,
                    content_type,
                    payload,
                })
            }
        ),
        (any::<u64>(), status(), any::<u8>(), payload()).prop_map(
            |(command_id, status, content_type, payload)| {
                Message::CommandResult(CommandResult {
                    command_id,
                    status,
                    content_type,
                    payload,
                })
            }
        ),
        any::<u64>().prop_map(|nonce| Message::Ping { nonce }),
        any::<u64>().prop_map(|nonce| Message::Pong { nonce }),
        (any::<u16>(), utf8_upto(300))
            .prop_map(|(code, message)| Message::Error(ErrorMsg { code, message })),
        (any::<u16>(), any::<u32>()).prop_map(|(code, retry_after_ms)| {
            Message::Goodbye(Goodbye {
                code,
                retry_after_ms,
            })
        }),
        (any::<u64>(), payload())
            .prop_map(|(version, document)| Message::Desired(Desired { version, document })),
        any::<u64>().prop_map(|version| Message::DesiredAck { version }),
        (1..=u64::MAX, any::<u64>(), payload()).prop_map(|(seq, timestamp_ms, patch)| {
            Message::Report(Report {
                seq,
                timestamp_ms,
                patch,
            })
        }),
        (
            any::<[u8; 32]>(),
            any::<u64>(),
            1..=u32::MAX,
            1..=u16::MAX,
            vec(any::<u8>(), 64),
            utf8_upto(40),
            utf8_upto(40),
        )
            .prop_map(|(image, size, chunk_max, window, sig, model, version)| {
                let mut signature = [0u8; 64];
                signature.copy_from_slice(&sig);
                Message::FirmwareOffer(FirmwareOffer {
                    image,
                    size,
                    chunk_max,
                    window,
                    signature,
                    model,
                    version,
                })
            }),
        (any::<[u8; 32]>(), any::<u64>(), 1..=u32::MAX).prop_map(|(image, offset, length)| {
            Message::ChunkRequest(ChunkRequest {
                image,
                offset,
                length,
            })
        }),
        (any::<[u8; 32]>(), any::<u64>(), any::<u32>(), payload()).prop_map(
            |(image, offset, crc32, data)| {
                Message::Chunk(Chunk {
                    image,
                    offset,
                    crc32,
                    data,
                })
            }
        ),
        any::<[u8; 32]>().prop_map(|image| Message::FirmwareCancel { image }),
    ]
}

/// Sorted cut points inside `0..=len`.
fn cuts(len: usize, idx: &[Index]) -> Vec<usize> {
    let mut c: Vec<usize> = idx.iter().map(|i| i.index(len + 1)).collect();
    c.sort_unstable();
    c
}

/// Splits `data` into chunks at the given cut points (empty chunks included).
fn chunks<'a>(data: &'a [u8], idx: &[Index]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut from = 0;
    for c in cuts(data.len(), idx) {
        out.push(&data[from..c]);
        from = c;
    }
    out.push(&data[from..]);
    out
}

/// Bytes that look like frames often enough to reach every branch of the
/// decoder: lengths around a small maximum (1024 in the test), known and
/// unknown types, flags mostly 0, bodies that mostly match the length.
fn frameish() -> impl Strategy<Value = Vec<u8>> {
    let len = prop_oneof![
        6 => 0u32..64,
        3 => 900u32..1100,
        1 => any::<u32>(),
    ];
    let kind = prop_oneof![6 => 1u8..=0x0B, 1 => any::<u8>()];
    let flags = prop_oneof![8 => Just(0u8), 1 => any::<u8>()];
    let body_len = prop_oneof![8 => Just(None), 1 => (0usize..64).prop_map(Some)];
    (len, kind, flags, body_len, any::<u64>()).prop_map(|(len, kind, flags, body_len, seed)| {
        let mut v = len.to_be_bytes().to_vec();
        v.push(kind);
        v.push(flags);
        let n = body_len.unwrap_or_else(|| (len as usize).saturating_sub(2).min(1100));
        // Cheap pseudo-random filler (an LCG), so long bodies cost little.
        let mut x = seed;
        v.extend((0..n).map(|_| {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (x >> 56) as u8
        }));
        v
    })
}

/// A stream of valid frames, frame-like garbage and plain random bytes.
fn noise() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        3 => message().prop_map(|m| m.to_bytes().unwrap().to_vec()),
        3 => frameish(),
        1 => vec(any::<u8>(), 0..32),
    ];
    prop_oneof![
        1 => vec(any::<u8>(), 0..2048),
        6 => vec(piece, 0..16).prop_map(|p| p.concat()),
    ]
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN or Infinity", |f| f.is_finite())
            .prop_map(Value::from),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..8).prop_map(Value::Array),
            proptest::collection::btree_map(any::<String>(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn cbor_value() -> impl Strategy<Value = ciborium::Value> {
    use ciborium::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| Value::Integer(i.into())),
        any::<u64>().prop_map(|i| Value::Integer(i.into())),
        // NaN and infinities are well-formed CBOR.
        any::<f64>().prop_map(Value::Float),
        prop_oneof![Just(0.0f64), Just(1.5), Just(f64::NAN), Just(f64::INFINITY)]
            .prop_map(Value::Float),
        vec(any::<u8>(), 0..64).prop_map(Value::Bytes),
        any::<String>().prop_map(Value::Text),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..8).prop_map(Value::Array),
            vec((inner.clone(), inner.clone()), 0..6).prop_map(Value::Map),
            (any::<u64>(), inner).prop_map(|(t, v)| Value::Tag(t, Box::new(v))),
        ]
    })
}

fn cbor_bytes(v: &ciborium::Value) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::ser::into_writer(v, &mut out).unwrap();
    out
}

/// Bytes biased towards CBOR initial bytes that open structures, so the
/// well-formedness walk goes deep and meets breaks in odd places.
fn cborish() -> impl Strategy<Value = Vec<u8>> {
    vec(prop_oneof![2 => cborish_byte(), 1 => any::<u8>()], 0..300)
}

fn cborish_byte() -> impl Strategy<Value = u8> {
    prop::sample::select(vec![
        0x00u8, 0x17, 0x18, 0x19, 0x1a, 0x1b, 0x1c, 0x1f, 0x41, 0x5f, 0x61, 0x7f, 0x81, 0x82, 0x9f,
        0xa1, 0xbf, 0xc1, 0xd8, 0xdf, 0xf4, 0xf8, 0xf9, 0xfa, 0xfb, 0xff,
    ])
}

// ---------------------------------------------------------------------------
// (a) round trips
// ---------------------------------------------------------------------------

proptest! {
    #[test]
    fn encode_decode_round_trips(m in message()) {
        let mut buf = BytesMut::new();
        m.encode(&mut buf).unwrap();
        prop_assert_eq!(m.body_len(), buf.len() - HEADER_LEN);
        prop_assert_eq!(&m.to_bytes().unwrap()[..], &buf[..]);
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        prop_assert_eq!(len, m.body_len() + 2);
        prop_assert_eq!(buf[4], m.kind() as u8);
        prop_assert_eq!(buf[5], 0);

        let frame = FrameDecoder::default().decode(&mut buf).unwrap().unwrap();
        prop_assert!(buf.is_empty());
        prop_assert_eq!(frame.kind, m.kind());
        let back = Message::from_frame(frame).unwrap();
        prop_assert_eq!(back, m);
    }

    #[test]
    fn encode_appends_to_existing_bytes(prefix in vec(any::<u8>(), 0..32), m in message()) {
        let mut buf = BytesMut::from(&prefix[..]);
        m.encode(&mut buf).unwrap();
        prop_assert_eq!(&buf[..prefix.len()], &prefix[..]);
        prop_assert_eq!(&buf[prefix.len()..], &m.to_bytes().unwrap()[..]);
    }

    // -----------------------------------------------------------------------
    // (b) a stream cut anywhere decodes to the same messages
    // -----------------------------------------------------------------------

    #[test]
    fn chunked_stream_yields_the_same_messages(
        msgs in vec(message(), 1..40),
        cut_at in vec(any::<Index>(), 0..40),
    ) {
        let mut wire = BytesMut::new();
        for m in &msgs {
            m.encode(&mut wire).unwrap();
        }
        let dec = FrameDecoder::default();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for chunk in chunks(&wire, &cut_at) {
            buf.extend_from_slice(chunk);
            while let Some(f) = dec.decode(&mut buf).unwrap() {
                got.push(Message::from_frame(f).unwrap());
            }
        }
        prop_assert!(buf.is_empty(), "{} bytes left over", buf.len());
        prop_assert_eq!(got, msgs);
    }

    // -----------------------------------------------------------------------
    // (c) arbitrary bytes: no panic, never more than one maximum frame buffered
    // -----------------------------------------------------------------------

    #[test]
    fn arbitrary_bytes_never_panic_nor_overbuffer(
        data in noise(),
        cut_at in vec(any::<Index>(), 0..64),
    ) {
        const MAX: u32 = 1024;
        let dec = FrameDecoder::new(MAX);
        let mut buf = BytesMut::new();
        let mut fed = 0usize;
        let mut consumed = 0usize;
        'feed: for chunk in chunks(&data, &cut_at) {
            buf.extend_from_slice(chunk);
            fed += chunk.len();
            loop {
                match dec.decode(&mut buf) {
                    Ok(None) => {
                        prop_assert!(
                            buf.len() < 4 + MAX as usize,
                            "waiting with {} bytes buffered", buf.len()
                        );
                        break;
                    }
                    Ok(Some(f)) => {
                        prop_assert!(f.body.len() + 2 <= MAX as usize);
                        consumed += f.wire_len();
                        // Parsing and validating whatever came must not panic.
                        if let Ok(Message::Telemetry(t)) = Message::from_frame(f) {
                            let _ = content::validate(t.content_type, &t.payload);
                        }
                    }
                    Err(_) => break 'feed,
                }
            }
        }
        // The decoder only ever takes whole frames off the front.
        prop_assert_eq!(consumed + buf.len(), fed);
    }

    #[test]
    fn arbitrary_body_never_panics(kind in 1u8..=0x0B, body in vec(any::<u8>(), 0..300)) {
        let kind = furrow_proto::MessageType::from_u8(kind).unwrap();
        if let Ok(m) = Message::parse(kind, Bytes::from(body.clone())) {
            // Whatever parses re-encodes to exactly the bytes it came from.
            let wire = m.to_bytes().unwrap();
            prop_assert_eq!(&wire[HEADER_LEN..], &body[..]);
        }
    }

    // -----------------------------------------------------------------------
    // (d) content validation
    // -----------------------------------------------------------------------

    #[test]
    fn serialized_json_is_json(v in json_value()) {
        let compact = serde_json::to_vec(&v).unwrap();
        prop_assert!(content::is_json(&compact), "{}", String::from_utf8_lossy(&compact));
        prop_assert_eq!(content::validate(1, &compact), Ok(ContentType::Json));
        let pretty = serde_json::to_vec_pretty(&v).unwrap();
        prop_assert!(content::is_json(&pretty));
    }

    #[test]
    fn two_json_values_are_not_json(a in json_value(), b in json_value()) {
        let two = format!("{a} {b}");
        prop_assert!(!content::is_json(two.as_bytes()), "{}", two);
        prop_assert_eq!(
            content::validate(1, two.as_bytes()),
            Err(ContentError::InvalidPayload("json"))
        );
    }

    #[test]
    fn serialized_cbor_is_cbor(v in cbor_value()) {
        let enc = cbor_bytes(&v);
        prop_assert!(content::is_cbor(&enc), "{:02x?}", enc);
        prop_assert_eq!(content::validate(2, &enc), Ok(ContentType::Cbor));
        // Anything after the item, even a complete second item: refused.
        for extra in [&[0x00u8][..], &[0xf6], &[0xff]] {
            let mut more = enc.clone();
            more.extend_from_slice(extra);
            prop_assert!(!content::is_cbor(&more), "{:02x?}", more);
        }
    }

    #[test]
    fn truncated_cbor_is_not_cbor(v in cbor_value(), cut in any::<Index>()) {
        let enc = cbor_bytes(&v);
        // Keep 0..len bytes: at least one byte cut off.
        let keep = cut.index(enc.len());
        prop_assert!(!content::is_cbor(&enc[..keep]), "{:02x?}", &enc[..keep]);
        prop_assert_eq!(
            content::validate(2, &enc[..keep]),
            Err(ContentError::InvalidPayload("cbor"))
        );
    }

    #[test]
    fn arbitrary_payloads_never_panic(
        ct in any::<u8>(),
        bytes in prop_oneof![vec(any::<u8>(), 0..512), cborish()],
    ) {
        let json = content::is_json(&bytes);
        let cbor = content::is_cbor(&bytes);
        let text = std::str::from_utf8(&bytes).is_ok();
        // validate agrees with the individual checks for every content type.
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
        prop_assert_eq!(content::validate(ct, &bytes), want);
    }

    #[test]
    fn cbor_check_agrees_with_ciborium_on_acceptance(
        v in cbor_value(),
        at in any::<Index>(),
        byte in prop_oneof![any::<u8>(), cborish_byte()],
    ) {
        // A valid encoding with one byte changed: whatever ciborium decodes
        // completely, and re-encodes to the same bytes, is one well-formed
        // item.
        let mut bytes = cbor_bytes(&v);
        let i = at.index(bytes.len());
        bytes[i] = byte;
        let mut rd = &bytes[..];
        if let Ok(v) = ciborium::de::from_reader::<ciborium::Value, _>(&mut rd) {
            if rd.is_empty() && cbor_bytes(&v) == bytes {
                prop_assert!(content::is_cbor(&bytes), "{:02x?}", bytes);
            }
        }
    }
}
