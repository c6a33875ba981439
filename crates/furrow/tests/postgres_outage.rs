//! A PostgreSQL outage under a streaming fleet: the database (a real,
//! throwaway cluster) is stopped for 10 s while 50 SDK devices stream.
//! While it is away the gateway ACKs nothing and `/readyz` says not
//! ready; no device is disconnected; afterwards every device's readings
//! are stored completely and exactly once.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use furrow_client::{Client, Config as ClientConfig, Event};
use support::http::{status_of, until_status};
use support::postgres::Postgres;
use support::*;

const DEVICES: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_holds_acks_and_loses_nothing() {
    let mut pg = Postgres::start();
    let url = pg.fresh_db().await;
    let gw = TestGateway::start_with(|c| {
        c.database_url = url.clone();
        c.storage.connect_timeout_ms = 1_000;
    })
    .await;
    let http = reqwest::Client::new();
    let ready_url = gw.api_url("/readyz");
    assert_eq!(status_of(&http, &ready_url).await, 200);

    let disconnects = Arc::new(AtomicUsize::new(0));
    let streaming = Arc::new(AtomicBool::new(true));
    let mut clients = Vec::new();
    let mut senders = Vec::new();
    let mut tokens = vec![gw.add_device("late").await];
    for i in 0..DEVICES {
        let id = format!("pump-{i}");
        let token = gw.add_device(&id).await;
        let mut cfg = ClientConfig::new(gw.addr().to_string(), id.clone(), token);
        cfg.keepalive_s = 30;
        let client = Arc::new(Client::start(cfg).expect("client"));
        let mut events = client.events();
        let d = Arc::clone(&disconnects);
        tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                let e = match events.recv().await {
                    Ok(e) => e,
                    // Counted all the same: a lost event must not hide
                    // a disconnect.
                    Err(RecvError::Lagged(n)) => {
                        eprintln!("{n} client events lost");
                        d.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Err(RecvError::Closed) => break,
                };
                if let Event::Disconnected { reason, .. } = e {
                    eprintln!("disconnect: {reason:?}");
                    d.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        let sender = stream_while(
            Arc::clone(&client),
            Arc::clone(&streaming),
            Duration::from_millis(20),
        );
        clients.push((id, client));
        senders.push(sender);
    }
    let acked = |clients: &Vec<(String, Arc<Client>)>| -> u64 {
        clients.iter().map(|(_, c)| *c.acked().borrow()).sum()
    };

    // Streaming, then the database goes away.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(acked(&clients) > 0, "nothing ACKed before the outage");
    pg.stop();
    let stopped = tokio::time::Instant::now();

    // Not ready within a few seconds...
    let mut saw_unready = false;
    while stopped.elapsed() < Duration::from_secs(5) {
        if status_of(&http, &ready_url).await == 503 {
            saw_unready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(saw_unready, "/readyz stayed ready without a database");
    // A device connecting now is told to come back later (BUSY), not
    // that it failed authentication.
    let late_token = tokens.pop().expect("a spare device");
    let mut late = RawDevice::connect(gw.addr()).await;
    late.send(&hello_msg("late", &late_token, 30)).await;
    match late.recv().await {
        Some(furrow_proto::Message::Error(e)) => assert_eq!(e.code, 8, "BUSY: {e:?}"),
        other => panic!("expected ERROR BUSY, got {other:?}"),
    }
    // ...and no ACK moves while the database is away (what was in flight
    // at the stop has settled by now).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = acked(&clients);
    tokio::time::sleep(Duration::from_secs(10) - stopped.elapsed().min(Duration::from_secs(9)))
        .await;
    assert_eq!(acked(&clients), held, "ACKs moved without a database");

    pg.start_again();
    until_status(
        &http,
        &ready_url,
        200,
        Duration::from_secs(30),
        "ready again",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sent = stop_and_flush(&streaming, senders, &clients).await;
    assert!(acked(&clients) > held, "ACKs never resumed");
    assert_eq!(
        disconnects.load(Ordering::Relaxed),
        0,
        "devices were disconnected by the outage"
    );

    // Complete and unique, read back from PostgreSQL.
    for ((id, _), n) in clients.iter().zip(&sent) {
        assert_stored_exactly(&*gw.store(), id, *n, "after the outage").await;
    }
    for (_, c) in &clients {
        c.close().await;
    }
}
