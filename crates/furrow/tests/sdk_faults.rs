//! The device SDK over a hostile network: a fault-injecting proxy
//! (tests/support/faults.rs) between the clients and the gateway delays,
//! stalls and cuts connections at random byte offsets in both directions.
//! 20 devices x 5,000 readings: every reading is stored exactly once.

#[path = "support/faults.rs"]
mod faults;
mod support;

use std::sync::Arc;
use std::time::Duration;

use faults::{FaultConfig, FaultProxy};
use furrow_client::{Backoff, Client, Config, Disconnect, Event as ClientEvent};
use support::{assert_seqs, open_db, stored_seqs_in, within, TestGateway};
use tokio::sync::broadcast;
use tokio::time::Instant;

const DEVICES: usize = 20;
const READINGS: u64 = 5_000;

/// What one device's event stream showed.
#[derive(Debug, Default, Clone)]
struct Seen {
    connected: u64,
    disconnected: u64,
    reasons: Vec<String>,
    rejected: u64,
}

async fn watch_events(mut rx: broadcast::Receiver<ClientEvent>) -> Seen {
    let mut s = Seen::default();
    loop {
        match rx.recv().await {
            Ok(ClientEvent::Connected { .. }) => s.connected += 1,
            Ok(ClientEvent::Disconnected { reason, .. }) => {
                if reason != Disconnect::Closed {
                    s.disconnected += 1;
                    if s.reasons.len() < 5 {
                        s.reasons.push(format!("{reason:?}"));
                    }
                }
            }
            Ok(ClientEvent::Rejected { .. }) => s.rejected += 1,
            Ok(_) => {}
            // Only ACK events can pile up; a lost one is harmless here.
            Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return s,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_devices_through_a_faulty_network_store_everything_once() {
    support::init_test_logs();
    let gw = TestGateway::start().await;
    let proxy = Arc::new(
        FaultProxy::start(
            gw.addr(),
            FaultConfig {
                max_chunk: 16 * 1024,
                delay_prob: 0.05,
                delay_ms: 1..=10,
                stall_prob: 0.02,
                stall_ms: 100..=600,
                // Cut offsets log-uniform: many cuts in the handshake and
                // the first frames, some deep into a session; 30% of the
                // connections are never cut upstream.
                cut_up_prob: 0.7,
                cut_up_after: 1..=200_000,
                cut_down_prob: 0.4,
                cut_down_after: 1..=2_000,
                reset_prob: 0.5,
                log_uniform_cuts: true,
            },
        )
        .await,
    );
    let started = Instant::now();
    let mut tasks = Vec::new();
    for d in 0..DEVICES {
        let id = format!("faulty-{d}");
        let token = gw.add_device(&id).await;
        let mut cfg = Config::new(proxy.addr().to_string(), id.clone(), token);
        cfg.backoff = Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(300),
            multiplier: 2.0,
        };
        cfg.connect_timeout = Duration::from_secs(5);
        tasks.push(tokio::spawn(async move {
            let client = Client::start(cfg).unwrap();
            let watcher = tokio::spawn(watch_events(client.events()));
            for n in 1..=READINGS {
                let p = format!("{{\"d\":{d},\"n\":{n},\"t\":21.5}}");
                let seq = client.send(1, p).await.unwrap();
                assert_eq!(seq, n, "{id}: seqs are assigned in order");
                // Bursts with pauses: sessions see busy and quiet moments.
                if n % 50 == 0 {
                    let ms = rand::random::<u64>() % 20;
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
            }
            let flushed = tokio::time::timeout(Duration::from_secs(120), client.flush()).await;
            let pending = client.pending();
            let acked = *client.acked().borrow();
            client.close().await;
            drop(client);
            let seen = watcher.await.unwrap();
            (id, flushed.is_ok(), pending, acked, seen)
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(
            within(Duration::from_secs(150), "device task", t)
                .await
                .unwrap(),
        );
    }
    let elapsed = started.elapsed();
    let counts = proxy.counts();
    eprintln!("proxy: {counts:?}; took {elapsed:?}");
    for (id, flushed, pending, acked, seen) in &results {
        eprintln!(
            "{id}: flushed {flushed}, pending {pending}, acked {acked}, connected {}, \
             disconnected {}, e.g. {:?}",
            seen.connected, seen.disconnected, seen.reasons
        );
    }
    for (id, flushed, pending, acked, seen) in &results {
        assert!(
            *flushed,
            "{id}: flush did not return within 120 s (pending {pending}, acked {acked}, \
             seen {seen:?})"
        );
        assert_eq!(*pending, 0, "{id}");
        assert_eq!(seen.rejected, 0, "{id}: nothing is rejected");
    }

    // Every device stored exactly 1..=5000, each once.
    let db = gw.db_path();
    let ids: Vec<String> = results.iter().map(|r| r.0.clone()).collect();
    let stored = tokio::task::spawn_blocking(move || {
        let conn = open_db(&db);
        ids.iter()
            .map(|id| (id.clone(), stored_seqs_in(&conn, id)))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for (id, seqs) in &stored {
        assert_seqs(
            seqs,
            1..=READINGS,
            &format!("{id} through the faulty proxy"),
        );
    }

    // The proxy really broke things, and the clients really reconnected.
    let disconnects: u64 = results.iter().map(|r| r.4.disconnected).sum();
    assert!(
        counts.cuts_up > 0 && counts.cuts_down > 0,
        "the proxy injected no cuts in one direction: {counts:?}"
    );
    assert!(counts.stalls > 0 && counts.delays > 0, "{counts:?}");
    assert!(
        disconnects >= DEVICES as u64,
        "only {disconnects} disconnects over {DEVICES} devices: {counts:?}"
    );
    assert!(
        counts.connections > DEVICES as u64,
        "no reconnection through the proxy: {counts:?}"
    );
}
