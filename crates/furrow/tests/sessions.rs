//! Sessions across connections (docs/protocol.md, "Session" 5 and
//! "Telemetry and acknowledgement"): resending after a reconnect, takeover by
//! a newer connection, and revocation of a connected device.

mod support;

use std::time::Duration;

use furrow_proto::Message;
use support::*;
use tokio::time::Instant;

async fn resend_after_reconnect(wait_for_release: bool) {
    let gw = TestGateway::start().await;
    let token = gw.add_device("resender").await;
    let (mut dev, w) = gw.connect_device("resender", &token).await;
    assert_eq!(w.last_seq, 0);
    dev.telemetry_batch(1..=100).await;
    dev.until_ack(100).await;
    drop(dev);
    if wait_for_release {
        gw.wait_offline("resender").await;
    }

    let mut dev = RawDevice::connect(gw.addr()).await;
    let w = dev.hello("resender", &token, 0).await;
    assert_eq!(w.last_seq, 100, "WELCOME.last_seq after ACK 100");
    // A device that lost the ACKs resends an overlapping range.
    dev.telemetry_batch(50..=150).await;
    let seen = dev.until_ack(150).await;
    assert!(
        seen.iter().all(|m| matches!(m, Message::Ack { .. })),
        "{seen:?}"
    );
    assert_seqs(
        &stored_seqs(&gw.db_path(), "resender"),
        1..=150,
        "after resending 50..=150",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_after_a_reconnect_are_acked_and_stored_once() {
    resend_after_reconnect(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_after_an_immediate_reconnect_are_acked_and_stored_once() {
    // The old session may still be closing: the reconnect then takes it over.
    resend_after_reconnect(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_telemetry_is_resent_after_welcome_last_seq() {
    // The first connection sends and vanishes without waiting for ACKs; the
    // second learns from last_seq where to resume.
    let gw = TestGateway::start().await;
    let token = gw.add_device("vanisher").await;
    let (mut dev, _) = gw.connect_device("vanisher", &token).await;
    dev.telemetry_batch(1..=500).await;
    drop(dev);
    gw.wait_offline("vanisher").await;
    let stored = stored_seqs(&gw.db_path(), "vanisher");
    let k = stored.len() as u64;
    assert_seqs(
        &stored,
        1..=k,
        "what the closed connection left is a prefix",
    );

    let mut dev = RawDevice::connect(gw.addr()).await;
    let w = dev.hello("vanisher", &token, 0).await;
    assert_eq!(w.last_seq, k, "last_seq is the highest stored seq");
    dev.telemetry_batch(w.last_seq + 1..=500).await;
    if w.last_seq < 500 {
        dev.until_ack(500).await;
    }
    assert_seqs(&stored_seqs(&gw.db_path(), "vanisher"), 1..=500, "stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_goodbyes_the_old_connection_and_keeps_what_it_read() {
    let gw = TestGateway::start().await;
    let token = gw.add_device("twin").await;
    let (mut first, _) = gw.connect_device("twin", &token).await;
    first.telemetry_batch(1..=50).await;
    first.until_ack(50).await;
    // More in flight when the second connection arrives.
    first.telemetry_batch(51..=60).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut second = RawDevice::connect(gw.addr()).await;
    let w2 = second.hello("twin", &token, 0).await;

    // The first gets its remaining ACKs, then GOODBYE SESSION_TAKEN_OVER,
    // then the gateway closes it.
    let (g, acks) = first.expect_goodbye(goodbye::SESSION_TAKEN_OVER).await;
    assert_eq!(g.retry_after_ms, 0);
    first.reader.expect_closed().await;
    let last_ack_first = acks.last().copied().unwrap_or(50);
    assert!(acks.windows(2).all(|p| p[0] < p[1]), "{acks:?}");
    assert_eq!(
        last_ack_first, 60,
        "the 10 frames sent 200 ms before the takeover were read; they must be stored and ACKed"
    );
    assert_eq!(
        w2.last_seq, last_ack_first,
        "the new WELCOME.last_seq must include everything the old connection had stored"
    );
    assert_seqs(
        &stored_seqs(&gw.db_path(), "twin"),
        1..=w2.last_seq,
        "after the takeover",
    );

    // The second connection works.
    second.telemetry_batch(w2.last_seq + 1..=100).await;
    second.until_ack(100).await;
    second.ping(1).await;
    assert_seqs(&stored_seqs(&gw.db_path(), "twin"), 1..=100, "stored");
    assert!(gw.registry().is_online("twin"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_while_the_old_connection_streams() {
    // The old connection is busy streaming (and reading its ACKs) when the
    // new one arrives: everything it got ACKed is stored, the stored set is
    // a prefix, and the new WELCOME.last_seq covers it.
    let gw = TestGateway::start().await;
    let token = gw.add_device("busy-twin").await;
    let (first, w) = gw.connect_device("busy-twin", &token).await;
    let window = u64::from(w.max_inflight);
    let (mut rd, mut wr) = first.split();
    let writer = tokio::spawn(async move {
        let mut next = 1u64;
        loop {
            let frames = telemetry_frames(next..next + 16);
            if wr.send_raw(&frames).await.is_err() {
                break;
            }
            next += 16;
            if next > 10 * window {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            if next > 100_000 {
                break;
            }
        }
        (wr, next)
    });
    let reader = tokio::spawn(async move {
        let mut last = 0;
        loop {
            match rd.recv().await {
                Some(Message::Ack { seq }) => {
                    assert!(seq > last);
                    last = seq;
                }
                Some(Message::Goodbye(g)) => {
                    assert_eq!(g.code, goodbye::SESSION_TAKEN_OVER);
                    rd.expect_closed().await;
                    return last;
                }
                other => panic!("old connection: unexpected {other:?}"),
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut second = RawDevice::connect(gw.addr()).await;
    let w2 = second.hello("busy-twin", &token, 0).await;
    let last_ack_first = within(Duration::from_secs(10), "old connection ends", reader)
        .await
        .unwrap();
    let _ = within(Duration::from_secs(10), "old writer stops", writer).await;
    assert!(last_ack_first > 0, "the old connection got ACKs");
    assert!(
        w2.last_seq >= last_ack_first,
        "WELCOME.last_seq {} below the old connection's last ACK {last_ack_first}",
        w2.last_seq
    );
    let stored = stored_seqs(&gw.db_path(), "busy-twin");
    assert_seqs(&stored, 1..=w2.last_seq, "a prefix up to last_seq");
    assert_eq!(
        w2.last_seq, last_ack_first,
        "the old session stored {} but ACKed only up to {last_ack_first}",
        w2.last_seq
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newest_of_three_connections_wins() {
    let gw = TestGateway::start().await;
    let token = gw.add_device("triplet").await;
    let (mut a, _) = gw.connect_device("triplet", &token).await;
    a.telemetry_batch(1..=10).await;
    a.until_ack(10).await;
    let (mut b, wb) = gw.connect_device("triplet", &token).await;
    assert_eq!(wb.last_seq, 10);
    a.expect_goodbye(goodbye::SESSION_TAKEN_OVER).await;
    a.reader.expect_closed().await;
    b.telemetry_batch(11..=20).await;
    b.until_ack(20).await;
    let (mut c, wc) = gw.connect_device("triplet", &token).await;
    assert_eq!(wc.last_seq, 20);
    b.expect_goodbye(goodbye::SESSION_TAKEN_OVER).await;
    b.reader.expect_closed().await;
    c.telemetry_batch(21..=30).await;
    c.until_ack(30).await;
    assert_seqs(&stored_seqs(&gw.db_path(), "triplet"), 1..=30, "stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_connected_device_gets_goodbye_then_auth_failed() {
    let gw = TestGateway::start_with(|c| c.sessions.revocation_poll_ms = 100).await;
    let token = gw.add_device("rogue").await;
    let other_token = gw.add_device("honest").await;
    let (mut dev, _) = gw.connect_device("rogue", &token).await;
    let (mut honest, _) = gw.connect_device("honest", &other_token).await;
    dev.telemetry_batch(1..=20).await;
    dev.until_ack(20).await;
    // Some more in flight when the revocation lands.
    dev.telemetry_batch(21..=25).await;

    let revoked_at = Instant::now();
    assert!(gw.store().revoke_device("rogue").await.unwrap());
    let (g, acks) = dev.expect_goodbye(goodbye::DEVICE_REVOKED).await;
    let took = revoked_at.elapsed();
    assert_eq!(g.code, goodbye::DEVICE_REVOKED);
    assert!(
        took < Duration::from_secs(3),
        "GOODBYE DEVICE_REVOKED {took:?} after the revocation (poll every 100 ms)"
    );
    dev.reader.expect_closed().await;
    // What was ACKed is stored, nothing more.
    let last = acks.last().copied().unwrap_or(20);
    assert_seqs(
        &stored_seqs(&gw.db_path(), "rogue"),
        1..=last,
        "stored up to the last ACK",
    );

    // Reconnecting fails authentication.
    let mut again = RawDevice::connect(gw.addr()).await;
    again.send(&hello_msg("rogue", &token, 0)).await;
    again.expect_error(code::AUTH_FAILED).await;

    // Other devices are untouched.
    honest.telemetry(1, "1").await;
    honest.until_ack(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_closed_device_still_gets_its_acks() {
    // The device sends, then shuts down its sending side and keeps reading:
    // the gateway stores what it read and ACKs it before closing.
    let gw = TestGateway::start().await;
    let token = gw.add_device("half").await;
    let (mut dev, _) = gw.connect_device("half", &token).await;
    dev.telemetry_batch(1..=50).await;
    let (mut reader, mut writer) = dev.split();
    writer.shutdown().await.unwrap();
    let mut last = 0;
    loop {
        match reader.next_event(RECV_TIMEOUT).await {
            Event::Msg(Message::Ack { seq }) => {
                assert!(seq > last);
                last = seq;
            }
            Event::Eof => break,
            other => panic!("after ACK {last}: expected ACK or EOF, got {other:?}"),
        }
    }
    assert_eq!(last, 50, "the last ACK before the gateway closed");
    assert_seqs(&stored_seqs(&gw.db_path(), "half"), 1..=50, "stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_gateway_knows_last_seq_and_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_path_buf();
    let mut gw = TestGateway::start_with(|c| c.data_dir = data.clone()).await;
    let token = gw.add_device("survivor").await;
    let (mut dev, _) = gw.connect_device("survivor", &token).await;
    dev.telemetry_batch(1..=30).await;
    dev.until_ack(30).await;
    gw.shutdown().await;
    // Its store, which holds the database's lock file, goes with it (as at
    // a process exit), so that the next gateway can take the database.
    drop(gw);
    dev.expect_goodbye(goodbye::SERVER_SHUTDOWN).await;
    dev.expect_eof().await;

    let gw = TestGateway::start_with(|c| c.data_dir = data.clone()).await;
    let mut dev = RawDevice::connect(gw.addr()).await;
    let w = dev.hello("survivor", &token, 0).await;
    assert_eq!(w.last_seq, 30, "last_seq survives a restart");
    dev.telemetry_batch(20..=40).await;
    let seen = dev.until_ack(40).await;
    assert!(
        seen.iter().all(|m| matches!(m, Message::Ack { .. })),
        "{seen:?}"
    );
    assert_seqs(&stored_seqs(&gw.db_path(), "survivor"), 1..=40, "stored");
}
