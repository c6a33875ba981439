//! The handshake (docs/protocol.md, "Session" 1-4): WELCOME's fields, early
//! TELEMETRY, PING/PONG and the device's own GOODBYE.

mod support;

use std::time::Duration;

use furrow_proto::Message;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn welcome_carries_version_limits_keepalive_last_seq_and_clock() {
    let gw = TestGateway::start_with(|c| {
        c.limits.max_frame = 100_000;
        c.limits.max_inflight = 77;
        c.keepalive.min_s = 10;
        c.keepalive.default_s = 45;
        c.keepalive.max_s = 600;
    })
    .await;
    let token = gw.add_device("pump-17").await;

    // Requested keepalive -> effective: clamped into [min, max], 0 = default.
    for (asked, effective) in [
        (30, 30),
        (1, 10),
        (10, 10),
        (0, 45),
        (600, 600),
        (u16::MAX, 600),
    ] {
        let mut dev = RawDevice::connect(gw.addr()).await;
        let before = now_ms();
        let w = dev.hello("pump-17", &token, asked).await;
        let after = now_ms();
        assert_eq!(w.version, 1, "WELCOME.version");
        assert_eq!(
            w.keepalive_s, effective,
            "keepalive for a request of {asked}"
        );
        assert_eq!(w.max_frame, 100_000, "WELCOME.max_frame");
        assert_eq!(w.max_inflight, 77, "WELCOME.max_inflight");
        assert_eq!(w.last_seq, 0, "no telemetry stored yet");
        assert!(
            w.server_time_ms + 1_000 >= before && w.server_time_ms <= after + 1_000,
            "server_time_ms {} not within a second of [{before}, {after}]",
            w.server_time_ms
        );
        dev.send(&Message::Goodbye(furrow_proto::Goodbye {
            code: goodbye::NORMAL,
            retry_after_ms: 0,
        }))
        .await;
        dev.expect_eof().await;
    }

    // last_seq: the highest durably stored seq.
    let (mut dev, _) = gw.connect_device("pump-17", &token).await;
    dev.telemetry_batch(1..=7).await;
    dev.until_ack(7).await;
    drop(dev);
    let mut dev = RawDevice::connect(gw.addr()).await;
    let w = within(Duration::from_secs(10), "reconnect", async {
        dev.hello("pump-17", &token, 0).await
    })
    .await;
    assert_eq!(w.last_seq, 7, "WELCOME.last_seq after storing 1..=7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn welcome_reports_the_default_limits() {
    let gw = TestGateway::start().await;
    let token = gw.add_device("d1").await;
    let (_dev, w) = gw.connect_device("d1", &token).await;
    assert_eq!(w.max_frame, 65_536);
    assert_eq!(w.max_inflight, 256);
    assert_eq!(w.keepalive_s, 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_right_behind_hello_is_handled_after_welcome() {
    let gw = TestGateway::start().await;
    let token = gw.add_device("early").await;
    let mut dev = RawDevice::connect(gw.addr()).await;
    let mut bytes = encode(&hello_msg("early", &token, 0));
    bytes.extend_from_slice(&telemetry_frames(1..=5));
    dev.send_raw(&bytes).await;
    let w = dev.expect_welcome().await;
    assert_eq!(w.last_seq, 0);
    dev.until_ack(5).await;
    assert_seqs(
        &stored_seqs(&gw.db_path(), "early"),
        1..=5,
        "early telemetry",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_split_into_single_bytes_is_reassembled() {
    let gw = TestGateway::start().await;
    let token = gw.add_device("slow-hello").await;
    let mut dev = RawDevice::connect(gw.addr()).await;
    for b in encode(&hello_msg("slow-hello", &token, 0)) {
        dev.send_raw(&[b]).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    dev.expect_welcome().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_is_answered_with_pong_before_and_between_telemetry() {
    let gw = TestGateway::start().await;
    let token = gw.add_device("pinger").await;
    let (mut dev, _) = gw.connect_device("pinger", &token).await;
    dev.ping(0xDEAD_BEEF).await;
    dev.telemetry(1, "{}").await;
    dev.until_ack(1).await;
    dev.ping(u64::MAX).await;
    // A PONG from the device (unsolicited) is harmless.
    dev.send(&Message::Pong { nonce: 5 }).await;
    dev.ping(7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_goodbye_gets_its_telemetry_acked_then_close() {
    let gw = TestGateway::start().await;
    let token = gw.add_device("leaver").await;
    let (mut dev, _) = gw.connect_device("leaver", &token).await;
    let mut bytes = telemetry_frames(1..=20).to_vec();
    bytes.extend_from_slice(&encode(&Message::Goodbye(furrow_proto::Goodbye {
        code: goodbye::NORMAL,
        retry_after_ms: 0,
    })));
    dev.send_raw(&bytes).await;
    // Everything read before the GOODBYE is stored and ACKed, then the
    // gateway closes.
    let mut last = 0;
    loop {
        match dev.recv().await {
            Some(Message::Ack { seq }) => {
                assert!(seq > last);
                last = seq;
            }
            None => break,
            Some(other) => panic!("unexpected {other:?} after device GOODBYE"),
        }
    }
    assert_eq!(last, 20, "the last ACK before close");
    assert_seqs(&stored_seqs(&gw.db_path(), "leaver"), 1..=20, "stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_of_exactly_max_frame_is_accepted() {
    let gw = TestGateway::start_with(|c| c.limits.max_frame = 4096).await;
    let token = gw.add_device("big").await;
    let (mut dev, w) = gw.connect_device("big", &token).await;
    assert_eq!(w.max_frame, 4096);
    // length = type + flags + 17 bytes of header fields + payload.
    let payload = vec![0xABu8; 4096 - 2 - 17];
    let msg = telemetry_msg(1, 0, &payload);
    let wire = encode(&msg);
    assert_eq!(u32::from_be_bytes(wire[..4].try_into().unwrap()), 4096);
    dev.send_raw(&wire).await;
    dev.until_ack(1).await;
    let (_, _, ct, stored) = stored_row(&gw.db_path(), "big", 1).expect("stored");
    assert_eq!(ct, 0);
    assert_eq!(stored, payload);
}
