//! MQTT events against a real Mosquitto that the test starts: a subscriber
//! sees every telemetry and status event; with the broker gone, ingest and
//! ACKs go on and the dropped events are counted; when it returns,
//! publishing resumes.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use support::mosquitto::Mosquitto;
use support::*;
use tokio::sync::mpsc;

/// A subscriber to `furrow/#`; yields (topic, JSON payload, retained).
async fn subscribe(
    addr: std::net::SocketAddr,
    id: &str,
) -> mpsc::UnboundedReceiver<(String, Value, bool)> {
    subscribe_with(addr.ip().to_string(), addr.port(), None, id).await
}

/// Like [`subscribe`], to `host`, over TLS when a CA is given.
async fn subscribe_with(
    host: String,
    port: u16,
    ca: Option<Vec<u8>>,
    id: &str,
) -> mpsc::UnboundedReceiver<(String, Value, bool)> {
    subscribe_as(host, port, ca, None, id).await
}

/// Like [`subscribe_with`], presenting a client certificate and key.
async fn subscribe_as(
    host: String,
    port: u16,
    ca: Option<Vec<u8>>,
    client: Option<(Vec<u8>, Vec<u8>)>,
    id: &str,
) -> mpsc::UnboundedReceiver<(String, Value, bool)> {
    let mut opts = MqttOptions::new(id, host, port);
    if let Some(ca) = ca {
        opts.set_transport(rumqttc::Transport::tls(ca, client, None));
    }
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    let (tx, rx) = mpsc::unbounded_channel();
    let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
    let mut subscribed_tx = Some(subscribed_tx);
    tokio::spawn(async move {
        let _client = client.clone();
        client.subscribe("furrow/#", QoS::AtLeastOnce).await.ok();
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(t) = subscribed_tx.take() {
                        let _ = t.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let v: Value = serde_json::from_slice(&p.payload).expect("events are JSON");
                    if tx.send((p.topic.clone(), v, p.retain)).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    within(Duration::from_secs(10), "SUBACK", subscribed_rx)
        .await
        .expect("subscribed");
    rx
}

/// Receives until `pred` has seen what it needs; fails after 15 s.
async fn until(
    rx: &mut mpsc::UnboundedReceiver<(String, Value, bool)>,
    what: &str,
    mut done: impl FnMut(&str, &Value, bool) -> bool,
) {
    within(Duration::from_secs(15), what, async {
        loop {
            let (topic, v, retained) = rx.recv().await.expect("subscriber alive");
            if done(&topic, &v, retained) {
                return;
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_sees_every_telemetry_and_status_event() {
    let broker = Mosquitto::start();
    let mut rx = subscribe(broker.addr(), "sub-1").await;
    let url = broker.url();
    let gw = TestGateway::start_with(move |c| {
        c.mqtt.url = url;
        c.instance_id = "gw-test".into();
    })
    .await;
    // The instance says it is online (retained).
    until(&mut rx, "instance online", |t, v, _| {
        t == "furrow/instances/gw-test/status" && v["online"] == true
    })
    .await;

    let token = gw.add_device("ev-1").await;
    let mut dev = RawDevice::connect(gw.addr()).await;
    dev.hello("ev-1", &token, 30).await;
    until(&mut rx, "status online", |t, v, _| {
        t == "furrow/devices/ev-1/status" && v["online"] == true && v["instance"] == "gw-test"
    })
    .await;
    dev.telemetry_batch(1..=50).await;
    dev.until_ack(50).await;
    let mut seqs = BTreeSet::new();
    until(&mut rx, "50 telemetry events", |t, v, retained| {
        if t == "furrow/devices/ev-1/telemetry" {
            assert!(!retained);
            assert_eq!(v["device_id"], "ev-1");
            assert_eq!(v["content_type"], "json");
            assert!(v["payload"].is_object(), "JSON payloads as JSON: {v}");
            assert!(v["received_ms"].as_u64().unwrap() > 0);
            seqs.insert(v["seq"].as_u64().unwrap());
        }
        seqs.len() == 50
    })
    .await;
    assert_eq!(seqs, (1..=50).collect());

    // A command's every state change is an event.
    let created: Value = reqwest::Client::new()
        .post(gw.api_url("/v1/devices/ev-1/commands"))
        .json(&serde_json::json!({"name": "blink"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["command_id"].as_u64().unwrap();
    match dev.recv().await {
        Some(furrow_proto::Message::Command(c)) => assert_eq!(c.command_id, id),
        other => panic!("expected COMMAND, got {other:?}"),
    }
    dev.send(&command_result_msg(
        id,
        furrow_proto::CommandStatus::Succeeded,
    ))
    .await;
    let topic = format!("furrow/devices/ev-1/commands/{id}");
    let mut states = Vec::new();
    until(&mut rx, "command events", |t, v, _| {
        if t == topic {
            states.push(v["state"].as_str().unwrap().to_owned());
        }
        states.last().is_some_and(|s| s == "succeeded")
    })
    .await;
    // delivered is recorded in the background: it may be overtaken by an
    // answer that comes first, which then finds the command still queued.
    assert_eq!(
        states.first().map(String::as_str),
        Some("queued"),
        "{states:?}"
    );
    assert!(states.len() <= 3, "{states:?}");
    drop(dev);
    until(&mut rx, "status offline", |t, v, _| {
        t == "furrow/devices/ev-1/status" && v["online"] == false
    })
    .await;
    // Retained: a late subscriber learns the device's last status at once.
    let mut late = subscribe(broker.addr(), "sub-late").await;
    until(&mut late, "retained status", |t, v, retained| {
        t == "furrow/devices/ev-1/status" && retained && v["online"] == false
    })
    .await;
}

fn dropped(page: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix("furrow_mqtt_events_dropped_total "))
        .map_or(0.0, |v| v.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_broker_ingest_goes_on_and_drops_are_counted_then_publishing_resumes() {
    let broker = Mosquitto::start();
    let url = broker.url();
    let gw = TestGateway::start_with(move |c| {
        c.mqtt.url = url;
        c.mqtt.queue_capacity = 20;
    })
    .await;
    let token = gw.add_device("ev-2").await;
    let mut rx = subscribe(broker.addr(), "sub-2").await;
    let mut dev = RawDevice::connect(gw.addr()).await;
    dev.hello("ev-2", &token, 30).await;
    dev.telemetry_batch(1..=10).await;
    dev.until_ack(10).await;
    until(&mut rx, "seq 10 published", |t, v, _| {
        t.ends_with("/telemetry") && v["seq"] == 10
    })
    .await;

    // The broker dies: every reading is still stored and ACKed.
    let stopped = broker.kill();
    dev.telemetry_batch(11..=500).await;
    dev.until_ack(500).await;
    let stored = stored_seqs_async(&gw.db_path(), "ev-2").await;
    assert_eq!(stored, (1..=500).collect::<Vec<_>>());
    let metrics = reqwest::get(gw.api_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        dropped(&metrics) > 0.0,
        "events beyond the queue are counted as dropped"
    );

    // It comes back: publishing resumes by itself.
    let broker = stopped.restart();
    let mut rx = subscribe(broker.addr(), "sub-3").await;
    within(Duration::from_secs(20), "publishing resumes", async {
        let mut seq = 501;
        loop {
            dev.telemetry(seq, r#"{"after":"outage"}"#).await;
            dev.until_ack(seq).await;
            let got = tokio::time::timeout(Duration::from_millis(500), async {
                loop {
                    let (t, v, _) = rx.recv().await.expect("subscriber alive");
                    if t.ends_with("/telemetry") && v["seq"].as_u64().unwrap() >= 501 {
                        return;
                    }
                }
            })
            .await;
            if got.is_ok() {
                return;
            }
            seq += 1;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_go_over_tls_to_a_broker_whose_certificate_checks_out() {
    let (broker, ca) = Mosquitto::start_tls();
    let port = broker.addr().port();
    let ca_pem = std::fs::read(&ca).unwrap();
    let mut rx = subscribe_with("localhost".into(), port, Some(ca_pem), "sub-tls").await;
    let ca_s = ca.to_string_lossy().into_owned();
    let gw = TestGateway::start_with(move |c| {
        c.mqtt.url = format!("mqtts://localhost:{port}");
        c.mqtt.ca_file = ca_s;
    })
    .await;
    let token = gw.add_device("tls-1").await;
    let mut dev = RawDevice::connect(gw.addr()).await;
    dev.hello("tls-1", &token, 30).await;
    dev.telemetry_batch(1..=3).await;
    dev.until_ack(3).await;
    until(&mut rx, "telemetry over TLS", |t, v, _| {
        t == "furrow/devices/tls-1/telemetry" && v["seq"] == 3
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_requires_client_certificates_takes_the_gateways_and_refuses_none() {
    // Certificates from `furrow certs` (its library): a CA, the broker's
    // server certificate, and client certificates for the gateway and the
    // test's subscriber.
    let ca = furrow::certs::Ca::new("furrow test CA", 1).unwrap();
    let server = ca.server(&["localhost".to_owned()], 1).unwrap();
    let broker = Mosquitto::start_mtls(&ca.cert_pem, &server.cert_pem, &server.key_pem);
    let port = broker.addr().port();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_string_lossy().into_owned()
    };
    let ca_file = write("ca.pem", &ca.cert_pem);
    let sub = ca.device("subscriber", 1).unwrap();
    let mut rx = subscribe_as(
        "localhost".into(),
        port,
        Some(ca.cert_pem.clone().into_bytes()),
        Some((sub.cert_pem.into_bytes(), sub.key_pem.into_bytes())),
        "sub-mtls",
    )
    .await;

    // Without a client certificate: the broker refuses the gateway, whose
    // events never arrive (ingest goes on all the same).
    let bare = TestGateway::start_with({
        let ca_file = ca_file.clone();
        move |c| {
            c.mqtt.url = format!("mqtts://localhost:{port}");
            c.mqtt.ca_file = ca_file;
        }
    })
    .await;
    let token = bare.add_device("bare-1").await;
    let mut dev = RawDevice::connect(bare.addr()).await;
    dev.hello("bare-1", &token, 30).await;
    dev.telemetry_batch(1..=2).await;
    dev.until_ack(2).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !broker.log().contains("did not return a certificate") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the broker did not refuse the gateway: {}",
            broker.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // With one: events flow.
    let gw_cert = ca.device("furrow-gateway", 1).unwrap();
    let (cert_file, key_file) = (
        write("gw.pem", &gw_cert.cert_pem),
        write("gw.key", &gw_cert.key_pem),
    );
    let gw = TestGateway::start_with(move |c| {
        c.mqtt.url = format!("mqtts://localhost:{port}");
        c.mqtt.ca_file = ca_file;
        c.mqtt.cert_file = cert_file;
        c.mqtt.key_file = key_file;
    })
    .await;
    let token = gw.add_device("mtls-1").await;
    let mut dev = RawDevice::connect(gw.addr()).await;
    dev.hello("mtls-1", &token, 30).await;
    dev.telemetry_batch(1..=3).await;
    dev.until_ack(3).await;
    until(&mut rx, "telemetry over mutual TLS", |t, v, _| {
        t == "furrow/devices/mtls-1/telemetry" && v["seq"] == 3
    })
    .await;
    // The gateway without a certificate got nothing through.
    while let Ok((t, _, _)) = rx.try_recv() {
        assert!(
            !t.contains("bare-1"),
            "an event from the refused gateway: {t}"
        );
    }
}

#[test]
fn a_client_certificate_needs_its_key_and_tls() {
    let mut c = furrow::Config::default();
    c.mqtt.url = "mqtt://localhost:1883".into();
    c.mqtt.cert_file = "/tmp/gw.pem".into();
    c.mqtt.key_file = "/tmp/gw.key".into();
    let e = c.validate().unwrap_err().to_string();
    assert!(
        e.contains("mqtt.cert_file") && e.contains("mqtts://"),
        "{e}"
    );
    c.mqtt.url = "mqtts://localhost:8883".into();
    c.mqtt.key_file.clear();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "x").unwrap();
    c.mqtt.ca_file = ca.to_string_lossy().into_owned();
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("go together"), "{e}");
    c.mqtt.key_file = "/nonexistent/gw.key".into();
    std::fs::write(dir.path().join("gw.pem"), "x").unwrap();
    c.mqtt.cert_file = dir.path().join("gw.pem").to_string_lossy().into_owned();
    let e = c.validate().unwrap_err().to_string();
    assert!(
        e.contains("mqtt.key_file") && e.contains("/nonexistent/gw.key"),
        "{e}"
    );
}
