//! Firmware rollout throughput, end to end on loopback: N SDK devices pull
//! one image at once from a running gateway, and the time from the job's
//! creation to the last device holding a verified image gives the
//! aggregate download rate. `bench/firmware.sh` runs it beside `furrow
//! bench steady` to see what the rollout does to telemetry ACKs.
//!
//! `cargo run --release -p furrow --example firmware_rollout -- ADDR API_URL PUBLIC_KEY_HEX [DEVICES] [IMAGE_BYTES] [ROUNDS] [sdk|wire]`
//! (defaults 1000 devices, 1 MiB, 1 round, sdk: each round uploads a new
//! image and rolls it out to every device, so that several rounds keep the
//! gateway serving for a while)
//!
//! * `sdk`: the devices are the Rust SDK, keeping images in memory (a sink
//!   of their own, so the figure is not a disk's); each checks every
//!   range's CRC-32, the signature, and the whole image's SHA-256. On one
//!   core, that SHA-256 (about 1 CPU-second per GB here) caps what the
//!   load side can take.
//! * `wire`: lean furrow/1 devices that check every range's CRC-32 and the
//!   byte count, not the SHA-256 (a device's own CPU, not the gateway's):
//!   the gateway's rate with the load generator out of the way.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use furrow_client::{
    Client, Config as ClientConfig, Event, FirmwareConfig, FirmwareSink, ImageInfo,
};
use serde_json::{json, Value};

/// Holds the image in memory.
#[derive(Default)]
struct MemorySink(Vec<u8>);

impl FirmwareSink for MemorySink {
    fn open(&mut self, image: &ImageInfo) -> io::Result<u64> {
        self.0.reserve(image.size as usize);
        Ok(self.0.len() as u64)
    }
    fn append(&mut self, _offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }
    fn read_all(&mut self, f: &mut dyn FnMut(&[u8])) -> io::Result<()> {
        f(&self.0);
        Ok(())
    }
    fn discard(&mut self, _image: &ImageInfo) -> io::Result<()> {
        self.0.clear();
        Ok(())
    }
    fn complete(&mut self, image: &ImageInfo) -> io::Result<PathBuf> {
        // The next round reuses the memory (a load generator's economy).
        self.0.clear();
        Ok(PathBuf::from(format!("memory:{}", image.hex)))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (addr, api) = (
        args.first()
            .cloned()
            .unwrap_or_else(|| "127.0.0.1:7700".into()),
        args.get(1)
            .cloned()
            .unwrap_or_else(|| "http://127.0.0.1:7780".into()),
    );
    let key: [u8; 32] = hex::decode(args.get(2).map(String::as_str).unwrap_or_default().trim())?
        .try_into()
        .map_err(|_| anyhow::anyhow!("the public key is 64 hex digits"))?;
    let n: usize = args.get(3).map_or(Ok(1000), |a| a.parse())?;
    let size: usize = args.get(4).map_or(Ok(1 << 20), |a| a.parse())?;
    let rounds: u64 = args.get(5).map_or(Ok(1), |a| a.parse())?;
    let wire = args.get(6).is_some_and(|m| m == "wire");
    let http = reqwest::Client::new();
    let tag = format!("rollout-{}", std::process::id());

    let ready = Arc::new(AtomicU64::new(0));
    let done = Arc::new(tokio::sync::Notify::new());
    let mut clients = Vec::with_capacity(n);
    let mut names = Vec::with_capacity(n);
    let mut wire_received: Vec<Arc<AtomicU64>> = Vec::new();
    for d in 0..n {
        let name = format!("{tag}-{d}");
        let v: Value = http
            .post(format!("{api}/v1/devices"))
            .json(&json!({"device_id": name}))
            .send()
            .await?
            .json()
            .await?;
        let token = v["token"].as_str().unwrap_or_default().to_owned();
        let (ready, done) = (Arc::clone(&ready), Arc::clone(&done));
        let on_ready = move || {
            if (ready.fetch_add(1, Ordering::SeqCst) + 1) % n as u64 == 0 {
                done.notify_one();
            }
        };
        if wire {
            let received = Arc::new(AtomicU64::new(0));
            tokio::spawn(wire_device(
                addr.clone(),
                name.clone(),
                token,
                Arc::clone(&received),
                on_ready,
            ));
            wire_received.push(received);
            names.push(name);
            continue;
        }
        let fw = FirmwareConfig::new(key, "bench", "1.0.0", std::env::temp_dir())
            .with_sink(|| Box::new(MemorySink::default()) as Box<dyn FirmwareSink>);
        let mut cfg = ClientConfig::new(addr.clone(), name.clone(), token);
        cfg.firmware = Some(fw);
        let client = Arc::new(Client::start(cfg)?);
        let mut events = client.events();
        let c = Arc::clone(&client);
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(Event::FirmwareReady { version, .. }) => {
                        on_ready();
                        let _ = c.firmware_installed(&version).await;
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => return,
                }
            }
        });
        clients.push(client);
        names.push(name);
    }
    // Every device online before the first job starts them all at once.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut received = 0u64;
    for round in 1..=rounds {
        // Distinct bytes per run and round: images are content-addressed.
        let mut image: Vec<u8> = (0..size)
            .map(|i| (i as u64 * 7 + i as u64 / 251) as u8)
            .collect();
        let salt = [rand::random::<u64>(), round];
        for (dst, src) in image.chunks_mut(8).zip(salt) {
            let b = src.to_le_bytes();
            dst.copy_from_slice(&b[..dst.len()]);
        }
        let version = format!("{tag}.{round}");
        let resp = http
            .post(format!("{api}/v1/firmware"))
            .query(&[("name", "bench"), ("version", &version), ("model", "bench")])
            .body(image)
            .send()
            .await?;
        anyhow::ensure!(resp.status().is_success(), "upload: {}", resp.text().await?);
        let id = resp.json::<Value>().await?["id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let wait = done.notified();
        tokio::pin!(wait);
        wait.as_mut().enable();
        let started = Instant::now();
        let resp = http
            .post(format!("{api}/v1/jobs"))
            .json(&json!({"target": {"devices": names},
                          "operation": {"firmware": {"image": id, "max_downloads": n}}}))
            .send()
            .await?;
        anyhow::ensure!(resp.status().is_success(), "job: {}", resp.text().await?);
        if ready.load(Ordering::SeqCst) < round * n as u64 {
            tokio::time::timeout(Duration::from_secs(600), wait).await?;
        }
        let secs = started.elapsed().as_secs_f64();
        let total: u64 = clients
            .iter()
            .map(|c| c.firmware_stats().bytes_received)
            .chain(wire_received.iter().map(|r| r.load(Ordering::Relaxed)))
            .sum();
        let bytes = total - received;
        received = total;
        println!(
            "round {round}: devices {n}  image {size} B  all verified in {secs:.2} s  received {bytes} B  aggregate {:.0} MB/s",
            bytes as f64 / secs / 1e6
        );
    }
    for c in &clients {
        c.close().await;
    }
    Ok(())
}

/// A lean furrow/1 device for `wire` mode: takes every offer, pulls the
/// image in ranges of the offer's `chunk_max`, `window` at a time, checks
/// each CRC-32 and the byte count, then reports the version installed.
async fn wire_device(
    addr: String,
    id: String,
    token: String,
    received: Arc<AtomicU64>,
    on_ready: impl Fn(),
) -> anyhow::Result<()> {
    use bytes::BytesMut;
    use furrow_proto::{ChunkRequest, FrameDecoder, Hello, Message, Report, Str};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut sock = tokio::net::TcpStream::connect(&addr).await?;
    sock.set_nodelay(true)?;
    let hello = Message::Hello(Hello {
        version: furrow_proto::VERSION,
        keepalive_s: 600,
        device_id: Str::from(id.as_str()),
        token: Str::from(token.as_str()),
        capabilities: Some(furrow_proto::CAP_STATE | furrow_proto::CAP_FIRMWARE),
    });
    sock.write_all(&hello.to_bytes()?).await?;
    let dec = FrameDecoder::new(1 << 24);
    let mut buf = BytesMut::with_capacity(128 * 1024);
    let mut out = BytesMut::new();
    let mut seq = 0u64;
    // (image, size, chunk, next offset to ask, bytes held, version)
    let mut cur: Option<([u8; 32], u64, u64, u64, u64, String)> = None;
    loop {
        while let Some(f) = dec.decode(&mut buf)? {
            match Message::from_frame(f)? {
                Message::FirmwareOffer(o) => {
                    let chunk = u64::from(o.chunk_max);
                    let mut next = 0;
                    for _ in 0..o.window {
                        if next < o.size {
                            let length = (o.size - next).min(chunk) as u32;
                            Message::ChunkRequest(ChunkRequest {
                                image: o.image,
                                offset: next,
                                length,
                            })
                            .encode(&mut out)?;
                            next += u64::from(length);
                        }
                    }
                    cur = Some((
                        o.image,
                        o.size,
                        chunk,
                        next,
                        0,
                        o.version.as_str().to_owned(),
                    ));
                }
                Message::Chunk(c) => {
                    let Some((image, size, chunk, next, held, version)) = cur.as_mut() else {
                        continue;
                    };
                    anyhow::ensure!(crc32fast::hash(&c.data) == c.crc32, "CRC-32 mismatch");
                    *held += c.data.len() as u64;
                    received.fetch_add(c.data.len() as u64, Ordering::Relaxed);
                    if *next < *size {
                        let length = (*size - *next).min(*chunk) as u32;
                        Message::ChunkRequest(ChunkRequest {
                            image: *image,
                            offset: *next,
                            length,
                        })
                        .encode(&mut out)?;
                        *next += u64::from(length);
                    }
                    if *held == *size {
                        on_ready();
                        seq += 1;
                        let patch = json!({"firmware": {"version": version}});
                        Message::Report(Report {
                            seq,
                            timestamp_ms: 0,
                            patch: patch.to_string().into(),
                        })
                        .encode(&mut out)?;
                        cur = None;
                    }
                }
                _ => {}
            }
        }
        if !out.is_empty() {
            sock.write_all(&out).await?;
            out.clear();
        }
        let want = match buf.get(..4) {
            Some(h) => (u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize + 4)
                .saturating_sub(buf.len()),
            None => 0,
        };
        buf.reserve(want.max(16 * 1024));
        if sock.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    }
}
