//! How long a QUIC device's address change interrupts its stream: one
//! device sends TELEMETRY at a steady rate to a running gateway's QUIC
//! listener, and halfway through its UDP socket moves to a new local
//! address (127.0.0.2, as a modem on a new cell or a NAT rebinding would
//! give it). Prints the ACK latency before and after the move, and the
//! longest wait between two ACKs around it, beside the send interval.
//!
//! `cargo run --release -p furrow --example quic_migration -- QUIC_ADDR API_URL CA_PEM [RATE] [SECONDS]`
//! (RATE messages a second, default 200; SECONDS, default 6). The device
//! is created through the API (`POST /v1/devices`, loopback: no token).
//! bench/quic.sh runs it with the gateway pinned to CPU 0, this on CPU 1.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use furrow_proto::message::encode_telemetry;
use furrow_proto::{FrameDecoder, Hello, Message, Str};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [quic_addr, api, ca, ..] = args.as_slice() else {
        anyhow::bail!("usage: quic_migration QUIC_ADDR API_URL CA_PEM [RATE] [SECONDS]");
    };
    let rate: u64 = args.get(3).map_or(Ok(200), |a| a.parse())?;
    let seconds: u64 = args.get(4).map_or(Ok(6), |a| a.parse())?;
    let id = format!("migrate-{}", std::process::id());
    let created: serde_json::Value = reqwest::Client::new()
        .post(format!("{api}/v1/devices"))
        .json(&serde_json::json!({"device_id": id}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let token = created["token"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no token in {created}"))?
        .to_owned();

    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca)? {
        roots.add(c?)?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"furrow/1".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let conn = endpoint.connect(quic_addr.parse()?, "localhost")?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let hello = Message::Hello(Hello {
        version: furrow_proto::VERSION,
        keepalive_s: 60,
        device_id: Str::from(id.as_str()),
        token: Str::from(token.as_str()),
        capabilities: None,
    });
    send.write_all(&hello.to_bytes()?).await?;

    // ACK arrivals: seq -> when (an ACK covers every seq up to its own).
    let acks: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
    let (welcomed_tx, welcomed) = tokio::sync::oneshot::channel();
    let reader = {
        let acks = Arc::clone(&acks);
        tokio::spawn(async move {
            let dec = FrameDecoder::new(1 << 20);
            let mut buf = BytesMut::with_capacity(64 * 1024);
            let mut welcomed_tx = Some(welcomed_tx);
            loop {
                while let Ok(Some(f)) = dec.decode(&mut buf) {
                    match Message::from_frame(f) {
                        Ok(Message::Welcome(_)) => {
                            if let Some(tx) = welcomed_tx.take() {
                                let _ = tx.send(());
                            }
                        }
                        Ok(Message::Ack { seq }) => {
                            acks.lock().unwrap().push((seq, Instant::now()));
                        }
                        Ok(other) => eprintln!("unexpected: {other:?}"),
                        Err(e) => eprintln!("bad frame: {e}"),
                    }
                }
                match recv.read_chunk(64 * 1024, true).await {
                    Ok(Some(c)) => buf.extend_from_slice(&c.bytes),
                    _ => return,
                }
            }
        })
    };
    tokio::time::timeout(Duration::from_secs(10), welcomed).await??;

    let interval = Duration::from_micros(1_000_000 / rate.max(1));
    let total = rate * seconds;
    let mut sent: BTreeMap<u64, Instant> = BTreeMap::new();
    let mut moved_at = None;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut out = BytesMut::new();
    let payload = br#"{"t":21.5}"#;
    for seq in 1..=total {
        tick.tick().await;
        if seq == total / 2 {
            let socket = std::net::UdpSocket::bind("127.0.0.2:0")?;
            endpoint.rebind(socket)?;
            moved_at = Some((seq, Instant::now()));
        }
        out.clear();
        encode_telemetry(seq, 0, 1, payload, &mut out)?;
        sent.insert(seq, Instant::now());
        send.write_all(&out).await?;
    }
    // Until the last is ACKed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while acks.lock().unwrap().last().map(|a| a.0) != Some(total) {
        anyhow::ensure!(Instant::now() < deadline, "the last ACK did not come");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = send.finish();
    conn.close(0u8.into(), b"");
    reader.abort();

    let acks = acks.lock().unwrap().clone();
    let (moved_seq, moved) = moved_at.ok_or_else(|| anyhow::anyhow!("never moved"))?;
    // Each seq's ACK time: the first ACK at or above it.
    let mut latency: BTreeMap<u64, Duration> = BTreeMap::new();
    let mut i = 0;
    for (&seq, &at) in &sent {
        while i < acks.len() && acks[i].0 < seq {
            i += 1;
        }
        if let Some(&(_, acked)) = acks.get(i) {
            latency.insert(seq, acked.saturating_duration_since(at));
        }
    }
    let mut before: Vec<Duration> = latency.range(..moved_seq).map(|(_, d)| *d).collect();
    let mut after: Vec<Duration> = latency.range(moved_seq..).map(|(_, d)| *d).collect();
    before.sort();
    after.sort();
    let first_after = latency.get(&moved_seq).copied().unwrap_or_default();
    // The longest wait between ACKs within a second of the move.
    let window: Vec<Instant> = acks
        .iter()
        .map(|a| a.1)
        .filter(|t| *t + Duration::from_secs(1) >= moved && *t <= moved + Duration::from_secs(1))
        .collect();
    let gap = window
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    let rtt = pct(&before, 0.5);
    println!(
        "{total} readings at {rate}/s (one every {interval:?}); the socket moved to {} at seq {moved_seq}",
        endpoint.local_addr()?
    );
    println!(
        "  ACK latency before the move: p50 {:?}, p99 {:?}, max {:?}",
        rtt,
        pct(&before, 0.99),
        before.last().copied().unwrap_or_default()
    );
    println!(
        "  ACK latency after:           p50 {:?}, p99 {:?}, max {:?}; the first reading sent from the new address: {first_after:?}",
        pct(&after, 0.5),
        pct(&after, 0.99),
        after.last().copied().unwrap_or_default()
    );
    println!(
        "  longest wait between ACKs within 1 s of the move: {gap:?} (goal: at most one round trip, p50 {rtt:?}, plus the next send, {interval:?})"
    );
    Ok(())
}
