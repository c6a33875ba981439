//! Graceful shutdown (docs/protocol.md, "Closing"): stop accepting, store
//! and ACK everything read, GOODBYE SERVER_SHUTDOWN to every connection
//! (including those still in their handshake), close; all bounded in time.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use furrow_proto::Message;
use support::*;
use tokio::net::TcpStream;

/// What a streaming device saw until the gateway closed it.
#[derive(Debug)]
struct Outcome {
    last_ack: u64,
    acks: usize,
    goodbye: Option<furrow_proto::Goodbye>,
    /// How the connection ended after the GOODBYE.
    end: String,
    /// Anything unexpected.
    unexpected: Vec<String>,
}

async fn read_until_closed(mut rd: DeviceReader, progress: Arc<AtomicU64>) -> Outcome {
    let mut o = Outcome {
        last_ack: 0,
        acks: 0,
        goodbye: None,
        end: String::new(),
        unexpected: Vec::new(),
    };
    loop {
        match rd.next_event(Duration::from_secs(20)).await {
            Event::Msg(Message::Ack { seq }) => {
                if o.goodbye.is_some() {
                    o.unexpected.push(format!("ACK {seq} after GOODBYE"));
                }
                if seq <= o.last_ack {
                    o.unexpected
                        .push(format!("ACK went backwards: {} then {seq}", o.last_ack));
                }
                o.last_ack = seq;
                o.acks += 1;
                progress.store(seq, Ordering::Release);
            }
            Event::Msg(Message::Goodbye(g)) => {
                if o.goodbye.is_some() {
                    o.unexpected.push("second GOODBYE".into());
                }
                o.goodbye = Some(g);
            }
            Event::Msg(other) => o.unexpected.push(format!("{other:?}")),
            Event::Eof => {
                o.end = "eof".into();
                return o;
            }
            Event::Reset(kind) => {
                o.end = format!("reset ({kind:?})");
                return o;
            }
            Event::Timeout => {
                o.end = "timeout".into();
                return o;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_while_devices_stream_acks_everything_read_then_goodbye() {
    const DEVICES: usize = 20;
    let mut gw = TestGateway::start_with(|c| {
        c.limits.max_inflight = 64;
        c.shutdown.drain_timeout_ms = 5_000;
        c.shutdown.retry_after_max_ms = 3_000;
    })
    .await;
    let addr = gw.addr();

    let mut streams = Vec::new();
    for i in 0..DEVICES {
        let id = format!("streamer-{i:02}");
        let token = gw.add_device(&id).await;
        let (dev, w) = gw.connect_device(&id, &token).await;
        assert_eq!(w.last_seq, 0);
        let (rd, mut wr) = dev.split();
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(AtomicU64::new(0));
        let stop_w = Arc::clone(&stop);
        let writer = tokio::spawn(async move {
            let mut next = 1u64;
            // The highest seq handed to the socket (a failed write may
            // still have delivered part of its frames).
            let mut attempted = 0;
            while !stop_w.load(Ordering::Acquire) {
                let frames = telemetry_frames(next..next + 8);
                attempted = next + 7;
                if wr.send_raw(&frames).await.is_err() {
                    break;
                }
                next += 8;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            // Keep the write half open until told to stop: dropping it would
            // close the device's side before the gateway's GOODBYE.
            while !stop_w.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            drop(wr);
            attempted
        });
        let reader = tokio::spawn(read_until_closed(rd, Arc::clone(&progress)));
        streams.push((id, stop, progress, writer, reader));
    }

    // Connections still in their handshake: one silent, one with half a HELLO.
    let mut silent = RawDevice::connect(addr).await;
    let mut half = RawDevice::connect(addr).await;
    let hello = encode(&hello_msg("streamer-00", "x", 0));
    half.send_raw(&hello[..hello.len() / 2]).await;

    // Every device is streaming and getting ACKs.
    within(Duration::from_secs(15), "all devices get ACKs", async {
        for (_, _, progress, _, _) in &streams {
            while progress.load(Ordering::Acquire) < 100 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    })
    .await;

    let took = gw.shutdown().await;
    assert!(
        took < Duration::from_secs(5),
        "shutdown took {took:?} with a 5 s drain limit and well-behaved devices"
    );

    // No new connections after shutdown.
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the listener still accepts after shutdown"
    );

    // Handshake connections got GOODBYE SERVER_SHUTDOWN too.
    for (name, dev) in [("silent", &mut silent), ("half HELLO", &mut half)] {
        match dev.recv().await {
            Some(Message::Goodbye(g)) => {
                assert_eq!(g.code, goodbye::SERVER_SHUTDOWN, "{name}");
                assert!(g.retry_after_ms <= 3_000, "{name}: retry_after_ms");
            }
            other => panic!("{name} connection in handshake: expected GOODBYE, got {other:?}"),
        }
        dev.reader.expect_closed().await;
    }

    let db = open_db(&gw.db_path());
    let mut failures = Vec::new();
    for (id, stop, _, writer, reader) in streams {
        let o = within(Duration::from_secs(25), "device reader", reader)
            .await
            .unwrap();
        stop.store(true, Ordering::Release);
        let sent = within(Duration::from_secs(10), "device writer", writer)
            .await
            .unwrap();
        let stored = stored_seqs_in(&db, &id);
        let k = stored.len() as u64;
        let prefix = stored.iter().copied().eq(1..=k);
        let mut problems = o.unexpected.clone();
        match o.goodbye {
            Some(g) if g.code == goodbye::SERVER_SHUTDOWN => {
                if g.retry_after_ms > 3_000 {
                    problems.push(format!("retry_after_ms {} above 3000", g.retry_after_ms));
                }
            }
            Some(g) => problems.push(format!("GOODBYE code {}", g.code)),
            None => problems.push("no GOODBYE".into()),
        }
        if o.end != "eof" {
            problems.push(format!("connection ended by {} instead of a close", o.end));
        }
        if !prefix {
            problems.push(format!(
                "stored seqs are not 1..=k ({} rows, max {:?})",
                k,
                stored.last()
            ));
        }
        if k < o.last_ack {
            problems.push(format!("ACKed {} but stored only {k}", o.last_ack));
        }
        if k > o.last_ack {
            problems.push(format!(
                "stored {k} but the last ACK was {}: read and stored, never ACKed",
                o.last_ack
            ));
        }
        if k > sent {
            problems.push(format!("stored {k} but sent only {sent}"));
        }
        eprintln!(
            "{id}: sent {sent}, {} ACKs, last ACK {}, stored {k}, end {}",
            o.acks, o.last_ack, o.end
        );
        if !problems.is_empty() {
            failures.push(format!("{id}: {}", problems.join("; ")));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_idle_devices_and_handshakes_is_quick() {
    let mut gw = TestGateway::start().await;
    let mut devs = Vec::new();
    for i in 0..5 {
        let id = format!("idle-{i}");
        let token = gw.add_device(&id).await;
        let (mut dev, _) = gw.connect_device(&id, &token).await;
        dev.telemetry_batch(1..=3).await;
        dev.until_ack(3).await;
        devs.push(dev);
    }
    let mut waiting = Vec::new();
    for _ in 0..5 {
        waiting.push(RawDevice::connect(gw.addr()).await);
    }
    // Let the gateway accept them all.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let took = gw.shutdown().await;
    assert!(took < Duration::from_secs(2), "shutdown took {took:?}");
    for dev in devs.iter_mut().chain(waiting.iter_mut()) {
        let (g, acks) = dev.expect_goodbye(goodbye::SERVER_SHUTDOWN).await;
        assert!(acks.is_empty(), "nothing new to ACK: {acks:?}");
        assert!(g.retry_after_ms <= 5_000);
        dev.expect_eof().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_bounded_with_a_device_that_never_reads() {
    init_test_logs();
    let mut gw = TestGateway::start_with(|c| {
        c.limits.max_unsent_bytes = 1024;
        c.limits.max_inflight = 4;
        c.shutdown.drain_timeout_ms = 2_000;
    })
    .await;
    let token = gw.add_device("deaf").await;
    // A tiny receive buffer so that the gateway's ACKs back up.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(2048).unwrap();
    let stream = sock.connect(gw.addr()).await.unwrap();
    let mut dev = RawDevice::from_stream(stream);
    dev.hello("deaf", &token, 0).await;
    let (mut rd, mut wr) = dev.split();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_w = Arc::clone(&stop);
    let writer = tokio::spawn(async move {
        let mut next = 1u64;
        // Writes until told to stop or the gateway closes; a write blocked
        // because the gateway stopped reading ends when it closes.
        while !stop_w.load(Ordering::Acquire) {
            if wr
                .send_raw(&telemetry_frames(next..next + 32))
                .await
                .is_err()
            {
                break;
            }
            next += 32;
        }
        wr
    });
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let took = gw.shutdown().await;
    stop.store(true, Ordering::Release);
    assert!(
        took < Duration::from_secs(4),
        "shutdown took {took:?} (drain limit 2 s) with a device that never reads"
    );
    // The gateway closed the connection: reading what it sent (ACKs backed
    // up behind the tiny buffer, perhaps GOODBYE, perhaps cut off: the flush
    // to a device that does not read is best effort) ends in the close. Not
    // judged by the blocked write: that learns of the close only when the
    // device's zero-window probe, which backs off, next reaches the socket.
    assert!(
        rd.until_closed(Duration::from_secs(5)).await,
        "the gateway did not close the connection within 5 s"
    );
    writer.abort();
    // Whatever was stored is a prefix (nothing lost in the middle, nothing
    // stored twice).
    let stored = stored_seqs(&gw.db_path(), "deaf");
    let k = stored.len() as u64;
    assert_seqs(&stored, 1..=k, "stored prefix");
}

/// Rolling restarts: when a gateway stops, its devices must not all come
/// back at the same instant (to the next instance, or to this one once it
/// is up). Each GOODBYE SERVER_SHUTDOWN carries its own random
/// `retry_after_ms` in `[0, shutdown.retry_after_max_ms]`: spread, not one
/// value for all, and never above the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goodbye_retry_after_is_jittered_within_its_bound() {
    const DEVICES: usize = 40;
    const MAX: u32 = 4_000;
    let mut gw = TestGateway::start_with(|c| c.shutdown.retry_after_max_ms = MAX).await;
    let mut devs = Vec::new();
    for i in 0..DEVICES {
        let id = format!("rolling-{i:02}");
        let token = gw.add_device(&id).await;
        let (dev, _) = gw.connect_device(&id, &token).await;
        devs.push(dev);
    }
    gw.shutdown().await;
    let mut delays = Vec::new();
    for dev in &mut devs {
        let (g, _) = dev.expect_goodbye(goodbye::SERVER_SHUTDOWN).await;
        delays.push(g.retry_after_ms);
    }
    delays.sort_unstable();
    assert!(
        delays.iter().all(|&d| d <= MAX),
        "above the bound: {delays:?}"
    );
    let mut distinct = delays.clone();
    distinct.dedup();
    // Uniform draws: 40 of them from 4001 values are all distinct with
    // probability ~0.82, and fewer than 30 distinct is astronomically
    // unlikely; likewise all 40 within half the range (~1e-11).
    assert!(distinct.len() >= 30, "too few distinct delays: {delays:?}");
    let spread = delays[DEVICES - 1] - delays[0];
    assert!(spread >= MAX / 2, "delays bunched together: {delays:?}");
}
