//! The scale-out deployment end to end, with real programs only: three
//! `furrow serve` processes behind HAProxy (send-proxy-v2, /readyz health
//! checks), sharing a throwaway PostgreSQL and a throwaway Mosquitto.
//!
//! 300 SDK devices stream through HAProxy. A command created through
//! instance 1 reaches a device held by instance 3. Then one instance is
//! killed with SIGKILL: its devices come back through HAProxy on the
//! others, its session records are cleared, its MQTT will marks it
//! offline, and in the end every device's telemetry is stored completely
//! and exactly once. The recorded peers are the devices' addresses (the
//! PROXY header's), not HAProxy's: HAProxy connects from 127.0.0.5.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use furrow::store::{PostgresOptions, PostgresStore};
use furrow_client::{handler, Client, CommandReply, Config as ClientConfig};
use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use support::haproxy::Haproxy;
use support::mosquitto::Mosquitto;
use support::postgres::Postgres;
use support::process::GatewayProcess;
use support::*;

const DEVICES: usize = 300;
/// HAProxy's source address toward the gateways.
const HAPROXY_SOURCE: &str = "127.0.0.5";

/// Which instance holds each device, and from which address, as recorded.
async fn holders(db: &tokio_postgres::Client) -> BTreeMap<String, (String, String)> {
    db.query(
        "SELECT d.device_id, s.instance_id, s.peer FROM sessions s JOIN devices d ON d.id = s.device",
        &[],
    )
    .await
    .expect("read sessions")
    .iter()
    .map(|r| (r.get(0), (r.get(1), r.get(2))))
    .collect()
}

/// Instance status events from the broker: instance -> online.
fn watch_instances(broker: SocketAddr) -> Arc<std::sync::Mutex<BTreeMap<String, bool>>> {
    let seen = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
    let mut opts = MqttOptions::new("cluster-watch", broker.ip().to_string(), broker.port());
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = AsyncClient::new(opts, 100);
    let out = Arc::clone(&seen);
    tokio::spawn(async move {
        let _ = client
            .subscribe("furrow/instances/+/status", QoS::AtLeastOnce)
            .await;
        loop {
            match events.poll().await {
                Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                    let v: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                    let name = p.topic.split('/').nth(2).unwrap_or("").to_owned();
                    out.lock().unwrap().insert(name, v["online"] == json!(true));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    seen
}

/// Sends a request to an instance's API; the answer as JSON.
async fn json_of(req: reqwest::RequestBuilder) -> Value {
    req.send()
        .await
        .expect("request")
        .json()
        .await
        .expect("JSON")
}

async fn until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    within(limit, what, async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_behind_haproxy_survive_a_kill() {
    let pg = Postgres::start();
    let url = pg.fresh_db().await;
    let broker = Mosquitto::start();
    let mqtt_url = format!("mqtt://{}", broker.addr());
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();

    // Three gateways, each trusting PROXY headers from loopback.
    let mut gateways = Vec::new();
    for n in 1..=3 {
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let name = format!("gw-{n}");
        let mut gw = GatewayProcess::spawn_with_env(
            dir.path(),
            &name,
            listen,
            &["--database", &url, "--mqtt", &mqtt_url, "--proxy-protocol"],
            &[
                ("FURROW_SESSIONS__HEARTBEAT_MS", "250"),
                ("FURROW_SESSIONS__INSTANCE_TIMEOUT_MS", "1500"),
            ],
        );
        gw.ready(&http).await;
        gateways.push((name, listen, gw));
    }
    let instances = watch_instances(broker.addr());

    // HAProxy in front, as deploy/haproxy/haproxy.cfg, on loopback ports.
    let front: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let servers: Vec<(String, SocketAddr, u16)> = gateways
        .iter()
        .map(|(name, listen, gw)| (name.clone(), *listen, gw.api.port()))
        .collect();
    let _haproxy = Haproxy::in_front_of(front, HAPROXY_SOURCE, &servers);

    // Devices, provisioned in the shared database.
    let store = PostgresStore::connect(&url, PostgresOptions::default())
        .await
        .expect("store");
    let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let streaming = Arc::new(AtomicBool::new(true));
    let (cmd_tx, mut cmd_rx) = tokio::sync::mpsc::unbounded_channel::<(String, u64)>();
    let mut clients = Vec::new();
    let mut senders = Vec::new();
    // When each device last completed a handshake (WELCOME).
    let connected = Arc::new(std::sync::Mutex::new(
        BTreeMap::<String, std::time::Instant>::new(),
    ));
    for i in 0..DEVICES {
        let id = format!("field-{i:03}");
        let token = furrow::devices::add_device(&store, &id)
            .await
            .expect("provision");
        let mut c = ClientConfig::new(front.to_string(), id.clone(), token);
        c.backoff.initial = Duration::from_millis(50);
        c.backoff.max = Duration::from_millis(500);
        let tx = cmd_tx.clone();
        let me = id.clone();
        let client = Arc::new(
            Client::start_with_handler(
                c,
                handler(move |cmd| {
                    let tx = tx.clone();
                    let me = me.clone();
                    async move {
                        let _ = tx.send((me, cmd.id));
                        CommandReply::ok(1, b"{\"done\":true}".to_vec())
                    }
                }),
            )
            .expect("client"),
        );
        {
            let mut events = client.events();
            let connected = Arc::clone(&connected);
            let id = id.clone();
            tokio::spawn(async move {
                use tokio::sync::broadcast::error::RecvError;
                loop {
                    let e = match events.recv().await {
                        Ok(e) => e,
                        // Only ACK events could crowd the channel; a lost
                        // one is of no interest here.
                        Err(RecvError::Lagged(_)) => continue,
                        Err(RecvError::Closed) => break,
                    };
                    if let furrow_client::Event::Connected { .. } = e {
                        connected
                            .lock()
                            .unwrap()
                            .insert(id.clone(), std::time::Instant::now());
                    }
                }
            });
        }
        let sender = stream_while(
            Arc::clone(&client),
            Arc::clone(&streaming),
            Duration::from_millis(100),
        );
        clients.push((id, client));
        senders.push(sender);
    }

    // All online, spread over the three, recorded with the devices' own
    // addresses.
    until("300 devices recorded", Duration::from_secs(60), || async {
        holders(&db).await.len() == DEVICES
    })
    .await;
    let held = holders(&db).await;
    let per: BTreeSet<&str> = held.values().map(|(i, _)| i.as_str()).collect();
    assert_eq!(per.len(), 3, "leastconn spreads devices: {per:?}");
    for (id, (_, peer)) in &held {
        let ip = peer.rsplit_once(':').map(|(ip, _)| ip).unwrap_or("");
        assert_eq!(
            ip, "127.0.0.1",
            "{id}: recorded peer {peer} is not the device's"
        );
        assert_ne!(ip, HAPROXY_SOURCE);
    }
    // Every instance's API tells where a device is.
    let (probe, (probe_holder, probe_peer)) = held.iter().next().unwrap();
    let v = json_of(http.get(format!("http://{}/v1/devices/{probe}", gateways[0].2.api))).await;
    assert_eq!(v["instance"], json!(probe_holder));
    assert_eq!(v["peer"], json!(probe_peer));

    // A command created through instance 1 reaches a device on instance 3.
    let target = held
        .iter()
        .find(|(_, (i, _))| i == "gw-3")
        .map(|(id, _)| id.clone())
        .expect("a device on gw-3");
    let created = json_of(
        http.post(format!(
            "http://{}/v1/devices/{target}/commands",
            gateways[0].2.api
        ))
        .json(&json!({"name": "irrigate", "payload": {"minutes": 5}})),
    )
    .await;
    let command_id = created["command_id"].as_u64().expect("command id");
    let (who, got) = within(Duration::from_secs(10), "command delivered", cmd_rx.recv())
        .await
        .expect("a handler ran");
    assert_eq!((who.as_str(), got), (target.as_str(), command_id));
    until("command succeeded", Duration::from_secs(10), || async {
        let v = json_of(http.get(format!(
            "http://{}/v1/commands/{command_id}",
            gateways[0].2.api
        )))
        .await;
        v["state"] == json!("succeeded")
    })
    .await;

    // Kill instance 2 without warning. Its devices as recorded now; the
    // clock read before the kill, so that no reconnection can precede it
    // (this thread may be descheduled between the kill and the next line).
    let victims: BTreeSet<String> = holders(&db)
        .await
        .iter()
        .filter(|(_, (i, _))| i == "gw-2")
        .map(|(id, _)| id.clone())
        .collect();
    assert!(!victims.is_empty());
    let killed_at = std::time::Instant::now();
    gateways[1].2.child.kill().expect("SIGKILL");
    let _ = gateways[1].2.child.wait();

    // Its devices come back through HAProxy, on the others; its records
    // are cleared; the broker announces it offline (its will).
    until(
        "the killed instance's devices back elsewhere",
        Duration::from_secs(60),
        || async {
            let now = holders(&db).await;
            now.len() == DEVICES && now.values().all(|(i, _)| i != "gw-2")
        },
    )
    .await;
    let missing = || {
        let c = connected.lock().unwrap();
        victims
            .iter()
            .filter(|v| c.get(*v).is_none_or(|t| *t <= killed_at))
            .cloned()
            .collect::<Vec<_>>()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !missing().is_empty() {
        if std::time::Instant::now() > deadline {
            let now = holders(&db).await;
            let rows: Vec<_> = missing()
                .iter()
                .map(|v| (v.clone(), now.get(v).cloned()))
                .collect();
            panic!(
                "not welcomed again 60 s after the kill: {rows:?}\ngw-1:\n{}\ngw-3:\n{}",
                gateways[0].2.logs(),
                gateways[2].2.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let back = {
        let c = connected.lock().unwrap();
        victims
            .iter()
            .filter_map(|v| c.get(v))
            .map(|t| t.duration_since(killed_at))
            .max()
            .unwrap_or_default()
    };
    eprintln!(
        "{} devices of the killed instance: the last one welcomed again {back:?} after the kill",
        victims.len()
    );
    until("gw-2 deregistered", Duration::from_secs(30), || async {
        db.query_one(
            "SELECT count(*) FROM instances WHERE instance_id = 'gw-2'",
            &[],
        )
        .await
        .map(|r| r.get::<_, i64>(0) == 0)
        .unwrap_or(false)
    })
    .await;
    until("gw-2 offline on MQTT", Duration::from_secs(30), || async {
        instances.lock().unwrap().get("gw-2") == Some(&false)
    })
    .await;
    assert_eq!(instances.lock().unwrap().get("gw-1"), Some(&true));

    // Stream a little longer, then every device flushes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sent = stop_and_flush(&streaming, senders, &clients).await;

    // Complete and unique, for the killed instance's devices too.
    for ((id, _), n) in clients.iter().zip(&sent) {
        let context = format!("on gw-2: {}", victims.contains(id));
        assert_stored_exactly(&store, id, *n, &context).await;
    }
    for (_, c) in &clients {
        c.close().await;
    }
}
