//! Crash consistency over many seeds: a real `furrow serve` is killed with
//! SIGKILL at a moment chosen by a seeded random number, 20 times in a row
//! on the same data directory, while 16 devices stream pipelined
//! telemetry and the store seals its log constantly (tiny seal thresholds,
//! so the kill lands in appends and seals alike). After every restart:
//!
//! - each device's WELCOME `last_seq` is at least the highest seq it had
//!   seen ACKed and at most the highest it had sent;
//! - the database holds exactly seqs 1..=last_seq for it: every
//!   acknowledged reading once, no duplicate, no gap, nothing beyond.
//!
//! Seeds are printed; `CRASH_SEED=n` replays one.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use support::process::GatewayProcess;
use support::*;
use tokio::sync::Mutex;

const DEVICES: usize = 16;
const ROUNDS: u64 = 20;
/// Frames a device sends before it reads their ACKs.
const WINDOW: u64 = 24;

/// What one device knows across rounds.
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    sent: u64,
    acked: u64,
}

/// Streams until the connection breaks, recording what was sent and ACKed.
async fn stream(addr: SocketAddr, id: String, token: String, seen: Arc<Mutex<Seen>>) {
    let mut dev = RawDevice::connect(addr).await;
    let w = dev.hello(&id, &token, 30).await;
    let mut next = w.last_seq + 1;
    loop {
        let last = next + WINDOW - 1;
        let frames: Vec<u8> = (next..=last)
            .flat_map(|s| {
                telemetry_msg(s, 1, format!("{{\"s\":{s}}}").as_bytes())
                    .to_bytes()
                    .expect("encode")
            })
            .collect();
        seen.lock().await.sent = last;
        if dev.try_send_raw(&frames).await.is_err() {
            return;
        }
        loop {
            match dev.recv().await {
                Some(furrow_proto::Message::Ack { seq }) => {
                    seen.lock().await.acked = seq;
                    if seq == last {
                        break;
                    }
                }
                Some(_) => {}
                None => return,
            }
        }
        next = last + 1;
    }
}

/// Connects as the device and checks its WELCOME and the database against
/// what it saw before the kill; returns the `last_seq`, now also what it
/// has seen sent and ACKed.
async fn check_after_restart(
    addr: SocketAddr,
    db: &Path,
    (id, token, seen): &(String, String, Arc<Mutex<Seen>>),
    context: &str,
) -> u64 {
    let before = *seen.lock().await;
    let mut probe = RawDevice::connect(addr).await;
    let w = probe.hello(id, token, 30).await;
    assert!(
        w.last_seq >= before.acked && w.last_seq <= before.sent,
        "{context}, {id}: last_seq {} outside [acked {}, sent {}]",
        w.last_seq,
        before.acked,
        before.sent
    );
    let (db, id2) = (db.to_path_buf(), id.clone());
    let got = tokio::task::spawn_blocking(move || stored_seqs(&db, &id2))
        .await
        .expect("read the database");
    assert_seqs(&got, 1..=w.last_seq, &format!("{context}, {id}: stored"));
    *seen.lock().await = Seen {
        sent: w.last_seq,
        acked: w.last_seq,
    };
    w.last_seq
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_no_ack_and_stores_nothing_twice() {
    let seeds: Vec<u64> = match std::env::var("CRASH_SEED") {
        Ok(s) => vec![s.parse().expect("CRASH_SEED is a number")],
        Err(_) => (1..=ROUNDS).collect(),
    };
    let dir = tempfile::tempdir().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let env = [
        ("FURROW_STORAGE__SEAL_ROWS", "150"),
        ("FURROW_STORAGE__SEAL_AFTER_MS", "20"),
    ];
    let http = reqwest::Client::new();
    let db = dir.path().join("gw").join("furrow.db");

    // Devices, provisioned through the binary's own CLI.
    let mut devices = Vec::new();
    {
        let mut gw = GatewayProcess::spawn_with_env(dir.path(), "gw", addr, &[], &env);
        gw.ready(&http).await;
        drop(gw);
        for i in 0..DEVICES {
            let id = format!("c{i}");
            let out = furrow_cmd(&[
                "device",
                "add",
                &id,
                "--data-dir",
                db.parent().unwrap().to_str().unwrap(),
            ])
            .output()
            .expect("device add");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
            devices.push((id, token, Arc::new(Mutex::new(Seen::default()))));
        }
    }

    for seed in seeds {
        eprintln!("crash seed {seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut gw = GatewayProcess::spawn_with_env(dir.path(), "gw", addr, &[], &env);
        gw.ready(&http).await;
        // Each device reconnects and checks its WELCOME against what it saw.
        let mut tasks = Vec::new();
        for device in &devices {
            check_after_restart(addr, &db, device, &format!("seed {seed}")).await;
            let (id, token, seen) = device;
            tasks.push(tokio::spawn(stream(
                addr,
                id.clone(),
                token.clone(),
                Arc::clone(seen),
            )));
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(50..700))).await;
        gw.child.kill().expect("SIGKILL");
        let _ = gw.child.wait();
        for t in tasks {
            let _ = within(Duration::from_secs(10), "device sees the kill", t).await;
        }
    }
    // A last start: everything acknowledged is there once.
    let mut gw = GatewayProcess::spawn_with_env(dir.path(), "gw", addr, &[], &env);
    gw.ready(&http).await;
    let mut total = 0;
    for device in &devices {
        total += check_after_restart(addr, &db, device, "at the end").await;
    }
    assert!(total > 0, "nothing was stored at all");
    eprintln!("{total} readings stored over the rounds");
}
