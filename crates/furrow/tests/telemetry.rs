//! Telemetry and acknowledgement (docs/protocol.md, "Telemetry and
//! acknowledgement"): pipelining, ACK only after commit, duplicates, REJECT.

mod support;

use std::time::Duration;

use furrow_proto::Message;
use support::*;
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_pipelined_telemetry_are_acked_and_stored_once() {
    let gw = TestGateway::start().await;
    let token = gw.add_device("bulk").await;
    let (mut dev, w) = gw.connect_device("bulk", &token).await;
    let window = u64::from(w.max_inflight);
    assert!(window >= 1);
    let started = Instant::now();
    let acks = within(
        Duration::from_secs(25),
        "10,000 pipelined TELEMETRY",
        dev.stream_window(1, 10_000, window, |_| {}),
    )
    .await;
    eprintln!(
        "10,000 TELEMETRY acked in {:?} with {acks} ACKs (window {window})",
        started.elapsed()
    );
    assert_seqs(
        &stored_seqs_async(&gw.db_path(), "bulk").await,
        1..=10_000,
        "after 10,000 pipelined TELEMETRY",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ack_before_its_commit() {
    // Durability as in production (synchronous = full), a small window so
    // that there are many ACKs, and a separate SQLite connection checking
    // each ACK the moment it arrives.
    let gw = TestGateway::start_with(|c| c.limits.max_inflight = 64).await;
    let token = gw.add_device("careful").await;
    let (mut dev, w) = gw.connect_device("careful", &token).await;
    let db = open_db(&gw.db_path());
    let mut checked = 0;
    dev.stream_window(1, 3_000, u64::from(w.max_inflight), |n| {
        let below: i64 = db
            .query_row(
                "SELECT COUNT(*) FROM telemetry t JOIN devices d ON d.id = t.device \
                 WHERE d.device_id = 'careful' AND t.seq <= ?1",
                [n as i64],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(
            below as u64, n,
            "ACK {n} arrived but only {below} of seqs 1..={n} are committed"
        );
        checked += 1;
    })
    .await;
    assert!(checked > 10, "only {checked} ACKs checked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_waits_for_a_delayed_group_commit() {
    // The writer waits up to 400 ms for more rows before committing; the
    // ACK must wait for that commit, not for the read.
    let gw = TestGateway::start_with(|c| c.storage.batch_delay_us = 400_000).await;
    let token = gw.add_device("delayed").await;
    let (mut dev, _) = gw.connect_device("delayed", &token).await;
    let db = open_db(&gw.db_path());
    for seq in 1..=3u64 {
        let sent = Instant::now();
        dev.telemetry(seq, "{\"v\":1}").await;
        dev.until_ack(seq).await;
        let took = sent.elapsed();
        let stored = stored_seqs_in(&db, "delayed");
        assert!(stored.contains(&seq), "ACK {seq} but stored {stored:?}");
        assert!(
            took >= Duration::from_millis(300),
            "ACK {seq} after {took:?}, before the group commit (400 ms) could have run"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_within_one_connection_are_acked_and_stored_once() {
    let gw = TestGateway::start().await;
    let token = gw.add_device("dups").await;
    let (mut dev, _) = gw.connect_device("dups", &token).await;
    // 5 twice, back to back, in one write.
    let mut b = telemetry_frames(1..=5).to_vec();
    b.extend_from_slice(&encode(&telemetry_msg(5, 1, b"{\"second\":true}")));
    b.extend_from_slice(&telemetry_frames(6..=6));
    dev.send_raw(&b).await;
    let seen = dev.until_ack(6).await;
    assert!(
        seen.iter().all(|m| matches!(m, Message::Ack { .. })),
        "{seen:?}"
    );
    // 5 again after it was ACKed, then 7.
    dev.send(&telemetry_msg(5, 1, b"{\"third\":true}")).await;
    dev.telemetry(7, "7").await;
    let seen = dev.until_ack(7).await;
    assert!(
        seen.iter().all(|m| matches!(m, Message::Ack { .. })),
        "{seen:?}"
    );
    assert_seqs(&stored_seqs(&gw.db_path(), "dups"), 1..=7, "stored");
    // The original payload of 5 is kept.
    let (_, _, _, p) = stored_row(&gw.db_path(), "dups", 5).unwrap();
    assert_eq!(p, json_payload(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seq_below_the_highest_taken_is_a_duplicate_even_in_a_gap() {
    let gw = TestGateway::start().await;
    let token = gw.add_device("gappy").await;
    let (mut dev, _) = gw.connect_device("gappy", &token).await;
    dev.telemetry_batch([1, 5, 100]).await;
    dev.until_ack(100).await;
    // 50 was never stored, but it is below the highest seq taken (100).
    dev.telemetry_batch([50, 101]).await;
    dev.until_ack(101).await;
    assert_seqs(
        &stored_seqs(&gw.db_path(), "gappy"),
        [1, 5, 100, 101],
        "gaps are allowed; a seq below the watermark is not stored",
    );
    drop(dev);
    let mut dev = RawDevice::connect(gw.addr()).await;
    assert_eq!(dev.hello("gappy", &token, 0).await.last_seq, 101);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seqs_above_i64_max_are_ordered_as_u64() {
    let gw = TestGateway::start().await;
    let token = gw.add_device("huge").await;
    let (mut dev, _) = gw.connect_device("huge", &token).await;
    let big = u64::MAX - 1;
    let mid = i64::MAX as u64 + 10;
    dev.telemetry_batch([7, mid, big]).await;
    dev.until_ack(big).await;
    // A seq between them is now a duplicate.
    dev.telemetry_batch([mid + 1, u64::MAX]).await;
    dev.until_ack(u64::MAX).await;
    assert_seqs(
        &stored_seqs(&gw.db_path(), "huge"),
        [7, mid, big, u64::MAX],
        "stored",
    );
    drop(dev);
    let mut dev = RawDevice::connect(gw.addr()).await;
    assert_eq!(dev.hello("huge", &token, 0).await.last_seq, u64::MAX);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_content_type_and_timestamps_are_stored() {
    let gw = TestGateway::start().await;
    let token = gw.add_device("exact").await;
    let (mut dev, _) = gw.connect_device("exact", &token).await;
    let cases: Vec<(u64, u64, u8, Vec<u8>)> = vec![
        (1, 1_763_683_200_123, 1, b"{\"t\":21.5}".to_vec()),
        (2, 42, 0, vec![0, 0xFF, 0x80, 7]),
        (3, 1_000, 2, vec![0xa1, 0x61, 0x61, 0x01]),
        (4, 5, 3, "gr\u{fc}\u{df}e".as_bytes().to_vec()),
        (5, 0, 1, b"[1,2,3]".to_vec()),
        (6, 9, 0, Vec::new()),
    ];
    let before = now_ms();
    for (seq, ts, ct, payload) in &cases {
        dev.send(&Message::Telemetry(furrow_proto::Telemetry {
            seq: *seq,
            timestamp_ms: *ts,
            content_type: *ct,
            payload: payload.clone().into(),
        }))
        .await;
    }
    let seen = dev.until_ack(6).await;
    assert!(
        seen.iter().all(|m| matches!(m, Message::Ack { .. })),
        "{seen:?}"
    );
    let after = now_ms();
    for (seq, ts, ct, payload) in &cases {
        let (sts, rcv, sct, sp) = stored_row(&gw.db_path(), "exact", *seq).expect("stored");
        assert_eq!(sct, *ct, "content type of {seq}");
        assert_eq!(&sp, payload, "payload of {seq}");
        assert!(
            rcv >= before && rcv <= after,
            "received_ms of {seq}: {rcv} not in [{before}, {after}]"
        );
        if *ts == 0 {
            assert_eq!(sts, rcv, "timestamp 0 is replaced by the receive time");
        } else {
            assert_eq!(sts, *ts, "timestamp of {seq}");
        }
    }
}

/// TELEMETRY with a raw content type and payload.
fn tel(seq: u64, ct: u8, payload: &[u8]) -> Vec<u8> {
    encode(&telemetry_msg(seq, ct, payload))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_then_the_session_goes_on() {
    let gw = TestGateway::start().await;
    let token = gw.add_device("picky").await;
    let (mut dev, _) = gw.connect_device("picky", &token).await;
    let mut b = Vec::new();
    b.extend(tel(1, 1, b"{\"ok\":1}"));
    b.extend(tel(2, 1, b"{\"unterminated\":")); // invalid JSON
    b.extend(tel(3, 2, &[0x83, 0x01])); // CBOR array of 3 with 1 item
    b.extend(tel(4, 3, &[b'o', b'k', 0xFF])); // invalid UTF-8
    b.extend(tel(5, 9, b"{}")); // unsupported content type
    b.extend(tel(6, 1, b"NaN")); // NaN is not JSON
    b.extend(tel(7, 2, &[0x00, 0x00])); // two CBOR items
    b.extend(tel(8, 1, b"{\"ok\":8}"));
    b.extend(tel(9, 255, b"")); // unsupported content type
    b.extend(tel(10, 3, "fine".as_bytes()));
    dev.send_raw(&b).await;
    let expected_rejects = [
        (2u64, 20u16),
        (3, 20),
        (4, 20),
        (5, 21),
        (6, 20),
        (7, 20),
        (9, 21),
    ];
    let mut rejects = Vec::new();
    let mut last_ack = 0;
    loop {
        match dev.recv().await {
            Some(Message::Reject(r)) => {
                assert!(
                    r.seq > last_ack,
                    "REJECT {} arrived after ACK {last_ack} which covers it",
                    r.seq
                );
                assert!(!r.reason.is_empty(), "REJECT {} has no reason", r.seq);
                rejects.push((r.seq, r.code));
            }
            Some(Message::Ack { seq }) => {
                assert!(seq > last_ack);
                last_ack = seq;
                if seq == 10 {
                    break;
                }
            }
            other => panic!("expected REJECT or ACK, got {other:?}"),
        }
    }
    assert_eq!(rejects, expected_rejects, "REJECTs (seq, code)");
    assert_seqs(
        &stored_seqs(&gw.db_path(), "picky"),
        [1, 8, 10],
        "rejected seqs are not stored",
    );

    // Resending rejected seqs (now with valid payloads, or still invalid):
    // duplicates, so ACKed without validation, never stored; then new data.
    let mut b = Vec::new();
    b.extend(tel(3, 1, b"{\"now\":\"valid\"}"));
    b.extend(tel(2, 1, b"{still invalid"));
    b.extend(tel(5, 77, b"x"));
    b.extend(tel(11, 1, b"11"));
    dev.send_raw(&b).await;
    let seen = dev.until_ack(11).await;
    assert!(
        seen.iter().all(|m| matches!(m, Message::Ack { .. })),
        "resent rejected seqs must not be re-validated: {seen:?}"
    );
    assert_seqs(
        &stored_seqs(&gw.db_path(), "picky"),
        [1, 8, 10, 11],
        "after resending rejected seqs",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_alone_is_followed_by_its_ack_at_once() {
    // "sends one as soon as a REJECT leaves nothing before it uncommitted"
    let gw = TestGateway::start().await;
    let token = gw.add_device("lonely").await;
    let (mut dev, _) = gw.connect_device("lonely", &token).await;
    dev.send_raw(&tel(1, 42, b"?")).await;
    match dev.recv().await {
        Some(Message::Reject(r)) => {
            assert_eq!((r.seq, r.code), (1, code::UNSUPPORTED_CONTENT_TYPE))
        }
        other => panic!("expected REJECT 1, got {other:?}"),
    }
    match dev.recv_within(Duration::from_secs(2)).await {
        Some(Message::Ack { seq: 1 }) => {}
        other => panic!("expected ACK 1 right after REJECT 1, got {other:?}"),
    }
    assert!(stored_seqs(&gw.db_path(), "lonely").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_seq_stays_taken_after_reconnect() {
    // "The gateway has taken a seq once it has read and handled a TELEMETRY
    // with it on any connection: stored it, begun storing it, or rejected
    // it." A rejected seq resent on a later connection is a duplicate.
    let gw = TestGateway::start().await;
    let token = gw.add_device("rejected-reconnect").await;
    let (mut dev, w) = gw.connect_device("rejected-reconnect", &token).await;
    assert_eq!(w.last_seq, 0);
    let mut b = telemetry_frames(1..=2).to_vec();
    b.extend(tel(3, 1, b"{broken"));
    dev.send_raw(&b).await;
    let seen = dev.until_ack(3).await;
    assert!(seen
        .iter()
        .any(|m| matches!(m, Message::Reject(r) if r.seq == 3)));
    drop(dev);
    // The first session is over (not taken over: a takeover would inherit
    // its watermarks).
    gw.wait_offline("rejected-reconnect").await;

    let mut dev = RawDevice::connect(gw.addr()).await;
    let w = dev.hello("rejected-reconnect", &token, 0).await;
    assert_eq!(w.last_seq, 2, "last_seq is the highest *stored* seq");
    // A device that did not see the REJECT resends 3, valid this time.
    dev.send_raw(&tel(3, 1, b"{\"fixed\":true}")).await;
    dev.telemetry(4, "4").await;
    let seen = dev.until_ack(4).await;
    assert!(
        seen.iter().all(|m| matches!(m, Message::Ack { .. })),
        "{seen:?}"
    );
    assert_seqs(
        &stored_seqs(&gw.db_path(), "rejected-reconnect"),
        [1, 2, 4],
        "seq 3 was rejected for good on the first connection; storing it \
         later breaks the duplicate rule",
    );
}
