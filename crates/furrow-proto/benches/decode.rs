//! Decoding throughput of the hot path: TELEMETRY frames with a 120-byte JSON
//! payload, taken off one read buffer; and ACK encoding.
//!
//! Run: `cargo bench -p furrow-proto --bench decode`. Figures are per frame
//! (`Throughput::Elements`).

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use furrow_proto::message::{encode_ack, encode_telemetry};
use furrow_proto::{content, FrameDecoder, Message, HEADER_LEN};

/// Frames per batch.
const N: usize = 1024;
/// Payload size of each TELEMETRY.
const PAYLOAD_LEN: usize = 120;

/// A JSON object of exactly `PAYLOAD_LEN` bytes, padded inside a string.
fn payload() -> Vec<u8> {
    let head = r#"{"temp_c":21.5,"humidity":40.25,"pressure_hpa":1013.2,"battery_v":3.71,"ok":true,"pad":""#;
    let mut p = head.as_bytes().to_vec();
    p.resize(PAYLOAD_LEN - 2, b'x');
    p.extend_from_slice(b"\"}");
    assert_eq!(p.len(), PAYLOAD_LEN);
    assert!(content::is_json(&p));
    p
}

/// One read buffer holding `N` TELEMETRY frames back to back.
fn telemetry_stream() -> BytesMut {
    let p = payload();
    let mut buf = BytesMut::with_capacity(N * (HEADER_LEN + 17 + PAYLOAD_LEN));
    for seq in 1..=N as u64 {
        encode_telemetry(seq, 1_763_683_200_000 + seq, 1, &p, &mut buf).unwrap();
    }
    buf
}

/// Decodes every frame in `buf`, optionally validating payloads; returns a
/// checksum so nothing is optimised away.
fn decode_all(buf: &mut BytesMut, validate: bool) -> u64 {
    let dec = FrameDecoder::default();
    let mut sum = 0u64;
    while let Some(frame) = dec.decode(buf).unwrap() {
        let Message::Telemetry(t) = Message::parse(frame.kind, frame.body).unwrap() else {
            unreachable!("only TELEMETRY in the stream");
        };
        if validate {
            content::validate(t.content_type, &t.payload).unwrap();
        }
        sum = sum.wrapping_add(t.seq);
    }
    sum
}

fn benches(c: &mut Criterion) {
    let template = telemetry_stream();
    let want: u64 = (1..=N as u64).sum();
    {
        // Guard the figures: the routine decodes every frame.
        let mut b = template.clone();
        assert_eq!(decode_all(&mut b, true), want);
        assert!(b.is_empty());
    }

    let mut g = c.benchmark_group("proto");
    g.throughput(Throughput::Elements(N as u64));

    for (name, validate) in [
        ("decode_telemetry_120B", false),
        ("decode_and_validate_json_120B", true),
    ] {
        g.bench_function(name, |b| {
            b.iter_batched(
                || template.clone(),
                |mut buf| {
                    let sum = decode_all(black_box(&mut buf), validate);
                    // Hand the buffer back so its drop is not timed.
                    (black_box(sum), buf)
                },
                BatchSize::LargeInput,
            )
        });
    }

    g.bench_function("encode_ack", |b| {
        b.iter_batched(
            || BytesMut::with_capacity(N * (HEADER_LEN + 8)),
            |mut buf| {
                for seq in 1..=N as u64 {
                    encode_ack(black_box(seq), &mut buf);
                }
                buf
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(decode, benches);
criterion_main!(decode);
