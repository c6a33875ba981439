//! `steady` mode: every device sends at a fixed rate, never beyond
//! WELCOME's max_inflight, and each reading is timed from its send to the
//! ACK that covers it. Latency below saturation, where flat-out mode can
//! only show queueing.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use bytes::BytesMut;
use furrow_proto::message::encode_telemetry;
use furrow_proto::{FrameDecoder, Message};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{connect, json_payload, latency, merge, new_hist, provision, Common, FlatStats};

/// Seqs sent and not yet ACKed, with their send times.
type Sent = Arc<Mutex<VecDeque<(u64, Instant)>>>;

/// A phase in [0, 1) from the device id: starts spread, reproducibly.
fn phase(id: &str) -> f64 {
    let h = id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    (h % 10_000) as f64 / 10_000.0
}

async fn device(
    addr: SocketAddr,
    id: String,
    token: String,
    period: Duration,
    payload: Arc<Vec<u8>>,
    stats: Arc<FlatStats>,
) -> anyhow::Result<Histogram<u64>> {
    let dev = connect(addr, &id, &token).await?;
    let window = dev.max_inflight;
    let mut rbuf = dev.rbuf;
    let (mut rd, mut wr) = dev.stream.into_split();
    let sent: Sent = Arc::default();
    let sent_w = Arc::clone(&sent);
    let stats_w = Arc::clone(&stats);
    let writer = tokio::spawn(async move {
        tokio::time::sleep(period.mul_f64(phase(&id))).await;
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut seq = 1u64;
        let mut buf = BytesMut::with_capacity(256);
        while !stats_w.stop.load(Ordering::Relaxed) {
            tick.tick().await;
            let full = sent_w.lock().map_or(true, |q| q.len() >= window);
            if full {
                continue; // at max_inflight: this tick is not sent
            }
            buf.clear();
            encode_telemetry(seq, 0, 1, &payload, &mut buf)?;
            if let Ok(mut q) = sent_w.lock() {
                q.push_back((seq, Instant::now()));
            }
            wr.write_all(&buf).await?;
            seq += 1;
        }
        Ok::<_, anyhow::Error>(())
    });
    let mut hist = new_hist()?;
    let dec = FrameDecoder::default();
    while !stats.stop.load(Ordering::Relaxed) {
        rbuf.reserve(4096);
        match tokio::time::timeout(Duration::from_millis(200), rd.read_buf(&mut rbuf)).await {
            Err(_) => continue,
            Ok(Ok(0)) => bail!("gateway closed the connection"),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.into()),
        }
        let now = Instant::now();
        let measuring = stats.measuring.load(Ordering::Relaxed);
        while let Some(f) = dec.decode(&mut rbuf)? {
            let Message::Ack { seq } = Message::from_frame(f)? else {
                continue;
            };
            let mut acked = 0;
            if let Ok(mut q) = sent.lock() {
                while let Some((_, t)) = q.front().copied().filter(|(s, _)| *s <= seq) {
                    q.pop_front();
                    if measuring {
                        let us = now.duration_since(t).as_micros() as u64;
                        hist.saturating_record(us.max(1));
                    }
                    acked += 1;
                }
            }
            if measuring {
                stats.acked.fetch_add(acked, Ordering::Relaxed);
            }
        }
    }
    writer.abort();
    Ok(hist)
}

/// Runs steady mode and prints the summary and a JSON line.
pub(super) fn run(
    common: Common,
    rate: f64,
    payload_bytes: usize,
    duration: u64,
) -> anyhow::Result<()> {
    if !(rate > 0.0 && rate.is_finite()) {
        bail!("--rate must be a positive number of messages per second");
    }
    let devices = provision(&common)?;
    let payload = Arc::new(json_payload(payload_bytes));
    let period = Duration::from_secs_f64(1.0 / rate);
    let stats = Arc::new(FlatStats {
        acked: AtomicU64::new(0),
        measuring: AtomicBool::new(false),
        stop: AtomicBool::new(false),
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let stats_rt = Arc::clone(&stats);
    let addr = common.addr;
    let worker = std::thread::spawn(move || -> anyhow::Result<Histogram<u64>> {
        rt.block_on(async move {
            let tasks: Vec<_> = devices
                .into_iter()
                .map(|(id, token)| {
                    let (p, s) = (Arc::clone(&payload), Arc::clone(&stats_rt));
                    tokio::spawn(device(addr, id, token, period, p, s))
                })
                .collect();
            merge(tasks).await
        })
    });
    std::thread::sleep(Duration::from_secs(2));
    stats.measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(duration));
    let secs = started.elapsed().as_secs_f64();
    stats.measuring.store(false, Ordering::Relaxed);
    let acked = stats.acked.load(Ordering::Relaxed);
    stats.stop.store(true, Ordering::Relaxed);
    let hist = match worker.join() {
        Ok(r) => r?,
        Err(_) => bail!("the worker thread panicked"),
    };
    let offered = rate * common.devices as f64;
    let (line, ack_us) = latency(&hist);
    println!(
        "steady: devices={} offered={offered:.0} msg/s acked={:.0} msg/s  {line}",
        common.devices,
        acked as f64 / secs,
    );
    println!(
        "{}",
        serde_json::json!({
            "mode": "steady", "devices": common.devices, "offered_msgs_per_s": offered,
            "msgs_per_s": acked as f64 / secs, "ack_us": ack_us
        })
    );
    Ok(())
}
