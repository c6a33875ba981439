//! Every ERROR code of docs/protocol.md that a plain TCP listener can
//! produce, each followed by the gateway closing the connection.

mod support;

use std::time::Duration;

use furrow_proto::{CommandStatus, Message};
use support::*;
use tokio::time::Instant;

/// A gateway with one provisioned device `dev-1`; returns its token.
async fn gateway() -> (TestGateway, String) {
    let gw = TestGateway::start().await;
    let token = gw.add_device("dev-1").await;
    (gw, token)
}

/// A connected, welcomed `dev-1`.
async fn active(gw: &TestGateway, token: &str) -> RawDevice {
    let (dev, _) = gw.connect_device("dev-1", token).await;
    dev
}

/// HELLO body bytes with free-form fields.
fn hello_body(version: u8, keepalive: u16, id: &[u8], token: &[u8]) -> Vec<u8> {
    let mut b = vec![version];
    b.extend_from_slice(&keepalive.to_be_bytes());
    b.extend_from_slice(&(id.len() as u16).to_be_bytes());
    b.extend_from_slice(id);
    b.extend_from_slice(&(token.len() as u16).to_be_bytes());
    b.extend_from_slice(token);
    b
}

// --- PROTOCOL_ERROR ---------------------------------------------------------

#[tokio::test]
async fn first_message_not_hello_is_protocol_error() {
    let (gw, _token) = gateway().await;
    let firsts = [
        encode(&Message::Ping { nonce: 1 }),
        encode(&telemetry_msg(1, 1, b"{}")),
        encode(&Message::Goodbye(furrow_proto::Goodbye {
            code: 0,
            retry_after_ms: 0,
        })),
        encode(&command_result_msg(1, CommandStatus::Succeeded)),
        encode(&Message::Ack { seq: 1 }),
    ];
    for first in firsts {
        let mut dev = RawDevice::connect(gw.addr()).await;
        dev.send_raw(&first).await;
        dev.expect_error(code::PROTOCOL_ERROR).await;
    }
}

#[tokio::test]
async fn second_hello_is_protocol_error() {
    let (gw, token) = gateway().await;
    let mut dev = active(&gw, &token).await;
    dev.send(&hello_msg("dev-1", &token, 0)).await;
    dev.expect_error(code::PROTOCOL_ERROR).await;
}

#[tokio::test]
async fn second_hello_with_bad_version_is_still_protocol_error() {
    // "whether that message may come now" is checked before the body: a
    // second HELLO is PROTOCOL_ERROR whatever its version says.
    let (gw, token) = gateway().await;
    let mut dev = active(&gw, &token).await;
    dev.send_raw(&raw_frame(0x01, 0, &[2, 0xFF])).await;
    dev.expect_error(code::PROTOCOL_ERROR).await;
}

#[tokio::test]
async fn pipelined_second_hello_gets_welcome_then_protocol_error() {
    let (gw, token) = gateway().await;
    let mut dev = RawDevice::connect(gw.addr()).await;
    let mut b = encode(&hello_msg("dev-1", &token, 0));
    b.extend_from_slice(&encode(&hello_msg("dev-1", &token, 0)));
    dev.send_raw(&b).await;
    dev.expect_welcome().await;
    dev.expect_error(code::PROTOCOL_ERROR).await;
}

#[tokio::test]
async fn nonzero_flags_is_protocol_error() {
    let (gw, token) = gateway().await;
    // Before HELLO: a HELLO with flags 1.
    let mut dev = RawDevice::connect(gw.addr()).await;
    let mut hello = encode(&hello_msg("dev-1", &token, 0));
    hello[5] = 1;
    dev.send_raw(&hello).await;
    dev.expect_error(code::PROTOCOL_ERROR).await;

    // After WELCOME: a PING with flags 0x80; also decided on the header
    // alone, before the body arrives.
    let mut dev = active(&gw, &token).await;
    dev.send_raw(&[0, 0, 0, 10, 0x08, 0x80]).await;
    dev.expect_error(code::PROTOCOL_ERROR).await;
}

#[tokio::test]
async fn length_below_two_is_protocol_error() {
    let (gw, token) = gateway().await;
    for len in [0u32, 1] {
        let mut dev = RawDevice::connect(gw.addr()).await;
        dev.send_raw(&len.to_be_bytes()).await;
        dev.expect_error(code::PROTOCOL_ERROR).await;

        let mut dev = active(&gw, &token).await;
        let mut b = len.to_be_bytes().to_vec();
        b.push(0x08);
        dev.send_raw(&b).await;
        dev.expect_error(code::PROTOCOL_ERROR).await;
    }
}

#[tokio::test]
async fn gateway_only_message_from_device_is_protocol_error() {
    let (gw, token) = gateway().await;
    let gateway_only = [
        encode(&Message::Ack { seq: 1 }),
        encode(&Message::Welcome(furrow_proto::Welcome {
            version: 1,
            keepalive_s: 30,
            max_frame: 65_536,
            max_inflight: 1,
            last_seq: 0,
            server_time_ms: 0,
            capabilities: None,
        })),
        encode(&Message::Reject(furrow_proto::Reject {
            seq: 1,
            code: 20,
            reason: "x".into(),
        })),
        encode(&Message::Command(furrow_proto::Command {
            command_id: 1,
            name: "reboot".into(),
            content_type: 0,
            payload: Default::default(),
        })),
        encode(&Message::Error(furrow_proto::ErrorMsg {
            code: 1,
            message: "x".into(),
        })),
        // The type decides before the body: an ACK with a broken body too.
        raw_frame(0x04, 0, &[1, 2, 3]),
    ];
    for frame in gateway_only {
        let mut dev = active(&gw, &token).await;
        dev.send_raw(&frame).await;
        dev.expect_error(code::PROTOCOL_ERROR).await;
    }
}

#[tokio::test]
async fn hello_with_bad_device_id_is_protocol_error() {
    let (gw, token) = gateway().await;
    let long = vec![b'a'; 129];
    let bad_ids: [&[u8]; 6] = [
        b"",
        b"has space",
        "\u{e9}t\u{e9}".as_bytes(),
        &long,
        b"slash/no",
        b"nul\0",
    ];
    for id in bad_ids {
        let mut dev = RawDevice::connect(gw.addr()).await;
        dev.send_raw(&raw_frame(0x01, 0, &hello_body(1, 0, id, token.as_bytes())))
            .await;
        let e = dev.expect_error(code::PROTOCOL_ERROR).await;
        assert!(!e.message.is_empty());
    }
    // 128 bytes is fine (reaches authentication, which fails).
    let mut dev = RawDevice::connect(gw.addr()).await;
    dev.send_raw(&raw_frame(
        0x01,
        0,
        &hello_body(1, 0, &[b'a'; 128], token.as_bytes()),
    ))
    .await;
    dev.expect_error(code::AUTH_FAILED).await;
}

#[tokio::test]
async fn hello_with_malformed_body_is_protocol_error() {
    let (gw, token) = gateway().await;
    let mut trailing = hello_body(1, 0, b"dev-1", token.as_bytes());
    trailing.push(0);
    let mut not_utf8_id = hello_body(1, 0, b"dev-1", token.as_bytes());
    not_utf8_id[5] = 0xFF;
    let bodies = [
        // Token over 256 bytes.
        hello_body(1, 0, b"dev-1", &[b'x'; 257]),
        // Bytes after the last field.
        trailing,
        // Too short for its fields.
        vec![1, 0],
        hello_body(1, 0, b"dev-1", token.as_bytes())[..8].to_vec(),
        // A str that is not UTF-8.
        not_utf8_id,
    ];
    for body in bodies {
        let mut dev = RawDevice::connect(gw.addr()).await;
        dev.send_raw(&raw_frame(0x01, 0, &body)).await;
        dev.expect_error(code::PROTOCOL_ERROR).await;
    }
}

#[tokio::test]
async fn telemetry_seq_zero_is_protocol_error_even_after_other_seqs() {
    let (gw, token) = gateway().await;
    let mut dev = active(&gw, &token).await;
    dev.send(&telemetry_msg(0, 1, b"{}")).await;
    dev.expect_error(code::PROTOCOL_ERROR).await;

    // Seq 0 is checked before the duplicate rule: it is not an ACKed dup.
    let mut dev = active(&gw, &token).await;
    dev.telemetry_batch(1..=3).await;
    dev.until_ack(3).await;
    dev.send(&telemetry_msg(0, 1, b"{}")).await;
    dev.expect_error(code::PROTOCOL_ERROR).await;
    assert_seqs(&stored_seqs(&gw.db_path(), "dev-1"), 1..=3, "stored");
}

#[tokio::test]
async fn telemetry_too_short_is_protocol_error() {
    let (gw, token) = gateway().await;
    let mut dev = active(&gw, &token).await;
    // seq and timestamp but no content type.
    dev.send_raw(&raw_frame(
        0x03,
        0,
        &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
    ))
    .await;
    dev.expect_error(code::PROTOCOL_ERROR).await;
}

#[tokio::test]
async fn command_result_status_3_is_protocol_error() {
    let (gw, token) = gateway().await;
    // Complete body with status 3.
    let mut dev = active(&gw, &token).await;
    let mut body = 9u64.to_be_bytes().to_vec();
    body.extend_from_slice(&[3, 0]);
    dev.send_raw(&raw_frame(0x07, 0, &body)).await;
    dev.expect_error(code::PROTOCOL_ERROR).await;
    // Status checked first: the rest of the body missing does not matter.
    let mut dev = active(&gw, &token).await;
    let mut body = 9u64.to_be_bytes().to_vec();
    body.push(255);
    dev.send_raw(&raw_frame(0x07, 0, &body)).await;
    dev.expect_error(code::PROTOCOL_ERROR).await;
    // Valid statuses for an unknown command are ignored; the session goes on.
    let mut dev = active(&gw, &token).await;
    for s in [
        CommandStatus::Succeeded,
        CommandStatus::Failed,
        CommandStatus::UnknownCommand,
    ] {
        dev.send(&command_result_msg(42, s)).await;
    }
    dev.ping(1).await;
}

// --- UNSUPPORTED_VERSION ------------------------------------------------------

#[tokio::test]
async fn unsupported_version_whatever_follows() {
    let (gw, token) = gateway().await;
    let bodies = [
        vec![2, 0xFF],
        vec![2],
        vec![0, 1, 2, 3, 4, 5, 6, 7],
        hello_body(2, 30, b"dev-1", token.as_bytes()),
        hello_body(255, 30, b"not a valid id", b""),
    ];
    for body in bodies {
        let mut dev = RawDevice::connect(gw.addr()).await;
        dev.send_raw(&raw_frame(0x01, 0, &body)).await;
        dev.expect_error(code::UNSUPPORTED_VERSION).await;
    }
}

// --- AUTH_FAILED ------------------------------------------------------------

#[tokio::test]
async fn auth_failed_is_identical_for_unknown_device_and_wrong_token() {
    let (gw, token) = gateway().await;
    let revoked_token = gw.add_device("revoked-1").await;
    gw.store().revoke_device("revoked-1").await.unwrap();

    async fn error_frame(gw: &TestGateway, id: &str, token: &str) -> bytes::Bytes {
        let mut dev = RawDevice::connect(gw.addr()).await;
        dev.send(&hello_msg(id, token, 0)).await;
        let raw = dev.recv_raw().await;
        dev.expect_eof().await;
        raw
    }
    let unknown = error_frame(&gw, "nobody", &token).await;
    let wrong = error_frame(&gw, "dev-1", &"0".repeat(64)).await;
    let empty = error_frame(&gw, "dev-1", "").await;
    let revoked = error_frame(&gw, "revoked-1", &revoked_token).await;
    match parse(unknown.clone()) {
        Message::Error(e) => assert_eq!(e.code, code::AUTH_FAILED),
        other => panic!("expected ERROR AUTH_FAILED, got {other:?}"),
    }
    assert_eq!(unknown, wrong, "unknown device vs wrong token");
    assert_eq!(unknown, empty, "unknown device vs empty token");
    assert_eq!(unknown, revoked, "unknown device vs revoked device");
    // And the right token still works.
    active(&gw, &token).await.ping(1).await;
}

// --- FRAME_TOO_LARGE ----------------------------------------------------------

#[tokio::test]
async fn frame_too_large_from_the_length_alone() {
    let gw = TestGateway::start_with(|c| c.limits.max_frame = 1024).await;
    let token = gw.add_device("dev-1").await;
    // Before HELLO: only the four length bytes are sent.
    let mut dev = RawDevice::connect(gw.addr()).await;
    dev.send_raw(&1025u32.to_be_bytes()).await;
    dev.expect_error(code::FRAME_TOO_LARGE).await;
    // After WELCOME: a TELEMETRY header announcing 1025.
    let mut dev = active(&gw, &token).await;
    dev.send_raw(&[0, 0, 4, 1, 0x03, 0]).await;
    dev.expect_error(code::FRAME_TOO_LARGE).await;
    // u32::MAX.
    let mut dev = active(&gw, &token).await;
    dev.send_raw(&[0xFF, 0xFF, 0xFF, 0xFF]).await;
    dev.expect_error(code::FRAME_TOO_LARGE).await;
    // The length check comes first: too large with bad flags and type.
    let mut dev = RawDevice::connect(gw.addr()).await;
    dev.send_raw(&[0, 1, 0, 0, 0xEE, 0x01]).await;
    dev.expect_error(code::FRAME_TOO_LARGE).await;
}

#[tokio::test]
async fn proxy_headers_on_a_plain_listener_are_frame_too_large() {
    let (gw, _token) = gateway().await;
    // PROXY protocol v1.
    let mut dev = RawDevice::connect(gw.addr()).await;
    dev.send_raw(b"PROXY TCP4 192.0.2.1 198.51.100.2 51234 7700\r\n")
        .await;
    dev.expect_error(code::FRAME_TOO_LARGE).await;
    // PROXY protocol v2 signature.
    let mut dev = RawDevice::connect(gw.addr()).await;
    dev.send_raw(b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c").await;
    dev.expect_error(code::FRAME_TOO_LARGE).await;
}

// --- UNKNOWN_TYPE ---------------------------------------------------------------

#[tokio::test]
async fn unknown_type_before_and_after_hello() {
    let (gw, token) = gateway().await;
    for kind in [0x00u8, 0x1F, 0x7F, 0xFF] {
        let mut dev = RawDevice::connect(gw.addr()).await;
        dev.send_raw(&raw_frame(kind, 0, &[1, 2, 3])).await;
        dev.expect_error(code::UNKNOWN_TYPE).await;

        let mut dev = active(&gw, &token).await;
        dev.send_raw(&raw_frame(kind, 0, &[])).await;
        dev.expect_error(code::UNKNOWN_TYPE).await;
    }
    // Flags are checked before the type.
    let mut dev = active(&gw, &token).await;
    dev.send_raw(&raw_frame(0x1F, 1, &[])).await;
    dev.expect_error(code::PROTOCOL_ERROR).await;
}

// --- HANDSHAKE_TIMEOUT ----------------------------------------------------------

async fn handshake_timeout_case(gw: &TestGateway, send: &[u8]) -> Duration {
    let started = Instant::now();
    let mut dev = RawDevice::connect(gw.addr()).await;
    if !send.is_empty() {
        dev.send_raw(send).await;
    }
    dev.expect_error(code::HANDSHAKE_TIMEOUT).await;
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_timeout_when_hello_never_completes() {
    let gw = TestGateway::start_with(|c| c.limits.handshake_timeout_ms = 300).await;
    let token = gw.add_device("dev-1").await;
    let hello = encode(&hello_msg("dev-1", &token, 0));
    for (what, bytes) in [
        ("nothing", &[][..]),
        ("two bytes", &hello[..2]),
        ("half a HELLO", &hello[..hello.len() / 2]),
        ("all but one byte", &hello[..hello.len() - 1]),
    ] {
        let took = handshake_timeout_case(&gw, bytes).await;
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(3),
            "{what}: HANDSHAKE_TIMEOUT after {took:?}, configured 300 ms"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_timeout_counts_from_accept_not_from_last_byte() {
    let gw = TestGateway::start_with(|c| c.limits.handshake_timeout_ms = 500).await;
    let token = gw.add_device("dev-1").await;
    let hello = encode(&hello_msg("dev-1", &token, 0));
    let started = Instant::now();
    let (mut rd, mut wr) = RawDevice::connect(gw.addr()).await.split();
    // Trickle the HELLO over ~1.5 s: bytes keep coming, but the whole HELLO
    // is not there by the deadline.
    let trickle = tokio::spawn(async move {
        for b in hello {
            if wr.send_raw(&[b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1500 / 60)).await;
        }
        wr
    });
    match rd.recv().await {
        Some(Message::Error(e)) => assert_eq!(e.code, code::HANDSHAKE_TIMEOUT),
        other => panic!("expected ERROR HANDSHAKE_TIMEOUT, got {other:?}"),
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(1400),
        "HANDSHAKE_TIMEOUT after {took:?}, configured 500 ms from accept"
    );
    rd.expect_closed().await;
    let _ = trickle.await;
}

// --- KEEPALIVE_TIMEOUT ----------------------------------------------------------

async fn keepalive_gateway() -> (TestGateway, String) {
    let gw = TestGateway::start_with(|c| {
        c.keepalive.min_s = 1;
        c.keepalive.default_s = 1;
        c.keepalive.max_s = 60;
    })
    .await;
    let token = gw.add_device("dev-1").await;
    (gw, token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_timeout_after_one_and_a_half_keepalives_of_silence() {
    let (gw, token) = keepalive_gateway().await;
    let mut dev = RawDevice::connect(gw.addr()).await;
    let w = dev.hello("dev-1", &token, 1).await;
    let welcomed = Instant::now();
    assert_eq!(w.keepalive_s, 1);
    let e = dev.expect_error(code::KEEPALIVE_TIMEOUT).await;
    let took = welcomed.elapsed();
    assert!(
        took >= Duration::from_millis(1_300) && took < Duration::from_millis(3_000),
        "KEEPALIVE_TIMEOUT after {took:?}, expected ~1.5 s ({:?})",
        e.message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_timeout_despite_a_frame_trickled_byte_by_byte() {
    let (gw, token) = keepalive_gateway().await;
    let dev = {
        let mut d = RawDevice::connect(gw.addr()).await;
        d.hello("dev-1", &token, 1).await;
        d
    };
    let welcomed = Instant::now();
    let (mut rd, mut wr) = dev.split();
    // A 14-byte PING, one byte every 250 ms: 3.5 s for the whole frame.
    let ping = encode(&Message::Ping { nonce: 9 });
    let trickle = tokio::spawn(async move {
        for b in ping {
            if wr.send_raw(&[b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        wr
    });
    match rd.recv_within(Duration::from_secs(6)).await {
        Some(Message::Error(e)) => assert_eq!(e.code, code::KEEPALIVE_TIMEOUT),
        other => panic!("expected ERROR KEEPALIVE_TIMEOUT, got {other:?}"),
    }
    let took = welcomed.elapsed();
    assert!(
        took < Duration::from_millis(3_000),
        "KEEPALIVE_TIMEOUT after {took:?}: partial bytes kept the connection alive"
    );
    rd.expect_closed().await;
    let _ = trickle.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_frames_keep_the_connection_alive() {
    let (gw, token) = keepalive_gateway().await;
    let mut dev = RawDevice::connect(gw.addr()).await;
    dev.hello("dev-1", &token, 1).await;
    // 3.5 s of PINGs every 500 ms: well past 1.5 s, never idle that long.
    for n in 0..7 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        dev.ping(n).await;
    }
    // Telemetry counts too.
    for seq in 1..=4 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        dev.telemetry(seq, "1").await;
        dev.until_ack(seq).await;
    }
    // Then silence: the timeout comes.
    dev.expect_error(code::KEEPALIVE_TIMEOUT).await;
}
