//! Flow control and backpressure (docs/protocol.md, "Telemetry and
//! acknowledgement", "Keepalive"): a device that sends more than
//! `max_inflight` is slowed, not cut off; the gateway stops reading its
//! socket and never buffers without bound; time spent not reading does not
//! count against the keepalive.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use furrow_proto::Message;
use support::*;
use tokio::time::Instant;

/// Wire size of the frames `telemetry_frames` builds for `first..=last`
/// (payloads hold the seq, so sizes grow with its digits).
fn frames_len(first: u64, last: u64) -> usize {
    telemetry_frames(first..=last).len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_over_max_inflight_is_slowed_not_cut_off() {
    const N: u64 = 5_000;
    let gw = TestGateway::start_with(|c| {
        c.limits.max_inflight = 8;
        c.storage.synchronous = furrow::store::Synchronous::Normal;
    })
    .await;
    let token = gw.add_device("firehose").await;
    let (dev, w) = gw.connect_device("firehose", &token).await;
    assert_eq!(w.max_inflight, 8);
    let (mut rd, mut wr) = dev.split();
    // 5,000 TELEMETRY at once, 625 times the window, without reading.
    let writer = tokio::spawn(async move {
        for start in (1..=N).step_by(500) {
            wr.send_raw(&telemetry_frames(start..start + 500))
                .await
                .expect("the gateway must not cut the device off");
        }
        wr
    });
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    // Now read: everything gets ACKed, in order, and nothing else arrives.
    let mut last = 0;
    let started = Instant::now();
    while last < N {
        match rd.next_event(Duration::from_secs(10)).await {
            Event::Msg(Message::Ack { seq }) => {
                assert!(seq > last, "ACK went backwards: {last} then {seq}");
                last = seq;
            }
            Event::Timeout => panic!(
                "ACKs stopped at {last} of {N}: nothing from the gateway for 10 s while \
                 {} TELEMETRY it has been sent are unacknowledged",
                N - last
            ),
            other => panic!("after ACK {last}: expected ACK, got {other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "ACKs stalled at {last}"
        );
    }
    let mut wr = within(Duration::from_secs(10), "writer", writer)
        .await
        .unwrap();
    assert_seqs(
        &stored_seqs_async(&gw.db_path(), "firehose").await,
        1..=N,
        "after the firehose",
    );
    // Still connected.
    wr.send(&Message::Ping { nonce: 3 }).await.unwrap();
    match rd.recv().await {
        Some(Message::Pong { nonce: 3 }) => {}
        other => panic!("expected PONG, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_stops_reading_instead_of_buffering_a_fast_device() {
    // The device floods far past max_inflight (it does read its ACKs, so
    // the only limit is max_inflight). The bytes it managed to write minus
    // the bytes the gateway has handled (known from the ACKs) is what sits
    // in buffers: the kernel's (bounded by tcp_rmem/tcp_wmem maxima) plus
    // the gateway's own, which must stay about one read chunk.
    let gw = TestGateway::start_with(|c| {
        c.limits.max_inflight = 8;
        c.storage.synchronous = furrow::store::Synchronous::Normal;
    })
    .await;
    let token = gw.add_device("flood").await;
    let (dev, _) = gw.connect_device("flood", &token).await;
    let (mut rd, mut wr) = dev.split();

    let kernel_max = |path: &str| -> u64 {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.split_whitespace().last()?.parse().ok())
            .unwrap_or(32 << 20)
    };
    let kernel =
        kernel_max("/proc/sys/net/ipv4/tcp_rmem") + kernel_max("/proc/sys/net/ipv4/tcp_wmem");
    // Kernel buffers on both ends plus 4 MiB for the gateway itself.
    let limit = kernel + (4 << 20);

    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let acked_r = Arc::clone(&acked);
    let stop_r = Arc::clone(&stop);
    let reader = tokio::spawn(async move {
        while !stop_r.load(Ordering::Acquire) {
            match rd.next_event(Duration::from_millis(200)).await {
                Event::Msg(Message::Ack { seq }) => acked_r.store(seq, Ordering::Release),
                Event::Timeout => {}
                other => panic!("flooding device: unexpected {other:?}"),
            }
        }
    });

    const CHUNK: u64 = 1_000;
    let chunk_bytes = frames_len(1_000_000, 1_000_000 + CHUNK - 1) as u64;
    let mut next = 1u64;
    let mut written = 0u64;
    let mut worst = 0u64;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(6) {
        let frames = telemetry_frames(next..next + CHUNK);
        match tokio::time::timeout(Duration::from_millis(500), wr.send_raw(&frames)).await {
            Ok(r) => r.expect("write"),
            // Blocked for half a second: the gateway stopped reading, as it
            // should. The write was dropped mid-frame, so the stream is no
            // longer framed: stop measuring here.
            Err(_) => break,
        }
        next += CHUNK;
        written += frames.len() as u64;
        let handled = acked.load(Ordering::Acquire) * chunk_bytes / CHUNK;
        let backlog = written.saturating_sub(handled);
        worst = worst.max(backlog);
        if backlog > limit {
            break;
        }
    }
    stop.store(true, Ordering::Release);
    let _ = reader.await;
    eprintln!(
        "wrote {} MiB in {:?}; ACKed up to {}; worst backlog {} MiB (limit {} MiB)",
        written >> 20,
        started.elapsed(),
        acked.load(Ordering::Acquire),
        worst >> 20,
        limit >> 20
    );
    assert!(
        worst <= limit,
        "the device wrote {written} bytes but the gateway had handled only the frames up to \
         ACK {}: {worst} bytes waited in buffers, more than the kernel can hold ({kernel}): \
         the gateway kept reading past max_inflight and buffered without bound",
        acked.load(Ordering::Acquire)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_time_does_not_count_against_the_keepalive() {
    init_test_logs();
    // Keepalive 1 s (timeout 1.5 s). The device streams without reading its
    // ACKs for 3 s, through a tiny receive buffer: the gateway's unsent ACKs
    // reach max_unsent_bytes and it stops reading. That pause must not end
    // in KEEPALIVE_TIMEOUT.
    let gw = TestGateway::start_with(|c| {
        c.keepalive.min_s = 1;
        c.keepalive.default_s = 1;
        c.limits.max_inflight = 1;
        c.limits.max_unsent_bytes = 1024;
        c.storage.synchronous = furrow::store::Synchronous::Normal;
    })
    .await;
    let token = gw.add_device("stubborn").await;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stream = sock.connect(gw.addr()).await.unwrap();
    let mut dev = RawDevice::from_stream(stream);
    let w = dev.hello("stubborn", &token, 1).await;
    assert_eq!(w.keepalive_s, 1);
    let (mut rd, mut wr) = dev.split();
    let sent = Arc::new(AtomicU64::new(0));
    let sent_w = Arc::clone(&sent);
    let writer = tokio::spawn(async move {
        let mut next = 1u64;
        loop {
            if wr
                .send_raw(&telemetry_frames(next..next + 16))
                .await
                .is_err()
            {
                return;
            }
            next += 16;
            sent_w.store(next - 1, Ordering::Release);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sent_at_pause_end = sent.load(Ordering::Acquire);
    // Read for 2.5 s: ACKs only, no ERROR, no close.
    let mut last = 0;
    let until = Instant::now() + Duration::from_millis(2_500);
    while Instant::now() < until {
        match rd.next_event(Duration::from_millis(100)).await {
            Event::Msg(Message::Ack { seq }) => {
                assert!(seq > last);
                last = seq;
            }
            Event::Timeout => {}
            other => panic!(
                "after {last} ACKs and {sent_at_pause_end} sent: the gateway ended a session it \
                 was not reading: {other:?}"
            ),
        }
    }
    writer.abort();
    assert!(last > 0, "no ACK at all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_beyond_max_inflight_then_silence_is_fully_acked() {
    // 100 TELEMETRY in one write with max_inflight 8, then the device just
    // waits. Everything fits in one socket read, so after the first window
    // no new bytes arrive: the gateway must go on handling the frames it
    // already holds as ACKs free the window (keepalive 2 s, so a stall ends
    // in KEEPALIVE_TIMEOUT after 3 s instead of hanging the test).
    let gw = TestGateway::start_with(|c| {
        c.limits.max_inflight = 8;
        c.keepalive.min_s = 1;
        c.keepalive.default_s = 2;
    })
    .await;
    let token = gw.add_device("burst").await;
    let mut dev = RawDevice::connect(gw.addr()).await;
    let w = dev.hello("burst", &token, 2).await;
    assert_eq!((w.max_inflight, w.keepalive_s), (8, 2));
    dev.telemetry_batch(1..=100).await;
    let mut last = 0;
    while last < 100 {
        match dev.recv().await {
            Some(Message::Ack { seq }) => {
                assert!(seq > last);
                last = seq;
            }
            other => panic!(
                "after ACK {last} of 100 (all 100 were sent in one write): expected ACK, \
                 got {other:?}"
            ),
        }
    }
    assert_seqs(&stored_seqs(&gw.db_path(), "burst"), 1..=100, "stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_behind_hello_beyond_max_inflight_is_fully_acked() {
    // A device may send TELEMETRY right behind HELLO, before it has learnt
    // max_inflight from WELCOME.
    let gw = TestGateway::start_with(|c| {
        c.limits.max_inflight = 4;
        c.keepalive.min_s = 1;
        c.keepalive.default_s = 2;
    })
    .await;
    let token = gw.add_device("eager").await;
    let mut dev = RawDevice::connect(gw.addr()).await;
    let mut b = encode(&hello_msg("eager", &token, 2));
    b.extend_from_slice(&telemetry_frames(1..=40));
    dev.send_raw(&b).await;
    dev.expect_welcome().await;
    let mut last = 0;
    while last < 40 {
        match dev.recv().await {
            Some(Message::Ack { seq }) => last = seq,
            other => panic!("after ACK {last} of 40: expected ACK, got {other:?}"),
        }
    }
    assert_seqs(&stored_seqs(&gw.db_path(), "eager"), 1..=40, "stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_never_reads_its_acks_is_not_read_either() {
    // Each TELEMETRY is followed by PINGs, whose PONGs the gateway queues at
    // once (no commit to wait for): answers pile up quickly in the device's
    // small receive buffer, then in the gateway's send buffer, then in its
    // own output, until max_unsent_bytes. Then the gateway stops reading:
    // the device's writes block after a bounded number of bytes, and the
    // gateway handles (stores) nothing more.
    let gw = TestGateway::start_with(|c| {
        c.limits.max_unsent_bytes = 1024;
        c.storage.synchronous = furrow::store::Synchronous::Normal;
    })
    .await;
    let token = gw.add_device("deaf").await;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stream = sock.connect(gw.addr()).await.unwrap();
    let mut dev = RawDevice::from_stream(stream);
    dev.hello("deaf", &token, 0).await;
    let (_rd, mut wr) = dev.split();

    const CHUNK: u64 = 64;
    const PINGS: usize = 8;
    let mut next = 1u64;
    let mut written = 0u64;
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the device wrote {written} bytes over 30 s without blocking: \
             the gateway keeps reading a device that does not read"
        );
        let mut frames = Vec::new();
        for seq in next..next + CHUNK {
            frames.extend_from_slice(&telemetry_frames(seq..=seq));
            for _ in 0..PINGS {
                frames.extend_from_slice(&encode(&Message::Ping { nonce: seq }));
            }
        }
        match tokio::time::timeout(Duration::from_secs(2), wr.send_raw(&frames)).await {
            Ok(r) => r.expect("write"),
            // Blocked: the gateway stopped reading.
            Err(_) => break,
        }
        next += CHUNK;
        written += frames.len() as u64;
    }
    // What the gateway handled settles (the last commits land), then stays.
    let db = gw.db_path();
    let mut stored = stored_seqs_async(&db, "deaf").await.len();
    within(Duration::from_secs(10), "stored count settles", async {
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let now = stored_seqs_async(&db, "deaf").await.len();
            if now == stored {
                return;
            }
            stored = now;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let later = stored_seqs_async(&db, "deaf").await.len();
    eprintln!(
        "blocked after {written} bytes ({} readings) in {:?}; {stored} stored, then {later}",
        next - 1,
        started.elapsed()
    );
    assert_eq!(later, stored, "the gateway went on handling frames");
    assert!(stored > 0, "nothing was stored at all");
    // The rest sits in kernel buffers (bounded by tcp_rmem/tcp_wmem) and at
    // most one read in the gateway.
    let kernel_max = |path: &str| -> u64 {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.split_whitespace().last()?.parse().ok())
            .unwrap_or(32 << 20)
    };
    let kernel =
        kernel_max("/proc/sys/net/ipv4/tcp_rmem") + kernel_max("/proc/sys/net/ipv4/tcp_wmem");
    let handled = (frames_len(1, stored as u64) + 14 * PINGS * stored) as u64;
    assert!(
        written.saturating_sub(handled) <= kernel + (1 << 20),
        "{written} bytes written, {handled} handled: more waits than kernel buffers hold"
    );
}
