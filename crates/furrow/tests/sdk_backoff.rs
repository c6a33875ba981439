//! The device SDK's reconnect policy: against a closed port, attempts are
//! spaced as the Backoff policy says (full jitter under a growing, capped
//! ceiling: no busy loop), and GOODBYE's retry_after_ms is honoured.

mod support;

use std::time::Duration;

use furrow_client::{Backoff, Client, Config, Disconnect, Event as ClientEvent};
use support::{within, TestGateway};
use tokio::sync::broadcast;
use tokio::time::Instant;

/// A port on 127.0.0.1 nobody listens on (bound, then released).
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Collects (arrival time, event) from `rx` for `d`.
async fn collect_for(
    rx: &mut broadcast::Receiver<ClientEvent>,
    d: Duration,
) -> Vec<(Instant, ClientEvent)> {
    let end = Instant::now() + d;
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout_at(end, rx.recv()).await {
            Err(_) => return out,
            Ok(Ok(e)) => out.push((Instant::now(), e)),
            Ok(Err(broadcast::error::RecvError::Lagged(n))) => {
                panic!("{n} events lost: the client emitted far too many (busy loop?)")
            }
            Ok(Err(broadcast::error::RecvError::Closed)) => return out,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_against_a_closed_port_follow_the_policy() {
    let policy = Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(200),
        multiplier: 2.0,
    };
    let mut cfg = Config::new(format!("127.0.0.1:{}", closed_port()), "bo-1", "t");
    cfg.backoff = policy.clone();
    cfg.connect_timeout = Duration::from_secs(2);
    let window = Duration::from_secs(2);
    // Subscribe before the first attempt can report.
    let client = Client::start(cfg).unwrap();
    let mut rx = client.events();
    let started = Instant::now();
    let events = collect_for(&mut rx, window).await;
    client.close().await;

    let mut attempts: Vec<(Instant, Duration)> = Vec::new();
    for (t, e) in &events {
        match e {
            ClientEvent::Disconnected {
                reason: Disconnect::ConnectFailed(_),
                retry_in,
            } => attempts.push((*t, *retry_in)),
            other => panic!("unexpected event against a closed port: {other:?}"),
        }
    }
    let n = attempts.len();
    let summary: Vec<u128> = attempts.iter().map(|(_, d)| d.as_millis()).collect();
    // Bounded: at the cap an attempt waits 100 ms on average; 2 s / (max/4)
    // plus the ramp is far below what a busy loop would make.
    let bound = (window.as_millis() / (policy.max.as_millis() / 4)) as usize + 5;
    assert!(
        n >= 5 && n < bound,
        "{n} attempts in {window:?} (bound {bound}): retry_in ms {summary:?}"
    );
    for (i, (_, d)) in attempts.iter().enumerate() {
        let ceiling = policy.ceiling(i as u32);
        assert!(
            *d <= ceiling,
            "attempt {i}: retry_in {d:?} above the ceiling {ceiling:?}; all: {summary:?}"
        );
        assert!(*d <= policy.max, "attempt {i}: retry_in {d:?} above max");
    }
    // The next attempt never comes before the announced delay.
    let tolerance = Duration::from_millis(15);
    for i in 1..n {
        let gap = attempts[i].0 - attempts[i - 1].0;
        let announced = attempts[i - 1].1;
        assert!(
            gap + tolerance >= announced,
            "attempt {i} came {gap:?} after the previous, which announced {announced:?}"
        );
    }
    // The first attempt is immediate, and the delays grow to the cap: the
    // late ceilings are max, and with full jitter some delay is above the
    // early ceilings.
    assert!(
        attempts[0].0 - started < Duration::from_millis(500),
        "the first attempt took {:?}",
        attempts[0].0 - started
    );
    assert_eq!(policy.ceiling(n as u32 - 1), policy.max);
    let longest = attempts.iter().map(|(_, d)| *d).max().unwrap();
    assert!(
        longest > policy.ceiling(2),
        "no delay above {:?}: the ceiling never grew; all: {summary:?}",
        policy.ceiling(2)
    );
    // The time spent is mostly waiting: the delays add up to the window.
    let waited: Duration = attempts[..n - 1].iter().map(|(_, d)| *d).sum();
    let span = attempts[n - 1].0 - attempts[0].0;
    assert!(
        span + tolerance * n as u32 >= waited,
        "attempts spanned {span:?} but announced {waited:?} of waiting"
    );
}

/// The gateway shuts down with GOODBYE SERVER_SHUTDOWN and a random
/// retry_after_ms in [0, 1000]: each client waits at least that long
/// before its next attempt, whatever its (tiny) backoff says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goodbye_retry_after_is_honoured() {
    const DEVICES: usize = 6;
    let mut gw = TestGateway::start_with(|c| c.shutdown.retry_after_max_ms = 1_000).await;
    let mut clients = Vec::new();
    for i in 0..DEVICES {
        let id = format!("ra-{i}");
        let token = gw.add_device(&id).await;
        let mut cfg = Config::new(gw.addr().to_string(), id, token);
        cfg.backoff = Backoff {
            initial: Duration::from_millis(5),
            max: Duration::from_millis(10),
            multiplier: 2.0,
        };
        let client = Client::start(cfg).unwrap();
        let rx = client.events();
        clients.push((client, rx));
    }
    for (_, rx) in clients.iter_mut() {
        within(Duration::from_secs(10), "Connected", async {
            loop {
                if let Ok(ClientEvent::Connected { .. }) = rx.recv().await {
                    return;
                }
            }
        })
        .await;
    }
    // A little data on the way, so the shutdown has something to drain.
    for (c, _) in &clients {
        for _ in 0..5 {
            c.send(1, &b"{\"x\":1}"[..]).await.unwrap();
        }
    }
    // Timestamp every client's events as they arrive, concurrently.
    let collectors: Vec<_> = clients
        .iter_mut()
        .map(|(_, rx)| {
            let mut rx = rx.resubscribe();
            tokio::spawn(async move { collect_for(&mut rx, Duration::from_secs(3)).await })
        })
        .collect();
    gw.shutdown().await;

    let mut announced = Vec::new();
    for (i, collector) in collectors.into_iter().enumerate() {
        let events = within(Duration::from_secs(10), "collector", collector)
            .await
            .unwrap();
        let at = events
            .iter()
            .position(|(_, e)| matches!(e, ClientEvent::Disconnected { .. }))
            .unwrap_or_else(|| panic!("ra-{i}: no disconnect: {events:?}"));
        let (t0, retry_after_ms, retry_in) = match &events[at] {
            (
                t,
                ClientEvent::Disconnected {
                    reason:
                        Disconnect::Goodbye {
                            code,
                            retry_after_ms,
                        },
                    retry_in,
                },
            ) => {
                assert_eq!(*code, 1, "GOODBYE SERVER_SHUTDOWN");
                (*t, *retry_after_ms, *retry_in)
            }
            other => panic!("ra-{i}: first disconnect is not the GOODBYE: {other:?}"),
        };
        let after = Duration::from_millis(u64::from(retry_after_ms));
        assert!(retry_after_ms <= 1_000, "retry_after_ms {retry_after_ms}");
        assert!(
            retry_in >= after,
            "ra-{i}: GOODBYE said retry after {after:?}, the client plans {retry_in:?}"
        );
        // The next attempt (nobody listens any more) comes no sooner.
        let next = events[at + 1..]
            .iter()
            .find(|(_, e)| matches!(e, ClientEvent::Disconnected { .. }));
        match next {
            Some((t1, e)) => {
                let gap = *t1 - t0;
                assert!(
                    gap + Duration::from_millis(15) >= after,
                    "ra-{i}: next attempt {gap:?} after a GOODBYE asking for {after:?} ({e:?})"
                );
            }
            // Only possible if the wait ran past the collection window.
            None => assert!(
                retry_in > Duration::from_millis(1_500),
                "ra-{i}: no attempt after the GOODBYE: {events:?}"
            ),
        }
        announced.push(retry_after_ms);
    }
    for (client, _) in &clients {
        client.close().await;
    }
    // The gateway spreads its devices' returns.
    announced.sort_unstable();
    announced.dedup();
    assert!(
        announced.len() > 1,
        "retry_after_ms all equal: {announced:?}"
    );
}
