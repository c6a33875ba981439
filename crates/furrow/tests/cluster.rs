//! Several gateway instances sharing one PostgreSQL (a real, throwaway
//! cluster the test starts): takeover across instances, commands routed
//! to whichever instance holds the device, the holder recorded and shown
//! by every instance's API, and a dead instance's records cleared.
//!
//! These run the instances in-process; `cluster_haproxy.rs` runs real
//! processes behind HAProxy and kills one.

mod support;

use std::time::{Duration, Instant};

use furrow_client::{handler, Client, CommandReply, Config as ClientConfig};
use serde_json::{json, Value};
use support::postgres::Postgres;
use support::*;

async fn instance(url: &str, name: &str) -> TestGateway {
    let url = url.to_owned();
    let name = name.to_owned();
    TestGateway::start_with(move |c| {
        c.database_url = url;
        c.instance_id = name;
        c.sessions.heartbeat_ms = 200;
        c.sessions.instance_timeout_ms = 1_000;
    })
    .await
}

async fn get(gw: &TestGateway, path: &str) -> Value {
    let r = reqwest::get(gw.api_url(path)).await.expect("request");
    assert!(r.status().is_success(), "{path}: {}", r.status());
    r.json().await.expect("JSON")
}

async fn post(gw: &TestGateway, path: &str, body: Value) -> Value {
    let r = reqwest::Client::new()
        .post(gw.api_url(path))
        .json(&body)
        .send()
        .await
        .expect("request");
    assert!(r.status().is_success(), "{path}: {}", r.status());
    r.json().await.expect("JSON")
}

/// Queues, through `gw`'s API, command `NAME-i` for device `PREFIX-i`,
/// for each `i` of `devices`.
async fn command_each(
    gw: &TestGateway,
    prefix: &str,
    name: &str,
    devices: impl Iterator<Item = usize>,
) {
    for i in devices {
        post(
            gw,
            &format!("/v1/devices/{prefix}-{i}/commands"),
            json!({"name": format!("{name}-{i}"), "payload": {}}),
        )
        .await;
    }
}

/// Waits until `gw`'s API shows the device online at `instance`.
async fn until_held_by(gw: &TestGateway, id: &str, instance: &str) -> Value {
    within(Duration::from_secs(10), "device held", async {
        loop {
            let v = get(gw, &format!("/v1/devices/{id}")).await;
            if v["online"] == json!(true) && v["instance"] == json!(instance) {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_moving_to_another_instance_is_dropped_by_the_old_one() {
    let pg = Postgres::start();
    let url = pg.fresh_db().await;
    let a = instance(&url, "gw-a").await;
    let b = instance(&url, "gw-b").await;
    let token = a.add_device("mover").await;

    let (mut first, welcome) = a.connect_device("mover", &token).await;
    assert_eq!(welcome.last_seq, 0);
    first.send_raw(&telemetry_frames(1..=20)).await;
    let mut acked = 0;
    while acked < 20 {
        match first.recv().await {
            Some(furrow_proto::Message::Ack { seq }) => acked = seq,
            other => panic!("expected ACK, got {other:?}"),
        }
    }
    // Both instances' APIs say where it is, and from which address.
    let v = until_held_by(&b, "mover", "gw-a").await;
    assert!(v["peer"].as_str().unwrap().starts_with("127.0.0.1:"));

    // The device reconnects through the other instance.
    let (_second, welcome) = b.connect_device("mover", &token).await;
    assert_eq!(welcome.last_seq, 20, "last_seq from the shared store");
    // The old connection hears GOODBYE SESSION_TAKEN_OVER and is closed.
    let mut got_goodbye = false;
    while let Some(m) = first.recv_within(Duration::from_secs(5)).await {
        if let furrow_proto::Message::Goodbye(g) = m {
            assert_eq!(g.code, goodbye::SESSION_TAKEN_OVER);
            got_goodbye = true;
        }
    }
    assert!(got_goodbye, "the old instance did not say GOODBYE");
    within(Duration::from_secs(5), "old session gone", async {
        while a.registry().is_online("mover") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    until_held_by(&a, "mover", "gw-b").await;
    // The old session's end did not erase the new holder.
    tokio::time::sleep(Duration::from_millis(300)).await;
    until_held_by(&a, "mover", "gw-b").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_created_on_one_instance_reaches_a_device_on_another() {
    let pg = Postgres::start();
    let url = pg.fresh_db().await;
    let a = instance(&url, "gw-a").await;
    let b = instance(&url, "gw-b").await;
    let token = a.add_device("valve").await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
    let client = Client::start_with_handler(
        ClientConfig::new(b.addr().to_string(), "valve", token),
        handler(move |cmd| {
            let tx = tx.clone();
            async move {
                let _ = tx.send((cmd.id, Instant::now()));
                CommandReply::ok(1, b"{\"ok\":true}".to_vec())
            }
        }),
    )
    .expect("client");
    b.wait_online("valve").await;
    until_held_by(&a, "valve", "gw-b").await;

    // Latency from the API call on A to the handler on B's device.
    let mut latencies = Vec::new();
    for n in 0..50 {
        let sent = Instant::now();
        let c = post(
            &a,
            "/v1/devices/valve/commands",
            json!({"name": "open", "payload": {"n": n}}),
        )
        .await;
        let id = c["command_id"].as_u64().expect("command id");
        let (got, at) = within(Duration::from_secs(10), "command delivered", rx.recv())
            .await
            .expect("handler ran");
        assert_eq!(got, id);
        latencies.push(at.duration_since(sent));
    }
    latencies.sort();
    eprintln!(
        "cross-instance command delivery over {} commands: p50 {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        latencies[latencies.len() / 2],
        latencies[latencies.len() * 99 / 100],
        latencies[latencies.len() - 1]
    );
    // The answer is recorded, visible through either instance.
    let last = within(Duration::from_secs(10), "command succeeded", async {
        loop {
            let v = get(&a, "/v1/devices/valve/commands?limit=1").await;
            if v["commands"][0]["state"] == json!("succeeded") {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(
        last["commands"][0]["result"]["payload"],
        json!({"ok": true})
    );
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_instance_is_cleared_and_a_leaving_one_clears_itself() {
    let pg = Postgres::start();
    let url = pg.fresh_db().await;
    let mut a = instance(&url, "gw-a").await;
    let token = a.add_device("orphan").await;
    let (dev, _) = a.connect_device("orphan", &token).await;
    until_held_by(&a, "orphan", "gw-a").await;

    // A crashed instance: records left with an old heartbeat.
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
        .batch_execute(
            "INSERT INTO instances VALUES ('gw-dead', 1, 1);
             INSERT INTO devices (device_id, token_hash, created_ms) VALUES ('ghost', '\\x00', 1);
             INSERT INTO sessions SELECT id, 'gw-dead', 999999, '10.0.0.9:1', 1 FROM devices
                 WHERE device_id = 'ghost';",
        )
        .await
        .expect("plant a dead instance");
    let ghost = get(&a, "/v1/devices/ghost").await;
    assert_eq!(
        ghost["online"],
        json!(false),
        "a dead instance's device is offline"
    );
    within(Duration::from_secs(10), "dead instance swept", async {
        loop {
            let n: i64 = client
                .query_one(
                    "SELECT count(*) FROM sessions WHERE instance_id = 'gw-dead'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if n == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let live: i64 = client
        .query_one(
            "SELECT count(*) FROM sessions WHERE instance_id = 'gw-a'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(live, 1, "a live instance's records stay");

    // A clean shutdown removes the instance and its records.
    a.shutdown().await;
    drop(dev);
    let left: i64 = client
        .query_one(
            "SELECT (SELECT count(*) FROM sessions) + (SELECT count(*) FROM instances)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_through_one_instance_disconnects_the_device_on_another() {
    let pg = Postgres::start();
    let url = pg.fresh_db().await;
    // The revocation log is polled only every minute here: the
    // notification alone must do it.
    let slow_poll = |name: &'static str| {
        let url = url.clone();
        TestGateway::start_with(move |c| {
            c.database_url = url;
            c.instance_id = name.into();
            c.sessions.revocation_poll_ms = 60_000;
        })
    };
    let a = slow_poll("gw-a").await;
    let b = slow_poll("gw-b").await;
    let token = a.add_device("stolen").await;
    let (mut dev, _) = b.connect_device("stolen", &token).await;
    until_held_by(&a, "stolen", "gw-b").await;
    let v = post(&a, "/v1/devices/stolen/revoke", json!({})).await;
    assert_eq!(v["revoked"], json!(true));
    assert_eq!(v["disconnected"], json!(false), "not connected to gw-a");
    match dev.recv_within(Duration::from_secs(5)).await {
        Some(furrow_proto::Message::Goodbye(g)) => assert_eq!(g.code, goodbye::DEVICE_REVOKED),
        other => panic!("expected GOODBYE DEVICE_REVOKED, got {other:?}"),
    }
}

/// A device connecting (again) to `addr`: its WELCOME's `last_seq`, and
/// the name of the COMMAND it must be sent first if `commanded`.
async fn come_back(
    addr: std::net::SocketAddr,
    id: &str,
    token: &str,
    commanded: bool,
) -> (u64, Option<String>, RawDevice) {
    let mut dev = RawDevice::connect(addr).await;
    let w = dev.hello(id, token, 0).await;
    let command = if commanded {
        match dev.recv_within(Duration::from_secs(10)).await {
            Some(furrow_proto::Message::Command(c)) => Some(c.name.to_string()),
            other => panic!("{id}: expected its open COMMAND, got {other:?}"),
        }
    } else {
        None
    };
    (w.last_seq, command, dev)
}

/// A fleet reconnecting at once: the handshakes' lookups and claims are
/// answered in batches (`store/postgres/batch.rs`), and every device still
/// gets its own exact `last_seq` and the commands queued while it was
/// away, including devices that connect twice in the same instant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_handshakes_gets_exact_last_seq_and_queued_commands() {
    const DEVICES: usize = 200;
    const TWICE: usize = 20;
    let pg = Postgres::start();
    let url = pg.fresh_db().await;
    let a = instance(&url, "gw-a").await;
    let mut tokens = Vec::new();
    for i in 0..DEVICES {
        tokens.push(a.add_device(&format!("burst-{i}")).await);
    }
    // Stored readings for every other device, a different count each.
    let stored = |i: usize| {
        if i.is_multiple_of(2) {
            (i % 7 + 1) as u64
        } else {
            0
        }
    };
    for (i, token) in tokens.iter().enumerate() {
        let n = stored(i);
        if n == 0 {
            continue;
        }
        let (mut dev, _) = a.connect_device(&format!("burst-{i}"), token).await;
        dev.telemetry_batch(1..=n).await;
        let mut acked = 0;
        while acked < n {
            match dev.recv().await {
                Some(furrow_proto::Message::Ack { seq }) => acked = seq,
                other => panic!("expected ACK, got {other:?}"),
            }
        }
    }
    for i in 0..DEVICES {
        a.wait_offline(&format!("burst-{i}")).await;
    }
    // A command queued for every fifth device (not one that connects twice:
    // which of its connections is told is a race).
    let commanded = |i: usize| i.is_multiple_of(5) && i >= TWICE;
    command_each(&a, "burst", "wake", (0..DEVICES).filter(|&i| commanded(i))).await;

    // All at once, the first TWICE devices on two connections each.
    let addr = a.addr();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, token) in tokens.iter().enumerate() {
        for _ in 0..if i < TWICE { 2 } else { 1 } {
            let token = token.clone();
            tasks.spawn(async move {
                let (last_seq, command, dev) =
                    come_back(addr, &format!("burst-{i}"), &token, commanded(i)).await;
                (i, last_seq, command, dev)
            });
        }
    }
    let mut welcomed = 0;
    let mut devices = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let (i, last_seq, command, dev) = r.expect("device task");
        assert_eq!(last_seq, stored(i), "device {i}: last_seq");
        if commanded(i) {
            assert_eq!(command.as_deref(), Some(format!("wake-{i}").as_str()));
        }
        welcomed += 1;
        devices.push(dev);
    }
    assert_eq!(welcomed, DEVICES + TWICE);
    // Each device ends up held once, by this instance.
    for i in [0, TWICE - 1, TWICE, DEVICES - 1] {
        until_held_by(&a, &format!("burst-{i}"), "gw-a").await;
    }
}

/// A fleet moving to another instance at once, while the first still holds
/// every device: each claim displaces a live session, and what the claims
/// read is read again once the old sessions released (batched, like the
/// claims). Every device still gets its own exact `last_seq` and its
/// unfinished command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_moving_to_another_instance_at_once_gets_exact_last_seq_and_its_commands() {
    const DEVICES: usize = 40;
    let pg = Postgres::start();
    let url = pg.fresh_db().await;
    let a = instance(&url, "gw-a").await;
    let b = instance(&url, "gw-b").await;
    let stored = |i: usize| (i % 5 + 1) as u64;
    let commanded = |i: usize| i.is_multiple_of(4);
    let mut tokens = Vec::new();
    let mut on_a = Vec::new();
    for i in 0..DEVICES {
        let id = format!("fleet-{i}");
        let token = a.add_device(&id).await;
        let (mut dev, _) = a.connect_device(&id, &token).await;
        dev.telemetry_batch(1..=stored(i)).await;
        dev.until_ack(stored(i)).await;
        tokens.push(token);
        on_a.push(dev);
    }
    // Delivered to the devices on gw-a, never answered: still open.
    command_each(&a, "fleet", "move", (0..DEVICES).filter(|&i| commanded(i))).await;
    for i in 0..DEVICES {
        until_held_by(&b, &format!("fleet-{i}"), "gw-a").await;
    }

    let addr = b.addr();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, token) in tokens.iter().enumerate() {
        let token = token.clone();
        tasks.spawn(async move {
            let (last_seq, command, dev) =
                come_back(addr, &format!("fleet-{i}"), &token, commanded(i)).await;
            (i, last_seq, command, dev)
        });
    }
    let mut devices = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let (i, last_seq, command, dev) = r.expect("device task");
        assert_eq!(last_seq, stored(i), "device {i}: last_seq");
        if commanded(i) {
            assert_eq!(command.as_deref(), Some(format!("move-{i}").as_str()));
        }
        devices.push(dev);
    }
    assert_eq!(devices.len(), DEVICES);
    for i in [0, DEVICES / 2, DEVICES - 1] {
        until_held_by(&a, &format!("fleet-{i}"), "gw-b").await;
    }
    drop(on_a);
}

/// A store too slow for the handshake's deadline: the device gets BUSY at
/// the deadline (and backs off), and nothing is claimed for a connection
/// it has given up on. Here a transaction holds `devices` locked, so the
/// lookup waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_past_its_deadline_gets_busy_and_claims_nothing() {
    let pg = Postgres::start();
    let url = pg.fresh_db().await;
    let gw = {
        let url = url.clone();
        TestGateway::start_with(move |c| {
            c.database_url = url;
            c.instance_id = "gw-slow".into();
            c.limits.handshake_timeout_ms = 700;
        })
        .await
    };
    let token = gw.add_device("slow").await;
    let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    db.batch_execute("BEGIN; LOCK TABLE devices IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");

    let started = Instant::now();
    let mut dev = RawDevice::connect(gw.addr()).await;
    dev.send(&hello_msg("slow", &token, 0)).await;
    match dev.recv_within(Duration::from_secs(5)).await {
        Some(furrow_proto::Message::Error(e)) => {
            assert_eq!(e.code, furrow_proto::ErrorCode::Busy as u16, "{e:?}");
        }
        other => panic!("expected ERROR BUSY, got {other:?}"),
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(600) && waited < Duration::from_secs(3),
        "BUSY after {waited:?}"
    );
    db.batch_execute("ROLLBACK").await.expect("unlock");
    let claimed: i64 = db
        .query_one("SELECT count(*) FROM sessions", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(claimed, 0, "a claim for a handshake that gave up");

    // The store answers again: the next attempt is welcomed.
    let (_dev, welcome) = gw.connect_device("slow", &token).await;
    assert_eq!(welcome.last_seq, 0);
}
