//! `furrow-bench`: a load generator for furrow/1 gateways.
//!
//! Modes:
//! * `flat`: every device keeps up to `--window` TELEMETRY unacknowledged
//!   and sends as fast as ACKs allow; reports ACKed messages per second and
//!   ACK latency percentiles (HdrHistogram, microseconds).
//! * `steady`: every device sends at `--rate` messages per second (never
//!   beyond WELCOME's max_inflight); reports ACK latency below saturation.
//! * `idle`: connects and authenticates N devices, then holds them; with
//!   `--gateway-pid`, reports the gateway's resident memory per connection.
//!
//! Devices are provisioned straight into the gateway's data directory
//! (`--data-dir`), which SQLite's WAL lets a second process write while
//! the gateway runs. Each worker thread runs its own current-thread
//! runtime: one multi-thread runtime starved some connections under
//! saturation on this machine kind.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::BytesMut;
use clap::{Parser, Subcommand};
use furrow_proto::message::encode_telemetry;
use furrow_proto::{FrameDecoder, Hello, Message, Str};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod steady;

#[derive(Parser)]
#[command(name = "furrow-bench", about = "Load generator for furrow/1 gateways")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(clap::Args, Clone)]
struct Common {
    /// Gateway device address.
    #[arg(long, default_value = "127.0.0.1:7700")]
    addr: SocketAddr,
    /// The gateway's data directory, to provision devices into.
    #[arg(long)]
    data_dir: PathBuf,
    /// Number of devices.
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Device id prefix (ids are PREFIX-N).
    #[arg(long, default_value = "bench")]
    prefix: String,
    /// Worker threads, each with its own runtime.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

#[derive(Subcommand)]
enum Mode {
    /// Pipeline telemetry as fast as ACKs allow.
    Flat {
        #[command(flatten)]
        common: Common,
        /// Unacknowledged messages per device (capped by WELCOME.max_inflight).
        #[arg(long, default_value_t = 64)]
        window: usize,
        /// JSON payload size in bytes.
        #[arg(long, default_value_t = 120)]
        payload_bytes: usize,
        /// Seconds to measure (after a 2 s warm-up).
        #[arg(long, default_value_t = 10)]
        duration: u64,
    },
    /// Each device sends at a fixed rate; measures ACK latency below
    /// saturation.
    Steady {
        #[command(flatten)]
        common: Common,
        /// Messages per second per device.
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// JSON payload size in bytes.
        #[arg(long, default_value_t = 120)]
        payload_bytes: usize,
        /// Seconds to measure (after a 2 s warm-up).
        #[arg(long, default_value_t = 10)]
        duration: u64,
    },
    /// Hold N authenticated idle connections.
    Idle {
        #[command(flatten)]
        common: Common,
        /// Gateway process id, to read its resident memory.
        #[arg(long)]
        gateway_pid: Option<u32>,
        /// Seconds to hold the connections after they are all up.
        #[arg(long, default_value_t = 5)]
        hold: u64,
    },
}

fn provision(common: &Common) -> anyhow::Result<Vec<(String, String)>> {
    let cfg = furrow::Config {
        data_dir: common.data_dir.clone(),
        ..furrow::Config::default()
    };
    let store = furrow::server::open_store(&cfg)?;
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    let mut out = Vec::with_capacity(common.devices);
    for i in 0..common.devices {
        let id = format!("{}-{i}", common.prefix);
        // A fresh device per run keeps seqs simple: revoke nothing, add new ids.
        let token = rt
            .block_on(furrow::devices::add_device(&store, &id))
            .with_context(|| format!("provisioning {id} (use a new --prefix per run)"))?;
        out.push((id, token));
    }
    Ok(out)
}

/// A connected, welcomed device.
struct Dev {
    stream: TcpStream,
    rbuf: BytesMut,
    max_inflight: usize,
}

async fn connect(addr: SocketAddr, id: &str, token: &str) -> anyhow::Result<Dev> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let hello = Message::Hello(Hello {
        version: 1,
        keepalive_s: 300,
        device_id: Str::from(id),
        token: Str::from(token),
    });
    stream.write_all(&hello.to_bytes()?).await?;
    let mut rbuf = BytesMut::with_capacity(4096);
    let dec = FrameDecoder::default();
    loop {
        if let Some(f) = dec.decode(&mut rbuf)? {
            match Message::from_frame(f)? {
                Message::Welcome(w) => {
                    return Ok(Dev {
                        stream,
                        rbuf,
                        max_inflight: usize::from(w.max_inflight),
                    })
                }
                other => bail!("expected WELCOME, got {other:?}"),
            }
        }
        if stream.read_buf(&mut rbuf).await? == 0 {
            bail!("gateway closed during handshake");
        }
    }
}

struct FlatStats {
    acked: AtomicU64,
    measuring: AtomicBool,
    stop: AtomicBool,
}

async fn flat_device(
    addr: SocketAddr,
    id: String,
    token: String,
    window: usize,
    payload: Arc<Vec<u8>>,
    stats: Arc<FlatStats>,
) -> anyhow::Result<Histogram<u64>> {
    let mut hist = new_hist()?;
    let mut dev = connect(addr, &id, &token).await?;
    let window = window.min(dev.max_inflight).max(1);
    let dec = FrameDecoder::default();
    let mut sent_at: std::collections::VecDeque<(u64, Instant)> = Default::default();
    let mut next_seq = 1u64;
    let mut wbuf = BytesMut::with_capacity(64 * 1024);
    while !stats.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        while sent_at.len() < window {
            encode_telemetry(next_seq, 0, 1, &payload, &mut wbuf)?;
            sent_at.push_back((next_seq, now));
            next_seq += 1;
        }
        if !wbuf.is_empty() {
            dev.stream.write_all(&wbuf).await?;
            wbuf.clear();
        }
        if dev.stream.read_buf(&mut dev.rbuf).await? == 0 {
            bail!("gateway closed the connection");
        }
        let now = Instant::now();
        let measuring = stats.measuring.load(Ordering::Relaxed);
        while let Some(f) = dec.decode(&mut dev.rbuf)? {
            match Message::from_frame(f)? {
                Message::Ack { seq } => {
                    let mut n = 0;
                    while sent_at.front().is_some_and(|(s, _)| *s <= seq) {
                        if let Some((_, t)) = sent_at.pop_front() {
                            if measuring {
                                let us = now.duration_since(t).as_micros() as u64;
                                hist.saturating_record(us.max(1));
                            }
                            n += 1;
                        }
                    }
                    if measuring {
                        stats.acked.fetch_add(n, Ordering::Relaxed);
                    }
                }
                Message::Reject(r) => bail!("unexpected REJECT {r:?}"),
                Message::Error(e) => bail!("gateway ERROR {} {}", e.code, e.message),
                Message::Goodbye(g) => bail!("gateway GOODBYE {}", g.code),
                _ => {}
            }
        }
        if dev.rbuf.capacity() - dev.rbuf.len() < 1024 {
            dev.rbuf.reserve(16 * 1024);
        }
    }
    Ok(hist)
}

/// An empty latency histogram: 1 us to 60 s, 3 significant digits.
fn new_hist() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 60_000_000, 3)?)
}

/// Awaits every device task and merges their histograms.
async fn merge(
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<Histogram<u64>>>>,
) -> anyhow::Result<Histogram<u64>> {
    let mut hist = new_hist()?;
    for t in tasks {
        hist.add(t.await??)?;
    }
    Ok(hist)
}

/// ACK latency percentiles, microseconds: a human line and a JSON object.
fn latency(hist: &Histogram<u64>) -> (String, serde_json::Value) {
    let q = |p| hist.value_at_quantile(p);
    let line = format!(
        "ack latency us: p50={} p90={} p99={} p99.9={} max={}",
        q(0.5),
        q(0.9),
        q(0.99),
        q(0.999),
        hist.max()
    );
    let json = serde_json::json!({"p50": q(0.5), "p90": q(0.9), "p99": q(0.99),
                                  "p999": q(0.999), "max": hist.max()});
    (line, json)
}

/// A JSON object padded to the requested size.
fn json_payload(bytes: usize) -> Vec<u8> {
    let base = r#"{"t":21.5,"h":40.2,"p":""}"#;
    let pad = bytes.saturating_sub(base.len());
    format!(r#"{{"t":21.5,"h":40.2,"p":"{}"}}"#, "x".repeat(pad)).into_bytes()
}

fn run_flat(
    common: Common,
    window: usize,
    payload_bytes: usize,
    duration: u64,
) -> anyhow::Result<()> {
    let devices = provision(&common)?;
    let payload = Arc::new(json_payload(payload_bytes));
    let stats = Arc::new(FlatStats {
        acked: AtomicU64::new(0),
        measuring: AtomicBool::new(false),
        stop: AtomicBool::new(false),
    });
    let threads = common.threads.max(1);
    let mut per_thread: Vec<Vec<(String, String)>> = vec![Vec::new(); threads];
    for (i, d) in devices.into_iter().enumerate() {
        per_thread[i % threads].push(d);
    }
    let mut handles = Vec::new();
    for chunk in per_thread {
        let stats = Arc::clone(&stats);
        let payload = Arc::clone(&payload);
        let addr = common.addr;
        handles.push(std::thread::spawn(
            move || -> anyhow::Result<Histogram<u64>> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let mut tasks = Vec::new();
                    for (id, token) in chunk {
                        tasks.push(tokio::spawn(flat_device(
                            addr,
                            id,
                            token,
                            window,
                            Arc::clone(&payload),
                            Arc::clone(&stats),
                        )));
                    }
                    merge(tasks).await
                })
            },
        ));
    }
    std::thread::sleep(Duration::from_secs(2));
    stats.measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let mut last = 0;
    for _ in 0..duration {
        std::thread::sleep(Duration::from_secs(1));
        let now = stats.acked.load(Ordering::Relaxed);
        eprintln!("  {:>8} acked/s", now - last);
        last = now;
    }
    let elapsed = started.elapsed().as_secs_f64();
    stats.measuring.store(false, Ordering::Relaxed);
    let acked = stats.acked.load(Ordering::Relaxed);
    stats.stop.store(true, Ordering::Relaxed);
    let mut hist = new_hist()?;
    for h in handles {
        match h.join() {
            Ok(Ok(h)) => hist.add(h)?,
            Ok(Err(e)) => eprintln!("worker failed: {e:#}"),
            Err(_) => eprintln!("worker panicked"),
        }
    }
    let rate = acked as f64 / elapsed;
    let (line, ack_us) = latency(&hist);
    println!(
        "flat: devices={} window={} payload={}B  acked={} in {:.1}s = {:.0} msg/s  {line}",
        common.devices,
        window,
        payload.len(),
        acked,
        elapsed,
        rate,
    );
    println!(
        "{}",
        serde_json::json!({
            "mode": "flat", "devices": common.devices, "window": window,
            "payload_bytes": payload.len(), "seconds": elapsed, "acked": acked,
            "msgs_per_s": rate, "ack_us": ack_us
        })
    );
    Ok(())
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")
}

fn run_idle(common: Common, gateway_pid: Option<u32>, hold: u64) -> anyhow::Result<()> {
    let devices = provision(&common)?;
    let before = gateway_pid.map(rss_kib).transpose()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let started = Instant::now();
        let mut held = Vec::with_capacity(devices.len());
        // Connect in waves so the listener's backlog is not the bottleneck.
        for wave in devices.chunks(500) {
            let mut tasks = Vec::new();
            for (id, token) in wave {
                let (id, token, addr) = (id.clone(), token.clone(), common.addr);
                tasks.push(tokio::spawn(async move { connect(addr, &id, &token).await }));
            }
            for t in tasks {
                let mut d = t.await??;
                d.rbuf = BytesMut::new();
                held.push(d);
            }
        }
        eprintln!("{} devices connected in {:.1}s", held.len(), started.elapsed().as_secs_f64());
        tokio::time::sleep(Duration::from_secs(hold)).await;
        let after = gateway_pid.map(rss_kib).transpose()?;
        if let (Some(b), Some(a)) = (before, after) {
            let per = (a.saturating_sub(b) as f64 * 1024.0) / held.len() as f64;
            println!(
                "idle: devices={} gateway RSS before={} KiB after={} KiB => {:.0} bytes per connection",
                held.len(), b, a, per
            );
            println!("{}", serde_json::json!({"mode":"idle","devices":held.len(),"rss_before_kib":b,"rss_after_kib":a,"bytes_per_conn":per}));
        } else {
            println!("idle: devices={} held for {hold}s", held.len());
        }
        Ok::<_, anyhow::Error>(())
    })
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().mode {
        Mode::Flat {
            common,
            window,
            payload_bytes,
            duration,
        } => run_flat(common, window, payload_bytes, duration),
        Mode::Steady {
            common,
            rate,
            payload_bytes,
            duration,
        } => steady::run(common, rate, payload_bytes, duration),
        Mode::Idle {
            common,
            gateway_pid,
            hold,
        } => run_idle(common, gateway_pid, hold),
    }
}
