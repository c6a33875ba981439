//! Load and hostile input: a thousand devices at once, and a thousand
//! connections of garbage, after which the gateway still serves.

mod support;

use std::time::Duration;

use furrow_proto::Message;
use rand::{Rng, SeedableRng};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_devices_each_store_ten() {
    const DEVICES: usize = 1_000;
    let gw = TestGateway::start_with(|c| {
        c.storage.synchronous = furrow::store::Synchronous::Normal;
    })
    .await;
    let started = Instant::now();
    let mut creds = Vec::with_capacity(DEVICES);
    for i in 0..DEVICES {
        let id = format!("fleet-{i:04}");
        let token = gw.add_device(&id).await;
        creds.push((id, token));
    }
    eprintln!("provisioned {DEVICES} devices in {:?}", started.elapsed());

    let addr = gw.addr();
    let started = Instant::now();
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(DEVICES));
    let mut tasks = Vec::with_capacity(DEVICES);
    for (id, token) in creds {
        let barrier = std::sync::Arc::clone(&barrier);
        tasks.push(tokio::spawn(async move {
            let mut dev = RawDevice::connect(addr).await;
            // Everyone connected before anyone says HELLO.
            barrier.wait().await;
            let w = dev.hello(&id, &token, 0).await;
            assert_eq!(w.last_seq, 0, "{id}");
            dev.telemetry_batch(1..=10).await;
            dev.until_ack(10).await;
            dev
        }));
    }
    let mut devs = Vec::with_capacity(DEVICES);
    let mut failures = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        match within(Duration::from_secs(25), "a device of the fleet", t).await {
            Ok(dev) => devs.push(dev),
            Err(e) => failures.push(format!("fleet-{i:04}: {e}")),
        }
    }
    eprintln!(
        "{} devices connected, stored and got ACK 10 in {:?}",
        devs.len(),
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} of {DEVICES} devices failed; first: {:?}",
        failures.len(),
        failures.iter().take(5).collect::<Vec<_>>()
    );
    assert_eq!(gw.registry().len(), DEVICES, "all sessions live at once");

    let db = open_db(&gw.db_path());
    assert_eq!(count_all_rows(&gw.db_path()), 10 * DEVICES as u64);
    let mut stmt = db
        .prepare(
            "SELECT d.device_id, COUNT(*), MIN(t.seq), MAX(t.seq) FROM telemetry t \
             JOIN devices d ON d.id = t.device GROUP BY d.device_id",
        )
        .unwrap();
    let rows: Vec<(String, i64, i64, i64)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(rows.len(), DEVICES);
    for (id, n, lo, hi) in rows {
        assert_eq!((n, lo, hi), (10, 1, 10), "{id}");
    }
}

/// What one hostile connection sends.
#[derive(Debug, Clone)]
enum Garbage {
    /// Random bytes of a random length.
    Random(Vec<u8>),
    /// A length far above the maximum, then random bytes.
    HugeLength(Vec<u8>),
    /// A plausible header (small length, random type and flags), random body.
    Header(Vec<u8>),
    /// The start of a real HELLO, then random bytes.
    HelloThenJunk(Vec<u8>),
    /// Connect and close at once.
    Nothing,
}

impl Garbage {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Random(b) | Self::HugeLength(b) | Self::Header(b) | Self::HelloThenJunk(b) => b,
            Self::Nothing => &[],
        }
    }
}

fn garbage(rng: &mut impl Rng, hello: &[u8]) -> Garbage {
    let junk = |rng: &mut dyn rand::RngCore, n: usize| {
        let mut v = vec![0u8; n];
        rng.fill_bytes(&mut v);
        v
    };
    match rng.gen_range(0..10) {
        0..=2 => {
            let n = rng.gen_range(1..4096);
            Garbage::Random(junk(rng, n))
        }
        3 | 4 => {
            let mut v = rng.gen_range(65_537u32..=u32::MAX).to_be_bytes().to_vec();
            let n = rng.gen_range(0..512);
            v.extend(junk(rng, n));
            Garbage::HugeLength(v)
        }
        5..=7 => {
            let body = rng.gen_range(0usize..300);
            let mut v = ((body + 2) as u32).to_be_bytes().to_vec();
            v.push(rng.gen());
            v.push(if rng.gen_bool(0.7) { 0 } else { rng.gen() });
            // Sometimes the body is shorter than announced.
            let n = if rng.gen_bool(0.8) {
                body
            } else {
                rng.gen_range(0..=body)
            };
            v.extend(junk(rng, n));
            Garbage::Header(v)
        }
        8 => {
            let cut = rng.gen_range(1..hello.len());
            let mut v = hello[..cut].to_vec();
            let n = rng.gen_range(0..256);
            let mut j = junk(rng, n);
            // The junk must not complete the real HELLO: with the cut one
            // byte before the end, 1 junk byte in 256 did (seen in CI, seed
            // 2718533669590640253), and the gateway rightly said WELCOME.
            if let Some(first) = j.first_mut() {
                if *first == hello[cut] {
                    *first ^= 0xFF;
                }
            }
            v.extend(j);
            Garbage::HelloThenJunk(v)
        }
        _ => Garbage::Nothing,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_garbage_connections_leave_the_gateway_serving() {
    const CONNS: usize = 1_000;
    const WAVE: usize = 100;
    let gw = TestGateway::start_with(|c| {
        c.limits.handshake_timeout_ms = 1_000;
        c.storage.synchronous = furrow::store::Synchronous::Normal;
    })
    .await;
    let token = gw.add_device("survivor").await;
    let seed: u64 = rand::thread_rng().gen();
    eprintln!("garbage seed: {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let hello = encode(&hello_msg("survivor", &token, 0));
    let plan: Vec<Garbage> = (0..CONNS).map(|_| garbage(&mut rng, &hello)).collect();

    let addr = gw.addr();
    let started = Instant::now();
    let mut errors_seen = 0usize;
    for wave in plan.chunks(WAVE) {
        let mut tasks = Vec::new();
        for g in wave.iter().cloned() {
            tasks.push(tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.expect("the gateway accepts");
                if matches!(g, Garbage::Nothing) {
                    return false;
                }
                // The gateway may close before everything is written.
                let _ = s.write_all(g.bytes()).await;
                // Read what comes back for a little while (an ERROR and a
                // close, usually), then drop the connection either way.
                let mut buf = vec![0u8; 1024];
                let mut got = Vec::new();
                let until = Instant::now() + Duration::from_millis(300);
                loop {
                    match tokio::time::timeout_at(until, s.read(&mut buf)).await {
                        Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                        Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                    }
                }
                // Whatever the gateway sent must be a well-formed ERROR
                // (nothing else may answer garbage that is not a HELLO).
                if got.is_empty() {
                    return false;
                }
                match parse(bytes::Bytes::from(got.clone())) {
                    Message::Error(e) => {
                        assert!((1..=9).contains(&e.code), "ERROR code {}", e.code);
                        true
                    }
                    other => panic!("garbage {g:?} was answered with {other:?}"),
                }
            }));
        }
        for t in tasks {
            if within(Duration::from_secs(10), "garbage connection", t)
                .await
                .expect("garbage connection task")
            {
                errors_seen += 1;
            }
        }
    }
    eprintln!(
        "{CONNS} garbage connections in {:?}; {errors_seen} answered with ERROR",
        started.elapsed()
    );
    assert!(errors_seen > CONNS / 4, "only {errors_seen} ERRORs seen");

    // The gateway still serves, promptly.
    let t = Instant::now();
    let (mut dev, w) = within(
        Duration::from_secs(5),
        "a legitimate handshake after the garbage",
        gw.connect_device("survivor", &token),
    )
    .await;
    assert_eq!(w.last_seq, 0);
    dev.stream_window(1, 2_000, u64::from(w.max_inflight), |_| {})
        .await;
    dev.ping(1).await;
    eprintln!("legitimate device served in {:?}", t.elapsed());
    assert_seqs(&stored_seqs(&gw.db_path(), "survivor"), 1..=2_000, "stored");
    // No garbage connection holds a session.
    assert_eq!(gw.registry().len(), 1);
}
